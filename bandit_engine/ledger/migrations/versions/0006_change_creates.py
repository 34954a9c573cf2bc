"""Change requests say whether they create their offer (``changes.creates``).

An offer created with governed settings (a budget, caps) is stored without them, inactive, and
its change request carries them. While that request is pending the offer must not be switched
on (it would serve with none of its caps); ``activate`` only told whether the approval switches
it on, so an offer created with ``"active": false`` could be switched on uncapped. Existing rows
take ``creates = activate``: a creation request that asked to stay inactive cannot be told apart
from an edit afterwards.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("changes") as batch:
        batch.add_column(
            sa.Column("creates", sa.Boolean, nullable=False, server_default=sa.false())
        )
    op.execute(sa.text("UPDATE changes SET creates = activate"))


def downgrade() -> None:
    with op.batch_alter_table("changes") as batch:
        batch.drop_column("creates")
