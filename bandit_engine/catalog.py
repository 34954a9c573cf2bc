"""The offer catalog and channel configuration: frozen, validated at construction.

Money is accepted in currency units (``cost=5.00``) and stored as integer minor units
(``cost_cents=500``); floats never accumulate spend.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, Literal

from .clock import MS_PER_DAY, to_ms
from .errors import InvalidArgument

CHANNELS: tuple[str, ...] = ("email", "in_app", "push", "site", "sms")
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}")  # the whole id (fullmatch)
FeatureValue = float | int | str | bool
MAX_INT_FEATURE = 2**53  # integers a float (every model's number) holds exactly
MAX_COUNT = 10**12  # impressions, cap counts: plausible, and far inside a 64-bit column
REWARD_LIMIT = 1e9  # |reward|: a reward, a default or provisional one (a sum stays finite)
MAX_FEATURES = 64  # an offer's features, as a request's context keys
# epoch milliseconds from 1970 to the end of year 9999
MAX_EPOCH_MS = 253_402_300_799_999


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages (a 5 000-character id
    is not echoed back whole)."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def is_finite_number(v: object) -> bool:
    """A finite float, or an int a float can hold (``float(v)`` is finite); not a bool.
    ``math.isfinite`` alone raises ``OverflowError`` on an int too large for a float (a JSON
    body can carry a 400-digit integer)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -_FLOAT_MAX <= v <= _FLOAT_MAX  # exact: Python compares int and float exactly
    return isinstance(v, float) and math.isfinite(v)


_FLOAT_MAX = sys.float_info.max


def is_text(s: str) -> bool:
    """Whether ``s`` is valid Unicode text, i.e. encodes to UTF-8: a lone surrogate
    (``"\\ud800"``, valid in JSON and in a Python str) does not, and would fail every hash and
    database write that meets it."""
    if s.isascii():
        return True
    try:
        s.encode()
    except UnicodeEncodeError:
        return False
    return True


def same_features(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two feature mappings are the same, value types included: ``1 == True == 1.0``
    in Python, but a model sees a number, a bool and a float differently."""
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


def check_id(kind: str, value: object) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{kind} must be 1-128 characters of letters, digits or _.:@/- "
            f"(starting with a letter or digit), got {shown(value)}"
        )
    return value


def to_cents(name: str, amount: object, *, allow_none: bool = False) -> int | None:
    """Currency units -> integer minor units, exactly (``5.005`` rounds half up to 501)."""
    if amount is None and allow_none:
        return None
    if isinstance(amount, bool) or not isinstance(amount, int | float | Decimal | str):
        raise InvalidArgument(f"{name} must be a number of currency units, got {shown(amount)}")
    try:
        d = Decimal(str(amount))
    except InvalidOperation:
        raise InvalidArgument(f"{name} must be a number, got {shown(amount)}") from None
    if not d.is_finite() or d < 0:
        raise InvalidArgument(f"{name} must be a finite amount >= 0, got {shown(amount)}")
    if d > Decimal("1e12"):
        raise InvalidArgument(f"{name} is implausibly large: {shown(amount)}")
    return int((d * 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def check_features(name: str, features: Mapping[str, Any] | None) -> Mapping[str, FeatureValue]:
    if features is None:
        return MappingProxyType({})
    if not isinstance(features, Mapping):
        raise InvalidArgument(f"{name} must be a mapping of name -> number|string|bool")
    isfinite = math.isfinite
    for k, v in features.items():
        if type(k) is not str or not k or len(k) > 64 or not is_text(k):
            raise InvalidArgument(
                f"{name} keys must be non-empty strings of <= 64 characters of valid Unicode "
                f"(no lone surrogates), got {shown(k)}"
            )
        t = type(v)
        if t is float:
            if not isfinite(v):
                raise InvalidArgument(f"{name}[{k!r}] must be finite, got {v!r}")
        elif t is str:
            if len(v) > 256:
                raise InvalidArgument(f"{name}[{k!r}] is longer than 256 characters")
            if not is_text(v):
                raise InvalidArgument(f"{name}[{k!r}] is not valid Unicode (a lone surrogate)")
        elif t is bool:
            pass
        elif isinstance(v, int):  # int and its subclasses (bool is taken above), one check
            if not -MAX_INT_FEATURE <= v <= MAX_INT_FEATURE:
                raise InvalidArgument(f"{name}[{k!r}] must be an integer of magnitude <= 2**53, got {shown(v)}")
        else:
            if isinstance(v, str):  # a subclass
                continue
            if not isinstance(v, float):
                raise InvalidArgument(f"{name}[{k!r}] must be a number, string or bool, got {shown(v)}")
            if not isfinite(v):
                raise InvalidArgument(f"{name}[{k!r}] must be finite, got {v!r}")
    return MappingProxyType(dict(sorted(features.items())))


RuleOp = Literal["in", "not_in", "eq", "ne", "gt", "gte", "lt", "lte"]
_OPS = ("in", "not_in", "eq", "ne", "gt", "gte", "lt", "lte")


@dataclass(frozen=True)
class Rule:
    """An eligibility rule on the request context, as data: ``Rule("tier", "in", ["gold"])``.

    A context missing the field fails the rule (fail closed), except for ``not_in``/``ne``.

    >>> Rule("tier", "in", ["gold", "platinum"]).matches({"tier": "gold"})
    True
    >>> Rule("frequency", "gte", 3).matches({"frequency": 1})
    False
    """

    field: str
    op: RuleOp
    value: Any

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field:
            raise InvalidArgument(f"Rule.field must be a non-empty string, got {self.field!r}")
        if self.op not in _OPS:
            raise InvalidArgument(f"Rule.op must be one of {_OPS}, got {self.op!r}")
        if self.op in ("in", "not_in"):
            if isinstance(self.value, str) or not isinstance(self.value, Iterable):
                raise InvalidArgument(f"Rule {self.op!r} needs a list of values, got {self.value!r}")
            object.__setattr__(self, "value", tuple(self.value))
        elif self.op in ("gt", "gte", "lt", "lte") and not is_finite_number(self.value):
            raise InvalidArgument(
                f"Rule {self.op!r} needs a finite number, got {shown(self.value)}"
            )
        values = self.value if self.op in ("in", "not_in") else (self.value,)
        for v in values:  # stored and served as JSON: no Infinity, no lone surrogate
            bad_float = isinstance(v, float) and not math.isfinite(v)
            if bad_float or (isinstance(v, str) and not is_text(v)):
                raise InvalidArgument(
                    f"Rule {self.field!r} {self.op}: a value must be a finite number or valid "
                    f"Unicode text, got {shown(v)}"
                )

    def matches(self, context: Mapping[str, Any]) -> bool:
        if self.field not in context:
            return self.op in ("not_in", "ne")
        v = context[self.field]
        op = self.op
        if op == "in":
            return v in self.value
        if op == "not_in":
            return v not in self.value
        if op == "eq":
            return bool(v == self.value)
        if op == "ne":
            return bool(v != self.value)
        if isinstance(v, bool) or not isinstance(v, int | float):
            return False
        if op == "gt":
            return v > self.value
        if op == "gte":
            return v >= self.value
        if op == "lt":
            return v < self.value
        return v <= self.value

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return {"field": self.field, "op": self.op, "value": value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Rule:
        """``{"field", "op", "value"}``, nothing else."""
        if not isinstance(d, Mapping) or set(d) != {"field", "op", "value"}:
            raise InvalidArgument(f"a rule is {{field, op, value}}, got {shown(d)}")
        return cls(d["field"], d["op"], d["value"])


@dataclass(frozen=True)
class MemberCap:
    """At most ``max`` exposures per member within a rolling window of ``window_days``."""

    max: int
    window_days: float

    def __post_init__(self) -> None:
        if isinstance(self.max, bool) or not isinstance(self.max, int) or not 1 <= self.max <= MAX_COUNT:
            raise InvalidArgument(f"MemberCap.max must be an integer in [1, 10**12], got {shown(self.max)}")
        if (
            isinstance(self.window_days, bool)
            or not isinstance(self.window_days, int | float)
            or not (0 < self.window_days <= 3660)
        ):
            raise InvalidArgument(
                f"MemberCap.window_days must be in (0, 3660], got {shown(self.window_days)}"
            )

    @property
    def window_ms(self) -> int:
        return int(self.window_days * MS_PER_DAY)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MemberCap:
        """``{"max": int, "window_days": number}``, nothing else."""
        if not isinstance(d, Mapping) or set(d) != {"max", "window_days"}:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise InvalidArgument(f"a member cap is {{max, window_days}}, got {got}")
        return cls(d["max"], d["window_days"])

    def to_dict(self) -> dict[str, Any]:
        return {"max": self.max, "window_days": self.window_days}

    @classmethod
    def coerce(cls, value: MemberCap | Mapping[str, Any] | None) -> MemberCap | None:
        """A cap given as a MemberCap, its ``{max, window_days}`` mapping, or None (no cap)."""
        if value is None or isinstance(value, MemberCap):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise InvalidArgument(
            f"member_cap must be a MemberCap, a {{max, window_days}} mapping or None, got {value!r}"
        )


@dataclass(frozen=True, eq=True)
class Offer:
    """An item of the catalog; it *is* the arm.

    >>> o = Offer("spring-home-10", channels=["email"], cost=5.00, budget=2000.00,
    ...           features={"category": "home", "discount": 0.10})
    >>> o.cost_cents, o.budget_cents, o.channels
    (500, 200000, ('email',))
    """

    offer_id: str
    channels: tuple[str, ...]
    cost: float = 0.0
    budget: float | None = None
    features: Mapping[str, FeatureValue] = field(default_factory=dict)
    max_impressions: int | None = None
    member_cap: MemberCap | None = None
    starts_at: int | None = None
    ends_at: int | None = None
    active: bool = True
    rules: tuple[Rule, ...] = ()
    cost_cents: int = field(init=False, repr=False, compare=False)
    budget_cents: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_id("offer_id", self.offer_id)
        chans = (self.channels,) if isinstance(self.channels, str) else tuple(self.channels or ())
        if not chans:
            raise InvalidArgument(f"offer {self.offer_id!r} needs at least one channel")
        for c in chans:
            check_id("channel", c)
        object.__setattr__(self, "channels", tuple(sorted(set(chans))))
        object.__setattr__(self, "cost_cents", to_cents("cost", self.cost))
        object.__setattr__(self, "budget_cents", to_cents("budget", self.budget, allow_none=True))
        object.__setattr__(self, "features", check_features("features", self.features))
        if len(self.features) > MAX_FEATURES:
            raise InvalidArgument(f"an offer has at most {MAX_FEATURES} features, got {len(self.features)}")
        if self.max_impressions is not None and (
            isinstance(self.max_impressions, bool)
            or not isinstance(self.max_impressions, int)
            or not 0 <= self.max_impressions <= MAX_COUNT
        ):
            raise InvalidArgument(
                f"max_impressions must be an integer in [0, 10**12], got {shown(self.max_impressions)}"
            )
        object.__setattr__(self, "member_cap", MemberCap.coerce(self.member_cap))
        try:
            object.__setattr__(self, "starts_at", to_ms(self.starts_at))
            object.__setattr__(self, "ends_at", to_ms(self.ends_at))
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"starts_at/ends_at must be datetimes, ISO-8601 strings or epoch ms, "
                f"got {self.starts_at!r}, {self.ends_at!r}"
            ) from None
        for name in ("starts_at", "ends_at"):
            at = getattr(self, name)
            if at is not None and not 0 <= at <= MAX_EPOCH_MS:
                raise InvalidArgument(f"{name} must lie between 1970 and the year 9999, got {shown(at)}")
        if self.starts_at is not None and self.ends_at is not None and self.ends_at <= self.starts_at:
            raise InvalidArgument(f"offer {self.offer_id!r}: ends_at must be after starts_at")
        if not isinstance(self.active, bool):
            raise InvalidArgument(f"active must be a bool, got {self.active!r}")
        rules = tuple(r if isinstance(r, Rule) else Rule.from_dict(r) for r in self.rules)
        object.__setattr__(self, "rules", rules)

    def is_live(self, channel: str, now_ms: int) -> bool:
        return (
            self.active
            and channel in self.channels
            and (self.starts_at is None or now_ms >= self.starts_at)
            and (self.ends_at is None or now_ms < self.ends_at)
        )

    def accepts(self, context: Mapping[str, Any]) -> bool:
        return all(r.matches(context) for r in self.rules)

    @property
    def category(self) -> str | None:
        c = self.features.get("category")
        return c if isinstance(c, str) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "offer_id": self.offer_id,
            "channels": list(self.channels),
            "cost": self.cost_cents / 100,
            "budget": None if self.budget_cents is None else self.budget_cents / 100,
            "features": dict(self.features),
            "max_impressions": self.max_impressions,
            "member_cap": None if self.member_cap is None else self.member_cap.to_dict(),
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
            "active": self.active,
            "rules": [r.to_dict() for r in self.rules],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Offer:
        d = dict(d)
        known = {
            "offer_id", "channels", "cost", "budget", "features", "max_impressions",
            "member_cap", "starts_at", "ends_at", "active", "rules",
        }  # fmt: skip
        unknown = set(d) - known
        if unknown:
            raise InvalidArgument(f"unknown offer fields: {sorted(unknown)}")
        if "offer_id" not in d or "channels" not in d:
            raise InvalidArgument("an offer needs offer_id and channels")
        return cls(**d)


@dataclass(frozen=True)
class PolicySpec:
    """Which policy family a channel uses, and its parameters (see ``policies.registry``)."""

    family: str = "thompson"
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.family, str) or not self.family:
            raise InvalidArgument(f"PolicySpec.family must be a non-empty string, got {self.family!r}")
        if not isinstance(self.params, Mapping):
            raise InvalidArgument(f"PolicySpec.params must be a mapping, got {self.params!r}")
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": dict(self.params)}


@dataclass(frozen=True)
class ChannelConfig:
    """One channel's policy and settings.

    ``holdout_fraction`` of members (stable hash of member and ``salt``) get ``default_offer``
    (business as usual, or nothing when ``None``) and are logged with ``group="holdout"``.
    A hold-out decision stays open for the reward window, so the member's outcome can be
    reported as its reward (the lift report's hold-out rate); it is never learned from.

    ``provisional_reward`` (None = off): learn every served, active, learnable treatment
    decision when it is made as if its reward were this value (typically 0, "no redemption
    yet"), and when its real outcome settles learn only the correction (final - provisional).
    The learner then hears about misses at once instead of when the reward window closes
    (under ``aggregation="first"`` it otherwise hears successes early and misses late). Only
    for policy families that can correct exactly (thompson, lin_ts, shared_ts, uniform,
    fixed; not vw); once every window has closed the model is the one learned from the final
    rewards.

    ``model_group`` (None = the channel learns alone): channels naming the same group learn ONE
    model together (they must use the same policy spec). Each decision is scored with the
    channel name added to its context as ``channel``, so the model can learn what differs by
    channel while a member's preferences, learned on any channel, serve every channel. With
    three channels each model otherwise learns from a third of the decisions.
    """

    name: str
    policy: PolicySpec = field(default_factory=PolicySpec)
    reward_window_days: float = 7.0
    default_reward: float = 0.0
    aggregation: Literal["first", "sum"] = "first"
    holdout_fraction: float = 0.0
    default_offer: str | None = None
    exploration_floor: float = 0.01
    salt: str = ""
    provisional_reward: float | None = None
    model_group: str | None = None

    def __post_init__(self) -> None:
        check_id("channel", self.name)
        if self.model_group is not None:
            check_id("model_group", self.model_group)
            if len(self.model_group) > 100:  # its snapshots are keyed "*group:<name>"
                raise InvalidArgument(f"model_group must be at most 100 characters, got {self.model_group!r}")
        if isinstance(self.policy, Mapping):
            object.__setattr__(self, "policy", PolicySpec(**self.policy))
        if not isinstance(self.policy, PolicySpec):
            raise InvalidArgument(f"policy must be a PolicySpec, got {self.policy!r}")
        _num("reward_window_days", self.reward_window_days, lo=1e-6, hi=366)
        _num("default_reward", self.default_reward, lo=-REWARD_LIMIT, hi=REWARD_LIMIT)
        _num("holdout_fraction", self.holdout_fraction, lo=0.0, hi=1.0)
        _num("exploration_floor", self.exploration_floor, lo=1e-6, hi=1.0, lo_open=False)
        if self.aggregation not in ("first", "sum"):
            raise InvalidArgument(f"aggregation must be 'first' or 'sum', got {self.aggregation!r}")
        if self.default_offer is not None:
            check_id("default_offer", self.default_offer)
        if self.provisional_reward is not None:
            _num("provisional_reward", self.provisional_reward, lo=-REWARD_LIMIT, hi=REWARD_LIMIT)
            object.__setattr__(self, "provisional_reward", float(self.provisional_reward))
        if not isinstance(self.salt, str) or not is_text(self.salt) or len(self.salt) > 256:
            raise InvalidArgument(
                "salt must be a string of <= 256 characters of valid Unicode, "
                f"got {shown(self.salt)}"
            )
        if not self.salt:
            object.__setattr__(self, "salt", self.name)

    @property
    def reward_window_ms(self) -> int:
        return int(self.reward_window_days * MS_PER_DAY)

    @property
    def model_key(self) -> str:
        """Which model the channel learns (and its snapshots' key): its own (its name) or its
        group's (``*group:<model_group>``; ``*`` is never in a channel name, so no clash)."""
        return self.name if self.model_group is None else f"*group:{self.model_group}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "policy": self.policy.to_dict(),
            "reward_window_days": self.reward_window_days,
            "default_reward": self.default_reward,
            "aggregation": self.aggregation,
            "holdout_fraction": self.holdout_fraction,
            "default_offer": self.default_offer,
            "exploration_floor": self.exploration_floor,
            "salt": self.salt,
            "provisional_reward": self.provisional_reward,
            "model_group": self.model_group,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChannelConfig:
        d = dict(d)
        fields_ = set(cls.__dataclass_fields__)
        unknown = set(d) - fields_
        if unknown:
            raise InvalidArgument(f"unknown channel fields: {sorted(unknown)}")
        return cls(**d)


def _num(name: str, v: object, *, lo: float, hi: float, lo_open: bool = False) -> None:
    if not is_finite_number(v):
        raise InvalidArgument(f"{name} must be a finite number, got {shown(v)}")
    if v < lo or v > hi or (lo_open and v == lo):  # type: ignore[operator]
        raise InvalidArgument(f"{name} must be in [{lo}, {hi}], got {shown(v)}")


def default_channels() -> dict[str, ChannelConfig]:
    return {name: ChannelConfig(name) for name in CHANNELS}
