"""A real ``bandit-engine serve --workers 4`` on PostgreSQL under 16 concurrent clients.

Checks: no cap is ever breached, every acknowledged reward is in the database, after a
reward every worker serves a newer policy version within the documented delay
(``--sync-interval`` plus slack; see :mod:`bandit_engine.api.sync`), and the workers close
due reward windows by themselves, each exactly once, releasing the budget they held, and
checkpoint their policies with no learner process running.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest
import requests

from bandit_engine import ChannelConfig, Offer, PolicySpec
from bandit_engine.api import open_engine, open_governance
from tests.api_fixtures import free_port, stop_server

CLIENTS = 16
PAIRS_PER_CLIENT = 125  # 2 000 choose + reward pairs (4 000 requests) in total
SYNC_INTERVAL = 0.5
DELAY = SYNC_INTERVAL + 1.5  # documented bound used by the assertion (interval + request slack)
EXPIRE_INTERVAL = 0.5
PUSH_WINDOW_S = 2.0  # push decisions are never rewarded: their windows close during the run


@pytest.fixture
def served(postgres_url: str) -> Any:
    eng = open_engine(postgres_url, seed=3)
    # a wide exploration floor keeps every eligible offer at p >= 0.1, so the impression cap is
    # reached whatever the (thread-interleaved) rewards teach Thompson about that offer
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("thompson"), exploration_floor=0.5))
    eng.add_offer(Offer("budget-a", ["email"], cost=1.0, budget=40.0, features={"category": "home"}))
    eng.add_offer(Offer("impr-b", ["email"], cost=0.5, max_impressions=60, features={"category": "toys"}))
    eng.add_offer(Offer("member-c", ["email"], cost=0.1, member_cap={"max": 1, "window_days": 30},
                        features={"category": "beauty"}))  # fmt: skip
    eng.add_offer(Offer("both-d", ["email"], cost=2.0, budget=30.0, max_impressions=40,
                        features={"category": "fashion"}))  # fmt: skip
    eng.add_offer(Offer("plain-e", ["email"], cost=0.0, features={"category": "grocery"}))
    eng.set_channel(ChannelConfig("push", policy=PolicySpec("thompson"), reward_window_days=PUSH_WINDOW_S / 86_400))
    eng.add_offer(Offer("push-f", ["push"], cost=1.0, budget=10.0, features={"category": "toys"}))
    key = open_governance(eng).create_key("decide", name="load")[0]
    port = free_port()
    log = open(os.devnull, "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bandit_engine.cli", "--database-url", postgres_url, "serve",
         "--workers", "4", "--port", str(port), "--sync-interval", str(SYNC_INTERVAL),
         "--expire-interval", str(EXPIRE_INTERVAL), "--snapshot-interval", "1"],
        stdout=log, stderr=log,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(f"{base}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                pytest.fail("bandit-engine serve exited early")
            time.sleep(0.1)
        else:
            pytest.fail("server did not come up")
        yield base, key, eng
    finally:
        stop_server(proc)
        log.close()
        eng.ledger.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_many_workers_hold_caps_and_learn(served: Any) -> None:
    base, key, eng = served
    headers = {"Authorization": f"Bearer {key}"}
    acked: dict[str, float] = {}
    served_counts: Counter[str] = Counter()
    errors: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        rng = random.Random(1000 + i)
        s = requests.Session()
        s.headers.update(headers)
        try:
            for k in range(PAIRS_PER_CLIENT):
                member = f"m-{rng.randrange(300)}"
                if k % 5 == 0:  # a push offer nobody redeems: its reservation is held until expiry
                    r = s.post(f"{base}/v1/choose", json={"member_id": member, "channel": "push"}, timeout=30)
                    if r.status_code != 200:
                        errors.append(f"push choose {r.status_code} {r.text[:200]}")
                r = s.post(f"{base}/v1/choose", json={"member_id": member, "channel": "email"}, timeout=30)
                if r.status_code != 200:
                    errors.append(f"choose {r.status_code} {r.text[:200]}")
                    continue
                d = r.json()
                if d["offer_id"] is None:
                    continue
                value = float(rng.random() < 0.3)
                r = s.post(f"{base}/v1/reward", json={"event_id": d["event_id"], "reward": value}, timeout=30)
                if r.status_code != 200 or r.json()["status"] != "recorded":
                    errors.append(f"reward {r.status_code} {r.text[:200]}")
                    continue
                with lock:
                    acked[d["event_id"]] = value
                    served_counts[d["offer_id"]] += 1
        except Exception as exc:  # surfaced below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    assert not errors, errors[:5]
    assert len(acked) > CLIENTS * PAIRS_PER_CLIENT * 0.9, (len(acked), elapsed)

    # 0 breaches: budgets and impression caps, read from the database
    states = eng.ledger.offer_states()
    offers = {o.offer_id: o for o in eng.offers()}
    for oid, st in states.items():
        o = offers[oid]
        if o.budget_cents is not None:
            assert st.spent_cents + st.committed_cents <= o.budget_cents, oid
        if o.max_impressions is not None:
            assert st.impressions <= o.max_impressions, oid
    assert states["impr-b"].impressions == 60  # the caps were actually reached
    assert states["both-d"].impressions == 15 or states["both-d"].spent_cents > 0
    per_member = Counter(d.member_id for d in eng.ledger.decisions(channel="email") if d.offer_id == "member-c")
    assert per_member and max(per_member.values()) == 1
    # every acknowledged reward is in the database, with its value
    stored = eng.ledger.decisions_by_event(list(acked))
    assert len(stored) == len(acked)
    for e, value in acked.items():
        d = stored[e]
        assert d.status == "closed" and d.reward == value and d.reward_count == 1, e

    # a reward is reflected by a newer policy version on every worker within DELAY
    s = requests.Session()
    s.headers.update(headers)

    def versions(n: int) -> list[int]:
        out = []
        for j in range(n):
            r = s.post(f"{base}/v1/choose", json={"member_id": f"probe-{time.time_ns()}-{j}", "channel": "email"})
            assert r.status_code == 200
            out.append(r.json()["policy"]["version"])
        return out

    time.sleep(DELAY)
    before = versions(12)
    assert len(set(before)) == 1, before  # all workers converged on one version
    r = s.post(f"{base}/v1/choose", json={"member_id": "probe-reward", "channel": "email"}).json()
    assert s.post(f"{base}/v1/reward", json={"event_id": r["event_id"], "reward": 1}).status_code == 200
    time.sleep(DELAY)
    after = versions(12)
    assert min(after) > before[0], (before, after)

    # nobody called expire: the workers closed every push window that passed, releasing the
    # budget its liability held (push-f was exhausted by liability at least once)
    def push_offers() -> list[Any]:
        return [d for d in eng.ledger.decisions(channel="push") if d.offer_id is not None]

    deadline = time.monotonic() + PUSH_WINDOW_S + EXPIRE_INTERVAL + 10 * DELAY
    while time.monotonic() < deadline and any(d.status != "expired" for d in push_offers()):
        time.sleep(0.2)
    pushed = push_offers()
    assert pushed and {d.status for d in pushed} == {"expired"}
    st = eng.ledger.offer_states()["push-f"]
    assert (st.committed_cents, st.spent_cents) == (0, 0) and st.impressions >= 10

    # /metrics sums every worker (prometheus multiprocess mode set up by `serve`): whichever
    # worker answers, the decision, reward and expiry counters match the database, so four
    # workers closing windows at once closed each exactly once
    n_decisions = eng.ledger.count_decisions()
    n_recorded = len(acked) + 1
    for _ in range(6):  # several scrapes land on several workers
        text = requests.get(f"{base}/metrics", timeout=10).text
        assert _metric_sum(text, "bandit_engine_decisions_total") == n_decisions
        assert _metric_sum(text, 'bandit_engine_rewards_total{status="recorded"}') == n_recorded
        assert _metric_sum(text, "bandit_engine_expired_decisions_total") == len(pushed)
    r = s.post(f"{base}/v1/choose", json={"member_id": "probe-push", "channel": "push"}).json()
    assert r["offer_id"] == "push-f", r  # its budget is free again

    # with no learner process, the workers checkpointed what they learned
    snap = eng.ledger.latest_snapshot("email")
    assert snap is not None and snap.feedback_seq > len(acked) / 2, snap and snap.feedback_seq


def _metric_sum(text: str, prefix: str) -> float:
    """Sum of the samples whose name (and labels, if given) start with ``prefix``."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix) and not line.startswith("#"))  # fmt: skip
