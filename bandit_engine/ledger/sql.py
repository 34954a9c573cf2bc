"""The SQL ledger: SQLite (WAL, embedded default) and PostgreSQL (psycopg 3), one code path.

Caps are enforced by the database: a guarded ``UPDATE ... WHERE spent + committed + :cost <=
budget AND impressions < cap RETURNING`` inside the same transaction as the decision insert.
Member frequency caps first lock the member's row (``UPDATE members``), then count that
member's exposures, so two racing requests for one member cannot both pass. On SQLite every
write transaction starts with ``BEGIN IMMEDIATE`` (the write lock), on PostgreSQL row locks do
the same job.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.pool import StaticPool

from ..catalog import ChannelConfig, MemberCap, Offer
from ..errors import CatalogChanged, Conflict, InvalidArgument, StorageError
from .hot import (
    DECISION_COLUMNS,
    DuplicateEvent,
    HotPath,
    connection_lock,
    decision_from_row,
    feedback_from_row,
)
from .models import (
    CatalogVersionRow,
    ChannelRow,
    DecisionRow,
    FeedbackRow,
    OfferRow,
    RewardRow,
    SettingRow,
    SnapshotRow,
)
from .records import (
    Decision,
    Feedback,
    HistoryItem,
    OfferState,
    Pruned,
    Reward,
    RewardOutcome,
    Snapshot,
)

T = TypeVar("T")
_DECISION_COLS = [DecisionRow.__table__.c[name] for name in DECISION_COLUMNS]

def sqlite_file(url: str) -> Path | None:
    """The database file a ``sqlite`` URL names; None for another backend, an in-memory
    database, a ``file:`` URI, or text that is not a URL.

    >>> sqlite_file("sqlite:////data/bandit.db"), sqlite_file("sqlite://"), sqlite_file("postgresql://h/db")
    (PosixPath('/data/bandit.db'), None, None)
    """
    if not url.startswith("sqlite"):
        return None
    try:
        db = make_url(url).database
    except ArgumentError:
        return None
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


# libpq connection parameters for every PostgreSQL connection: give up connecting after 5 s;
# close a connection whose sent data has gone unacknowledged for 20 s (a partition: the request
# gets a 503, not a hang); probe idle ones after 30 s (a dead peer found within ~1 min)
PG_CONNECT_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5, "tcp_user_timeout": 20_000,
    "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
}  # fmt: skip


def _wal(cur: Any, wait_s: float = 30.0) -> None:
    """Put the database in WAL mode (it stays so: a no-op once it is). Switching needs the
    database to itself, and SQLite answers "database is locked" at once, without its busy
    wait, when processes opening a new database together race to switch it: retried here."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if cur.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_engine(url: str, *, autocheckpoint: bool = True) -> Engine:
    """A SQLAlchemy engine configured for the ledger (SQLite pragmas, explicit BEGINs).

    ``autocheckpoint=False`` (SQLite): commits never checkpoint the WAL themselves; a
    :class:`WalCheckpointer` must run beside them."""
    if not url.startswith(("sqlite:", "postgresql:", "postgresql+psycopg:")):
        raise InvalidArgument(
            f"unsupported database URL {url[:200]!r}: give sqlite:///file.db or postgresql+psycopg://user@host/db"
        )
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {"connect_args": {"timeout": 30, "check_same_thread": False}}
        if url in ("sqlite://", "sqlite:///:memory:"):
            # an in-memory database is one connection: every thread shares it (see connection_lock)
            kwargs["poolclass"] = StaticPool
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
            cur = dbapi_conn.cursor()
            _wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            if not autocheckpoint:
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            write = conn.get_execution_options().get("ledger_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    # The request path's statements never check a connection out (each thread owns one, see
    # .hot: a dead one is invalidated and the operation retried once). What does check out
    # (catalog and settings reloads, governance, keys: ~0.03 checkouts per served choose+reward
    # with a background sync) pre-pings, so a connection the server dropped (a restart, a
    # failover, an idle timeout) is replaced instead of failing a request with a 503.
    # libpq's defaults wait for ever: a database host that went silent (a partition, a dead
    # host) hung every request until gunicorn killed the worker, and each replacement hung in
    # its first connect. A parameter given in the URL's query string takes precedence.
    given = set(make_url(url).query)
    connect_args = {k: v for k, v in PG_CONNECT_DEFAULTS.items() if k not in given}
    return create_engine(url, pool_size=5, max_overflow=10, pool_recycle=1800, pool_pre_ping=True,
                         connect_args=connect_args)  # fmt: skip


@contextmanager
def transaction(engine: Engine, *, write: bool = False, what: str = "ledger") -> Iterator[Connection]:
    """One transaction; ``write=True`` takes SQLite's write lock up front (``BEGIN IMMEDIATE``).

    Database failures become :class:`StorageError` (503); integrity errors pass through for
    the caller to interpret (a duplicate event id, say)."""
    try:
        with connection_lock(engine), engine.connect() as conn:
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


class WalCheckpointer:
    """Checkpoints a SQLite WAL from a background thread, off the request path.

    By default SQLite checkpoints inside the commit that grows the WAL past 1 000 pages: every
    ~75 choose+reward pairs one request paid 10-30 ms for it (the copy back and two fsyncs),
    the whole p99. Here a thread does it on its own connection every ``interval`` seconds: a
    PASSIVE checkpoint copies what it can without blocking anyone; once the WAL file is past
    ``restart_bytes`` (new frames kept arriving), a RESTART checkpoint briefly holds writers
    back (they queue; readers go on) so the next writer starts the log from its beginning."""

    def __init__(self, path: str, interval: float = 0.5, restart_bytes: int = 16 << 20) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(path, interval, restart_bytes), name="bandit-engine-wal-checkpoint",
            daemon=True,
        )  # fmt: skip
        self._thread.start()

    def _run(self, path: str, interval: float, restart_bytes: int) -> None:
        conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
        wal = f"{path}-wal"
        ready = False
        try:
            while not self._stop.wait(interval):
                with contextlib.suppress(sqlite3.Error, OSError):  # busy: the next round catches up
                    if not ready:  # else this connection sees no WAL to checkpoint
                        conn.execute("PRAGMA journal_mode=WAL")
                        conn.execute("PRAGMA synchronous=NORMAL")
                        ready = True
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    if os.path.getsize(wal) > restart_bytes:
                        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class SqlLedger:
    """The ledger on SQLite or PostgreSQL. Opening it creates or upgrades the schema; with
    ``upgrade=False`` (the commands that read or maintain a ledger without setting it up) the
    schema must already be this version's newest and is never migrated: a newer checkout's
    ``evaluate`` must not migrate a ledger under the older servers that use it.
    ``background_checkpoints=True`` (servers) moves SQLite's WAL checkpoints to a
    :class:`WalCheckpointer` thread."""

    def __init__(self, url: str, *, upgrade: bool = True, background_checkpoints: bool = False) -> None:
        self.url = url
        self._engine = make_engine(url, autocheckpoint=not background_checkpoints)
        self._dialect = self._engine.dialect.name
        # PostgreSQL numbers feedback before commit, so a higher seq can commit first; SQLite's
        # writers take turns (the Engine reads a log that can through GapSafeLedger)
        self.commits_out_of_seq_order = self._dialect == "postgresql"
        self._hot = HotPath(self._engine)
        self._catalog_seen: int | None = None  # the catalog version this ledger last read
        from .migrate import require_head, upgrade_schema

        self._guard(lambda: (upgrade_schema if upgrade else require_head)(self._engine))
        database = self._engine.url.database
        self._checkpointer = (
            WalCheckpointer(database)
            if background_checkpoints and self._dialect == "sqlite" and database and database != ":memory:"
            else None
        )

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

    def _bump_catalog(self, c: Connection, expect: int | None = None) -> None:
        """Move the catalog version on; with ``expect``, only from that version, or raise
        :class:`CatalogChanged` (so the transaction writes nothing). Done first in a catalog
        write: on PostgreSQL the row lock then queues concurrent catalog writers, and one that
        queued re-reads the version the first one committed."""
        if expect is None:
            n = c.execute(
                update(CatalogVersionRow).where(CatalogVersionRow.id == 1)
                .values(version=CatalogVersionRow.version + 1)
            ).rowcount  # fmt: skip
            if n == 0:
                c.execute(_insert_ignore(self._dialect, CatalogVersionRow).values(id=1, version=1))
            return
        if expect == 0:  # no catalog write yet: the row does not exist
            first = _insert_ignore(self._dialect, CatalogVersionRow).values(id=1, version=1)
            n = c.execute(first).rowcount
        else:
            n = c.execute(
                update(CatalogVersionRow)
                .where(CatalogVersionRow.id == 1, CatalogVersionRow.version == expect)
                .values(version=CatalogVersionRow.version + 1)
            ).rowcount  # fmt: skip
        if n != 1:
            raise CatalogChanged(f"the catalog changed since version {expect} was read")

    # catalog ---------------------------------------------------------------------------------
    def put_offer(self, offer: Offer, *, expect_version: int | None = None) -> None:
        spec = offer.to_dict()
        with self._tx(write=True) as c:
            self._bump_catalog(c, expect_version)
            # the caps hold against what concurrent chooses reserved: checked in the update
            fits = [OfferRow.offer_id == offer.offer_id]
            if offer.budget_cents is not None:
                fits.append(OfferRow.spent_cents + OfferRow.committed_cents <= offer.budget_cents)
            if offer.max_impressions is not None:
                fits.append(OfferRow.impressions <= offer.max_impressions)
            n = c.execute(
                update(OfferRow).where(*fits).values(
                    spec=spec, budget_cents=offer.budget_cents,
                    max_impressions=offer.max_impressions,
                )
            ).rowcount  # fmt: skip
            if n == 0:
                exists = c.execute(
                    select(OfferRow.offer_id).where(OfferRow.offer_id == offer.offer_id)
                ).first()  # fmt: skip
                if exists is not None:
                    raise Conflict(
                        f"offer {offer.offer_id!r}: its budget or impression cap would be below "
                        "what is already spent and committed, or shown"
                    )
                c.execute(
                    insert(OfferRow).values(
                        offer_id=offer.offer_id, spec=spec, budget_cents=offer.budget_cents,
                        max_impressions=offer.max_impressions, spent_cents=0,
                        committed_cents=0, impressions=0, settled_cents=0,
                    )
                )  # fmt: skip

    def offers(self) -> list[Offer]:
        with self._tx() as c:
            rows = c.execute(select(OfferRow.spec).order_by(OfferRow.offer_id)).scalars().all()
        return [Offer.from_dict(r) for r in rows]

    def put_channels(
        self, channels: Iterable[ChannelConfig], *, expect_version: int | None = None
    ) -> None:
        with self._tx(write=True) as c:
            self._bump_catalog(c, expect_version)
            for channel in channels:  # the row first: two servers seeding at once is not an error
                spec = channel.to_dict()
                c.execute(_insert_ignore(self._dialect, ChannelRow).values(name=channel.name, spec=spec))
                c.execute(update(ChannelRow).where(ChannelRow.name == channel.name).values(spec=spec))

    def channels(self) -> dict[str, ChannelConfig]:
        with self._tx() as c:
            rows = c.execute(select(ChannelRow.spec).order_by(ChannelRow.name)).scalars().all()
        return {r["name"]: ChannelConfig.from_dict(r) for r in rows}

    def put_setting(self, name: str, value: Any, *, expect_version: int | None = None) -> None:
        with self._tx(write=True) as c:  # the row first (a racing first write is not an error)
            self._bump_catalog(c, expect_version)
            c.execute(_insert_ignore(self._dialect, SettingRow).values(name=name, value=None))
            c.execute(update(SettingRow).where(SettingRow.name == name).values(value=value))

    def settings(self) -> dict[str, Any]:
        with self._tx() as c:
            return {r[0]: r[1] for r in c.execute(select(SettingRow.name, SettingRow.value))}

    def catalog_version(self) -> int:
        with self._tx() as c:
            v = c.execute(select(CatalogVersionRow.version).where(CatalogVersionRow.id == 1)).scalar()
        version = int(v or 0)
        if version != self._catalog_seen:  # the catalog may have grown: plan offers reads again
            if self._catalog_seen is not None:
                self._hot.replan()
            self._catalog_seen = version
        return version

    # state and the request path (raw DBAPI SQL, see .hot) ------------------------------------
    def offer_states(self, offer_ids: Iterable[str] | None = None) -> dict[str, OfferState]:
        return self._hot.offer_states(offer_ids)

    def member_history(self, member_id: str, since_ms: int) -> list[HistoryItem]:
        return self._hot.read_state(member_id, since_ms, ())[0]

    def read_state(
        self, member_id: str, since_ms: int, offer_ids: Iterable[str], limit: int | None = None
    ) -> tuple[list[HistoryItem], dict[str, OfferState]]:
        return self._hot.read_state(member_id, since_ms, offer_ids, limit)

    def get_decision(self, event_id: str) -> Decision | None:
        return self._hot.get_decision(event_id)

    def count_decisions(self) -> int:
        with self._tx() as c:
            return int(c.execute(select(func.count()).select_from(DecisionRow)).scalar() or 0)

    def log_decision(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> Decision:
        return self.log_decision_feedback(decision, offer, member_caps)[0]

    def log_decision_feedback(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> tuple[Decision, Feedback | None]:
        try:
            seq, fb = self._hot.log_decision(decision, offer, member_caps)
        except DuplicateEvent:
            existing = self.get_decision(decision.event_id)
            if existing is None:
                raise StorageError(f"decision {decision.event_id!r} violates a constraint") from None
            # a re-send, or a concurrent request that logged this event id first
            return existing.with_(resent=True), None
        return decision.with_(seq=seq), fb

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
        # concurrent rewards of one event are serialized by the hot path (the write lock on
        # SQLite, the compare-and-swap on PostgreSQL), so a unique key never fails here
        return self._hot.record_reward(
            event_id, value, cost_cents, now_ms, reward_id=reward_id, aggregation=aggregation
        )

    def activate(self, event_id: str, now_ms: int) -> Decision:
        return self._hot.activate(event_id, now_ms)

    def expire(self, now_ms: int, default_rewards: Mapping[str, float]) -> list[Feedback]:
        return self._hot.expire(now_ms, default_rewards)

    # log -------------------------------------------------------------------------------------
    def feedback_after(self, seq: int, limit: int = 10_000) -> list[Feedback]:
        return self._hot.feedback_after(seq, limit)

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
            q = select(*_DECISION_COLS).where(DecisionRow.seq > last)
            if channel is not None:
                q = q.where(DecisionRow.channel == channel)
            with self._tx() as c:
                rows = c.execute(q.order_by(DecisionRow.seq).limit(page)).all()
            for row in rows:
                yield decision_from_row(tuple(row))
            n += len(rows)
            if len(rows) < page:
                return
            last = int(rows[-1][0])

    def decisions_by_event(self, event_ids: Iterable[str]) -> dict[str, Decision]:
        return self._hot.decisions_by_event(event_ids)

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

    # retention -------------------------------------------------------------------------------
    def prune(
        self,
        before_ms: int,
        covered: Mapping[str, int],
        archive: Callable[[list[Pruned]], None],
        *,
        batch: int = 1000,
    ) -> int:
        """Each channel is walked in log order through its ``(channel, seq)`` index; each batch
        is read, archived and deleted in one write transaction (on PostgreSQL its rows are
        locked ``FOR UPDATE SKIP LOCKED``, so two concurrent prunes never archive a decision
        twice)."""
        d, f, r = DecisionRow.__table__.c, FeedbackRow.__table__.c, RewardRow.__table__.c
        n = 0
        for channel, through in sorted(covered.items()):
            uncovered = select(f.seq).where(f.event_id == d.event_id, f.seq > through).exists()
            due = (
                select(*_DECISION_COLS)
                .where(d.channel == channel, d.issued_at < before_ms, d.status != "open", ~uncovered)
                .order_by(d.seq).limit(batch)
            )  # fmt: skip
            if self._dialect == "postgresql":
                due = due.with_for_update(skip_locked=True)
            after = 0
            while True:
                with self._tx(write=True) as c:
                    rows = c.execute(due.where(d.seq > after)).all()
                    if not rows:
                        break
                    ids = [row[1] for row in rows]
                    rewards: dict[str, list[Reward]] = {}
                    for row in c.execute(
                        select(r.event_id, r.reward_id, r.value, r.cost_cents, r.at)
                        .where(r.event_id.in_(ids)).order_by(r.id)
                    ):  # fmt: skip
                        rewards.setdefault(row[0], []).append(
                            Reward(row[0], row[1], float(row[2]), int(row[3]), int(row[4]))
                        )
                    events: dict[str, list[Feedback]] = {}
                    for row in c.execute(
                        select(f.seq, f.event_id, f.channel, f.reward, f.learn, f.kind)
                        .where(f.event_id.in_(ids)).order_by(f.seq)
                    ):  # fmt: skip
                        events.setdefault(row[1], []).append(feedback_from_row(tuple(row)))
                    archive([
                        Pruned(decision_from_row(tuple(row)), tuple(rewards.get(row[1], ())),
                               tuple(events.get(row[1], ())))
                        for row in rows
                    ])  # fmt: skip
                    c.execute(delete(FeedbackRow).where(f.event_id.in_(ids)))
                    c.execute(delete(RewardRow).where(r.event_id.in_(ids)))
                    c.execute(delete(DecisionRow).where(d.seq.in_([int(row[0]) for row in rows])))
                n += len(rows)
                if len(rows) < batch:
                    break
                after = int(rows[-1][0])
        return n

    @property
    def engine(self) -> Engine:
        return self._engine

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
        self._hot.close()
        self._engine.dispose()

