"""Beta-Bernoulli Thompson sampling, context-free, optionally one posterior per segment.

Rewards are clipped to [0, 1] and applied as a fractional Bernoulli update
(``alpha += r``, ``beta += 1 - r``).

Propensities come from a *bank* of ``propensity_draws`` posterior samples kept per
(segment, offer): a decision gathers the bank columns of the eligible offers and takes argmax
frequencies, drawing no random numbers (the engine samples the decision from that pmf with its
own event-seeded generator, so the logged probability is exact). When an arm learns, only its
bank is redrawn, from a generator seeded by (policy seed, segment, offer id, the arm's update
count): the banks are a pure function of the ordered learning log, so a snapshot stores only
alpha, beta and the update counts.

Offers a segment has never learned about share one prior bank per offer (seeded the same way
with segment ``*`` and count 0), so a new segment costs no memory until it learns.

>>> from bandit_engine.catalog import Offer
>>> offers = tuple(Offer(f"o{i}", channels=["email"]) for i in range(3))
>>> pol = Thompson(seed=1)
>>> s = Scoring("m1", {}, offers)
>>> for _ in range(100):
...     pol.learn(s, 2, 0.5, 1.0)
>>> p = pol.pmf(s, np.random.default_rng(0), floor=0.03)
>>> int(p.argmax()), bool(p[2] > 0.9)
(2, True)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from .base import Policy, Scoring, int_param, positive_param

_PRIOR_SEGMENT = "*"  # never a JSON list, so never a real segment key
_TINY = 1e-300  # the smallest pseudo-count handed to the Beta sampler


class Thompson(Policy):
    """Beta-Bernoulli Thompson sampling with per-arm banks of posterior draws.

    ``segment_by`` names context keys; the segment of a request is the tuple of their values
    (missing -> ``None``) and each segment has its own posteriors (state grows with segments x
    offers learned, so segment by low-cardinality keys such as tier or top category).
    """

    family = "thompson"
    supports_correction = True

    def __init__(
        self,
        *,
        seed: int = 0,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        propensity_draws: int = 256,
        segment_by: Sequence[str] = (),
    ) -> None:
        super().__init__(seed=seed)
        self.prior_alpha = positive_param("thompson", "prior_alpha", prior_alpha)
        self.prior_beta = positive_param("thompson", "prior_beta", prior_beta)
        self.propensity_draws = int_param(
            "thompson", "propensity_draws", propensity_draws, 1, 100_000
        )
        if isinstance(segment_by, str) or not isinstance(segment_by, Sequence):
            raise InvalidArgument(
                f"thompson: segment_by must be a list of context keys, got {segment_by!r}"
            )
        for key in segment_by:
            if not isinstance(key, str) or not key:
                raise InvalidArgument(
                    f"thompson: segment_by entries must be non-empty strings, got {key!r}"
                )
        if len(set(segment_by)) != len(segment_by):
            raise InvalidArgument(f"thompson: segment_by has duplicates: {list(segment_by)!r}")
        self.segment_by = tuple(segment_by)
        self._seed64 = seed % 2**64
        self._gen = np.random.Generator(np.random.PCG64(0))  # reseeded per bank redraw
        self._reset()

    # storage ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        n = self.propensity_draws
        # column r of the bank holds the draws of one (segment, offer) arm or one prior; columns
        # (not rows) so a decision's gather is already the C-ordered (n, K) array argmax wants
        self._bank = np.empty((n, 16))
        self._alpha = np.empty(16)
        self._beta = np.empty(16)
        self._updates = np.zeros(16, dtype=np.int64)
        self._size = 0
        self._keys: list[tuple[str, str]] = []  # (segment key or "*", offer id) per column
        self._rows: dict[str, dict[str, int]] = {}  # segment -> offer id -> column
        self._prior_rows: dict[str, int] = {}  # offer id -> column of its shared prior bank

    def _new_row(self, segment: str, offer_id: str, alpha: float, beta: float, n: int) -> int:
        r = self._size
        if r == self._alpha.size:
            cap = 2 * r
            bank = np.empty((self.propensity_draws, cap))
            bank[:, :r] = self._bank
            self._bank = bank
            self._alpha = np.resize(self._alpha, cap)
            self._beta = np.resize(self._beta, cap)
            self._updates = np.resize(self._updates, cap)
        self._size = r + 1
        self._keys.append((segment, offer_id))
        self._alpha[r], self._beta[r], self._updates[r] = alpha, beta, n
        self._redraw(r)
        return r

    def _redraw(self, r: int) -> None:
        """Redraw row ``r``'s bank from a PCG64 state keyed by (seed, segment, offer, updates):
        a pure function of the learning log. Setting the state directly costs ~3 µs where
        seeding a new Generator through SeedSequence costs ~16 µs."""
        segment, offer_id = self._keys[r]
        key = f"{self._seed64}|{segment}|{offer_id}|{int(self._updates[r])}".encode()
        h = hashlib.blake2b(key, digest_size=32).digest()
        self._gen.bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {"state": int.from_bytes(h[:16], "little"),
                      "inc": int.from_bytes(h[16:], "little") | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }  # fmt: skip
        # pseudo-counts stay >= the prior (>= 1e-6) but rounding must never make one 0
        self._bank[:, r] = self._gen.beta(
            max(self._alpha[r], _TINY), max(self._beta[r], _TINY), size=self.propensity_draws
        )

    def _segment(self, context: Mapping[str, Any]) -> str:
        if not self.segment_by:
            return "[]"
        values = [context.get(k) for k in self.segment_by]
        return json.dumps(values, separators=(",", ":"), default=str)

    # hooks -----------------------------------------------------------------------------------
    def _draws(self, s: Scoring, rng: np.random.Generator) -> np.ndarray:
        seg_rows = self._rows.get(self._segment(s.context), {})
        prior_rows = self._prior_rows
        rows = []
        for o in s.offers:
            oid = o.offer_id
            r = seg_rows.get(oid)
            if r is None:
                r = prior_rows.get(oid)
                if r is None:
                    r = prior_rows[oid] = self._new_row(
                        _PRIOR_SEGMENT, oid, self.prior_alpha, self.prior_beta, 0
                    )
            rows.append(r)
        return np.take(self._bank, rows, axis=1)

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        r = min(max(reward, 0.0), 1.0)
        segment = self._segment(s.context)
        oid = s.offers[chosen].offer_id
        seg_rows = self._rows.setdefault(segment, {})
        row = seg_rows.get(oid)
        if row is None:
            seg_rows[oid] = self._new_row(
                segment, oid, self.prior_alpha + r, self.prior_beta + (1.0 - r), 1
            )
            return
        self._alpha[row] += r
        self._beta[row] += 1.0 - r
        self._updates[row] += 1
        self._redraw(row)

    def correction(self, provisional: float, final: float) -> float:
        clip = lambda r: min(max(float(r), 0.0), 1.0)  # noqa: E731 - as ``_learn`` clips
        return clip(final) - clip(provisional)

    def _correct(self, s: Scoring, chosen: int, probability: float, delta: float) -> None:
        """Move ``delta`` of the arm's pseudo-count from failures to successes (the fractional
        update of a reward ``r`` added ``r`` to alpha and ``1 - r`` to beta). The arm's bank is
        redrawn with its update count advanced, so banks stay a pure function of the log."""
        segment = self._segment(s.context)
        oid = s.offers[chosen].offer_id
        seg_rows = self._rows.setdefault(segment, {})
        row = seg_rows.get(oid)
        if row is None:  # not learned here before (cannot happen when replaying a whole log)
            seg_rows[oid] = self._new_row(
                segment, oid, self.prior_alpha + max(delta, 0.0),
                self.prior_beta + max(-delta, 0.0), 1,
            )  # fmt: skip
            return
        self._alpha[row] += delta
        self._beta[row] -= delta
        self._updates[row] += 1
        self._redraw(row)

    # state -----------------------------------------------------------------------------------
    def posterior(
        self, offer_id: str, context: Mapping[str, Any] | None = None
    ) -> tuple[float, float]:
        """(alpha, beta) of an offer in the segment of ``context`` (the prior if never learned)."""
        row = self._rows.get(self._segment(context or {}), {}).get(offer_id)
        if row is None:
            return self.prior_alpha, self.prior_beta
        return float(self._alpha[row]), float(self._beta[row])

    def _learned_rows(self) -> list[int]:
        return [r for seg in self._rows.values() for r in seg.values()]

    def _get_state(self) -> dict[str, Any]:
        rows = sorted(self._learned_rows())
        return {
            "segment_by": list(self.segment_by),
            "segments": [self._keys[r][0] for r in rows],
            "offers": [self._keys[r][1] for r in rows],
            "alpha": self._alpha[rows].copy(),
            "beta": self._beta[rows].copy(),
            "updates": self._updates[rows].copy(),
        }

    def _set_state(self, state: Mapping[str, Any]) -> None:
        if list(state.get("segment_by", [])) != list(self.segment_by):
            raise InvalidArgument(
                f"thompson: snapshot was segmented by {state.get('segment_by')!r}, "
                f"this policy by {list(self.segment_by)!r}"
            )
        segments, offers = state["segments"], state["offers"]
        alpha, beta, updates = state["alpha"], state["beta"], state["updates"]
        if not (len(segments) == len(offers) == len(alpha) == len(beta) == len(updates)):
            raise InvalidArgument("thompson: snapshot arrays have inconsistent lengths")
        self._reset()
        for seg, oid, a, b, n in zip(segments, offers, alpha, beta, updates, strict=True):
            row = self._new_row(str(seg), str(oid), float(a), float(b), int(n))
            self._rows.setdefault(str(seg), {})[str(oid)] = row


FAMILIES: dict[str, Callable[..., Policy]] = {"thompson": Thompson}

__all__ = ["FAMILIES", "Thompson"]
