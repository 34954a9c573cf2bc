"""The in-memory ledger: the product backend for simulations (same protocol as :mod:`.sql`).

One lock makes every write atomic; caps are checked inside the locked section.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from ..catalog import ChannelConfig, MemberCap, Offer
from ..errors import (
    CapExceeded,
    CatalogChanged,
    Conflict,
    InvalidArgument,
    UnknownEvent,
)
from .records import Decision, Feedback, HistoryItem, OfferState, Pruned, RewardOutcome, Snapshot
from .settle import (
    OfferDelta,
    check_window_open,
    settle_expiry,
    settle_reward,
    settlement_kind,
)


class MemoryLedger:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._offers: dict[str, Offer] = {}
        self._channels: dict[str, ChannelConfig] = {}
        self._state: dict[str, OfferState] = {}
        self._decisions: dict[str, Decision] = {}
        self._log: list[Decision] = []  # in seq order
        self._by_member: dict[str, list[str]] = defaultdict(list)
        self._rewards: set[tuple[str, str]] = set()
        self._open: dict[str, None] = {}  # event ids with status open, insertion = seq order
        self._feedback: list[Feedback] = []
        self._snapshots: dict[str, Snapshot] = {}
        self._catalog_version = 0
        self._settings: dict[str, Any] = {}

    # catalog ---------------------------------------------------------------------------------
    def _expect(self, version: int | None) -> None:
        """(Under the lock.) As :meth:`SqlLedger._bump_catalog`'s ``expect``: a write
        conditioned on a catalog version that has moved on raises, before anything changes."""
        if version is not None and version != self._catalog_version:
            raise CatalogChanged(f"the catalog changed since version {version} was read")

    def _bump_catalog(self, expect: int | None) -> None:
        self._expect(expect)
        self._catalog_version += 1

    def put_offer(self, offer: Offer, *, expect_version: int | None = None) -> None:
        with self._lock:
            self._expect(expect_version)
            st = self._state.get(offer.offer_id)
            budget, cap = offer.budget_cents, offer.max_impressions
            if st is not None and (
                (budget is not None and st.spent_cents + st.committed_cents > budget)
                or (cap is not None and st.impressions > cap)
            ):  # checked before anything changes, as the SQL ledger's guarded update
                raise Conflict(
                    f"offer {offer.offer_id!r}: its budget or impression cap would be below what "
                    "is already spent and committed, or shown"
                )
            self._bump_catalog(expect_version)
            self._offers[offer.offer_id] = offer
            self._state.setdefault(offer.offer_id, OfferState(offer.offer_id))

    def offers(self) -> list[Offer]:
        with self._lock:
            return [self._offers[k] for k in sorted(self._offers)]

    def put_channels(
        self, channels: Iterable[ChannelConfig], *, expect_version: int | None = None
    ) -> None:
        with self._lock:
            self._bump_catalog(expect_version)
            for channel in channels:
                self._channels[channel.name] = channel

    def channels(self) -> dict[str, ChannelConfig]:
        with self._lock:
            return dict(sorted(self._channels.items()))

    def put_setting(self, name: str, value: Any, *, expect_version: int | None = None) -> None:
        with self._lock:
            self._bump_catalog(expect_version)
            self._settings[name] = value

    def settings(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._settings)

    def catalog_version(self) -> int:
        return self._catalog_version

    # state -----------------------------------------------------------------------------------
    def offer_states(self, offer_ids: Iterable[str] | None = None) -> dict[str, OfferState]:
        with self._lock:
            if offer_ids is None:
                return dict(self._state)
            return {i: self._state[i] for i in offer_ids if i in self._state}

    def member_history(self, member_id: str, since_ms: int, limit: int | None = None) -> list[HistoryItem]:
        with self._lock:
            out = []
            for eid in reversed(self._by_member.get(member_id, ())):
                d = self._decisions[eid]
                if d.issued_at < since_ms or len(out) == limit:
                    break
                out.append(HistoryItem(d.offer_id, d.channel, d.issued_at, d.reward, d.status))  # type: ignore[arg-type]
            out.reverse()
            return out

    def read_state(
        self, member_id: str, since_ms: int, offer_ids: Iterable[str], limit: int | None = None
    ) -> tuple[list[HistoryItem], dict[str, OfferState]]:
        with self._lock:
            return self.member_history(member_id, since_ms, limit), self.offer_states(offer_ids)

    def get_decision(self, event_id: str) -> Decision | None:
        return self._decisions.get(event_id)

    def count_decisions(self) -> int:
        return len(self._log)

    # writes ----------------------------------------------------------------------------------
    def log_decision(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> Decision:
        return self.log_decision_feedback(decision, offer, member_caps)[0]

    def log_decision_feedback(
        self, decision: Decision, offer: Offer | None, member_caps: Mapping[str, MemberCap]
    ) -> tuple[Decision, Feedback | None]:
        with self._lock:
            existing = self._decisions.get(decision.event_id)
            if existing is not None:
                return existing.with_(resent=True), None
            if offer is not None:
                self._check_member_caps(decision, member_caps)
                # the stored caps, as the SQL ledgers' guarded update reads them: the caller's
                # copy of the offer may predate a lowered budget or cap (its catalog refresh)
                offer = self._offers.get(offer.offer_id, offer)
                st = self._state[offer.offer_id]
                cost = decision.reserved_cents
                if (
                    offer.budget_cents is not None
                    and st.spent_cents + st.committed_cents + cost > offer.budget_cents
                ):
                    raise CapExceeded(f"budget of {offer.offer_id!r} exhausted", offer.offer_id, "budget")
                if offer.max_impressions is not None and st.impressions >= offer.max_impressions:
                    raise CapExceeded(
                        f"impression cap of {offer.offer_id!r} reached", offer.offer_id, "impressions"
                    )
                self._state[offer.offer_id] = OfferState(
                    offer.offer_id, st.spent_cents, st.committed_cents + cost, st.impressions + 1,
                    st.settled_cents,
                )
            stored = decision.with_(seq=len(self._log) + 1)
            self._decisions[stored.event_id] = stored
            self._log.append(stored)
            if offer is not None:
                self._by_member[stored.member_id].append(stored.event_id)
            if stored.status == "open":
                self._open[stored.event_id] = None
            fb = None
            if stored.provisional is not None:
                fb = self._emit(stored, stored.provisional, "provisional")
            return stored, fb

    def _check_member_caps(self, decision: Decision, caps: Mapping[str, MemberCap]) -> None:
        if not caps:
            return
        now = decision.issued_at
        ids = self._by_member.get(decision.member_id, ())
        for key, cap in caps.items():
            since = now - cap.window_ms
            n = 0
            for eid in reversed(ids):
                d = self._decisions[eid]
                if d.issued_at <= since:
                    break
                if key == "*" or d.offer_id == key:
                    n += 1
            if n >= cap.max:
                scope = "all offers" if key == "*" else repr(key)
                raise CapExceeded(
                    f"member frequency cap on {scope} reached ({cap.max} per {cap.window_days} days)",
                    decision.offer_id if key != "*" else None,
                    "member" if key != "*" else "member_all",
                )

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
        with self._lock:
            d = self._decisions.get(event_id)
            if d is None:
                raise UnknownEvent(f"unknown event {event_id!r}")
            agg = aggregation if isinstance(aggregation, str) else aggregation.get(d.channel, "first")
            rid = reward_id or event_id
            if (event_id, rid) in self._rewards or (agg == "first" and d.reward_count):
                return RewardOutcome(event_id, "duplicate", d.reward, d.spent_cents, None, d)
            new, delta, feedback_reward = settle_reward(d, value, cost_cents, now_ms, agg)
            self._rewards.add((event_id, rid))
            self._replace(new)
            self._apply(new.offer_id, delta)
            fb = None
            if feedback_reward is not None:
                fb = self._emit(new, feedback_reward)
            return RewardOutcome(event_id, "recorded", new.reward, new.spent_cents, fb, new)

    def _apply(self, offer_id: str | None, delta: OfferDelta) -> None:
        if offer_id is None:
            return
        st = self._state[offer_id]
        self._state[offer_id] = OfferState(
            offer_id,
            st.spent_cents + delta.spent,
            st.committed_cents + delta.committed,
            st.impressions,
            st.settled_cents + delta.settled,
        )

    def activate(self, event_id: str, now_ms: int) -> Decision:
        with self._lock:
            d = self._decisions.get(event_id)
            if d is None:
                raise UnknownEvent(f"unknown event {event_id!r}")
            check_window_open(d, now_ms)
            if not d.active:
                d = d.with_(active=True)
                self._replace(d)
            return d

    def expire(self, now_ms: int, default_rewards: Mapping[str, float]) -> list[Feedback]:
        out: list[Feedback] = []
        with self._lock:
            for eid in list(self._open):
                d = self._decisions[eid]
                if d.deadline >= now_ms:
                    continue
                new, delta, feedback_reward = settle_expiry(d, default_rewards.get(d.channel, 0.0))
                self._replace(new)
                self._apply(new.offer_id, delta)
                if feedback_reward is not None:
                    out.append(self._emit(new, feedback_reward))
        return out

    def _replace(self, d: Decision) -> None:
        self._decisions[d.event_id] = d
        self._log[d.seq - 1] = d
        if d.status != "open":
            self._open.pop(d.event_id, None)

    def _emit(self, d: Decision, reward: float, kind: str | None = None) -> Feedback:
        fb = Feedback(
            len(self._feedback) + 1, d.event_id, d.channel, reward, d.learnable and d.active,
            kind or settlement_kind(d),  # type: ignore[arg-type]
        )
        self._feedback.append(fb)
        return fb

    # log -------------------------------------------------------------------------------------
    def feedback_after(self, seq: int, limit: int = 10_000) -> list[Feedback]:
        with self._lock:
            return self._feedback[seq : seq + limit]

    def last_feedback_seq(self) -> int:
        return len(self._feedback)

    def decisions(
        self, *, channel: str | None = None, after_seq: int = 0, limit: int | None = None
    ) -> Iterator[Decision]:
        n = 0
        for d in self._log[after_seq:]:
            if channel is None or d.channel == channel:
                yield d
                n += 1
                if limit is not None and n >= limit:
                    return

    def decisions_by_event(self, event_ids: Iterable[str]) -> dict[str, Decision]:
        return {e: self._decisions[e] for e in event_ids if e in self._decisions}

    # snapshots -------------------------------------------------------------------------------
    def save_snapshot(self, snapshot: Snapshot) -> None:
        with self._lock:
            self._snapshots[snapshot.channel] = snapshot

    def latest_snapshot(self, channel: str) -> Snapshot | None:
        return self._snapshots.get(channel)

    # retention -------------------------------------------------------------------------------
    def prune(
        self,
        before_ms: int,
        covered: Mapping[str, int],
        archive: Callable[[list[Pruned]], None],
        *,
        batch: int = 1000,
    ) -> int:
        raise InvalidArgument(
            "the in-memory ledger lives as long as its process and keeps every decision; "
            "prune applies to the SQLite and PostgreSQL ledgers"
        )

    def close(self) -> None:
        return None
