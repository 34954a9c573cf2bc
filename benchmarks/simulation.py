"""Simulation benchmark: quality against the oracles and peers, and simulator throughput.

    python -m benchmarks --only simulation [--quick]

* default scenario (20 000 decisions, 3 seeds; quick: 3 000, 1 seed): our policies against
  mabwiser LinTS and VW with default settings (``--cb_explore_adf``, epsilon 0.05, no
  interactions), side by side in one run, every one through the same engine path, caps and
  world. Target: our best >= 0.90 normalized lift and ahead of both peers.
* tight-budget scenario: our best vs the budget-feasible oracle. Target: <= 3 % behind, 0
  overspend. ``truth_paced`` (the true probabilities priced by the engine's pacing) separates
  the pacing gap from the learning gap.
* both report the ceiling of a policy that sees only the context (``bayes_oracle``,
  ``bayes_budget_oracle``: ``Simulator.compare(ceiling=True)``) next to the target.
* throughput: Thompson sampling through the engine path (in-memory ledger, manual clock),
  simulator included. Target: >= 100 000 decisions per minute per core.

Peers are benchmark-only dependencies (the ``bench`` extra); the package never imports them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bandit_engine.catalog import PolicySpec
from bandit_engine.features import squash
from bandit_engine.policies.base import Policy, Scoring
from bandit_engine.policies.registry import families, register
from bandit_engine.simulation import Scenario, Simulator
from bandit_engine.simulation.runner import BAYES_BUDGET_ORACLE, BAYES_ORACLE
from bandit_engine.simulation.scenario import PolicyEntry
from bandit_engine.simulation.world import LIFECYCLES, TIERS

ROOT = Path(__file__).resolve().parents[1]
OURS = ("thompson", "thompson_segmented", "lin_ts", "shared_ts", "vw")
PEERS = ("mabwiser_lints", "vw_default")


class MabwiserLinTS(Policy):
    """Peer: mabwiser 2.7.4 ``LearningPolicy.LinTS`` with default settings, one model over all
    offers (arms), contexts one-hot / squashed. Refit in batches of ``batch`` rewards (one
    ``partial_fit`` per reward would cost ~2 ms); its own sampled choice becomes a one-hot pmf
    (the engine mixes in the channel's exploration floor and logs the exact probability)."""

    family = "peer_mabwiser_lints"

    def __init__(self, *, seed: int = 0, arms: Sequence[str] = (), categories: Sequence[str] = (),
                 channels: Sequence[str] = (), batch: int = 50) -> None:  # fmt: skip
        super().__init__(seed=seed)
        from mabwiser.mab import MAB, LearningPolicy

        self.arms = list(arms)
        self.categories = list(categories)
        self.channels = list(channels)
        self.batch = batch
        self.mab = MAB(self.arms, LearningPolicy.LinTS(), seed=seed)
        self.fitted = False
        self.buf: list[tuple[str, float, np.ndarray]] = []

    def x(self, ctx: Mapping[str, Any]) -> np.ndarray:
        v = [1.0 * (ctx.get("tier") == t) for t in TIERS]
        v += [1.0 * (ctx.get("lifecycle") == s) for s in LIFECYCLES]
        v += [1.0 * (ctx.get("top_category") == c) for c in self.categories]
        v += [1.0 * (ctx.get("preferred_channel") == c) for c in self.channels]
        # the purchase-history proxies, as for our policies
        v += [float(ctx.get(f"share_{c}", 0.0)) for c in self.categories]
        v.append(float(ctx.get("promo_share", 0.0)))
        for k in ("tenure_days", "recency_days", "frequency", "monetary", "member.exposures",
                  "member.redemptions", "member.days_since_offer"):  # fmt: skip
            v.append(squash(float(ctx.get(k, 0.0))) / 5.0)
        return np.array(v)

    def _distribution(self, s: Scoring) -> np.ndarray:
        k = len(s.offers)
        if not self.fitted:
            return np.full(k, 1.0 / k)
        exp = self.mab.predict_expectations(self.x(s.context).reshape(1, -1))
        scores = [exp[o.offer_id] for o in s.offers]
        out = np.zeros(k)
        out[int(np.argmax(scores))] = 1.0
        return out

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        self.buf.append((s.offers[chosen].offer_id, reward, self.x(s.context)))
        if len(self.buf) >= self.batch:
            arms, rewards, xs = zip(*self.buf, strict=True)
            (self.mab.partial_fit if self.fitted else self.mab.fit)(list(arms), list(rewards), np.array(xs))
            self.fitted = True
            self.buf.clear()


def _register_peers() -> None:
    if MabwiserLinTS.family not in families():
        register(MabwiserLinTS.family, MabwiserLinTS)


def _with_peers(s: Scenario) -> Scenario:
    cats = sorted({o.category for o in s.offers if o.category} | {"other"})
    peers = (
        PolicyEntry("mabwiser_lints", family=MabwiserLinTS.family, params={
            "arms": [o.offer_id for o in s.offers], "categories": cats, "channels": list(s.channels)}),
        PolicyEntry("vw_default", family="vw", params={"explorer": "epsilon", "interactions": []}),
    )  # fmt: skip
    have = {p.name for p in s.policies}
    return s.with_(policies=s.policies + tuple(p for p in peers if p.name not in have))


def _quality(path: Path, decisions: int, seeds: list[int], names: Sequence[str], peers: bool) -> tuple[Any, float]:
    s = Scenario.load(path)
    s = s.select_policies([n for n in names if n in {p.name for p in s.policies}])
    if peers:
        s = _with_peers(s)
    t0 = time.perf_counter()
    c = Simulator(s, decisions=decisions).compare(seeds, ceiling=True)
    return c, time.perf_counter() - t0


def run(quick: bool = False) -> list[dict]:
    _register_peers()
    decisions = 3000 if quick else 20_000
    seeds = [1] if quick else [1, 2, 3]
    rows: list[dict] = []

    # default scenario: ours vs peers vs baselines
    c, secs = _quality(ROOT / "simulations/default.toml", decisions, seeds,
                       ("random", "best_fixed", "segment_rules", *OURS), peers=True)  # fmt: skip
    summary = {r["policy"]: r for r in c.summary()}
    for name, r in summary.items():
        if name in ("oracle", "random"):
            continue
        label = name + (" (peer)" if name in PEERS else
                        " (ceiling: the context's probabilities)" if name == BAYES_ORACLE else "")
        rows.append({
            "benchmark": "default: normalized lift", "policy": label,
            "decisions": decisions, "seeds": len(seeds), "lift": r.get("normalized_lift", math.nan),
            "lift_ci": r.get("normalized_lift_ci", 0.0), "reward_rate": r["reward_rate"],
            "regret_per_1k": -r["vs_oracle"] * summary["oracle"]["reward_rate"] * 1000,
            "decisions_per_s": r["decisions_per_s"],
        })  # fmt: skip
    best = max(OURS, key=lambda n: summary[n].get("normalized_lift", -1))
    best_lift = summary[best]["normalized_lift"]
    peer_best = max(summary[p]["normalized_lift"] for p in PEERS)
    rows.append({"benchmark": "default: target", "policy": best, "lift": best_lift,
                 "target": ">= 0.90 and > peers", "peer_best": peer_best,
                 "ceiling": summary[BAYES_ORACLE]["normalized_lift"],
                 "ok": bool(best_lift >= 0.9 and best_lift > peer_best), "seconds": secs})  # fmt: skip

    # tight budget: gap to the budget-feasible oracle, overspend
    c, secs = _quality(ROOT / "simulations/tight_budget.toml", decisions, seeds,
                       ("random", "thompson_segmented", "thompson_hard_stop", "lin_ts", "lin_ts_hard_stop", "shared_ts"), peers=False)  # fmt: skip
    summary = {r["policy"]: r for r in c.summary()}
    for name, r in summary.items():
        if name in ("oracle", "random", BAYES_ORACLE):  # the unconstrained references
            continue
        label = name + (" (true probabilities, engine pacing)" if name == "truth_paced" else
                        " (ceiling: the context's probabilities, priced)" if name == BAYES_BUDGET_ORACLE else "")
        rows.append({"benchmark": "tight_budget: vs budget oracle", "policy": label,
                     "gap": -r["vs_oracle"], "overspend": r["overspend"], "cap_breaches": r["cap_breaches"],
                     "pacing_error": r.get("pacing_error", math.nan), "decisions_per_s": r["decisions_per_s"]})  # fmt: skip
    refs = ("oracle", "random", "budget_oracle", "truth_paced", BAYES_ORACLE, BAYES_BUDGET_ORACLE)
    ours = [n for n in summary if n not in refs]
    best = min(ours, key=lambda n: -summary[n]["vs_oracle"])
    gap = -summary[best]["vs_oracle"]
    over = max(summary[n]["overspend"] for n in ours)
    rows.append({"benchmark": "tight_budget: target", "policy": best, "gap": gap, "overspend": over,
                 "target": "gap <= 3 %, overspend 0", "ceiling": -summary[BAYES_BUDGET_ORACLE]["vs_oracle"],
                 "ok": bool(gap <= 0.03 and over == 0), "seconds": secs})  # fmt: skip

    # throughput: Thompson through the engine path, one core
    s = Scenario.load(ROOT / "simulations/default.toml")
    sim = Simulator(s, decisions=5000 if quick else 20_000)
    sim.world(1)
    r = sim.run("thompson", PolicySpec("thompson"), 1)
    per_min = r.decisions_per_s * 60
    rows.append({"benchmark": "throughput: thompson via engine", "policy": "thompson",
                 "decisions": r.decisions, "decisions_per_s": r.decisions_per_s,
                 "decisions_per_min": per_min, "target": ">= 100 000 / min / core",
                 "ok": bool(per_min >= 100_000)})  # fmt: skip
    return rows


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(quick=True), indent=2, default=float))
