"""Frozen records: what leaves the ledger. ORM rows never do."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from ..catalog import check_features, is_finite_number
from ..errors import InvalidArgument

Group = Literal["treatment", "holdout"]
# open: reservation held, waiting for a reward; closed: rewarded and settled;
# expired: window closed (default reward applied); none: no offer was served.
Status = Literal["open", "closed", "expired", "none"]


@dataclass(frozen=True, slots=True)
class OfferState:
    """Live counters of one offer. ``committed`` is the liability of issued, unsettled offers."""

    offer_id: str
    spent_cents: int = 0
    committed_cents: int = 0
    impressions: int = 0
    settled_cents: int = 0  # reservations no longer held: booked into spent or released

    def remaining_cents(self, budget_cents: int | None) -> int | None:
        if budget_cents is None:
            return None
        return budget_cents - self.spent_cents - self.committed_cents


@dataclass(frozen=True, slots=True)
class Decision:
    """One choose call, as logged. ``probability`` is the exact probability the served offer was
    chosen with under the distribution actually used (after masking, pacing and the floor)."""

    event_id: str
    member_id: str
    channel: str
    group: Group
    offer_id: str | None
    probability: float | None
    policy_name: str
    policy_version: int
    issued_at: int
    deadline: int
    eligible: tuple[str, ...] = ()
    pmf: tuple[float, ...] = ()
    context: Mapping[str, Any] = field(default_factory=dict)
    offer_context: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    reason: str | None = None
    reserved_cents: int = 0
    active: bool = True
    learnable: bool = False
    status: Status = "open"
    reward: float | None = None
    reward_count: int = 0
    spent_cents: int = 0
    seq: int = 0
    # the reward learned for this decision when it was chosen (``ChannelConfig.
    # provisional_reward``), None if it was not learned provisionally; its settlement is then
    # logged as a correction of this value
    provisional: float | None = None
    # True when a choose re-sent a logged event id and got this stored decision back (not
    # stored: a property of the answer, so a re-send is not counted as a second decision)
    resent: bool = field(default=False, compare=False)

    def with_(self, **changes: Any) -> Decision:
        """A copy with ``changes`` (like :func:`dataclasses.replace`, which costs ~18 µs on this
        24-field record, twice per choose + reward; this costs ~4 µs).

        >>> from dataclasses import replace
        >>> d = Decision("e", "m", "email", "treatment", None, None, "uniform", 0, 0, 1)
        >>> d.with_(seq=3).seq, d.with_(seq=3) == replace(d, seq=3)
        (3, True)
        """
        unknown = changes.keys() - _DECISION_FIELD_SET
        if unknown:
            raise TypeError(f"Decision has no fields {sorted(unknown)}")
        return _copy_decision(self, changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "member_id": self.member_id,
            "channel": self.channel,
            "group": self.group,
            "offer_id": self.offer_id,
            "probability": self.probability,
            "policy": {"name": self.policy_name, "version": self.policy_version},
            "issued_at": self.issued_at,
            "deadline": self.deadline,
            "eligible": list(self.eligible),
            "pmf": list(self.pmf),
            "reason": self.reason,
            "active": self.active,
            "status": self.status,
            "reward": self.reward,
            "provisional": self.provisional,
        }

    def record(self) -> dict[str, Any]:
        """Every field, JSON-able: what an archive keeps (:meth:`from_record` reads it back).

        >>> d = Decision("e", "m", "email", "treatment", "o", 0.5, "thompson", 3, 0, 1,
        ...              eligible=("o", "p"), pmf=(0.5, 0.5), context={"tier": "gold"})
        >>> Decision.from_record(d.record()) == d
        True
        """
        out = {name: getattr(self, name) for name in _RECORD_FIELDS}
        out.update(
            eligible=list(self.eligible), pmf=list(self.pmf), context=dict(self.context),
            offer_context={k: dict(v) for k, v in self.offer_context.items()},
        )  # fmt: skip
        return out

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Decision:
        return cls(**{**rec, "eligible": tuple(rec["eligible"]), "pmf": tuple(rec["pmf"])})


_DECISION_FIELDS = tuple(f.name for f in fields(Decision))
_DECISION_FIELD_SET = frozenset(_DECISION_FIELDS)
_RECORD_FIELDS = tuple(n for n in _DECISION_FIELDS if n != "resent")


def _make_copier() -> Any:
    """``copy(d, changes)``: one unrolled slot assignment per field (generated once, at import)."""
    lines = ["def copy(d, changes):", "    new = _new(_cls)", "    get = changes.get"]
    lines += [f"    _set_{n}(new, get({n!r}, d.{n}))" for n in _DECISION_FIELDS]
    lines.append("    return new")
    scope: dict[str, Any] = {"_new": object.__new__, "_cls": Decision}
    scope.update({f"_set_{n}": getattr(Decision, n).__set__ for n in _DECISION_FIELDS})
    exec("\n".join(lines), scope)  # noqa: S102 - code built from the dataclass's own field names
    return scope["copy"]


_copy_decision = _make_copier()


FeedbackKind = Literal["final", "provisional", "correction"]


@dataclass(frozen=True, slots=True)
class Feedback:
    """A learning event, in log order (``seq``). The learner applies these and nothing else.

    ``kind``: ``final`` learns ``reward``; ``provisional`` learns the channel's provisional
    reward when the decision is made; ``correction`` carries the decision's final ``reward``
    and revises what its provisional event taught (by ``reward - decision.provisional``; a
    family that cannot correct skips the provisional event and learns this one as final)."""

    seq: int
    event_id: str
    channel: str
    reward: float
    learn: bool
    kind: FeedbackKind = "final"


@dataclass(frozen=True, slots=True)
class Reward:
    """One recorded reward of a decision (several under ``aggregation = "sum"``)."""

    event_id: str
    reward_id: str
    value: float
    cost_cents: int
    at: int


@dataclass(frozen=True, slots=True)
class Pruned:
    """A decision :meth:`Engine.prune <bandit_engine.Engine.prune>` removed from the ledger, with
    its rewards and feedback events: one line of a retention archive (:meth:`to_json`)."""

    decision: Decision
    rewards: tuple[Reward, ...] = ()
    feedback: tuple[Feedback, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "decision": self.decision.record(),
            "rewards": [{f.name: getattr(r, f.name) for f in fields(Reward)} for r in self.rewards],
            "feedback": [{f.name: getattr(e, f.name) for f in fields(Feedback)} for e in self.feedback],
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Pruned:
        """
        >>> d = Decision("e", "m", "email", "treatment", "o", 1.0, "thompson", 1, 0, 1,
        ...              eligible=("o",), pmf=(1.0,), status="closed", reward=1.0)
        >>> p = Pruned(d, (Reward("e", "", 1.0, 250, 5),), (Feedback(9, "e", "email", 1.0, True),))
        >>> Pruned.from_json(p.to_json()) == p
        True
        """
        return cls(
            Decision.from_record(obj["decision"]),
            tuple(Reward(**r) for r in obj["rewards"]),
            tuple(Feedback(**f) for f in obj["feedback"]),
        )


def read_archive(lines: Iterable[str]) -> Iterator[Pruned]:
    """The decisions of a retention archive (JSON lines written by ``Engine.prune``), each
    event id once: a batch archived again after a crash before its delete committed repeats
    its lines, and the first copy is kept.

    >>> d = Decision("e", "m", "email", "treatment", None, None, "uniform", 0, 0, 1, status="none")
    >>> line = json.dumps(Pruned(d).to_json())
    >>> [p.decision.event_id for p in read_archive([line, line, ""])]
    ['e']
    """
    seen: set[str] = set()
    for n, line in enumerate(_utf8_lines(lines), 1):
        if not line.strip():
            continue
        try:
            p = Pruned.from_json(json.loads(line))
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise InvalidArgument(f"archive line {n}: not a pruned decision ({exc!r})"[:300]) from None
        problem = _archived_problem(p.decision)
        if problem:  # an edited line read as a crash (an offer not eligible) or a wrong estimate
            raise InvalidArgument(f"archive line {n}: {problem}"[:300])
        if p.decision.event_id not in seen:
            seen.add(p.decision.event_id)
            yield p


# a decision's settled reward: the engine takes rewards up to 1e9 each, and a sum of several
SETTLED_REWARD_LIMIT = 1e12


def _archived_problem(d: Decision) -> str | None:
    """What makes an archived decision one the engine could not have logged, or None. Its
    context is checked as a choose checks one (it passed that check when it was logged)."""
    strings = (d.event_id, d.member_id, d.channel, d.policy_name, *d.eligible)
    if not all(isinstance(x, str) for x in strings):
        return "its ids, channel, policy name and eligible offers must be strings"
    if len(d.pmf) != len(d.eligible) or not all(is_finite_number(x) and 0 <= x <= 1 for x in d.pmf):
        return f"'pmf' must hold one probability per eligible offer, got {list(d.pmf)!r}"
    if d.offer_id is not None and d.offer_id not in d.eligible:
        return f"offer {d.offer_id!r} is not among its eligible offers {list(d.eligible)!r}"
    p = d.probability
    if p is not None and not (is_finite_number(p) and 0 < p <= 1):
        return f"'probability' must be in (0, 1], got {p!r}"
    r = d.reward
    if r is not None and not (is_finite_number(r) and abs(r) <= SETTLED_REWARD_LIMIT):
        return (f"'reward' must be a number between {-SETTLED_REWARD_LIMIT:g} and "
                f"{SETTLED_REWARD_LIMIT:g}, got {r!r}")  # fmt: skip
    try:
        check_features("context", d.context)
    except InvalidArgument as exc:
        return f"'context': {exc.message}"
    if not isinstance(d.offer_context, Mapping) or not all(
        isinstance(f, Mapping)
        and all(isinstance(k, str) and is_finite_number(v) for k, v in f.items())
        for f in d.offer_context.values()
    ):  # fmt: skip
        return "'offer_context' must map offers to {name: finite number}"
    return None


def _utf8_lines(lines: Iterable[str]) -> Iterator[str]:
    """``lines``; a file opened as UTF-8 text that is not (a database given for its archive)
    is an error naming where, not a ``UnicodeDecodeError`` traceback."""
    it, n = iter(lines), 0
    while True:
        try:
            line = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as exc:
            where = f"after line {n}" if n else "in its first lines"
            raise InvalidArgument(f"archive: not UTF-8 text {where} ({exc.reason}); is it an "
                                  f"archive `bandit-engine prune` wrote?") from None  # fmt: skip
        n += 1
        yield line


@dataclass(frozen=True, slots=True)
class RewardOutcome:
    event_id: str
    status: Literal["recorded", "duplicate"]
    reward: float | None
    spent_cents: int
    feedback: Feedback | None = None
    decision: Decision | None = None


@dataclass(frozen=True, slots=True)
class HistoryItem:
    """One past exposure of a member (for frequency caps and member features)."""

    offer_id: str
    channel: str
    issued_at: int
    reward: float | None
    status: Status


@dataclass(frozen=True, slots=True)
class Snapshot:
    channel: str
    policy_name: str
    version: int
    feedback_seq: int
    data: bytes
    created_at: int
