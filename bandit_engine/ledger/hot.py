"""The request path's SQL, sent through the DBAPI connection (sqlite3 or psycopg 3) directly.

``choose`` and ``reward`` are a handful of small statements each. Through SQLAlchemy Core each
statement cost ~0.1 ms of Python (execution context, result wrapping, events): more than the
statement itself on SQLite and about as much as a localhost round trip on PostgreSQL. So the
operations on decisions and offer counters use hand-written SQL on the pooled DBAPI connection:

* ``read_state``: the member's recent exposures and the offers' counters in one ``UNION ALL``
  statement (one snapshot; the guarded reservation below re-checks every cap anyway);
* ``log_decision``: the guarded reservation ``UPDATE offers ... WHERE spent + committed + cost
  <= budget AND impressions < cap`` and the decision insert, atomically. On PostgreSQL both are
  one statement (a data-modifying CTE: one round trip, one commit); on SQLite they run inside
  ``BEGIN IMMEDIATE``. Member frequency caps first lock the member's row;
* ``record_reward``: read the decision, apply the shared settlement rules (:mod:`.settle`), and
  write. On PostgreSQL the write is one compare-and-swap statement (decision, offer counters,
  reward row and feedback event, guarded by the reward count and status that were read; a
  lost race re-reads); on SQLite read and writes run under ``BEGIN IMMEDIATE``;
* ``activate``, ``expire`` and the learning reads (``feedback_after``, ``decisions_by_event``).

Catalog, channels, snapshots and governance stay on SQLAlchemy Core, and the schema is the one
the ORM models and the Alembic migrations define. Every engine, invariant and concurrency test
runs this path on SQLite and on PostgreSQL; ``tests/test_ledger_sql.py`` covers the connection
retry, duplicate event ids and multi-batch expiry.

Each thread owns one DBAPI connection and cursor for the ledger's life (taken from the
SQLAlchemy pool once and detached from it, see :meth:`HotPath._owned`): a checkout and
check-in per operation cost about 0.05 ms of CPU, as much as a PostgreSQL read itself.
Connections are not pre-pinged (that was a round trip per operation); instead a connection
that turns out to be dead is invalidated and the operation retried once on a fresh one. The
retry is safe: a decision is keyed by its unique event id and a reward by (event id, reward
id), so a write that did commit before the connection dropped is found, not repeated. On
SQLite, this process's writers also queue on a file lock (:meth:`HotPath._writer`).
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.pool import StaticPool

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: SQLite's own busy handler then
    fcntl = None  # type: ignore[assignment]

from ..catalog import MemberCap, Offer
from ..errors import CapExceeded, StorageError, UnknownEvent
from .records import Decision, Feedback, FeedbackKind, HistoryItem, OfferState, RewardOutcome
from .settle import (
    OfferDelta,
    check_window_open,
    settle_expiry,
    settle_reward,
    settlement_kind,
)

T = TypeVar("T")
MAX_CAS_ATTEMPTS = 16

DECISION_COLUMNS = (
    "seq", "event_id", "member_id", "channel", "grp", "offer_id", "probability", "policy_name",
    "policy_version", "issued_at", "deadline", "payload", "reserved_cents", "spent_cents", "active",
    "learnable", "status", "reward", "reward_count",
)  # fmt: skip
_INSERT_COLUMNS = DECISION_COLUMNS[1:]
# PostgreSQL types for the INSERT ... SELECT of the reservation CTE (a bare parameter in a
# SELECT list has no type to be inferred from)
_PG_TYPES = {
    "event_id": "VARCHAR", "member_id": "VARCHAR", "channel": "VARCHAR", "grp": "VARCHAR",
    "offer_id": "VARCHAR", "probability": "DOUBLE PRECISION", "policy_name": "VARCHAR",
    "policy_version": "BIGINT", "issued_at": "BIGINT", "deadline": "BIGINT", "payload": "JSON",
    "reserved_cents": "BIGINT", "spent_cents": "BIGINT", "active": "BOOLEAN",
    "learnable": "BOOLEAN", "status": "VARCHAR", "reward": "DOUBLE PRECISION",
    "reward_count": "INTEGER",
}  # fmt: skip

_DECISIONS = f"SELECT {', '.join(DECISION_COLUMNS)} FROM decisions"
_SELECT_DECISION = f"{_DECISIONS} WHERE event_id = :eid"
_MEMBER_EXPOSURES = "member_id = :member AND issued_at >= :since AND offer_id IS NOT NULL"
# the member's latest :limit exposures in the window, the choose's history: in the order of the
# (member_id, issued_at) index, so a heavy member's read stops after :limit rows (ties, and the
# result, in log order)
_LATEST = (
    "(SELECT seq, offer_id, channel, issued_at, reward, status FROM decisions "
    f"WHERE {_MEMBER_EXPOSURES} ORDER BY issued_at DESC, seq DESC LIMIT :limit) h"
)
_HISTORY = f"SELECT offer_id, channel, issued_at, reward, status FROM {_LATEST} ORDER BY seq"
_ALL_STATES = "SELECT offer_id, spent_cents, committed_cents, impressions, settled_cents FROM offers"
_STATES = f"{_ALL_STATES} WHERE "
# the member's history and the offers' counters in one round trip: (0, seq, history...) rows,
# then (1, 0, counters...) rows
_READ_STATE = (
    "SELECT 0, seq, offer_id, channel, issued_at, reward, status, NULL, NULL, NULL, NULL "
    f"FROM {_LATEST} "
    "UNION ALL SELECT 1, 0, offer_id, NULL, NULL, NULL, NULL, spent_cents, committed_cents, "
    "impressions, settled_cents FROM offers WHERE {ids} ORDER BY 1, 2"
)
_RESERVE = (
    "UPDATE offers SET committed_cents = committed_cents + :cost, impressions = impressions + 1 "
    "WHERE offer_id = :oid "
    "AND (budget_cents IS NULL OR spent_cents + committed_cents + :cost <= budget_cents) "
    "AND (max_impressions IS NULL OR impressions < max_impressions) RETURNING offer_id"
)
_INSERT_DECISION = (
    f"INSERT INTO decisions ({', '.join(_INSERT_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _INSERT_COLUMNS)}) RETURNING seq"
)
# PostgreSQL: the decision insert fed by the reservation ``r`` (no row when it failed)
_INSERT_RESERVED = (
    f"INSERT INTO decisions ({', '.join(_INSERT_COLUMNS)}) "
    f"SELECT {', '.join(f'CAST(:{c} AS {_PG_TYPES[c]})' for c in _INSERT_COLUMNS)} FROM r "
    "RETURNING seq"
)
_RESERVE_AND_INSERT = (  # PostgreSQL: both in one statement, so one round trip and one commit
    f"WITH r AS ({_RESERVE}) {_INSERT_RESERVED}"
)
# PostgreSQL, a decision learned provisionally: the reservation, the decision and its
# provisional feedback event in one statement (no row when the reservation fails)
_RESERVE_INSERT_PROVISIONAL = (
    f"WITH r AS ({_RESERVE}), d AS ({_INSERT_RESERVED}), "
    "f AS (INSERT INTO feedback (event_id, channel, reward, learn, kind) "
    "SELECT CAST(:event_id AS VARCHAR), CAST(:channel AS VARCHAR), "
    "CAST(:fb_reward AS DOUBLE PRECISION), CAST(:fb_learn AS BOOLEAN), 'provisional' FROM d "
    "RETURNING seq) "
    "SELECT d.seq, f.seq FROM d, f"
)
_DUE = f"{_DECISIONS} WHERE status = 'open' AND deadline < :now ORDER BY seq LIMIT :limit"
_DECISIONS_IN = f"{_DECISIONS} WHERE event_id "
_FEEDBACK_AFTER = (
    "SELECT seq, event_id, channel, reward, learn, kind FROM feedback WHERE seq > :seq ORDER BY seq "
    "LIMIT :limit"
)
_CAP_DIAGNOSIS = "SELECT impressions, max_impressions FROM offers WHERE offer_id = :oid"
_MEMBER_ROW = "INSERT INTO members (member_id, touches) VALUES (:member, 0) ON CONFLICT DO NOTHING"
_TOUCH_MEMBER = "UPDATE members SET touches = touches + 1 WHERE member_id = :member"
_COUNT_EXPOSURES = (
    "SELECT count(*) FROM decisions WHERE member_id = :member AND issued_at > :since "
    "AND offer_id IS NOT NULL"
)
_COUNT_OFFER_EXPOSURES = _COUNT_EXPOSURES + " AND offer_id = :oid"
_DECISION_FOR_REWARD = (  # the decision, and whether this reward id was already recorded
    f"SELECT {', '.join(DECISION_COLUMNS)}, EXISTS (SELECT 1 FROM rewards "
    "WHERE event_id = :eid AND reward_id = :rid) FROM decisions WHERE event_id = :eid"
)
# PostgreSQL settles a reward in one statement, guarded by the decision's reward count and
# status as read (compare-and-swap): if another writer settled it in between, nothing is
# written and the reward is re-read and re-decided. The status guard is written so that no index
# can serve it: the row is found by its primary key only. A plain ``status = 'open'`` let a
# plan made on a near-empty table scan the (status, deadline) index, i.e. every open decision,
# for each reward, until the table is next analyzed (tests/test_pg_plans.py).
_SETTLE_REWARD_CAS = (
    "WITH dc AS (UPDATE decisions SET status = :status, reward = :reward, "
    "reward_count = :reward_count, spent_cents = :spent, reserved_cents = :reserved, "
    "active = :active WHERE seq = :seq AND reward_count = :old_count "
    "AND (status = 'open') IS TRUE RETURNING seq), "
    "rw AS (INSERT INTO rewards (event_id, reward_id, value, cost_cents, at) "
    "SELECT CAST(:eid AS VARCHAR), CAST(:rid AS VARCHAR), CAST(:value AS DOUBLE PRECISION), "
    "CAST(:cost AS BIGINT), CAST(:at AS BIGINT) FROM dc), "
    "ap AS (UPDATE offers SET spent_cents = spent_cents + :d_spent, "
    "committed_cents = committed_cents + :d_committed, settled_cents = settled_cents + :d_settled "
    "WHERE offer_id = :oid AND EXISTS (SELECT 1 FROM dc)), "
    "fb AS (INSERT INTO feedback (event_id, channel, reward, learn, kind) "
    "SELECT CAST(:eid AS VARCHAR), CAST(:channel AS VARCHAR), CAST(:fb_reward AS DOUBLE PRECISION), "
    "CAST(:learn AS BOOLEAN), CAST(:kind AS VARCHAR) FROM dc WHERE CAST(:emit AS BOOLEAN) "
    "RETURNING seq) "
    "SELECT (SELECT seq FROM dc), (SELECT seq FROM fb)"
)
_INSERT_REWARD = (
    "INSERT INTO rewards (event_id, reward_id, value, cost_cents, at) "
    "VALUES (:eid, :rid, :value, :cost, :at)"
)
_SETTLE_DECISION = (
    "UPDATE decisions SET status = :status, reward = :reward, reward_count = :reward_count, "
    "spent_cents = :spent, reserved_cents = :reserved, active = :active WHERE seq = :seq"
)
_APPLY = (
    "UPDATE offers SET spent_cents = spent_cents + :d_spent, "
    "committed_cents = committed_cents + :d_committed, settled_cents = settled_cents + :d_settled "
    "WHERE offer_id = :oid"
)
_INSERT_FEEDBACK = (
    "INSERT INTO feedback (event_id, channel, reward, learn, kind) "
    "VALUES (:eid, :channel, :reward, :learn, :kind) RETURNING seq"
)
# A batch of settlements (expiry) in two statements instead of two per decision: the rows travel
# as one JSON array parameter, read by jsonb_to_recordset (PostgreSQL) or json_each (SQLite).
# Fed back with the event id: neither database promises RETURNING's row order.
_SETTLE_FIELDS = (
    ("seq", "BIGINT"), ("status", "VARCHAR"), ("reward", "DOUBLE PRECISION"),
    ("reward_count", "INTEGER"), ("spent_cents", "BIGINT"), ("reserved_cents", "BIGINT"),
    ("active", "BOOLEAN"),
)  # fmt: skip
_FEEDBACK_FIELDS = (
    ("i", "INTEGER"), ("event_id", "VARCHAR"), ("channel", "VARCHAR"), ("reward", "DOUBLE PRECISION"),
    ("learn", "BOOLEAN"), ("kind", "VARCHAR"),
)  # fmt: skip


# The statements that look decisions up by a batch of keys (a sync chunk's event ids, an expiry
# batch's rows): PostgreSQL plans them for each execution instead of keeping a prepared plan. A
# plan kept from a connection's first seconds was made on near-empty tables, where reading the
# whole table is the cheapest way to find a few rows, and it stays until the table is next
# analyzed (tests/test_pg_plans.py). Planning is paid once per batch. Every other statement
# stays prepared: its plan is the same index at any table size.
_PLANNED_EACH_TIME = frozenset({"decisions_in", "settle_many"})


def _batch_sql(pg: bool) -> dict[str, str]:
    """The batch statements for one backend (``:rows`` is the JSON array)."""

    def rows(fields: tuple[tuple[str, str], ...]) -> tuple[str, dict[str, str]]:
        if pg:
            spec = ", ".join(f"{n} {t}" for n, t in fields)
            return f"jsonb_to_recordset(CAST(:rows AS JSONB)) AS v({spec})", {n: f"v.{n}" for n, _ in fields}
        return "json_each(:rows) AS v", {n: f"json_extract(v.value, '$.{n}')" for n, _ in fields}

    source, col = rows(_SETTLE_FIELDS)
    sets = ", ".join(f"{n} = {col[n]}" for n, _ in _SETTLE_FIELDS[1:])
    settle = f"UPDATE decisions SET {sets} FROM {source} WHERE decisions.seq = {col['seq']}"
    source, col = rows(_FEEDBACK_FIELDS)
    names = [n for n, _ in _FEEDBACK_FIELDS[1:]]
    feedback = (
        f"INSERT INTO feedback ({', '.join(names)}) SELECT {', '.join(col[n] for n in names)} "
        f"FROM {source} ORDER BY {col['i']} RETURNING seq, event_id"
    )
    return {"settle_many": settle, "insert_feedbacks": feedback}


# engine -> the lock its one shared connection is used under (a StaticPool: in-memory SQLite)
_SHARED_LOCKS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()
_SHARED_LOCKS_GUARD = threading.Lock()


def connection_lock(engine: Engine) -> AbstractContextManager[Any]:
    """What a user of ``engine``'s connections holds for a whole operation. A ``StaticPool``
    (an in-memory SQLite database) is one connection, so one transaction, for every thread:
    one lock per engine keeps two threads' statements out of each other's transactions (a
    request and a worker's sync thread, say). Elsewhere nothing: each thread has a connection
    of its own."""
    if not isinstance(engine.pool, StaticPool):
        return nullcontext()
    with _SHARED_LOCKS_GUARD:
        lock = _SHARED_LOCKS.get(engine)
        if lock is None:
            lock = _SHARED_LOCKS[engine] = threading.RLock()
    return lock


def _pyformat(sql: str) -> str:
    """``:name`` (sqlite3's named style) -> ``%(name)s`` (psycopg's)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql)


def decision_from_row(r: tuple[Any, ...]) -> Decision:
    """A decision from a row of :data:`DECISION_COLUMNS` (the payload is JSON text on SQLite)."""
    p = r[11]
    if isinstance(p, str | bytes):
        p = json.loads(p)
    return Decision(
        event_id=r[1], member_id=r[2], channel=r[3], group=r[4], offer_id=r[5],
        probability=r[6], policy_name=r[7], policy_version=int(r[8]), issued_at=int(r[9]),
        deadline=int(r[10]), eligible=tuple(p["eligible"]), pmf=tuple(p["pmf"]),
        context=p["context"], offer_context=p["offer_context"], reason=p["reason"],
        reserved_cents=int(r[12]), spent_cents=int(r[13]), active=bool(r[14]),
        learnable=bool(r[15]), status=r[16], reward=r[17], reward_count=int(r[18]), seq=int(r[0]),
        provisional=p.get("provisional"),
    )  # fmt: skip


def feedback_from_row(r: tuple[Any, ...]) -> Feedback:
    """A feedback event from a row of ``seq, event_id, channel, reward, learn, kind``."""
    return Feedback(int(r[0]), r[1], r[2], float(r[3]), bool(r[4]), r[5])


def decision_params(d: Decision) -> dict[str, Any]:
    payload = {
        "eligible": list(d.eligible), "pmf": list(d.pmf), "context": dict(d.context),
        "offer_context": {k: dict(v) for k, v in d.offer_context.items()}, "reason": d.reason,
    }  # fmt: skip
    if d.provisional is not None:
        payload["provisional"] = d.provisional
    return {
        "event_id": d.event_id, "member_id": d.member_id, "channel": d.channel, "grp": d.group,
        "offer_id": d.offer_id, "probability": d.probability, "policy_name": d.policy_name,
        "policy_version": d.policy_version, "issued_at": d.issued_at, "deadline": d.deadline,
        "payload": json.dumps(payload), "reserved_cents": d.reserved_cents,
        "spent_cents": d.spent_cents, "active": d.active, "learnable": d.learnable,
        "status": d.status, "reward": d.reward, "reward_count": d.reward_count,
    }  # fmt: skip


class DuplicateEvent(StorageError):
    """A unique key was already taken: for a decision, its event id (a concurrent request with
    the same id; the ledger returns the logged decision). Anywhere else it is a storage error."""


class _Disconnected(Exception):
    """The pooled connection was dead; it has been invalidated."""


class HotPath:
    """``read_state``, ``log_decision`` and ``record_reward`` on raw DBAPI connections."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"
        fmt = _pyformat if self._pg else (lambda s: s)
        # a list of ids travels as one text parameter (psycopg's list adaptation cost more than
        # the statement): a PostgreSQL array literal, or a JSON array for SQLite
        any_of = "= ANY(CAST(:ids AS VARCHAR[]))" if self._pg else "IN (SELECT value FROM json_each(:ids))"
        ids_in = f"offer_id {any_of}"
        self._sql: dict[str, str] = {
            name: fmt(sql) for name, sql in {
                "decision": _SELECT_DECISION,
                "decision_lock": _SELECT_DECISION + (" FOR UPDATE" if self._pg else ""),
                "history": _HISTORY, "all_states": _ALL_STATES,
                "decisions_in": _DECISIONS_IN + any_of, "feedback_after": _FEEDBACK_AFTER,
                # concurrent expirers (every serving worker) split the due rows
                "due": _DUE + (" FOR UPDATE SKIP LOCKED" if self._pg else ""),
                "states": _STATES + ids_in, "read_state": _READ_STATE.format(ids=ids_in),
                "reserve": _RESERVE, "insert_decision": _INSERT_DECISION,
                "reserve_and_insert": _RESERVE_AND_INSERT,
                "reserve_insert_provisional": _RESERVE_INSERT_PROVISIONAL,
                "cap_diagnosis": _CAP_DIAGNOSIS,
                "member_row": _MEMBER_ROW, "touch_member": _TOUCH_MEMBER,
                "count_exposures": _COUNT_EXPOSURES, "count_offer_exposures": _COUNT_OFFER_EXPOSURES,
                "decision_for_reward": _DECISION_FOR_REWARD,
                "settle_reward_cas": _SETTLE_REWARD_CAS, "insert_reward": _INSERT_REWARD,
                "settle_decision": _SETTLE_DECISION, "apply": _APPLY,
                "insert_feedback": _INSERT_FEEDBACK, **_batch_sql(self._pg),
            }.items()
        }  # fmt: skip
        self._unprepared = _PLANNED_EACH_TIME if self._pg else frozenset()
        # bumped by :meth:`replan`: a connection whose plans are older drops them (PostgreSQL)
        self._plans_epoch = 0
        database = engine.url.database
        self._lock_path = (
            f"{database}-writers.lock"
            if not self._pg and database and database != ":memory:" and fcntl is not None
            else None
        )
        self._thread_lock = threading.Lock()
        self._lock_file: Any = None
        self._shared = isinstance(engine.pool, StaticPool)
        self._shared_lock = connection_lock(engine)  # a shared connection: one thread at a time
        self._ids_cache: dict[tuple[str, ...], str] = {}
        self._local = threading.local()
        self._owners: dict[threading.Thread, tuple[Any, int]] = {}  # thread -> (connection, pid)
        self._owners_lock = threading.Lock()
        if self._pg:
            import psycopg

            self._integrity_error: type[Exception] = psycopg.IntegrityError
            self._db_error: type[Exception] = psycopg.Error
        else:
            import sqlite3

            self._integrity_error = sqlite3.IntegrityError
            self._db_error = sqlite3.Error

    # plumbing --------------------------------------------------------------------------------
    def _owned(self) -> Any:
        """This thread's cursor on this thread's connection, opened on first use.

        A checkout from the pool and back per operation (plus switching psycopg's autocommit on
        and off) cost about 0.05 ms of CPU; a connection owned by its thread for the ledger's
        life costs nothing per operation. Owned connections leave the pool (``detach``), so
        threads never wait for a pool slot; they are closed by :meth:`close`, or by the next
        thread that opens one once their own thread has ended. An in-memory SQLite database
        has exactly one connection (``StaticPool``), which every thread then shares, one operation
        at a time (:func:`connection_lock`).
        A connection inherited across ``fork`` is never used (nor closed) by the child."""
        local = self._local
        cur = getattr(local, "cur", None)
        if cur is not None and local.pid == os.getpid():
            return cur
        fairy = self._engine.raw_connection()
        conn = fairy.driver_connection
        cur = conn.cursor()  # type: ignore[union-attr]
        local.cur, local.fairy, local.pid = cur, fairy, os.getpid()
        local.epoch = self._plans_epoch
        if self._shared:
            return cur  # the one in-memory connection stays checked out; the pool keeps it
        fairy.detach()
        if self._pg:
            conn.autocommit = True  # type: ignore[union-attr]  # transactions are explicit BEGINs
        with self._owners_lock:
            for t in [t for t in self._owners if not t.is_alive()]:
                self._close_fairy(*self._owners.pop(t))
            self._owners[threading.current_thread()] = (fairy, local.pid)
        return cur

    def _drop_owned(self) -> None:
        local = self._local
        fairy = getattr(local, "fairy", None)
        local.cur = local.fairy = None
        with self._owners_lock:
            if self._owners.get(threading.current_thread(), (None,))[0] is fairy:
                del self._owners[threading.current_thread()]

    def _close_fairy(self, fairy: Any, pid: int) -> None:
        if pid != os.getpid():
            return  # inherited across fork: the parent's connection, not ours to close
        with suppress(Exception):  # a connection that is already gone
            fairy.close()

    def replan(self) -> None:
        """Make every connection drop its prepared statements before its next operation, so
        PostgreSQL plans them again for the tables as they are now.

        The statements that read ``offers`` (a choose's read of the counters above all) are
        planned while the catalog is small, where a scan is the right plan; a plan is kept
        until the table is analyzed, so where autovacuum is off a catalog grown to thousands of
        offers would be scanned on every choose. The catalog grows only by catalog writes,
        which move the catalog version: the ledger calls this when it sees the version move."""
        if self._pg:
            self._plans_epoch += 1

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """This thread's cursor (autocommit: transactions are explicit BEGINs)."""
        cur = self._owned()
        try:
            if self._local.epoch != self._plans_epoch:
                self._local.epoch = self._plans_epoch
                # a new text each time: psycopg forgets its own prepared statements when it sees
                # a DEALLOCATE ALL pass, but only when the text is new to its cache (a text it
                # has counted before skips that check, so the server would drop the statements
                # and psycopg would go on running them by name: every choose failing)
                cur.execute(f"DEALLOCATE ALL /* plans {self._plans_epoch} */")
            yield cur
        except BaseException as exc:
            conn = cur.connection
            if isinstance(exc, self._db_error) and self._is_disconnect(exc, conn):
                fairy = self._local.fairy
                self._drop_owned()
                fairy.invalidate(exc)
                raise _Disconnected(str(exc)) from exc
            self._rollback(conn)
            raise

    def _is_disconnect(self, exc: Exception, conn: Any) -> bool:
        if self._pg:
            return bool(conn.closed or conn.broken)
        return bool(self._engine.dialect.is_disconnect(exc, conn, None))  # type: ignore[arg-type]

    def _rollback(self, conn: Any) -> None:
        """End a failed transaction (a lost race on a cap, a re-sent event id).

        On PostgreSQL the ROLLBACK goes through libpq directly: psycopg forgets every prepared
        statement when it sees a ROLLBACK command pass (and deallocates them), so the connection
        would parse and plan each request-path statement again for its next five executions.
        PostgreSQL keeps prepared statements across a rollback (they belong to the session, not
        to the transaction), and the request path runs no DDL that could invalidate them."""
        try:
            if self._pg:
                from psycopg.pq import TransactionStatus

                if conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.pgconn.exec_(b"ROLLBACK")
            elif conn.in_transaction:
                conn.execute("ROLLBACK")
        except self._db_error:
            pass

    @contextmanager
    def _writer(self) -> Iterator[None]:
        """SQLite: queue this process's writers on a file lock beside the database.

        SQLite lets one writer in at a time and makes the others poll with sleeps of 1, 2, 5, 10
        ms...; under several workers those sleeps, not the writes, set the tail latency. A
        blocking ``flock`` wakes the next writer the moment the lock is free. SQLite's own lock
        still guarantees correctness (writers outside the hot path don't take this one)."""
        if self._lock_path is None:
            yield
            return
        with self._thread_lock:
            if self._lock_file is None:
                self._lock_file = open(self._lock_path, "a+b")  # noqa: SIM115 - held for the ledger's life
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)

    def close(self) -> None:
        """Close every thread's connection (this process's; call it once no thread uses the
        ledger any more)."""
        with self._owners_lock:
            owners, self._owners = self._owners, {}
        for fairy, pid in owners.values():
            self._close_fairy(fairy, pid)
        self._local = threading.local()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _run(self, op: Callable[[Any], T], *, write: bool = False) -> T:
        """Run ``op(conn)``; once more on a fresh connection if the first one was dead."""
        for attempt in (0, 1):
            try:
                with self._shared_lock, self._writer() if write else nullcontext(), self._connection() as conn:
                    return op(conn)
            except self._integrity_error as exc:
                raise DuplicateEvent(f"ledger constraint violated: {exc}") from None
            except _Disconnected as exc:
                if attempt == 0:
                    continue
                raise StorageError(f"ledger database connection lost: {exc}") from exc
            except self._db_error as exc:
                raise StorageError(f"ledger database error: {exc.__class__.__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    def _q(self, conn: Any, name: str, params: Mapping[str, Any]) -> Any:
        if name in self._unprepared:
            return conn.execute(self._sql[name], params, prepare=False)
        return conn.execute(self._sql[name], params)

    def _begin(self, conn: Any, write: bool) -> None:
        conn.execute("BEGIN IMMEDIATE" if write and not self._pg else "BEGIN")

    # reads -----------------------------------------------------------------------------------
    def get_decision(self, event_id: str) -> Decision | None:
        def op(conn: Any) -> Decision | None:
            row = self._q(conn, "decision", {"eid": event_id}).fetchone()
            return None if row is None else decision_from_row(row)

        return self._run(op)

    def read_state(
        self, member_id: str, since_ms: int, offer_ids: Iterable[str], limit: int | None = None
    ) -> tuple[list[HistoryItem], dict[str, OfferState]]:
        ids = list(offer_ids)

        def op(conn: Any) -> tuple[list[HistoryItem], dict[str, OfferState]]:
            params = {"member": member_id, "since": since_ms, "limit": 2**62 if limit is None else limit}
            if not ids:
                rows = self._q(conn, "history", params).fetchall()
                return [HistoryItem(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows], {}
            params["ids"] = self._ids(ids)
            history, states = [], {}
            for r in self._q(conn, "read_state", params).fetchall():
                if r[0] == 0:
                    history.append(HistoryItem(r[2], r[3], int(r[4]), r[5], r[6]))
                else:
                    states[r[2]] = OfferState(r[2], int(r[7]), int(r[8]), int(r[9]), int(r[10]))
            return history, states

        return self._run(op)

    def _ids(self, ids: list[str]) -> str:
        """``ids`` as one text parameter (see ``any_of``); the offer sets of a channel repeat,
        so small sets' encodings are cached."""
        key = tuple(ids) if len(ids) <= 256 else None
        text = self._ids_cache.get(key) if key is not None else None
        if text is None:
            if self._pg:
                text = "{" + ",".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in ids) + "}"
            else:
                text = json.dumps(ids)
            if key is not None:
                if len(self._ids_cache) >= 1024:
                    self._ids_cache.clear()
                self._ids_cache[key] = text
        return text

    def decisions_by_event(self, event_ids: Iterable[str]) -> dict[str, Decision]:
        """The decisions of a batch of feedback (what every worker's ``sync`` learns from)."""
        ids = list(event_ids)

        def op(conn: Any) -> dict[str, Decision]:
            out: dict[str, Decision] = {}
            for i in range(0, len(ids), 500):
                for r in self._q(conn, "decisions_in", {"ids": self._ids(ids[i : i + 500])}).fetchall():
                    out[r[1]] = decision_from_row(r)
            return out

        return self._run(op) if ids else {}

    def feedback_after(self, seq: int, limit: int) -> list[Feedback]:
        rows = self._run(lambda conn: self._q(conn, "feedback_after", {"seq": seq, "limit": limit}).fetchall())
        return [feedback_from_row(r) for r in rows]

    def offer_states(self, offer_ids: Iterable[str] | None) -> dict[str, OfferState]:
        ids = None if offer_ids is None else list(offer_ids)
        return self._run(lambda conn: self._states(conn, ids))

    def _states(self, conn: Any, ids: list[str] | None) -> dict[str, OfferState]:
        if ids is None:
            rows = self._q(conn, "all_states", {})
        elif not ids:
            return {}
        else:
            rows = self._q(conn, "states", {"ids": self._ids(ids)})
        return {r[0]: OfferState(r[0], int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in rows}

    # writes ----------------------------------------------------------------------------------
    def log_decision(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> tuple[int, Feedback | None]:
        """Reserve (when an offer is served) and insert atomically; returns the decision's seq
        and, for a decision learned provisionally, its provisional feedback event (written in
        the same transaction).

        Raises :class:`CapExceeded` (nothing written) or :class:`DuplicateEvent`."""
        params = decision_params(decision)
        prov = decision.provisional if offer is not None else None
        if offer is not None:
            params["oid"], params["cost"] = offer.offer_id, decision.reserved_cents
        fb_learn = decision.learnable and decision.active
        if prov is not None:
            params["fb_reward"], params["fb_learn"] = prov, fb_learn

        def op(conn: Any) -> tuple[int, Feedback | None]:
            # one statement (no offer; or PostgreSQL reserve+insert, no member cap) needs no BEGIN
            single = offer is None or (self._pg and not member_caps)
            if not single:
                self._begin(conn, True)
            if offer is not None and member_caps:
                self._check_member_caps(conn, decision, member_caps)
            fb = None
            if offer is None:
                seq = self._q(conn, "insert_decision", params).fetchone()[0]
            elif self._pg:
                name = "reserve_and_insert" if prov is None else "reserve_insert_provisional"
                row = self._q(conn, name, params).fetchone()
                if row is None:
                    self._cap_exceeded(conn, offer)
                seq = row[0]
                if prov is not None:
                    fb = Feedback(int(row[1]), decision.event_id, decision.channel, prov, fb_learn, "provisional")  # type: ignore[arg-type]
            else:
                if self._q(conn, "reserve", params).fetchone() is None:
                    self._cap_exceeded(conn, offer)
                seq = self._q(conn, "insert_decision", params).fetchone()[0]
                if prov is not None:
                    fb = self._insert_feedback(conn, decision, prov, "provisional")
            if not single:
                conn.execute("COMMIT")
            return int(seq), fb

        return self._run(op, write=True)

    def _check_member_caps(self, conn: Any, d: Decision, caps: Mapping[str, MemberCap]) -> None:
        self._q(conn, "member_row", {"member": d.member_id})
        self._q(conn, "touch_member", {"member": d.member_id})  # the per-member lock
        for key, cap in caps.items():
            params = {"member": d.member_id, "since": d.issued_at - cap.window_ms}
            if key == "*":
                n = self._q(conn, "count_exposures", params).fetchone()[0]
            else:
                n = self._q(conn, "count_offer_exposures", {**params, "oid": key}).fetchone()[0]
            if int(n or 0) >= cap.max:
                scope = "all offers" if key == "*" else repr(key)
                raise CapExceeded(
                    f"member frequency cap on {scope} reached ({cap.max} per {cap.window_days} days)",
                    d.offer_id if key != "*" else None,
                    "member" if key != "*" else "member_all",
                )

    def _cap_exceeded(self, conn: Any, offer: Offer) -> None:
        row = self._q(conn, "cap_diagnosis", {"oid": offer.offer_id}).fetchone()
        if row is not None and row[1] is not None and row[0] >= row[1]:
            raise CapExceeded(f"impression cap of {offer.offer_id!r} reached", offer.offer_id, "impressions")
        raise CapExceeded(f"budget of {offer.offer_id!r} exhausted", offer.offer_id, "budget")

    def record_reward(
        self,
        event_id: str,
        value: float,
        cost_cents: int | None,
        now_ms: int,
        *,
        reward_id: str | None,
        aggregation: str | Mapping[str, str],
    ) -> RewardOutcome:
        rid = reward_id or event_id

        def op(conn: Any) -> RewardOutcome | None:
            locking = not self._pg  # SQLite: under the write lock; PostgreSQL: compare-and-swap
            if locking:
                self._begin(conn, True)
            row = self._q(conn, "decision_for_reward", {"eid": event_id, "rid": rid}).fetchone()
            if row is None:
                raise UnknownEvent(f"unknown event {event_id!r}")
            d = decision_from_row(row)
            agg = aggregation if isinstance(aggregation, str) else aggregation.get(d.channel, "first")
            if row[-1] or (agg == "first" and d.reward_count):
                if locking:
                    conn.execute("COMMIT")
                return RewardOutcome(event_id, "duplicate", d.reward, d.spent_cents, None, d)
            new, delta, fb_reward = settle_reward(d, value, cost_cents, now_ms, agg)
            learn = new.learnable and new.active
            kind = settlement_kind(new)
            if not locking:
                seq, fb_seq = self._q(conn, "settle_reward_cas", {
                    "seq": d.seq, "old_count": d.reward_count, "status": new.status,
                    "reward": new.reward, "reward_count": new.reward_count,
                    "spent": new.spent_cents, "reserved": new.reserved_cents, "active": new.active,
                    "eid": event_id, "rid": rid, "value": value, "cost": delta.spent, "at": now_ms,
                    "oid": new.offer_id, "d_spent": delta.spent, "d_committed": delta.committed,
                    "d_settled": delta.settled, "channel": new.channel, "fb_reward": fb_reward,
                    "learn": learn, "emit": fb_reward is not None, "kind": kind,
                }).fetchone()  # fmt: skip
                if seq is None:
                    return None  # lost the race to another writer of this decision: re-read
                fb = None if fb_seq is None else Feedback(int(fb_seq), event_id, new.channel, fb_reward, learn, kind)  # type: ignore[arg-type]
            else:
                self._q(conn, "insert_reward", {"eid": event_id, "rid": rid, "value": value,
                                                "cost": delta.spent, "at": now_ms})  # fmt: skip
                fb = self._settle(conn, new, delta, fb_reward)
                conn.execute("COMMIT")
            return RewardOutcome(event_id, "recorded", new.reward, new.spent_cents, fb, new)

        for _ in range(MAX_CAS_ATTEMPTS):
            out = self._run(op, write=True)
            if out is not None:
                return out
        raise StorageError(f"event {event_id!r} is being settled by too many concurrent writers; retry")

    def _settle(
        self, conn: Any, new: Decision, delta: OfferDelta, fb_reward: float | None
    ) -> Feedback | None:
        """Write a settled decision, its offer's counters and (if any) its feedback event."""
        self._update_decision(conn, new)
        if new.offer_id is not None and delta != OfferDelta():
            self._q(conn, "apply", {"oid": new.offer_id, "d_spent": delta.spent,
                                    "d_committed": delta.committed, "d_settled": delta.settled})  # fmt: skip
        if fb_reward is None:
            return None
        return self._insert_feedback(conn, new, fb_reward, settlement_kind(new))

    def _insert_feedback(self, conn: Any, d: Decision, reward: float, kind: FeedbackKind) -> Feedback:
        """Append a feedback event for ``d`` (learned only if ``d`` is learnable and active)."""
        learn = d.learnable and d.active
        seq = self._q(conn, "insert_feedback", {"eid": d.event_id, "channel": d.channel,
                                                "reward": reward, "learn": learn,
                                                "kind": kind}).fetchone()[0]  # fmt: skip
        return Feedback(int(seq), d.event_id, d.channel, reward, learn, kind)

    def _update_decision(self, conn: Any, d: Decision) -> None:
        self._q(conn, "settle_decision", {
            "seq": d.seq, "status": d.status, "reward": d.reward, "reward_count": d.reward_count,
            "spent": d.spent_cents, "reserved": d.reserved_cents, "active": d.active,
        })  # fmt: skip

    def activate(self, event_id: str, now_ms: int) -> Decision:
        def op(conn: Any) -> Decision:
            self._begin(conn, True)
            row = self._q(conn, "decision_lock", {"eid": event_id}).fetchone()
            if row is None:
                raise UnknownEvent(f"unknown event {event_id!r}")
            d = decision_from_row(row)
            check_window_open(d, now_ms)
            if not d.active:
                d = d.with_(active=True)
                self._update_decision(conn, d)
            conn.execute("COMMIT")
            return d

        return self._run(op, write=True)

    def expire(self, now_ms: int, default_rewards: Mapping[str, float], batch: int = 500) -> list[Feedback]:
        """Close every open decision past its deadline, ``batch`` per transaction: the batch's
        decisions in one statement, their feedback events in another, and each offer's counters
        once."""

        def op(conn: Any) -> tuple[int, list[Feedback]]:
            self._begin(conn, True)
            rows = self._q(conn, "due", {"now": now_ms, "limit": batch}).fetchall()
            settled, learned = [], []
            deltas: dict[str, OfferDelta] = {}
            for row in rows:
                d = decision_from_row(row)
                new, delta, fb_reward = settle_expiry(d, default_rewards.get(d.channel, 0.0))
                settled.append(new)
                if new.offer_id is not None:
                    deltas[new.offer_id] = deltas.get(new.offer_id, OfferDelta()) + delta
                if fb_reward is not None:
                    learned.append((new, fb_reward))
            self._settle_many(conn, settled)
            fbs = self._insert_feedbacks(conn, learned)
            # the offers' rows, which every choose updates, last and in one order: each is
            # locked for the commit only, and concurrent expirers cannot deadlock on them
            for oid, delta in sorted(deltas.items()):
                if delta == OfferDelta():
                    continue
                self._q(conn, "apply", {"oid": oid, "d_spent": delta.spent,
                                        "d_committed": delta.committed, "d_settled": delta.settled})  # fmt: skip
            conn.execute("COMMIT")
            return len(rows), fbs

        out: list[Feedback] = []
        while True:
            n, fbs = self._run(op, write=True)
            out.extend(fbs)
            if n < batch:
                return out

    def _settle_many(self, conn: Any, settled: list[Decision]) -> None:
        """Write a batch of settled decisions (what :meth:`_update_decision` writes, in one
        statement)."""
        if settled:
            self._q(conn, "settle_many", {"rows": json.dumps([{
                "seq": d.seq, "status": d.status, "reward": d.reward, "reward_count": d.reward_count,
                "spent_cents": d.spent_cents, "reserved_cents": d.reserved_cents, "active": d.active,
            } for d in settled])})  # fmt: skip

    def _insert_feedbacks(self, conn: Any, learned: list[tuple[Decision, float]]) -> list[Feedback]:
        """Append a feedback event per (settled decision, reward), in that order, in one
        statement; returns them in log order (what :meth:`_insert_feedback` does for one)."""
        if not learned:
            return []
        rows = [
            {"i": i, "event_id": d.event_id, "channel": d.channel, "reward": reward,
             "learn": d.learnable and d.active, "kind": settlement_kind(d)}
            for i, (d, reward) in enumerate(learned)
        ]  # fmt: skip
        seqs = dict((e, int(s)) for s, e in self._q(conn, "insert_feedbacks", {"rows": json.dumps(rows)}).fetchall())
        fbs = [Feedback(seqs[r["event_id"]], r["event_id"], r["channel"], r["reward"], r["learn"], r["kind"]) for r in rows]
        return sorted(fbs, key=lambda f: f.seq)


__all__ = ["DECISION_COLUMNS", "DuplicateEvent", "HotPath", "decision_from_row", "decision_params"]
