"""Pacing on a seeded world where the best offer's budget is 40 % of what it would spend
unconstrained: the paced policy uses >= 95 % of the budget by the campaign's end, is still
spending it in the last quarter, never exceeds it, and earns more than a hard stop."""

from __future__ import annotations

import numpy as np
import pytest

from bandit_engine import ChannelConfig, Engine, ManualClock, Offer, PolicySpec
from bandit_engine.clock import MS_PER_DAY

N = 6000
DAYS = 30
SEGMENTS = 10
COST = 2.00
P_BEST = 0.30


def p_alt(seg: int) -> float:
    return 0.05 + 0.025 * seg  # the best offer's edge shrinks from 0.25 (seg 0) to 0.025


def run(paced: bool, budget: float, seed: int = 0):
    start = 1_767_225_600_000
    clock = ManualClock(start)
    eng = Engine.open("memory://", clock=clock, seed=seed)
    eng.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts", {"dim": 32}), exploration_floor=0.02))
    eng.add_offer(
        Offer("best", ["email"], cost=COST, budget=budget, starts_at=start,
              ends_at=start + DAYS * MS_PER_DAY if paced else None)
    )  # fmt: skip
    eng.add_offer(Offer("alt", ["email"], cost=0.0))
    rng = np.random.default_rng(seed)  # common random numbers: same members, same coins
    segs = rng.integers(0, SEGMENTS, N)
    coins = rng.random(N)
    total, spent_at = 0.0, {}
    step = DAYS * MS_PER_DAY // N
    for i in range(N):
        clock.set(start + i * step)
        seg = int(segs[i])
        d = eng.choose(f"m{i}", "email", {"seg": f"s{seg}"}, event_id=f"e{seed}-{i}")  # seeded draws
        p = P_BEST if d.offer_id == "best" else p_alt(seg)
        r = float(coins[i] < p)
        total += r
        eng.reward(d.event_id, r)
        st = eng.offer_state("best")
        assert st.spent_cents + st.committed_cents <= round(budget * 100)
        if i in (N // 2, 3 * N // 4, N - 1):
            spent_at[i] = st.spent_cents / 100
    return total, spent_at


@pytest.mark.slow
def test_pacing_spreads_the_budget_and_beats_a_hard_stop() -> None:
    budget = 0.4 * N * P_BEST * COST  # 40 % of the unconstrained spend
    paced_reward, paced = run(True, budget)
    hard_reward, hard = run(False, budget)
    end, q3 = N - 1, 3 * N // 4
    assert paced[end] >= 0.95 * budget
    assert paced[end] <= budget
    assert paced[q3] <= 0.92 * budget  # still spending in the last quarter ...
    assert paced[end] - paced[q3] >= 0.08 * budget
    assert hard[q3] >= 0.99 * budget  # ... whereas the hard stop ran dry before it
    assert paced_reward > hard_reward * 1.03
