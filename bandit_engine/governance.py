"""Governance: roles, API keys (stored as hashes), change requests, approvals, audit log.

Governed settings — an offer's budget and caps, a channel's objective (default reward and
aggregation, i.e. the reward definition) and hold-out fraction — change only through a change
request that a *different* key approves. Nothing else (pacing included) ever changes them.

The tables live in the ledger database (Alembic revision ``0002``), so one URL holds everything.

>>> gov = Governance.in_memory()
>>> key, rec = gov.create_key("admin", name="ops")
>>> gov.authenticate(key).role, gov.authenticate("nope") is None
('admin', True)
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sqlalchemy import Connection, Engine, insert, select, update

from .catalog import is_text
from .clock import Clock, SystemClock
from .errors import (
    ChangeNotApproved,
    Forbidden,
    InvalidArgument,
    NotFound,
)
from .governance_models import ApiKeyRow, AuditRow, ChangeRow
from .ledger.sql import transaction

T = TypeVar("T")
Role = Literal["decide", "analyst", "admin", "approver"]
ROLES: tuple[str, ...] = ("admin", "analyst", "approver", "decide")
OFFER_GOVERNED: tuple[str, ...] = ("budget", "max_impressions", "member_cap")
# what a channel optimizes (the reward: how rewards add up, what an unanswered decision is
# worth, how long a redemption counts) and how its hold-out measures lift (its size, who is in it:
# the salt reshuffles the groups, what its members get)
CHANNEL_GOVERNED: tuple[str, ...] = (
    "aggregation", "default_reward", "reward_window_days", "holdout_fraction", "salt",
    "default_offer",
)
# "applying": claimed by an approver whose apply step has not finished (see Governance.decide)
CHANGE_KINDS: tuple[str, ...] = ("offer", "channel", "settings")
CHANGE_STATUSES: tuple[str, ...] = ("pending", "applying", "approved", "rejected", "withdrawn")
KEY_PREFIX = "bek_"
AUTH_CACHE_SECONDS = 1.0  # a revoked key stops working within this delay on every worker
# a change claimed for applying longer ago than this was abandoned (its decider died mid-apply);
# applying a change takes a few writes, so a minute is far beyond any live one
APPLY_TIMEOUT_MS = 60_000


class UnknownChange(NotFound):
    code = "unknown_change"
    status = 404


class UnknownKey(NotFound):
    code = "unknown_key"
    status = 404


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an API key's id, name and role (never the key itself)."""

    key_id: int
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"key:{self.key_id}:{self.name}"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    key_id: int
    name: str
    role: str
    prefix: str
    created_at: int
    revoked_at: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "name": self.name, "role": self.role,
                "prefix": self.prefix, "created_at": self.created_at,
                "revoked_at": self.revoked_at}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Change:
    change_id: int
    kind: str
    target: str
    settings: Mapping[str, Any]
    activate: bool
    status: str
    proposed_by: int
    decided_by: int | None
    reason: str | None
    created_at: int
    decided_at: int | None
    creates: bool = False  # the offer was created with this change's settings, and waits for it

    def to_dict(self) -> dict[str, Any]:
        return {
            "change_id": self.change_id, "kind": self.kind, "target": self.target,
            "settings": dict(self.settings), "activate": self.activate, "creates": self.creates,
            "status": self.status, "proposed_by": self.proposed_by, "decided_by": self.decided_by,
            "reason": self.reason, "created_at": self.created_at, "decided_at": self.decided_at,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class AuditEntry:
    audit_id: int
    at: int
    actor: str
    action: str
    target: str
    detail: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"audit_id": self.audit_id, "at": self.at, "actor": self.actor,
                "action": self.action, "target": self.target, "detail": dict(self.detail)}  # fmt: skip


def hash_key(key: str) -> str:
    """Keys are 256-bit random tokens, so an unsalted SHA-256 is enough to store them."""
    return hashlib.sha256(key.encode()).hexdigest()


def check_role(role: object) -> str:
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {list(ROLES)}, got {role!r}")
    return role  # type: ignore[return-value]


class Governance:
    """Keys, change requests and the audit log over a SQLAlchemy engine (the ledger's)."""

    def __init__(self, engine: Engine, *, clock: Clock | None = None) -> None:
        self._engine = engine
        self.clock: Clock = clock or SystemClock()
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._cache_lock = threading.Lock()

    @classmethod
    def in_memory(cls, *, clock: Clock | None = None) -> Governance:
        """A private in-memory SQLite store (for the ``memory://`` ledger and doctests)."""
        from .ledger.migrate import upgrade_schema
        from .ledger.sql import make_engine

        engine = make_engine("sqlite://")
        upgrade_schema(engine)
        return cls(engine, clock=clock)

    # plumbing --------------------------------------------------------------------------------
    def _tx(self, write: bool = False) -> AbstractContextManager[Connection]:
        return transaction(self._engine, write=write, what="governance")

    def _audit(self, c: Connection, actor: str, action: str, target: str, detail: Mapping[str, Any]) -> None:
        c.execute(insert(AuditRow).values(
            at=self.clock.now_ms(), actor=actor, action=action, target=target, detail=dict(detail)))  # fmt: skip

    def audit(self, actor: str, action: str, target: str, detail: Mapping[str, Any] | None = None) -> None:
        """Append one entry to the audit log."""
        with self._tx(write=True) as c:
            self._audit(c, actor, action, target, detail or {})

    # keys ------------------------------------------------------------------------------------
    def create_key(self, role: str, *, name: str = "", actor: str = "cli") -> tuple[str, KeyRecord]:
        """Create a key; returns ``(plaintext, record)``. Only the hash is stored."""
        check_role(role)
        if not isinstance(name, str) or len(name) > 128:
            raise InvalidArgument(f"key name must be a string of <= 128 characters, got {name!r}")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = self.clock.now_ms()
        with self._tx(write=True) as c:
            kid = c.execute(
                insert(ApiKeyRow).values(name=name or role, role=role, key_hash=hash_key(key),
                                         prefix=key[:10], created_at=now).returning(ApiKeyRow.id)
            ).scalar_one()  # fmt: skip
            self._audit(c, actor, "key.create", f"key:{kid}", {"role": role, "name": name or role})
        return key, KeyRecord(int(kid), name or role, role, key[:10], now, None)

    def list_keys(self) -> list[KeyRecord]:
        with self._tx() as c:
            rows = c.execute(select(ApiKeyRow).order_by(ApiKeyRow.id)).all()
        return [KeyRecord(r.id, r.name, r.role, r.prefix, r.created_at, r.revoked_at) for r in rows]

    def revoke_key(self, key_id: int, *, actor: str = "cli") -> list[int]:
        """Revoke a key, and withdraw the changes it proposed that are still pending: a key is
        revoked because its holder left or it leaked, and what it proposed should not go live
        on an approver's click afterwards (its holder can no longer withdraw it). Returns the
        ids of the withdrawn changes. A change already being applied is left to finish."""
        now = self.clock.now_ms()
        reason = f"withdrawn: the proposing key {key_id} was revoked"
        with self._tx(write=True) as c:
            n = c.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount  # fmt: skip
            if n == 0:
                raise UnknownKey(f"no active key with id {key_id}")
            self._audit(c, actor, "key.revoke", f"key:{key_id}", {})
            # in id order, as a decider locks them; a decider holding the lock has claimed its
            # change (no longer pending) by the time this update sees the row
            withdrawn = c.execute(
                select(ChangeRow.id, ChangeRow.kind, ChangeRow.target)
                .where(ChangeRow.proposed_by == key_id, ChangeRow.status == "pending")
                .order_by(ChangeRow.id).with_for_update()
            ).all()  # fmt: skip
            for cid, kind, target in withdrawn:
                c.execute(
                    update(ChangeRow).where(ChangeRow.id == cid, ChangeRow.status == "pending")
                    .values(status="withdrawn", decided_at=now, reason=reason)
                )  # fmt: skip
                self._audit(c, actor, "change.withdraw", f"{kind}:{target}",
                            {"change_id": int(cid), "reason": reason})  # fmt: skip
        with self._cache_lock:
            self._cache.clear()
        return [int(r[0]) for r in withdrawn]

    def authenticate(self, key: str | None) -> Principal | None:
        """The principal of an active key, or None. Cached for ``AUTH_CACHE_SECONDS``."""
        if not key or not key.startswith(KEY_PREFIX) or len(key) > 128:
            return None
        h = hash_key(key)
        now = time.monotonic()
        hit = self._cache.get(h)
        if hit is not None and now - hit[0] < AUTH_CACHE_SECONDS:
            return hit[1]
        with self._tx() as c:
            r = c.execute(
                select(ApiKeyRow.id, ApiKeyRow.name, ApiKeyRow.role)
                .where(ApiKeyRow.key_hash == h, ApiKeyRow.revoked_at.is_(None))
            ).first()  # fmt: skip
        p = None if r is None else Principal(int(r[0]), r[1], r[2])
        with self._cache_lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[h] = (now, p)
        return p

    # changes ---------------------------------------------------------------------------------
    def propose(
        self, kind: str, target: str, settings: Mapping[str, Any], proposer: Principal,
        *, activate: bool = False, creates: bool = False,
    ) -> Change:  # fmt: skip
        """Record a pending change. ``activate``: approving it also switches the offer on.
        ``creates``: the offer was just created with these (governed) settings held back; it
        cannot be switched on or off until this change is decided."""
        if kind not in CHANGE_KINDS:
            raise InvalidArgument(f"change kind must be one of {list(CHANGE_KINDS)}, got {kind!r}")
        now = self.clock.now_ms()
        with self._tx(write=True) as c:
            cid = c.execute(
                insert(ChangeRow).values(
                    kind=kind, target=target, settings=dict(settings), activate=activate,
                    creates=creates, status="pending", proposed_by=proposer.key_id, created_at=now,
                ).returning(ChangeRow.id)
            ).scalar_one()  # fmt: skip
            self._audit(c, proposer.actor, "change.propose", f"{kind}:{target}",
                        {"change_id": int(cid), "settings": dict(settings), "activate": activate,
                         "creates": creates})  # fmt: skip
        return self.get_change(int(cid))

    def get_change(self, change_id: int) -> Change:
        if isinstance(change_id, bool) or not isinstance(change_id, int) or not 0 < change_id < 2**63:
            raise UnknownChange(f"unknown change {str(change_id)[:40]}")  # no id of a 64-bit key
        with self._tx() as c:
            r = c.execute(select(ChangeRow).where(ChangeRow.id == change_id)).first()
        if r is None:
            raise UnknownChange(f"unknown change {change_id}")
        return _change(r)

    def changes(
        self, status: str | tuple[str, ...] | None = None, *, kind: str | None = None,
        target: str | None = None, after: int = 0, limit: int | None = None,
    ) -> list[Change]:  # fmt: skip
        """Change requests in id order: those with an id above ``after``, at most ``limit``
        (None: all; a caller pages with ``after`` = the last id it got); ``status``: one, or
        any of several."""
        q = select(ChangeRow).where(ChangeRow.id > after).order_by(ChangeRow.id)
        if isinstance(status, tuple):
            q = q.where(ChangeRow.status.in_(status))
        elif status is not None:
            q = q.where(ChangeRow.status == status)
        if kind is not None:
            q = q.where(ChangeRow.kind == kind)
        if target is not None:
            q = q.where(ChangeRow.target == target)
        if limit is not None:
            q = q.limit(limit)
        with self._tx() as c:
            return [_change(r) for r in c.execute(q)]

    def decide(
        self, change_id: int, decider: Principal, *, approve: bool,
        apply: Callable[[Change], Mapping[str, Any] | None] | None = None,
        reason: str | None = None,
    ) -> Change:  # fmt: skip
        """Approve (running ``apply``) or reject a pending change. The proposer can never decide
        its own change, and a change cannot be approved once a newer change to the same
        settings of the same target was (it would silently undo that newer decision; reject it,
        or propose again).

        A rejection is one transaction. An approval is claimed first (status ``applying``), in
        one transaction that locks every change of the same target, so two approvers racing
        cannot both apply it, and while one change is being applied no other change to the same
        settings of the same target can be approved (409, try again): otherwise an older change
        checked before a newer one was approved could be applied after it and undo it. If
        ``apply`` fails, the change goes back to where it was and the error propagates (nothing
        changed). Once applied, the approval and its audit entry are written, with what
        ``apply`` returned (the values it replaced). If that write fails, or the approving
        process dies between the two, the claim stays; after ``APPLY_TIMEOUT_MS`` it can be
        approved again (applying it twice sets the same values, and the approval is then
        recorded), but not rejected (its settings may be in force) unless newer approved
        changes have set every setting it sets since."""
        _check_reason(reason)
        ch = self.get_change(change_id)  # unknown change -> 404 before anything else
        now = self.clock.now_ms()
        with self._tx(write=True) as c:
            # on PostgreSQL the row locks serialize deciders of one target (in id order, so no
            # deadlock); SQLite's write transaction is exclusive already
            rows = [_change(r) for r in c.execute(
                select(ChangeRow).where(ChangeRow.kind == ch.kind, ChangeRow.target == ch.target)
                .order_by(ChangeRow.id).with_for_update()
            )]  # fmt: skip
            ch = next(r for r in rows if r.change_id == change_id)
            lapsed = _lapsed(ch, now)
            if not (ch.status == "pending" or lapsed):
                what = "being decided by someone else" if ch.status == "applying" else ch.status
                raise ChangeNotApproved(f"change {change_id} is {what}, not pending")
            superseded = set(ch.settings) <= {  # newer approved changes set all it sets
                k for r in rows if r.status == "approved" and r.change_id > change_id
                for k in r.settings
            }  # fmt: skip
            if lapsed and not approve and not superseded:
                raise ChangeNotApproved(
                    f"change {change_id} was being approved when its approver stopped, so its "
                    "settings may be in force: approve it to finish the approval (then propose "
                    "the old values to undo it)"
                )
            if ch.proposed_by == decider.key_id:
                raise Forbidden(f"change {change_id} was proposed by this key; another key must decide it")
            # a key's name says whose it is: one person's admin and approver keys are one pair
            # of eyes (an unnamed key is named after its role, so two unnamed keys differ)
            proposer, revoked_at = c.execute(
                select(ApiKeyRow.name, ApiKeyRow.revoked_at).where(ApiKeyRow.id == ch.proposed_by)
            ).one_or_none() or (None, None)
            if approve and revoked_at is not None and ch.status == "pending":
                raise ChangeNotApproved(  # revoked before revoking withdrew pending changes
                    f"change {change_id} was proposed by key {ch.proposed_by}, since revoked; "
                    "reject it, and propose it again with a live key if it is still wanted"
                )
            if proposer == decider.name:
                raise Forbidden(
                    f"change {change_id} was proposed by another key named {proposer!r}; "
                    "someone else must decide it"
                )
            if not approve:
                c.execute(
                    update(ChangeRow).where(ChangeRow.id == change_id).values(
                        status="rejected", decided_by=decider.key_id, decided_at=now, reason=reason,
                    )
                )  # fmt: skip
                self._audit(c, decider.actor, "change.reject", f"{ch.kind}:{ch.target}",
                            {"change_id": change_id, "reason": reason})  # fmt: skip
            else:
                for other in rows:
                    same = ", ".join(sorted(other.settings.keys() & ch.settings.keys()))
                    if other.change_id == change_id or not same:
                        continue
                    if other.status == "applying" and not _lapsed(other, now):
                        raise ChangeNotApproved(
                            f"change {other.change_id}, which also sets {same} of {ch.kind} "
                            f"{ch.target!r}, is being applied; try again in a moment"
                        )
                    if other.status == "approved" and other.change_id > change_id:
                        raise ChangeNotApproved(
                            f"change {change_id} is stale: the newer change {other.change_id} "
                            f"already set {same} of {ch.kind} {ch.target!r}; reject this one, or "
                            "propose the value again"
                        )
                c.execute(  # decided_at holds the claim's time until the approval is recorded
                    update(ChangeRow).where(ChangeRow.id == change_id)
                    .values(status="applying", decided_at=now)
                )  # fmt: skip
        if not approve:
            return self.get_change(change_id)
        before: Mapping[str, Any] | None = None
        try:
            if apply is not None:
                before = apply(ch)
        except BaseException:
            with self._tx(write=True) as c:  # as it was: pending, or a lapsed claim
                c.execute(update(ChangeRow).where(ChangeRow.id == change_id)
                          .values(status=ch.status, decided_at=ch.decided_at))  # fmt: skip
            raise
        with self._tx(write=True) as c:
            c.execute(
                update(ChangeRow).where(ChangeRow.id == change_id).values(
                    status="approved", decided_by=decider.key_id, decided_at=self.clock.now_ms(),
                    reason=reason,
                )
            )  # fmt: skip
            detail = {"change_id": change_id, "reason": reason, "settings": dict(ch.settings)}
            if before is not None:  # what the approval replaced, as ``apply`` read it
                detail["before"] = dict(before)
            self._audit(c, decider.actor, "change.approve", f"{ch.kind}:{ch.target}", detail)
        return self.get_change(change_id)

    def withdraw(self, change_id: int, proposer: Principal, *, reason: str | None = None) -> Change:
        """The key that proposed a pending change takes it back (status ``withdrawn``): setting
        the old value again would not (the change would still be there to approve), and only
        an approver may reject. Nothing is applied; a withdrawn creation change leaves its
        offer stored without its governed settings and switched off, as a rejection does."""
        _check_reason(reason)
        self.get_change(change_id)  # unknown change -> 404 before anything else
        with self._tx(write=True) as c:  # the row lock orders it with a decider of the change
            ch = _change(c.execute(
                select(ChangeRow).where(ChangeRow.id == change_id).with_for_update()
            ).one())  # fmt: skip
            if ch.proposed_by != proposer.key_id:
                raise Forbidden(
                    f"change {change_id} was proposed by another key; only its proposer can "
                    "withdraw it (an approver can reject it)"
                )
            if ch.status != "pending":
                what = "being approved" if ch.status == "applying" else ch.status
                raise ChangeNotApproved(f"change {change_id} is {what}, not pending")
            c.execute(
                update(ChangeRow).where(ChangeRow.id == change_id)
                .values(status="withdrawn", decided_at=self.clock.now_ms(), reason=reason)
            )  # fmt: skip
            self._audit(c, proposer.actor, "change.withdraw", f"{ch.kind}:{ch.target}",
                        {"change_id": change_id, "reason": reason})  # fmt: skip
        return self.get_change(change_id)

    def audit_log(self, *, after: int = 0, limit: int = 500) -> list[AuditEntry]:
        q = select(AuditRow).where(AuditRow.id > after).order_by(AuditRow.id).limit(limit)
        with self._tx() as c:
            return [AuditEntry(r.id, r.at, r.actor, r.action, r.target, r.detail) for r in c.execute(q)]


def _check_reason(reason: object) -> None:
    if reason is not None and (
        not isinstance(reason, str) or len(reason) > 1000 or "\x00" in reason
        or not is_text(reason)
    ):  # fmt: skip
        raise InvalidArgument(
            "reason must be text of at most 1000 characters, without NUL characters"
        )


def _lapsed(ch: Change, now_ms: int) -> bool:
    """A claim (``applying``) older than ``APPLY_TIMEOUT_MS``: its decider died while applying."""
    return ch.status == "applying" and (ch.decided_at or 0) < now_ms - APPLY_TIMEOUT_MS


def _change(r: Any) -> Change:
    return Change(int(r.id), r.kind, r.target, dict(r.settings), bool(r.activate), r.status,
                  int(r.proposed_by), None if r.decided_by is None else int(r.decided_by),
                  r.reason, int(r.created_at), r.decided_at, bool(r.creates))  # fmt: skip


__all__ = [
    "APPLY_TIMEOUT_MS", "CHANGE_KINDS", "CHANGE_STATUSES", "CHANNEL_GOVERNED", "OFFER_GOVERNED",
    "ROLES", "AuditEntry", "Change", "Governance", "KeyRecord", "Principal", "UnknownChange",
    "UnknownKey", "check_role", "hash_key",
]  # fmt: skip
