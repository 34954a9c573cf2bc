"""Scenario files (TOML, read with :mod:`tomllib`): world, catalog, channels and policies.

>>> s = Scenario.default()
>>> s.name, len(s.offers) > 5, s.policies[0].name
('default', True, 'random')
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..catalog import MemberCap, Offer, Rule
from ..clock import MS_PER_DAY
from ..errors import InvalidArgument

KINDS = ("discount", "points", "free_shipping", "early_access")
BASELINES = ("batch_and_blast", "best_fixed", "segment_rules")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidArgument(msg)


@dataclass(frozen=True)
class WorldConfig:
    fatigue: float = 0.3
    conditioning: float = 0.1
    deep_threshold: float = 0.2
    drift: float = 0.0
    organic_rate: float = 0.03
    delay_mean_days: float = 1.5
    consent_rate: float = 0.97
    # over-contact: each contact beyond ``optout_free_contacts`` in ``optout_window_days``
    # (across channels) adds ``optout_rate`` to the chance that the member unsubscribes from
    # every channel for the rest of the campaign (0 = no such cost)
    optout_rate: float = 0.0
    optout_free_contacts: int = 3
    optout_window_days: float = 7.0

    def __post_init__(self) -> None:
        _check(isinstance(self.optout_free_contacts, int) and self.optout_free_contacts >= 0,
               f"world.optout_free_contacts must be an integer >= 0, got {self.optout_free_contacts!r}")  # fmt: skip
        _check(isinstance(self.optout_window_days, int | float) and self.optout_window_days > 0,
               f"world.optout_window_days must be > 0, got {self.optout_window_days!r}")  # fmt: skip
        for name in ("fatigue", "conditioning", "drift", "delay_mean_days"):
            v = getattr(self, name)
            _check(isinstance(v, int | float) and v >= 0, f"world.{name} must be >= 0, got {v!r}")
        for name in ("organic_rate", "consent_rate", "deep_threshold", "optout_rate"):
            v = getattr(self, name)
            _check(isinstance(v, int | float) and 0 <= v <= 1, f"world.{name} must be in [0, 1], got {v!r}")


@dataclass(frozen=True)
class OfferSpec:
    """An offer of the scenario: the engine's :class:`Offer` plus its ground-truth traits."""

    offer_id: str
    kind: str
    channels: tuple[str, ...]
    category: str | None = None
    depth: float = 0.0
    cost: float = 1.0
    margin: float = 5.0
    appeal: float = 0.0
    budget: float | None = None
    max_impressions: int | None = None
    member_cap: Mapping[str, Any] | None = None
    starts_day: float | None = None
    ends_day: float | None = None
    rules: tuple[Mapping[str, Any], ...] = ()

    def __post_init__(self) -> None:
        _check(self.kind in KINDS, f"offer {self.offer_id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        _check(0 <= self.depth < 1, f"offer {self.offer_id!r}: depth must be in [0, 1), got {self.depth!r}")

    def features(self) -> dict[str, Any]:
        f: dict[str, Any] = {"kind": self.kind, "depth": self.depth}
        if self.category:
            f["category"] = self.category
        return f

    def to_offer(self, start_ms: int, days: float, *, unconstrained: bool = False, paced: bool = True) -> Offer:
        starts = None if self.starts_day is None else start_ms + int(self.starts_day * MS_PER_DAY)
        ends = None if self.ends_day is None else start_ms + int(self.ends_day * MS_PER_DAY)
        budget = None if unconstrained else self.budget
        if budget is not None and ends is None and paced:
            ends = start_ms + int(days * MS_PER_DAY)  # budgets are paced over the campaign
        if budget is not None and starts is None and paced:
            starts = start_ms
        return Offer(
            self.offer_id,
            channels=list(self.channels),
            cost=self.cost,
            budget=budget,
            features=self.features(),
            max_impressions=None if unconstrained else self.max_impressions,
            member_cap=None if unconstrained else MemberCap.coerce(self.member_cap),
            starts_at=starts,
            ends_at=ends,
            rules=tuple(Rule.from_dict(r) for r in self.rules),
        )


@dataclass(frozen=True)
class PolicyEntry:
    """A policy to compare: an engine family with params, or a named baseline."""

    name: str
    family: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    baseline: str | None = None
    offer: str | None = None  # batch_and_blast: the one offer everybody gets
    pacing: bool = True  # False: budgets are a hard stop (no pacing price)
    member_cap: Mapping[str, Any] | None = None  # overrides the scenario's engine member cap
    # every channel learns one shared model (ChannelConfig.model_group), e.g. "all"; None: a model per channel
    model_group: str | None = None

    def __post_init__(self) -> None:
        _check((self.family is None) != (self.baseline is None),
               f"policy {self.name!r}: give exactly one of family or baseline")  # fmt: skip
        _check(self.baseline is None or self.baseline in BASELINES,
               f"policy {self.name!r}: baseline must be one of {BASELINES}, got {self.baseline!r}")  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    name: str
    offers: tuple[OfferSpec, ...]
    policies: tuple[PolicyEntry, ...]
    description: str = ""
    decisions: int = 20_000
    days: float = 28.0
    members: int = 4000
    channels: tuple[str, ...] = ("email", "push", "in_app")
    seeds: tuple[int, ...] = (1, 2, 3)
    reward_window_days: float = 7.0
    holdout_fraction: float = 0.05
    exploration_floor: float = 0.02
    # the channels' reward aggregation: "first" learns a redemption when it arrives and a miss
    # when the window closes; "sum" learns every outcome at window close (equal delays)
    aggregation: str = "first"
    # the channels' provisional_reward (None = off): learn each decision when made as if its
    # reward were this value, then correct it when the outcome settles (policies that cannot
    # correct, e.g. vw and the oracles, run without it)
    provisional_reward: float | None = None
    member_cap: Mapping[str, Any] | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    start_ms: int = 1_767_225_600_000  # 2026-01-01T00:00Z
    source: str | None = None  # the TOML text it was read from

    def __post_init__(self) -> None:
        _check(isinstance(self.decisions, int) and self.decisions >= 1, f"decisions must be >= 1, got {self.decisions!r}")
        _check(self.days > 0, f"days must be > 0, got {self.days!r}")
        _check(self.members >= 1, f"members must be >= 1, got {self.members!r}")
        _check(self.aggregation in ("first", "sum"), f"aggregation must be 'first' or 'sum', got {self.aggregation!r}")
        _check(
            self.provisional_reward is None
            or (not isinstance(self.provisional_reward, bool) and isinstance(self.provisional_reward, int | float)),
            f"provisional_reward must be a number, got {self.provisional_reward!r}",
        )
        _check(bool(self.offers), "a scenario needs at least one offer")
        _check(bool(self.policies), "a scenario needs at least one policy")
        ids = [o.offer_id for o in self.offers]
        _check(len(set(ids)) == len(ids), f"duplicate offer ids in {ids}")
        for o in self.offers:
            bad = set(o.channels) - set(self.channels)
            _check(not bad, f"offer {o.offer_id!r} uses channels {sorted(bad)} not in the scenario")

    @property
    def budgeted(self) -> bool:
        return any(o.budget is not None for o in self.offers)

    def with_(self, **changes: Any) -> Scenario:
        return replace(self, **changes)

    def select_policies(self, names: Sequence[str]) -> Scenario:
        known = {p.name: p for p in self.policies}
        missing = [n for n in names if n not in known]
        _check(not missing, f"unknown policies {missing}; scenario has {sorted(known)}")
        return replace(self, policies=tuple(known[n] for n in names))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> Scenario:
        d = dict(d)
        try:
            offers = tuple(
                OfferSpec(
                    offer_id=o.pop("id"),
                    channels=tuple(o.pop("channels", d.get("channels", cls.channels))),
                    rules=tuple(o.pop("rules", ())),
                    **o,
                )
                for o in (dict(x) for x in d.pop("offers", ()))
            )
            policies = tuple(PolicyEntry(**p) for p in d.pop("policies", ()))
            world = WorldConfig(**d.pop("world", {}))
        except TypeError as exc:
            raise InvalidArgument(f"bad scenario: {exc}") from None
        for key in ("channels", "seeds"):
            if key in d:
                d[key] = tuple(d[key])
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        _check(not unknown, f"unknown scenario fields: {sorted(unknown)}")
        return cls(offers=offers, policies=policies, world=world, source=source, **d)

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        text = Path(path).read_text()
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{path}: {exc}") from None
        data.setdefault("name", Path(path).stem)
        return cls.from_dict(data, source=text)

    @classmethod
    def default(cls) -> Scenario:
        """A small built-in scenario (tests, doctests, notebooks)."""
        return cls.from_dict(tomllib.loads(DEFAULT_TOML), source=DEFAULT_TOML)


DEFAULT_TOML = """
name = "default"
decisions = 2000
days = 14
members = 500
channels = ["email", "push", "in_app"]
seeds = [1]

[[offers]]
id = "home-10"
kind = "discount"
category = "home"
depth = 0.10
cost = 2.0
margin = 9.0

[[offers]]
id = "beauty-20"
kind = "discount"
category = "beauty"
depth = 0.20
cost = 4.0
margin = 10.0

[[offers]]
id = "fashion-30"
kind = "discount"
category = "fashion"
depth = 0.30
cost = 6.0
margin = 12.0

[[offers]]
id = "points-2x"
kind = "points"
cost = 1.5
margin = 7.0

[[offers]]
id = "free-ship"
kind = "free_shipping"
cost = 3.0
margin = 6.0

[[offers]]
id = "vip-early"
kind = "early_access"
cost = 0.5
margin = 8.0
rules = [{field = "tier", op = "in", value = ["gold", "platinum"]}]

[[policies]]
name = "random"
family = "uniform"

[[policies]]
name = "thompson"
family = "thompson"
params = {segment_by = ["tier", "top_category"]}
"""

__all__ = ["BASELINES", "KINDS", "OfferSpec", "PolicyEntry", "Scenario", "WorldConfig"]
