"""Scenario files (TOML, read with :mod:`tomllib`): world, catalog, channels and policies.

>>> s = Scenario.default()
>>> s.name, len(s.offers) > 5, s.policies[0].name
('default', True, 'random')
"""

from __future__ import annotations

import posixpath
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..catalog import (
    MAX_EPOCH_MS,
    ChannelConfig,
    MemberCap,
    Offer,
    PolicySpec,
    Rule,
    is_finite_number,
)
from ..clock import MS_PER_DAY
from ..errors import InvalidArgument, UnknownPolicy

KINDS = ("discount", "points", "free_shipping", "early_access")
BASELINES = ("batch_and_blast", "best_fixed", "segment_rules")
# the references every comparison runs beside the scenario's policies (Simulator.compare): a
# scenario policy may not take their names, or its runs would merge into their rows; only
# ``random`` may be the scenario's own, as the uniform baseline it then replaces
RANDOM = "random"
ORACLE = "oracle"
BUDGET_ORACLE = "budget_oracle"
TRUTH_PACED = "truth_paced"
BAYES_ORACLE = "bayes_oracle"
BAYES_BUDGET_ORACLE = "bayes_budget_oracle"
RESERVED = (ORACLE, BUDGET_ORACLE, TRUTH_PACED, BAYES_ORACLE, BAYES_BUDGET_ORACLE)
START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
# sizes a run can hold: a run allocates its arrivals up front (1e12 decisions asked for 7 TiB),
# a million members take ~1.6 GB and a minute and a half to draw, and a campaign's clock must
# stay within the years a decision's time can be written in (int64 milliseconds overflowed)
MAX_DECISIONS = 10_000_000
MAX_MEMBERS = 1_000_000
MAX_DAYS = 3_660
# what MLflow takes in a metric key, of which a policy name is the first part ("<name>.spend"):
# letters, digits, _ - . space and /, not read as a path (MLflow's colon is refused on Windows)
POLICY_NAME = re.compile(r"[\w.\- /]+")


def _known_fields(
    where: str, table: Mapping[str, Any], cls: type, skip: Sequence[str] = ()
) -> None:
    """A key the table's dataclass does not take is named with the table, in the file's terms
    (it was ``OfferSpec.__init__() got an unexpected keyword argument 'foo'``)."""
    known = [f for f in cls.__dataclass_fields__ if f not in skip]  # type: ignore[attr-defined]
    unknown = sorted(set(table) - set(known))
    _check(not unknown, f"{where}: unknown fields {unknown}; known: {known}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvalidArgument(msg)


def _is_num(v: object) -> bool:
    """A finite int or float (TOML ``"2.0"`` is a string and ``true`` a bool: neither is)."""
    return is_finite_number(v)


def _is_int(v: object) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def _names(v: object) -> bool:
    """A list (tuple) of strings, not a string (``tuple("email")`` would be its letters)."""
    return isinstance(v, tuple | list) and all(isinstance(x, str) and x for x in v)


def _table(where: str, v: object) -> dict[str, Any]:
    _check(isinstance(v, Mapping), f"{where} must be a table, got {v!r}")
    return dict(v)  # type: ignore[arg-type]


def _list(where: str, v: object) -> list[Any]:
    _check(isinstance(v, list | tuple), f"{where} must be a list, got {v!r}")
    return list(v)  # type: ignore[arg-type]


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
        _check(_is_int(self.optout_free_contacts) and self.optout_free_contacts >= 0,
               f"world.optout_free_contacts must be an integer >= 0, got {self.optout_free_contacts!r}")  # fmt: skip
        _check(_is_num(self.optout_window_days) and self.optout_window_days > 0,
               f"world.optout_window_days must be > 0, got {self.optout_window_days!r}")  # fmt: skip
        for name in ("fatigue", "conditioning", "drift", "delay_mean_days"):
            v = getattr(self, name)
            _check(_is_num(v) and v >= 0, f"world.{name} must be >= 0, got {v!r}")
        for name in ("organic_rate", "consent_rate", "deep_threshold", "optout_rate"):
            v = getattr(self, name)
            _check(_is_num(v) and 0 <= v <= 1, f"world.{name} must be in [0, 1], got {v!r}")


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
        _check(isinstance(self.offer_id, str) and bool(self.offer_id), f"an offer id must be a string, got {self.offer_id!r}")
        where = f"offer {self.offer_id!r}"
        _check(self.kind in KINDS, f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        _check(_names(self.channels), f"{where}: channels must be a list of channel names, got {self.channels!r}")
        _check(self.category is None or isinstance(self.category, str), f"{where}: category must be a string, got {self.category!r}")
        _check(_is_num(self.depth) and 0 <= self.depth < 1, f"{where}: depth must be in [0, 1), got {self.depth!r}")
        for name in ("cost", "margin", "appeal", "budget", "starts_day", "ends_day"):
            v = getattr(self, name)
            _check(_is_num(v) or (v is None and name in ("budget", "starts_day", "ends_day")),
                   f"{where}: {name} must be a number, got {v!r}")  # fmt: skip
        _check(self.max_impressions is None or _is_int(self.max_impressions),
               f"{where}: max_impressions must be an integer, got {self.max_impressions!r}")  # fmt: skip
        _check(isinstance(self.rules, tuple | list) and all(isinstance(r, Mapping) for r in self.rules),
               f"{where}: rules must be a list of tables, got {self.rules!r}")  # fmt: skip
        try:  # the engine's own checks (amounts, caps, rules, dates), before any run starts
            self.to_offer(START_MS, 1.0)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where}: {exc.message}") from None

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
        _check(isinstance(self.name, str) and bool(self.name), f"a policy name must be a string, got {self.name!r}")
        where = f"policy {self.name!r}"
        key = f"{self.name}.spend"  # one of the summary metrics MLflow keys by the name
        _check(POLICY_NAME.fullmatch(self.name) is not None and len(self.name) <= 200
               and posixpath.normpath(key) == key and not key.startswith(("/", "..")),
               f"{where}: a policy name is up to 200 letters, digits, spaces, _ - . and / (MLflow "
               f"keys metrics by it), not path-like (a leading / or .., // or /./)")  # fmt: skip
        _check((self.family is None) != (self.baseline is None), f"{where}: give exactly one of family or baseline")
        _check(self.baseline is None or self.baseline in BASELINES,
               f"{where}: baseline must be one of {BASELINES}, got {self.baseline!r}")  # fmt: skip
        _check(self.name not in RESERVED,
               f"{where}: the name is reserved for a reference the simulator runs itself ({', '.join(RESERVED)})")  # fmt: skip
        _check(self.name != RANDOM or (self.family == "uniform" and not self.params),
               f"{where}: 'random' is the uniform baseline of the normalized lift; it must be family "
               f"'uniform' without params, or take another name")  # fmt: skip
        _check(isinstance(self.pacing, bool), f"{where}: pacing must be true or false, got {self.pacing!r}")
        _check(self.offer is None or isinstance(self.offer, str), f"{where}: offer must be an offer id, got {self.offer!r}")
        _check(self.offer is None or self.baseline == "batch_and_blast",
               f"{where}: offer is the one offer of a batch_and_blast baseline; a family takes "
               f"its offers in params")  # fmt: skip
        try:
            if self.family is not None:
                # the family and its params, as a run would build it: a typo is found now, not
                # after the reference runs (the simulator's own families included)
                from ..policies.registry import make_policy
                from .oracles import sim_families

                with sim_families():
                    make_policy(PolicySpec(self.family, self.params))
            MemberCap.coerce(self.member_cap)
            if self.model_group is not None:
                ChannelConfig("check", model_group=self.model_group)
        except (InvalidArgument, UnknownPolicy) as exc:
            raise InvalidArgument(f"{where}: {exc.message}") from None


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
    start_ms: int = START_MS
    source: str | None = None  # the TOML text it was read from

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), f"name must be a string, got {self.name!r}")
        _check(isinstance(self.description, str), f"description must be a string, got {self.description!r}")
        _check(_is_int(self.decisions) and 1 <= self.decisions <= MAX_DECISIONS,
               f"decisions must be an integer in [1, {MAX_DECISIONS:_}], "
               f"got {self.decisions!r}")  # fmt: skip
        _check(_is_num(self.days) and 0 < self.days <= MAX_DAYS,
               f"days must be a number > 0 and <= {MAX_DAYS}, got {self.days!r}")  # fmt: skip
        _check(_is_int(self.members) and 1 <= self.members <= MAX_MEMBERS,
               f"members must be an integer in [1, {MAX_MEMBERS:_}], "
               f"got {self.members!r}")  # fmt: skip
        _check(_names(self.channels) and bool(self.channels),
               f"channels must be a list of channel names, got {self.channels!r}")  # fmt: skip
        _check(len(set(self.channels)) == len(self.channels), f"duplicate channels in {list(self.channels)}")
        _check(isinstance(self.seeds, tuple | list) and bool(self.seeds) and all(_is_int(x) and x >= 0 for x in self.seeds),
               f"seeds must be a list of integers >= 0, got {self.seeds!r}")  # fmt: skip
        _check(len(set(self.seeds)) == len(self.seeds), f"duplicate seeds in {list(self.seeds)}")
        last = MAX_EPOCH_MS - int(self.days * MS_PER_DAY)  # the campaign ends by the year 9999
        _check(_is_int(self.start_ms) and 0 <= self.start_ms <= last,
               f"start_ms must be epoch ms from 1970 to {last} (the campaign ends by the year "
               f"9999), got {self.start_ms!r}")  # fmt: skip
        _check(self.aggregation in ("first", "sum"), f"aggregation must be 'first' or 'sum', got {self.aggregation!r}")
        _check(self.provisional_reward is None or _is_num(self.provisional_reward),
               f"provisional_reward must be a number, got {self.provisional_reward!r}")  # fmt: skip
        _check(isinstance(self.world, WorldConfig), f"world must be a table, got {self.world!r}")
        try:  # the channels' own checks (window, hold-out, floor) and the member cap, before any run
            for ch in self.channels:
                ChannelConfig(ch, reward_window_days=self.reward_window_days, holdout_fraction=self.holdout_fraction,
                              exploration_floor=self.exploration_floor, aggregation=self.aggregation,  # type: ignore[arg-type]
                              provisional_reward=self.provisional_reward)  # fmt: skip
            MemberCap.coerce(self.member_cap)
        except InvalidArgument as exc:
            raise InvalidArgument(f"bad scenario: {exc.message}") from None
        _check(bool(self.offers), "a scenario needs at least one offer")
        _check(bool(self.policies), "a scenario needs at least one policy")
        ids = [o.offer_id for o in self.offers]
        _check(len(set(ids)) == len(ids), f"duplicate offer ids in {ids}")
        for o in self.offers:
            bad = set(o.channels) - set(self.channels)
            _check(not bad, f"offer {o.offer_id!r} uses channels {sorted(bad)} not in the scenario")
        names = [p.name for p in self.policies]
        dup = sorted({n for n in names if names.count(n) > 1})
        _check(not dup, f"duplicate policy names {dup}: each policy's runs are reported under its name")
        for p in self.policies:  # an offer id that is not the catalog's would run uniform random
            named = [p.offer] if p.offer is not None else []
            if p.family == "fixed":
                named = list(p.params.get("offers", ()))
            unknown = [o for o in named if o not in ids]
            _check(not unknown,
                   f"policy {p.name!r}: unknown offers {unknown}; the scenario has {ids}")  # fmt: skip

    @property
    def budgeted(self) -> bool:
        return any(o.budget is not None for o in self.offers)

    def with_(self, **changes: Any) -> Scenario:
        return replace(self, **changes)

    def select_policies(self, names: Sequence[str]) -> Scenario:
        """The named policies, in that order; a name given twice runs once."""
        known = {p.name: p for p in self.policies}
        missing = [n for n in names if n not in known]
        _check(not missing, f"unknown policies {missing}; scenario has {sorted(known)}")
        return replace(self, policies=tuple(known[n] for n in dict.fromkeys(names)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> Scenario:
        """Every field is type-checked here or in the dataclasses' ``__post_init__``: a wrong
        type is one :class:`InvalidArgument` naming the field, never a crash mid-simulation."""
        d = dict(d)
        for key in ("channels", "seeds"):  # TOML arrays; a string or number is a mistake, not a tuple
            if key in d:
                d[key] = tuple(_list(key, d[key]))
        unknown = set(d) - (set(cls.__dataclass_fields__) - {"source"})
        _check(not unknown, f"unknown scenario fields: {sorted(unknown)}")
        try:
            offers = []
            for i, x in enumerate(_list("offers", d.pop("offers", ())), 1):
                o = _table(f"offers[{i}]", x)
                _check("id" in o, f"offers[{i}] needs an id")
                oid = o.pop("id")
                channels = _list(f"offer {oid!r}: channels", o.pop("channels", d.get("channels", cls.channels)))
                rules = _list(f"offer {oid!r}: rules", o.pop("rules", ()))
                skip = ("offer_id", "channels", "rules")  # given as id, and taken above
                _known_fields(f"offer {oid!r}", o, OfferSpec, skip=skip)
                offers.append(OfferSpec(offer_id=oid, channels=tuple(channels), rules=tuple(rules), **o))
            policies = []
            for i, p in enumerate(_list("policies", d.pop("policies", ())), 1):
                p = _table(f"policies[{i}]", p)
                _known_fields(f"policies[{i}] ({p.get('name', '?')!r})", p, PolicyEntry)
                policies.append(PolicyEntry(**p))
            world = _table("world", d.pop("world", {}))
            _known_fields("[world]", world, WorldConfig)
            world = WorldConfig(**world)
        except TypeError as exc:
            raise InvalidArgument(f"bad scenario: {exc}") from None
        return cls(offers=tuple(offers), policies=tuple(policies), world=world, source=source, **d)

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        try:  # TOML is UTF-8 (a leading BOM, as editors on Windows write one, is dropped)
            text = Path(path).read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidArgument(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                  f"a scenario is a TOML file") from None  # fmt: skip
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
