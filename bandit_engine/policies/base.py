"""The policy protocol: a public template that validates and a private hook per family.

Policies are asked to choose among the eligible offers passed in on *every* call (arms on every
call): caps and catalog changes never mutate a policy. A policy keeps per-offer state keyed by
offer id, so offers can come and go.

A family implements either ``_draws`` (posterior samples of expected reward, ``(n, K)``) or
``_distribution`` (a pmf, ``(K,)``), plus ``_learn`` and ``_get_state``/``_set_state``.
"""

from __future__ import annotations

import json
from abc import ABC
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from ..catalog import FeatureValue, Offer, is_finite_number, shown
from ..errors import InvalidArgument
from ..exploration import apply_floor, apply_pacing, check_pmf, pmf_from_draws

_MAGIC = b"BEPOLICY1"


# a prior or noise scale, pseudo-count or width: outside this range the arithmetic breaks
# before the model means anything (a Beta prior of 1e-17 lost to rounding on its first reward,
# a variance of 1e-300 made every score NaN)
POSITIVE_RANGE = (1e-6, 1e6)


def positive_param(family: str, name: str, value: object) -> float:
    """A policy parameter that must be a number in ``POSITIVE_RANGE`` (a clear error otherwise)."""
    lo, hi = POSITIVE_RANGE
    if not is_finite_number(value) or not lo <= value <= hi:  # type: ignore[operator]
        raise InvalidArgument(
            f"{family}: {name} must be a number in [{lo:g}, {hi:g}], got {shown(value)}"
        )
    return float(value)


def int_param(family: str, name: str, value: object, lo: int, hi: int) -> int:
    """A policy parameter that must be an integer in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        raise InvalidArgument(
            f"{family}: {name} must be an integer in [{lo}, {hi}], got {shown(value)}"
        )
    return value
_EMPTY: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True)
class Scoring:
    """What a policy sees for one decision.

    ``context``: shared features as scored (request context plus the member's history summary).
    ``offer_context``: member x offer features, one mapping per eligible offer (e.g. how often
    this member saw or redeemed this offer / its category). ``pacing``: rho in [0, 1] per offer.
    """

    member_id: str
    context: Mapping[str, FeatureValue]
    offers: tuple[Offer, ...]
    offer_context: tuple[Mapping[str, float], ...] = ()
    pacing: np.ndarray | None = None
    _cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.offers:
            raise InvalidArgument("a policy needs at least one eligible offer")
        if not self.offer_context:
            object.__setattr__(self, "offer_context", (_EMPTY,) * len(self.offers))
        if len(self.offer_context) != len(self.offers):
            raise InvalidArgument("offer_context must have one entry per offer")
        if self.pacing is not None and self.pacing.shape != (len(self.offers),):
            raise InvalidArgument("pacing must have one entry per offer")

    @property
    def offer_ids(self) -> tuple[str, ...]:
        return tuple(o.offer_id for o in self.offers)




class Policy(ABC):
    """Base of every policy family. Subclasses set ``family`` and register in the registry."""

    family: ClassVar[str]
    paced: ClassVar[bool] = True  # False for business-as-usual baselines
    # True when the family reads member x offer features (the engine skips building them else;
    # such decisions then log none, so a later switch to such a family replays without them)
    uses_offer_context: ClassVar[bool] = False
    # number of posterior draws used to compute Thompson propensities (documented default)
    propensity_draws: int = 0
    # True when ``correct`` can revise a reward already learned exactly (conjugate families):
    # only such families may learn provisionally (``ChannelConfig.provisional_reward``)
    supports_correction: ClassVar[bool] = False

    def __init__(self, *, seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgument(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.version = 0  # number of feedback events learned

    # public template -------------------------------------------------------------------------
    def pmf(self, s: Scoring, rng: np.random.Generator, floor: float) -> np.ndarray:
        """The distribution over ``s.offers`` to sample from: family output, paced, floored."""
        k = len(s.offers)
        pacing = s.pacing if self.paced else None
        draws = self._draws(s, rng)
        if draws is not None:
            if draws.shape[1] != k:
                raise InvalidArgument(f"{self.family}: draws have {draws.shape[1]} columns, not {k}")
            p = pmf_from_draws(draws, pacing)
        else:
            p = apply_pacing(check_pmf(self._distribution(s), k), pacing)
        return apply_floor(p, floor)

    def learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        self._check_update(s, chosen, probability, "reward", reward)
        self._learn(s, chosen, float(probability), float(reward))
        self.version += 1

    def correct(self, s: Scoring, chosen: int, probability: float, delta: float) -> None:
        """Revise a reward learned earlier for this decision by ``delta`` (final - provisional,
        see :meth:`correction`): afterwards the state is the one ``learn`` with the final
        reward would have given (exactly, up to floating point, for the conjugate families).
        ``s``, ``chosen`` and ``probability`` must be those of the decision's ``learn``."""
        if not self.supports_correction:
            raise InvalidArgument(f"{self.family}: this policy family cannot correct a reward")
        self._check_update(s, chosen, probability, "delta", delta)
        self._correct(s, chosen, float(probability), float(delta))
        self.version += 1

    @staticmethod
    def _check_update(s: Scoring, chosen: int, probability: float, name: str, value: float) -> None:
        if not (0 <= chosen < len(s.offers)):
            raise InvalidArgument(f"chosen index {chosen} outside 0..{len(s.offers) - 1}")
        if not (0.0 < probability <= 1.0):
            raise InvalidArgument(f"probability must be in (0, 1], got {probability!r}")
        if not np.isfinite(value):
            raise InvalidArgument(f"{name} must be finite, got {value!r}")

    def correction(self, provisional: float, final: float) -> float:
        """The ``delta`` that turns a decision learned with reward ``provisional`` into one
        learned with ``final`` (a family that transforms rewards, e.g. clips them, overrides)."""
        return float(final) - float(provisional)

    def serialize(self) -> bytes:
        """State as deterministic bytes (no pickle): a JSON header, then raw array/blob bytes.

        The same state always gives the same bytes, so snapshots can be compared."""
        state = self._get_state()
        meta: dict[str, Any] = {}
        parts: list[dict[str, Any]] = []
        chunks: list[bytes] = []
        offset = 0
        for key in sorted(state):
            v = state[key]
            if isinstance(v, np.ndarray):
                raw = np.ascontiguousarray(v).tobytes()
                parts.append({"key": key, "dtype": v.dtype.str, "shape": list(v.shape),
                              "offset": offset, "size": len(raw)})  # fmt: skip
            elif isinstance(v, bytes):
                raw = v
                parts.append({"key": key, "dtype": None, "offset": offset, "size": len(raw)})
            else:
                meta[key] = v
                continue
            chunks.append(raw)
            offset += len(raw)
        header = json.dumps(
            {"family": self.family, "version": self.version, "seed": self.seed,
             "meta": meta, "parts": parts},
            sort_keys=True,
        ).encode()  # fmt: skip
        return _MAGIC + len(header).to_bytes(8, "little") + header + b"".join(chunks)

    def restore(self, data: bytes) -> None:
        if not data.startswith(_MAGIC):
            raise InvalidArgument("not a bandit_engine policy snapshot")
        n = int.from_bytes(data[len(_MAGIC) : len(_MAGIC) + 8], "little")
        start = len(_MAGIC) + 8
        header = json.loads(data[start : start + n].decode())
        body = memoryview(data)[start + n :]
        if header["family"] != self.family:
            raise InvalidArgument(f"snapshot is of family {header['family']!r}, not {self.family!r}")
        state: dict[str, Any] = dict(header["meta"])
        for p in header["parts"]:
            raw = bytes(body[p["offset"] : p["offset"] + p["size"]])
            if p["dtype"] is None:
                state[p["key"]] = raw
            else:
                state[p["key"]] = np.frombuffer(raw, dtype=np.dtype(p["dtype"])).reshape(p["shape"]).copy()
        self.version = int(header["version"])
        self._set_state(state)

    # hooks -----------------------------------------------------------------------------------
    def _draws(self, s: Scoring, rng: np.random.Generator) -> np.ndarray | None:
        return None

    def _distribution(self, s: Scoring) -> np.ndarray:
        raise NotImplementedError

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        raise NotImplementedError

    def _correct(self, s: Scoring, chosen: int, probability: float, delta: float) -> None:
        raise NotImplementedError

    def _get_state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        return None
