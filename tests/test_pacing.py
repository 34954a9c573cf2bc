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


def test_a_redemption_on_a_summing_channel_prices_as_one_on_a_first_reward_channel(
    engine: Engine, clock: ManualClock
) -> None:
    """The redemption rate that projects an offer's liability divides by every reservation ever
    made (``settled + committed``). A ``sum`` channel books a redemption's cost at once but
    keeps its decision open until the window closes; the reservation must leave ``committed``
    for ``settled`` then, not at the close, or the rate reads high (here 0.50 for 0.375) and
    so does the price. Same history on both channels: same counters, same price, before and
    after the windows close."""
    from bandit_engine.pacing import price

    start = clock.now_ms()
    offers = {}
    for ch, agg in (("email", "first"), ("push", "sum")):
        engine.set_channel(ChannelConfig(ch, policy=PolicySpec("uniform"), reward_window_days=2,
                                         aggregation=agg))  # fmt: skip
        offers[ch] = Offer(f"o-{ch}", [ch], cost=2.0, budget=20.0, starts_at=start,
                           ends_at=start + 10 * MS_PER_DAY)  # fmt: skip
        engine.add_offer(offers[ch])
        for i in range(4):
            d = engine.choose(f"m{i}", ch)
            if i < 2:
                engine.reward(d.event_id, 1.0)

    def counters(ch: str) -> tuple[int, int, int]:
        st = engine.offer_state(f"o-{ch}")
        assert st.settled_cents + st.committed_cents == 200 * st.impressions
        return st.spent_cents, st.committed_cents, st.settled_cents

    clock.advance(days=1)
    assert counters("push") == counters("email") == (400, 400, 400)
    now = clock.now_ms()
    prices = [price(offers[ch], engine.offer_state(f"o-{ch}"), now) for ch in ("email", "push")]
    assert prices[0] > 0 and prices[1] == pytest.approx(prices[0])
    clock.advance(days=2)
    engine.expire()
    assert counters("push") == counters("email") == (400, 0, 800)


def test_the_price_follows_its_formula_and_stays_in_0_1() -> None:
    """The price, computed by hand from the module's formula: committed reservations count in
    the redemption rate's denominator (without them an offer whose liability was still open
    priced out at the campaign's start), behind pace the price is 0 (a negative price would
    raise the offer's weight), and a budget or a cost of 0 prices without dividing by zero."""
    from bandit_engine.ledger.records import OfferState
    from bandit_engine.pacing import DEFAULT_GAIN, PRIOR_RATE, PRIOR_WEIGHT, price

    o = Offer("x", ["email"], cost=1, budget=100, starts_at=0, ends_at=1000)  # 100 and 10 000 ct

    def by_hand(spent: int, settled: int, committed: int, frac: float) -> float:
        prior = PRIOR_WEIGHT * 100  # cents of the prior's reservations
        rate = (spent + PRIOR_RATE * prior) / (settled + committed + prior)
        projected = spent + committed * min(1.0, rate)
        return min(1.0, max(0.0, DEFAULT_GAIN * (projected - 10_000 * frac) / 10_000))

    assert price(o, OfferState("x", committed_cents=4000), now_ms=0) == pytest.approx(
        by_hand(0, 0, 4000, 0.0)) == pytest.approx(0.1818, abs=1e-4)  # fmt: skip
    state = OfferState("x", spent_cents=1000, settled_cents=3000, committed_cents=2000)
    assert price(o, state, now_ms=100) == pytest.approx(by_hand(1000, 3000, 2000, 0.1))
    assert 0.5 < price(o, state, now_ms=100) < 1.0
    assert price(o, OfferState("x", spent_cents=1000), now_ms=500) == 0.0  # 10 % spent at 50 %
    for free in (Offer("x", ["email"], cost=0, budget=100, starts_at=0, ends_at=1000),
                 Offer("x", ["email"], cost=1, budget=0, starts_at=0, ends_at=1000)):  # fmt: skip
        assert price(free, OfferState("x"), now_ms=0) == 0.0
