"""Engine behaviour on every ledger backend (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bandit_engine import (
    ChannelConfig,
    Conflict,
    CostAboveReservation,
    Engine,
    InvalidArgument,
    MemberCap,
    Offer,
    OfferExists,
    PolicySpec,
    RewardWindowClosed,
    Rule,
    UnknownChannel,
    UnknownEvent,
    UnknownModelGroup,
    UnknownPolicy,
)
from bandit_engine.clock import MS_PER_DAY
from bandit_engine.engine import EngineConfig
from bandit_engine.errors import StorageError
from bandit_engine.ledger.memory import MemoryLedger

from .conftest import catalog


def test_choose_logs_exact_probability_over_eligible_offers(engine: Engine) -> None:
    for o in catalog(5):
        engine.add_offer(o)
    d = engine.choose("m-1", "email", {"tier": "gold", "recency_days": 12})
    assert d.offer_id in d.eligible
    assert len(d.eligible) == 5 and len(d.pmf) == 5
    assert sum(d.pmf) == pytest.approx(1.0)
    assert min(d.pmf) > 0
    assert d.probability == d.pmf[d.eligible.index(d.offer_id)]
    assert d.group == "treatment" and d.status == "open"
    stored = engine.get_decision(d.event_id)
    assert stored.probability == d.probability and stored.pmf == d.pmf
    st = engine.offer_state(d.offer_id)
    assert st.committed_cents == engine.get_offer(d.offer_id).cost_cents and st.impressions == 1


def test_same_event_id_returns_the_original_decision(engine: Engine) -> None:
    for o in catalog(5):
        engine.add_offer(o)
    d1 = engine.choose("m-1", "email", {"tier": "gold"}, event_id="ev-1")
    d2 = engine.choose("m-1", "email", {"tier": "silver"}, event_id="ev-1")
    assert d1.to_dict() == d2.to_dict() and d1 == d2
    assert (d1.resent, d2.resent) == (False, True)  # what tells the metrics not to count it again
    assert "resent" not in d2.record() and engine.get_decision("ev-1").resent is False
    assert engine.ledger.count_decisions() == 1
    with pytest.raises(Conflict):
        engine.choose("m-2", "email", {}, event_id="ev-1")


def test_an_event_id_costs_no_look_up_and_a_resend_after_the_budget_ran_out_changes_nothing(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.add_offer(Offer("a", ["email"], cost=5.00, budget=5.00))  # room for one decision
    looked_up: list[str] = []
    real_get = engine.ledger.get_decision

    def counting_get(event_id: str):  # the real look-up, counted
        looked_up.append(event_id)
        return real_get(event_id)

    monkeypatch.setattr(engine.ledger, "get_decision", counting_get)
    d1 = engine.choose("m-1", "email", {"tier": "gold"}, event_id="ev-1")
    assert d1.offer_id == "a" and looked_up == []  # a first send logs without a look-up first
    # the re-send finds the offer's budget gone (nothing eligible), yet gets the original back
    d2 = engine.choose("m-1", "email", {"tier": "silver"}, event_id="ev-1")
    assert d2.to_dict() == d1.to_dict()
    with pytest.raises(Conflict):
        engine.choose("m-2", "email", {}, event_id="ev-1")
    with pytest.raises(Conflict):  # the hold-out and no-consent paths check it too
        engine.choose("m-2", "email", {}, event_id="ev-1", consent=False)
    assert engine.ledger.count_decisions() == 1
    st = engine.offer_state("a")
    assert (st.committed_cents, st.impressions) == (500, 1)


def test_reward_is_idempotent_and_books_cost_once(engine: Engine) -> None:
    engine.add_offer(Offer("a", ["email"], cost=5.00, budget=100.00))
    d = engine.choose("m-1", "email")
    out = engine.reward(d.event_id, 1.0)
    assert out.status == "recorded" and out.spent_cents == 500
    dup = engine.reward(d.event_id, 1.0)
    assert dup.status == "duplicate"
    st = engine.offer_state("a")
    assert (st.spent_cents, st.committed_cents) == (500, 0)
    assert engine.ledger.last_feedback_seq() == 1


def test_partial_cost_releases_the_rest(engine: Engine) -> None:
    engine.add_offer(Offer("a", ["email"], cost=5.00, budget=100.00))
    d = engine.choose("m-1", "email")
    engine.reward(d.event_id, 1.0, cost=2.50)
    st = engine.offer_state("a")
    assert (st.spent_cents, st.committed_cents, st.settled_cents) == (250, 0, 500)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"event_id": "nope", "value": 1.0}, UnknownEvent),
        ({"value": 1.0, "cost": 9.99}, CostAboveReservation),
        ({"value": float("nan")}, InvalidArgument),
        ({"value": True}, InvalidArgument),
        ({"value": 1.0, "cost": -1}, InvalidArgument),
    ],
)
def test_bad_rewards_change_nothing(engine: Engine, kwargs, error) -> None:
    engine.add_offer(Offer("a", ["email"], cost=5.00, budget=100.00))
    d = engine.choose("m-1", "email")
    before = engine.offer_state("a")
    kwargs = {"event_id": d.event_id, **kwargs}
    with pytest.raises(error):
        engine.reward(**kwargs)
    assert engine.offer_state("a") == before
    assert engine.get_decision(d.event_id).status == "open"
    assert engine.ledger.last_feedback_seq() == 0


def test_reward_after_window_is_rejected_and_expiry_releases(engine: Engine, clock) -> None:
    engine.add_offer(Offer("a", ["email"], cost=5.00, budget=100.00))
    d = engine.choose("m-1", "email")
    clock.advance(days=7, ms=1)
    with pytest.raises(RewardWindowClosed):
        engine.reward(d.event_id, 1.0)
    assert engine.offer_state("a").committed_cents == 500  # not yet expired, still held
    assert engine.expire() == 1
    st = engine.offer_state("a")
    assert (st.spent_cents, st.committed_cents) == (0, 0)
    closed = engine.get_decision(d.event_id)
    assert closed.status == "expired" and closed.reward == 0.0
    assert engine.expire() == 0  # nothing twice
    with pytest.raises(RewardWindowClosed):
        engine.reward(d.event_id, 1.0)


def test_inactive_decisions_that_expire_are_not_learned(engine: Engine, clock) -> None:
    engine.add_offer(Offer("a", ["email"], cost=1.0))
    d_inactive = engine.choose("m-1", "email", active=False)
    d_activated = engine.choose("m-2", "email", active=False)
    engine.activate(d_activated.event_id)
    clock.advance(days=8)
    engine.expire()
    fb = {f.event_id: f for f in engine.ledger.feedback_after(0)}
    assert fb[d_inactive.event_id].learn is False
    assert fb[d_activated.event_id].learn is True
    assert engine.policy("email").version == 1


def test_reward_aggregation_sum_learns_total_at_window_close(engine: Engine, clock) -> None:
    engine.set_channel(ChannelConfig("email", aggregation="sum"))
    engine.add_offer(Offer("a", ["email"], cost=0.0))
    d = engine.choose("m-1", "email")
    assert engine.reward(d.event_id, 2.0, reward_id="r1").status == "recorded"
    assert engine.reward(d.event_id, 3.0, reward_id="r2").status == "recorded"
    assert engine.reward(d.event_id, 3.0, reward_id="r2").status == "duplicate"
    assert engine.ledger.last_feedback_seq() == 0  # not learned before the window closes
    clock.advance(days=8)
    engine.expire()
    (fb,) = engine.ledger.feedback_after(0)
    assert fb.reward == 5.0 and fb.learn


def test_holdout_and_no_consent_get_the_default_offer(engine: Engine) -> None:
    for o in catalog(3):
        engine.add_offer(o)
    engine.set_channel(ChannelConfig("email", holdout_fraction=0.5, default_offer="offer-0"))
    groups = {m: engine.in_holdout(f"m-{m}", "email") for m in range(400)}
    share = sum(groups.values()) / len(groups)
    assert 0.4 < share < 0.6
    held = next(m for m, h in groups.items() if h)
    d = engine.choose(f"m-{held}", "email", {})
    assert (d.group, d.offer_id, d.probability, d.reason) == ("holdout", "offer-0", 1.0, "holdout")
    assert engine.in_holdout(f"m-{held}", "email")  # stable
    treated = next(m for m, h in groups.items() if not h)
    d2 = engine.choose(f"m-{treated}", "email", {}, consent=False)
    assert (d2.group, d2.offer_id, d2.reason) == ("treatment", "offer-0", "no_consent")
    # neither is learned from
    engine.reward(d.event_id, 1.0)
    engine.reward(d2.event_id, 1.0)
    assert engine.policy("email").version == 0


def test_the_default_offer_is_served_only_to_members_its_rules_accept(engine: Engine) -> None:
    """A hold-out member (or one without consent) gets the channel's default offer only if they
    pass its eligibility rules, as a treated member would; otherwise nothing."""
    engine.add_offer(Offer("gold-only", ["email"], cost=1.0, rules=[Rule("tier", "in", ["gold"])]))
    engine.set_channel(ChannelConfig("email", holdout_fraction=0.5, default_offer="gold-only"))
    held = next(f"m-{m}" for m in range(200) if engine.in_holdout(f"m-{m}", "email"))
    treated = next(f"m-{m}" for m in range(200) if not engine.in_holdout(f"m-{m}", "email"))
    for member, consent, reason in ((held, True, "holdout"), (treated, False, "no_consent")):
        silver = engine.choose(member, "email", {"tier": "silver"}, consent=consent)
        assert (silver.offer_id, silver.reserved_cents, silver.reason) == (None, 0, reason)
        gold = engine.choose(member, "email", {"tier": "gold"}, consent=consent)
        assert (gold.offer_id, gold.reason) == ("gold-only", reason)
    assert engine.offer_state("gold-only").impressions == 2


def test_an_offers_features_are_immutable_down_to_their_types(engine: Engine) -> None:
    """``1 == True == 1.0`` in Python, but a model reads a count, a flag and a float apart."""
    engine.add_offer(Offer("pts", ["email"], cost=1.0, features={"points": 1, "rate": 0}))
    for changed in ({"points": True, "rate": False}, {"points": 1.0, "rate": 0}):
        with pytest.raises(Conflict, match="features are immutable"):
            engine.add_offer(Offer("pts", ["email"], cost=2.0, features=changed))
    assert dict(engine.get_offer("pts").features) == {"points": 1, "rate": 0}
    assert engine.get_offer("pts").cost_cents == 100


@pytest.mark.parametrize("bad", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_integers_too_large_for_a_float_are_refused_not_crashed_on(engine: Engine, bad: int) -> None:
    """``math.isfinite`` raises ``OverflowError`` on such an int: each check says what is wrong."""
    engine.add_offer(Offer("o", ["email"], cost=1.0))
    d = engine.choose("m-1", "email")
    for call in (
        lambda: engine.reward(d.event_id, bad),
        lambda: ChannelConfig("email", holdout_fraction=bad),
        lambda: engine.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts", {"prior_variance": bad}))),
        lambda: engine.set_channel(ChannelConfig("email", policy=PolicySpec("vw", {"gamma_scale": bad}))),
        lambda: Offer("p", ["email"], cost=bad),
        lambda: engine.prune(bad, None),
    ):
        with pytest.raises(InvalidArgument):
            call()
    assert engine.get_decision(d.event_id).status == "open"


@pytest.mark.parametrize("bad", ["\ud800", "a\udfffb"], ids=["high", "low"])
def test_lone_surrogates_are_refused_where_they_would_break_a_hash_or_a_write(engine: Engine, bad: str) -> None:
    """A lone surrogate is a valid Python str (and JSON escape) but not Unicode text: it fails
    every UTF-8 encode (feature hashing, the hold-out hash, VW, the database)."""
    engine.add_offer(Offer("o", ["email"], cost=1.0))
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts")))
    for call in (
        lambda: engine.choose("m-1", "email", {"k": bad}),
        lambda: engine.choose("m-1", "email", {bad: 1}),
        lambda: ChannelConfig("email", salt=bad),
        lambda: Rule("tier", "in", ["gold", bad]),
        lambda: Offer("p", ["email"], cost=1.0, features={"k": bad}),
    ):
        with pytest.raises(InvalidArgument):
            call()
    assert engine.ledger.count_decisions() == 0
    assert engine.choose("m-1", "email", {"k": "\U0001f600"}).offer_id == "o"  # a valid pair


def test_a_holdout_member_without_a_default_offer_has_an_outcome_to_report(engine: Engine, clock) -> None:
    """The hold-out measures incremental lift only if hold-out members' outcomes are recorded
    too: their decision serves nothing and reserves nothing, but stays open for the window, takes
    the member's outcome as its reward (no cost: nothing was spent), and closes with the default
    reward. It is never learned from. A member without consent gets nothing to report."""
    for o in catalog(2, budget=100.0):
        engine.add_offer(o)
    engine.set_channel(ChannelConfig("email", holdout_fraction=0.5, default_reward=0.0, reward_window_days=2))
    held = [m for m in range(200) if engine.in_holdout(f"m-{m}", "email")][:3]
    treated = next(m for m in range(200) if not engine.in_holdout(f"m-{m}", "email"))
    bought, quiet, costly = (engine.choose(f"m-{m}", "email") for m in held)
    assert (bought.group, bought.offer_id, bought.status, bought.reserved_cents) == ("holdout", None, "open", 0)
    assert bought.reason == "holdout" and not bought.learnable
    no_consent = engine.choose(f"m-{treated}", "email", consent=False)
    assert (no_consent.status, no_consent.reason) == ("none", "no_consent")
    with pytest.raises(InvalidArgument, match="no cost"):
        engine.reward(costly.event_id, 1.0, cost=2.0)
    assert engine.reward(bought.event_id, 1.0).status == "recorded"
    with pytest.raises(InvalidArgument, match="nothing to reward"):
        engine.reward(no_consent.event_id, 1.0)
    clock.advance(days=3)
    assert engine.expire() == 2  # quiet and costly close with the default reward
    got = {e.event_id: engine.get_decision(e.event_id) for e in (bought, quiet, costly)}
    assert [(d.status, d.reward, d.spent_cents) for d in got.values()] == [
        ("closed", 1.0, 0), ("expired", 0.0, 0), ("expired", 0.0, 0)]
    assert engine.get_decision(no_consent.event_id).status == "none"
    assert not any(f.learn for f in engine.ledger.feedback_after(0))
    assert engine.policy("email").version == 0
    assert all(s.committed_cents == 0 and s.spent_cents == 0 for s in engine.ledger.offer_states().values())


def test_budget_is_never_exceeded_and_exhaustion_returns_no_offer(engine: Engine) -> None:
    engine.add_offer(Offer("a", ["email"], cost=3.00, budget=10.00))
    served = [engine.choose(f"m-{i}", "email") for i in range(5)]
    assert [d.offer_id for d in served] == ["a", "a", "a", None, None]
    assert served[-1].reason == "capped:budget"
    st = engine.offer_state("a")
    assert st.spent_cents + st.committed_cents == 900 <= 1000
    engine.reward(served[0].event_id, 1.0, cost=1.00)  # 1.00 spent, 2.00 released
    assert engine.choose("m-9", "email").offer_id == "a"  # 1.00 + 6.00 + 3.00 = 10.00 fits
    assert engine.choose("m-10", "email").offer_id is None
    engine.reward(served[1].event_id, 0.0)  # no redemption: releases 3.00
    assert engine.choose("m-11", "email").offer_id == "a"
    st = engine.offer_state("a")
    assert (st.spent_cents, st.committed_cents) == (100, 900)


def test_impression_and_member_caps(engine: Engine, clock) -> None:
    engine.add_offer(Offer("imp", ["email"], cost=0.0, max_impressions=2))
    engine.add_offer(
        Offer("freq", ["email", "push"], cost=0.0, member_cap=MemberCap(max=1, window_days=7))
    )
    seen = [engine.choose(f"m-{i}", "email").offer_id for i in range(40)]
    assert seen.count("imp") == 2
    # per-member frequency cap: one exposure of "freq" per member per 7 days, on any channel
    engine.update_offer("imp", active=False)
    assert engine.choose("solo", "email").offer_id == "freq"
    again = engine.choose("solo", "push")
    assert again.offer_id is None and again.reason == "capped:member_cap"
    clock.advance(days=7, ms=1)
    assert engine.choose("solo", "push").offer_id == "freq"


def test_member_cap_across_channels(ledger_url, clock) -> None:
    eng = Engine.open(ledger_url, clock=clock, member_cap=MemberCap(max=2, window_days=1))
    try:
        eng.add_offer(Offer("a", ["email", "push", "sms"], cost=0.0))
        got = [eng.choose("m", ch).offer_id for ch in ("email", "push", "sms")]
        assert got == ["a", "a", None]
        assert eng.choose("other", "sms").offer_id == "a"
        clock.advance(days=1, ms=1)
        assert eng.choose("m", "sms").offer_id == "a"
    finally:
        eng.ledger.close()


def test_eligibility_rules_and_validity_windows(engine: Engine, clock) -> None:
    now = clock.now_ms()
    engine.add_offer(Offer("gold-only", ["site"], rules=(Rule("tier", "in", ["gold"]),)))
    engine.add_offer(Offer("later", ["site"], starts_at=now + MS_PER_DAY))
    assert engine.choose("m1", "site", {"tier": "gold"}).offer_id == "gold-only"
    d = engine.choose("m2", "site", {"tier": "silver"})
    assert d.offer_id is None and d.reason == "no_live_offer"
    clock.advance(days=1)
    assert engine.choose("m3", "site", {"tier": "silver"}).offer_id == "later"


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda e: e.choose("", "email"), InvalidArgument),
        (lambda e: e.choose("m" * 200, "email"), InvalidArgument),
        (lambda e: e.choose("m", "fax"), UnknownChannel),
        (lambda e: e.choose("m", "email", {"x": float("inf")}), InvalidArgument),
        (lambda e: e.choose("m", "email", {"x": [1]}), InvalidArgument),
        (lambda e: e.choose("m", "email", {f"k{i}": i for i in range(65)}), InvalidArgument),
        (lambda e: e.add_offer(Offer("z", ["fax"])), UnknownChannel),
        (lambda e: e.add_offer(Offer("offer-0", ["email"], features={"new": 1})), Conflict),
        (lambda e: e.set_channel(ChannelConfig("email", policy=PolicySpec("nope"))), Exception),
    ],
)
def test_bad_input_raises_and_logs_nothing(engine: Engine, call, error) -> None:
    for o in catalog(2):
        engine.add_offer(o)
    before = (engine.ledger.count_decisions(), engine.ledger.offer_states())
    with pytest.raises(error):
        call(engine)
    assert (engine.ledger.count_decisions(), engine.ledger.offer_states()) == before


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Offer("a b", ["email"]), "offer_id"),
        (lambda: Offer("a", []), "at least one channel"),
        (lambda: Offer("a", ["email"], cost=-1), "cost"),
        (lambda: Offer("a", ["email"], budget=float("nan")), "budget"),
        (lambda: Offer("a", ["email"], max_impressions=-3), "max_impressions"),
        (lambda: Offer("a", ["email"], starts_at=10, ends_at=5), "ends_at"),
        (lambda: MemberCap(0, 7), "MemberCap.max"),
        (lambda: MemberCap(1, 0), "window_days"),
        (lambda: Rule("tier", "like", "g"), "Rule.op"),
        (lambda: ChannelConfig("email", holdout_fraction=1.5), "holdout_fraction"),
        (lambda: ChannelConfig("email", aggregation="max"), "aggregation"),
        (lambda: ChannelConfig("email", exploration_floor=0), "exploration_floor"),
    ],
)
def test_configs_are_validated_at_construction(make, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make()


def test_money_is_exact_in_cents() -> None:
    assert Offer("a", ["email"], cost=0.1 + 0.2).cost_cents == 30
    assert Offer("a", ["email"], cost="19.995").cost_cents == 2000


def test_member_history_personalizes_identical_segments(engine: Engine) -> None:
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts")))
    for o in catalog(3):
        engine.add_offer(o)
    ctx = {"tier": "gold"}
    a = engine.choose("alice", "email", ctx)
    engine.reward(a.event_id, 1.0)
    later_a = engine.choose("alice", "email", ctx)
    later_b = engine.choose("bob", "email", ctx)
    assert later_a.context["member.redemptions"] == 1.0
    assert "member.redemptions" not in later_b.context
    assert later_a.offer_context[a.offer_id]["redeemed"] == 1.0
    assert later_b.offer_context == {}


def test_a_choose_reads_the_members_latest_exposures_only_and_caps_still_count_them_all(
    ledger_url: str, clock
) -> None:
    """``history_limit`` bounds what a choose reads of a heavy member (features saturate), not
    what the member caps count: those are counted in the write's transaction."""
    eng = Engine.open(ledger_url, clock=clock, seed=7, history_limit=3, member_cap=MemberCap(5, 30))
    try:
        for o in catalog(2):
            eng.add_offer(o)
        served = []
        for _ in range(7):
            clock.advance(days=1)
            served.append(eng.choose("heavy", "email", {"tier": "gold"}))
        seen = [d.context.get("member.exposures") for d in served]
        assert seen == [None, 1.0, 2.0, 3.0, 3.0, None, None]  # saturates at the limit ...
        assert [d.offer_id is not None for d in served] == [True] * 5 + [False] * 2
        assert {d.reason for d in served[5:]} == {"member_cap"}  # ... the cap counted all five
        assert served[4].context["member.days_since_offer"] == 1.0
        latest = eng.ledger.read_state("heavy", 0, [], 3)[0]
        assert [h.issued_at for h in latest] == [d.issued_at for d in served[2:5]]  # in log order
        assert len(eng.ledger.member_history("heavy", 0)) == 5  # unbounded without a limit
    finally:
        eng.ledger.close()
    with pytest.raises(InvalidArgument, match="history_limit"):
        EngineConfig(history_limit=0)


def test_the_engine_wide_member_cap_lives_in_the_ledger_and_overrides_the_config(
    ledger_url: str, clock
) -> None:
    eng = Engine.open(ledger_url, clock=clock, seed=7, member_cap=MemberCap(1, 7))
    try:
        eng.add_offer(Offer("e", ["email"], cost=1.0))
        eng.add_offer(Offer("p", ["push"], cost=1.0))
        assert eng.member_cap == MemberCap(1, 7)  # the config, until the ledger holds one
        eng.set_member_cap({"max": 2, "window_days": 7})
        assert eng.member_cap == MemberCap(2, 7)
        served = [eng.choose("m", ch).offer_id for ch in ("email", "push", "email")]
        assert served == ["e", "p", None]  # two exposures across channels, then none
        if ledger_url != "memory://":  # another engine on the database: its config says nothing
            other = Engine.open(ledger_url, clock=clock)
            try:
                assert other.member_cap == MemberCap(2, 7)
                assert other.choose("m", "push").reason == "member_cap"
            finally:
                other.ledger.close()
        eng.set_member_cap(None)  # stored as "no cap": the config's no longer applies either
        assert eng.member_cap is None and eng.choose("m", "push").offer_id == "p"
        for bad in ({"max": 2}, {"max": 2, "window_days": 7, "x": 1}, "2/7", {"max": 0, "window_days": 7}):
            with pytest.raises(InvalidArgument):
                eng.set_member_cap(bad)  # type: ignore[arg-type]
        assert eng.member_cap is None
    finally:
        eng.ledger.close()


def test_history_features_say_how_recently_an_offer_and_its_category_were_shown() -> None:
    """Counts over the history window cannot tell an exposure of yesterday from one of weeks
    ago; ``days_since_seen`` / ``days_since_cat_seen`` can (absent when never shown)."""
    from bandit_engine.features import summarize_history
    from bandit_engine.ledger.records import HistoryItem

    now = 100 * MS_PER_DAY
    offers = [Offer("h1", ["email"]), Offer("h2", ["email"]), Offer("b1", ["email"])]
    category_of = {"h1": "home", "h2": "home", "b1": "beauty"}

    def item(offer_id: str, days_ago: float) -> HistoryItem:
        return HistoryItem(offer_id, "email", int(now - days_ago * MS_PER_DAY), None, "expired")

    recent = summarize_history([item("h1", 20), item("h1", 1.5)], offers, category_of, now)[1]
    old = summarize_history([item("h1", 21), item("h1", 20)], offers, category_of, now)[1]
    assert recent[0]["seen"] == old[0]["seen"] == 2  # the counts are the same ...
    assert recent[0]["days_since_seen"] == 1.5 and old[0]["days_since_seen"] == 20.0  # ... recency is not
    assert "days_since_seen" not in recent[1] and recent[1]["days_since_cat_seen"] == 1.5
    assert recent[2] == {}


def test_dsjson_export_is_readable_by_vw(engine: Engine, clock) -> None:
    from vowpal_wabbit_next import DSJsonFormatParser, Workspace

    for o in catalog(4):
        engine.add_offer(o)
    ids = [engine.choose(f"m-{i}", "email", {"tier": "gold"}).event_id for i in range(6)]
    for e in ids[:3]:
        engine.reward(e, 1.0)
    clock.advance(days=8)  # the export holds decisions whose reward window has closed
    buf = io.StringIO()
    assert engine.export_dsjson(buf) == 6
    lines = buf.getvalue().splitlines()
    head = io.StringIO()
    assert engine.export_dsjson(head, limit=2) == 2 and head.getvalue().splitlines() == lines[:2]
    rec = json.loads(lines[0])
    d = engine.get_decision(rec["EventId"])
    assert rec["_label_probability"] == d.probability
    assert rec["a"][0] == d.eligible.index(d.offer_id) + 1
    assert sorted(rec["a"]) == [1, 2, 3, 4] and sum(rec["p"]) == pytest.approx(1)
    ws = Workspace(["--cb_explore_adf", "--quiet"])
    parser = DSJsonFormatParser(ws)
    for line in lines[:3]:
        ws.learn_one(parser.parse_json(line))


@pytest.mark.parametrize("family", ["lin_ts", "vw", "thompson", "shared_ts"])
def test_restart_decides_exactly_like_no_restart(ledger_url, clock, family) -> None:
    """Kill an engine mid-stream (new Engine on the same database, no close, stale snapshot):
    its decisions equal those of an engine that never stopped (on the in-memory ledger, which
    also shows the backends decide identically)."""
    if ledger_url == "memory://":
        pytest.skip("the in-memory run is the reference")
    spec = ChannelConfig("email", policy=PolicySpec(family, {"dim": 16} if family == "lin_ts" else {}))
    start_ms = clock.now_ms()

    def stream(e: Engine, start: int, stop: int) -> list[tuple[str | None, float | None, int]]:
        out = []
        for i in range(start, stop):
            e.clock.set(start_ms + i * 60_000)
            d = e.choose(f"m-{i % 17}", "email", {"tier": ["gold", "silver"][i % 2]}, event_id=f"ev-{i}")
            out.append((d.offer_id, d.probability, d.policy_version))
            if d.offer_id is not None and (i * 7919) % 3 == 0:
                e.reward(d.event_id, float(d.offer_id == "offer-1"))
        return out

    def fresh(url: str, clk) -> Engine:
        e = Engine.open(url, clock=clk, seed=11, snapshot_every=25)
        e.set_channel(spec)
        for o in catalog(4):
            e.add_offer(o)
        return e

    from bandit_engine import ManualClock

    ref_engine = fresh("memory://", ManualClock(start_ms))
    ref = stream(ref_engine, 0, 150)
    ref_model = ref_engine.policy("email").serialize()

    b = fresh(ledger_url, clock)
    got = stream(b, 0, 80)
    assert b.ledger.latest_snapshot("email") is not None
    b.ledger.close()  # crash: no Engine.close(), so the newest snapshot is older than the log
    b2 = Engine.open(ledger_url, clock=clock, seed=11, snapshot_every=25)
    try:
        got += stream(b2, 80, 150)
        assert got == ref
        assert probe(b2) == probe(ref_engine)
        if family != "vw":  # VW's predict bumps reporting counters (not the model) in its bytes
            assert b2.policy("email").serialize() == ref_model
    finally:
        b2.ledger.close()


def probe(e: Engine) -> list[list[float]]:
    """The learned model seen through its pmfs on fixed probe contexts."""
    from bandit_engine.exploration import event_rng
    from bandit_engine.policies.base import Scoring

    offers = tuple(e.get_offer(o.offer_id) for o in catalog(4))
    out = []
    for i, tier in enumerate(["gold", "silver", "bronze"]):
        s = Scoring(f"probe-{i}", {"tier": tier}, offers)
        out.append([round(p, 12) for p in e.policy("email").pmf(s, event_rng(0, f"p{i}"), 0.01)])
    return out


def test_replay_from_scratch_gives_the_same_model(ledger_url, clock) -> None:
    e = Engine.open(ledger_url, clock=clock, seed=5, snapshot_every=10_000)
    try:
        e.set_channel(ChannelConfig("email", policy=PolicySpec("thompson")))
        for o in catalog(4):
            e.add_offer(o)
        for i in range(60):
            d = e.choose(f"m-{i}", "email", event_id=f"e{i}")
            e.reward(d.event_id, float(i % 3 == 0))
        live = e.policy("email").serialize()
        if ledger_url == "memory://":
            replayed = Engine(e.ledger, clock=clock, config=e.config)
        else:
            replayed = Engine.open(ledger_url, clock=clock, seed=5)
        assert replayed.ledger.latest_snapshot("email") is None  # truly from scratch
        try:
            assert replayed.policy("email").serialize() == live
            assert replayed.policy("email").version == 60
        finally:
            if replayed.ledger is not e.ledger:
                replayed.ledger.close()
    finally:
        e.ledger.close()


def test_snapshots_are_pruned_to_the_newest_three(tmp_path, clock) -> None:
    from sqlalchemy import func, select

    from bandit_engine.ledger.models import SnapshotRow

    e = Engine.open(f"sqlite:///{tmp_path / 's.db'}", clock=clock, snapshot_every=2)
    try:
        for o in catalog(3):
            e.add_offer(o)
        for i in range(20):
            e.reward(e.choose(f"m{i}", "email", event_id=f"e{i}").event_id, 1.0)
        with e.ledger.engine.connect() as c:  # type: ignore[attr-defined]
            n = c.execute(select(func.count()).select_from(SnapshotRow)).scalar()
        assert n == 3
        assert e.ledger.latest_snapshot("email").feedback_seq == 20
    finally:
        e.ledger.close()


def _worker(ledger_url: str, clock, seed: int) -> Engine:
    """A serving worker: an engine that learns only by ``sync()`` (``learn_in_process=False``)."""
    if ledger_url == "memory://":
        pytest.skip("two engines share a database, not a process's memory")
    from bandit_engine.ledger.sql import SqlLedger

    return Engine(SqlLedger(ledger_url), clock=clock, config=EngineConfig(seed=seed, learn_in_process=False))


@contextmanager
def _writer_and_worker(ledger_url: str, clock, seed: int) -> Iterator[tuple[Engine, Engine]]:
    """An engine that learns in process and a serving worker on the same database."""
    writer = Engine.open(ledger_url, clock=clock, seed=seed)
    try:
        reader = _worker(ledger_url, clock, seed)
    except BaseException:
        writer.ledger.close()
        raise
    try:
        yield writer, reader
    finally:
        reader.ledger.close()
        writer.ledger.close()


def test_a_syncing_worker_learns_every_channel_from_one_pass_over_the_log(ledger_url: str, clock) -> None:
    """A serving worker (``learn_in_process=False``) learns only by ``sync()``: one read of the
    feedback tail dispatched to each channel's policy must leave every channel's model equal to
    that of the engine that learned in process, and a second sync must learn nothing."""
    with _writer_and_worker(ledger_url, clock, 5) as (writer, reader):
        writer.set_channel(ChannelConfig("email", policy=PolicySpec("thompson")))
        writer.set_channel(ChannelConfig("push", policy=PolicySpec("lin_ts")))
        for o in catalog(3):
            writer.add_offer(o)
        writer.add_offer(Offer("p-1", ["push"], cost=1.0, features={"category": "home"}))
        writer.add_offer(Offer("p-2", ["push"], cost=1.0, features={"category": "toys"}))
        reader.sync()
        for i in range(60):
            ch = ("email", "push")[i % 2]
            d = writer.choose(f"m{i % 7}", ch, {"x": float(i % 5)})
            writer.reward(d.event_id, float(i % 3 == 0))
        assert reader.sync() > 0
        for ch in ("email", "push"):
            assert reader.policy(ch).serialize() == writer.policy(ch).serialize(), ch
            assert reader.policy(ch).version == 30
        assert reader.sync() == 0


def test_a_chunked_sync_lets_decisions_through_between_chunks_and_learns_the_same(ledger_url: str, clock) -> None:
    """``sync(chunk=n)`` reads the log and the decisions without the engine lock: a choose on
    another thread completes while a sync is reading (it would wait for the whole sync if the
    lock were held), records the version the model has at that moment, and the chunked sync
    still ends on the model a one-pass sync builds, byte for byte."""
    with _writer_and_worker(ledger_url, clock, 5) as (writer, reader):
        writer.set_channel(ChannelConfig("push", policy=PolicySpec("lin_ts")))
        for o in catalog(3):
            writer.add_offer(o)
        writer.add_offer(Offer("p-1", ["push"], cost=1.0, features={"category": "home"}))
        reader.sync()
        for i in range(60):
            d = writer.choose(f"m{i % 7}", ("email", "push")[i % 2], {"x": float(i % 5)})
            writer.reward(d.event_id, float(i % 3 == 0))
        reads: list[tuple[int, bool]] = []
        served: list[tuple[int, int]] = []
        inner = reader.ledger.feedback_after

        def feedback_after(seq: int, limit: int = 10_000) -> list:
            reads.append((limit, reader._lock._is_owned()))
            if limit == 7:  # a chunked read: decide from another thread meanwhile
                out: list = []
                t = threading.Thread(target=lambda: out.append(reader.choose(f"c{len(reads)}", "email")))
                t.start()
                t.join(timeout=10)
                assert not t.is_alive(), "a choose waited for the sync"
                served.append((out[0].policy_version, reader.policy("email").version))
            return inner(seq, limit)

        reader.ledger.feedback_after = feedback_after  # type: ignore[method-assign]
        assert reader.sync(chunk=7) == 60
        chunked = [owned for limit, owned in reads if limit == 7]
        assert len(chunked) >= 60 // 7 and not any(chunked)
        assert len({v for v, _ in served}) > 3  # decisions between chunks saw the model grow
        assert all(recorded == current for recorded, current in served)
        for ch in ("email", "push"):
            assert reader.policy(ch).serialize() == writer.policy(ch).serialize(), ch
        assert reader.sync(chunk=7) == 0
        with pytest.raises(InvalidArgument):
            reader.sync(chunk=0)


def test_the_model_identity_cache_stays_bounded_over_catalog_reloads(clock) -> None:
    """Each catalog reload (after every catalog write) brings new channel config objects; the
    cache of model identities keyed by them must not grow with uptime."""
    engine = Engine.open("memory://", clock=clock)
    engine.set_channel(ChannelConfig("email"))
    key = engine._spec_key(engine.channel("email"))
    for i in range(1500):
        engine.ledger.put_setting("note", i)  # a catalog write: the next look re-reads it all
        before = engine._catalog
        engine.channels()
        assert engine._catalog is not before
        assert engine._spec_key(engine.channel("email")) == key
    assert len(engine._spec_keys) <= 1024


def test_the_catalog_is_re_read_only_when_its_version_moved(ledger_url: str, clock) -> None:
    """A serving worker's sync (every second) and every call that shows the catalog check the
    ledger's catalog version, and re-read offers, channels and settings only when it moved
    (re-reading 1 000 unchanged offers cost each worker ~70 ms of CPU a second). Another
    engine's write on the same database is still seen at once."""
    with _writer_and_worker(ledger_url, clock, 1) as (writer, reader):
        for o in catalog(3):
            writer.add_offer(o)
        reader.sync()
        cat = reader._catalog
        assert {o.offer_id for o in reader.offers()} == {o.offer_id for o in catalog(3)}
        reader.sync()
        reader.channels()
        assert reader.get_offer(catalog(3)[0].offer_id) == catalog(3)[0]
        assert reader._catalog is cat  # the same version: nothing re-read
        writer.add_offer(Offer("late", ["email"], cost=1.0))
        assert "late" in {o.offer_id for o in reader.offers()}  # read-your-writes across engines
        assert reader._catalog is not cat
        writer.set_member_cap(MemberCap(2, 1))
        assert reader.member_cap == MemberCap(2, 1)


def test_decision_with_copies_every_field_like_dataclasses_replace() -> None:
    from dataclasses import fields, replace

    from bandit_engine.ledger.records import Decision

    d = Decision("e", "m", "email", "treatment", "o", 0.5, "thompson", 3, 10, 20, eligible=("o", "p"),
                 pmf=(0.5, 0.5), context={"a": 1}, offer_context={"o": {"seen": 1.0}}, reason="r",
                 reserved_cents=5, active=False, learnable=True, status="closed", reward=1.0,
                 reward_count=2, spent_cents=4, seq=9)  # fmt: skip
    assert d.with_() == d and d.with_() is not d
    for f in fields(Decision):
        marker = object()
        changed = d.with_(**{f.name: marker})
        assert getattr(changed, f.name) is marker
        assert changed == replace(d, **{f.name: marker})
    with pytest.raises(TypeError):
        d.with_(no_such_field=1)


def _grouped(engine: Engine, group: str | None = "all", channels=("email", "push")) -> None:
    for ch in channels:
        engine.set_channel(ChannelConfig(ch, policy=PolicySpec("lin_ts", {"dim": 16}), model_group=group))
    for o in catalog(3):
        engine.add_offer(Offer(o.offer_id, list(channels), cost=o.cost_cents / 100, features=o.features))


def test_a_model_group_learns_one_model_for_its_channels(engine: Engine) -> None:
    _grouped(engine)
    pol = engine.policy("email")
    assert engine.policy("push") is pol
    d = engine.choose("m-1", "push", {"tier": "gold"})
    assert d.context["channel"] == "push"  # scored (and learned) with the channel it was served on
    before = pol.version
    engine.reward(d.event_id, 1.0)
    assert engine.policy("email").version == before + 1  # a push reward teaches the email model


@pytest.mark.parametrize("group", ["all", None])
@pytest.mark.parametrize("key", ["channel", "member.exposures", "member.anything"])
def test_the_engines_own_context_keys_are_refused_not_overwritten(engine: Engine, group, key) -> None:
    """A caller's ``channel`` or ``member.*`` would be silently replaced by the engine's own
    feature (on a grouped channel, or always): refused, on every channel alike, so grouping
    channels later cannot start failing a caller that worked before."""
    _grouped(engine, group=group)
    with pytest.raises(InvalidArgument, match="reserved"):
        engine.choose("m-1", "push", {"tier": "gold", key: 1})
    assert engine.ledger.count_decisions() == 0
    assert engine.choose("m-1", "push", {"tier": "gold", "member_since": 2019}).offer_id is not None


def test_channels_without_a_group_learn_alone(engine: Engine) -> None:
    _grouped(engine, group=None)
    assert engine.policy("push") is not engine.policy("email")
    d = engine.choose("m-1", "push", {"tier": "gold"})
    assert "channel" not in d.context
    engine.reward(d.event_id, 1.0)
    assert engine.policy("email").version == 0


def test_channels_of_a_model_group_need_the_same_policy(engine: Engine) -> None:
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts"), model_group="g"))
    with pytest.raises(InvalidArgument, match="model_group"):
        engine.set_channel(ChannelConfig("push", policy=PolicySpec("thompson"), model_group="g"))
    engine.set_channel(ChannelConfig("push", policy=PolicySpec("thompson"), model_group="other"))
    with pytest.raises(InvalidArgument, match="model_group"):
        ChannelConfig("email", model_group="no spaces")
    assert ChannelConfig.from_dict(ChannelConfig("email", model_group="g").to_dict()).model_group == "g"


def test_a_model_group_switches_policy_on_all_its_channels_at_once(engine: Engine) -> None:
    _grouped(engine)  # lin_ts on email and push, one model
    d = engine.choose("m-1", "push", {"tier": "gold"})
    engine.reward(d.event_id, 1.0)
    with pytest.raises(InvalidArgument, match="set_group_policy"):  # one channel at a time: refused
        engine.set_channel(ChannelConfig("email", policy=PolicySpec("shared_ts"), model_group="all"))
    version = engine.ledger.catalog_version()
    new = engine.set_group_policy("all", {"family": "shared_ts", "params": {"prior_variance": 0.05}})
    assert [c.name for c in new] == ["email", "push"]
    assert engine.ledger.catalog_version() == version + 1  # one transaction
    stored = engine.channels()
    assert stored["email"].policy == stored["push"].policy == PolicySpec("shared_ts", {"prior_variance": 0.05})
    assert stored["email"].model_group == stored["push"].model_group == "all"
    pol = engine.policy("email")
    assert pol.family == "shared_ts" and engine.policy("push") is pol
    assert pol.version == 1  # the new model was rebuilt from the log: it learned the push reward
    assert engine.choose("m-2", "email", {"tier": "gold"}).policy_name == "shared_ts"

    # refused requests change nothing
    before = engine.channels()
    for group, policy, error in (
        ("nope", {"family": "uniform"}, UnknownModelGroup),
        ("all", {"family": "oracle"}, UnknownPolicy),
        ("all", {"family": "thompson", "no_such_key": 1}, InvalidArgument),
        ("all", {"family": "thompson", "params": {"no_such_param": 1}}, InvalidArgument),
        ("all", "thompson", InvalidArgument),
    ):
        with pytest.raises(error):
            engine.set_group_policy(group, policy)  # type: ignore[arg-type]
    # all or nothing: the second channel is invalid (vw cannot correct a provisional reward)
    with pytest.raises(InvalidArgument, match="provisional_reward"):
        engine.set_channels([
            ChannelConfig("email", policy=PolicySpec("vw"), model_group="all"),
            ChannelConfig("push", policy=PolicySpec("vw"), model_group="all", provisional_reward=0.0),
        ])  # fmt: skip
    with pytest.raises(InvalidArgument, match="twice"):
        engine.set_channels([ChannelConfig("email"), ChannelConfig("email")])
    assert engine.channels() == before and engine.ledger.catalog_version() == version + 1


def test_a_model_group_is_snapshotted_once_and_restored_on_reopen(tmp_path, clock) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    e = Engine.open(url, clock=clock, seed=3)
    try:
        _grouped(e)
        for i in range(30):
            d = e.choose(f"m{i % 7}", ("email", "push")[i % 2], {"tier": "gold"}, event_id=f"e{i}")
            e.reward(d.event_id, float(i % 3 == 0))
        live = e.policy("push").serialize()
        assert e.policy("email").version == 30
        e.snapshot()
        assert e.ledger.latest_snapshot("*group:all") is not None
        assert e.ledger.latest_snapshot("email") is None
    finally:
        e.ledger.close()
    reopened = Engine.open(url, clock=clock, seed=3)
    try:
        assert reopened.policy("email") is reopened.policy("push")
        assert reopened.policy("email").serialize() == live
    finally:
        reopened.ledger.close()


def test_a_syncing_worker_learns_a_model_group_from_every_channel(ledger_url: str, clock) -> None:
    with _writer_and_worker(ledger_url, clock, 5) as (writer, reader):
        _grouped(writer)
        for i in range(20):
            d = writer.choose(f"m{i % 5}", ("email", "push")[i % 2], {"tier": "gold"}, event_id=f"s{i}")
            writer.reward(d.event_id, float(i % 4 == 0))
        assert reader.sync() == 20
        assert reader.policy("push").serialize() == writer.policy("email").serialize()
        assert reader.sync() == 0


def test_a_model_group_changing_members_converges_like_a_fresh_replay(ledger_url: str, clock) -> None:
    """A channel joining or leaving a group changes which feedback teaches which model: the
    learning engine, a syncing worker and a worker started afterwards must hold the same models
    (the group's: every feedback of its current channels; a channel alone: all of its own)."""
    spec = PolicySpec("lin_ts", {"dim": 16})
    with _writer_and_worker(ledger_url, clock, 7) as (writer, syncing):
        writer.set_channel(ChannelConfig("email", policy=spec, model_group="g"))
        writer.set_channel(ChannelConfig("push", policy=spec))
        for o in catalog(3):
            writer.add_offer(Offer(o.offer_id, ["email", "push"], cost=o.cost_cents / 100, features=o.features))

        def traffic(tag: str) -> None:
            for i in range(12):
                d = writer.choose(f"m{i % 5}", ("email", "push")[i % 2], {"tier": "gold"}, event_id=f"{tag}{i}")
                writer.reward(d.event_id, float(i % 3 == 0))
            syncing.sync()

        traffic("alone-")
        writer.set_channel(ChannelConfig("push", policy=spec, model_group="g"))  # push joins
        traffic("joined-")
        fresh = _worker(ledger_url, clock, 7)
        try:
            for engine in (writer, syncing):
                assert engine.policy("push").serialize() == fresh.policy("push").serialize()
        finally:
            fresh.ledger.close()
        writer.set_channel(ChannelConfig("push", policy=spec))  # and leaves again
        traffic("left-")
        fresh = _worker(ledger_url, clock, 7)
        try:
            for ch in ("email", "push"):
                for engine in (writer, syncing):
                    assert engine.policy(ch).serialize() == fresh.policy(ch).serialize(), ch
        finally:
            fresh.ledger.close()


def test_timestamps_convert_to_the_exact_millisecond_and_back() -> None:
    """``int(datetime.timestamp() * 1000)`` truncates a float product: about a quarter of the
    millisecond instants after 2038 came out 1 ms early, so an offer's ``ends_at`` closed it
    1 ms early and its ``starts_at`` opened it 1 ms early."""
    from datetime import UTC, datetime

    from bandit_engine.clock import iso, to_ms

    assert to_ms("2039-01-15T15:02:07.141Z") == 2_178_716_527_141
    assert to_ms(datetime(2039, 1, 15, 15, 2, 7, 141_000, tzinfo=UTC)) == 2_178_716_527_141
    assert to_ms(datetime(1969, 12, 31, 23, 59, 59, 999_000)) == -1  # naive is UTC
    step = 9_999_991  # ms: 25 000 instants spread over 2026-2033 and beyond
    for ms in range(1_767_225_600_000, 1_767_225_600_000 + 25_000 * step, step):
        assert to_ms(iso(ms)) == ms
    for ms in range(2_200_000_000_000, 2_200_000_000_000 + 25_000 * step, step):  # 2039 on
        assert to_ms(iso(ms)) == ms


@contextmanager
def _racing(engine: Engine, method: str, meanwhile) -> Iterator[list[int]]:  # type: ignore[no-untyped-def]
    """Another writer's catalog write lands between this engine's read of the catalog and its
    own write (``meanwhile`` runs inside the first call of ``engine.ledger.<method>``)."""
    ledger = engine.ledger
    original = getattr(ledger, method)
    calls: list[int] = []

    def racing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            meanwhile()
        return original(*args, **kwargs)

    setattr(ledger, method, racing)
    try:
        yield calls
    finally:
        delattr(ledger, method)


def test_an_offer_update_never_undoes_a_write_it_did_not_see(engine: Engine, clock) -> None:
    """Each catalog change is a read-modify-write; it is written only if the catalog is still
    the version it read, else read again and re-applied. An edit of the cost that read the
    offer before an approved budget landed used to write the old budget back."""
    engine.add_offer(Offer("o", ["email"], cost=1.0, budget=50.0))
    other = Engine(engine.ledger, clock=clock)  # another worker (an approver's request)
    with _racing(engine, "put_offer", lambda: other.update_offer("o", budget=10.0)) as calls:
        engine.update_offer("o", cost=2.0)
    o = engine.get_offer("o")
    assert (o.cost_cents, o.budget_cents) == (200, 1000)
    assert len(calls) == 3  # other's write, this one's refused first try, its retry
    racing_create = lambda: other.add_offer(Offer("d", ["email"], cost=5.0))  # noqa: E731
    with _racing(engine, "put_offer", racing_create), pytest.raises(OfferExists, match="already exists"):
        engine.add_offer(Offer("d", ["email"], cost=1.0), exist_ok=False)  # the racing create won
    assert engine.get_offer("d").cost_cents == 500


def test_a_channel_update_never_undoes_a_write_it_did_not_see(engine: Engine, clock) -> None:
    other = Engine(engine.ledger, clock=clock)
    with _racing(engine, "put_channels", lambda: other.update_channel("email", holdout_fraction=0.2)):
        engine.update_channel("email", exploration_floor=0.05)
    cfg = engine.channel("email")
    assert (cfg.holdout_fraction, cfg.exploration_floor) == (0.2, 0.05)
    with pytest.raises(UnknownChannel):
        engine.update_channel("fax", exploration_floor=0.05)


def test_caps_are_never_set_below_what_is_used_even_by_a_write_that_skips_the_check(engine: Engine) -> None:
    """The engine checks a lowered budget or impression cap against the offer's counters, then
    writes; a choose reserving in between would leave spent + committed above the budget (the
    in-memory ledger accepted it, SQLite and PostgreSQL raised a raw IntegrityError: a 500).
    The ledger's write checks again, in the same transaction."""
    engine.add_offer(Offer("o", ["email"], cost=1.0, budget=10.0, max_impressions=10))
    for m in range(5):
        engine.choose(f"m-{m}", "email")
    before = engine.offer_state("o")
    for lowered in (dict(budget=4.0), dict(max_impressions=4)):
        with pytest.raises(Conflict):
            engine.update_offer("o", **lowered)
        with pytest.raises(Conflict, match="below what is already spent"):  # the ledger's own check
            engine.ledger.put_offer(Offer.from_dict({**engine.get_offer("o").to_dict(), **lowered}))
    assert engine.offer_state("o") == before
    assert (engine.get_offer("o").budget_cents, engine.get_offer("o").max_impressions) == (1000, 10)
    engine.update_offer("o", budget=5.0, max_impressions=5)  # exactly what is used: allowed
    assert engine.choose("m-9", "email").offer_id is None


def test_a_channels_default_offer_stays_an_offer_of_that_channel(engine: Engine) -> None:
    engine.add_offer(Offer("a", ["email", "push"], cost=1.0))
    engine.add_offer(Offer("b", ["push"], cost=1.0))
    engine.set_channel(ChannelConfig("email", default_offer="a"))
    with pytest.raises(Conflict, match="default_offer"):
        engine.update_offer("a", channels=["push"])
    assert engine.get_offer("a").channels == ("email", "push")
    with pytest.raises(InvalidArgument, match="not offered on channel"):
        engine.update_channel("email", default_offer="b")
    engine.update_channel("email", default_offer=None)
    engine.update_offer("a", channels=["push"])


def test_the_memory_ledger_holds_the_stored_caps_not_a_callers_stale_copy(clock) -> None:
    """Two engines on one memory ledger (as workers on one database): the one whose catalog was
    not refreshed yet reserved against the budget and impression cap it had read, past the
    lowered ones (committed 20.00 against a budget of 5.00, 4 impressions against a cap of 1).
    The SQL ledgers' guarded update reads the stored values; the memory ledger does too."""
    from bandit_engine.ledger.memory import MemoryLedger

    ledger = MemoryLedger()
    a, b = Engine(ledger, clock=clock), Engine(ledger, clock=clock)
    for e in (a, b):
        e.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    a.add_offer(Offer("o", ["email"], cost=5, budget=100, max_impressions=100))
    b.offers()  # b reads the catalog: budget 100, cap 100 (and keeps it for a second)
    assert b.choose("m0", "email").offer_id == "o"
    a.update_offer("o", budget=5, max_impressions=1)  # = spent + committed, and impressions
    assert [b.choose(f"m{i}", "email").offer_id for i in range(1, 4)] == [None] * 3
    st = a.offer_state("o")
    assert (st.committed_cents, st.impressions) == (500, 1)


def test_names_that_would_collide_with_the_engines_own_are_refused(engine: Engine, clock) -> None:
    """A string feature is named ``key=value``, so a context key ``a=b`` was the feature
    ``a`` = ``b`` to every family; ``o.seen`` was lin_ts's own history feature ``seen``; an
    offer feature ``offer`` replaced the offer's id in exports. New names are refused; an
    offer stored before (read from the ledger as it is) exports under its own id."""
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    engine.add_offer(Offer("a", ["email"], cost=0.0))
    for key in ("a=b", "o.seen", "member.visits", "channel"):
        with pytest.raises(InvalidArgument, match=f"context key '{key}' is reserved"):
            engine.choose("m", "email", {key: 1})
    for name in ("offer", "kind=x"):
        with pytest.raises(InvalidArgument, match=f"feature name '{name}' is reserved"):
            engine.add_offer(Offer("b", ["email"], cost=0.0, features={name: "v"}))
    assert engine.ledger.count_decisions() == 0 and [o.offer_id for o in engine.offers()] == ["a"]
    old = Offer("spring-10", ["email"], cost=0.0, features={"offer": "discount"})
    engine.ledger.put_offer(old)  # as an earlier version stored it
    engine.update_offer("a", active=False)
    d = engine.choose("m", "email")
    assert d.offer_id == "spring-10"
    buf = io.StringIO()
    engine.reward(d.event_id, 1.0)
    clock.advance(days=60)  # exports hold decisions whose window has closed
    assert engine.export_dsjson(buf) == 1
    assert json.loads(buf.getvalue())["c"]["_multi"][0]["A"]["offer"] == "spring-10"


class _NoRoomLedger(MemoryLedger):
    """A ledger that cannot store a model checkpoint (a value past the database's limit)."""

    def save_snapshot(self, snap: Any) -> None:
        raise StorageError("string or blob too big")


def test_a_checkpoint_that_cannot_be_stored_does_not_fail_the_reward(caplog) -> None:
    """A reward that landed on the checkpoint cadence raised the checkpoint's StorageError (a
    5xx) after the reward was recorded; the checkpoint is an optimization: it is logged."""
    engine = Engine(_NoRoomLedger(), config=EngineConfig(snapshot_every=2))
    engine.set_channel(ChannelConfig("email"))
    engine.add_offer(Offer("a", ["email"], cost=1.0))
    events = [engine.choose(f"m{i}", "email").event_id for i in range(3)]
    with caplog.at_level(logging.ERROR, logger="bandit_engine.engine"):
        outs = [engine.reward(e, 1.0) for e in events]
    assert [o.status for o in outs] == ["recorded"] * 3
    assert engine.policy("email").version == 3
    assert "checkpointing the models failed" in caplog.text
