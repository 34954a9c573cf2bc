"""Shared linear Thompson sampling: ONE Bayesian linear model over every offer of a channel.

``lin_ts`` keeps a disjoint model per offer, so each offer learns only from the decisions that
chose it (a tenth of them with ten offers) and a new offer starts from nothing. Here the score
of offer ``a`` for a decision is ``theta . phi(context, a)`` with one weight vector ``theta``
for all offers, so every decision teaches every offer that shares a feature with the chosen
one, and a new offer starts from what its features already earned (cold start). With
``ChannelConfig.model_group`` several channels learn this one model together (the channel
enters the context as ``channel``), so a decision on any channel teaches all of them.

It is a family of its own rather than an option of ``lin_ts`` because nothing of the
per-offer machinery carries over: the state is one posterior over feature columns (not a row
per offer), the draws are joint across offers (not independent per arm), the snapshot format
differs, and so do the parameters (``interactions``, ``max_features`` instead of ``dim``).

Features ``phi(context, a)``, by namespace (as VW's ``-q``):

* ``b``: a bias (1);
* ``c``: the shared context (request context plus the ``member.*`` history summary);
* ``a``: the offer's own features (:attr:`Offer.features`: kind, category, depth, ...);
* ``i``: an offer-id indicator (a per-offer intercept);
* ``h``: the member x offer history (``seen``, ``redeemed``, ``ignored``, ``cat_seen``,
  ``cat_redeemed``, ``days_since_seen``, ``days_since_cat_seen``; they let the model learn
  fatigue);
* ``m`` (with ``match = true``): the context keyed by the offer's own feature values. A
  numeric context key ``share_home`` refers to the value ``home`` (the part after its last
  ``_``) and a string ``top_category=home`` to ``home``; an offer whose ``category`` is
  ``home`` gets ``m:share_*category`` (the squashed share) and ``m:top_category=*category``
  (1). That is one weight for "the member's share of the offer's own category", learned from
  every category's offers, where ``ca``'s ``share_home x category=home`` crosses learn one
  weight per category, each from that category's offers alone (a service sends such keyed
  context whenever it sends per-category or per-brand affinities);
* quadratic interactions between namespaces, chosen by ``interactions`` (default ``["ca"]``):
  ``ca`` crosses every context feature with every offer feature (``share_home x
  category=home``, ``promo_share x depth``, ``tier=gold x kind=points``, ...), ``ci`` every
  context feature with the offer id (a disjoint per-offer model, as a deviation from the shared
  one), ``ha`` history with offer features, and so on for any pair of ``c``, ``a``, ``i``,
  ``h``.

``cross_context = [keys]`` (default: every key) restricts the context side of the crosses
(``ca``, ``ci``, ``ch``, ``cm``) to the listed context keys; every key keeps its single feature.
A handful of crosses (``promo_share x depth``, ``tier x kind``) is learned in days where ~90
per offer take weeks.

``interactions = [], match = true`` is the best map measured on the simulator's default world;
with budgets that bind, ``interactions = ["ca"], match = true, cross_context = ["promo_share",
"tier"]`` (below).
Strings enter as ``name=value`` indicators, bools as 0/1, numbers squashed (signed log1p); an
interaction's value is the product of its two values. Nothing is specific to a catalog or a
world: the features come from whatever the offers and the context carry.

Model: ``r = theta . phi + N(0, noise_variance)``, ``theta ~ N(0, prior_variance * I)``. Each
feature gets its own column the first time a *learned* decision carries it (no hashing, so no
collisions; at most ``max_features`` columns, later new features are not learned). Each
reward updates the full ``n x n`` covariance, so ``n`` sets the cost: 8 n^2 bytes of memory and
an O(n^2) pass per reward. The simulator's scenarios use 60-110 columns; a context key with a
new value per request (a store id, a zip code) adds a column per value (and one per offer
feature it is crossed with) until the limit. With such a key, 1 000 columns (the default
``max_features=1024``) cost 1.3 ms per choose + reward and 110 MB of process memory, against
0.7 ms without it; 4 096 cost 15 ms and 720 MB (the former default). Keep such keys out of
the context, or out of the crosses with ``cross_context``. The
posterior is kept as its mean ``mu`` and full covariance ``cov`` over the learned columns,
updated by one rank-one (Kalman / Sherman-Morrison) step per reward, never inverted. The
defaults (``prior_variance=0.02``, ``noise_variance=0.05``, ``interactions=["ca"]``) were tuned
on seeds 11 and 12 of ``simulations/default.toml``: a decision carries ~30 context features
crossed with ~3 offer features, so the per-weight prior must be small for the prior variance of
a whole score to stay near the reward scale.

Thompson draws are joint. Sampling ``theta ~ N(mu, cov)`` and scoring the ``K`` eligible
offers is the same as sampling their scores from ``N(Phi mu, Phi cov Phi')``, a ``K x K``
covariance (features no decision has taught yet keep their independent prior, so a new offer
or a new context value gets prior variance). A decision therefore factors that ``K x K``
matrix (Cholesky) and maps ``propensity_draws`` standard normals through it: exact joint
draws from the current posterior (shared features move every offer's draw together, so they
do not add noise to the argmax), with no ``n x n`` factorization and nothing refreshed lazily.
The normals are a window of the fixed pool shared with ``lin_ts`` at an offset drawn from the
event generator, so the pmf is a pure function of the policy state and the event generator.

``exploration_scale = c`` (default 1: plain Thompson sampling) narrows (``c < 1``) or widens
the draws: scores come from ``N(Phi mu, c^2 Phi cov Phi')``, the mean unchanged, the spread
times ``c`` (Chapelle & Li, 2011, found a narrowed posterior earned more on display ads). It sets
how wide Thompson explores apart from how fast the mean moves, which ``prior_variance`` and
``noise_variance`` cannot do separately; the logged propensity stays exact, since the pmf is the
argmax frequency of the draws actually used. Measured pooled (``model_group = "all"``), 20 000
decisions, normalized lift, ``c = 1`` against ``0.35`` (the best of seven values on tuning
seeds 11-12 of ``simulations/default.toml``, where its neighbours 0.3 and 0.4 did not beat 1),
seeds 1-3: default 0.746 against 0.768, tight_budget 0.666 against 0.709 (13.0 % against 11.3 %
behind the budget-feasible oracle), but fatigue (``shared_ts_capped``, a model per channel)
0.727 against 0.716 and cold_start 0.656 against 0.647. The gain is confined to the default
world, so the family default stays 1 and ``default.toml`` and ``tight_budget.toml`` set 0.35
(``simulations/README.md``, "Narrower Thompson draws").

``match = true`` with no crosses (``interactions = []``) raised the normalized lift on every
seed of all four scenarios (20 000 decisions, seeds 1-3, against ``["ca"]`` as configured):
default 0.768 -> 0.844, fatigue 0.727 -> 0.805, cold_start 0.656 -> 0.737, tight_budget 11.3 % ->
10.2 % behind the budget-feasible oracle (``simulations/README.md``, "Matching the context to
the offer"). Without keyed context it adds nothing, so the family default stays
``interactions = ["ca"]``, ``match = false``. Without crosses, though, the model cannot tell
price-sensitive members or tiers apart per offer, which decides who gets a scarce deep discount
when budgets bind: on tight_budget, adding back the crosses of ``promo_share`` and ``tier``
alone (``cross_context``) won on all eight seeds measured (held-out 1-3: normalized lift
0.737 -> 0.780 against the budget-feasible oracle), while on the default world it changed
nothing beyond noise (0.844 -> 0.840), so only ``tight_budget.toml`` sets it.

Cost (measured on the default scenario's catalog, ``K = 10``, ~300 learned features after
6 000 rewards, one core): a decision ~0.3 ms (feature ids are built with numpy from the
context's and the offers' atoms; then one ``K x n`` by ``n x n`` product), a reward ~0.1 ms
(one ``n x n`` rank-one update). ``lin_ts`` takes ~0.06 ms for each. The snapshot holds the
atom names, the feature pairs, ``mu`` and ``cov`` (``8 n^2`` bytes: 0.7 MB at ``n = 300``).
On a box whose cores are busy, multithreaded BLAS slows these small products down; the
simulations were measured with ``OPENBLAS_NUM_THREADS=1``.

>>> from bandit_engine.catalog import Offer
>>> offers = tuple(Offer(f"o{i}", channels=["email"], features={"category": c})
...                for i, c in enumerate(["home", "beauty"]))
>>> pol = SharedTS(seed=0)
>>> home, beauty = Scoring("m1", {"likes": "home"}, offers), Scoring("m2", {"likes": "beauty"}, offers)
>>> for _ in range(50):
...     pol.learn(home, 0, 0.5, 1.0); pol.learn(home, 1, 0.5, 0.0)
...     pol.learn(beauty, 0, 0.5, 0.0); pol.learn(beauty, 1, 0.5, 1.0)
>>> new = Offer("o2", channels=["email"], features={"category": "beauty"})  # never shown
>>> pol.mean(Scoring("m3", {"likes": "beauty"}, (offers[0], new))).round(1)  # from its features
array([0. , 0.9])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.linalg import blas

from ..errors import InvalidArgument
from ..features import squash
from .base import Policy, Scoring, int_param, positive_param
from .linear import standard_normals

FAMILY = "shared_ts"
# the covariance is n x n floats: 128 MB in a snapshot at 4096 (16 384 passed the 1 GB a
# database value can hold, and every reward updated 2 GB)
MAX_FEATURES = 4096
NAMESPACES = "caihm"  # context, offer features, offer id, member x offer history, matches
DEFAULT_INTERACTIONS = ("ca",)


def _check_interactions(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgument(
            f"{FAMILY}: interactions must be a list of namespace pairs such as 'ca', got {value!r}"
        )
    out: list[str] = []
    for q in value:
        if (
            not isinstance(q, str)
            or len(q) != 2
            or q[0] not in NAMESPACES
            or q[1] not in NAMESPACES
            or q[0] == q[1]
        ):
            raise InvalidArgument(
                f"{FAMILY}: an interaction must be two different letters of {NAMESPACES!r} "
                f"(context, offer features, offer id, history, matches), got {q!r}"
            )
        if q in out or q[::-1] in out:
            raise InvalidArgument(f"{FAMILY}: interaction {q!r} is listed twice")
        out.append(q)
    return tuple(out)


def _check_cross_context(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise InvalidArgument(
            f"{FAMILY}: cross_context must be a list of context keys such as 'tier', got {value!r}"
        )
    out: list[str] = []
    for key in value:
        if not isinstance(key, str) or not key:
            raise InvalidArgument(
                f"{FAMILY}: a cross_context entry must be a non-empty context key, got {key!r}"
            )
        if key in out:
            raise InvalidArgument(f"{FAMILY}: cross_context key {key!r} is listed twice")
        out.append(key)
    return tuple(out)


def _atoms(features: Mapping[str, Any], prefix: str) -> list[tuple[str, float]]:
    """``(name, value)`` of a feature mapping; zeros are left out (they add nothing)."""
    out: list[tuple[str, float]] = []
    for k, v in features.items():
        if isinstance(v, str):
            out.append((f"{prefix}{k}={v}", 1.0))
        elif isinstance(v, bool):
            if v:
                out.append((prefix + k, 1.0))
        else:
            x = squash(float(v))
            if x != 0.0:
                out.append((prefix + k, x))
    return out


_BIAS = 0  # atom 0 is the bias; a single feature ``x`` is the pair (x, bias)
_CODE = 1 << 24  # pair (x, y) -> x * _CODE + y, to find features shared by several offers


class _Features:
    """One decision's features as pairs of atom ids: ``rows`` (offer index), ``x``, ``y``, ``v``.

    Atoms are names such as ``c:tier=gold`` or ``a:category=home``; a feature is a pair of
    atoms (an interaction) or an atom paired with the bias (a single feature)."""

    __slots__ = ("rows", "x", "y", "v")

    def __init__(self, rows: np.ndarray, x: np.ndarray, y: np.ndarray, v: np.ndarray) -> None:
        self.rows, self.x, self.y, self.v = rows, x, y, v


class SharedTS(Policy):
    """Contextual Thompson sampling with one Bayesian linear model shared by all offers."""

    family = FAMILY
    uses_offer_context = True
    supports_correction = True

    def __init__(
        self,
        *,
        seed: int = 0,
        interactions: Sequence[str] = DEFAULT_INTERACTIONS,
        prior_variance: float = 0.02,
        noise_variance: float = 0.05,
        propensity_draws: int = 128,
        max_features: int = 1024,
        exploration_scale: float = 1.0,
        match: bool = False,
        cross_context: Sequence[str] | None = None,
    ) -> None:
        super().__init__(seed=seed)
        self.interactions = _check_interactions(interactions)
        self.prior_variance = positive_param(FAMILY, "prior_variance", prior_variance)
        self.noise_variance = positive_param(FAMILY, "noise_variance", noise_variance)
        self.propensity_draws = int_param(FAMILY, "propensity_draws", propensity_draws, 1, 100_000)
        self.max_features = int_param(FAMILY, "max_features", max_features, 1, MAX_FEATURES)
        self.exploration_scale = positive_param(FAMILY, "exploration_scale", exploration_scale)
        if self.exploration_scale > 10.0:
            raise InvalidArgument(
                f"{FAMILY}: exploration_scale must be in (0, 10], got {exploration_scale!r}"
            )
        if not isinstance(match, bool):
            raise InvalidArgument(f"{FAMILY}: match must be true or false, got {match!r}")
        if not match and any("m" in q for q in self.interactions):
            raise InvalidArgument(f"{FAMILY}: an interaction with 'm' (matches) needs match = true")
        self.match = match
        self.cross_context = _check_cross_context(cross_context)
        self._offer_atoms: dict[tuple[str, Any], tuple[list[str], list[float]]] = {}
        self._reset()

    # storage ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._atoms: list[str] = ["b"]  # atom names; ids are positions (0 = bias)
        self._atom_id: dict[str, int] = {"b": _BIAS}
        self._pairs: list[tuple[int, int]] = []  # (x, y) atom pair per model column
        # (x, y) -> column: the sorted codes x * _CODE + y of the learned pairs, and their
        # columns (a sorted array, not an atoms x atoms table: that grows with the square of
        # the context's distinct values)
        self._codes = np.zeros(0, dtype=np.int64)
        self._code_cols = np.zeros(0, dtype=np.int64)
        self._mu = np.zeros(0)
        self._cov = np.zeros((0, 0))

    def _add_atoms(self, names: list[str]) -> None:
        for name in names:
            if name not in self._atom_id:
                self._atom_id[name] = len(self._atoms)
                self._atoms.append(name)

    def _index_pairs(self, first: int) -> None:
        """Add the pairs of columns ``first..`` to the sorted code index."""
        new = np.array(self._pairs[first:], dtype=np.int64).reshape(-1, 2)
        codes = np.concatenate([self._codes, new[:, 0] * _CODE + new[:, 1]])
        cols = np.concatenate([self._code_cols, np.arange(first, len(self._pairs))])
        order = np.argsort(codes, kind="stable")
        self._codes, self._code_cols = codes[order], cols[order]

    def _add_columns(self, pairs: list[tuple[int, int]]) -> None:
        """Columns for features seen for the first time (prior: independent, mean 0)."""
        n, k = len(self._pairs), len(pairs)
        cov = np.zeros((n + k, n + k))
        cov[:n, :n] = self._cov
        cov[range(n, n + k), range(n, n + k)] = self.prior_variance
        self._cov = cov
        self._mu = np.concatenate([self._mu, np.zeros(k)])
        self._pairs.extend(pairs)
        self._index_pairs(n)

    # features --------------------------------------------------------------------------------
    def _offer_parts(self, offer: Any) -> tuple[list[str], list[float]]:
        """An offer's feature atoms and the id atom; cached (an offer's features are immutable)."""
        key = (offer.offer_id, tuple(offer.features.items()))
        parts = self._offer_atoms.get(key)
        if parts is None:
            atoms = _atoms(offer.features, "a:")
            parts = ([n for n, _ in atoms], [v for _, v in atoms])
            if len(self._offer_atoms) >= 4096:
                self._offer_atoms.clear()
            self._offer_atoms[key] = parts
        return parts

    def _features(self, s: Scoring, only: int | None = None, *, grow: bool = False) -> _Features:
        """The features of every offer of ``s`` (or of offer ``only``).

        Atoms this policy never learned get provisional ids past the known ones (``grow``: they
        are added for good, as ``learn`` does)."""
        atom_id = self._atom_id
        provisional: dict[str, int] = {}

        def ids(names: list[str]) -> list[int]:
            out = []
            for name in names:
                i = atom_id.get(name)
                if i is None:
                    i = provisional.get(name)
                    if i is None:
                        i = provisional[name] = len(atom_id) + len(provisional)
                out.append(i)
            return out

        ctx = s._cache.get(FAMILY)
        if ctx is None:
            ctx = s._cache[FAMILY] = _atoms(s.context, "c:")
        if self.cross_context is None:
            crossed = None  # every context atom is crossed
        else:  # only the listed keys' atoms enter the crosses (the singles keep them all)
            key = FAMILY + ":crossed:" + ",".join(self.cross_context)
            crossed = s._cache.get(key)
            if crossed is None:
                keys = set(self.cross_context)
                listed = {n for n, _ in _atoms({k: s.context[k] for k in keys & s.context.keys()}, "c:")}
                crossed = s._cache[key] = np.array([n in listed for n, _ in ctx], dtype=bool)
        offers = range(len(s.offers)) if only is None else (only,)
        ns: dict[str, tuple[list[str], list[float], list[int]]] = {
            "a": ([], [], []), "i": ([], [], []), "h": ([], [], []), "m": ([], [], []),
        }  # fmt: skip
        keyed = self._keyed_context(s) if self.match else None
        for r, j in enumerate(offers):
            names, vals = self._offer_parts(s.offers[j])
            na, va, ra = ns["a"]
            na += names
            va += vals
            ra += [r] * len(names)
            ns["i"][0].append(f"i:{s.offers[j].offer_id}")
            ns["i"][1].append(1.0)
            ns["i"][2].append(r)
            hist = _atoms(s.offer_context[j], "h:")
            nh, vh, rh = ns["h"]
            nh += [n for n, _ in hist]
            vh += [v for _, v in hist]
            rh += [r] * len(hist)
            if keyed is not None:
                nm, vm, rm = ns["m"]
                for fname, value in s.offers[j].features.items():
                    for name, v in keyed.get(value, ()) if isinstance(value, str) else ():
                        nm.append(f"m:{name}*{fname}")
                        vm.append(v)
                        rm.append(r)
        k = len(offers)
        names_all = [n for n, _ in ctx] + ns["a"][0] + ns["i"][0] + ns["h"][0] + ns["m"][0]
        if grow:
            self._add_atoms(names_all)
        nc = len(ctx)
        arr = {
            "c": (
                np.array(ids([n for n, _ in ctx]), dtype=np.int64),
                np.array([v for _, v in ctx]),
                None,
            )
        }
        for q in "aihm":
            names, vals, rows = ns[q]
            arr[q] = (
                np.array(ids(names), dtype=np.int64),
                np.array(vals),
                np.array(rows, dtype=np.int64),
            )
        # single features: the bias and the context (shared by every offer), then a, i, h
        parts_r = [np.repeat(np.arange(k), nc + 1)]
        parts_x = [np.tile(np.concatenate([[_BIAS], arr["c"][0]]), k)]
        parts_v = [np.tile(np.concatenate([[1.0], arr["c"][1]]), k)]
        for q in "aihm":
            xq, vq, rq = arr[q]
            parts_r.append(rq)
            parts_x.append(xq)
            parts_v.append(vq)
        parts_y = [np.zeros(len(p), dtype=np.int64) for p in parts_x]
        for p, q in self.interactions:
            if "c" in (p, q):  # the context is shared: cross it with every offer's atoms at once
                o = q if p == "c" else p
                xo, vo, ro = arr[o]
                xc, vc = arr["c"][0], arr["c"][1]
                if crossed is not None:
                    xc, vc = xc[crossed], vc[crossed]
                nx = xc.size  # the crossed context atoms (all nc of them without cross_context)
                xs, ys = (xc[:, None], xo[None, :]) if p == "c" else (xo[None, :], xc[:, None])
                parts_x.append(np.broadcast_to(xs, (nx, xo.size)).ravel())
                parts_y.append(np.broadcast_to(ys, (nx, xo.size)).ravel())
                parts_v.append(np.outer(vc, vo).ravel())
                parts_r.append(np.broadcast_to(ro[None, :], (nx, xo.size)).ravel())
            else:  # both per offer: cross within each offer
                xp, vp, rp = arr[p]
                xq, vq, rq = arr[q]
                same = rp[:, None] == rq[None, :]
                ii, jj = np.nonzero(same)
                parts_x.append(xp[ii])
                parts_y.append(xq[jj])
                parts_v.append(vp[ii] * vq[jj])
                parts_r.append(rp[ii])
        return _Features(
            np.concatenate(parts_r), np.concatenate(parts_x), np.concatenate(parts_y),
            np.concatenate(parts_v),
        )  # fmt: skip

    @staticmethod
    def _keyed_context(s: Scoring) -> dict[str, list[tuple[str, float]]]:
        """The context keyed by the offer feature values it refers to (``match``).

        A numeric key ``share_home`` refers to the value ``home`` (the part after its last
        ``_``), and a string ``top_category=home`` to ``home``. An offer whose feature
        ``category`` is ``home`` then gets ``m:share_*category`` = squashed ``share_home`` and
        ``m:top_category=*category`` = 1: one weight for "the member's share of the offer's own
        category", learned from every category's offers (``ca``'s crosses learn one weight per
        category, each from that category's offers alone)."""
        cached = s._cache.get(FAMILY + ":keyed")
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        out: dict[str, list[tuple[str, float]]] = {}
        for key, v in s.context.items():
            if isinstance(v, str):
                out.setdefault(v, []).append((f"{key}=", 1.0))
            elif not isinstance(v, bool) and "_" in key:
                prefix, _, value = key.rpartition("_")
                x = squash(float(v))
                if value and x != 0.0:
                    out.setdefault(value, []).append((f"{prefix}_", x))
        s._cache[FAMILY + ":keyed"] = out
        return out

    def _columns(self, f: _Features) -> np.ndarray:
        """Model column of each feature, -1 for features never learned."""
        if not self._codes.size:
            return np.full(f.x.size, -1, dtype=np.int64)
        q = f.x * _CODE + f.y  # provisional atom ids are past every learned one: no false hit
        pos = np.minimum(np.searchsorted(self._codes, q), self._codes.size - 1)
        return np.where(self._codes[pos] == q, self._code_cols[pos], -1)

    # hooks -----------------------------------------------------------------------------------
    def _draws(self, s: Scoring, rng: np.random.Generator) -> np.ndarray:
        f = self._features(s)
        k = len(s.offers)
        cols = self._columns(f)
        known = cols >= 0
        cov = np.zeros((k, k))
        m = np.zeros(k)
        if known.any():
            n = len(self._pairs)
            kc = cols[known]
            used, inv = np.unique(kc, return_inverse=True)
            if 2 * used.size >= n:  # most of the model is in play: no gather
                used, inv, block = np.arange(n), kc, self._cov
            else:
                block = self._cov[np.ix_(used, used)]
            phi = np.zeros((k, used.size))
            np.add.at(phi, (f.rows[known], inv), f.v[known])  # summed, as learning sums them
            m = phi @ self._mu[used]
            cov += phi @ block @ phi.T
        if not known.all():  # never learned: independent prior, shared by the offers having it
            unk = ~known
            _, inv = np.unique(f.x[unk] * _CODE + f.y[unk], return_inverse=True)
            phu = np.zeros((k, int(inv.max()) + 1))
            np.add.at(phu, (f.rows[unk], inv), f.v[unk])
            cov += self.prior_variance * (phu @ phu.T)
        chol = _factor(0.5 * (cov + cov.T))
        draws = standard_normals(rng, self.propensity_draws, k) @ chol.T
        if self.exploration_scale != 1.0:  # narrower (or wider) draws around the same mean
            draws *= self.exploration_scale
        draws += m
        return draws

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        room = self.max_features - len(self._pairs)
        f = self._features(s, chosen, grow=room > 0)  # no new atoms once no column can be added
        cols = self._columns(f)
        if (cols < 0).any():
            bad = cols < 0
            new = list(dict.fromkeys(zip(f.x[bad].tolist(), f.y[bad].tolist(), strict=True)))
            if room > 0:
                self._add_columns(new[:room])
                cols = self._columns(f)
        keep = cols >= 0
        if not keep.any():
            return
        idx, x = cols[keep], f.v[keep]
        u = x @ self._cov[idx]  # cov x (cov is symmetric: rows are columns)
        denom = self.noise_variance + float(x @ u[idx])
        self._mu += u * ((reward - float(x @ self._mu[idx])) / denom)
        # cov -= u u' / denom, in place (cov is symmetric, so its C order is a Fortran order)
        self._cov = blas.dger(-1.0 / denom, u, u, a=self._cov.T, overwrite_a=1).T

    def _correct(self, s: Scoring, chosen: int, probability: float, delta: float) -> None:
        """The posterior mean is ``cov (prior terms + sum x r / noise_variance)`` with ``cov``
        independent of the rewards, so revising one reward by ``delta`` adds
        ``cov x delta / noise_variance`` with the current ``cov`` (whatever was learned since).
        Features without a column were not learned by the decision's ``learn`` either."""
        f = self._features(s, chosen)
        cols = self._columns(f)
        keep = cols >= 0
        if not keep.any():
            return
        idx, x = cols[keep], f.v[keep]
        self._mu += (x @ self._cov[idx]) * (delta / self.noise_variance)

    # state -----------------------------------------------------------------------------------
    def feature_names(self) -> list[str]:
        """The learned features, in column order (``x*y`` for an interaction)."""
        a = self._atoms
        return [a[x] if y == _BIAS else f"{a[x]}*{a[y]}" for x, y in self._pairs]

    def mean(self, s: Scoring) -> np.ndarray:
        """Posterior mean reward of each offer in ``s`` (features never learned count 0)."""
        f = self._features(s)
        cols = self._columns(f)
        known = cols >= 0
        return np.bincount(
            f.rows[known], weights=f.v[known] * self._mu[cols[known]], minlength=len(s.offers)
        )

    def _get_state(self) -> dict[str, Any]:
        state = {
            "interactions": list(self.interactions),
            "match": self.match,
            "atoms": list(self._atoms),
            "pairs": np.array(self._pairs, dtype=np.int32).reshape(-1, 2),
            "mu": self._mu.copy(),
            "cov": np.ascontiguousarray(self._cov),
        }
        if self.cross_context is not None:  # absent by default: older snapshots stay identical
            state["cross_context"] = list(self.cross_context)
        return state

    def _set_state(self, state: Mapping[str, Any]) -> None:
        # the settings that shape the feature map must match (a snapshot's header is JSON:
        # lists, bools, null; a setting absent from it had its default)
        ours = {
            "interactions": ([], list(self.interactions)),
            "match": (False, self.match),
            "cross_context": (None, None if self.cross_context is None else list(self.cross_context)),
        }
        for name, (default, value) in ours.items():
            theirs = state.get(name, default)
            if theirs != value:
                raise InvalidArgument(f"{FAMILY}: snapshot has {name} {theirs!r}, this policy {value!r}")
        atoms = [str(a) for a in state["atoms"]]
        pairs = [(int(x), int(y)) for x, y in state["pairs"]]
        n = len(pairs)
        mu, cov = state["mu"], state["cov"]
        if (
            mu.shape != (n,)
            or cov.shape != (n, n)
            or not atoms
            or atoms[0] != "b"
            or len(set(atoms)) != len(atoms)
            or any(not (0 <= v < len(atoms)) for p in pairs for v in p)
        ):
            raise InvalidArgument(f"{FAMILY}: snapshot arrays do not match its feature list")
        self._reset()
        self._add_atoms(atoms[1:])
        self._pairs = pairs
        self._index_pairs(0)
        self._mu = np.array(mu, dtype=np.float64)
        self._cov = np.array(cov, dtype=np.float64)


def _factor(cov: np.ndarray) -> np.ndarray:
    """A lower factor ``L`` with ``L L' = cov`` (cov is PSD up to rounding)."""
    scale = float(np.trace(cov)) / cov.shape[0] or 1.0
    try:
        return np.linalg.cholesky(cov + np.eye(cov.shape[0]) * (1e-10 * scale))
    except np.linalg.LinAlgError:  # rank-deficient beyond rounding: eigen-factor instead
        w, v = np.linalg.eigh(cov)
        return v * np.sqrt(np.maximum(w, 0.0))


FAMILIES: dict[str, Callable[..., Policy]] = {FAMILY: SharedTS}

__all__ = ["FAMILIES", "SharedTS"]
