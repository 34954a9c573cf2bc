"""Off-policy estimators of a target policy's value from logged bandit feedback.

Inputs are per logged decision ``i``: the target policy's probability of the logged action
``pi_chosen[i]``, the logging propensity ``propensity[i]``, the reward ``reward[i]``, and for the
model-based estimators the reward model's predictions ``q_hat`` under the target
(``sum_a pi(a|x_i) q(x_i, a)``, ``dm_target[i]``) and at the logged action (``q_chosen[i]``).

* IPS: ``mean(w r)`` with ``w = pi / p``; unbiased when propensities are right.
* SNIPS: ``sum(w r) / sum(w)``; slightly biased, much lower variance.
* DM: ``mean(dm_target)``; low variance, biased by the reward model.
* DR: ``mean(dm_target + w (r - q_chosen))``; unbiased if either the propensities or the model
  are right. Use a cross-fitted model (:func:`.data.cross_fit_predictions`), never one fitted on
  the same rows.

Intervals are normal 95 % intervals on the per-row terms (the delta method for SNIPS), except
DM's: its error is mostly the reward model's, which the spread of its predictions does not show
(that interval covered the truth 10 % of the time where 95 % was claimed), so :func:`dm` takes a
standard error from a bootstrap that refits the model (:func:`.data.evaluate` passes one) and
gives an unbounded interval without one. ``ess = (sum w)^2 / sum w^2`` is the effective sample
size of the importance weights. With no weight at all (the target gives probability 0 to every
logged action, ESS 0), IPS and SNIPS are undefined: ``nan`` with an unbounded interval. Terms
that are all equal (every reward 0, or the only weighted rows redeemed alike) have no spread
to measure: the estimate stands, its interval is unbounded rather than the single point a
normal interval collapses to (a certainty the logs cannot give). Moments are computed on
scaled terms, so huge rewards or weights give finite estimates; one a float cannot hold is an
error. Few effective samples (a small ESS) make any interval unreliable.

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


def _scale(x: np.ndarray) -> float:
    """``max |x|`` (1 when it is 0): moments of ``x / scale`` cannot overflow, and scale back."""
    s = float(np.abs(x).max()) if x.size else 0.0
    return s if s > 0 else 1.0


def _ess(w: np.ndarray) -> float:
    u = w / _scale(w)  # scale-free: weights of 1e200 have no square to overflow
    s2 = float((u**2).sum())
    return float(u.sum() ** 2 / s2) if s2 > 0 else 0.0


def _overflow(name: str) -> InvalidArgument:
    return InvalidArgument(f"{name}: the estimate overflows a float (rewards or importance "
                           f"weights pi / p too large); rescale the rewards")  # fmt: skip


def _mean_se(name: str, terms: np.ndarray, unit: float = 1.0) -> tuple[float, float]:
    """Mean and standard error of ``unit * terms``, computed on ``terms / max|terms|``: their
    squares overflowed from |term| ~ 1e154, giving an infinite or NaN interval. An estimate or
    interval a float cannot hold is an error, not an ``inf``."""
    n = terms.size
    if not np.all(np.isfinite(terms)):
        raise _overflow(name)
    s = _scale(terms)
    u = terms / s
    v = float(u.mean()) * s * unit
    sd = float(u.std(ddof=1)) if n > 1 else 0.0
    # no spread (one row, or every term alike): the logs cannot say how far off the mean is
    se = sd / math.sqrt(n) * s * unit if sd > 0 else float("inf")
    if not math.isfinite(v) or (sd > 0 and not math.isfinite(abs(v) + Z95 * se)):
        raise _overflow(name)
    return v, se


def _weights(name: str, pi: np.ndarray, p: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        w = pi / p
    if not np.all(np.isfinite(w)):  # a propensity of 1e-320
        raise _overflow(name)
    return w


def _product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * b``, inf where it overflows (``_mean_se`` says so) rather than a numpy warning."""
    with np.errstate(over="ignore", invalid="ignore"):
        return a * b


def _undefined(name: str, n: int) -> Estimate:
    """An estimate the logs cannot give (no weight on any logged action): nan, unbounded."""
    return Estimate(name, float("nan"), float("inf"), -float("inf"), float("inf"), n, 0.0)


def _from_terms(name: str, terms: np.ndarray, w: np.ndarray) -> Estimate:
    v, se = _mean_se(name, terms)
    return Estimate(name, v, se, v - Z95 * se, v + Z95 * se, terms.size, _ess(w))


def ips(pi_chosen: np.ndarray, propensity: np.ndarray, reward: np.ndarray) -> Estimate:
    pi, p, r = _arrays(pi_chosen, propensity, reward)
    w = _weights("ips", pi, p)
    if not np.any(w > 0):
        # no logged action has the target's probability: the logs say nothing of its value, and
        # the all-zero terms read as 0 with a zero-width interval (as SNIPS, undefined instead)
        return _undefined("ips", w.size)
    return _from_terms("ips", _product(w, r), w)


def snips(pi_chosen: np.ndarray, propensity: np.ndarray, reward: np.ndarray) -> Estimate:
    pi, p, r = _arrays(pi_chosen, propensity, reward)
    w = _weights("snips", pi, p)
    n = w.size
    u = w / _scale(w)  # SNIPS is scale-free in the weights: sum(w) cannot overflow
    su = float(u.sum())
    if su <= 0:
        return _undefined("snips", n)
    sr = _scale(r)
    v = float((u * (r / sr)).sum() / su) * sr
    # delta method: influence of row i is n * w_i (r_i - v) / sum(w)
    _, se = _mean_se("snips", n * u * (r / sr - v / sr) / su, sr)
    return Estimate("snips", v, se, v - Z95 * se, v + Z95 * se, n, _ess(w))


def dm(
    dm_target: np.ndarray, pi_chosen: np.ndarray | None = None,
    propensity: np.ndarray | None = None, *, se: float | None = None,
) -> Estimate:  # fmt: skip
    """The mean of ``dm_target``, with the standard error ``se`` of the whole procedure (the
    reward model's fit included: a bootstrap's); without one, the interval is unbounded."""
    q = np.asarray(dm_target, dtype=float)
    w = np.ones_like(q) if pi_chosen is None or propensity is None else np.asarray(pi_chosen) / np.asarray(propensity)
    v, _ = _mean_se("dm", q)
    if se is None or not (math.isfinite(se) and se > 0):  # none, or no spread to measure
        se = float("inf")
    return Estimate("dm", v, se, v - Z95 * se, v + Z95 * se, q.size, _ess(w))


def dr(
    pi_chosen: np.ndarray,
    propensity: np.ndarray,
    reward: np.ndarray,
    dm_target: np.ndarray,
    q_chosen: np.ndarray,
) -> Estimate:
    pi, p, r = _arrays(pi_chosen, propensity, reward)
    w = _weights("dr", pi, p)
    with np.errstate(over="ignore", invalid="ignore"):
        terms = np.asarray(dm_target, dtype=float) + w * (r - np.asarray(q_chosen, dtype=float))
    return _from_terms("dr", terms, w)


def all_estimates(
    pi_chosen: np.ndarray,
    propensity: np.ndarray,
    reward: np.ndarray,
    dm_target: np.ndarray | None = None,
    q_chosen: np.ndarray | None = None,
    *,
    dm_se: float | None = None,
) -> dict[str, Estimate]:
    out = {"ips": ips(pi_chosen, propensity, reward), "snips": snips(pi_chosen, propensity, reward)}
    if dm_target is not None and q_chosen is not None:
        out["dm"] = dm(dm_target, pi_chosen, propensity, se=dm_se)
        out["dr"] = dr(pi_chosen, propensity, reward, dm_target, q_chosen)
    return out


__all__ = ["Estimate", "all_estimates", "dm", "dr", "ips", "snips"]
