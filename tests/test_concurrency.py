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
