"""Masking: which candidate offers can be served without breaking a cap, judged from the
state read at the start of choose. The ledger re-checks every cap atomically when it reserves,
so a race lost here only costs a retry, never a breach."""

from __future__ import annotations

from collections.abc import Sequence

from .catalog import MemberCap, Offer
from .ledger.records import HistoryItem, OfferState


def member_caps(offer: Offer, member_cap: MemberCap | None) -> dict[str, MemberCap]:
    """The frequency caps the ledger must check when this offer is served to a member."""
    caps: dict[str, MemberCap] = {}
    if offer.member_cap is not None:
        caps[offer.offer_id] = offer.member_cap
    if member_cap is not None:
        caps["*"] = member_cap
    return caps


def member_capped(history: Sequence[HistoryItem], now_ms: int, cap: MemberCap | None) -> bool:
    """True when the member has used up the cross-channel exposure budget."""
    if cap is None:
        return False
    since = now_ms - cap.window_ms
    return sum(1 for h in history if h.issued_at > since) >= cap.max


def mask(
    candidates: Sequence[Offer],
    states: dict[str, OfferState],
    history: Sequence[HistoryItem],
    now_ms: int,
) -> tuple[list[Offer], dict[str, str]]:
    """(eligible offers, {masked offer id: reason}) under budget, impression and per-offer
    member caps."""
    eligible: list[Offer] = []
    masked: dict[str, str] = {}
    for o in candidates:
        if o.budget_cents is None and o.max_impressions is None and o.member_cap is None:
            eligible.append(o)  # nothing to check
            continue
        st = states.get(o.offer_id)
        if st is None:
            masked[o.offer_id] = "unknown_state"
            continue
        if o.budget_cents is not None and st.spent_cents + st.committed_cents + o.cost_cents > o.budget_cents:
            masked[o.offer_id] = "budget"
            continue
        if o.max_impressions is not None and st.impressions >= o.max_impressions:
            masked[o.offer_id] = "impressions"
            continue
        if o.member_cap is not None:
            since = now_ms - o.member_cap.window_ms
            seen = sum(1 for h in history if h.offer_id == o.offer_id and h.issued_at > since)
            if seen >= o.member_cap.max:
                masked[o.offer_id] = "member_cap"
                continue
        eligible.append(o)
    return eligible, masked
