"""A synthetic loyalty world with a known ground truth.

Members carry observable attributes (what a service would send as context: tier, tenure,
lifecycle stage, RFM, purchase-history shares, top category, preferred channel) and latent traits that stay hidden
(category affinities, price sensitivity, responsiveness). The response model is exposed as
:meth:`World.expected_reward` so every figure can be checked against truth:

* heterogeneous redemption probabilities: the best offer differs by member (category affinity,
  discount depth x price sensitivity, VIP early access);
* offer fatigue: each recent exposure to the same offer lowers the logit by ``fatigue``;
* discount conditioning: each recent deep discount lowers the response to full-price offers
  (points, free shipping, shallow discounts) by ``conditioning``;
* channel effects, and a bonus on the member's preferred channel;
* redemption delays of days (exponential, clipped inside the reward window);
* optional drift: offer kinds' appeal oscillates over the campaign;
* optional over-contact cost: each contact beyond ``optout_free_contacts`` in
  ``optout_window_days`` (across channels) adds ``optout_rate`` to the chance that the member
  unsubscribes from every channel for the rest of the campaign
  (:meth:`World.optout_probability`).

The observable context carries noisy proxies of the latent traits, as a loyalty programme's
purchase history would: ``share_<category>`` (share of the member's past baskets in each
category, multinomial draws from the latent affinity), ``promo_share`` (share bought on
promotion, binomial draws whose rate rises with the latent price sensitivity) and
``top_category`` (the category with the most baskets). Members with more purchases have less
noisy proxies.

>>> from bandit_engine.simulation.scenario import Scenario
>>> world = World(Scenario.default(), seed=3)
>>> m = world.members[0]
>>> p = world.expected_reward(m, world.offers[0].offer_id, "email", [])
>>> 0.0 < p < 1.0
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..clock import MS_PER_DAY

if TYPE_CHECKING:
    from .scenario import OfferSpec, Scenario

TIERS = ("bronze", "silver", "gold", "platinum")
TIER_WEIGHTS = (0.5, 0.3, 0.15, 0.05)
VIP_TIERS = ("gold", "platinum")
LIFECYCLES = ("new", "active", "lapsing", "reactivated")
LIFECYCLE_WEIGHTS = (0.15, 0.5, 0.25, 0.1)
LIFECYCLE_EFFECT = {"new": 0.2, "active": 0.4, "lapsing": -0.5, "reactivated": 0.0}
KIND_BASE = {"discount": -2.6, "points": -2.9, "free_shipping": -2.8, "early_access": -3.6}
CHANNEL_EFFECT = {"email": 0.0, "push": -0.2, "in_app": 0.25, "sms": -0.35, "site": 0.1}
# purchase history over the past year: 6 + 3 x frequency baskets per member
PURCHASES_BASE = 6
PURCHASES_PER_FREQUENCY = 3
# P(a purchase is on promotion) = sigmoid(-1.5 + 1.8 x price sensitivity): 0.18 .. 0.85
PROMO_INTERCEPT = -1.5
PROMO_SLOPE = 1.8
FATIGUE_DAYS = 14.0
CONDITIONING_DAYS = 30.0


@dataclass(frozen=True)
class Member:
    """One member: ``context`` is observable (sent to the engine); the rest is latent."""

    index: int
    member_id: str
    context: Mapping[str, Any]
    consent: bool
    preferred_channel: str
    affinity: np.ndarray = field(repr=False)  # latent, one weight per category
    price_sensitivity: float = 0.0  # latent
    responsiveness: float = 0.0  # latent


@dataclass(frozen=True)
class Exposure:
    """One offer a member was shown (the world's own record of truth)."""

    offer_id: str
    issued_at: int


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


class World:
    """Members, an offer catalog and the true response model of one scenario and seed."""

    def __init__(self, scenario: Scenario, seed: int) -> None:
        self.scenario = scenario
        self.seed = int(seed)
        cfg = scenario.world
        self.fatigue = cfg.fatigue
        self.conditioning = cfg.conditioning
        self.deep_threshold = cfg.deep_threshold
        self.drift = cfg.drift
        self.organic_rate = cfg.organic_rate
        self.delay_mean_days = cfg.delay_mean_days
        self.start_ms = scenario.start_ms
        self.offers: list[OfferSpec] = list(scenario.offers)
        self.offer_index = {o.offer_id: i for i, o in enumerate(self.offers)}
        self.categories = sorted({o.category for o in self.offers if o.category} | {"other"})
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.members = self._draw_members(rng, scenario.members)
        self._static = self._static_logits()
        self.optout_rate = cfg.optout_rate
        self.optout_free_contacts = cfg.optout_free_contacts
        self.optout_window_ms = int(cfg.optout_window_days * MS_PER_DAY)
        self.history: dict[int, list[Exposure]] = {}
        self.opted_out: set[int] = set()  # members who unsubscribed (every channel)
        # the arrival being decided (read by the oracle policies)
        self.current: tuple[int, str, int] = (0, "", self.start_ms)

    # population ------------------------------------------------------------------------------
    def _draw_members(self, rng: np.random.Generator, n: int) -> list[Member]:
        cats = self.categories
        channels = list(self.scenario.channels)
        out = []
        for i in range(n):
            tier = TIERS[rng.choice(len(TIERS), p=TIER_WEIGHTS)]
            life = LIFECYCLES[rng.choice(len(LIFECYCLES), p=LIFECYCLE_WEIGHTS)]
            tenure = int(rng.integers(1, 60)) if life == "new" else int(rng.integers(60, 3000))
            affinity = rng.dirichlet(np.full(len(cats), 0.6))
            tier_rank = TIERS.index(tier)
            price_sens = float(np.clip(rng.normal(0.9 - 0.25 * tier_rank, 0.35), -0.2, 1.8))
            frequency = int(rng.poisson(2 + 3 * tier_rank))
            # purchase history (observable): the basket's categories follow the latent affinity,
            # the share bought on promotion follows the latent price sensitivity; both are
            # noisy, and less so for members who buy more
            purchases = PURCHASES_BASE + PURCHASES_PER_FREQUENCY * frequency
            counts = rng.multinomial(purchases, affinity)
            promo = rng.binomial(purchases, _sigmoid(PROMO_INTERCEPT + PROMO_SLOPE * price_sens))
            top = int(np.argmax(counts))
            monetary = round(float(rng.lognormal(3.5 + 0.4 * tier_rank, 0.5)), 2)
            recency = int(rng.integers(60, 365)) if life == "lapsing" else int(rng.integers(0, 60))
            pref = channels[int(rng.integers(len(channels)))]
            ctx = {
                "tier": tier,
                "lifecycle": life,
                "tenure_days": tenure,
                "recency_days": recency,
                "frequency": frequency,
                "monetary": monetary,
                "top_category": cats[top],
                "preferred_channel": pref,
                "promo_share": round(promo / purchases, 3),
            }
            ctx.update({f"share_{c}": round(int(n) / purchases, 3) for c, n in zip(cats, counts, strict=True)})
            out.append(
                Member(
                    index=i,
                    member_id=f"m{i:06d}",
                    context=ctx,
                    consent=bool(rng.random() < self.scenario.world.consent_rate),
                    preferred_channel=pref,
                    affinity=affinity,
                    price_sensitivity=price_sens,
                    responsiveness=float(rng.normal(0.0, 0.3)),
                )
            )
        return out

    def _static_logits(self) -> np.ndarray:
        """Member x offer logit before channel, fatigue, conditioning and drift."""
        cats = {c: i for i, c in enumerate(self.categories)}
        n, k = len(self.members), len(self.offers)
        out = np.zeros((n, k))
        for j, o in enumerate(self.offers):
            ci = cats.get(o.category or "other", cats["other"])
            for m in self.members:
                x = KIND_BASE.get(o.kind, -3.0) + o.appeal + m.responsiveness
                x += LIFECYCLE_EFFECT[m.context["lifecycle"]]
                x += 3.0 * (m.affinity[ci] - 1.0 / len(cats)) if o.category else 0.0
                x += o.depth * 6.0 * m.price_sensitivity
                if o.kind == "points":
                    x += 0.4 * TIERS.index(m.context["tier"]) - 0.3 * m.price_sensitivity
                if o.kind == "free_shipping":
                    x += 0.5 * (m.context["frequency"] > 5)
                if o.kind == "early_access":
                    x += 2.5 if m.context["tier"] in VIP_TIERS else -1.0
                out[m.index, j] = x
        return out

    # ground truth ----------------------------------------------------------------------------
    def member(self, member: Member | str | int) -> Member:
        if isinstance(member, Member):
            return member
        if isinstance(member, str):
            return self.members[int(member.lstrip("m"))]
        return self.members[int(member)]

    def logit(
        self,
        member: Member | str | int,
        offer_id: str,
        channel: str,
        history: Sequence[Exposure],
        now_ms: int | None = None,
    ) -> float:
        m = self.member(member)
        j = self.offer_index[offer_id]
        o = self.offers[j]
        now = self.start_ms if now_ms is None else now_ms
        x = float(self._static[m.index, j]) + CHANNEL_EFFECT.get(channel, 0.0)
        if channel == m.preferred_channel:
            x += 0.3
        if history and (self.fatigue or self.conditioning):
            f_since = now - FATIGUE_DAYS * MS_PER_DAY
            c_since = now - CONDITIONING_DAYS * MS_PER_DAY
            same = deep = 0
            for h in history:
                if h.issued_at > f_since and h.offer_id == offer_id:
                    same += 1
                if h.issued_at > c_since and self.offers[self.offer_index[h.offer_id]].depth >= self.deep_threshold:
                    deep += 1
            x -= self.fatigue * same
            if o.depth < self.deep_threshold:
                x -= self.conditioning * deep
        if self.drift:
            day = (now - self.start_ms) / MS_PER_DAY
            phase = 2 * math.pi * day / max(1.0, self.scenario.days)
            x += self.drift * math.sin(phase + j)
        return x

    def expected_reward(
        self,
        member: Member | str | int,
        offer_id: str,
        channel: str,
        history: Sequence[Exposure],
        now_ms: int | None = None,
    ) -> float:
        """True probability that ``member`` redeems ``offer_id`` sent on ``channel``, given the
        member's exposure ``history`` (fatigue, conditioning) at ``now_ms`` (drift)."""
        return _sigmoid(self.logit(member, offer_id, channel, history, now_ms))

    def value(self, offer_id: str) -> float:
        """Net value of one redemption: margin minus unit cost."""
        o = self.offers[self.offer_index[offer_id]]
        return o.margin - o.cost

    # mutable state of one run ----------------------------------------------------------------
    def optout_probability(self, member_index: int, now_ms: int) -> float:
        """True probability that the contact just made at ``now_ms`` (already in the history)
        makes the member unsubscribe: ``optout_rate`` per contact beyond
        ``optout_free_contacts`` in the last ``optout_window_days``, across channels."""
        if not self.optout_rate:
            return 0.0
        since = now_ms - self.optout_window_ms
        recent = sum(1 for h in self.history_of(member_index) if h.issued_at > since)
        return min(1.0, self.optout_rate * max(0, recent - self.optout_free_contacts))

    def reset(self) -> None:
        self.history = {}
        self.opted_out = set()

    def history_of(self, member_index: int) -> list[Exposure]:
        return self.history.get(member_index, [])

    def expose(self, member_index: int, offer_id: str, now_ms: int) -> None:
        h = self.history.setdefault(member_index, [])
        h.append(Exposure(offer_id, now_ms))
        if len(h) > 64:  # older than every window that matters
            del h[:32]

    def delay_ms(self, u: float, window_ms: int) -> int:
        """Redemption delay from a uniform draw: exponential days, kept inside the window."""
        d = -math.log(max(1e-12, 1.0 - u)) * self.delay_mean_days * MS_PER_DAY
        return int(min(d, window_ms * 0.98))


__all__ = ["Exposure", "Member", "World"]
