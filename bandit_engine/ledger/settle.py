"""Settlement rules shared by every ledger backend: what a reward or an expiry does to a
decision. Backends apply the result atomically; the rules live here once."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CostAboveReservation, InvalidArgument, RewardWindowClosed
from .records import Decision, FeedbackKind


@dataclass(frozen=True, slots=True)
class OfferDelta:
    """What a settlement does to the offer's counters."""

    spent: int = 0
    committed: int = 0
    settled: int = 0  # reservation no longer held: booked into spent or released

    def __add__(self, other: OfferDelta) -> OfferDelta:
        return OfferDelta(self.spent + other.spent, self.committed + other.committed, self.settled + other.settled)


def _delta(old: Decision, new: Decision) -> OfferDelta:
    """A settlement only ever lowers what a decision holds, and what leaves ``committed`` enters
    ``settled`` then, whether booked or released: ``settled + committed`` stays every
    reservation ever made, which pacing's redemption rate divides by. (A redemption of a
    ``sum`` channel books its cost but keeps the decision open until its window closes.)"""
    held_before = old.reserved_cents - old.spent_cents
    held_after = new.reserved_cents - new.spent_cents
    return OfferDelta(
        spent=new.spent_cents - old.spent_cents,
        committed=held_after - held_before,
        settled=held_before - held_after,
    )


def check_window_open(d: Decision, now_ms: int) -> None:
    """Refuse a reward or an activation of a decision that is settled, or whose window has
    passed (not yet expired: it still reads ``open``), each saying which."""
    if d.status in ("closed", "expired"):
        raise RewardWindowClosed(f"event {d.event_id!r} is already settled ({d.status})")
    if now_ms > d.deadline:
        raise RewardWindowClosed(
            f"the reward window of event {d.event_id!r} closed at {d.deadline} (now {now_ms})"
        )


def settle_reward(
    d: Decision,
    value: float,
    cost_cents: int | None,
    now_ms: int,
    aggregation: str,
) -> tuple[Decision, OfferDelta, float | None]:
    """Apply one (non-duplicate) reward. Returns (new decision, offer delta, feedback reward or
    None). Raises without side effects if the reward is not acceptable."""
    check_window_open(d, now_ms)
    if d.status == "none":
        raise InvalidArgument(f"event {d.event_id!r} served no offer; there is nothing to reward")
    if d.offer_id is None and cost_cents:
        raise InvalidArgument(
            f"event {d.event_id!r} is a hold-out decision that served no offer: its outcome has no cost"
        )
    held = d.reserved_cents - d.spent_cents
    if cost_cents is None:
        # the reservation is the unit cost at issuance: a redemption books it (what is left of it)
        cost_cents = min(d.reserved_cents, held) if value > 0 else 0
    if cost_cents < 0:
        raise InvalidArgument(f"cost must be >= 0, got {cost_cents / 100}")
    if cost_cents > held:
        raise CostAboveReservation(
            f"cost {cost_cents / 100:.2f} exceeds the {held / 100:.2f} still reserved for "
            f"event {d.event_id!r}"
        )
    total = value if d.reward is None else d.reward + value
    spent = d.spent_cents + cost_cents
    if aggregation == "first":
        # settle now: book the cost, release the rest, learn from this reward
        new = d.with_(
            reward=total, reward_count=d.reward_count + 1, spent_cents=spent,
            reserved_cents=spent, status="closed", active=True,
        )  # fmt: skip
        return new, _delta(d, new), total
    # sum: keep the reservation open until the window closes; learn from the total at expiry
    new = d.with_(reward=total, reward_count=d.reward_count + 1, spent_cents=spent, active=True)
    return new, _delta(d, new), None


def settle_expiry(
    d: Decision, default_reward: float
) -> tuple[Decision, OfferDelta, float | None]:
    """Close an open decision whose window passed. Releases what is still reserved.
    Returns (new decision, feedback reward or None when nothing is to be learned)."""
    reward = d.reward if d.reward is not None else default_reward
    new = d.with_(status="expired", reserved_cents=d.spent_cents, reward=reward)
    return new, _delta(d, new), reward


def settled_by(d: Decision, now: int, default_reward: float) -> Decision | None:
    """``d`` as its outcome stands at ``now`` (epoch ms) once its reward window has closed, for
    what reports on outcomes: a decision still ``open`` past its deadline (no expiry has run
    since) as expiry will settle it (nothing is written). None while the window is open, the
    deadline itself included (a reward may still come then): a redemption settles its decision
    at once (``aggregation="first"``) but a miss only at the window's close, so the outcomes of
    open windows are mostly redemptions and would read too high. None too for a decision that
    never settles (status ``none``)."""
    if d.deadline > now or (d.status == "open" and d.deadline == now):
        return None
    if d.status == "open":
        return settle_expiry(d, default_reward)[0]
    return d if d.status in ("closed", "expired") else None


def settlement_kind(d: Decision) -> FeedbackKind:
    """The kind of a decision's settlement feedback: a correction of its provisional reward if
    it was learned provisionally when chosen, else the final reward."""
    return "final" if d.provisional is None else "correction"
