"""The SQL ledger's request path (``bandit_engine.ledger.hot``) on SQLite and the real PostgreSQL.

The engine, invariant and concurrency suites already run every choose/reward on SQLite and
PostgreSQL; this module covers what they do not: a pooled connection killed by the server
(a PostgreSQL restart, an idle timeout, a failover) is replaced without failing the request,
a racing duplicate event id, and expiry across several batches.
"""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from bandit_engine import ChannelConfig, Engine, Offer, PolicySpec
from bandit_engine.engine import EngineConfig
from bandit_engine.ledger.sql import SqlLedger
from tests.conftest import _psycopg_url, catalog


def _kill_backends(url: str, app: str) -> int:
    with psycopg.connect(_psycopg_url(url.split("?")[0]), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchall()
    return len(rows)


def test_a_connection_killed_by_the_server_is_replaced_and_the_request_succeeds(postgres_url) -> None:
    app = f"be-{uuid.uuid4().hex[:10]}"
    url = f"{postgres_url}&application_name={app}"
    eng = Engine.open(url, seed=1)
    try:
        eng.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
        for o in catalog(3, budget=100.0):
            eng.add_offer(o)
        first = eng.choose("m1", "email")
        assert _kill_backends(postgres_url, app) >= 1  # every pooled connection of this engine
        # each hot-path operation meets a dead pooled connection and retries on a fresh one
        d = eng.choose("m2", "email")
        assert d.offer_id is not None
        assert _kill_backends(postgres_url, app) >= 1
        assert eng.reward(first.event_id, 1.0).status == "recorded"
        assert _kill_backends(postgres_url, app) >= 1
        assert eng.get_decision(first.event_id).status == "closed"
        assert eng.ledger.count_decisions() == 2
        st = eng.ledger.offer_states()
        assert sum(s.impressions for s in st.values()) == 2
        assert sum(s.spent_cents for s in st.values()) == first.reserved_cents
    finally:
        eng.ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_duplicate_event_id_racing_in_returns_the_logged_decision(backend, request, tmp_path) -> None:
    """The unique event id is the idempotency key: a second insert of the same id (a client
    retry that raced its first attempt) returns the first decision and reserves nothing."""
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'l.db'}"
    eng = Engine.open(url, seed=1)
    try:
        eng.add_offer(catalog(1, budget=100.0)[0])
        d = eng.choose("m1", "email", event_id="evt-1")
        again = eng.ledger.log_decision(d.with_(member_id="other"), eng.get_offer(d.offer_id), {})
        assert again == d
        assert eng.ledger.offer_states()[d.offer_id].impressions == 1
        assert eng.ledger.count_decisions() == 1
    finally:
        eng.ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_expire_closes_more_than_one_batch(backend, request, tmp_path, clock) -> None:
    """Expiry settles 500 decisions per transaction; every one past its window is closed once,
    its reservation released and its feedback emitted in log order."""
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'l.db'}"
    eng = Engine.open(url, seed=1, clock=clock)
    try:
        eng.set_channel(ChannelConfig("email", policy=PolicySpec("uniform"), reward_window_days=1))
        eng.add_offer(catalog(1, budget=10_000.0)[0])
        n = 1_050
        for i in range(n):
            eng.choose(f"m{i}", "email")
        clock.advance(days=2)
        assert eng.expire() == n
        assert eng.expire() == 0
        st = eng.ledger.offer_states()["offer-0"]
        assert (st.committed_cents, st.impressions, st.spent_cents) == (0, n, 0)
        seqs = [f.seq for f in eng.ledger.feedback_after(0, 5000)]
        assert len(seqs) == n and seqs == sorted(seqs)
        assert {d.status for d in eng.ledger.decisions()} == {"expired"}
    finally:
        eng.ledger.close()


def test_expiry_writes_each_kind_of_settlement_as_the_shared_rule_says(engine, clock) -> None:
    """Expiry writes a batch's decisions in one statement and their feedback events in
    another (``HotPath._settle_many``, ``_insert_feedbacks``). A batch that mixes every kind of
    open decision is written, field by field, as ``settle_expiry`` says, on every backend; the
    feedback events returned are the ones stored, in log order, each under its own event id."""
    from bandit_engine.ledger.settle import settle_expiry

    noisy = 0.1 + 0.2  # a default reward whose text form is long: it must survive the JSON trip
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("uniform"), reward_window_days=1,
                                     default_reward=noisy))  # fmt: skip
    engine.set_channel(ChannelConfig("push", policy=PolicySpec("uniform"), reward_window_days=1,
                                     aggregation="sum"))  # fmt: skip
    engine.set_channel(ChannelConfig("site", policy=PolicySpec("uniform"), reward_window_days=1,
                                     provisional_reward=0.25))  # fmt: skip
    for ch in ("email", "push", "site"):
        engine.add_offer(Offer(f"o-{ch}", [ch], cost=2.0, budget=1_000.0))
    plain = [engine.choose(f"e{i}", "email").event_id for i in range(3)]
    deferred = engine.choose("e-deferred", "email", active=False).event_id
    closed = engine.choose("e-closed", "email").event_id
    engine.reward(closed, 1.0)
    summed = engine.choose("p-summed", "push").event_id
    engine.reward(summed, 1.5, cost=0.5)
    unrewarded_sum = engine.choose("p-none", "push").event_id
    provisional = [engine.choose(f"s{i}", "site").event_id for i in range(2)]
    engine.choose("holdout-like", "email", consent=False)  # no offer: nothing to expire
    before = {d.event_id: d for d in engine.ledger.decisions()}
    last = engine.ledger.last_feedback_seq()
    clock.advance(days=2)
    defaults = {"email": noisy, "push": 0.0, "site": 0.0}

    fbs = engine.ledger.expire(clock.now_ms(), defaults)

    due = [*plain, deferred, summed, unrewarded_sum, *provisional]
    assert sorted(f.event_id for f in fbs) == sorted(due)
    assert fbs == engine.ledger.feedback_after(last, 100)  # what is stored, in log order
    by_event = {f.event_id: f for f in fbs}
    after = {d.event_id: d for d in engine.ledger.decisions()}
    for eid in due:
        want, _, reward = settle_expiry(before[eid], defaults[before[eid].channel])
        assert after[eid] == want, eid
        f = by_event[eid]
        assert (f.channel, f.reward) == (want.channel, reward), eid
    assert by_event[plain[0]].reward == noisy and by_event[plain[0]].kind == "final"
    assert by_event[plain[0]].learn and not by_event[deferred].learn
    assert (after[summed].reward, after[summed].spent_cents, after[summed].reserved_cents) == (1.5, 50, 50)
    assert by_event[summed].reward == 1.5 and by_event[unrewarded_sum].reward == 0.0
    assert {by_event[e].kind for e in provisional} == {"correction"}
    assert after[closed] == before[closed]  # settled before: untouched
    for ch in ("email", "push", "site"):
        st = engine.ledger.offer_states()[f"o-{ch}"]
        assert st.committed_cents == 0
    assert engine.ledger.offer_states()["o-push"].spent_cents == 50
    assert engine.ledger.expire(clock.now_ms(), defaults) == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_concurrent_expirers_close_each_decision_once(backend, request, tmp_path, clock) -> None:
    """Every serving worker closes due windows (``api.sync.Syncer``): four engines expiring the
    same 2 000 due decisions at once close each exactly once (one feedback event each, the
    reservations released once), whichever takes which rows. The decisions are on two offers,
    and each batch of 500 starts on the offer the previous batch ends with: expirers that
    updated an offer's counters per decision, in log order, would lock the two offers' rows in
    opposite orders and deadlock on PostgreSQL."""
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'x.db'}"
    eng = Engine.open(url, seed=1, clock=clock)
    others = [Engine.open(url, seed=1, clock=clock, learn_in_process=False) for _ in range(4)]
    try:
        for ch in ("email", "push"):
            eng.set_channel(ChannelConfig(ch, policy=PolicySpec("uniform"), reward_window_days=1))
        eng.add_offer(Offer("o-email", ["email"], cost=1.0, budget=10_000.0))
        eng.add_offer(Offer("o-push", ["push"], cost=1.0, budget=10_000.0))
        n = 2_000
        for i in range(n):
            block, k = divmod(i, 500)
            ch = ("email", "push")[(block + (k > 0)) % 2]  # blocks: e p p ... p, p e e ... e, ...
            eng.choose(f"m{i}", ch)
        clock.advance(days=2)
        counts: list[int] = []
        errors: list[BaseException] = []
        start = threading.Barrier(len(others))

        def expirer(e: Engine) -> None:
            try:
                start.wait()
                counts.append(e.expire())
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=expirer, args=(e,)) for e in others]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert sum(counts) == n and eng.expire() == 0
        for oid in ("o-email", "o-push"):
            st = eng.ledger.offer_states()[oid]
            assert (st.committed_cents, st.spent_cents, st.settled_cents) == (0, 0, 100 * st.impressions)
        fb = eng.ledger.feedback_after(0, 5000)
        assert len(fb) == n and len({f.event_id for f in fb}) == n
        assert {d.status for d in eng.ledger.decisions()} == {"expired"}
    finally:
        for e in (eng, *others):
            e.ledger.close()


def test_background_checkpoints_keep_the_sqlite_wal_off_the_request_path(tmp_path) -> None:
    """Serving ledgers never checkpoint inside a commit; the checkpointer thread copies the WAL
    into the database file on its own, and stops with the ledger."""
    import os
    import threading
    import time

    from bandit_engine.ledger.sql import SqlLedger

    path = tmp_path / "ck.db"
    ledger = SqlLedger(f"sqlite:///{path}", background_checkpoints=True)
    eng = Engine(ledger, config=EngineConfig(seed=1))
    try:
        with ledger.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
        eng.add_offer(catalog(1, budget=10_000.0)[0])
        size0 = os.path.getsize(path)
        for i in range(300):
            eng.reward(eng.choose(f"m{i}", "email").event_id, 1.0)
        deadline = time.monotonic() + 5
        while os.path.getsize(path) <= size0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert os.path.getsize(path) > size0  # the decisions reached the database file
        assert any(t.name == "bandit-engine-wal-checkpoint" for t in threading.enumerate())
    finally:
        ledger.close()
    assert not any(t.name == "bandit-engine-wal-checkpoint" and t.is_alive() for t in threading.enumerate())


def test_id_lists_travel_as_one_text_parameter_that_round_trips(postgres_url, tmp_path) -> None:
    """``HotPath._ids`` encodes a list of ids as one text value; the database must read back
    exactly the ids, whatever characters they hold (ids are validated upstream, the encoding
    must not depend on it)."""
    ids = ["plain", 'quo"te', "back\\slash", "com,ma", "{brace}", "sp ace", "NULL", ""]
    for url in (postgres_url, f"sqlite:///{tmp_path / 'ids.db'}"):
        ledger = SqlLedger(url)
        try:
            hot = ledger._hot
            sql = (
                "SELECT unnest(CAST(%(ids)s AS VARCHAR[]))" if hot._pg
                else "SELECT value FROM json_each(:ids)"
            )
            with hot._connection() as cur:
                got = [r[0] for r in cur.execute(sql, {"ids": hot._ids(ids)}).fetchall()]
            assert got == ids, url
            assert hot._ids(ids) is hot._ids(list(ids))  # small sets are cached
        finally:
            ledger.close()


def _backends(url: str, app: str) -> int:
    with psycopg.connect(_psycopg_url(url.split("?")[0]), autocommit=True) as conn:
        return int(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (app,)
        ).fetchone()[0])  # fmt: skip


def _settled_backends(url: str, app: str, expected: int, timeout: float = 5.0) -> int:
    """The backend count once it reaches ``expected`` or ``timeout`` passes: a closed
    connection's backend leaves ``pg_stat_activity`` a moment after the client hung up."""
    deadline = time.monotonic() + timeout
    while (n := _backends(url, app)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_each_thread_owns_one_connection_and_none_outlives_its_thread_or_the_ledger(postgres_url) -> None:
    """The request path keeps one connection per thread (no pool checkout per operation):
    threads never share one, a thread reuses its own, the connections of ended threads are
    closed when a new thread opens one, and ``close`` closes the rest."""
    app = f"be-{uuid.uuid4().hex[:10]}"
    ledger = SqlLedger(f"{postgres_url}&application_name={app}")
    try:
        ledger.offer_states()  # the schema upgrade used the pool; this thread now owns one
        pool_idle = _backends(postgres_url, app) - 1
        seen: dict[int, int] = {}
        go = threading.Barrier(4)

        def work(i: int) -> None:
            go.wait()
            for _ in range(5):
                ledger.offer_states()
                with ledger._hot._connection() as cur:
                    seen.setdefault(i, id(cur.connection))
                    assert id(cur.connection) == seen[i]  # the same one every time
            go.wait()  # every thread is alive while the others open theirs

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(seen.values())) == 4
        assert _backends(postgres_url, app) == pool_idle + 5  # 4 threads + this one
        t = threading.Thread(target=ledger.offer_states)  # a new thread reaps the ended ones
        t.start()
        t.join()
        assert _settled_backends(postgres_url, app, pool_idle + 2) == pool_idle + 2
    finally:
        ledger.close()
    assert _settled_backends(postgres_url, app, 0) == 0


def test_requests_after_the_server_dropped_every_connection_are_served(postgres_url, tmp_path) -> None:
    """The pooled connections (keys, governance, catalog reloads) are pre-pinged: after the
    server dropped them all (a restart, a failover), the next requests are served, not 503."""
    from tests.api_fixtures import make_api

    app = f"be-{uuid.uuid4().hex[:10]}"
    api = make_api(tmp_path, url=f"{postgres_url}&application_name={app}")
    try:
        assert api.call("GET", "/v1/offers", "analyst").status_code == 200
        assert _kill_backends(postgres_url, app) >= 1
        key = api.gov.create_key("analyst", name="after-restart")[0]  # a write on the pool
        assert api.call("GET", "/v1/offers", key=key).status_code == 200  # authenticates anew
        assert _kill_backends(postgres_url, app) >= 1
        r = api.call("POST", "/v1/offers", "admin", json={"offer_id": "o1", "channels": ["email"], "cost": 1})
        assert r.status_code == 201, r.json
    finally:
        api.engine.ledger.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_servers_starting_together_on_an_empty_database_all_come_up(backend, request, tmp_path) -> None:
    """Six processes opening an empty database at once (servers started together): the
    migrations run once, one at a time (an advisory lock on PostgreSQL, BEGIN IMMEDIATE on
    SQLite), the default channels are seeded without a duplicate key, and every one serves."""
    import subprocess
    import sys

    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'r.db'}"
    script = (
        "import sys, time; from bandit_engine import Engine; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); "
        "e = Engine.open(sys.argv[1], seed=1); print(','.join(sorted(e.channels()))); e.ledger.close()"
    )
    at = str(time.time() + 1.5)  # all six start their open at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", script, url, at], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert out.strip() == "email,in_app,push,site,sms"
    eng = Engine.open(url, seed=1)
    try:
        eng.add_offer(catalog(1)[0])
        assert eng.choose("m", "email").offer_id == "offer-0"
    finally:
        eng.ledger.close()
