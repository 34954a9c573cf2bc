"""Oracles from ground truth, and the simulation-only baseline families.

Both oracles run *through the engine* (same caps, same ledger) as policy families that read the
true response of the arrival being decided from the :class:`~.world.World`:

* ``sim_oracle`` without prices: the unconstrained per-member best offer (greedy on the true
  probability, history included);
* ``sim_oracle`` with ``prices``: the budget-feasible oracle, the argmax of the Lagrangian
  ``p * (value - lambda * cost)`` with dual prices solved on the known probabilities of the
  arrivals the engine can serve an offer to, hold-out and members without consent left out
  (:func:`solve_budget_duals`, a projected subgradient on the LP dual;
  ``Simulator.budget_prices``);
* ``sim_bayes_oracle``: greedy on what the member's observable context tells of the truth
  (the world's model and the exposure history known, the latent traits averaged over their
  posterior): the ceiling of any policy that sees only the context (``compare(...,
  ceiling=True)``).

``sim_truth_paced`` (budgeted scenarios) is greedy on the true probabilities but priced by the
engine's own pacing, like a learner that has nothing left to learn.

``segment_rules`` is the rule-based baseline a loyalty team would write by hand: a discount in
the member's top category, early access for VIPs, else points.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from ..policies.base import Policy, Scoring
from ..policies.registry import families, register, unregister
from .world import VIP_TIERS, World

_WORLDS: weakref.WeakValueDictionary[str, World] = weakref.WeakValueDictionary()


def attach(world: World) -> str:
    """Make ``world`` reachable by oracle policies; returns the key to put in their params."""
    key = f"world-{id(world):x}"
    _WORLDS[key] = world
    return key


class Oracle(Policy):
    """Picks the offer with the highest true (priced) expected reward. Not paced by the engine:
    its own dual prices are the exact budget-feasible ones."""

    family = "sim_oracle"
    paced = False

    def __init__(self, *, seed: int = 0, world: str = "", prices: Mapping[str, float] | None = None,
                 objective: str = "reward") -> None:  # fmt: skip
        super().__init__(seed=seed)
        self.world_key = world
        self.prices = dict(prices or {})
        self.objective = objective

    def _distribution(self, s: Scoring) -> np.ndarray:
        world = _WORLDS.get(self.world_key)
        if world is None:  # detached from its world (e.g. restored elsewhere): no truth to use
            return np.full(len(s.offers), 1.0 / len(s.offers))
        p = self._probabilities(world, s)
        lam = np.array([self.prices.get(o.offer_id, 0.0) * o.cost_cents / 100.0 for o in s.offers])
        out = np.zeros(len(s.offers))
        out[int(np.argmax(p * (1.0 - lam)))] = 1.0
        return out

    def _probabilities(self, world: World, s: Scoring) -> np.ndarray:
        """The redemption probability of each offer of the arrival being decided."""
        m, channel, now = world.current
        hist = world.history_of(m)
        return np.array([world.expected_reward(m, o.offer_id, channel, hist, now) for o in s.offers])

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        return None


class BayesOracle(Oracle):
    """Greedy on what the member's observable context tells of the truth
    (:meth:`World.context_expected_reward`): it knows the world's model and the member's
    exposure history exactly, but not their latent traits. Decision by decision, no policy that
    sees only the context can choose better in expectation, so its normalized lift is the
    ceiling of a learner's (up to what choices do to later fatigue, which neither oracle plans
    for), reached without learning anything; :func:`context_ceiling`'s least-squares fit is an
    achievable lower bound on it. With ``prices`` (dual prices solved on the same context
    probabilities, :func:`static_probabilities` with ``context=True``) it is the ceiling of the
    budget-feasible oracle's."""

    family = "sim_bayes_oracle"

    def _probabilities(self, world: World, s: Scoring) -> np.ndarray:
        m, channel, now = world.current
        return world.context_expected_reward(m, s.offer_ids, channel, world.history_of(m), now)


class PacedTruth(Oracle):
    """Greedy on the true probabilities, handed to the engine as one posterior draw, so the
    engine's own pacing price applies to it exactly as to the Thompson families
    (``p * (1 - rho)``). In a budgeted scenario it measures the engine's pacing with nothing
    left to learn: its gap to the budget-feasible oracle is the pacing gap, and a learner's gap
    beyond it is the learning gap."""

    family = "sim_truth_paced"
    paced = True

    def _draws(self, s: Scoring, rng: np.random.Generator) -> np.ndarray | None:
        world = _WORLDS.get(self.world_key)
        if world is None:
            return np.zeros((1, len(s.offers)))
        m, channel, now = world.current
        hist = world.history_of(m)
        return np.array([[world.expected_reward(m, o.offer_id, channel, hist, now) for o in s.offers]])


class SegmentRules(Policy):
    """Hand-written segment rules over the context and the offers' features (no learning)."""

    family = "segment_rules"

    def _distribution(self, s: Scoring) -> np.ndarray:
        top = s.context.get("top_category")
        vip = s.context.get("tier") in VIP_TIERS
        scores = []
        for o in s.offers:
            kind = o.features.get("kind")
            score = 0.0
            if kind == "early_access" and vip:
                score = 3.0
            elif kind == "discount" and o.category == top:
                score = 2.0 + float(o.features.get("depth", 0.0))
            elif kind == "points":
                score = 1.0
            scores.append(score)
        out = np.zeros(len(s.offers))
        out[int(np.argmax(scores))] = 1.0
        return out

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        return None


SIM_FAMILIES: dict[str, Callable[..., Policy]] = {
    "sim_oracle": Oracle, "sim_truth_paced": PacedTruth, "segment_rules": SegmentRules,
    "sim_bayes_oracle": BayesOracle,
}


@contextmanager
def sim_families() -> Iterator[None]:
    """Register the simulation-only families for the duration of a run, then remove them, so
    the product registry (and its contract tests) never sees them outside the simulator."""
    known = set(families())
    added = [name for name in SIM_FAMILIES if name not in known]
    for name in added:
        register(name, SIM_FAMILIES[name])
    try:
        yield
    finally:
        for name in added:
            unregister(name)


def solve_budget_duals(
    probs: np.ndarray,
    eligible: np.ndarray,
    costs: np.ndarray,
    budgets: np.ndarray,
    *,
    iterations: int = 400,
) -> tuple[np.ndarray, float]:
    """Dual prices ``lambda`` (per currency unit of cost) of the budget-constrained assignment LP

        max sum_t sum_o x_to p_to   s.t.  sum_t x_to p_to c_o <= B_o,  sum_o x_to <= 1

    on known probabilities ``probs`` (T x K), ``eligible`` mask, unit ``costs`` and ``budgets``
    (``inf`` = none). Returns (lambda, dual bound = an upper bound on the feasible optimum).

    >>> p = np.array([[0.5, 0.2]] * 100); e = np.ones_like(p, bool)
    >>> lam, bound = solve_budget_duals(p, e, np.array([1.0, 1.0]), np.array([10.0, np.inf]))
    >>> bool(lam[0] > 0), bool(lam[1] == 0), bool(25.0 < bound < 27.0)  # LP optimum: 10 + 0.2 * 80
    (True, True, True)
    """
    t, k = probs.shape
    finite = np.isfinite(budgets)
    lam = np.zeros(k)
    best_lam, best_bound = lam.copy(), np.inf
    scale = np.where(finite, budgets, 1.0)
    for it in range(iterations):
        score = np.where(eligible, probs * (1.0 - lam * costs), -np.inf)
        choice = np.argmax(score, axis=1)
        top = score[np.arange(t), choice]
        top = np.where(np.isfinite(top), np.maximum(top, 0.0), 0.0)
        bound = float(top.sum() + (lam[finite] * budgets[finite]).sum())
        if bound < best_bound:
            best_bound, best_lam = bound, lam.copy()
        used = top > 0
        spend = np.bincount(choice[used], weights=(probs[np.arange(t), choice] * costs[choice])[used], minlength=k)
        grad = np.where(finite, (spend - np.where(finite, budgets, 0.0)) / scale, 0.0)
        step = 1.0 / costs.max() / np.sqrt(it + 1)
        lam = np.clip(lam + step * grad, 0.0, 1.0 / np.maximum(costs, 1e-9))
    return best_lam, best_bound


def static_probabilities(world: World, members: Sequence[int], channels: Sequence[str],
                         times: Sequence[int], offers: Sequence[Any], *,
                         context: bool = False) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """True probabilities without history or drift, and eligibility, of each arrival x offer;
    with ``context``, what the members' observable context tells of them instead (the latent
    part averaged over :meth:`World.context_posterior`)."""
    from .world import CHANNEL_EFFECT

    members = np.asarray(members)
    cols = [world.offer_index[o.offer_id] for o in offers]
    chan = np.array([CHANNEL_EFFECT.get(c, 0.0) for c in channels])
    pref = np.array([world.members[m].preferred_channel == c for m, c in zip(members, channels, strict=True)])
    shift = chan + 0.3 * pref
    if context:
        probs = np.empty((len(members), len(offers)))
        for m in np.unique(members):
            rows = np.flatnonzero(members == m)
            samples, w = world.context_posterior(int(m))
            z = samples[:, cols][None, :, :] + shift[rows, None, None]
            probs[rows] = np.einsum("s,rsk->rk", w, 1.0 / (1.0 + np.exp(-z)))
    else:
        logits = world._static[members][:, cols]
        probs = 1.0 / (1.0 + np.exp(-(logits + shift[:, None])))
    elig = np.zeros(probs.shape, dtype=bool)
    for j, o in enumerate(offers):
        for i in range(len(members)):
            elig[i, j] = o.is_live(channels[i], int(times[i])) and o.accepts(world.members[members[i]].context)
    return probs, elig


def observable_features(world: World, *, proxies: bool = True) -> np.ndarray:
    """Per member, a numeric vector of the observable context only (the same keys a service
    sends): bias, tier and lifecycle one-hot, frequency > 5, top category one-hot and, with
    ``proxies``, the purchase-history shares and the promotion share."""
    from .world import LIFECYCLES, TIERS

    rows = []
    for m in world.members:
        c = m.context
        v = [1.0]
        v += [float(c["tier"] == t) for t in TIERS[1:]]
        v += [float(c["lifecycle"] == s) for s in LIFECYCLES[1:]]
        v.append(float(c["frequency"] > 5))
        v += [float(c.get("top_category") == cat) for cat in world.categories]
        if proxies:
            v += [float(c.get(f"share_{cat}", 0.0)) for cat in world.categories]
            v += [float(c.get("promo_share", 0.0)), float(c.get("promo_share", 0.0)) ** 2]
        rows.append(v)
    return np.asarray(rows)


def context_ceiling(world: World, members: Sequence[int], channels: Sequence[str], times: Sequence[int],
                    offers: Sequence[Any], *, train_members: int = 20_000,
                    proxies: bool = True) -> dict[str, float]:  # fmt: skip
    """How much of the oracle's lift a policy that sees only the context could reach.

    The *context oracle* scores each offer by a least-squares fit of the true static logit on
    the observable features (:func:`observable_features`), fitted on an independent population
    of ``train_members`` members of the same scenario (seed + 1000), and serves the argmax.
    It is an achievable context-only policy, so its lift is a lower bound on the ceiling any
    learner can reach from the context (``sim_bayes_oracle`` is the ceiling itself); it ignores
    history (fatigue), like the probabilities of :func:`static_probabilities` it is scored on. Returns the expected reward per decision of
    random, the context oracle and the per-member oracle, and ``lift`` (context oracle on the
    normalized-lift scale). ``proxies=False`` leaves the purchase-history proxies out (what
    the context told before they existed: segment attributes and the top category).
    """
    train = World(world.scenario.with_(members=train_members), world.seed + 1000)
    x_train = observable_features(train, proxies=proxies)
    cols = [world.offer_index[o.offer_id] for o in offers]
    coef, *_ = np.linalg.lstsq(x_train, train._static[:, cols], rcond=None)
    probs, elig = static_probabilities(world, members, channels, times, offers)
    score = np.where(elig, (observable_features(world, proxies=proxies) @ coef)[np.asarray(members)], -np.inf)
    pick = probs[np.arange(len(probs)), np.argmax(score, axis=1)]
    best = np.where(elig, probs, -np.inf).max(axis=1)
    rand = np.where(elig, probs, 0.0).sum(axis=1) / elig.sum(axis=1)
    r, c, o = float(rand.mean()), float(pick.mean()), float(best.mean())
    return {"random": r, "context_oracle": c, "oracle": o, "lift": (c - r) / (o - r)}


__all__ = ["BayesOracle", "Oracle", "PacedTruth", "SegmentRules", "attach", "context_ceiling", "observable_features", "sim_families",
           "solve_budget_duals", "static_probabilities"]
