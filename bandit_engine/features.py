"""Context + member history -> features.

The engine keeps each member's own history (exposures, redemptions, ignores per offer and
category, recency), so two members with identical segment attributes get different offers
once their behaviour differs. History enters as:

* shared features (``member.*``): counts over the history window (over the member's latest
  ``HISTORY_LIMIT`` exposures in it, for a member with more) and days since the last offer;
* member x offer features (one mapping per eligible offer): ``seen``, ``redeemed``,
  ``ignored`` for this offer, ``cat_seen``/``cat_redeemed`` for its category, and their
  recency: ``days_since_seen`` (since this offer was last shown to the member) and
  ``days_since_cat_seen`` (since an offer of its category was), present only when shown in
  the window. The counts cover the whole history window, so late in a campaign they no longer
  tell a member who saw an offer yesterday from one who saw it weeks ago; the recency does,
  with no time constant to choose (the model weighs it).

:class:`FeatureHasher` maps such mappings to fixed-size vectors for the linear policies.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .catalog import FeatureValue, Offer
from .clock import MS_PER_DAY
from .ledger.records import HistoryItem

HISTORY_DAYS = 90.0
# a choose reads at most this many of the member's latest exposures in the window: reading and
# summarizing cost ~6 us per exposure in Python (a member with 1 000 exposures cost ~7 ms per
# choose), so a heavy member's counts saturate here instead (EngineConfig.history_limit). Above
# the simulator's heaviest member (108 arrivals in the fatigue scenario), so no run changes.
HISTORY_LIMIT = 128


def summarize_history(
    history: Sequence[HistoryItem],
    offers: Sequence[Offer],
    category_of: Mapping[str, str | None],
    now_ms: int,
    *,
    per_offer_features: bool = True,
) -> tuple[dict[str, float], tuple[dict[str, float], ...]]:
    """Shared ``member.*`` features and one member x offer mapping per offer (sparse; an empty
    tuple when ``per_offer_features`` is False)."""
    shared: dict[str, float] = {}
    if not history:
        return shared, tuple({} for _ in offers) if per_offer_features else ()
    # per offer: seen, redeemed, ignored, last shown; per category: seen, redeemed, last shown
    per_offer: dict[str, list[float]] = {}
    per_cat: dict[str, list[float]] = {}
    redeemed = ignored = 0
    last = 0
    for h in history:
        last = max(last, h.issued_at)
        pos = h.reward is not None and h.reward > 0
        ign = h.status == "expired" and not pos
        redeemed += pos
        ignored += ign
        st = per_offer.setdefault(h.offer_id, [0.0, 0.0, 0.0, 0.0])
        st[0] += 1
        st[1] += pos
        st[2] += ign
        st[3] = max(st[3], h.issued_at)
        cat = category_of.get(h.offer_id)
        if cat is not None:
            cs = per_cat.setdefault(cat, [0.0, 0.0, 0.0])
            cs[0] += 1
            cs[1] += pos
            cs[2] = max(cs[2], h.issued_at)
    shared["member.exposures"] = float(len(history))
    shared["member.redemptions"] = float(redeemed)
    shared["member.ignored"] = float(ignored)
    shared["member.days_since_offer"] = _days(now_ms - last)
    if not per_offer_features:
        return shared, ()
    out: list[dict[str, float]] = []
    for o in offers:
        oid = o.offer_id
        st = per_offer.get(oid)
        cs = per_cat.get(category_of.get(oid))  # type: ignore[arg-type]
        f: dict[str, float] = {}
        if st is not None:
            f.update(seen=st[0], redeemed=st[1], ignored=st[2],
                     days_since_seen=_days(now_ms - st[3]))  # fmt: skip
        if cs is not None:
            f.update(cat_seen=cs[0], cat_redeemed=cs[1], days_since_cat_seen=_days(now_ms - cs[2]))
        out.append(f)
    return shared, tuple(out)


def _days(ms: float) -> float:
    return round(max(0.0, ms) / MS_PER_DAY, 3)


def squash(x: float) -> float:
    """Signed log1p: keeps counts and money on a scale a unit-variance prior can handle."""
    return math.copysign(math.log1p(abs(x)), x)


class FeatureHasher:
    """Stable feature hashing into ``dim`` slots; slot 0 is the bias.

    Numbers enter squashed (signed log1p) under their name; strings as ``name=value`` indicators;
    bools as 0/1. The hash (CRC-32) is stable across processes and Python versions.

    >>> h = FeatureHasher(8)
    >>> v = h.vector({"tier": "gold", "recency_days": 12})
    >>> v.shape, float(v[0])
    ((8,), 1.0)
    """

    def __init__(self, dim: int) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim = dim
        self._index: dict[str, int] = {}

    def _slot(self, key: str) -> int:
        i = self._index.get(key)
        if i is None:
            i = 1 + zlib.crc32(key.encode()) % (self.dim - 1)
            if len(self._index) < 100_000:
                self._index[key] = i
        return i

    def fill(self, out: np.ndarray, features: Mapping[str, FeatureValue], prefix: str = "") -> None:
        for k, v in features.items():
            if isinstance(v, str):
                out[self._slot(f"{prefix}{k}={v}")] += 1.0
            elif isinstance(v, bool):
                out[self._slot(prefix + k)] += 1.0 if v else 0.0
            else:
                out[self._slot(prefix + k)] += squash(float(v))

    def vector(self, *parts: Mapping[str, Any], prefixes: Sequence[str] = ()) -> np.ndarray:
        out = np.zeros(self.dim)
        out[0] = 1.0
        for i, part in enumerate(parts):
            self.fill(out, part, prefixes[i] if i < len(prefixes) else "")
        return out
