"""Run policies through the engine against a :class:`~.world.World`, with common random
numbers, and measure them against ground truth.

Every run opens a fresh :class:`~bandit_engine.engine.Engine` on the in-memory ledger with a
:class:`~bandit_engine.clock.ManualClock`: the same ``choose`` / ``reward`` / ``expire`` path,
caps, budgets, pacing and hold-outs as production. For one seed every policy faces the same
arrivals (member, channel, time) and the same uniform draws for redemption and delay, so paired
differences between policies are tight.

Reward is a redemption (1) or not (0). Lift and regret use the *expected* reward of the offers
served (the true probability, known to the simulator), which removes Bernoulli noise from
comparisons; realized redemptions are reported too.
"""

from __future__ import annotations

import heapq
import io
import math
import multiprocessing
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ..catalog import ChannelConfig, MemberCap, PolicySpec
from ..clock import MS_PER_DAY, ManualClock
from ..engine import Engine
from ..errors import InvalidArgument
from ..policies.registry import make_policy
from .oracles import attach, sim_families, solve_budget_duals, static_probabilities
from .scenario import (
    BAYES_BUDGET_ORACLE,
    BAYES_ORACLE,
    BUDGET_ORACLE,
    MAX_DECISIONS,
    ORACLE,
    RANDOM,
    TRUTH_PACED,
    PolicyEntry,
    Scenario,
    _is_int,
)
from .world import World

CURVE_POINTS = 50
# summary columns relative to the reference oracle: None (JSON null, "–" in the table) when it
# earned nothing, for every seed (Comparison.per_run)
UNDEFINED_AS_NONE = ("normalized_lift", "vs_oracle")


@dataclass(frozen=True)
class Arrivals:
    """The common random numbers of one seed: who arrives where and when, and the uniforms
    that decide redemption and delay."""

    member: np.ndarray
    channel: tuple[str, ...]
    time_ms: np.ndarray
    u_reward: np.ndarray
    u_delay: np.ndarray
    u_optout: np.ndarray

    def __len__(self) -> int:
        return len(self.member)


def make_arrivals(scenario: Scenario, world: World, seed: int, n: int) -> Arrivals:
    rng = np.random.default_rng([seed, 0xA77])
    weights = np.array([1.0 + m.context["frequency"] for m in world.members])
    member = rng.choice(len(world.members), size=n, p=weights / weights.sum())
    chans = list(scenario.channels)
    pick = rng.integers(len(chans), size=n)
    pref = rng.random(n) < 0.6
    channel = tuple(
        world.members[m].preferred_channel if pr else chans[c]
        for m, pr, c in zip(member, pref, pick, strict=True)
    )
    span = scenario.days * MS_PER_DAY
    time_ms = scenario.start_ms + np.sort(rng.random(n)) * span
    u_reward, u_delay = rng.random(n), rng.random(n)
    return Arrivals(member, channel, time_ms.astype(np.int64), u_reward, u_delay, rng.random(n))


@dataclass
class RunResult:
    """One policy x seed."""

    policy: str
    seed: int
    spec: dict[str, Any]  # the policy family and params (deterministic: no per-process world key)
    # what the run's engine actually used beyond the spec: the exploration floor applied, budget
    # pacing, the engine-wide member cap, the model group, the provisional reward, ... (MLflow
    # logs them, so two runs that differ only there can be told apart)
    settings: dict[str, Any] = field(default_factory=dict)
    decisions: int = 0
    served: int = 0
    redemptions: int = 0
    expected_reward: float = 0.0
    net_value: float = 0.0
    spend: float = 0.0
    overspend: float = 0.0
    cap_breaches: int = 0
    opt_outs: int = 0
    pacing_error: float | None = None
    budget_used: float | None = None
    holdout: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    curve: dict[str, list[float]] = field(default_factory=dict)
    offer_mix: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    engine: Engine | None = field(default=None, repr=False)
    # file name -> content, what MLflow keeps of the run's engine (``compare(artifacts=True)``)
    artifacts: dict[str, bytes] = field(default_factory=dict, repr=False)
    truth: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.seconds if self.seconds > 0 else float("nan")

    def metrics(self) -> dict[str, float]:
        out = {
            "decisions": float(self.decisions),
            "served": float(self.served),
            "redemptions": float(self.redemptions),
            "expected_reward": self.expected_reward,
            "reward_rate": self.expected_reward / max(1, self.decisions),
            "net_value": self.net_value,
            "spend": self.spend,
            "overspend": self.overspend,
            "cap_breaches": float(self.cap_breaches),
            "opt_outs": float(self.opt_outs),
            "decisions_per_s": self.decisions_per_s,
        }
        if self.pacing_error is not None:
            out["pacing_error"] = self.pacing_error
        if self.budget_used is not None:
            out["budget_used"] = self.budget_used
        out.update({f"holdout_{k}": v for k, v in self.holdout.items()})
        return out


def _welch(a_sum: float, a_n: int, b_sum: float, b_n: int) -> dict[str, float]:
    """Difference of two Bernoulli rates with a 95 % normal interval."""
    if a_n == 0 or b_n == 0:
        return {}
    pa, pb = a_sum / a_n, b_sum / b_n
    se = math.sqrt(pa * (1 - pa) / a_n + pb * (1 - pb) / b_n)
    d = pa - pb
    return {"treatment_rate": pa, "holdout_rate": pb, "lift": d, "lift_lo": d - 1.96 * se, "lift_hi": d + 1.96 * se}


class Simulator:
    """One scenario: a world per seed, references (random, oracles) and the policies to compare."""

    def __init__(self, scenario: Scenario, *, decisions: int | None = None) -> None:
        if decisions is not None and not (_is_int(decisions) and 1 <= decisions <= MAX_DECISIONS):
            # 0 is not "the scenario's"; the bound: see MAX_DECISIONS
            raise InvalidArgument(
                f"decisions must be an integer in [1, {MAX_DECISIONS:_}], got {decisions!r}"
            )
        self.scenario = scenario
        self.decisions = scenario.decisions if decisions is None else decisions
        self._worlds: dict[int, tuple[World, Arrivals]] = {}

    def world(self, seed: int) -> tuple[World, Arrivals]:
        if seed not in self._worlds:
            w = World(self.scenario, seed)
            self._worlds[seed] = (w, make_arrivals(self.scenario, w, seed, self.decisions))
        return self._worlds[seed]

    # policy specs ----------------------------------------------------------------------------
    def offers(self, *, unconstrained: bool = False, paced: bool = True) -> list[Any]:
        s = self.scenario
        return [o.to_offer(s.start_ms, s.days, unconstrained=unconstrained, paced=paced) for o in s.offers]

    def _mean_probs(self, seed: int, *, context: bool = False) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        world, arr = self.world(seed)
        offers = self.offers()
        probs, elig = static_probabilities(world, arr.member, arr.channel, arr.time_ms, offers, context=context)
        return probs, elig, offers

    def spec_for(self, entry: PolicyEntry, seed: int) -> PolicySpec:
        if entry.family is not None:
            return PolicySpec(entry.family, entry.params)
        if entry.baseline == "segment_rules":
            return PolicySpec("segment_rules")
        if entry.baseline == "batch_and_blast":
            return PolicySpec("fixed", {"offers": [entry.offer or self.scenario.offers[0].offer_id]})
        # best fixed offer in hindsight: rank offers by their true mean where eligible
        probs, elig, offers = self._mean_probs(seed)
        mean = np.where(elig, probs, 0.0).sum(0) / np.maximum(1, elig.sum(0))
        order = [offers[j].offer_id for j in np.argsort(-mean)]
        return PolicySpec("fixed", {"offers": order})

    def servable(self, seed: int) -> np.ndarray:
        """Per arrival of ``seed``, whether the engine can serve it an offer: the member
        consents and is not in the channel's hold-out (asked of an engine with the channels a
        run configures, so the hash and salt are the engine's own). A hold-out member or one
        without consent gets the channel default, never an offer, and spends nothing. A member
        who opts out during a run (``optout_rate``) cannot be known beforehand: servable."""
        world, arr = self.world(seed)
        engine = Engine.open("memory://")
        try:
            fraction = self.scenario.holdout_fraction
            for ch in self.scenario.channels:
                engine.set_channel(ChannelConfig(ch, holdout_fraction=fraction))
            held = {
                (m, ch): engine.in_holdout(world.members[m].member_id, ch)
                for m, ch in set(zip(arr.member.tolist(), arr.channel, strict=True))
            }
        finally:
            engine.close()
        return np.array([
            world.members[m].consent and not held[m, ch]
            for m, ch in zip(arr.member.tolist(), arr.channel, strict=True)
        ])  # fmt: skip

    def budget_prices(self, seed: int, *, context: bool = False) -> tuple[dict[str, float], float]:
        """Dual prices of the budgets solved on the true probabilities (``context``: on what the
        members' context tells of them), and the LP's bound, over the arrivals the engine can
        serve an offer to (:meth:`servable`). Solved over every arrival, hold-out and members
        without consent (about 8 % of them) counted as demand they never spend: the prices
        came out too high, and planned on the static probabilities the budgeted offers spent
        5-9 % under their budgets (tight_budget, seeds 1-3)."""
        probs, elig, offers = self._mean_probs(seed, context=context)
        rows = self.servable(seed)
        probs, elig = probs[rows], elig[rows]
        costs = np.array([o.cost_cents / 100 for o in offers])
        budgets = np.array([np.inf if o.budget_cents is None else o.budget_cents / 100 for o in offers])
        lam, bound = solve_budget_duals(probs, elig, costs, budgets)
        return {o.offer_id: float(v) for o, v in zip(offers, lam, strict=True) if v > 0}, bound

    # one run ---------------------------------------------------------------------------------
    def run(self, name: str, spec: PolicySpec, seed: int, **options: Any) -> RunResult:
        """Run one policy for one seed (see :meth:`_run` for the options). ``record_truth`` keeps,
        per served decision, the true probability of every eligible offer."""
        with sim_families():
            return self._run(name, spec, seed, **options)

    def _run(
        self,
        name: str,
        spec: PolicySpec,
        seed: int,
        *,
        unconstrained: bool = False,
        learning: bool = True,
        keep_engine: bool = False,
        artifacts: bool = False,
        record_truth: bool = False,
        paced: bool = True,
        member_cap: MemberCap | None = None,
        model_group: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> RunResult:
        s = self.scenario
        world, arr = self.world(seed)
        world.reset()
        clock = ManualClock(s.start_ms)
        if member_cap is None and not unconstrained:
            member_cap = MemberCap.coerce(s.member_cap)
        engine = Engine.open("memory://", clock=clock, seed=seed, member_cap=member_cap)
        offers = self.offers(unconstrained=unconstrained, paced=paced)
        for o in offers:
            engine.add_offer(o)
        floor = s.exploration_floor if learning else 1e-6
        window_ms = int(s.reward_window_days * MS_PER_DAY)
        provisional = s.provisional_reward
        if provisional is not None and not make_policy(spec, seed=seed).supports_correction:
            provisional = None  # a family that cannot correct learns final rewards only
        for ch in s.channels:
            engine.set_channel(ChannelConfig(
                ch, policy=spec, reward_window_days=s.reward_window_days,
                holdout_fraction=s.holdout_fraction, exploration_floor=floor,
                aggregation=s.aggregation, provisional_reward=provisional, model_group=model_group,
            ))  # fmt: skip
        res = RunResult(name, seed, _spec_dict(spec), {
            "exploration_floor": floor,
            "pacing": "no budgets" if unconstrained or not s.budgeted else "paced" if paced else "hard stop",
            "member_cap": None if member_cap is None else member_cap.to_dict(),
            "model_group": model_group,
            "provisional_reward": provisional,
            "aggregation": s.aggregation,
            "unconstrained": unconstrained,
        })  # fmt: skip
        budgeted = [o for o in offers if o.budget_cents is not None]
        budget_total = sum(o.budget_cents for o in budgeted) / 100 if budgeted else 0.0
        pending: list[tuple[int, str]] = []
        n = len(arr)
        every = max(1, n // CURVE_POINTS)
        curve: dict[str, list[float]] = defaultdict(list)
        mix: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        reasons: dict[str, int] = defaultdict(int)
        pace_err: list[float] = []
        exposures: list[tuple[int, str, int]] = []
        hold_n = hold_conv = treat_n = treat_conv = 0
        next_expire = s.start_ms
        members, channels, times = arr.member, arr.channel, arr.time_ms
        u_reward, u_delay, u_optout = arr.u_reward, arr.u_delay, arr.u_optout
        opted_out = world.opted_out
        margin = {o.offer_id: o.margin for o in s.offers}
        cost = {o.offer_id: o.cost for o in s.offers}
        t0 = time.perf_counter()
        for t in range(n):
            now = int(times[t])
            # deliver due redemptions at their own time (inside their window), then move on
            while pending and pending[0][0] <= now:
                when, eid = heapq.heappop(pending)
                clock.set(max(clock.now_ms(), when))
                engine.reward(eid, 1.0)
            clock.set(now)
            if now >= next_expire:
                engine.expire()
                next_expire = now + MS_PER_DAY // 4
            m = int(members[t])
            mem = world.members[m]
            ch = channels[t]
            world.current = (m, ch, now)
            consent = mem.consent and m not in opted_out
            d = engine.choose(mem.member_id, ch, mem.context, event_id=f"s{seed}-{t}", consent=consent)
            if d.group == "holdout":
                hold_n += 1
                hold_conv += int(u_reward[t] < world.organic_rate)
            elif d.offer_id is None:
                treat_n += 1
                reasons[d.reason or "none"] += 1
            else:
                treat_n += 1
                oid = d.offer_id
                hist = world.history_of(m)
                p = world.expected_reward(m, oid, ch, hist, now)
                if record_truth:
                    res.truth[d.event_id] = np.array(
                        [world.expected_reward(m, e, ch, hist, now) for e in d.eligible]
                    )
                world.expose(m, oid, now)
                exposures.append((m, oid, now))
                if u_optout[t] < world.optout_probability(m, now):
                    opted_out.add(m)
                    res.opt_outs += 1
                res.served += 1
                res.expected_reward += p
                mix[str(mem.context["tier"])][oid] += 1
                if u_reward[t] < p:
                    res.redemptions += 1
                    treat_conv += 1
                    res.net_value += margin[oid] - cost[oid]
                    heapq.heappush(pending, (now + world.delay_ms(u_delay[t], window_ms), d.event_id))
            if (t + 1) % every == 0 or t == n - 1:
                states = engine.ledger.offer_states()
                spent = sum(st.spent_cents for st in states.values()) / 100
                committed = sum(st.committed_cents for st in states.values()) / 100
                curve["step"].append(t + 1)
                curve["expected_reward"].append(res.expected_reward)
                curve["redemptions"].append(res.redemptions)
                curve["net_value"].append(res.net_value)
                curve["spend"].append(spent)
                curve["committed"].append(committed)
                frac = (now - s.start_ms) / (s.days * MS_PER_DAY)
                curve["time_fraction"].append(frac)
                if budgeted:
                    used = sum(states[o.offer_id].spent_cents for o in budgeted) / 100 / budget_total
                    curve["budget_used"].append(used)
                    pace_err.append(abs(used - frac))
                res.cap_breaches += _breaches(offers, states)
                if progress is not None:
                    progress(every if (t + 1) % every == 0 else (t + 1) % every)
        res.seconds = time.perf_counter() - t0
        # close the campaign: deliver the remaining rewards, then let every window close
        while pending:
            when, eid = heapq.heappop(pending)
            clock.set(max(clock.now_ms(), when))
            engine.reward(eid, 1.0)
        clock.set(max(clock.now_ms(), int(times[-1]) + window_ms + 1))
        engine.expire()
        states = engine.ledger.offer_states()
        res.decisions = n
        res.spend = sum(st.spent_cents for st in states.values()) / 100
        res.overspend = sum(
            max(0, states[o.offer_id].spent_cents - o.budget_cents) for o in budgeted  # type: ignore[operator]
        ) / 100
        res.cap_breaches += _breaches(offers, states) + _member_cap_breaches(exposures, offers, member_cap)
        if budgeted:
            res.pacing_error = float(np.mean(pace_err)) if pace_err else 0.0
            res.budget_used = sum(states[o.offer_id].spent_cents for o in budgeted) / 100 / budget_total
        res.holdout = _welch(treat_conv, treat_n, hold_conv, hold_n)
        res.curve = dict(curve)
        res.offer_mix = {k: dict(v) for k, v in mix.items()}
        res.reasons = dict(reasons)
        if artifacts:
            res.artifacts = run_artifacts(engine)
        if keep_engine:
            res.engine = engine
        return res

    # a whole comparison ----------------------------------------------------------------------
    def compare(
        self,
        seeds: Sequence[int] | None = None,
        *,
        progress: Callable[[int], None] | None = None,
        keep_engines: bool = False,
        on_run: Callable[[RunResult], None] | None = None,
        ceiling: bool = False,
        artifacts: bool = False,
        jobs: int = 1,
    ) -> Comparison:
        """Every policy of the scenario on every seed, with the references: random, the oracle
        and, with budgets, the budget-feasible oracle and the paced truth; ``ceiling`` adds
        ``bayes_oracle``, the best a policy seeing only the context could do (unconstrained, as
        the oracle), and with budgets ``bayes_budget_oracle`` (the same, priced by duals solved
        on the context's probabilities, as the budget-feasible oracle). ``artifacts`` keeps what
        MLflow logs of each run's engine (:func:`run_artifacts`).

        ``jobs > 1`` runs seeds in that many processes, each a whole seed (its world, arrivals
        and duals are built once per seed). Runs are deterministic functions of the scenario
        and the seed, so the comparison is the one ``jobs = 1`` gives (only the timings
        differ); ``on_run`` and ``progress`` then hear of a seed's runs when it has finished,
        in seed order. Engines cannot leave their process, so ``keep_engines`` needs
        ``jobs = 1``."""
        seeds = list(dict.fromkeys(seeds or self.scenario.seeds))  # a seed given twice runs once
        bad = [s for s in seeds if not (_is_int(s) and s >= 0)]
        if bad:  # numpy's own ValueError ("expected non-negative integer") named no seed
            raise InvalidArgument(
                f"seeds must be integers >= 0 (the worlds' generators), got {bad}"
            )
        if not (_is_int(jobs) and jobs >= 1):
            raise InvalidArgument(f"jobs must be an integer >= 1, got {jobs!r}")
        runs: list[RunResult] = []
        if jobs == 1 or len(seeds) == 1:
            for seed in seeds:
                runs += self._compare_seed(seed, ceiling, artifacts, keep_engines, progress, on_run)
            return Comparison(self.scenario, runs)
        if keep_engines:
            raise InvalidArgument("keep_engines needs jobs = 1: an engine cannot leave its process")
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        with ProcessPoolExecutor(min(jobs, len(seeds)), mp_context=ctx) as pool:
            futures = [
                pool.submit(_seed_runs, self.scenario, self.decisions, seed, ceiling, artifacts)
                for seed in seeds
            ]
            for f in futures:
                for r in f.result():
                    runs.append(r)
                    if progress is not None:
                        progress(r.decisions)
                    if on_run:
                        on_run(r)
        return Comparison(self.scenario, runs)

    def _compare_seed(
        self,
        seed: int,
        ceiling: bool,
        artifacts: bool,
        keep_engines: bool = False,
        progress: Callable[[int], None] | None = None,
        on_run: Callable[[RunResult], None] | None = None,
    ) -> list[RunResult]:
        """One seed of :meth:`compare`: the references, then the scenario's policies."""
        runs: list[RunResult] = []
        names = [p.name for p in self.scenario.policies]
        world, _ = self.world(seed)
        key = attach(world)
        refs: list[tuple[str, PolicySpec, bool, bool]] = []
        if RANDOM not in names:
            refs.append((RANDOM, PolicySpec("uniform"), False, True))
        refs.append((ORACLE, PolicySpec("sim_oracle", {"world": key}), True, False))
        if ceiling:
            refs.append((BAYES_ORACLE, PolicySpec("sim_bayes_oracle", {"world": key}), True, False))
        if self.scenario.budgeted:
            prices, _ = self.budget_prices(seed)
            refs.append((BUDGET_ORACLE, PolicySpec("sim_oracle", {"world": key, "prices": prices}), False, False))
            refs.append((TRUTH_PACED, PolicySpec("sim_truth_paced", {"world": key}), False, False))
            if ceiling:
                prices, _ = self.budget_prices(seed, context=True)
                spec = PolicySpec("sim_bayes_oracle", {"world": key, "prices": prices})
                refs.append((BAYES_BUDGET_ORACLE, spec, False, False))
        for name, spec, unconstrained, learning in refs:
            r = self.run(name, spec, seed, unconstrained=unconstrained, learning=learning,
                         keep_engine=keep_engines, artifacts=artifacts, progress=progress)  # fmt: skip
            runs.append(r)
            if on_run:
                on_run(r)
        for entry in self.scenario.policies:
            learning = entry.family is not None and entry.family not in ("fixed",)
            cap = MemberCap.coerce(entry.member_cap)
            r = self.run(entry.name, self.spec_for(entry, seed), seed, learning=learning,
                         keep_engine=keep_engines, artifacts=artifacts, progress=progress,
                         paced=entry.pacing, member_cap=cap, model_group=entry.model_group)  # fmt: skip
            runs.append(r)
            if on_run:
                on_run(r)
        return runs

    def total_runs(self, n_seeds: int, *, ceiling: bool = False) -> int:
        names = [p.name for p in self.scenario.policies]
        refs = (RANDOM not in names) + 1 + 2 * self.scenario.budgeted + ceiling * (1 + self.scenario.budgeted)
        return n_seeds * (refs + len(self.scenario.policies))


def _spec_dict(spec: PolicySpec) -> dict[str, Any]:
    """The spec as a run reports it: a simulation family's ``world`` param is the key of a
    world in this process (:func:`~.oracles.attach`), different in every process and run, so
    it is left out (the seed names the world)."""
    d = spec.to_dict()
    if spec.family.startswith("sim_"):
        d["params"] = {k: v for k, v in d["params"].items() if k != "world"}
    return d


def _breaches(offers: Sequence[Any], states: dict[str, Any]) -> int:
    n = 0
    for o in offers:
        st = states[o.offer_id]
        if o.budget_cents is not None and st.spent_cents + st.committed_cents > o.budget_cents:
            n += 1
        if o.max_impressions is not None and st.impressions > o.max_impressions:
            n += 1
    return n


def _member_cap_breaches(exposures: list[tuple[int, str, int]], offers: Sequence[Any],
                         member_cap: MemberCap | None) -> int:  # fmt: skip
    caps = {o.offer_id: o.member_cap for o in offers if o.member_cap is not None}
    if not caps and member_cap is None:
        return 0
    by_member: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for m, oid, t in exposures:
        by_member[m].append((t, oid))
    n = 0
    for items in by_member.values():
        for i, (t, oid) in enumerate(items):
            if member_cap is not None:
                since = t - member_cap.window_ms
                if sum(1 for tt, _ in items[: i + 1] if tt > since) > member_cap.max:
                    n += 1
            cap = caps.get(oid)
            if cap is not None:
                since = t - cap.window_ms
                if sum(1 for tt, o in items[: i + 1] if o == oid and tt > since) > cap.max:
                    n += 1
    return n


def _seed_runs(scenario: Scenario, decisions: int, seed: int, ceiling: bool, artifacts: bool) -> list[RunResult]:
    """One seed of a comparison, in a worker process (``compare(jobs > 1)``)."""
    return Simulator(scenario, decisions=decisions)._compare_seed(seed, ceiling, artifacts)


DSJSON_SAMPLE = 200  # decisions of a run's log kept as its dsjson sample


def run_artifacts(engine: Engine) -> dict[str, bytes]:
    """What MLflow keeps of a run's engine: the first ``DSJSON_SAMPLE`` learnable served
    decisions of its log as dsjson, and each channel's policy snapshot (``policy_<channel>``)."""
    sample = io.StringIO()
    engine.export_dsjson(sample, limit=DSJSON_SAMPLE)
    out = {"decisions_sample.dsjson": sample.getvalue().encode()}
    for ch in engine.channels():
        model = engine.channel(ch).model_key
        if engine.ledger.latest_snapshot(model) is not None or model in engine._policies:
            out[f"policy_{ch}.snapshot"] = engine.policy(ch).serialize()
    return out


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for a single value)."""
    a = np.asarray(values, dtype=float)
    if a.size < 2:
        return float(a.mean()) if a.size else float("nan"), 0.0
    half = float(stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))
    return float(a.mean()), half


@dataclass
class Comparison:
    scenario: Scenario
    runs: list[RunResult]

    def by(self, policy: str) -> list[RunResult]:
        return [r for r in self.runs if r.policy == policy]

    @property
    def reference_oracle(self) -> str:
        return BUDGET_ORACLE if self.scenario.budgeted else ORACLE

    @property
    def reference_ceiling(self) -> str:
        """The ceiling matching :attr:`reference_oracle` (run with ``compare(ceiling=True)``)."""
        return BAYES_BUDGET_ORACLE if self.scenario.budgeted else BAYES_ORACLE

    def per_run(self, r: RunResult) -> dict[str, float]:
        """Metrics of a run relative to the same seed's references. A ratio whose reference is
        0 (an oracle that earned nothing, e.g. no member consents or no offer is live; or
        earned no more than random) is undefined and left out, not a division by zero."""
        seed_runs = {x.policy: x for x in self.runs if x.seed == r.seed}
        out = r.metrics()
        rand = seed_runs.get(RANDOM)
        for ref in (ORACLE, BUDGET_ORACLE):
            o = seed_runs.get(ref)
            if o is None:
                continue
            out[f"regret_{ref}"] = o.expected_reward - r.expected_reward
            if rand is not None and o.expected_reward != rand.expected_reward:
                out[f"lift_{ref}"] = (r.expected_reward - rand.expected_reward) / (
                    o.expected_reward - rand.expected_reward
                )
        ref = seed_runs.get(self.reference_oracle)
        if ref is not None and ref.expected_reward > 0:
            out["vs_oracle"] = r.expected_reward / ref.expected_reward - 1.0
        if f"lift_{self.reference_oracle}" in out:
            out["normalized_lift"] = out[f"lift_{self.reference_oracle}"]
        return out

    def policies(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.runs:
            seen.setdefault(r.policy, None)
        return list(seen)

    def summary(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.policies():
            ms = [self.per_run(r) for r in self.by(name)]
            row: dict[str, Any] = {"policy": name, "seeds": len(ms)}
            for key in ("reward_rate", "normalized_lift", "vs_oracle", "net_value", "spend",
                        "overspend", "cap_breaches", "pacing_error", "opt_outs", "holdout_lift",
                        "decisions_per_s"):  # fmt: skip
                vals = [m[key] for m in ms if key in m]
                if vals:
                    row[key], row[key + "_ci"] = mean_ci(vals)
                elif key in UNDEFINED_AS_NONE:  # the oracle earned nothing: said, not omitted
                    row[key] = row[key + "_ci"] = None
            rows.append(row)
        return rows

    def table(self) -> str:
        """The summary as a Markdown table (mean ± 95 % interval over seeds)."""
        cols = [("reward_rate", "reward/decision", "{:.4f}"), ("normalized_lift", "normalized lift", "{:.3f}"),
                ("vs_oracle", "vs oracle", "{:+.1%}"), ("net_value", "net value", "{:,.0f}"),
                ("spend", "spend", "{:,.0f}"), ("overspend", "overspend", "{:.0f}"),
                ("cap_breaches", "cap breaches", "{:.0f}"), ("pacing_error", "pacing error", "{:.3f}"),
                ("opt_outs", "opt-outs", "{:.0f}"),
                ("holdout_lift", "hold-out lift", "{:+.3f}"), ("decisions_per_s", "decisions/s", "{:,.0f}")]  # fmt: skip
        rows = self.summary()
        cols = [c for c in cols if any(c[0] in r for r in rows)]
        if not self.scenario.world.optout_rate:
            cols = [c for c in cols if c[0] != "opt_outs"]
        head = "| policy | " + " | ".join(c[1] for c in cols) + " |"
        sep = "|---|" + "---:|" * len(cols)
        lines = [head, sep]
        for r in rows:
            cells = []
            for key, _, fmt in cols:
                if r.get(key) is None or (isinstance(r[key], float) and math.isnan(r[key])):
                    cells.append("–")
                    continue
                cell = fmt.format(r[key])
                ci = r.get(key + "_ci", 0.0)
                if ci and key not in ("overspend", "cap_breaches", "decisions_per_s"):
                    cell += " ± " + fmt.format(ci).lstrip("+")
                cells.append(cell)
            lines.append(f"| {r['policy']} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


__all__ = ["Arrivals", "Comparison", "RunResult", "Simulator", "make_arrivals", "mean_ci", "run_artifacts"]
