"""An index on the feedback log's event id: pruning deletes a decision's feedback events with it
(``Engine.prune``), and keeps a decision whose events some model has not checkpointed yet.

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
    op.create_index("ix_feedback_event", "feedback", ["event_id"])


def downgrade() -> None:
    op.drop_index("ix_feedback_event", table_name="feedback")
