"""Hypothesis stateful tests: under any interleaving of choose / reward / duplicate reward /
activate / expire / clock jumps, on every ledger backend:

* spent + committed <= budget for every offer, and neither goes negative;
* impressions <= the impression cap;
* per-offer and cross-channel member frequency caps hold over every rolling window;
* a reward is counted once (spent equals the sum of booked costs; one feedback per event);
* every logged probability is in (0, 1] and each pmf sums to 1 over the eligible offers.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import defaultdict

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bandit_engine import (
    ChannelConfig,
    CostAboveReservation,
    Engine,
    ManualClock,
    MemberCap,
    Offer,
    RewardWindowClosed,
)
from bandit_engine.clock import MS_PER_DAY

MEMBERS = [f"m{i}" for i in range(4)]
CHANNELS = ["email", "push"]


def make_machine(url_factory, max_examples: int, steps: int):
    class LedgerMachine(RuleBasedStateMachine):
        @initialize()
        def setup(self) -> None:
            self.clock = ManualClock(start_ms=1_767_225_600_000)
            self.engine = Engine.open(
                url_factory(), clock=self.clock, seed=1,
                member_cap=MemberCap(max=4, window_days=2),
            )  # fmt: skip
            for ch in CHANNELS:  # push sums its rewards: it settles a redemption at the close
                self.engine.set_channel(ChannelConfig(
                    ch, reward_window_days=1.0, aggregation="sum" if ch == "push" else "first"))
            self.offers = [
                Offer("cheap", CHANNELS, cost=1.00, budget=5.00),
                Offer("dear", CHANNELS, cost=4.00, budget=9.00, max_impressions=6),
                Offer("freq", CHANNELS, cost=0.50, member_cap=MemberCap(max=1, window_days=1)),
                Offer("free", ["push"], cost=0.0, max_impressions=5),
            ]
            for o in self.offers:
                self.engine.add_offer(o)
            self.events: list[str] = []
            self.booked: dict[str, int] = defaultdict(int)
            self.rewarded: set[str] = set()

        def teardown(self) -> None:
            if hasattr(self, "engine"):
                self.engine.ledger.close()

        @rule(member=st.sampled_from(MEMBERS), channel=st.sampled_from(CHANNELS), active=st.booleans())
        def choose(self, member: str, channel: str, active: bool) -> None:
            # deterministic event ids: the engine's sampling is seeded from them
            self.n = getattr(self, "n", 0) + 1
            d = self.engine.choose(member, channel, {"tier": "gold"}, active=active, event_id=f"e{self.n}")
            if d.offer_id is not None:
                assert 0 < d.probability <= 1
                assert abs(sum(d.pmf) - 1) < 1e-9 and min(d.pmf) > 0
                assert set(d.eligible) <= {o.offer_id for o in self.offers}
                self.events.append(d.event_id)
            else:
                assert d.reason

        @precondition(lambda self: self.events)
        @rule(data=st.data(), value=st.sampled_from([0.0, 1.0, 2.5]), frac=st.sampled_from([None, 0.0, 0.5, 1.0, 2.0]))
        def reward(self, data, value: float, frac) -> None:
            eid = data.draw(st.sampled_from(self.events))
            d = self.engine.get_decision(eid)
            offer = self.engine.get_offer(d.offer_id)
            cost = None if frac is None else round(offer.cost_cents * frac) / 100
            try:
                out = self.engine.reward(eid, value, cost)
            except (RewardWindowClosed, CostAboveReservation):
                assert self.engine.get_decision(eid).reward_count == d.reward_count
                return
            if out.status == "recorded":
                assert eid not in self.rewarded
                self.rewarded.add(eid)
                self.booked[d.offer_id] += out.spent_cents
            else:
                assert eid in self.rewarded

        @precondition(lambda self: self.events)
        @rule(data=st.data())
        def activate(self, data) -> None:
            eid = data.draw(st.sampled_from(self.events))
            with contextlib.suppress(RewardWindowClosed):  # settled events cannot be activated
                assert self.engine.activate(eid).active

        @rule(hours=st.sampled_from([1, 6, 13, 25, 49]))
        def advance(self, hours: int) -> None:
            self.clock.advance(seconds=hours * 3600)

        @rule()
        def expire(self) -> None:
            self.engine.expire()

        @invariant()
        def caps_hold(self) -> None:
            if not hasattr(self, "engine"):
                return
            states = self.engine.ledger.offer_states()
            for o in self.offers:
                s = states[o.offer_id]
                assert s.spent_cents >= 0 and s.committed_cents >= 0
                if o.budget_cents is not None:
                    assert s.spent_cents + s.committed_cents <= o.budget_cents
                if o.max_impressions is not None:
                    assert s.impressions <= o.max_impressions
                assert s.spent_cents == self.booked[o.offer_id]
                # every reservation ever made is held or settled (pacing's rate divides by it)
                assert s.settled_cents + s.committed_cents == s.impressions * o.cost_cents

        @invariant()
        def member_caps_hold(self) -> None:
            if not hasattr(self, "engine"):
                return
            for m in MEMBERS:
                hist = self.engine.ledger.member_history(m, 0)
                times = [h.issued_at for h in hist]
                freq = [h.issued_at for h in hist if h.offer_id == "freq"]
                for t in times:  # every window ending at an exposure
                    assert sum(1 for u in times if t - 2 * MS_PER_DAY < u <= t) <= 4
                for t in freq:
                    assert sum(1 for u in freq if t - MS_PER_DAY < u <= t) <= 1

        @invariant()
        def one_feedback_per_event(self) -> None:
            if not hasattr(self, "engine"):
                return
            fb = self.engine.ledger.feedback_after(0)
            ids = [f.event_id for f in fb]
            assert len(ids) == len(set(ids))

    LedgerMachine.TestCase.settings = settings(
        max_examples=max_examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )  # fmt: skip
    return LedgerMachine


def test_invariants_memory_ledger() -> None:
    make_machine(lambda: "memory://", 60, 40).TestCase().runTest()


def test_invariants_sqlite_ledger(tmp_path) -> None:
    make_machine(lambda: f"sqlite:///{tmp_path / uuid.uuid4().hex}.db", 15, 30).TestCase().runTest()


@pytest.mark.postgres
def test_invariants_postgres_ledger(postgres_url) -> None:
    # every example reuses the schema: start each from empty tables
    import sqlalchemy as sa

    def fresh() -> str:
        eng = sa.create_engine(postgres_url)
        with eng.begin() as c:
            c.execute(sa.text(
                "DO $$ DECLARE r record; BEGIN FOR r IN SELECT tablename FROM pg_tables "
                "WHERE schemaname = current_schema() LOOP EXECUTE 'DROP TABLE IF EXISTS ' "
                "|| quote_ident(r.tablename) || ' CASCADE'; END LOOP; END $$;"
            ))  # fmt: skip
        eng.dispose()
        return postgres_url

    make_machine(fresh, 8, 25).TestCase().runTest()


OPS = st.lists(  # weighted so that most examples learn from a dozen or more feedback events
    st.tuples(
        st.sampled_from(["choose", "choose", "choose", "reward", "reward", "expire", "advance", "sync"]),
        st.integers(0, 9),
        st.sampled_from([0.0, 1.0]),
    ),
    min_size=12,
    max_size=60,
)


@pytest.mark.parametrize("family", ["thompson", "lin_ts", "vw", "shared_ts"])
def test_replay_from_the_log_reproduces_the_policy(family: str) -> None:
    """Any interleaving of choose / reward / expire / clock jumps: an engine reopened on the same
    log (latest snapshot + replayed tail) holds the same model as the one that never stopped, and
    so does a serving worker that synced from the log at any points, in chunks of any size."""
    from hypothesis import given

    from bandit_engine import EngineConfig, PolicySpec

    from .test_engine import probe

    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=OPS, chunk=st.integers(1, 6))
    def run(ops, chunk: int) -> None:
        clock = ManualClock(start_ms=1_767_225_600_000)
        live = Engine.open("memory://", clock=clock, seed=3, snapshot_every=5)
        live.set_channel(ChannelConfig("email", reward_window_days=1.0, policy=PolicySpec(family)))
        for i in range(4):
            live.add_offer(Offer(f"offer-{i}", ["email"], cost=1.0, features={"category": f"c{i % 2}"}))
        worker = Engine(live.ledger, clock=clock, config=EngineConfig(seed=3, learn_in_process=False))
        worker.policy("email")  # loaded now, so everything later arrives through sync's chunks
        events: list[str] = []
        for n, (op, k, value) in enumerate(ops):
            if op == "choose":
                d = live.choose(f"m{k}", "email", {"tier": f"t{k % 3}"}, event_id=f"e{n}")
                events.append(d.event_id)
            elif op == "reward" and events:
                with contextlib.suppress(RewardWindowClosed):
                    live.reward(events[k % len(events)], value)
            elif op == "expire":
                live.expire()
            elif op == "advance":
                clock.advance(seconds=3600 * (k + 1) * 3)
            elif op == "sync":
                worker.sync(chunk=chunk)
        reopened = Engine(live.ledger, clock=clock, config=live.config)
        assert reopened.policy("email").version == live.policy("email").version
        assert probe(reopened) == probe(live)
        worker.sync(chunk=chunk)
        assert worker.policy("email").version == live.policy("email").version
        assert probe(worker) == probe(live)

    run()
