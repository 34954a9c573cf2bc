"""SQLite never hands a decision's or a feedback event's number out twice (``AUTOINCREMENT``).

Without it SQLite numbers a new row ``max(seq) + 1``. ``prune`` can delete the newest rows (an
idle ledger whose every row is old enough), and the next feedback events then took numbers at
or below a checkpoint's log position: no engine ever learned them, neither the running one nor
one restoring the checkpoint. The tables are copied into ones declared ``AUTOINCREMENT``
(SQLite cannot alter a table's key), which costs one pass over each; PostgreSQL's sequences
never hand a number out twice, so nothing changes there.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TABLES = ("decisions", "feedback")


def _recreate(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table in TABLES:
        with op.batch_alter_table(
            table, recreate="always", table_kwargs={"sqlite_autoincrement": autoincrement}
        ):
            pass


def upgrade() -> None:
    _recreate(True)


def downgrade() -> None:
    _recreate(False)
