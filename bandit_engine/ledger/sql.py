"""The SQL ledger: SQLite (WAL, embedded default) and PostgreSQL (psycopg 3), one code path.

Caps are enforced by the database: a guarded ``UPDATE ... WHERE spent + committed + :cost <=
budget AND impressions < cap RETURNING`` inside the same transaction as the decision insert.
Member frequency caps first lock the member's row (``UPDATE members``), then count that
member's exposures, so two racing requests for one member cannot both pass. On SQLite every
write transaction starts with ``BEGIN IMMEDIATE`` (the write lock), on PostgreSQL row locks do
the same job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from ..catalog import ChannelConfig, MemberCap, Offer
from ..errors import CapExceeded, StorageError, UnknownEvent
from .models import (
    CatalogVersionRow,
    ChannelRow,
    DecisionRow,
    FeedbackRow,
    MemberRow,
    OfferRow,
    RewardRow,
    SnapshotRow,
)
from .records import Decision, Feedback, HistoryItem, OfferState, RewardOutcome, Snapshot
from .settle import OfferDelta, settle_expiry, settle_reward

T = TypeVar("T")

# Hot-path statements, built once: SQLAlchemy then only binds parameters (building a statement
# per call cost more than the database round trip on SQLite).
_O = OfferRow.__table__.c
_D = DecisionRow.__table__.c
_R = RewardRow.__table__.c
_F = FeedbackRow.__table__.c
_M = MemberRow.__table__.c
_STATES = select(_O.offer_id, _O.spent_cents, _O.committed_cents, _O.impressions, _O.settled_cents)
_STATES_IN = _STATES.where(_O.offer_id.in_(bindparam("ids", expanding=True)))
_HISTORY = (
    select(_D.offer_id, _D.channel, _D.issued_at, _D.reward, _D.status)
    .where(_D.member_id == bindparam("member"), _D.issued_at >= bindparam("since"),
           _D.offer_id.is_not(None))
    .order_by(_D.seq)
)  # fmt: skip
_DECISION = select(DecisionRow.__table__).where(_D.event_id == bindparam("eid"))
_DECISION_LOCK = _DECISION.with_for_update()
_INSERT_DECISION = insert(DecisionRow.__table__).returning(_D.seq)
_RESERVE = (
    update(OfferRow.__table__)
    .where(_O.offer_id == bindparam("oid"))
    .where(_O.budget_cents.is_(None) | (_O.spent_cents + _O.committed_cents + bindparam("cost") <= _O.budget_cents))
    .where(_O.max_impressions.is_(None) | (_O.impressions < _O.max_impressions))
    .values(committed_cents=_O.committed_cents + bindparam("cost"), impressions=_O.impressions + 1)
    .returning(_O.offer_id)
)
_APPLY = (
    update(OfferRow.__table__)
    .where(_O.offer_id == bindparam("oid"))
    .values(
        spent_cents=_O.spent_cents + bindparam("d_spent"),
        committed_cents=_O.committed_cents + bindparam("d_committed"),
        settled_cents=_O.settled_cents + bindparam("d_settled"),
    )
)
_SETTLE_DECISION = (
    update(DecisionRow.__table__)
    .where(_D.seq == bindparam("b_seq"))
    .values(
        status=bindparam("b_status"), reward=bindparam("b_reward"),
        reward_count=bindparam("b_reward_count"), spent_cents=bindparam("b_spent"),
        reserved_cents=bindparam("b_reserved"), active=bindparam("b_active"),
    )
)  # fmt: skip
_REWARD_SEEN = select(_R.id).where(_R.event_id == bindparam("eid"), _R.reward_id == bindparam("rid"))
_INSERT_REWARD = insert(RewardRow.__table__)
_INSERT_FEEDBACK = insert(FeedbackRow.__table__).returning(_F.seq)
_TOUCH_MEMBER = update(MemberRow.__table__).where(_M.member_id == bindparam("member")).values(
    touches=_M.touches + 1
)
_COUNT_EXPOSURES = select(func.count()).where(
    _D.member_id == bindparam("member"), _D.issued_at > bindparam("since"), _D.offer_id.is_not(None)
)
_COUNT_OFFER_EXPOSURES = _COUNT_EXPOSURES.where(_D.offer_id == bindparam("oid"))


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine configured for the ledger (SQLite pragmas, explicit BEGINs)."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
        if url in ("sqlite://", "sqlite:///:memory:"):
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("ledger_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


@contextmanager
def transaction(engine: Engine, *, write: bool = False, what: str = "ledger") -> Iterator[Connection]:
    """One transaction; ``write=True`` takes SQLite's write lock up front (``BEGIN IMMEDIATE``).

    Database failures become :class:`StorageError` (503); integrity errors pass through for
    the caller to interpret (a duplicate event id, say)."""
    try:
        with engine.connect() as conn:
            if write:
                conn = conn.execution_options(ledger_write=True)
            with conn.begin():
                yield conn
    except IntegrityError:
        raise
    except (OperationalError, DBAPIError) as exc:
        raise StorageError(f"{what} database error: {exc.__class__.__name__}: {exc.orig}") from exc


def _insert_ignore(dialect: str, table: Any) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


class SqlLedger:
    def __init__(self, url: str, *, upgrade: bool = True) -> None:
        self.url = url
        self._engine = make_engine(url)
        self._dialect = self._engine.dialect.name
        if upgrade:
            from .migrate import upgrade_schema

            self._guard(lambda: upgrade_schema(self._engine))

    # plumbing --------------------------------------------------------------------------------
    def _guard(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            if isinstance(exc, IntegrityError):
                raise
            raise StorageError(f"ledger database error: {exc.__class__.__name__}: {exc.orig}") from exc

    def _tx(self, write: bool = False) -> AbstractContextManager[Connection]:
        return transaction(self._engine, write=write)

    def _bump_catalog(self, c: Connection) -> None:
        n = c.execute(
            update(CatalogVersionRow).where(CatalogVersionRow.id == 1)
            .values(version=CatalogVersionRow.version + 1)
        ).rowcount  # fmt: skip
        if n == 0:
            c.execute(_insert_ignore(self._dialect, CatalogVersionRow).values(id=1, version=1))

    # catalog ---------------------------------------------------------------------------------
    def put_offer(self, offer: Offer) -> None:
        spec = offer.to_dict()
        with self._tx(write=True) as c:
            n = c.execute(
                update(OfferRow).where(OfferRow.offer_id == offer.offer_id).values(
                    spec=spec, budget_cents=offer.budget_cents,
                    max_impressions=offer.max_impressions,
                )
            ).rowcount  # fmt: skip
            if n == 0:
                c.execute(
                    insert(OfferRow).values(
                        offer_id=offer.offer_id, spec=spec, budget_cents=offer.budget_cents,
                        max_impressions=offer.max_impressions, spent_cents=0,
                        committed_cents=0, impressions=0, settled_cents=0,
                    )
                )  # fmt: skip
            self._bump_catalog(c)

    def offers(self) -> list[Offer]:
        with self._tx() as c:
            rows = c.execute(select(OfferRow.spec).order_by(OfferRow.offer_id)).scalars().all()
        return [Offer.from_dict(r) for r in rows]

    def put_channel(self, channel: ChannelConfig) -> None:
        spec = channel.to_dict()
        with self._tx(write=True) as c:
            n = c.execute(
                update(ChannelRow).where(ChannelRow.name == channel.name).values(spec=spec)
            ).rowcount
            if n == 0:
                c.execute(insert(ChannelRow).values(name=channel.name, spec=spec))
            self._bump_catalog(c)

    def channels(self) -> dict[str, ChannelConfig]:
        with self._tx() as c:
            rows = c.execute(select(ChannelRow.spec).order_by(ChannelRow.name)).scalars().all()
        return {r["name"]: ChannelConfig.from_dict(r) for r in rows}

    def catalog_version(self) -> int:
        with self._tx() as c:
            v = c.execute(select(CatalogVersionRow.version).where(CatalogVersionRow.id == 1)).scalar()
        return int(v or 0)

    # state -----------------------------------------------------------------------------------
    def offer_states(self, offer_ids: Iterable[str] | None = None) -> dict[str, OfferState]:
        with self._tx() as c:
            return self._states(c, offer_ids)

    def _states(self, c: Connection, offer_ids: Iterable[str] | None) -> dict[str, OfferState]:
        if offer_ids is None:
            rows = c.execute(_STATES)
        else:
            ids = list(offer_ids)
            if not ids:
                return {}
            rows = c.execute(_STATES_IN, {"ids": ids})
        return {r[0]: OfferState(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}

    def member_history(self, member_id: str, since_ms: int) -> list[HistoryItem]:
        with self._tx() as c:
            return self._history(c, member_id, since_ms)

    def _history(self, c: Connection, member_id: str, since_ms: int) -> list[HistoryItem]:
        rows = c.execute(_HISTORY, {"member": member_id, "since": since_ms})
        return [HistoryItem(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows]

    def read_state(
        self, member_id: str, since_ms: int, offer_ids: Iterable[str]
    ) -> tuple[list[HistoryItem], dict[str, OfferState]]:
        with self._tx() as c:
            return self._history(c, member_id, since_ms), self._states(c, offer_ids)

    def get_decision(self, event_id: str) -> Decision | None:
        with self._tx() as c:
            row = c.execute(_DECISION, {"eid": event_id}).first()
        return None if row is None else _decision(row)

    def count_decisions(self) -> int:
        with self._tx() as c:
            return int(c.execute(select(func.count()).select_from(DecisionRow)).scalar() or 0)

    # writes ----------------------------------------------------------------------------------
    def log_decision(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> Decision:
        try:
            with self._tx(write=True) as c:
                if offer is not None:
                    if member_caps:
                        self._check_member_caps(c, decision, member_caps)
                    self._reserve(c, offer, decision.reserved_cents)
                seq = c.execute(_INSERT_DECISION, _row_values(decision)).scalar_one()
        except IntegrityError:
            existing = self.get_decision(decision.event_id)
            if existing is None:
                raise
            return existing  # a concurrent request logged this event id first
        return decision.with_(seq=int(seq))

    def _check_member_caps(
        self, c: Connection, d: Decision, caps: Mapping[str, MemberCap]
    ) -> None:
        c.execute(_insert_ignore(self._dialect, MemberRow).values(member_id=d.member_id, touches=0))
        c.execute(_TOUCH_MEMBER, {"member": d.member_id})  # the per-member lock
        for key, cap in caps.items():
            params = {"member": d.member_id, "since": d.issued_at - cap.window_ms}
            if key == "*":
                n = c.execute(_COUNT_EXPOSURES, params).scalar()
            else:
                n = c.execute(_COUNT_OFFER_EXPOSURES, {**params, "oid": key}).scalar()
            if int(n or 0) >= cap.max:
                scope = "all offers" if key == "*" else repr(key)
                raise CapExceeded(
                    f"member frequency cap on {scope} reached ({cap.max} per {cap.window_days} days)",
                    d.offer_id if key != "*" else None,
                    "member" if key != "*" else "member_all",
                )

    def _reserve(self, c: Connection, offer: Offer, cost: int) -> None:
        if c.execute(_RESERVE, {"oid": offer.offer_id, "cost": cost}).first() is not None:
            return
        st = self._states(c, [offer.offer_id]).get(offer.offer_id)
        row = c.execute(select(_O.max_impressions).where(_O.offer_id == offer.offer_id)).first()
        if st is not None and row is not None and row[0] is not None and st.impressions >= row[0]:
            raise CapExceeded(f"impression cap of {offer.offer_id!r} reached", offer.offer_id, "impressions")
        raise CapExceeded(f"budget of {offer.offer_id!r} exhausted", offer.offer_id, "budget")

    def record_reward(
        self,
        event_id: str,
        value: float,
        cost_cents: int | None,
        now_ms: int,
        *,
        reward_id: str | None = None,
        aggregation: str | Mapping[str, str] = "first",
    ) -> RewardOutcome:
        rid = reward_id or event_id
        with self._tx(write=True) as c:
            row = c.execute(_DECISION_LOCK, {"eid": event_id}).first()
            if row is None:
                raise UnknownEvent(f"unknown event {event_id!r}")
            d = _decision(row)
            agg = aggregation if isinstance(aggregation, str) else aggregation.get(d.channel, "first")
            seen = c.execute(_REWARD_SEEN, {"eid": event_id, "rid": rid}).first()
            if seen is not None or (agg == "first" and d.reward_count):
                return RewardOutcome(event_id, "duplicate", d.reward, d.spent_cents, None, d)
            new, delta, fb_reward = settle_reward(d, value, cost_cents, now_ms, agg)
            c.execute(_INSERT_REWARD, {"event_id": event_id, "reward_id": rid, "value": value,
                                       "cost_cents": delta.spent, "at": now_ms})  # fmt: skip
            self._update_decision(c, new)
            self._apply(c, new.offer_id, delta)
            fb = self._emit(c, new, fb_reward) if fb_reward is not None else None
        return RewardOutcome(event_id, "recorded", new.reward, new.spent_cents, fb, new)

    def _apply(self, c: Connection, offer_id: str | None, delta: OfferDelta) -> None:
        if offer_id is None or delta == OfferDelta():
            return
        c.execute(_APPLY, {"oid": offer_id, "d_spent": delta.spent,
                           "d_committed": delta.committed, "d_settled": delta.settled})  # fmt: skip

    def _update_decision(self, c: Connection, d: Decision) -> None:
        c.execute(_SETTLE_DECISION, {
            "b_seq": d.seq, "b_status": d.status, "b_reward": d.reward,
            "b_reward_count": d.reward_count, "b_spent": d.spent_cents,
            "b_reserved": d.reserved_cents, "b_active": d.active,
        })  # fmt: skip

    def _emit(self, c: Connection, d: Decision, reward: float) -> Feedback:
        learn = d.learnable and d.active
        seq = c.execute(_INSERT_FEEDBACK, {"event_id": d.event_id, "channel": d.channel,
                                           "reward": reward, "learn": learn}).scalar_one()  # fmt: skip
        return Feedback(int(seq), d.event_id, d.channel, reward, learn)

    def activate(self, event_id: str, now_ms: int) -> Decision:
        from ..errors import RewardWindowClosed

        with self._tx(write=True) as c:
            row = c.execute(_DECISION_LOCK, {"eid": event_id}).first()
            if row is None:
                raise UnknownEvent(f"unknown event {event_id!r}")
            d = _decision(row)
            if d.status in ("closed", "expired") or now_ms > d.deadline:
                raise RewardWindowClosed(f"event {event_id!r} is already settled")
            if not d.active:
                d = d.with_(active=True)
                self._update_decision(c, d)
        return d

    def expire(self, now_ms: int, default_rewards: Mapping[str, float]) -> list[Feedback]:
        out: list[Feedback] = []
        while True:
            with self._tx(write=True) as c:
                q = (
                    select(DecisionRow)
                    .where(DecisionRow.status == "open", DecisionRow.deadline < now_ms)
                    .order_by(DecisionRow.seq)
                    .limit(500)
                    .with_for_update()
                )
                rows = c.execute(q).all()
                for row in rows:
                    d = _decision(row)
                    new, delta, fb_reward = settle_expiry(d, default_rewards.get(d.channel, 0.0))
                    self._update_decision(c, new)
                    self._apply(c, new.offer_id, delta)
                    if fb_reward is not None:
                        out.append(self._emit(c, new, fb_reward))
            if len(rows) < 500:
                return out

    # log -------------------------------------------------------------------------------------
    def feedback_after(self, seq: int, limit: int = 10_000) -> list[Feedback]:
        q = select(FeedbackRow).where(FeedbackRow.seq > seq).order_by(FeedbackRow.seq).limit(limit)
        with self._tx() as c:
            return [
                Feedback(int(r.seq), r.event_id, r.channel, float(r.reward), bool(r.learn))
                for r in c.execute(q)
            ]

    def last_feedback_seq(self) -> int:
        with self._tx() as c:
            return int(c.execute(select(func.max(FeedbackRow.seq))).scalar() or 0)

    def decisions(
        self, *, channel: str | None = None, after_seq: int = 0, limit: int | None = None
    ) -> Iterator[Decision]:
        last, n = after_seq, 0
        while True:
            page = 1000 if limit is None else min(1000, limit - n)
            if page <= 0:
                return
            q = select(DecisionRow).where(DecisionRow.seq > last)
            if channel is not None:
                q = q.where(DecisionRow.channel == channel)
            with self._tx() as c:
                rows = c.execute(q.order_by(DecisionRow.seq).limit(page)).all()
            for row in rows:
                yield _decision(row)
            n += len(rows)
            if len(rows) < page:
                return
            last = int(rows[-1].seq)

    def decisions_by_event(self, event_ids: Iterable[str]) -> dict[str, Decision]:
        ids = list(event_ids)
        out: dict[str, Decision] = {}
        with self._tx() as c:
            for i in range(0, len(ids), 500):
                q = select(DecisionRow).where(DecisionRow.event_id.in_(ids[i : i + 500]))
                out.update({r.event_id: _decision(r) for r in c.execute(q)})
        return out

    # snapshots -------------------------------------------------------------------------------
    def save_snapshot(self, snapshot: Snapshot, *, keep: int = 3) -> None:
        """Store a checkpoint and prune all but the ``keep`` newest of its channel (a lin_ts
        snapshot of 50 offers is ~1.6 MB; the log, not the snapshots, is the source of truth)."""
        sr = SnapshotRow.__table__.c
        with self._tx(write=True) as c:
            c.execute(insert(SnapshotRow).values(
                channel=snapshot.channel, policy_name=snapshot.policy_name,
                version=snapshot.version, feedback_seq=snapshot.feedback_seq,
                data=snapshot.data, created_at=snapshot.created_at,
            ))  # fmt: skip
            stale = c.execute(
                select(sr.id).where(sr.channel == snapshot.channel)
                .order_by(sr.id.desc()).offset(keep)
            ).scalars().all()  # fmt: skip
            if stale:
                c.execute(delete(SnapshotRow).where(sr.id.in_(stale)))

    def latest_snapshot(self, channel: str) -> Snapshot | None:
        q = (
            select(SnapshotRow).where(SnapshotRow.channel == channel)
            .order_by(SnapshotRow.id.desc()).limit(1)
        )  # fmt: skip
        with self._tx() as c:
            r = c.execute(q).first()
        if r is None:
            return None
        return Snapshot(r.channel, r.policy_name, int(r.version), int(r.feedback_seq),
                        bytes(r.data), int(r.created_at))  # fmt: skip

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        self._engine.dispose()


def _row_values(d: Decision) -> dict[str, Any]:
    return {
        "event_id": d.event_id, "member_id": d.member_id, "channel": d.channel,
        "grp": d.group, "offer_id": d.offer_id, "probability": d.probability,
        "policy_name": d.policy_name, "policy_version": d.policy_version,
        "issued_at": d.issued_at, "deadline": d.deadline,
        "payload": {
            "eligible": list(d.eligible), "pmf": list(d.pmf), "context": dict(d.context),
            "offer_context": {k: dict(v) for k, v in d.offer_context.items()}, "reason": d.reason,
        },
        "reserved_cents": d.reserved_cents, "spent_cents": d.spent_cents, "active": d.active,
        "learnable": d.learnable, "status": d.status, "reward": d.reward,
        "reward_count": d.reward_count,
    }  # fmt: skip


def _decision(r: Any) -> Decision:
    p = r.payload
    return Decision(
        event_id=r.event_id, member_id=r.member_id, channel=r.channel, group=r.grp,
        offer_id=r.offer_id, probability=r.probability, policy_name=r.policy_name,
        policy_version=int(r.policy_version), issued_at=int(r.issued_at), deadline=int(r.deadline),
        eligible=tuple(p["eligible"]), pmf=tuple(p["pmf"]), context=p["context"],
        offer_context=p["offer_context"], reason=p["reason"],
        reserved_cents=int(r.reserved_cents), active=bool(r.active), learnable=bool(r.learnable),
        status=r.status, reward=r.reward, reward_count=int(r.reward_count),
        spent_cents=int(r.spent_cents), seq=int(r.seq),
    )  # fmt: skip
