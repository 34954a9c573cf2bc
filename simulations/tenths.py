"""Normalized lift by tenth of the run, per seed: where in a campaign a policy gains or loses.

    python simulations/tenths.py simulations/default.toml shared_ts,lin_ts 1,2,3 [overrides]

    overrides, e.g.: world.fatigue=0 shared_ts.exploration_scale=1 decisions=5000

Runs the scenario's references (random, the oracle, and for a budgeted scenario the
budget-feasible oracle) and the listed policies on each seed through :class:`Simulator`, then
prints, per policy and seed, the lift of each tenth of the decisions,
``(policy - random) / (oracle - random)`` over that tenth's expected reward, and the whole run's.
The reference is the budget-feasible oracle when the scenario has budgets. The last rows are
the ceiling of any policy that sees only the context: ``bayes_oracle``, greedy on what the
member's context tells of the truth (``bayes_budget_oracle`` with budgets: the same, priced by
duals solved on those probabilities). Overrides (values are JSON): ``world.<field>`` changes
the simulated world, ``<policy>.<param>`` one policy's parameter, and a bare ``<field>`` the
scenario (``decisions``, ``days``, ...). Nothing is logged to MLflow. A tenth in which the
oracle earned exactly what random did (a very short run) has no lift: it prints as ``-``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence

import numpy as np

from bandit_engine.errors import InvalidArgument
from bandit_engine.simulation.runner import RANDOM, RunResult, Simulator
from bandit_engine.simulation.scenario import Scenario


def apply_overrides(sc: Scenario, overrides: Sequence[str]) -> Scenario:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"override {item!r} is not key=value")
        try:
            value = json.loads(raw)
        except ValueError:
            raise SystemExit(f"override {item!r}: the value must be JSON (a string needs quotes)") from None
        owner, dot, name = key.partition(".")
        if not dot:
            sc = sc.with_(**{owner: value})
        elif owner == "world":
            sc = dataclasses.replace(sc, world=dataclasses.replace(sc.world, **{name: value}))
        elif owner in {e.name for e in sc.policies}:
            sc = dataclasses.replace(sc, policies=tuple(
                dataclasses.replace(e, params={**e.params, name: value}) if e.name == owner else e
                for e in sc.policies
            ))  # fmt: skip
        else:
            raise SystemExit(f"override {item!r}: no policy or section {owner!r}")
    return sc


def _tenths(run: RunResult) -> np.ndarray:
    """Expected reward earned in each tenth of the run's decisions."""
    steps = np.asarray(run.curve["step"], dtype=float)
    cum = np.asarray(run.curve["expected_reward"], dtype=float)
    edges = np.linspace(0, steps[-1], 11)[1:]
    return np.diff(np.concatenate([[0.0], np.interp(edges, steps, cum)]))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where the oracle earned what random did (no lift to speak of)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _fmt(x: float, spec: str) -> str:
    return "-" if np.isnan(x) else format(x, spec)


def lift_by_tenth(sc: Scenario, seeds: Sequence[int]) -> dict[tuple[str, int], tuple[np.ndarray, float]]:
    """(policy, seed) -> (lift of each tenth, lift of the whole run): the scenario's policies,
    then the ceiling, in that order."""
    comp = Simulator(sc).compare(seeds, ceiling=True)
    by = {(r.policy, r.seed): r for r in comp.runs}
    out = {}
    for name in [*(e.name for e in sc.policies), comp.reference_ceiling]:
        for seed in seeds:
            p, o, rnd = by[(name, seed)], by[(comp.reference_oracle, seed)], by[(RANDOM, seed)]
            tr = _tenths(rnd)
            lift = _ratio(_tenths(p) - tr, _tenths(o) - tr)
            total = _ratio(np.array([p.expected_reward - rnd.expected_reward]),
                           np.array([o.expected_reward - rnd.expected_reward]))[0]  # fmt: skip
            out[(name, seed)] = (lift, float(total))
    return out


def main(argv: Sequence[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    try:
        path, policies, seeds = argv[0], argv[1].split(","), list(dict.fromkeys(int(s) for s in argv[2].split(",")))
        sc = apply_overrides(Scenario.load(path).select_policies(policies), argv[3:])
    except (InvalidArgument, OSError, TypeError, ValueError) as exc:  # a bad argument or override
        raise SystemExit(f"error: {exc}") from None
    try:
        results = lift_by_tenth(sc, seeds)
    except InvalidArgument as exc:  # e.g. a policy parameter's typo: found when the run builds the policy
        raise SystemExit(f"error: {exc}") from None
    for name in dict.fromkeys(name for name, _ in results):
        totals = []
        for seed in seeds:
            lift, total = results[(name, seed)]
            totals.append(total)
            print(f"{name} seed {seed}: " + " ".join(_fmt(x, ".2f") for x in lift) + f"  total {_fmt(total, '.3f')}")
        print(f"{name} mean {_fmt(float(np.mean(totals)), '.3f')}")


if __name__ == "__main__":
    main(sys.argv[1:])
