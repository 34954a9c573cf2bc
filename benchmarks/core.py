"""In-process choose+reward throughput per policy family, 50 offers, ~30 context features,
on the in-memory and SQLite ledgers, against floors measured in the same run:

* Thompson (Beta-Bernoulli): a bare numpy loop that samples one Beta draw per offer, takes the
  argmax and updates the winner (the textbook decision, no propensity, no ledger).
* lin_ts: a bare numpy linear-Gaussian TS on the same hashed features (one score-space draw,
  Sherman–Morrison update).
* VW: bare ``vowpal_wabbit_next`` parse + predict_one + learn_one on the same example text.
* A heavy member: Thompson chooses for one member with 1 000 exposures in the history window,
  against the same engine's chooses for fresh members (SQLite).
* Expiry under load (PostgreSQL, when ``BANDIT_ENGINE_TEST_POSTGRES_URL`` or
  ``BANDIT_ENGINE_BENCH_POSTGRES_URL`` is set): chooses per second on one offer while another
  engine expires 4 000 of its decisions (what every serving worker now does in the
  background), against the same chooses alone; and that expiry's rate (decisions closed per
  second) against the rate at which the same engine logged them.
* Re-sent event ids (PostgreSQL): chooses under a member cap with every 10th request re-sending
  a logged event id (its transaction rolled back), against the same chooses with none re-sent.
* Peer: mabwiser LinTS, one decision at a time (predict + partial_fit), as a data scientist
  would otherwise run it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np

from bandit_engine import ChannelConfig, Engine, ManualClock, MemberCap, Offer, PolicySpec
from bandit_engine.features import FeatureHasher

T = TypeVar("T")
K = 50
CATS = ["home", "beauty", "grocery", "fashion", "toys", "garden", "sports", "books"]


def offers() -> list[Offer]:
    return [
        Offer(f"o{i:02d}", ["email"], cost=1.0 + i % 7,
              features={"category": CATS[i % len(CATS)], "discount": 0.05 * (1 + i % 6),
                        "kind": ["pct", "points", "shipping"][i % 3]})
        for i in range(K)
    ]  # fmt: skip


def contexts(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c: dict = {f"x{j}": round(float(rng.normal()), 3) for j in range(22)}
        c.update({
            "tier": ["bronze", "silver", "gold"][rng.integers(3)],
            "lifecycle": ["new", "active", "lapsing", "reactivated"][rng.integers(4)],
            "channel_pref": ["email", "push", "sms"][rng.integers(3)],
            "recency_days": int(rng.integers(0, 365)), "frequency": int(rng.integers(0, 50)),
            "monetary": round(float(rng.gamma(2, 50)), 2), "consent_marketing": True,
            "affinity": CATS[rng.integers(len(CATS))],
        })  # fmt: skip
        out.append(c)
    return out


FAMILIES = {
    "thompson": PolicySpec("thompson"),
    "lin_ts": PolicySpec("lin_ts"),
    "vw": PolicySpec("vw"),
}


def engine_loop(family: str, url: str, n: int) -> float:
    eng = Engine.open(url, clock=ManualClock(), seed=1)
    eng.set_channel(ChannelConfig("email", policy=FAMILIES[family]))
    for o in offers():
        eng.add_offer(o)
    ctxs = contexts(n)
    coins = np.random.default_rng(2).random(n)
    members = [f"m{i % 5000}" for i in range(n)]
    for i in range(min(200, n)):  # warm-up
        d = eng.choose(members[i], "email", ctxs[i])
        eng.reward(d.event_id, float(coins[i] < 0.1))
    t = time.perf_counter()
    for i in range(n):
        d = eng.choose(members[i], "email", ctxs[i])
        eng.reward(d.event_id, float(coins[i] < 0.1))
    dt = time.perf_counter() - t
    eng.ledger.close()
    return n / dt


def heavy_member_loop(url: str, n: int, exposures: int = 1000) -> tuple[float, float]:
    """Thompson chooses per second for fresh members, then for one member already shown
    ``exposures`` offers in the history window (a site or in-app visitor): the cost of reading
    and summarizing a long history, against the same engine's fresh-member rate."""
    clock = ManualClock()
    eng = Engine.open(url, clock=clock, seed=1)
    for o in offers():
        eng.add_offer(o)
    ctx = contexts(1)[0]
    for _ in range(exposures):
        clock.advance(seconds=60)
        eng.choose("heavy", "email", ctx)
    rates = []
    for member in (lambda i: f"fresh{i}", lambda i: "heavy"):
        t = time.perf_counter()
        for i in range(n):
            eng.choose(member(i), "email", ctx)
        rates.append(n / (time.perf_counter() - t))
    eng.ledger.close()
    return rates[0], rates[1]


def expiry_contention_loop(url: str, n: int, seconds: float = 1.5) -> tuple[float, float, float, float]:
    """Chooses per second on one offer alone, then while ``n`` of its decisions expire; and
    the rate at which one engine logged those ``n`` decisions, then closed them."""
    import threading

    clock = ManualClock()
    eng = Engine.open(url, clock=clock, seed=1)
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("uniform"), reward_window_days=1))
    eng.add_offer(Offer("o", ["email"], cost=1.0, budget=1e7))
    t = time.perf_counter()
    for i in range(n):
        eng.choose(f"m{i}", "email")
    logged = n / (time.perf_counter() - t)
    clock.advance(days=2)
    # the chooser's decisions are issued after the expirer's "now", so they never come due
    chooser = Engine.open(url, clock=ManualClock(start_ms=clock.now_ms() + 10**9), seed=1,
                          learn_in_process=False)  # fmt: skip
    counter = [0]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            chooser.choose(f"x{counter[0]}", "email")
            counter[0] += 1

    rates = []
    for expiring in (False, True):
        stop.clear()
        counter[0] = 0
        th = threading.Thread(target=loop)
        t = time.perf_counter()
        th.start()
        if expiring:
            closed = eng.expire() / (time.perf_counter() - t)
        else:
            time.sleep(seconds)
        stop.set()
        th.join()
        rates.append(counter[0] / (time.perf_counter() - t))
    eng.ledger.close()
    chooser.ledger.close()
    return rates[0], rates[1], logged, closed


def resend_loop(url: str, n: int, every: int = 10) -> tuple[float, float]:
    """Chooses per second under a member cap (each in a transaction, on PostgreSQL), and the
    same with every ``every``-th request re-sending an event id already logged, as a service
    retrying a timed-out request does (the two take turns, in blocks): the re-send's insert
    fails and its transaction is rolled back. A rollback must not cost the connection its
    prepared statements (psycopg's own ROLLBACK dropped them all: ~9 ms of re-planning each,
    measured in the seventeenth session)."""
    eng = Engine.open(url, clock=ManualClock(), seed=1, learn_in_process=False)
    eng.set_member_cap(MemberCap(max=10_000, window_days=30))
    for o in offers():
        eng.add_offer(o)
    ctxs = contexts(200)
    for i in range(200):  # warm-up: every statement prepared
        eng.choose(f"w{i}", "email", ctxs[i], event_id=f"w{i}")
    spent = {False: 0.0, True: 0.0}
    block = 10 * every
    for b in range(max(1, n // block)):  # the two kinds take turns, so drift hits both alike
        for resend in (False, True):
            t = time.perf_counter()
            for i in range(b * block, (b + 1) * block):
                if resend and i % every == 0:
                    eng.choose("w0", "email", ctxs[0], event_id="w0")
                else:
                    eng.choose(f"{resend}{i}", "email", ctxs[i % 200], event_id=f"{resend}{i}")
            spent[resend] += time.perf_counter() - t
    eng.ledger.close()
    done = max(1, n // block) * block
    return done / spent[False], done / spent[True]


def floor_thompson(n: int) -> float:
    rng = np.random.default_rng(0)
    a, b = np.ones(K), np.ones(K)
    coins = rng.random(n)
    t = time.perf_counter()
    for i in range(n):
        k = int(rng.beta(a, b).argmax())
        r = coins[i] < 0.1
        a[k] += r
        b[k] += 1 - r
    return n / (time.perf_counter() - t)


def floor_lin_ts(n: int, dim: int = 64) -> float:
    rng = np.random.default_rng(0)
    h = FeatureHasher(dim)
    X = [h.vector(c) for c in contexts(n)]
    A_inv = np.tile(np.eye(dim), (K, 1, 1))
    b = np.zeros((K, dim))
    theta = np.zeros((K, dim))
    coins = rng.random(n)
    t = time.perf_counter()
    for i in range(n):
        x = X[i]
        mean = theta @ x
        var = np.einsum("i,kij,j->k", x, A_inv, x)
        k = int((mean + np.sqrt(var) * rng.standard_normal(K)).argmax())
        r = float(coins[i] < 0.1)
        Ax = A_inv[k] @ x
        A_inv[k] -= np.outer(Ax, Ax) / (1 + x @ Ax)
        b[k] += r * x
        theta[k] = A_inv[k] @ b[k]
    return n / (time.perf_counter() - t)


def floor_vw(n: int) -> float:
    from vowpal_wabbit_next import TextFormatParser, Workspace

    ws = Workspace(["--cb_explore_adf", "--squarecb", "-q", "UA", "--quiet"])
    parser = TextFormatParser(ws)
    acts = [
        "|A " + " ".join(f"{k}={v}" if isinstance(v, str) else f"{k}:{v}" for k, v in o.features.items())
        for o in offers()
    ]
    ctxs = contexts(n)
    shared = [
        "shared |U " + " ".join(f"{k}={v}" if isinstance(v, str) else f"{k}:{float(v)}" for k, v in c.items())
        for c in ctxs
    ]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        ex = [parser.parse_line(shared[i])] + [parser.parse_line(a) for a in acts]
        pmf = ws.predict_one(ex)
        a, p = pmf[0]
        cost = -float(rng.random() < 0.1)
        ex = [parser.parse_line(shared[i])] + [
            parser.parse_line((f"{a}:{cost}:{p} " if j == a else "") + line) for j, line in enumerate(acts)
        ]
        ws.learn_one(ex)
    return n / (time.perf_counter() - t)


def peer_mabwiser(n: int) -> float | None:
    try:
        from mabwiser.mab import MAB, LearningPolicy
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    ctx = np.array([[v for v in c.values() if isinstance(v, int | float)] for c in contexts(n + 100)], float)
    mab = MAB(arms=list(range(K)), learning_policy=LearningPolicy.LinTS(), seed=0)
    mab.fit(decisions=rng.integers(0, K, 100), rewards=rng.random(100) < 0.1, contexts=ctx[:100])
    t = time.perf_counter()
    for i in range(n):
        x = ctx[100 + i : 101 + i]
        a = mab.predict(x)
        mab.partial_fit([a], [float(rng.random() < 0.1)], x)
    return n / (time.perf_counter() - t)


def run(quick: bool = False) -> list[dict]:
    n = {"thompson": 3000, "lin_ts": 2000, "vw": 1000} if quick else {"thompson": 20000, "lin_ts": 10000, "vw": 4000}
    floors = {
        "thompson": ("bare numpy Beta-TS", floor_thompson(n["thompson"])),
        "lin_ts": ("bare numpy LinTS", floor_lin_ts(n["lin_ts"])),
        "vw": ("bare VW parse+predict+learn", floor_vw(n["vw"])),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fam in FAMILIES:
            fname, fval = floors[fam]
            for ledger, url in (("memory", "memory://"), ("sqlite", f"sqlite:///{tmp}/{fam}.db")):
                m = n[fam] if ledger == "memory" else max(500, n[fam] // 10)
                rate = engine_loop(fam, url, m)
                rows.append({
                    "policy": fam, "ledger": ledger, "decisions": m, "decisions_per_s": rate,
                    "floor": fname, "floor_per_s": fval, "ratio_to_floor": rate / fval,
                })  # fmt: skip
        heavy_n = 200 if quick else 1000
        fresh, heavy = heavy_member_loop(f"sqlite:///{tmp}/heavy.db", heavy_n)
        rows.append({
            "policy": "thompson, choose for a member with 1 000 exposures", "ledger": "sqlite",
            "decisions": heavy_n, "decisions_per_s": heavy, "floor": "the same, fresh members",
            "floor_per_s": fresh, "ratio_to_floor": heavy / fresh,
        })  # fmt: skip
    from .http import _postgres_schema

    def on_postgres(loop: Callable[[str], T]) -> T | None:
        """``loop(url)`` in a fresh PostgreSQL schema, dropped afterwards (None: no PostgreSQL)."""
        pg = _postgres_schema()
        if pg is None:
            return None
        import psycopg

        try:
            return loop(pg[0])
        finally:
            with psycopg.connect(pg[1], autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{pg[2]}" CASCADE')

    expiring = 1000 if quick else 4000
    expiry = on_postgres(lambda url: expiry_contention_loop(url, expiring))
    if expiry is not None:
        alone, during, logged, closed = expiry
        rows.append({
            "policy": f"uniform, chooses on one offer while {expiring:,} of its decisions expire",
            "ledger": "postgres", "decisions": expiring, "decisions_per_s": during,
            "floor": "the same chooses alone", "floor_per_s": alone, "ratio_to_floor": during / alone,
        })  # fmt: skip
        rows.append({  # > 1: one engine closes windows faster than it opens them
            "policy": f"expire {expiring:,} decisions (while another engine chooses)", "ledger": "postgres",
            "decisions": expiring, "decisions_per_s": closed,
            "floor": "the same engine choosing them", "floor_per_s": logged, "ratio_to_floor": closed / logged,
        })  # fmt: skip
    resends = 500 if quick else 3000
    resent = on_postgres(lambda url: resend_loop(url, resends))
    if resent is not None:
        rows.append({
            "policy": "thompson under a member cap, every 10th choose a re-sent event id",
            "ledger": "postgres", "decisions": resends, "decisions_per_s": resent[1],
            "floor": "the same chooses, none re-sent", "floor_per_s": resent[0],
            "ratio_to_floor": resent[1] / resent[0],
        })  # fmt: skip
    peer_n = 300 if quick else 1500
    peer = peer_mabwiser(peer_n)
    if peer is not None:
        ours = next(r["decisions_per_s"] for r in rows if r["policy"] == "lin_ts" and r["ledger"] == "memory")
        rows.append({
            "policy": "mabwiser LinTS (peer)", "ledger": "-", "decisions": peer_n,
            "decisions_per_s": peer, "floor": "ours lin_ts memory / peer",
            "floor_per_s": ours, "ratio_to_floor": ours / peer,
        })  # fmt: skip
    return rows
