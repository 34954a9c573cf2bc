"""Turn a policy's output into the pmf actually sampled from, and sample it reproducibly.

Two kinds of policy output, one path to a pmf:

* posterior draws (Thompson families): an ``(n_draws, K)`` array of sampled expected rewards.
  The pmf is the frequency with which each offer wins the argmax. The engine then samples *from
  that pmf*, so the logged probability is exact for the distribution used, and the number of
  draws only controls how closely it tracks the ideal Thompson distribution.
* a distribution (VW, baselines): a ``(K,)`` pmf.

Pacing lowers each offer's value by ``rho * |value|`` (rho in [0, 1], the dual price times the
unit cost): for a non-negative value that is ``mu * (1 - rho)``, the Lagrangian
``mu - lambda * cost * mu`` for a cost paid on redemption; for a negative draw it still lowers
it, so a price never makes an offer more attractive.
An exploration floor then mixes in ``floor / K`` so every eligible offer keeps p > 0.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .errors import InvalidArgument


def pmf_from_draws(draws: np.ndarray, pacing: np.ndarray | None = None) -> np.ndarray:
    """Argmax frequencies of posterior draws (ties go to the lowest index).

    >>> pmf_from_draws(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]]))
    array([0.25, 0.75])
    """
    if draws.ndim != 2 or draws.shape[1] == 0:
        raise InvalidArgument(f"draws must be a non-empty (n_draws, K) array, got {draws.shape}")
    if pacing is not None:
        draws = draws - pacing * np.abs(draws)
    k = draws.shape[1]
    counts = np.bincount(draws.argmax(axis=1), minlength=k)
    return counts / counts.sum()


def apply_pacing(pmf: np.ndarray, pacing: np.ndarray | None) -> np.ndarray:
    """Tilt a distribution by ``1 - rho``. If the policy's whole mass sits on priced-out offers,
    spread it by ``1 - rho`` instead (uniform only when every offer is fully priced out).

    >>> apply_pacing(np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.5]))
    array([0.        , 0.66666667, 0.33333333])
    """
    if pacing is None or not pacing.any():
        return pmf
    weights = 1.0 - pacing
    tilted = pmf * weights
    total = tilted.sum()
    if total > 0.0:
        return tilted / total
    if weights.sum() > 0.0:
        return weights / weights.sum()
    return np.full(pmf.shape, 1.0 / pmf.size)


def apply_floor(pmf: np.ndarray, floor: float) -> np.ndarray:
    """Mix in ``floor`` of the uniform distribution: every entry becomes >= floor / K.

    >>> apply_floor(np.array([1.0, 0.0]), 0.1)
    array([0.95, 0.05])
    """
    if not (0.0 < floor <= 1.0):
        raise InvalidArgument(f"exploration floor must be in (0, 1], got {floor!r}")
    k = pmf.size
    out = (1.0 - floor) * pmf + floor / k
    return out / out.sum()


def check_pmf(pmf: np.ndarray, k: int) -> np.ndarray:
    pmf = np.asarray(pmf, dtype=np.float64)
    if pmf.shape != (k,):
        raise InvalidArgument(f"policy returned a pmf of shape {pmf.shape}, expected ({k},)")
    total = float(pmf.sum())
    # NaN fails every comparison, and a finite sum of non-negative entries means all are finite
    if not (float(pmf.min()) >= 0.0 and abs(total - 1.0) < 1e-6):
        raise InvalidArgument(f"policy returned an invalid pmf (sum {total}): {pmf!r}")
    return pmf / total


def sample(pmf: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF sampling with one uniform draw (stable across numpy versions)."""
    u = rng.random()
    idx = int(np.searchsorted(np.cumsum(pmf), u, side="right"))
    return min(idx, pmf.size - 1)


class EventRandom:
    """Per-event randomness, reproducible from (engine seed, event id, attempt).

    ``random()`` gives uniforms straight from a keyed BLAKE2b hash (about 1 µs, where seeding a
    numpy Generator costs about 20 µs); any other Generator method (``standard_normal``, ...)
    builds the seeded numpy Generator on first use.

    >>> a, b = event_rng(7, "ev-1"), event_rng(7, "ev-1")
    >>> a.random() == b.random(), 0.0 <= a.random() < 1.0
    (True, True)
    """

    __slots__ = ("_key", "_n", "_gen", "_seed")

    def __init__(self, seed: int, event_id: str, attempt: int = 0) -> None:
        self._key = f"{seed}\x00{attempt}\x00{event_id}".encode()
        self._seed = (seed, event_id, attempt)
        self._n = 0
        self._gen: np.random.Generator | None = None

    def random(self) -> float:
        self._n += 1
        h = hashlib.blake2b(self._key + self._n.to_bytes(4, "little"), digest_size=8).digest()
        return (int.from_bytes(h, "little") >> 11) * 2.0**-53

    def __getattr__(self, name: str) -> object:
        if self._gen is None:
            seed, event_id, attempt = self._seed
            h = int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")
            self._gen = np.random.default_rng([seed & 0xFFFFFFFF, h & 0xFFFFFFFF, h >> 32, attempt])
        return getattr(self._gen, name)


def event_rng(seed: int, event_id: str, attempt: int = 0) -> np.random.Generator:
    """The randomness of one decision: same seed and event id, same draws."""
    return EventRandom(seed, event_id, attempt)  # type: ignore[return-value]
