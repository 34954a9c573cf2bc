"""Off-policy evaluation checked against the simulator's truth, over seeds.

    python -m benchmarks --only ope [--quick]

For each seed, a logging policy runs the default scenario (1 000 members; 4 000 decisions,
quick: 1 500) through the engine; a candidate learns from the first half of its settled
decisions and is frozen (:func:`policy_target`), then IPS, SNIPS, DM and DR estimate its value
on the second half (:func:`evaluate`). The truth is the candidate's pmf on each of those
decisions against the world's true probability of every eligible offer in the member's state
then (``record_truth``), averaged. Per logger x candidate x estimator: the median and mean
relative error, the coverage of the 95 % interval, its mean width and the mean effective sample
size, over 30 seeds (quick: 4). The floor is the estimate a team has without OPE: the logging
policy's own mean reward, read as the candidate's value.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from bandit_engine.catalog import PolicySpec
from bandit_engine.evaluation import evaluate, from_engine, policy_target
from bandit_engine.simulation import Scenario, Simulator

ROOT = Path(__file__).resolve().parents[1]
SEGMENTED = PolicySpec("thompson", {"segment_by": ["tier", "top_category"]})
LOGGERS = {"uniform": PolicySpec("uniform"), "thompson_segmented": SEGMENTED}
CANDIDATES = {"lin_ts": PolicySpec("lin_ts"), "thompson_segmented": SEGMENTED}
FLOOR = "logged mean (no OPE)"


def run(quick: bool = False) -> list[dict]:
    scenario = Scenario.load(ROOT / "simulations/default.toml").with_(members=1000)
    decisions = 1500 if quick else 4000
    seeds = range(1, 5) if quick else range(1, 31)
    sim = Simulator(scenario, decisions=decisions)
    errors: dict[tuple[str, str, str], list[tuple[float, bool, float, float]]] = defaultdict(list)
    truths: dict[tuple[str, str], list[float]] = defaultdict(list)
    sizes: list[int] = []  # decisions evaluated per seed
    for logger, spec in LOGGERS.items():
        for seed in seeds:
            logged = sim.run(f"log-{logger}", spec, seed, keep_engine=True, record_truth=True)
            train, test = from_engine(logged.engine).split(0.5)
            sizes.append(len(test))
            for cand, cand_spec in CANDIDATES.items():
                target = policy_target(cand_spec, train, seed=seed)
                truth = float(np.mean([target(r) @ logged.truth[r.event_id] for r in test.rows]))
                truths[logger, cand].append(truth)
                report = evaluate(test, target, seed=seed)
                for name, e in report.estimates.items():
                    errors[logger, cand, name].append(
                        (abs(e.value - truth) / truth, e.covers(truth), e.hi - e.lo, e.ess))
                errors[logger, cand, FLOOR].append(
                    (abs(report.logged_value - truth) / truth, False, math.nan, math.nan))
    rows = []
    for (logger, cand, name), errs in errors.items():
        rel, cov, width, ess = (np.array(x, dtype=float) for x in zip(*errs, strict=True))
        rows.append({
            "logger": logger, "candidate": cand, "estimator": name, "seeds": len(errs),
            "decisions": round(float(np.mean(sizes))), "truth": float(np.mean(truths[logger, cand])),
            "median_rel_err": float(np.median(rel)), "mean_rel_err": float(rel.mean()),
            "coverage": float(cov.mean()) if name != FLOOR else math.nan,
            "ci_width": float(width.mean()), "ess": float(ess.mean()),
        })  # fmt: skip
    return rows


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(run(quick=True), indent=2, default=float))
