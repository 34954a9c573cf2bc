"""The ledger protocol, implemented by :mod:`.sql` (SQLite/PostgreSQL) and :mod:`.memory`.

Every method that changes state is atomic: it either applies completely or raises and changes
nothing. Caps are checked *inside* the write (guarded updates), never by a read-then-write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from ..catalog import ChannelConfig, MemberCap, Offer
from .records import Decision, Feedback, HistoryItem, OfferState, Pruned, RewardOutcome, Snapshot


class Ledger(Protocol):
    # catalog ---------------------------------------------------------------------------------
    # Every catalog write moves the catalog version on. With ``expect_version`` it writes only
    # if the version is still that one, and raises CatalogChanged otherwise, writing nothing: a
    # read-modify-write (the engine's update_offer, say) cannot undo a write it did not see.
    def put_offer(self, offer: Offer, *, expect_version: int | None = None) -> None:
        """Add or replace an offer. Its budget and impression cap are checked against what is
        already spent, committed and shown in the same write (Conflict if below)."""
        ...

    def offers(self) -> list[Offer]: ...
    def put_channels(
        self, channels: Iterable[ChannelConfig], *, expect_version: int | None = None
    ) -> None:
        """Store channel configurations, all in one transaction (one catalog version)."""
        ...

    def channels(self) -> dict[str, ChannelConfig]: ...
    def put_setting(self, name: str, value: Any, *, expect_version: int | None = None) -> None:
        """Store an engine-wide setting (JSON-able ``value``; None clears it)."""
        ...

    def settings(self) -> dict[str, Any]: ...
    def catalog_version(self) -> int:
        """A number that changes whenever an offer, channel or setting changes (cache
        invalidation)."""
        ...

    # state -----------------------------------------------------------------------------------
    def offer_states(self, offer_ids: Iterable[str] | None = None) -> dict[str, OfferState]: ...
    def member_history(self, member_id: str, since_ms: int) -> list[HistoryItem]: ...
    def read_state(
        self, member_id: str, since_ms: int, offer_ids: Iterable[str], limit: int | None = None
    ) -> tuple[list[HistoryItem], dict[str, OfferState]]:
        """The member's history and the offers' counters, in one read (what choose needs). With
        ``limit``, only the member's latest ``limit`` exposures since ``since_ms`` (by issue time;
        the history comes in log order either way)."""
        ...

    def get_decision(self, event_id: str) -> Decision | None: ...
    def count_decisions(self) -> int: ...

    # the atomic writes -----------------------------------------------------------------------
    def log_decision(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> Decision:
        """Reserve ``decision.reserved_cents`` on the offer, count the exposure and write the
        decision, all or nothing. ``member_caps`` maps an offer id (or ``"*"`` for all offers
        across channels) to a cap checked against this member's exposures. Raises
        :class:`~bandit_engine.errors.CapExceeded` if any cap would break. If the event id is
        already logged, returns the stored decision unchanged."""
        ...

    def log_decision_feedback(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> tuple[Decision, Feedback | None]:
        """:meth:`log_decision`, also writing (in the same transaction) the decision's
        ``provisional`` feedback event when it has a ``provisional`` reward and serves an offer;
        returns it too (None when there is none, or when the event id was already logged)."""
        ...

    def record_reward(
        self,
        event_id: str,
        value: float,
        cost_cents: int | None,
        now_ms: int,
        *,
        reward_id: str | None = None,
        aggregation: str | Mapping[str, str] = "first",
    ) -> RewardOutcome:
        """Settle one reward. ``aggregation`` is "first"/"sum", or a mapping channel -> that."""
        ...

    def activate(self, event_id: str, now_ms: int) -> Decision: ...

    def expire(self, now_ms: int, default_rewards: Mapping[str, float]) -> list[Feedback]:
        """Close every open decision whose deadline has passed: release its reservation, give it
        its channel's default reward (or its accumulated sum) and emit its feedback."""
        ...

    # the log ---------------------------------------------------------------------------------
    def feedback_after(self, seq: int, limit: int = 10_000) -> list[Feedback]: ...
    def last_feedback_seq(self) -> int: ...
    def decisions(
        self, *, channel: str | None = None, after_seq: int = 0, limit: int | None = None
    ) -> Iterator[Decision]: ...
    def decisions_by_event(self, event_ids: Iterable[str]) -> dict[str, Decision]: ...

    # checkpoints -----------------------------------------------------------------------------
    def save_snapshot(self, snapshot: Snapshot) -> None: ...
    def latest_snapshot(self, channel: str) -> Snapshot | None: ...

    # retention -------------------------------------------------------------------------------
    def prune(
        self,
        before_ms: int,
        covered: Mapping[str, int],
        archive: Callable[[list[Pruned]], None],
        *,
        batch: int = 1000,
    ) -> int:
        """Delete settled decisions (any status but ``open``) issued before ``before_ms`` on the
        channels of ``covered``, with their rewards and feedback events, ``batch`` decisions per
        transaction; returns how many. ``covered`` maps a channel to the log position its
        model's checkpoint reaches: a decision with a feedback event past it is kept (a model
        restored from that checkpoint still replays the event). Each batch goes to ``archive``
        inside the transaction that deletes it, so an archive that raises deletes nothing of
        that batch."""
        ...

    def close(self) -> None: ...
