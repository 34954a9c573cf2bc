"""The Engine: the one door. ``choose``, ``reward``, ``activate``, ``expire``, ``snapshot``.

It wires the catalog, the ledger (source of truth), the constraints, pacing and one policy per
channel. Policy state is a deterministic function of the ordered feedback log: a snapshot is a
checkpoint, and opening an engine restores the latest snapshot and replays the log tail.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Set
from dataclasses import dataclass, field, replace
from typing import IO, Any, TypeVar

from . import constraints, pacing
from .catalog import (
    CHANNELS,
    REWARD_LIMIT,
    ChannelConfig,
    FeatureValue,
    MemberCap,
    Offer,
    PolicySpec,
    check_features,
    check_id,
    default_channels,
    is_finite_number,
    same_features,
    shown,
    to_cents,
)
from .clock import MS_PER_DAY, Clock, SystemClock, iso
from .errors import (
    CapExceeded,
    CatalogChanged,
    Conflict,
    InvalidArgument,
    ModelLoading,
    OfferExists,
    PolicyUnavailable,
    StorageError,
    UnknownChannel,
    UnknownEvent,
    UnknownModelGroup,
    UnknownOffer,
    UnknownPolicy,
)
from .exploration import event_rng, sample
from .features import HISTORY_DAYS, HISTORY_LIMIT, summarize_history
from .ledger.base import Ledger
from .ledger.gapsafe import DEFAULT_GAP_GRACE, GapSafeLedger
from .ledger.records import Decision, Feedback, OfferState, Pruned, RewardOutcome, Snapshot
from .policies.base import Policy, Scoring
from .policies.registry import make_policy

log = logging.getLogger("bandit_engine.engine")
MAX_CONTEXT_KEYS = 64
MAX_RESERVE_ATTEMPTS = 4
# a catalog write re-read and retried this often when other writers keep coming first
CATALOG_WRITE_ATTEMPTS = 8
T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    """Engine-wide settings.

    ``member_cap``: one exposure budget per member shared by every channel (None = no cap);
    the ledger's setting takes precedence once one is stored (:meth:`Engine.set_member_cap`).
    ``snapshot_every``: feedback events between policy checkpoints.
    ``pacing_gain``: how hard the pacing price reacts to spend ahead of target.
    ``history_limit``: the most of a member's latest exposures a choose reads (and builds the
    member's history features from); it bounds a heavy member's cost per choose. Caps do not
    depend on it: they are counted in the write's transaction.
    ``gap_grace``: on a ledger whose feedback log can commit out of sequence order (PostgreSQL),
    how many seconds a gap in it is waited for before it is taken as a hole (a rolled-back
    write); until then learning stops short of it (:class:`GapSafeLedger`).
    ``model_wait``: how many seconds a choose waits for its channel's model while it is being
    built from the log (a first use, a restart, a policy change) before :class:`ModelLoading`
    (HTTP 503; the build goes on in the background); None (the default) builds it in the
    choosing thread and waits as long as that takes. The HTTP workers set it.
    """

    seed: int = 0
    member_cap: MemberCap | None = None
    snapshot_every: int = 1000
    pacing_gain: float = pacing.DEFAULT_GAIN
    catalog_refresh_seconds: float = 1.0
    learn_in_process: bool = True
    history_limit: int = HISTORY_LIMIT
    gap_grace: float = DEFAULT_GAP_GRACE
    model_wait: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidArgument(f"seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "member_cap", MemberCap.coerce(self.member_cap))
        if not isinstance(self.snapshot_every, int) or self.snapshot_every < 1:
            raise InvalidArgument(f"snapshot_every must be an integer >= 1, got {self.snapshot_every!r}")
        if not (0 < self.pacing_gain < 1e6):
            raise InvalidArgument(f"pacing_gain must be > 0, got {self.pacing_gain!r}")
        if isinstance(self.history_limit, bool) or not isinstance(self.history_limit, int) or self.history_limit < 1:
            raise InvalidArgument(f"history_limit must be an integer >= 1, got {self.history_limit!r}")
        grace = self.gap_grace
        if not is_finite_number(grace) or not 0 <= grace <= 3600:  # type: ignore[operator]
            raise InvalidArgument(
                f"gap_grace must be a number of seconds in [0, 3600], got {shown(grace)}"
            )
        wait = self.model_wait
        ok = wait is None or (is_finite_number(wait) and 0 <= wait <= 3600)  # type: ignore
        if not ok:
            raise InvalidArgument(
                f"model_wait must be None or a number of seconds in [0, 3600], got {shown(wait)}"
            )


@dataclass
class _ChannelPolicy:
    spec_key: str
    policy: Policy
    applied_seq: int = 0
    restored_version: int = 0  # the version its snapshot gave it (not learned in this process)


@dataclass
class _Build:
    """A model being built from the log: ``done`` once it is installed, dropped or failed
    (``error``); ``thread`` when it runs in the background."""

    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None
    thread: threading.Thread | None = None


@dataclass
class _Catalog:
    version: int = -1
    offers: dict[str, Offer] = field(default_factory=dict)
    by_channel: dict[str, list[Offer]] = field(default_factory=dict)
    channels: dict[str, ChannelConfig] = field(default_factory=dict)
    checked_at: float = 0.0
    category_of: dict[str, str | None] = field(default_factory=dict)
    # per channel: (active offer, needs a per-request check of its window/rules)
    live: dict[str, list[tuple[Offer, bool]]] = field(default_factory=dict)
    # offers whose counters matter to choose (budget, impression cap, member cap, pacing)
    stateful: set[str] = field(default_factory=set)
    paced: dict[str, bool] = field(default_factory=dict)  # channel -> has a paced offer
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model_group -> its channels
    member_cap: MemberCap | None = None  # the engine-wide cap in force (Engine.member_cap)

    def __post_init__(self) -> None:
        for cfg in sorted(self.channels.values(), key=lambda c: c.name):
            if cfg.model_group is not None:
                self.groups[cfg.model_group] = (*self.groups.get(cfg.model_group, ()), cfg.name)
        for channel, offers in self.by_channel.items():
            self.live[channel] = [
                (o, o.starts_at is not None or o.ends_at is not None or bool(o.rules))
                for o in offers
                if o.active
            ]
        self.paced = {
            ch: any(pacing.is_paced(o) for o in offers) for ch, offers in self.by_channel.items()
        }
        self.stateful = {
            o.offer_id
            for o in self.offers.values()
            if o.budget_cents is not None or o.max_impressions is not None or o.member_cap is not None
        }


class Engine:
    """Decides which offer each member gets on a channel, and learns from rewards.

    >>> from bandit_engine import Engine, Offer
    >>> engine = Engine.open("memory://")
    >>> engine.add_offer(Offer("spring-home-10", channels=["email"], cost=5.00, budget=2000.00,
    ...                        features={"category": "home", "discount": 0.10}))
    >>> d = engine.choose(member_id="m-42", channel="email", context={"tier": "gold"})
    >>> d.offer_id, d.probability
    ('spring-home-10', 1.0)
    >>> engine.reward(d.event_id, 1.0).status
    'recorded'
    >>> engine.offer_state("spring-home-10").spent_cents
    500
    """

    def __init__(
        self, ledger: Ledger, *, clock: Clock | None = None, config: EngineConfig | None = None
    ) -> None:
        self.clock: Clock = clock or SystemClock()
        self.config = config or EngineConfig()
        out_of_order = getattr(ledger, "commits_out_of_seq_order", False)
        if out_of_order and not isinstance(ledger, GapSafeLedger):
            # PostgreSQL: a seq can become visible before a lower one commits; reading past it
            # would skip the lower one for good (learning and replay alike)
            grace = self.config.gap_grace
            ledger = GapSafeLedger(ledger, gap_grace=grace)  # type: ignore[assignment]
        self.ledger = ledger
        self._lock = threading.RLock()  # policies are not thread-safe (VW); one learner
        self._catalog = _Catalog()
        self._policies: dict[str, _ChannelPolicy] = {}
        # models being built from the log, by (model, spec key)
        self._builds: dict[tuple[str, str], _Build] = {}
        self._builds_lock = threading.Lock()
        self._closed = False
        self._since_snapshot = 0
        self._spec_keys: dict[tuple[int, tuple[str, ...]], tuple[Any, str]] = {}
        self._unavailable: set[tuple[str, str]] = set()  # (channel, spec key) sync has logged
        if not self.ledger.channels():
            self.ledger.put_channels(default_channels().values())
        self._refresh_catalog(force=True)

    @classmethod
    def open(
        cls, url: str = "sqlite:///bandit.db", *, clock: Clock | None = None, upgrade: bool = True,
        **config: Any,
    ) -> Engine:  # fmt: skip
        """Open an engine on a ledger URL: ``sqlite:///file.db`` (default), ``sqlite://``
        (in-memory SQLite), ``postgresql+psycopg://...``, or ``memory://`` (the in-memory
        ledger for simulations). Creates or upgrades the schema; with ``upgrade=False`` the
        schema must be this version's newest already (:class:`SqlLedger`)."""
        if url == "memory://":
            from .ledger.memory import MemoryLedger

            ledger: Ledger = MemoryLedger()
        else:
            from .ledger.sql import SqlLedger

            ledger = SqlLedger(url, upgrade=upgrade)
        return cls(ledger, clock=clock, config=EngineConfig(**config))

    def close(self) -> None:
        """Checkpoint the policies and close the ledger, once the models being built in the
        background have stopped (a build left running would open a connection after it)."""
        self._closed = True
        with self._builds_lock:
            threads = [b.thread for b in self._builds.values() if b.thread is not None]
        for thread in threads:
            thread.join(30)
        self.snapshot()
        self.ledger.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # catalog ---------------------------------------------------------------------------------
    def _refresh_catalog(self, force: bool = False) -> _Catalog:
        """The catalog as of the ledger's catalog version, re-read only when that version moved
        (every catalog write bumps it). The version is checked at most every
        ``catalog_refresh_seconds``, or at once with ``force`` (calls that show or change the
        catalog read their own and other processes' writes). Re-reading an unchanged catalog
        cost a worker's background sync ~70 ms of CPU a second with 1 000 offers."""
        cat = self._catalog
        now = time.monotonic()
        if not force and now - cat.checked_at < self.config.catalog_refresh_seconds:
            return cat
        version = self.ledger.catalog_version()  # first: a write racing the reads below is
        if version != cat.version:  # labelled with the older version, so it is re-read next time
            offers = {o.offer_id: o for o in self.ledger.offers()}
            by_channel: dict[str, list[Offer]] = {}
            for o in offers.values():
                for c in o.channels:
                    by_channel.setdefault(c, []).append(o)
            settings = self.ledger.settings()
            self._catalog = cat = _Catalog(
                version, offers, by_channel, self.ledger.channels(),
                category_of={i: o.category for i, o in offers.items()},
                member_cap=(
                    self.config.member_cap if "member_cap" not in settings
                    else MemberCap.coerce(settings["member_cap"])
                ),
            )  # fmt: skip
        cat.checked_at = now
        return cat

    def offers(self) -> list[Offer]:
        return list(self._refresh_catalog(force=True).offers.values())

    def channels(self) -> dict[str, ChannelConfig]:
        return dict(self._refresh_catalog(force=True).channels)

    @property
    def member_cap(self) -> MemberCap | None:
        """The engine-wide member cap in force, shared by every channel: the ledger's setting
        once one is stored (:meth:`set_member_cap`, or an approved change through the API),
        so every worker on the database enforces the same cap; until then
        ``EngineConfig.member_cap``."""
        return self._refresh_catalog(force=True).member_cap

    def set_member_cap(self, cap: MemberCap | Mapping[str, Any] | None) -> None:
        """Store the engine-wide member cap (None: no cap) in the ledger, for every engine on it
        (workers pick it up with the catalog, within ``catalog_refresh_seconds``). Through the
        HTTP API it is a governed setting: it changes only by an approved change request."""
        cap = MemberCap.coerce(cap)
        self.ledger.put_setting("member_cap", None if cap is None else cap.to_dict())
        self._refresh_catalog(force=True)

    def get_offer(self, offer_id: str) -> Offer:
        o = self._refresh_catalog(force=True).offers.get(offer_id)
        if o is None:
            raise UnknownOffer(f"unknown offer {offer_id!r}")
        return o

    def channel(self, name: str, *, fresh: bool = False) -> ChannelConfig:
        """A channel's settings, from the catalog as of at most ``catalog_refresh_seconds`` ago
        (the request path's read), or as the ledger holds them now with ``fresh`` (a read to
        show or to change them: other processes' writes included)."""
        cfg = self._refresh_catalog(force=fresh).channels.get(name)
        if cfg is None and not fresh:
            cfg = self._refresh_catalog(force=True).channels.get(name)
        if cfg is None:
            raise UnknownChannel(f"unknown channel {name!r}; known: {sorted(self._catalog.channels)}")
        return cfg

    def _catalog_write(self, write: Callable[[_Catalog], T]) -> T:
        """Run ``write(catalog)``, a read-modify-write of the catalog whose ledger write is
        conditioned on the version of the catalog it read (``expect_version``). When another
        writer came first (:class:`CatalogChanged`) the catalog is read again and ``write``
        runs again on it, so a change is always made to the latest catalog: an approved budget
        is never undone by an edit that read the offer before the approval, and a channel's
        group and default offer are checked against the catalog they are written into."""
        for _ in range(CATALOG_WRITE_ATTEMPTS):
            cat = self._refresh_catalog(force=True)
            try:
                out = write(cat)
            except CatalogChanged:
                continue
            self._refresh_catalog(force=True)
            return out
        raise Conflict("the catalog kept changing under this write (other writers); try again")

    def add_offer(self, offer: Offer, *, exist_ok: bool = True) -> None:
        """Add an offer, or update one (its features are immutable: a new offer id is a new arm).
        With ``exist_ok=False`` an existing offer id is an :class:`OfferExists` (create only).

        A budgeted offer with an end and no start is paced from the moment it is added."""
        if not isinstance(offer, Offer):
            raise InvalidArgument(f"add_offer takes an Offer, got {type(offer).__name__}")
        self._catalog_write(lambda cat: self._put_offer(cat, offer, exist_ok=exist_ok))

    def update_offer(self, offer_id: str, **changes: Any) -> Offer:
        """Change some of an offer's settings (``Offer`` field names, as in ``to_dict``),
        keeping the others as they are in the ledger when the change is written."""

        def write(cat: _Catalog) -> None:
            old = cat.offers.get(offer_id)
            if old is None:
                raise UnknownOffer(f"unknown offer {offer_id!r}")
            self._put_offer(cat, Offer.from_dict({**old.to_dict(), **changes}), exist_ok=True)

        self._catalog_write(write)
        return self.get_offer(offer_id)

    def _put_offer(self, cat: _Catalog, offer: Offer, *, exist_ok: bool) -> None:
        for c in offer.channels:
            if c not in cat.channels:
                raise UnknownChannel(f"offer {offer.offer_id!r}: unknown channel {c!r}")
        old = cat.offers.get(offer.offer_id)
        if old is None:
            for k in offer.features:
                if k == "offer" or "=" in k:
                    raise InvalidArgument(
                        f"offer {offer.offer_id!r}: feature name {k!r} is reserved: exports "
                        "name the offer id 'offer', and a string feature is named key=value "
                        "('=' in a name would collide)"
                    )
        else:
            if not exist_ok:
                raise OfferExists(f"offer {offer.offer_id!r} already exists")
            if not same_features(old.features, offer.features):
                raise Conflict(
                    f"offer {offer.offer_id!r} exists with other features; features are immutable "
                    "(the learned model depends on them): create a new offer id"
                )
            st = self.ledger.offer_states([offer.offer_id]).get(offer.offer_id)
            if st is not None and offer.budget_cents is not None and (
                offer.budget_cents < st.spent_cents + st.committed_cents
            ):  # the ledger checks again in its write (a choose may reserve meanwhile)
                raise Conflict(
                    f"budget {offer.budget_cents / 100:.2f} of {offer.offer_id!r} is below what is "
                    f"already spent and committed ({(st.spent_cents + st.committed_cents) / 100:.2f})"
                )
            cap = offer.max_impressions
            if st is not None and cap is not None and cap < st.impressions:
                raise Conflict(
                    f"max_impressions {offer.max_impressions} of {offer.offer_id!r} is below the "
                    f"{st.impressions} impressions already counted"
                )
            for name in sorted(set(old.channels) - set(offer.channels)):
                cfg = cat.channels.get(name)
                if cfg is not None and cfg.default_offer == offer.offer_id:
                    raise Conflict(
                        f"offer {offer.offer_id!r} is channel {name!r}'s default_offer; set "
                        "another default_offer (or none) on the channel before taking the offer "
                        "off it"
                    )
        if pacing.is_paced(offer) and offer.starts_at is None:
            start = old.starts_at if old is not None and old.starts_at is not None else self.clock.now_ms()
            offer = Offer.from_dict({**offer.to_dict(), "starts_at": start})
        self.ledger.put_offer(offer, expect_version=cat.version)

    def set_channel(self, channel: ChannelConfig) -> None:
        """Configure a channel. A new policy spec takes over by replaying the channel's log."""
        self.set_channels([channel])

    def update_channel(self, name: str, **changes: Any) -> ChannelConfig:
        """Change some of a channel's settings (``ChannelConfig`` field names), keeping the
        others as they are in the ledger when the change is written."""

        def write(cat: _Catalog) -> ChannelConfig:
            old = cat.channels.get(name)
            if old is None:
                raise UnknownChannel(f"unknown channel {name!r}; known: {sorted(cat.channels)}")
            try:
                new = ChannelConfig.from_dict({**old.to_dict(), **changes, "name": name})
            except TypeError as exc:
                raise InvalidArgument(f"invalid channel settings: {exc}"[:300]) from None
            self._put_channels(cat, [new])
            return new

        return self._catalog_write(write)

    def set_channels(self, channels: Iterable[ChannelConfig]) -> None:
        """Configure several channels at once: each is checked as :meth:`set_channel` checks it,
        the channels of a model group against the group as it will be, and all are stored in one
        transaction or none (a group's policy changes on every channel of the group together)."""
        new = list(channels)
        for channel in new:
            if not isinstance(channel, ChannelConfig):
                raise InvalidArgument(f"a channel configuration must be a ChannelConfig, got {type(channel).__name__}")
        if len({c.name for c in new}) != len(new):
            raise InvalidArgument(f"channels configured twice: {sorted(c.name for c in new)}")
        self._catalog_write(lambda cat: self._put_channels(cat, new))

    def check_channel(self, channel: ChannelConfig) -> None:
        """Raise the error :meth:`set_channel` would raise for ``channel`` against the current
        catalog, storing nothing (what a proposed change is checked with before it waits for
        an approver)."""
        if not isinstance(channel, ChannelConfig):
            kind = type(channel).__name__
            raise InvalidArgument(f"a channel configuration must be a ChannelConfig, got {kind}")
        self._check_channels(self._refresh_catalog(force=True), [channel])

    def _put_channels(self, cat: _Catalog, new: list[ChannelConfig]) -> None:
        self._check_channels(cat, new)
        self.ledger.put_channels(new, expect_version=cat.version)

    def _check_channels(self, cat: _Catalog, new: list[ChannelConfig]) -> None:
        for channel in new:
            pol = make_policy(channel.policy, seed=self.config.seed)  # validate before storing
            if channel.provisional_reward is not None and not pol.supports_correction:
                raise InvalidArgument(
                    f"channel {channel.name!r}: provisional_reward needs a policy family that can "
                    f"correct a learned reward exactly; {channel.policy.family!r} cannot (it would "
                    "keep the provisional reward forever): unset provisional_reward or change family"
                )
            if channel.default_offer is not None:
                default = cat.offers.get(channel.default_offer)
                if default is None:
                    raise UnknownOffer(
                        f"channel {channel.name!r}: unknown default_offer {channel.default_offer!r}"
                    )
                if channel.name not in default.channels:
                    raise InvalidArgument(
                        f"default_offer {default.offer_id!r} is not offered on channel "
                        f"{channel.name!r}"
                    )
        after = {**cat.channels, **{c.name: c for c in new}}
        for channel in new:
            if channel.model_group is None:
                continue
            for other in after.values():
                if (
                    other.name != channel.name
                    and other.model_group == channel.model_group
                    and other.policy.to_dict() != channel.policy.to_dict()
                ):
                    raise InvalidArgument(
                        f"channel {channel.name!r}: model_group {channel.model_group!r} is learned "
                        f"by channel {other.name!r} with another policy spec; the channels of a "
                        "group share one model, so they need the same policy (change a group's "
                        "policy on all its channels at once: set_group_policy)"
                    )

    def set_group_policy(self, group: str, policy: PolicySpec | Mapping[str, Any]) -> list[ChannelConfig]:
        """Switch the policy of every channel of ``model_group`` ``group`` at once (one model,
        rebuilt once from the log). Returns the channels' new configurations."""
        if not isinstance(policy, PolicySpec):
            if not isinstance(policy, Mapping):
                raise InvalidArgument(f"policy must be an object {{family, params}}, got {policy!r}")
            try:
                policy = PolicySpec(**policy)
            except TypeError as exc:
                raise InvalidArgument(f"invalid policy: {exc}"[:300]) from None
        spec = policy

        def write(cat: _Catalog) -> list[ChannelConfig]:
            members = [c for c in cat.channels.values() if c.model_group == group]
            if not members:
                raise UnknownModelGroup(f"no channel learns model_group {group!r}")
            new = [replace(c, policy=spec) for c in members]
            self._put_channels(cat, new)
            return new

        return self._catalog_write(write)

    def _model_key(self, channel: str) -> str:
        """The model a channel learns (``ChannelConfig.model_key``)."""
        cfg = self._catalog.channels.get(channel)
        if cfg is None:
            cfg = self._refresh_catalog(force=True).channels.get(channel)
        return channel if cfg is None else cfg.model_key

    def offer_state(self, offer_id: str) -> OfferState:
        self.get_offer(offer_id)
        return self.ledger.offer_states([offer_id])[offer_id]

    def pacing_price(self, offer_id: str) -> float:
        offer = self.get_offer(offer_id)
        st = self.ledger.offer_states([offer_id]).get(offer_id)
        return pacing.price(offer, st, self.clock.now_ms(), self.config.pacing_gain)

    # policies --------------------------------------------------------------------------------
    def _spec_key(self, cfg: ChannelConfig) -> str:
        """Identifies a model: its policy configuration and, for a model group, the channels
        that learn it (a model is a function of both and the log, so when either changes it is
        rebuilt; snapshots are only restored into the same one)."""
        members = self._catalog.groups.get(cfg.model_group, ()) if cfg.model_group is not None else ()
        cache = (id(cfg.policy), members)
        key = self._spec_keys.get(cache)
        if key is None or key[0] is not cfg.policy:
            spec: Any = cfg.policy.to_dict()
            if members:
                spec = {"policy": spec, "channels": list(members)}
            blob = json.dumps(spec, sort_keys=True, default=str)
            key = (cfg.policy, f"{cfg.policy.family}:{hashlib.sha1(blob.encode()).hexdigest()[:12]}")
            if len(self._spec_keys) >= 1024:  # each catalog reload brings new spec objects
                self._spec_keys.clear()
            self._spec_keys[cache] = key
        return key[1]

    def policy(self, channel: str, *, timeout: float | None = None) -> Policy:
        """The channel's policy (its group's, with ``model_group``), restored from its latest
        snapshot plus the log tail.

        A model is built (a first use, a restart, a policy change) without the engine's lock, so
        decisions on other channels go on meanwhile, and once per process: a thread that needs a
        model another thread is building waits for it, and gets its error if it fails. A build
        whose policy is no longer the channel's when it ends (changed meanwhile) is dropped.
        ``timeout`` (seconds) bounds the wait and has the build run in the background; past it,
        :class:`ModelLoading`. ``None`` waits as long as it takes, building in the calling
        thread when nobody else is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            cfg = self.channel(channel)
            key = self._spec_key(cfg)
            model = cfg.model_key
            cp = self._policies.get(model)
            if cp is not None and cp.spec_key == key:
                return cp.policy
            if self._lock._is_owned():  # type: ignore[attr-defined]
                # a builder installs under this lock: waiting for one here would deadlock
                built = self._build(model, cfg, key)
                if built is not None:
                    self._install(model, built, channel)
                continue
            with self._builds_lock:
                build = self._builds.get((model, key))
                start = build is None
                if build is None:
                    build = self._builds[model, key] = _Build()
            if start and timeout is None:
                self._run_build(model, cfg, key, build)
                continue
            if start:
                thread = threading.Thread(target=self._run_build,
                                          args=(model, cfg, key, build, True),
                                          name=f"build-{model}", daemon=True)  # fmt: skip
                build.thread = thread
                thread.start()
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not build.done.wait(left):
                raise ModelLoading(
                    f"the model of channel {channel!r} is being built from the feedback log "
                    f"(a start, or a policy change); retry in a few seconds"
                )
            if build.error is not None:  # one failed build is one error, not a storm of builds
                raise build.error

    def _run_build(
        self, model: str, cfg: ChannelConfig, key: str, build: _Build, background: bool = False,
    ) -> None:
        try:
            built = self._build(model, cfg, key)
            if built is not None:
                self._install(model, built, cfg.name)
        except Exception as exc:
            build.error = exc
            if not background:
                raise
            log.error("building the model %r failed: %s", model, exc)
        finally:
            with self._builds_lock:
                self._builds.pop((model, key), None)
            build.done.set()

    def _build(self, model: str, cfg: ChannelConfig, key: str) -> _ChannelPolicy | None:
        """A model of ``cfg``'s policy from its latest snapshot (one that cannot be restored is
        logged and the log replayed from its start instead) plus the log tail, learned into a
        model no other thread sees yet, so without the engine's lock. None if the channel's
        policy changed meanwhile (checked between chunks: a superseded build stops early)."""
        pol = self._make_stored(cfg)
        applied = 0
        snap = self.ledger.latest_snapshot(model)
        if snap is not None and snap.policy_name == key:
            try:
                pol.restore(snap.data)
                applied = snap.feedback_seq
            except Exception as exc:  # a corrupt checkpoint must not take the channel down
                log.error("the snapshot of model %r at log position %d cannot be restored (%s); "
                          "replaying the log from its start instead", model, snap.feedback_seq,
                          " ".join(str(exc).split())[:300])  # fmt: skip
                pol = self._make_stored(cfg)
        cp = _ChannelPolicy(key, pol, applied, pol.version)
        while batch := self.ledger.feedback_after(cp.applied_seq, 5000):
            if self._closed:
                raise StorageError("the engine was closed while a model was being built")
            if self._spec_key(self.channel(cfg.name)) != key:
                return None
            self._learn_chunk(batch, *self._read_chunk(batch, {model}), {model: cp})
        return cp

    def _make_stored(self, cfg: ChannelConfig) -> Policy:
        """A fresh policy of ``cfg``'s stored spec. The spec was checked when it was written, so
        a refusal now is the server's configuration, not the request's: a family this process
        does not register, or parameters that a newer version refuses."""
        try:
            return make_policy(cfg.policy, seed=self.config.seed)
        except (InvalidArgument, UnknownPolicy) as exc:
            raise PolicyUnavailable(
                f"channel {cfg.name!r} cannot serve: its stored policy cannot be built here "
                f"({exc.message}); an admin must set a valid policy for it "
                f"(PUT /v1/channels/{cfg.name})"
            ) from None

    def _install(self, model: str, cp: _ChannelPolicy, channel: str) -> None:
        """Serve ``cp`` for ``model``, caught up with what was logged since its build last read,
        unless the channel's policy is no longer ``cp``'s (a build that started before a policy
        change must not replace the new model) or a build of it was installed first."""
        current_key = self._spec_key(self.channel(channel))
        with self._lock:
            if self._closed or cp.spec_key != current_key:
                return
            current = self._policies.get(model)
            if current is not None and current.spec_key == cp.spec_key:
                return
            self._policies[model] = cp
            self._replay(model, cp)

    def _replay(self, model: str, cp: _ChannelPolicy) -> None:
        """Learn the log tail of every channel that learns ``model`` (the caller holds the lock)."""
        while True:
            batch = self.ledger.feedback_after(cp.applied_seq, 5000)
            if not batch:
                return
            self._learn_chunk(batch, *self._read_chunk(batch, {model}), {model: cp})

    def sync(self, *, chunk: int = 5000) -> int:
        """Apply every feedback event not yet learned, in log order. Returns how many updates
        that took (a model loaded meanwhile counts from its snapshot's version, not from 0).

        Learns ``chunk`` events at a time: the log and the decisions are read without the engine
        lock, which is then held only to learn one chunk, so a concurrent ``choose`` waits for
        at most one chunk (a serving worker's background syncer uses small chunks). Only events
        past a model's ``applied_seq`` are learned and each chunk starts at or before the first
        event some model still needs, so chunks never skip or repeat an event, even when
        another thread learns or a model is rebuilt in between."""
        if not isinstance(chunk, int) or chunk < 1:
            raise InvalidArgument(f"chunk must be an integer >= 1, got {chunk!r}")
        channels = self.channels()
        with self._lock:
            before = {k: (cp, cp.policy.version) for k, cp in self._policies.items()}
        failed: Exception | None = None
        for ch in channels:  # load (and catch up) a channel seen for the first time
            try:
                self.policy(ch)
            except PolicyUnavailable as exc:
                # a configuration for an admin to fix, which the channel's chooses report: not
                # a failure of the other channels' learning (logged once per stored spec)
                key = (ch, self._spec_key(channels[ch]))
                if key not in self._unavailable:
                    self._unavailable.add(key)
                    log.error("%s", exc.message)
            except Exception as exc:  # the other channels go on learning; raised below
                log.exception("the model of channel %r could not be loaded", ch)
                failed = failed or exc
        # only the models channels learn now: one a channel left is caught up from where it
        # stopped if the channel returns (its log tail is replayed then)
        current = {cfg.model_key for cfg in channels.values()}
        while True:
            with self._lock:
                seq = min(
                    (cp.applied_seq for k, cp in self._policies.items() if k in current), default=0
                )
            batch = self.ledger.feedback_after(seq, chunk)
            if not batch:
                break
            learnable, decisions = self._read_chunk(batch, current)  # no lock: ledger reads
            with self._lock:
                cps = {k: cp for k, cp in self._policies.items() if k in current}
                self._learn_chunk(batch, learnable, decisions, cps)
        if failed is not None:
            raise failed
        moved = 0
        with self._lock:
            for k, cp in self._policies.items():
                old, version = before.get(k, (None, 0))
                moved += cp.policy.version - (version if old is cp else cp.restored_version)
        return moved

    def _read_chunk(
        self, batch: list[Feedback], models: Set[str]
    ) -> tuple[list[tuple[Feedback, str]], dict[str, Decision]]:
        """The learnable events of ``batch`` for ``models`` (with their model) and their
        decisions, read from the ledger."""
        learnable = [(f, k) for f in batch if f.learn and (k := self._model_key(f.channel)) in models]
        return learnable, self.ledger.decisions_by_event(f.event_id for f, _ in learnable)

    def _learn_chunk(
        self,
        batch: list[Feedback],
        learnable: list[tuple[Feedback, str]],
        decisions: Mapping[str, Decision],
        cps: Mapping[str, _ChannelPolicy],
    ) -> None:
        """Learn (under the lock) the events a model has not applied yet, then mark ``batch``
        applied: a model rebuilt or caught up by another thread meanwhile is not taught twice."""
        for f, k in learnable:
            cp = cps.get(k)
            if cp is not None and f.seq > cp.applied_seq:
                self._learn_one(cp.policy, decisions[f.event_id], f)
        for cp in cps.values():
            cp.applied_seq = max(cp.applied_seq, batch[-1].seq)

    def _learn_one(self, pol: Policy, d: Decision, f: Feedback) -> None:
        """Apply one learnable feedback event: ``final`` is learned; ``provisional`` is learned
        and its ``correction`` revises it by (final - the decision's provisional reward). A
        family that cannot correct skips the provisional event and learns the correction as
        the final reward (so a log written with provisional learning replays into any family)."""
        correcting = f.kind == "correction" and pol.supports_correction
        if f.kind == "provisional" and not pol.supports_correction:
            return
        if correcting:
            if d.provisional is None:
                raise InvalidArgument(f"correction of event {d.event_id!r}: nothing provisional")
            delta = pol.correction(d.provisional, f.reward)
            if delta == 0.0:
                return
        offers = self._catalog.offers
        missing = [i for i in d.eligible if i not in offers]
        if missing:
            offers = self._refresh_catalog(force=True).offers
        oc = d.offer_context
        s = Scoring(
            d.member_id,
            d.context,
            tuple(offers[i] for i in d.eligible),
            tuple(oc.get(i, {}) for i in d.eligible) if oc and pol.uses_offer_context else (),
        )
        chosen = d.eligible.index(d.offer_id)  # type: ignore[arg-type]
        if correcting:
            pol.correct(s, chosen, d.probability, delta)  # type: ignore[arg-type]
        else:
            pol.learn(s, chosen, d.probability, f.reward)  # type: ignore[arg-type]

    def _on_feedback(
        self, feedback: Iterable[Feedback], known: Mapping[str, Decision] | None = None
    ) -> None:
        """Learn from feedback this process just wrote, in log order (embedded learner)."""
        if not self.config.learn_in_process:
            return
        feedback = list(feedback)
        with self._lock:
            if known is None:
                known = self.ledger.decisions_by_event(f.event_id for f in feedback if f.learn)
            for f in feedback:
                model = self._model_key(f.channel)
                cp = self._policies.get(model)
                if cp is None:
                    self.policy(f.channel)  # restores and replays up to the log's end
                    continue
                if f.seq <= cp.applied_seq:
                    continue
                if f.seq != cp.applied_seq + 1:
                    self._replay(model, cp)  # another writer's feedback came first
                    continue
                if f.learn:
                    self._learn_one(cp.policy, known[f.event_id], f)
                cp.applied_seq = f.seq
                self._since_snapshot += 1
            due = self._since_snapshot >= self.config.snapshot_every
        if due:  # a checkpoint is an optimization: its failure must not fail the reward
            try:
                self.snapshot()
            except (StorageError, MemoryError):
                log.exception("checkpointing the models failed; the next one is tried after "
                              "%d more feedback events", self.config.snapshot_every)

    def snapshot(self, *, if_newer: bool = False) -> int:
        """Checkpoint every loaded policy. Returns how many snapshots were written.

        ``if_newer``: skip a model that has learned nothing, or whose latest stored snapshot
        (another worker's, say) already reaches as far into the log. The policies are
        serialized under the engine's lock and written after it is released, so a request
        waits for the serialization only, not for the database."""
        with self._lock:
            now = self.clock.now_ms()
            snaps = [
                Snapshot(model, cp.spec_key, cp.policy.version, cp.applied_seq, cp.policy.serialize(), now)
                for model, cp in self._policies.items()  # a channel, or "*group:<model_group>"
            ]
            self._since_snapshot = 0
        n = 0
        for snap in snaps:
            if not (if_newer and self._covered(snap)):
                self.ledger.save_snapshot(snap)
                n += 1
        return n

    def _covered(self, s: Snapshot) -> bool:
        """Whether the stored checkpoints already reach as far into the log as ``s``."""
        return self._checkpointed(s.channel, s.policy_name) >= s.feedback_seq

    def _checkpointed(self, model: str, spec_key: str) -> int:
        """How far into the log the latest stored checkpoint of ``model`` reaches, if it is of
        the policy ``spec_key`` (what a restoring engine would use); 0 if there is none."""
        stored = self.ledger.latest_snapshot(model)
        return stored.feedback_seq if stored is not None and stored.policy_name == spec_key else 0

    # choose ----------------------------------------------------------------------------------
    def in_holdout(self, member_id: str, channel: str) -> bool:
        cfg = self.channel(channel)
        if cfg.holdout_fraction <= 0:
            return False
        h = hashlib.blake2b(f"{cfg.salt}\x00{member_id}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") / 2**64 < cfg.holdout_fraction

    def choose(
        self,
        member_id: str,
        channel: str,
        context: Mapping[str, FeatureValue] | None = None,
        *,
        event_id: str | None = None,
        active: bool = True,
        consent: bool = True,
    ) -> Decision:
        """Pick an offer for a member on a channel and log the decision with its exact probability.

        Re-sending an ``event_id`` returns the original decision (with ``resent=True``). When
        nothing is eligible the decision has ``offer_id=None`` and a ``reason`` (never an error,
        never a breach).
        ``active=False`` creates a deferred decision (e.g. an email not opened yet): it is not
        learned from unless activated (or rewarded) before its window closes."""
        check_id("member_id", member_id)
        cfg = self.channel(channel)
        ctx = check_features("context", context)
        if len(ctx) > MAX_CONTEXT_KEYS:
            raise InvalidArgument(f"context has {len(ctx)} keys; at most {MAX_CONTEXT_KEYS}")
        for k in ctx:
            if k == "channel" or k.startswith(("member.", "o.")) or "=" in k:
                raise InvalidArgument(
                    f"context key {k!r} is reserved: the engine adds the member's history as "
                    "'member.*' and 'o.*' features and the request's channel as 'channel', "
                    "and names a string feature key=value ('=' in a key would collide)"
                )
        if not isinstance(active, bool) or not isinstance(consent, bool):
            raise InvalidArgument("active and consent must be booleans")
        if event_id is None:
            return self._decide(uuid.uuid4().hex, member_id, channel, cfg, ctx, active, consent)
        check_id("event_id", event_id)
        # no look-up first: the event id is unique in the ledger, so a re-sent one fails to log
        # (the reservation with it, atomically) and the ledger returns the stored decision.
        # That saves a round trip on every first send and costs a wasted pass on a re-send.
        d = self._decide(event_id, member_id, channel, cfg, ctx, active, consent)
        if d.member_id != member_id or d.channel != channel:
            raise Conflict(f"event {event_id!r} was logged for another member or channel")
        return d

    def _decide(
        self,
        event_id: str,
        member_id: str,
        channel: str,
        cfg: ChannelConfig,
        ctx: Mapping[str, FeatureValue],
        active: bool,
        consent: bool,
    ) -> Decision:
        """:meth:`choose` once its arguments are checked: decide and log; or, when ``event_id``
        is already logged, the stored decision."""
        now = self.clock.now_ms()
        pol = self.policy(channel, timeout=self.config.model_wait)
        group = "holdout" if self.in_holdout(member_id, channel) else "treatment"
        common: dict[str, Any] = {
            "event_id": event_id, "member_id": member_id, "channel": channel, "group": group,
            "policy_name": cfg.policy.family, "policy_version": pol.version, "issued_at": now,
            "deadline": now + cfg.reward_window_ms, "active": active,
        }  # fmt: skip
        if group == "holdout" or not consent:
            base = Decision(**common, offer_id=None, probability=None, context=dict(ctx), status="none")
            return self._serve_default(base, cfg, "holdout" if group == "holdout" else "no_consent")
        cat = self._catalog
        candidates = [
            o for o, check in cat.live.get(channel, ())
            if not check or (o.is_live(channel, now) and o.accepts(ctx))
        ]  # fmt: skip
        if not candidates:
            return self._log_none(common, ctx, "no_live_offer")
        window = max(HISTORY_DAYS * MS_PER_DAY, *(
            o.member_cap.window_ms for o in candidates if o.member_cap is not None
        ), cat.member_cap.window_ms if cat.member_cap else 0)  # fmt: skip
        history, states = self.ledger.read_state(
            member_id, now - int(window), [o.offer_id for o in candidates if o.offer_id in cat.stateful],
            self.config.history_limit,
        )
        if constraints.member_capped(history, now, cat.member_cap):
            return self._log_none(common, ctx, "member_cap")
        eligible, masked = constraints.mask(candidates, states, history, now)
        for attempt in range(MAX_RESERVE_ATTEMPTS):
            if not eligible:
                return self._log_none(common, ctx, "capped:" + ",".join(sorted(set(masked.values()))))
            shared, per_offer = summarize_history(
                history, eligible, cat.category_of, now, per_offer_features=pol.uses_offer_context
            )
            prices = (
                pacing.prices(eligible, states, now, self.config.pacing_gain)
                if cat.paced.get(channel) else None
            )  # fmt: skip
            if cfg.model_group is not None:  # one model for several channels: tell them apart
                shared = {**shared, "channel": channel}
            scoring = Scoring(member_id, {**ctx, **shared}, tuple(eligible), per_offer, prices)
            rng = event_rng(self.config.seed, event_id, attempt)
            provisional = cfg.provisional_reward if active else None
            with self._lock:  # the version read with the pmf: a syncing thread may learn meanwhile
                pmf = pol.pmf(scoring, rng, cfg.exploration_floor)
                common["policy_version"] = pol.version
            i = sample(pmf, rng)
            offer = eligible[i]
            d = Decision(
                **common, offer_id=offer.offer_id, probability=float(pmf[i]),
                eligible=tuple(o.offer_id for o in eligible), pmf=tuple(pmf.tolist()),
                context=scoring.context,
                offer_context={o.offer_id: f for o, f in zip(eligible, per_offer, strict=False) if f},
                reserved_cents=offer.cost_cents, learnable=True, status="open",
                provisional=provisional,
            )  # fmt: skip
            try:
                d, fb = self.ledger.log_decision_feedback(
                    d, offer, constraints.member_caps(offer, cat.member_cap)
                )
            except CapExceeded as exc:
                if exc.cap == "member_all":
                    return self._log_none(common, ctx, "member_cap")
                masked[offer.offer_id] = exc.cap
                eligible = [o for o in eligible if o.offer_id != offer.offer_id]
                states = self.ledger.offer_states(
                    [o.offer_id for o in eligible if o.offer_id in cat.stateful]
                )
                continue
            if fb is not None:  # learned provisionally: the policy hears of it now
                self._on_feedback([fb], {d.event_id: d})
            return d
        return self._log_none(common, ctx, "contention")

    def _serve_default(self, base: Decision, cfg: ChannelConfig, reason: str) -> Decision:
        """The hold-out's (or a member without consent's) decision: the channel's default offer
        if it is live, the member passes its rules and it is within its caps, else nothing. A
        hold-out member's decision stays open for its window either way: the service reports the
        member's outcome (a purchase made without our offer) as its reward, and the window
        closes with the default reward, so the lift report compares like with like."""
        cat = self._catalog  # one catalog version for the offer and its caps
        offer = cat.offers.get(cfg.default_offer or "")
        nothing = base.with_(status="open" if base.group == "holdout" else "none")
        if (
            offer is None
            or not offer.is_live(base.channel, base.issued_at)
            or not offer.accepts(base.context)
        ):
            return self.ledger.log_decision(nothing.with_(reason=reason), None, {})
        d = base.with_(
            offer_id=offer.offer_id, probability=1.0, eligible=(offer.offer_id,), pmf=(1.0,),
            reserved_cents=offer.cost_cents, status="open", reason=reason,
        )  # fmt: skip
        try:
            return self.ledger.log_decision(
                d, offer, constraints.member_caps(offer, cat.member_cap)
            )
        except CapExceeded as exc:
            return self.ledger.log_decision(nothing.with_(reason=f"{reason}:capped:{exc.cap}"), None, {})

    def _log_none(self, common: Mapping[str, Any], ctx: Mapping[str, Any], reason: str) -> Decision:
        """Log a decision that served no offer (with why); it reserves and counts nothing."""
        d = Decision(**common, offer_id=None, probability=None, context=dict(ctx), status="none",
                     reason=reason)  # fmt: skip
        return self.ledger.log_decision(d, None, {})

    # reward ----------------------------------------------------------------------------------
    def reward(
        self,
        event_id: str,
        value: float,
        cost: float | None = None,
        *,
        reward_id: str | None = None,
    ) -> RewardOutcome:
        """Record the outcome of a decision (idempotent: a duplicate is reported, not counted).

        ``cost`` is money actually spent (<= the reservation); when omitted, a positive reward
        books the offer's unit cost. Under ``aggregation="sum"`` several rewards with distinct
        ``reward_id`` add up and are learned at window close."""
        check_id("event_id", event_id)
        if not is_finite_number(value):
            raise InvalidArgument(f"reward must be a finite number, got {shown(value)}")
        if abs(value) > REWARD_LIMIT:
            raise InvalidArgument(
                f"reward must be between {-REWARD_LIMIT:g} and {REWARD_LIMIT:g}, got {shown(value)}"
            )
        cost_cents = None if cost is None else to_cents("cost", cost)
        if reward_id is not None:
            check_id("reward_id", reward_id)
        aggregation = {name: c.aggregation for name, c in self._refresh_catalog().channels.items()}
        out = self.ledger.record_reward(
            event_id, float(value), cost_cents, self.clock.now_ms(),
            reward_id=reward_id, aggregation=aggregation,
        )  # fmt: skip
        if out.feedback is not None:
            self._on_feedback([out.feedback], {event_id: out.decision} if out.decision else None)
        return out

    def activate(self, event_id: str) -> Decision:
        check_id("event_id", event_id)
        return self.ledger.activate(event_id, self.clock.now_ms())

    def expire(self, now_ms: int | None = None) -> int:
        """Close every decision whose reward window has passed (default reward, reservation
        released, learner fed). Returns how many were closed."""
        now = self.clock.now_ms() if now_ms is None else int(now_ms)
        fb = self.ledger.expire(now, self.default_rewards())
        self._on_feedback(fb)
        return len(fb)

    def default_rewards(self) -> dict[str, float]:
        """Each channel's default reward: what a window that closes without one settles with."""
        return {name: c.default_reward for name, c in self.channels().items()}

    def get_decision(self, event_id: str) -> Decision:
        d = self.ledger.get_decision(event_id)
        if d is None:
            raise UnknownEvent(f"unknown event {event_id!r}")
        return d

    # export ----------------------------------------------------------------------------------
    def export_dsjson(self, out: IO[str], *, channel: str | None = None, limit: int | None = None) -> int:
        """Write treatment decisions as VW dsjson lines (``a``, ``p``, ``_label_cost``, ...): the
        first ``limit`` of the log (all by default) among those the engine learns from (learnable
        and active) whose reward window has closed (a redemption settles its decision at once, a
        miss only at the window's close: the labelled decisions of open windows are mostly
        redemptions, and would bias whatever learns or evaluates from the file). Every line is
        labelled: a decision still open past its deadline (no :meth:`expire` since) with the
        reward expiry will give it (its accumulated reward, else the channel's default), as
        :func:`~bandit_engine.evaluation.from_engine` reads it. Returns how many. An unknown
        channel is an error."""
        from .ledger.settle import settled_by

        cat = self._refresh_catalog(force=True)
        if channel is not None:
            self.channel(channel)  # UnknownChannel
        now = self.clock.now_ms()
        defaults = self.default_rewards()
        n = 0
        for d in self.ledger.decisions(channel=channel):
            if n == limit:
                break
            if d.offer_id is None or not d.learnable or not d.active:
                continue
            settled = settled_by(d, now, defaults.get(d.channel, 0.0))
            if settled is None:
                continue
            out.write(json.dumps(to_dsjson(settled, cat.offers)) + "\n")
            n += 1
        return n

    # retention -------------------------------------------------------------------------------
    def retention_floor_days(self) -> float:
        """The oldest decisions the engine still reads, in days: the member history a choose
        summarizes (90 days), the longest member frequency cap window and the longest reward
        window. :meth:`prune` keeps everything younger."""
        cat = self._refresh_catalog(force=True)
        windows = [
            HISTORY_DAYS * MS_PER_DAY,
            *(cfg.reward_window_ms for cfg in cat.channels.values()),
            *(o.member_cap.window_ms for o in cat.offers.values() if o.member_cap is not None),
            cat.member_cap.window_ms if cat.member_cap is not None else 0,
        ]
        return max(windows) / MS_PER_DAY

    def prune(self, older_than_days: float, archive: IO[str] | None, *, batch: int = 1000) -> PruneReport:
        """Delete settled decisions issued more than ``older_than_days`` ago, with their rewards
        and feedback events, appending each to ``archive`` first (one JSON line per decision,
        :class:`~bandit_engine.ledger.records.Pruned`; ``None`` keeps no copy).

        Nothing the engine still reads goes: ``older_than_days`` must be at least
        :meth:`retention_floor_days`, open decisions stay (the serving workers close them), and
        a decision stays while one of its feedback events lies past the checkpoint of the model
        its channel learns now (the latest snapshot of the channel's current policy), since a
        worker restoring that checkpoint replays the event. A channel whose current policy has
        no checkpoint keeps every decision it learned from (``report.uncheckpointed`` names
        those that kept some).

        Each batch is written to ``archive`` (flushed and fsynced) inside the transaction that
        deletes it: an archive that fails deletes nothing of its batch, and a crash after the
        write but before the commit leaves that batch in both places (an archive reader keeps
        the first line of an event id)."""
        days = older_than_days
        if not is_finite_number(days) or days > 36_500:  # type: ignore[operator]
            raise InvalidArgument(
                f"older_than_days must be a number of days (at most 36 500), got {shown(days)}"
            )
        floor = self.retention_floor_days()
        if older_than_days < floor:
            raise InvalidArgument(
                f"older_than_days must be at least {floor:g}: the engine still reads decisions that "
                "old (the member history a choose summarizes, member frequency cap windows, "
                "reward windows)"
            )
        if not isinstance(batch, int) or isinstance(batch, bool) or not 1 <= batch <= 10_000:
            raise InvalidArgument(f"batch must be an integer in [1, 10000], got {batch!r}")
        before = self.clock.now_ms() - int(older_than_days * MS_PER_DAY)
        covered = {
            name: self._checkpointed(cfg.model_key, self._spec_key(cfg))
            for name, cfg in self.channels().items()
        }  # fmt: skip

        def write(pruned: list[Pruned]) -> None:
            if archive is None:
                return
            lines = "".join(json.dumps(p.to_json(), separators=(",", ":")) + "\n" for p in pruned)
            try:
                fd = archive.fileno()
            except (AttributeError, io.UnsupportedOperation):  # not a file (a StringIO, say)
                archive.write(lines)
                archive.flush()
                return
            archive.flush()
            end = _whole_lines(fd)
            try:
                data = memoryview(lines.encode("utf-8"))
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)  # on disk before the batch's delete commits
            except BaseException:
                # a batch that failed (a full disk) leaves no half line: its delete never runs,
                # and a re-run appends after whole lines, which read_archive can read back
                os.ftruncate(fd, end)
                raise

        n = self.ledger.prune(before, covered, write, batch=batch)
        held = tuple(
            name for name, seq in sorted(covered.items())
            if seq == 0 and any(  # its oldest decision is settled and old: kept for want of one
                d.issued_at < before and d.status != "open"
                for d in self.ledger.decisions(channel=name, limit=1)
            )
        )  # fmt: skip
        return PruneReport(n, before, covered, held)


def _whole_lines(fd: int) -> int:
    """The size of the file at ``fd`` once cut back to its last whole line, and cut there: a
    line torn by a crash in mid-write (its batch's delete never committed: those decisions are
    still in the ledger) would otherwise run into the next batch's first line. A file opened
    for writing only cannot be read: it is left as it is."""
    size = os.lseek(fd, 0, os.SEEK_END)
    end = size
    while end > 0:
        start = max(0, end - 65_536)
        try:
            chunk = os.pread(fd, end - start, start)
        except OSError:
            return size
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)
    return end


@dataclass(frozen=True)
class PruneReport:
    """What :meth:`Engine.prune` did: ``pruned`` decisions issued before ``before_ms``;
    ``covered`` maps each channel to the log position of its model's checkpoint;
    ``uncheckpointed`` channels have no checkpoint of their current policy, and kept settled
    decisions older than ``before_ms`` for want of one."""

    pruned: int
    before_ms: int
    covered: Mapping[str, int]
    uncheckpointed: tuple[str, ...]


def to_dsjson(d: Decision, offers: Mapping[str, Offer]) -> dict[str, Any]:
    """One decision as a VW dsjson record. Actions are 1-based, the chosen one first in ``a``.
    An action's member x offer history features (what the policy saw of how often this member
    was shown or redeemed it) are its namespace ``H``, as the engine's VW family names them."""
    chosen = d.eligible.index(d.offer_id)  # type: ignore[arg-type]
    order = [chosen] + [i for i in range(len(d.eligible)) if i != chosen]
    multi = []
    for oid in d.eligible:
        features = dict(offers[oid].features) if oid in offers else {}
        action: dict[str, Any] = {"A": {**features, "offer": oid}}  # the id wins
        if d.offer_context.get(oid):
            action["H"] = dict(d.offer_context[oid])
        multi.append(action)
    rec: dict[str, Any] = {
        "EventId": d.event_id,
        "Timestamp": iso(d.issued_at),
        "Version": "1",
        "a": [i + 1 for i in order],
        "p": [d.pmf[i] for i in order],
        "c": {"U": {k: v for k, v in d.context.items()}, "_multi": multi},
    }
    if d.reward is not None and d.status in ("closed", "expired"):
        rec.update({
            "_label_cost": -float(d.reward), "_label_probability": d.probability,
            "_label_Action": chosen + 1, "_labelIndex": chosen,
        })  # fmt: skip
    return rec


__all__ = ["CHANNELS", "Engine", "EngineConfig", "PruneReport", "to_dsjson"]
