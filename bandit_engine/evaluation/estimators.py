"""Off-policy estimators of a target policy's value from logged bandit feedback.

Inputs are per logged decision ``i``: the target policy's probability of the logged action
``pi_chosen[i]``, the logging propensity ``propensity[i]``, the reward ``reward[i]``, and for the
model-based estimators the reward model's predictions ``q_hat`` under the target
(``sum_a pi(a|x_i) q(x_i, a)``, ``dm_target[i]``) and at the logged action (``q_chosen[i]``).

* IPS: ``mean(w r)`` with ``w = pi / p``; unbiased when propensities are right.
* SNIPS: ``sum(w r) / sum(w)``; slightly biased, much lower variance.
* DM: ``mean(dm_target)``; low variance, biased by the reward model.
* DR: ``mean(dm_target + w (r - q_chosen))``; unbiased if either the propensities or the model
  are right. Use a cross-fitted model (:mod:`.reward_model`), never one fitted on the same rows.

Intervals are normal 95 % intervals on the per-row terms (the delta method for SNIPS).
``ess = (sum w)^2 / sum w^2`` is the effective sample size of the importance weights.

>>> import numpy as np
>>> pi, p, r = np.array([1.0, 0.0, 1.0, 0.0]), np.full(4, 0.5), np.array([1.0, 0.0, 0.0, 1.0])
>>> ips(pi, p, r).value, snips(pi, p, r).value, ips(pi, p, r).ess
(0.5, 0.5, 2.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InvalidArgument

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    estimator: str
    value: float
    se: float
    lo: float
    hi: float
    n: int
    ess: float

    def covers(self, truth: float) -> bool:
        return bool(self.lo <= truth <= self.hi)

    def to_dict(self) -> dict[str, float | str | int]:
        return asdict(self)


def _arrays(pi_chosen: np.ndarray, propensity: np.ndarray, reward: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pi = np.asarray(pi_chosen, dtype=float)
    p = np.asarray(propensity, dtype=float)
    r = np.asarray(reward, dtype=float)
    if not (pi.shape == p.shape == r.shape) or pi.ndim != 1:
        raise InvalidArgument(f"pi_chosen, propensity and reward must be 1-d of one length, got {pi.shape}, {p.shape}, {r.shape}")
    if pi.size == 0:
        raise InvalidArgument("no logged decisions to evaluate")
    if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
        raise InvalidArgument("propensities must be in (0, 1]")
    if np.any(pi < 0) or np.any(pi > 1 + 1e-9):
        raise InvalidArgument("target probabilities must be in [0, 1]")
    if np.any(~np.isfinite(r)):
        raise InvalidArgument("rewards must be finite")
    return pi, p, r


def _ess(w: np.ndarray) -> float:
    s2 = float((w**2).sum())
    return float(w.sum() ** 2 / s2) if s2 > 0 else 0.0


def _from_terms(name: str, terms: np.ndarray, w: np.ndarray) -> Estimate:
    n = terms.size
    v = float(terms.mean())
    se = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return Estimate(name, v, se, v - Z95 * se, v + Z95 * se, n, _ess(w))


def ips(pi_chosen: np.ndarray, propensity: np.ndarray, reward: np.ndarray) -> Estimate:
    pi, p, r = _arrays(pi_chosen, propensity, reward)
    w = pi / p
    return _from_terms("ips", w * r, w)


def snips(pi_chosen: np.ndarray, propensity: np.ndarray, reward: np.ndarray) -> Estimate:
    pi, p, r = _arrays(pi_chosen, propensity, reward)
    w = pi / p
    n = w.size
    sw = float(w.sum())
    if sw <= 0:
        return Estimate("snips", float("nan"), float("inf"), -float("inf"), float("inf"), n, 0.0)
    v = float((w * r).sum() / sw)
    # delta method: influence of row i is n * w_i (r_i - v) / sum(w)
    infl = n * w * (r - v) / sw
    se = float(infl.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf")
    return Estimate("snips", v, se, v - Z95 * se, v + Z95 * se, n, _ess(w))


def dm(dm_target: np.ndarray, pi_chosen: np.ndarray | None = None, propensity: np.ndarray | None = None) -> Estimate:
    q = np.asarray(dm_target, dtype=float)
    w = np.ones_like(q) if pi_chosen is None or propensity is None else np.asarray(pi_chosen) / np.asarray(propensity)
    return _from_terms("dm", q, w)


def dr(
    pi_chosen: np.ndarray,
    propensity: np.ndarray,
    reward: np.ndarray,
    dm_target: np.ndarray,
    q_chosen: np.ndarray,
) -> Estimate:
    pi, p, r = _arrays(pi_chosen, propensity, reward)
    w = pi / p
    terms = np.asarray(dm_target, dtype=float) + w * (r - np.asarray(q_chosen, dtype=float))
    return _from_terms("dr", terms, w)


def all_estimates(
    pi_chosen: np.ndarray,
    propensity: np.ndarray,
    reward: np.ndarray,
    dm_target: np.ndarray | None = None,
    q_chosen: np.ndarray | None = None,
) -> dict[str, Estimate]:
    out = {"ips": ips(pi_chosen, propensity, reward), "snips": snips(pi_chosen, propensity, reward)}
    if dm_target is not None and q_chosen is not None:
        out["dm"] = dm(dm_target, pi_chosen, propensity)
        out["dr"] = dr(pi_chosen, propensity, reward, dm_target, q_chosen)
    return out


__all__ = ["Estimate", "all_estimates", "dm", "dr", "ips", "snips"]
