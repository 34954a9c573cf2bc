"""Boundaries the rest of the suite crossed without pinning: each cap, window and deadline
checked exactly at its edge, on every ledger backend where the check lives in the ledger.

Each test names the rule it guards; a mutation-testing pass found these rules could change
(``<`` to ``<=``, a term dropped, a check removed) with every other test still passing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from bandit_engine import (
    CapExceeded,
    ChannelConfig,
    CostAboveReservation,
    Engine,
    InvalidArgument,
    ManualClock,
    MemberCap,
    Offer,
    PolicySpec,
    RewardWindowClosed,
)
from bandit_engine.clock import MS_PER_DAY
from bandit_engine.engine import EngineConfig
from bandit_engine.exploration import check_pmf
from bandit_engine.ledger.memory import MemoryLedger

UNIFORM = PolicySpec("uniform")


@contextmanager
def two_engines(ledger_url: str, clock: ManualClock) -> Iterator[tuple[Engine, Engine]]:
    """Two engines on one ledger, as two workers on one database. ``b`` re-reads the catalog
    only when told to (a refresh period of an hour), so its copy stays as stale as the test
    makes it, whatever the wall clock does. On ``memory://`` both share one MemoryLedger."""
    if ledger_url == "memory://":
        ledger = MemoryLedger()
        a = Engine(ledger, clock=clock)
        b = Engine(ledger, clock=clock, config=EngineConfig(catalog_refresh_seconds=3600))
        engines = [a]
    else:
        a = Engine.open(ledger_url, clock=clock)
        b = Engine.open(ledger_url, clock=clock, catalog_refresh_seconds=3600)
        engines = [a, b]
    try:
        yield a, b
    finally:
        for e in engines:
            e.ledger.close()


@pytest.mark.parametrize(
    ("offer", "lowered", "reason"),
    [
        (dict(cost=5, max_impressions=100), dict(max_impressions=1), "capped:impressions"),
        (dict(cost=5, budget=100, max_impressions=1000), dict(budget=5), "capped:budget"),
    ],
    ids=["impressions", "budget"],
)
def test_the_ledger_refuses_a_reservation_at_each_stored_cap_alone(
    ledger_url: str, clock, offer, lowered, reason
) -> None:
    """The ledger's own cap check, reached when an engine's catalog copy predates a lowered cap
    (its mask passes): an impression cap lowered to exactly the impressions shown refuses the
    next one (``impressions < cap``, not ``<=``), and a budget lowered to exactly spent +
    committed refuses the next reservation (committed counts). Each cap is lowered alone, so
    neither check can stand in for the other."""
    with two_engines(ledger_url, clock) as (a, b):
        a.set_channel(ChannelConfig("email", policy=UNIFORM))
        a.add_offer(Offer("o", ["email"], **offer))
        b.offers()  # b reads the catalog now, and keeps this copy
        assert b.choose("m0", "email").offer_id == "o"
        a.update_offer("o", **lowered)  # exactly what is used
        before = a.offer_state("o")
        d = b.choose("m1", "email")
        assert (d.offer_id, d.reason) == (None, reason)
        assert a.offer_state("o") == before


def test_a_cost_above_what_is_still_held_is_refused_on_a_summing_channel(
    engine: Engine,
) -> None:
    """On a channel that sums its rewards the decision stays open after a redemption, but its
    reservation is spent: a second cost is compared with what is still held (0), not with the
    whole reservation, so the offer never spends more than it reserved."""
    engine.set_channel(ChannelConfig("email", policy=UNIFORM, aggregation="sum"))
    engine.add_offer(Offer("o", ["email"], cost=5))
    d = engine.choose("m", "email")
    assert engine.reward(d.event_id, 1, cost=5, reward_id="r1").status == "recorded"
    with pytest.raises(CostAboveReservation):
        engine.reward(d.event_id, 1, cost=5, reward_id="r2")
    st = engine.offer_state("o")
    assert (st.spent_cents, st.committed_cents) == (500, 0)
    assert engine.get_decision(d.event_id).reward_count == 1


def test_an_exposure_exactly_one_member_cap_window_old_no_longer_counts(
    ledger_url: str, clock
) -> None:
    """The engine-wide member cap counts exposures issued strictly after ``now - window``, as
    the ledgers count them: one exactly a window old has left it, so the member is served."""
    eng = Engine.open(ledger_url, clock=clock, member_cap=MemberCap(max=1, window_days=1))
    try:
        eng.set_channel(ChannelConfig("email", policy=UNIFORM))
        eng.add_offer(Offer("o", ["email"], cost=0.0))
        assert eng.choose("m", "email").offer_id == "o"
        d = eng.choose("m", "email")
        assert (d.offer_id, d.reason) == (None, "member_cap")
        clock.advance(days=1)
        assert eng.choose("m", "email").offer_id == "o"
    finally:
        eng.ledger.close()


def test_the_ledger_counts_a_member_cap_over_its_whole_window(engine: Engine, clock) -> None:
    """The ledger's own member-cap check (the one no stale copy can pass) counts exposures over
    the cap's whole window: one 1.5 days old counts against a 2-day cap, for the engine-wide
    cap (``*``) and for the offer's own cap alike. A 1-day cap lets the same decision in."""
    engine.set_channel(ChannelConfig("email", policy=UNIFORM))
    engine.add_offer(Offer("o", ["email"], cost=0.0))
    offer = engine.get_offer("o")
    first = engine.choose("m", "email")
    assert first.offer_id == "o"
    clock.advance(days=1.5)
    now = clock.now_ms()
    again = first.with_(event_id="again", issued_at=now, deadline=now + 7 * MS_PER_DAY, seq=0)
    for key in ("*", "o"):
        with pytest.raises(CapExceeded):
            engine.ledger.log_decision(again, offer, {key: MemberCap(1, 2)})
    assert engine.ledger.get_decision("again") is None
    stored = engine.ledger.log_decision(again, offer, {"*": MemberCap(1, 1), "o": MemberCap(1, 1)})
    assert stored.event_id == "again" and stored.offer_id == "o"


def test_an_offer_is_live_until_just_before_its_end(engine: Engine, clock) -> None:
    """``ends_at`` is exclusive: the offer serves one millisecond before it, not at it."""
    engine.set_channel(ChannelConfig("email", policy=UNIFORM))
    end = clock.now_ms() + 1000
    engine.add_offer(Offer("o", ["email"], cost=0.0, ends_at=end))
    clock.set(end - 1)
    assert engine.choose("m0", "email").offer_id == "o"
    clock.set(end)
    d = engine.choose("m1", "email")
    assert (d.offer_id, d.reason) == (None, "no_live_offer")


def test_a_decision_does_not_expire_at_its_deadline(engine: Engine, clock) -> None:
    """The reward window includes its deadline: ``expire()`` run exactly at the deadline closes
    nothing, and a reward sent then is recorded."""
    engine.add_offer(Offer("o", ["email"], cost=1.0))
    d = engine.choose("m", "email")
    clock.set(d.deadline)
    assert engine.expire() == 0
    assert engine.get_decision(d.event_id).status == "open"
    assert engine.reward(d.event_id, 1.0).status == "recorded"


@pytest.mark.parametrize("aggregation", ["first", "sum"])
def test_a_reward_makes_an_inactive_decision_learnable(
    engine: Engine, clock, aggregation: str
) -> None:
    """A reward on a deferred decision (``active=False``) activates it: the member acted on the
    offer, so the decision is learned from (at once, or at window close when rewards are
    summed) and the policy moves."""
    engine.set_channel(ChannelConfig("email", aggregation=aggregation))
    engine.add_offer(Offer("o", ["email"], cost=1.0))
    version = engine.policy("email").version
    d = engine.choose("m", "email", active=False)
    out = engine.reward(d.event_id, 1.0)
    assert out.status == "recorded" and out.decision.active
    assert engine.get_decision(d.event_id).active is True
    if aggregation == "sum":
        clock.set(d.deadline + 1)
        assert engine.expire() == 1
    (fb,) = engine.ledger.feedback_after(0)
    assert (fb.event_id, fb.reward, fb.learn) == (d.event_id, 1.0, True)
    assert engine.policy("email").version > version


def test_check_pmf_refuses_negative_entries_that_still_sum_to_one() -> None:
    """A pmf is non-negative entry by entry: ``[1.5, -0.5]`` sums to 1 and is still refused."""
    with pytest.raises(InvalidArgument, match="invalid pmf"):
        check_pmf(np.array([1.5, -0.5]), 2)
    assert check_pmf(np.array([1.0, 0.0]), 2).tolist() == [1.0, 0.0]


def test_a_retry_after_a_refused_reservation_drops_the_capped_offer(
    ledger_url: str, clock
) -> None:
    """When the ledger refuses the offer the engine picked (a catalog copy older than a
    lowered budget), the engine samples again without that offer: the decision serves the
    other one with probability 1 over exactly it, and the refused offer's counters are
    untouched. (The fixed policy picks ``o`` first, so the retry is what is tested.)"""
    with two_engines(ledger_url, clock) as (a, b):
        a.set_channel(ChannelConfig("email", policy=PolicySpec("fixed", {"offers": ["o", "p"]})))
        a.add_offer(Offer("o", ["email"], cost=5, budget=100))
        a.add_offer(Offer("p", ["email"], cost=5, budget=100))
        b.offers()
        assert b.choose("m0", "email", event_id="ev-0").offer_id == "o"
        a.update_offer("o", budget=5)
        before = a.offer_state("o")
        d = b.choose("m1", "email", event_id="ev-1")
        assert (d.offer_id, d.eligible, d.probability) == ("p", ("p",), 1.0)
        assert d.pmf == (1.0,)
        assert a.offer_state("o") == before


def test_activation_is_refused_after_the_deadline_and_allowed_at_it(engine: Engine, clock) -> None:
    """``activate`` is accepted up to and including the deadline, and refused one millisecond
    after it; the decision refused then expires unlearned, the one activated in time is
    learned."""
    engine.add_offer(Offer("o", ["email"], cost=1.0))
    late = engine.choose("m0", "email", active=False)
    on_time = engine.choose("m1", "email", active=False)
    assert late.deadline == on_time.deadline
    clock.set(on_time.deadline)
    assert engine.activate(on_time.event_id).active is True
    clock.advance(ms=1)
    with pytest.raises(RewardWindowClosed):
        engine.activate(late.event_id)
    assert engine.get_decision(late.event_id).active is False
    assert engine.expire() == 2
    learn = {f.event_id: f.learn for f in engine.ledger.feedback_after(0)}
    assert learn == {late.event_id: False, on_time.event_id: True}


# hold-out membership of m-0 .. m-19 on email, salt "pinned", fraction 0.5 (computed once)
PINNED_HOLDOUT = [f"m-{i}" for i in (0, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 17, 18)]


def _holdout_engine(clock, fraction: float, salt: str) -> Engine:
    eng = Engine.open("memory://", clock=clock)
    eng.set_channel(ChannelConfig("email", holdout_fraction=fraction, salt=salt))
    return eng


def test_the_holdout_is_a_pinned_hash_of_salt_and_member(clock) -> None:
    """Who is held out is a stable function of (salt, member, fraction): these members, for
    this salt and fraction, now and in every future version (a change would move members
    between groups mid-experiment). A different salt holds out a different set, and a fraction
    of 0.3 holds out about 30% of members."""
    eng = _holdout_engine(clock, 0.5, "pinned")
    members = [f"m-{i}" for i in range(20)]
    assert [m for m in members if eng.in_holdout(m, "email")] == PINNED_HOLDOUT
    other = _holdout_engine(clock, 0.5, "other-salt")
    assert [m for m in members if other.in_holdout(m, "email")] != PINNED_HOLDOUT
    many = [f"member-{i}" for i in range(2000)]
    third = _holdout_engine(clock, 0.3, "s")
    share = sum(third.in_holdout(m, "email") for m in many) / 2000
    assert 0.25 < share < 0.35
    assert not any(_holdout_engine(clock, 0.0, "pinned").in_holdout(m, "email") for m in members)
