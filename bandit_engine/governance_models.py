"""Typed SQLAlchemy rows of :mod:`bandit_engine.governance` (API keys, changes, audit log).

They share :class:`bandit_engine.ledger.models.Base`, so one Alembic history (revision
``0002_governance``) creates them next to the ledger tables. Rows never leave
:mod:`bandit_engine.governance`; callers get frozen records.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, CheckConstraint, Index, Integer, String, false
from sqlalchemy.orm import Mapped, mapped_column

from .ledger.models import Base

_ID = BigInteger().with_variant(Integer, "sqlite")


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger)


class ChangeRow(Base):
    __tablename__ = "changes"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))  # offer | channel
    target: Mapped[str] = mapped_column(String(128))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)
    activate: Mapped[bool] = mapped_column(default=False, server_default=false())
    creates: Mapped[bool] = mapped_column(default=False, server_default=false())  # its offer
    status: Mapped[str] = mapped_column(String(16))  # governance.CHANGE_STATUSES
    proposed_by: Mapped[int] = mapped_column(BigInteger)
    decided_by: Mapped[int | None] = mapped_column(BigInteger)
    reason: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[int] = mapped_column(BigInteger)
    decided_at: Mapped[int | None] = mapped_column(BigInteger)

    __table_args__ = (
        Index("ix_changes_status", "status", "id"),
        CheckConstraint(
            "decided_by IS NULL OR decided_by <> proposed_by", name="ck_changes_four_eyes"
        ),
    )


class AuditRow(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    at: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(160))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)
