"""Baselines: uniform random, and a fixed priority list (business as usual).

Neither learns: ``learn`` only counts feedback (``version``), so both serialize to an empty state.

>>> from bandit_engine.catalog import Offer
>>> offers = tuple(Offer(f"o{i}", channels=["email"]) for i in range(3))
>>> s = Scoring("m1", {}, offers)
>>> rng = np.random.default_rng(0)
>>> Fixed(offers=["o9", "o1"]).pmf(s, rng, floor=0.03)
array([0.01, 0.98, 0.01])
>>> Uniform().pmf(s, rng, floor=0.03)
array([0.33333333, 0.33333333, 0.33333333])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..catalog import check_id
from ..errors import InvalidArgument
from .base import Policy, Scoring


class Uniform(Policy):
    """Uniform over the eligible offers. Paced, so budget pacing tilts it like any other family."""

    family = "uniform"
    supports_correction = True

    def _distribution(self, s: Scoring) -> np.ndarray:
        k = len(s.offers)
        return np.full(k, 1.0 / k)

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        return None

    def _correct(self, s: Scoring, chosen: int, probability: float, delta: float) -> None:
        return None


class Fixed(Policy):
    """Business as usual: the first eligible offer of a priority list, else uniform over eligible.

    Not paced: it stands for what the business would do without the engine.
    """

    family = "fixed"
    paced = False
    supports_correction = True

    def __init__(self, *, seed: int = 0, offers: Sequence[str] = ()) -> None:
        super().__init__(seed=seed)
        if isinstance(offers, str) or not isinstance(offers, Sequence) or not offers:
            raise InvalidArgument(
                f"fixed: offers must be a non-empty list of offer ids in priority order, "
                f"got {offers!r}"
            )
        try:
            self.offers = tuple(check_id("offer id", o) for o in offers)
        except InvalidArgument as exc:
            raise InvalidArgument(f"fixed: offers: {exc.message}") from None
        self._rank = {o: i for i, o in reversed(list(enumerate(self.offers)))}

    def _distribution(self, s: Scoring) -> np.ndarray:
        k = len(s.offers)
        rank = self._rank
        best, best_rank = -1, len(rank)
        for i, o in enumerate(s.offers):
            r = rank.get(o.offer_id, best_rank)
            if r < best_rank:
                best, best_rank = i, r
        if best < 0:
            return np.full(k, 1.0 / k)
        p = np.zeros(k)
        p[best] = 1.0
        return p

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        return None

    def _correct(self, s: Scoring, chosen: int, probability: float, delta: float) -> None:
        return None


FAMILIES: dict[str, Callable[..., Policy]] = {"uniform": Uniform, "fixed": Fixed}

__all__ = ["FAMILIES", "Fixed", "Uniform"]
