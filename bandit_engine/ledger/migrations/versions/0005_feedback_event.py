"""An index on the feedback log's event id: pruning deletes a decision's feedback events with it
(``Engine.prune``), and keeps a decision whose events some model has not checkpointed yet.

On PostgreSQL the index is built CONCURRENTLY, outside the migration's transaction: ``feedback``
is the log every choose (provisional learning) and every reward appends to, and a plain
``CREATE INDEX`` would block those writes for as long as it builds on a large table. A build
that failed leaves an invalid index behind, so the upgrade drops any index of that name first
and can simply be run again.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        op.create_index("ix_feedback_event", "feedback", ["event_id"])
        return
    with op.get_context().autocommit_block():
        _drop_concurrently()
        op.create_index("ix_feedback_event", "feedback", ["event_id"], postgresql_concurrently=True)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        op.drop_index("ix_feedback_event", table_name="feedback")
        return
    with op.get_context().autocommit_block():  # a plain DROP INDEX waits for, then blocks, writers
        _drop_concurrently()


def _drop_concurrently() -> None:
    """PostgreSQL, outside a transaction: the index if there is one (valid or not)."""
    op.drop_index("ix_feedback_event", table_name="feedback", if_exists=True,
                  postgresql_concurrently=True)  # fmt: skip
