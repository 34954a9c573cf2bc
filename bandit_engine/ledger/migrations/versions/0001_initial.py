"""Initial ledger schema: offers, channels, decisions, rewards, feedback, snapshots.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _pk() -> sa.Column:
    return sa.Column(
        "id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
    )


def upgrade() -> None:
    op.create_table(
        "offers",
        sa.Column("offer_id", sa.String(128), primary_key=True),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("budget_cents", sa.BigInteger),
        sa.Column("max_impressions", sa.BigInteger),
        sa.Column("spent_cents", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("committed_cents", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("impressions", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("settled_cents", sa.BigInteger, nullable=False, server_default="0"),
        sa.CheckConstraint("spent_cents >= 0 AND committed_cents >= 0", name="ck_offers_money"),
        sa.CheckConstraint(
            "budget_cents IS NULL OR spent_cents + committed_cents <= budget_cents",
            name="ck_offers_budget",
        ),
        sa.CheckConstraint(
            "max_impressions IS NULL OR impressions <= max_impressions", name="ck_offers_impressions"
        ),
    )
    op.create_table(
        "channels",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("spec", sa.JSON, nullable=False),
    )
    op.create_table(
        "catalog_version",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "members",
        sa.Column("member_id", sa.String(128), primary_key=True),
        sa.Column("touches", sa.BigInteger, nullable=False, server_default="0"),
    )
    op.create_table(
        "decisions",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("event_id", sa.String(128), nullable=False, unique=True),
        sa.Column("member_id", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("grp", sa.String(16), nullable=False),
        sa.Column("offer_id", sa.String(128)),
        sa.Column("probability", sa.Float),
        sa.Column("policy_name", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.BigInteger, nullable=False),
        sa.Column("issued_at", sa.BigInteger, nullable=False),
        sa.Column("deadline", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("reserved_cents", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("spent_cents", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("active", sa.Boolean, nullable=False),
        sa.Column("learnable", sa.Boolean, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reward", sa.Float),
        sa.Column("reward_count", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("spent_cents <= reserved_cents", name="ck_decisions_spent"),
    )
    op.create_index("ix_decisions_member_issued", "decisions", ["member_id", "issued_at"])
    op.create_index("ix_decisions_status_deadline", "decisions", ["status", "deadline"])
    op.create_index("ix_decisions_channel_seq", "decisions", ["channel", "seq"])
    op.create_table(
        "rewards",
        _pk(),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("reward_id", sa.String(128), nullable=False),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("cost_cents", sa.BigInteger, nullable=False),
        sa.Column("at", sa.BigInteger, nullable=False),
    )
    op.create_index("ux_rewards_event_reward", "rewards", ["event_id", "reward_id"], unique=True)
    op.create_table(
        "feedback",
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("event_id", sa.String(128), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("reward", sa.Float, nullable=False),
        sa.Column("learn", sa.Boolean, nullable=False),
    )
    op.create_table(
        "snapshots",
        _pk(),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("policy_name", sa.String(64), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("feedback_seq", sa.BigInteger, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_snapshots_channel_id", "snapshots", ["channel", "id"])


def downgrade() -> None:
    for table in ("snapshots", "feedback", "rewards", "decisions", "members", "catalog_version",
                  "channels", "offers"):  # fmt: skip
        op.drop_table(table)
