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
# latent traits' priors: affinity ~ Dirichlet(0.6, ...); price sensitivity ~ N(0.9 - 0.25 x tier
# rank, 0.35) clipped to [-0.2, 1.8]; responsiveness ~ N(0, 0.3)
AFFINITY_CONCENTRATION = 0.6
PRICE_SENS_MEAN, PRICE_SENS_PER_TIER, PRICE_SENS_SD = 0.9, 0.25, 0.35
PRICE_SENS_RANGE = (-0.2, 1.8)
RESPONSIVENESS_SD = 0.3
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
        # context_posterior's, by (member index, samples)
        self._posteriors: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self.optout_rate = cfg.optout_rate
        self.optout_free_contacts = cfg.optout_free_contacts
        self.optout_window_ms = int(cfg.optout_window_days * MS_PER_DAY)
        # the longest look-back of anything that reads a member's exposures (fatigue,
        # conditioning, opt-out): older exposures can be forgotten (:meth:`expose`)
        self.history_ms = max(int(FATIGUE_DAYS * MS_PER_DAY), int(CONDITIONING_DAYS * MS_PER_DAY),
                              self.optout_window_ms)  # fmt: skip
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
            affinity = rng.dirichlet(np.full(len(cats), AFFINITY_CONCENTRATION))
            tier_rank = TIERS.index(tier)
            price_sens = float(np.clip(
                rng.normal(PRICE_SENS_MEAN - PRICE_SENS_PER_TIER * tier_rank, PRICE_SENS_SD),
                *PRICE_SENS_RANGE,
            ))  # fmt: skip
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
                    responsiveness=float(rng.normal(0.0, RESPONSIVENESS_SD)),
                )
            )
        return out

    def _static_logits(self) -> np.ndarray:
        """Member x offer logit before channel, fatigue, conditioning and drift."""
        out = np.zeros((len(self.members), len(self.offers)))
        for m in self.members:
            out[m.index] = self.static_logit(
                m.context, m.affinity, m.price_sensitivity, m.responsiveness
            )
        return out

    def static_logit(
        self,
        context: Mapping[str, Any],
        affinity: np.ndarray,
        price_sensitivity: float | np.ndarray,
        responsiveness: float | np.ndarray,
    ) -> np.ndarray:
        """The logit of every offer before channel, fatigue, conditioning and drift, for a
        member's observable ``context`` and latent traits: ``(K,)`` for one set of traits, or
        ``(S, K)`` for ``S`` samples of them (``affinity`` ``(S, categories)``, the others
        ``(S,)``), as :meth:`context_posterior` draws them."""
        cats = {c: i for i, c in enumerate(self.categories)}
        aff = np.asarray(affinity, dtype=float)
        ps = np.asarray(price_sensitivity, dtype=float)
        resp = np.asarray(responsiveness, dtype=float)
        lifecycle = LIFECYCLE_EFFECT[context["lifecycle"]]
        tier_rank = TIERS.index(context["tier"])
        cols = []
        for o in self.offers:
            x = KIND_BASE.get(o.kind, -3.0) + o.appeal + resp
            x = x + lifecycle
            if o.category:
                x = x + 3.0 * (aff[..., cats.get(o.category, cats["other"])] - 1.0 / len(cats))
            x = x + o.depth * 6.0 * ps
            if o.kind == "points":
                x = x + (0.4 * tier_rank - 0.3 * ps)
            if o.kind == "free_shipping":
                x = x + 0.5 * (context["frequency"] > 5)
            if o.kind == "early_access":
                x = x + (2.5 if context["tier"] in VIP_TIERS else -1.0)
            cols.append(np.broadcast_to(x, resp.shape))
        return np.stack(cols, axis=-1)

    def context_posterior(
        self, member: Member | str | int, samples: int = 400
    ) -> tuple[np.ndarray, np.ndarray]:
        """What the member's observable context says about their latent traits: ``samples``
        draws of :meth:`static_logit` ``(S, K)`` and their weights ``(S,)`` (summing to 1).

        Exact Bayes under the world's own generative model: the category affinity's posterior
        is Dirichlet(0.6 + basket counts); price sensitivity is drawn from its tier's prior and
        weighted by the binomial likelihood of the share bought on promotion; responsiveness
        keeps its prior (nothing observable depends on it). Seeded by the world's seed and the
        member, so the same member always gets the same draws; kept once drawn (the budget
        duals and the Bayes oracle's run both need every member's)."""
        m = self.member(member)
        cached = self._posteriors.get((m.index, samples))
        if cached is not None:
            return cached
        ctx = m.context
        rng = np.random.default_rng([self.seed, 0xCE11, m.index])
        purchases = PURCHASES_BASE + PURCHASES_PER_FREQUENCY * int(ctx["frequency"])
        counts = np.array([round(float(ctx[f"share_{c}"]) * purchases) for c in self.categories])
        affinity = rng.dirichlet(AFFINITY_CONCENTRATION + counts, size=samples)
        tier_rank = TIERS.index(ctx["tier"])
        ps = np.clip(
            rng.normal(PRICE_SENS_MEAN - PRICE_SENS_PER_TIER * tier_rank, PRICE_SENS_SD, samples),
            *PRICE_SENS_RANGE,
        )
        promo = round(float(ctx["promo_share"]) * purchases)
        q = 1.0 / (1.0 + np.exp(-(PROMO_INTERCEPT + PROMO_SLOPE * ps)))
        loglik = promo * np.log(q) + (purchases - promo) * np.log1p(-q)
        w = np.exp(loglik - loglik.max())
        responsiveness = rng.normal(0.0, RESPONSIVENESS_SD, samples)
        out = self._posteriors[m.index, samples] = (
            self.static_logit(ctx, affinity, ps, responsiveness), w / w.sum()
        )
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

    def context_expected_reward(
        self,
        member: Member | str | int,
        offer_ids: Sequence[str],
        channel: str,
        history: Sequence[Exposure],
        now_ms: int | None = None,
    ) -> np.ndarray:
        """The redemption probability of each offer as far as the member's observable context
        tells: the truth's channel, fatigue, conditioning and drift terms, with the latent part
        averaged over :meth:`context_posterior`. Greedy on it is the best a policy that sees
        only the context could do even if it knew the world's model (``sim_bayes_oracle``)."""
        m = self.member(member)
        samples, w = self.context_posterior(m)
        js = [self.offer_index[o] for o in offer_ids]
        # the truth's other terms: its logit less its static part (``logit`` adds them to the
        # static part in this order, which keeps every run's figures bit for bit)
        dynamic = np.array(
            [self.logit(m, o, channel, history, now_ms) for o in offer_ids]
        ) - self._static[m.index, js]
        return np.asarray(w @ (1.0 / (1.0 + np.exp(-(samples[:, js] + dynamic)))))

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
        """Record an exposure. Past 64 of them, those older than :attr:`history_ms` go: a run's
        times only grow, so no window reads them again (each exposure is dropped once, the
        cost stays in the order of the exposures the windows still hold, which every
        probability reads anyway); dropping by count lost exposures still inside them."""
        h = self.history.setdefault(member_index, [])
        h.append(Exposure(offer_id, now_ms))
        if len(h) > 64:
            since = now_ms - self.history_ms
            k = 0
            while h[k].issued_at <= since:  # the newest, just appended, is never this old
                k += 1
            del h[:k]

    def delay_ms(self, u: float, window_ms: int) -> int:
        """Redemption delay from a uniform draw: exponential days, kept inside the window."""
        d = -math.log(max(1e-12, 1.0 - u)) * self.delay_mean_days * MS_PER_DAY
        return int(min(d, window_ms * 0.98))


__all__ = ["Exposure", "Member", "World"]
