"""Real concurrency: 8 processes race on tight budgets and caps through their own Engines.

No breach, and exactly the affordable number of reservations succeed.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

from bandit_engine import ChannelConfig, Engine, MemberCap, Offer, PolicySpec

WORKERS = 8
CALLS = 25


def _race(url: str, worker: int, same_member: bool) -> list[str | None]:
    eng = Engine.open(url, seed=worker, member_cap=MemberCap(max=3, window_days=1))
    try:
        out = []
        for i in range(CALLS):
            member = "shared" if same_member else f"w{worker}-m{i}"
            out.append(eng.choose(member, "email", {"i": i}).offer_id)
        return out
    finally:
        eng.ledger.close()


def _setup(url: str) -> None:
    eng = Engine.open(url)
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    eng.add_offer(Offer("budget", ["email"], cost=3.00, budget=30.00))  # 10 affordable
    eng.add_offer(Offer("impressions", ["email"], cost=0.0, max_impressions=7))  # 7 shown
    eng.ledger.close()


@pytest.fixture(scope="module")
def pool():
    """One pool of 8 spawned processes for the module (spawning costs seconds each time)."""
    with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("spawn")) as p:
        yield p


def _run(pool: ProcessPoolExecutor, url: str, same_member: bool) -> Counter:
    futures = [pool.submit(_race, url, w, same_member) for w in range(WORKERS)]
    results = [f.result(timeout=300) for f in futures]
    return Counter(o for r in results for o in r)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_racing_processes_never_breach_caps(backend, request, tmp_path, pool) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'race.db'}"
    _setup(url)
    served = _run(pool, url, same_member=False)
    assert served["budget"] == 10
    assert served["impressions"] == 7
    assert served[None] == WORKERS * CALLS - 17
    eng = Engine.open(url)
    try:
        s = eng.ledger.offer_states()
        assert (s["budget"].committed_cents, s["budget"].impressions) == (3000, 10)
        assert s["impressions"].impressions == 7
        assert eng.ledger.count_decisions() == WORKERS * CALLS
    finally:
        eng.ledger.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_racing_processes_respect_one_members_frequency_cap(backend, request, tmp_path, pool) -> None:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'race.db'}"
    eng = Engine.open(url)
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    eng.add_offer(Offer("free", ["email"], cost=0.0))
    eng.ledger.close()
    served = _run(pool, url, same_member=True)
    assert served["free"] == 3  # the member cap (3 per day across channels), exactly


def _resend_race(url: str, worker: int) -> list[tuple[str, str | None, float | None]]:
    """Every worker sends the same event ids (a service retrying on every host at once), each
    worker with its own seed, so the racers would choose differently if each were logged."""
    eng = Engine.open(url, seed=worker)
    try:
        return [
            (d.event_id, d.offer_id, d.probability)
            for d in (eng.choose(f"m{i}", "email", {"i": i}, event_id=f"ev{i}") for i in range(CALLS))
        ]
    finally:
        eng.ledger.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_racing_resends_of_an_event_id_log_one_decision_and_reserve_once(
    backend, request, tmp_path, pool
) -> None:
    """A choose logs without looking its event id up first; a racer whose insert hits the unique
    key must get the logged decision back, and its reservation must roll back with the insert."""
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'race.db'}"
    _setup(url)
    futures = [pool.submit(_resend_race, url, w) for w in range(WORKERS)]
    results = [f.result(timeout=300) for f in futures]
    assert all(r == results[0] for r in results)  # every racer got the same decision per id
    served = Counter(offer for _, offer, _ in results[0])
    eng = Engine.open(url)
    try:
        assert eng.ledger.count_decisions() == CALLS
        s = eng.ledger.offer_states()
        assert (s["budget"].committed_cents, s["budget"].impressions) == (300 * served["budget"], served["budget"])
        assert s["impressions"].impressions == served["impressions"]
        for eid, offer, p in results[0]:
            d = eng.get_decision(eid)
            assert (d.offer_id, d.probability) == (offer, p)
    finally:
        eng.ledger.close()


def _reward_race(url: str, worker: int, event_ids: list[str]) -> list[str]:
    """Every worker rewards every event: once with the shared reward id, once with its own."""
    eng = Engine.open(url, seed=worker)
    try:
        out = []
        for eid in event_ids:
            out.append(eng.reward(eid, 1.0, 0.5, reward_id="shared").status)
            out.append(eng.reward(eid, 1.0, 0.25, reward_id=f"w{worker}").status)
        return out
    finally:
        eng.ledger.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_racing_rewards_settle_each_event_exactly_once(backend, request, tmp_path, pool) -> None:
    """8 processes reward the same 6 events at once. Under "first" aggregation exactly one reward
    per event is recorded; under "sum" every distinct reward id is, exactly once, and the costs
    add up, so the offer's spent and committed counters match the decisions."""
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else f"sqlite:///{tmp_path / 'race.db'}"
    eng = Engine.open(url)
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    eng.set_channel(ChannelConfig("push", policy=PolicySpec("uniform"), aggregation="sum"))
    eng.add_offer(Offer("o", ["email", "push"], cost=5.00, budget=1000.00))
    first = [eng.choose(f"m{i}", "email").event_id for i in range(3)]
    summed = [eng.choose(f"m{i}", "push").event_id for i in range(3)]
    eng.ledger.close()
    futures = [pool.submit(_reward_race, url, w, first + summed) for w in range(WORKERS)]
    statuses = Counter(s for f in futures for s in f.result(timeout=300))
    # first: 1 of 16 per event recorded; sum: "shared" once + 8 worker ids per event
    assert statuses["recorded"] == 3 * 1 + 3 * (1 + WORKERS)
    assert statuses["duplicate"] == 2 * WORKERS * 6 - statuses["recorded"]
    eng = Engine.open(url)
    try:
        for eid in first:
            d = eng.get_decision(eid)
            assert (d.status, d.reward_count, d.reward) == ("closed", 1, 1.0)
            assert d.spent_cents in (25, 50)  # whichever reward won booked its own cost
        for eid in summed:
            d = eng.get_decision(eid)
            assert (d.status, d.reward_count, d.reward) == ("open", 1 + WORKERS, 1.0 + WORKERS)
            assert d.spent_cents == 50 + 25 * WORKERS
        st = eng.ledger.offer_states(["o"])["o"]
        decisions = [eng.get_decision(e) for e in first + summed]
        assert st.spent_cents == sum(d.spent_cents for d in decisions)
        assert st.committed_cents == sum(d.reserved_cents - d.spent_cents for d in decisions)
        assert len(eng.ledger.feedback_after(0)) == 3  # "sum" learns at window close
    finally:
        eng.ledger.close()


THREADS = 4
THREAD_CALLS = 60


@pytest.mark.parametrize("url_kind", ["memory", "sqlite-in-memory", "sqlite", "postgres"])
def test_threads_sharing_one_engine_and_a_syncing_thread_lose_nothing(
    url_kind, request, tmp_path
) -> None:
    """A threaded server: request threads and a worker's background sync thread share one
    Engine (and, for an in-memory SQLite database, its one connection)."""
    import threading

    from bandit_engine.api import open_engine
    from bandit_engine.api.sync import Syncer

    url = {
        "memory": "memory://",
        "sqlite-in-memory": "sqlite://",
        "sqlite": f"sqlite:///{tmp_path / 'threads.db'}",
    }.get(url_kind) or request.getfixturevalue("postgres_url")
    eng = open_engine(url)
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("thompson")))
    eng.add_offer(Offer("capped", ["email"], cost=1.0, budget=50.0))  # 50 affordable
    eng.add_offer(Offer("free", ["email"], cost=0.0))
    syncer = Syncer(eng, 0.001)
    syncer.start()
    errors: list[BaseException] = []
    served: list[str | None] = []
    redeemed: list[str] = []

    def work(t: int) -> None:
        try:
            for i in range(THREAD_CALLS):
                d = eng.choose(f"t{t}-m{i % 7}", "email", {"i": i % 3})
                served.append(d.offer_id)
                if d.offer_id is not None:
                    eng.reward(d.event_id, float(i % 2))
                    if i % 2:
                        redeemed.append(d.offer_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        syncer.stop()
    try:
        assert errors == []
        assert len(served) == THREADS * THREAD_CALLS
        assert eng.ledger.count_decisions() == THREADS * THREAD_CALLS
        states = eng.ledger.offer_states()
        # every decision was rewarded at once: a 1 books the cost, a 0 releases the reservation
        assert states["capped"].impressions == Counter(served)["capped"]
        assert states["capped"].committed_cents == 0
        assert states["capped"].spent_cents == 100 * Counter(redeemed)["capped"] <= 5000
        # the sync thread and a last sync learned every reward of the log, each exactly once
        eng.sync()
        assert eng.policy("email").version == len(eng.ledger.feedback_after(0)) == len(served)
    finally:
        eng.ledger.close()


def test_an_event_committed_out_of_sequence_order_is_learned_not_skipped(postgres_url, clock) -> None:
    """PostgreSQL numbers feedback before commit: one engine's expiry holds seq N uncommitted
    while another engine's reward commits N+1. The rewarding engine learns in process; reading
    past the gap skipped N for good (its live model, and every snapshot it wrote, one event
    short of a replay of the log). Now it stops at the gap and learns N once N commits."""
    from bandit_engine.clock import MS_PER_DAY

    e1 = Engine.open(postgres_url, clock=clock, seed=1)
    e2 = Engine.open(postgres_url, clock=clock, seed=1, catalog_refresh_seconds=0.0)
    engines = [e1, e2]
    try:
        e1.set_channel(ChannelConfig("email", reward_window_days=3))
        e1.add_offer(Offer("a", ["email"], cost=1.0))
        e1.add_offer(Offer("b", ["email"], cost=1.0))
        e2.choose("m2", "email", event_id="ev-2")  # its window closes first
        clock.advance(ms=4 * MS_PER_DAY)
        e1.choose("m1", "email", event_id="ev-1")
        clock.advance(ms=int(0.5 * MS_PER_DAY))
        hot = e2.ledger._hot  # type: ignore[attr-defined]
        insert = hot._insert_feedbacks
        seqs: list[int] = []

        def insert_then_reward_elsewhere(conn, learned):  # type: ignore[no-untyped-def]
            out = insert(conn, learned)  # seq N, not committed yet
            seqs.extend([*(f.seq for f in out), e1.reward("ev-1", 1.0).feedback.seq])
            return out

        hot._insert_feedbacks = insert_then_reward_elsewhere
        assert e2.expire() == 1
        hot._insert_feedbacks = insert
        assert seqs == [seqs[0], seqs[0] + 1]  # the reward's event committed first
        e1.sync()
        replayed = Engine.open(postgres_url, clock=clock, seed=1)
        engines.append(replayed)
        live, truth = e1.policy("email"), replayed.policy("email")
        assert (live.version, live.serialize()) == (truth.version, truth.serialize())
        e1.snapshot()
        restarted = Engine.open(postgres_url, clock=clock, seed=1)
        engines.append(restarted)
        assert restarted.policy("email").serialize() == truth.serialize()
    finally:
        for e in engines:
            e.ledger.close()
