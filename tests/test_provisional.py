"""Provisional learning (``ChannelConfig.provisional_reward``) on every ledger backend.

A served, active treatment decision is learned when it is made, with the provisional reward;
its settlement is logged as a correction and learned as (final - provisional). Once every
window has closed the model must equal the one learned from the final rewards alone, and a
worker that only replays the database log must hold the same model as the writer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bandit_engine import ChannelConfig, Engine, InvalidArgument, ManualClock, PolicySpec
from bandit_engine.clock import MS_PER_DAY
from bandit_engine.engine import EngineConfig
from bandit_engine.ledger.records import Feedback
from bandit_engine.ledger.sql import SqlLedger
from bandit_engine.policies.base import Policy, Scoring
from bandit_engine.policies.registry import make_policy

from .conftest import catalog
from .test_policy_contract import _model

FAMILIES = ["thompson", "lin_ts", "shared_ts"]
PARAMS: dict[str, dict[str, Any]] = {"lin_ts": {"dim": 16}, "thompson": {"segment_by": ["tier"]}}
HOUR = 3_600_000


def channel(family: str, provisional: float | None = 0.0, **kw: Any) -> ChannelConfig:
    return ChannelConfig(
        "email", policy=PolicySpec(family, PARAMS.get(family, {})), reward_window_days=1.0,
        provisional_reward=provisional, **kw,
    )  # fmt: skip


def open_engine(url: str, clock: ManualClock, cfg: ChannelConfig, **config: Any) -> Engine:
    e = Engine.open(url, clock=clock, seed=3, **config)
    e.set_channel(cfg)
    for o in catalog(4):
        e.add_offer(o)
    return e


def reference(e: Engine, name: str = "email") -> Policy:
    """What an engine without provisional learning learns from the same decisions and rewards:
    each settled, learnable decision learned once, with its final reward, in settlement order."""
    cfg = e.channel(name)
    pol = make_policy(cfg.policy, seed=e.config.seed)
    fbs = [f for f in e.ledger.feedback_after(0, 100_000) if f.channel == name]
    decisions = e.ledger.decisions_by_event(f.event_id for f in fbs)
    for f in fbs:
        if not f.learn or f.kind == "provisional":
            continue
        d = decisions[f.event_id]
        offers = tuple(e.get_offer(i) for i in d.eligible)
        oc = tuple(d.offer_context.get(i, {}) for i in d.eligible) if pol.uses_offer_context else ()
        s = Scoring(d.member_id, d.context, offers, oc)
        pol.learn(s, d.eligible.index(d.offer_id), d.probability, f.reward)
    return pol


def assert_same_model(a: Policy, b: Policy) -> None:
    ma, mb = _model(a), _model(b)
    assert ma.keys() == mb.keys() and ma
    for key in ma:
        if ma[key].dtype.kind in "US":
            np.testing.assert_array_equal(ma[key], mb[key])
        else:
            np.testing.assert_allclose(mb[key], ma[key], rtol=1e-9, atol=1e-9, err_msg=key)


def stream(e: Engine, clock: ManualClock, start_ms: int, n: int = 60) -> dict[str, int]:
    """``n`` decisions an hour apart: some rewarded within their window (after 1..20 hours),
    some never (they expire), some made inactive and activated later, some inactive for good.
    Checks that each choose learns at once exactly when it should. Returns counts."""
    pol = e.policy("email")
    pending: list[tuple[int, str, float]] = []
    counts = {"provisional": 0, "not_provisional": 0}
    for i in range(n):
        now = start_ms + i * HOUR
        for due, eid, value in sorted(p for p in pending if p[0] <= now):
            clock.set(due)
            e.reward(eid, value)
        pending = [p for p in pending if p[0] > now]
        clock.set(now)
        e.expire()
        active = i % 7 != 3 and i % 11 != 5
        before = pol.version
        d = e.choose(f"m{i % 9}", "email", {"tier": ["gold", "silver"][i % 2], "x": float(i % 4)},
                     event_id=f"ev-{i}", active=active)  # fmt: skip
        assert d.offer_id is not None
        learned_now = active and e.channel("email").provisional_reward is not None
        assert d.provisional == (e.channel("email").provisional_reward if learned_now else None)
        assert pol.version == before + (1 if learned_now else 0), i
        counts["provisional" if learned_now else "not_provisional"] += 1
        if i % 7 == 3:
            e.activate(d.event_id)  # activated later: learned at settlement only
        if i % 3 != 0:
            pending.append((now + (1 + (i * 7) % 20) * HOUR, d.event_id, [1.0, 0.5, 0.0][i % 3]))
    for due, eid, value in sorted(pending):
        clock.set(due)
        e.reward(eid, value)
    clock.set(start_ms + (n + 30) * HOUR)  # every window has closed
    e.expire()
    return counts


@pytest.mark.parametrize("family", FAMILIES)
def test_provisional_learning_ends_at_the_final_rewards_model(ledger_url, clock, family) -> None:
    e = open_engine(ledger_url, clock, channel(family))
    try:
        counts = stream(e, clock, clock.now_ms())
        log = e.ledger.feedback_after(0, 100_000)
        kinds = [f.kind for f in log]
        assert kinds.count("provisional") == counts["provisional"] > 0
        assert kinds.count("correction") == counts["provisional"]
        assert kinds.count("final") == counts["not_provisional"]
        for f in log:  # a correction carries the final reward and follows its provisional event
            if f.kind == "correction":
                prov = [g for g in log if g.event_id == f.event_id and g.kind == "provisional"]
                assert len(prov) == 1 and prov[0].seq < f.seq
        assert all(e.get_decision(f.event_id).provisional == 0.0 for f in log if f.kind != "final")
        live = e.policy("email")
        ref = reference(e)
        assert_same_model(ref, live)
        assert live.version > ref.version  # provisional events and nonzero corrections count
        # a fresh engine replaying the whole log from scratch gets the same bytes
        if ledger_url == "memory://":
            replayed = Engine(e.ledger, clock=clock, config=e.config)
        else:
            replayed = Engine.open(ledger_url, clock=clock, seed=3)
        try:
            assert replayed.ledger.latest_snapshot("email") is None
            assert replayed.policy("email").serialize() == live.serialize()
        finally:
            if replayed.ledger is not e.ledger:
                replayed.ledger.close()
    finally:
        e.ledger.close()


def test_the_comparison_can_fail_without_corrections(clock) -> None:
    """The same stream with corrections dropped from the log does not match the reference."""
    e = open_engine("memory://", clock, channel("thompson"))
    stream(e, clock, clock.now_ms())
    skipping = make_policy(e.channel("email").policy, seed=3)
    fbs = e.ledger.feedback_after(0, 100_000)
    decisions = e.ledger.decisions_by_event(f.event_id for f in fbs)
    for f in fbs:
        if f.learn and f.kind != "correction":
            e._learn_one(skipping, decisions[f.event_id], f)
    with pytest.raises(AssertionError):
        assert_same_model(reference(e), skipping)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reward_corrects_the_provisional_value(ledger_url, clock, family) -> None:
    e = open_engine(ledger_url, clock, channel(family))
    try:
        pol = e.policy("email")
        v0, m0 = pol.version, _model(pol)
        d = e.choose("m-1", "email", {"tier": "gold"})
        assert pol.version == v0 + 1 and d.provisional == 0.0
        m1 = _model(pol)
        assert m1.keys() != m0.keys() or any(not np.array_equal(m0[k], m1[k]) for k in m0)
        assert e.get_decision(d.event_id).provisional == 0.0  # stored with the decision
        out = e.reward(d.event_id, 1.0)
        assert out.feedback is not None and out.feedback.kind == "correction"
        assert out.feedback.reward == 1.0
        assert pol.version == v0 + 2
        assert_same_model(reference(e), pol)
        assert any(not np.allclose(m1[k], _model(pol)[k]) for k in m1 if k != "names")
        # a zero correction is skipped (no version) but the log position advances
        d2 = e.choose("m-2", "email", {"tier": "gold"})
        fb = e.reward(d2.event_id, 0.0).feedback
        assert pol.version == v0 + 3
        assert e._policies["email"].applied_seq == fb.seq
    finally:
        e.ledger.close()


@pytest.mark.parametrize("family", ["thompson", "shared_ts"])
def test_a_syncing_worker_holds_the_same_model(ledger_url, clock, family) -> None:
    if ledger_url == "memory://":
        pytest.skip("two engines share a database, not a process's memory")
    writer = open_engine(ledger_url, clock, channel(family))
    reader = Engine(SqlLedger(ledger_url), clock=clock,
                    config=EngineConfig(seed=3, learn_in_process=False))  # fmt: skip
    try:
        reader.sync()
        start = clock.now_ms()
        for i in range(20):  # mid-stream: provisional events learned, corrections still due
            clock.set(start + i * HOUR)
            writer.choose(f"m{i}", "email", {"tier": "gold"}, event_id=f"a{i}")
            if i % 2:
                writer.reward(f"a{i - 1}", 1.0)
        assert reader.sync() > 0
        assert reader.policy("email").version == writer.policy("email").version
        assert reader.policy("email").serialize() == writer.policy("email").serialize()
        stream(writer, clock, start + 30 * HOUR, n=40)
        reader.sync()
        assert reader.policy("email").version == writer.policy("email").version
        assert reader.policy("email").serialize() == writer.policy("email").serialize()
        assert_same_model(reference(writer), reader.policy("email"))
        assert reader.sync() == 0
    finally:
        writer.ledger.close()
        reader.ledger.close()


def test_sum_aggregation_corrects_at_window_close(ledger_url, clock) -> None:
    e = open_engine(ledger_url, clock, channel("thompson", aggregation="sum"))
    try:
        pol = e.policy("email")
        d = e.choose("m-1", "email", {"tier": "gold"})
        assert pol.posterior(d.offer_id, {"tier": "gold"}) == (1.0, 2.0)
        assert e.reward(d.event_id, 0.25, reward_id="r1").feedback is None
        assert e.reward(d.event_id, 0.5, reward_id="r2").feedback is None
        clock.set(clock.now_ms() + 2 * MS_PER_DAY)
        e.expire()
        last = e.ledger.feedback_after(0)[-1]
        assert (last.kind, last.reward) == ("correction", 0.75)
        assert pol.posterior(d.offer_id, {"tier": "gold"}) == pytest.approx((1.75, 1.25))
    finally:
        e.ledger.close()


def test_holdout_no_consent_and_inactive_decisions_are_not_learned_provisionally(ledger_url, clock) -> None:
    e = open_engine(ledger_url, clock, channel("thompson", holdout_fraction=0.5))
    try:
        pol = e.policy("email")
        seen = set()
        for i in range(30):
            v = pol.version
            d = e.choose(f"m{i}", "email", {"tier": "gold"}, active=i % 3 != 0, consent=i % 5 != 0)
            learned = d.group == "treatment" and d.active and i % 5 != 0
            assert (d.provisional is not None) == learned
            assert pol.version == v + learned
            seen.add((d.group, d.active, learned))
        assert {g for g, _, _ in seen} == {"holdout", "treatment"}
        assert any(not a for _, a, _ in seen)
        assert all(f.kind == "provisional" for f in e.ledger.feedback_after(0))
    finally:
        e.ledger.close()


def test_changing_the_setting_later_corrects_from_the_value_actually_learned(ledger_url, clock) -> None:
    e = open_engine(ledger_url, clock, channel("thompson", provisional=0.0))
    try:
        pol = e.policy("email")
        d1 = e.choose("m-1", "email", {"tier": "gold"})
        e.set_channel(channel("thompson", provisional=0.2))
        d2 = e.choose("m-2", "email", {"tier": "gold"})
        e.set_channel(channel("thompson", provisional=None))
        d3 = e.choose("m-3", "email", {"tier": "gold"})
        assert (d1.provisional, d2.provisional, d3.provisional) == (0.0, 0.2, None)
        assert e.policy("email") is pol  # provisional_reward is not part of the policy spec
        for d in (d1, d2, d3):
            e.reward(d.event_id, 1.0)
        kinds = [f.kind for f in e.ledger.feedback_after(0)]
        assert kinds == ["provisional", "provisional", "correction", "correction", "final"]
        assert_same_model(reference(e), pol)
    finally:
        e.ledger.close()


def test_a_family_that_cannot_correct_is_rejected(clock) -> None:
    e = open_engine("memory://", clock, channel("thompson", provisional=None))
    with pytest.raises(InvalidArgument, match=r"provisional_reward needs a policy family .*'vw'"):
        e.set_channel(ChannelConfig("email", policy=PolicySpec("vw"), provisional_reward=0.0))
    assert e.channel("email").policy.family == "thompson"
    e.set_channel(ChannelConfig("email", policy=PolicySpec("vw")))  # without it: fine


def test_a_log_with_provisional_events_replays_into_a_family_that_cannot_correct(clock) -> None:
    """Switching a provisionally learning channel to vw: vw skips the provisional events and
    learns the corrections as final rewards (what it would have learned without them)."""
    e = open_engine("memory://", clock, channel("thompson"))
    stream(e, clock, clock.now_ms(), n=20)
    e.set_channel(ChannelConfig("email", policy=PolicySpec("vw"), reward_window_days=1.0))
    pol = e.policy("email")
    settled = [f for f in e.ledger.feedback_after(0) if f.learn and f.kind != "provisional"]
    assert pol.version == len(settled) > 0


@pytest.mark.parametrize(
    "value,message",
    [(float("nan"), "provisional_reward must be a finite number"),
     (True, "provisional_reward must be a finite number"),
     ("0", "provisional_reward must be a finite number")],
)  # fmt: skip
def test_channel_setting_is_validated_and_round_trips(value, message) -> None:
    with pytest.raises(InvalidArgument, match=message):
        ChannelConfig("email", provisional_reward=value)
    cfg = ChannelConfig("email", provisional_reward=0)
    assert cfg.provisional_reward == 0.0 and isinstance(cfg.provisional_reward, float)
    assert ChannelConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in cfg.to_dict().items() if k != "provisional_reward"}
    assert ChannelConfig.from_dict(old).provisional_reward is None  # stored before the field


def test_feedback_records_default_to_final() -> None:
    assert Feedback(1, "e", "email", 1.0, True).kind == "final"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_adds_the_kind_column_to_an_existing_database(backend, tmp_path, request) -> None:
    from sqlalchemy import text

    from bandit_engine.ledger.migrate import current_revision, head_revision, upgrade_schema
    from bandit_engine.ledger.sql import SqlLedger, make_engine

    url = (
        f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )  # fmt: skip
    old = make_engine(url)
    try:  # disposed even when an assertion fails: a leaked connection warns in a later test
        upgrade_schema(old, "0002")
        assert current_revision(old) == "0002"
        with old.begin() as c:
            cols = [r[0] for r in c.execute(text(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_name = 'feedback' AND table_schema = current_schema()"
                if backend == "postgres" else "SELECT name FROM pragma_table_info('feedback')"
            ))]  # fmt: skip
            assert "kind" not in cols
            c.execute(text("INSERT INTO feedback (event_id, channel, reward, learn) "
                           "VALUES ('old-1', 'email', 1.0, false)"))  # fmt: skip
    finally:
        old.dispose()
    ledger = SqlLedger(url)  # opening upgrades the schema
    try:
        assert current_revision(ledger.engine) == head_revision() != "0002"  # 0003 and later
        assert ledger.feedback_after(0) == [Feedback(1, "old-1", "email", 1.0, False, "final")]
        clock = ManualClock(1_767_225_600_000)
        e = Engine(ledger, clock=clock)
        e.set_channel(channel("thompson"))
        for o in catalog(2):
            e.add_offer(o)
        d = e.choose("m-1", "email", {"tier": "gold"})
        e.reward(d.event_id, 1.0)
        assert [f.kind for f in ledger.feedback_after(1)] == ["provisional", "correction"]
    finally:
        ledger.close()


def test_http_channel_put_sets_provisional_reward(tmp_path) -> None:
    from .api_fixtures import make_api, seed

    api = make_api(tmp_path)
    try:
        seed(api)
        r = api.call("PUT", "/v1/channels/email", "admin", json={"provisional_reward": 0.0})
        assert r.status_code == 200, r.json
        assert r.json["provisional_reward"] == 0.0
        listed = api.call("GET", "/v1/channels", "admin").json["channels"]
        assert {c["name"]: c for c in listed}["email"]["provisional_reward"] == 0.0
        r = api.call("POST", "/v1/choose", "decide", json={"member_id": "m-9", "channel": "email"})
        assert r.status_code == 200
        assert api.engine.get_decision(r.json["event_id"]).provisional == 0.0
        r = api.call("PUT", "/v1/channels/email", "admin",
                     json={"policy": {"family": "vw", "params": {}}})  # fmt: skip
        assert r.status_code == 422 and "provisional_reward" in r.json["error"]["message"], r.json
        r = api.call("PUT", "/v1/channels/email", "admin", json={"provisional_reward": "zero"})
        assert r.status_code == 422, r.json
    finally:
        api.engine.ledger.close()


def test_simulation_scenarios_pass_provisional_reward_to_families_that_can_correct() -> None:
    from bandit_engine.catalog import PolicySpec as Spec
    from bandit_engine.simulation.runner import Simulator
    from bandit_engine.simulation.scenario import Scenario

    scenario = Scenario.default().with_(provisional_reward=0.0)
    sim = Simulator(scenario, decisions=200)
    for family, expected in (("thompson", 0.0), ("vw", None)):
        r = sim.run(family, Spec(family), 1, keep_engine=True)
        channels = r.engine.channels()
        assert {channels[c].provisional_reward for c in scenario.channels} == {expected}, family
        kinds = {f.kind for f in r.engine.ledger.feedback_after(0, 100_000)}
        assert ("provisional" in kinds) == (expected is not None), family
    with pytest.raises(InvalidArgument, match="provisional_reward must be a number"):
        Scenario.default().with_(provisional_reward="0")
