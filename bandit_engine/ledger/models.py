"""SQLAlchemy 2 typed ORM rows. They never leave :mod:`.sql`; callers get frozen records."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    Index,
    Integer,
    LargeBinary,
    String,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


# 64-bit keys; SQLite only auto-increments an INTEGER PRIMARY KEY
BigKey = BigInteger().with_variant(Integer, "sqlite")


class OfferRow(Base):
    __tablename__ = "offers"

    offer_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    budget_cents: Mapped[int | None] = mapped_column(BigInteger)
    max_impressions: Mapped[int | None] = mapped_column(BigInteger)
    spent_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    committed_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    impressions: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    settled_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    # the caps, enforced by the database as a last line (the writes check them first);
    # autogenerate does not compare CHECK constraints, so these mirror migration 0001 by hand
    __table_args__ = (
        CheckConstraint("spent_cents >= 0 AND committed_cents >= 0", name="ck_offers_money"),
        CheckConstraint(
            "budget_cents IS NULL OR spent_cents + committed_cents <= budget_cents",
            name="ck_offers_budget",
        ),
        CheckConstraint(
            "max_impressions IS NULL OR impressions <= max_impressions",
            name="ck_offers_impressions",
        ),
    )


class ChannelRow(Base):
    __tablename__ = "channels"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)


class CatalogVersionRow(Base):
    __tablename__ = "catalog_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class SettingRow(Base):
    """An engine-wide setting by name (``member_cap``: the cap shared by every channel)."""

    __tablename__ = "settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=True)


class MemberRow(Base):
    """One row per member with capped exposures: its update serializes that member's
    frequency-cap checks (a row lock on PostgreSQL, the write lock on SQLite)."""

    __tablename__ = "members"

    member_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    touches: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class DecisionRow(Base):
    __tablename__ = "decisions"

    seq: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128), unique=True)
    member_id: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(128))
    group: Mapped[str] = mapped_column("grp", String(16))
    offer_id: Mapped[str | None] = mapped_column(String(128))
    probability: Mapped[float | None] = mapped_column(Float)
    policy_name: Mapped[str] = mapped_column(String(64))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    issued_at: Mapped[int] = mapped_column(BigInteger)
    deadline: Mapped[int] = mapped_column(BigInteger)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    reserved_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_cents: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    learnable: Mapped[bool] = mapped_column(Boolean, default=False)
    status: Mapped[str] = mapped_column(String(16))
    reward: Mapped[float | None] = mapped_column(Float)
    reward_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_decisions_member_issued", "member_id", "issued_at"),
        Index("ix_decisions_status_deadline", "status", "deadline"),
        Index("ix_decisions_channel_seq", "channel", "seq"),
        CheckConstraint("spent_cents <= reserved_cents", name="ck_decisions_spent"),
        # SQLite: a number is never handed out twice, even once prune deleted the newest rows
        {"sqlite_autoincrement": True},
    )


class RewardRow(Base):
    __tablename__ = "rewards"

    id: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128))
    reward_id: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    cost_cents: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ux_rewards_event_reward", "event_id", "reward_id", unique=True),)


class FeedbackRow(Base):
    __tablename__ = "feedback"

    seq: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(128))
    channel: Mapped[str] = mapped_column(String(128))
    reward: Mapped[float] = mapped_column(Float)
    learn: Mapped[bool] = mapped_column(Boolean)
    # 'final', 'provisional' or 'correction' (see records.Feedback)
    kind: Mapped[str] = mapped_column(String(16), default="final", server_default="final")

    __table_args__ = (
        Index("ix_feedback_event", "event_id"),  # pruning finds a decision's events
        # SQLite: a number is never handed out twice (a checkpoint's position stays behind it)
        {"sqlite_autoincrement": True},
    )


class SnapshotRow(Base):
    __tablename__ = "snapshots"

    id: Mapped[int] = mapped_column(BigKey, primary_key=True, autoincrement=True)
    channel: Mapped[str] = mapped_column(String(128))
    policy_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    feedback_seq: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_snapshots_channel_id", "channel", "id"),)
