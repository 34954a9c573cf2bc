"""Budget pacing: a dual price on a budgeted offer's cost, so its budget lasts the campaign.

The price is *derived*, not stored: a pure function of the offer's ledger counters and the
time, so every worker, every restart and every replay computes the same price.

    projected = spent + committed * r          (r: redemptions per unit of cost issued)
    target(t) = budget * (t - start) / (end - start)
    rho       = clip(gain * (projected - target(t)) / budget, 0, 1)

``r`` counts every reservation ever made (settled or still open) in its denominator. Counting
only settled ones would be biased high, because redemptions settle at once while
non-redemptions settle only when their window closes; with multi-day reward windows that bias
held paced offers far below their pace (tight_budget scenario: pacing error 0.22-0.24 against
0.14 with this estimator, same reward).

``rho`` is the dual price ``lambda`` times the unit cost; a policy values the offer at
``mu * (1 - rho)`` — the Lagrangian ``mu - lambda * cost * mu`` for a cost paid on redemption.
While spend runs ahead of the straight-line target the price rises and the offer is chosen
less; behind target it falls to 0 and the offer competes on its merits. This is the
accumulated form of the dual update ``lambda <- max(0, lambda + eta (cost_t - B / T))``. Pacing
only ever lowers an offer's share; it never raises a budget, and the hard cap
(spent + committed <= budget) is enforced by the ledger regardless.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .catalog import Offer
from .ledger.records import OfferState

DEFAULT_GAIN = 20.0
# prior for the redemption rate used to project outstanding liability: 1 in 4, weight 4 offers
# (r = (spent + prior) / (settled + committed + prior weight), all in cents)
PRIOR_RATE, PRIOR_WEIGHT = 0.25, 4.0


def is_paced(offer: Offer) -> bool:
    return offer.budget_cents is not None and offer.ends_at is not None and offer.budget_cents > 0


def price(offer: Offer, state: OfferState | None, now_ms: int, gain: float = DEFAULT_GAIN) -> float:
    """rho in [0, 1] for one offer (0 for offers that are not paced).

    >>> o = Offer("x", ["email"], cost=1, budget=100, starts_at=0, ends_at=1000)
    >>> price(o, OfferState("x", spent_cents=5000), now_ms=500)   # exactly on target
    0.0
    >>> price(o, OfferState("x", spent_cents=6000), now_ms=500)   # 10 % ahead of target
    1.0
    """
    if not is_paced(offer) or state is None:
        return 0.0
    budget = float(offer.budget_cents)  # type: ignore[arg-type]
    start = offer.starts_at if offer.starts_at is not None else now_ms
    end = offer.ends_at  # type: ignore[assignment]
    frac = min(1.0, max(0.0, (now_ms - start) / max(1, end - start)))
    unit = max(1.0, float(offer.cost_cents))
    rate = (state.spent_cents + PRIOR_RATE * PRIOR_WEIGHT * unit) / (
        state.settled_cents + state.committed_cents + PRIOR_WEIGHT * unit
    )
    projected = state.spent_cents + state.committed_cents * min(1.0, rate)
    rho = gain * (projected - budget * frac) / budget
    return float(min(1.0, max(0.0, rho)))


def prices(
    offers: Sequence[Offer], states: dict[str, OfferState], now_ms: int, gain: float = DEFAULT_GAIN
) -> np.ndarray | None:
    """rho per offer, or None when no offer is paced (the common case costs nothing)."""
    out = None
    for i, o in enumerate(offers):
        if is_paced(o):
            if out is None:
                out = np.zeros(len(offers))
            out[i] = price(o, states.get(o.offer_id), now_ms, gain)
    return out
