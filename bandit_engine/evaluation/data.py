"""Logged decisions -> arrays for the estimators; a cross-fitted reward model; evaluation of a
candidate policy configuration against the logs.

Logs come from the engine's own ledger (:func:`from_decisions`, :func:`from_engine`, which also
reads retention archives) or from VW dsjson files (:func:`from_dsjson`, the format of
``bandit-engine export-dsjson``).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ..catalog import Offer, PolicySpec
from ..errors import InvalidArgument
from ..exploration import event_rng
from ..features import FeatureHasher
from ..ledger.records import Decision, read_archive
from .estimators import Estimate, all_estimates

if TYPE_CHECKING:
    from ..engine import Engine


@dataclass(frozen=True)
class LoggedRow:
    event_id: str
    member_id: str
    context: Mapping[str, Any]
    eligible: tuple[str, ...]
    pmf: np.ndarray
    chosen: int
    propensity: float
    reward: float
    offer_context: tuple[Mapping[str, float], ...] = ()


@dataclass
class LoggedData:
    rows: list[LoggedRow]
    offers: dict[str, Offer] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def propensity(self) -> np.ndarray:
        return np.array([r.propensity for r in self.rows])

    @property
    def reward(self) -> np.ndarray:
        return np.array([r.reward for r in self.rows])

    def split(self, fraction: float) -> tuple[LoggedData, LoggedData]:
        k = int(len(self.rows) * fraction)
        return LoggedData(self.rows[:k], self.offers), LoggedData(self.rows[k:], self.offers)


def from_decisions(
    decisions: Iterable[Decision], offers: Iterable[Offer] = (), *, closed_by: int | None = None
) -> LoggedData:
    """Settled, learnable treatment decisions (those with a reward), in log order. With
    ``closed_by`` (epoch ms), only those whose reward window had closed by then: a redemption
    settles its decision at once (``aggregation="first"``) but a miss only when the window
    closes, so the settled decisions of windows still open are mostly redemptions, and an
    estimate from them would read too high."""
    rows = []
    for d in decisions:
        if d.offer_id is None or not d.learnable or d.reward is None or d.status not in ("closed", "expired"):
            continue
        if closed_by is not None and d.deadline > closed_by:
            continue
        i = d.eligible.index(d.offer_id)
        rows.append(LoggedRow(
            d.event_id, d.member_id, dict(d.context), tuple(d.eligible), np.asarray(d.pmf, dtype=float),
            i, float(d.probability or d.pmf[i]), float(d.reward),
            tuple(dict(d.offer_context.get(o, {})) for o in d.eligible),
        ))  # fmt: skip
    return LoggedData(rows, {o.offer_id: o for o in offers})


def open_existing(url: str) -> Engine:
    """An engine on an existing ledger, to read its logs. ``Engine.open`` creates a SQLite file
    that is not there: for a command that only reads, a mistyped path would then read as an
    empty ledger ("0 settled decisions") and leave an empty database behind."""
    from ..engine import Engine
    from ..ledger.sql import sqlite_file

    db = sqlite_file(url)  # None for what is not a SQLite file (not a URL: Engine.open says so)
    if db is not None and not db.is_file():
        raise InvalidArgument(f"no ledger at {url}: the SQLite file {str(db)!r} does not exist")
    return Engine.open(url)


def from_engine(engine: Any, channel: str | None = None, *, archives: Iterable[str | Path] = ()) -> LoggedData:
    """The ledger's settled decisions (of ``channel``) whose reward window has closed by the
    engine's clock (see :func:`from_decisions`), after those of retention ``archives`` (files
    ``Engine.prune`` wrote; a decision in both counts once). A channel neither the ledger nor
    an archive knows is an error, not an empty log."""
    archived: dict[str, Decision] = {}
    for path in archives:
        with open(path, encoding="utf-8") as f:
            for p in read_archive(f):
                if channel is None or p.decision.channel == channel:
                    archived.setdefault(p.decision.event_id, p.decision)
    if channel is not None and not archived:
        known = engine.channels()
        if channel not in known:
            raise InvalidArgument(f"unknown channel {channel!r}; the ledger has {sorted(known)}")
    live = (d for d in engine.ledger.decisions(channel=channel) if d.event_id not in archived)
    return from_decisions(
        itertools.chain(archived.values(), live), engine.offers(), closed_by=engine.clock.now_ms()
    )


def from_dsjson(source: str | Path | IO[str] | Iterable[str]) -> LoggedData:
    """Parse dsjson lines (``a`` 1-based with the chosen action first, ``p`` in the same order,
    ``c._multi[*].A.offer`` the eligible offers, ``_label_cost`` = -reward, ``_labelIndex`` the
    0-based chosen action). Actions out of range, repeated, or a ``_labelIndex`` that is not the
    first of ``a`` are errors naming the line: read as indexes they would crash, or (a negative
    index counts from the end) silently evaluate another action than the one logged."""
    if isinstance(source, str | Path):
        with open(source) as fh:
            lines = fh.readlines()
    else:
        lines = list(source)
    rows = []
    offers: dict[str, Offer] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
            if "_label_cost" not in rec:
                continue
            multi = rec["c"]["_multi"]
            eligible = []
            for m in multi:
                a = dict(m["A"])
                oid = str(a.pop("offer"))
                eligible.append(oid)
                if oid not in offers:
                    offers[oid] = Offer(oid, channels=["dsjson"], features=a)
            k = len(eligible)
            actions, probs = rec["a"], rec["p"]
            if not isinstance(actions, list) or not actions or not all(_is_int(a) and 1 <= a <= k for a in actions):
                raise InvalidArgument(f"dsjson line {n}: 'a' must list 1-based actions in [1, {k}] (the {k} of "
                                      f"'c._multi'), got {actions!r}")  # fmt: skip
            if len(set(actions)) != len(actions):
                raise InvalidArgument(f"dsjson line {n}: 'a' repeats an action: {actions!r}")
            if not isinstance(probs, list) or len(probs) != len(actions):
                raise InvalidArgument(f"dsjson line {n}: 'p' must have one probability per action of 'a', got {probs!r}")
            pmf = np.zeros(k)
            for a_i, p_i in zip(actions, probs, strict=True):
                pmf[a_i - 1] = float(p_i)
            chosen = actions[0] - 1
            label = rec.get("_labelIndex", chosen)
            if not _is_int(label) or label != chosen:
                raise InvalidArgument(f"dsjson line {n}: '_labelIndex' must be the 0-based chosen action, "
                                      f"{chosen} (the first of 'a'), got {label!r}")  # fmt: skip
            rows.append(LoggedRow(
                str(rec.get("EventId", n)), "", dict(rec["c"].get("U", {})), tuple(eligible), pmf,
                chosen, float(rec["_label_probability"]), -float(rec["_label_cost"]),
            ))  # fmt: skip
        except InvalidArgument:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidArgument(f"dsjson line {n}: {exc!r}") from None
    return LoggedData(rows, offers)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# reward model ------------------------------------------------------------------------------
class RidgeRewardModel:
    """Per-offer ridge regression on hashed context features, shrunk to the global mean."""

    def __init__(self, dim: int = 64, alpha: float = 1.0) -> None:
        self.hasher = FeatureHasher(dim)
        self.alpha = alpha
        self.mean = 0.0
        self.weights: dict[str, np.ndarray] = {}
        self.lo, self.hi = 0.0, 1.0

    def x(self, row: LoggedRow) -> np.ndarray:
        return self.hasher.vector(row.context)

    def fit(self, rows: Sequence[LoggedRow], xs: np.ndarray) -> RidgeRewardModel:
        r = np.array([row.reward for row in rows])
        self.mean = float(r.mean()) if r.size else 0.0
        self.lo, self.hi = (float(r.min()), float(r.max())) if r.size else (0.0, 1.0)
        by_offer: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            by_offer.setdefault(row.eligible[row.chosen], []).append(i)
        d = xs.shape[1]
        for oid, idx in by_offer.items():
            x = xs[idx]
            self.weights[oid] = np.linalg.solve(x.T @ x + self.alpha * np.eye(d), x.T @ (r[idx] - self.mean))
        return self

    def predict(self, x: np.ndarray, offer_ids: Sequence[str]) -> np.ndarray:
        out = np.array([self.mean + (float(x @ self.weights[o]) if o in self.weights else 0.0) for o in offer_ids])
        return np.clip(out, self.lo, self.hi)


def cross_fit_predictions(data: LoggedData, folds: int = 2, seed: int = 0, dim: int = 64) -> list[np.ndarray]:
    """q_hat(x_i, a) for every eligible a of every row, each from a model fitted without row i's fold."""
    rows = data.rows
    model0 = RidgeRewardModel(dim)
    xs = np.array([model0.x(r) for r in rows]) if rows else np.zeros((0, dim))
    fold = np.random.default_rng(seed).permutation(len(rows)) % folds
    out: list[np.ndarray] = [np.empty(0)] * len(rows)
    for k in range(folds):
        train = np.flatnonzero(fold != k)
        model = RidgeRewardModel(dim).fit([rows[i] for i in train], xs[train])
        for i in np.flatnonzero(fold == k):
            out[i] = model.predict(xs[i], rows[i].eligible)
    return out


# targets -----------------------------------------------------------------------------------
Target = Callable[[LoggedRow], np.ndarray]


def policy_target(spec: PolicySpec | Mapping[str, Any], train: LoggedData, *, seed: int = 0,
                  floor: float = 0.02) -> Target:  # fmt: skip
    """A candidate policy configuration, warmed up on ``train`` logs (learning from the logged
    action, propensity and reward), then frozen: its pmf on each evaluated row."""
    from ..policies.base import Scoring
    from ..policies.registry import make_policy

    pol = make_policy(spec, seed=seed)
    offers = train.offers

    def scoring(row: LoggedRow) -> Scoring:
        missing = [o for o in row.eligible if o not in offers]
        for o in missing:
            offers[o] = Offer(o, channels=["dsjson"])
        return Scoring(row.member_id or "m", row.context, tuple(offers[o] for o in row.eligible),
                       row.offer_context or ())  # fmt: skip

    for row in train.rows:
        pol.learn(scoring(row), row.chosen, row.propensity, row.reward)

    def target(row: LoggedRow) -> np.ndarray:
        return pol.pmf(scoring(row), event_rng(seed, row.event_id), floor)

    return target


@dataclass
class Report:
    estimates: dict[str, Estimate]
    logged_value: float
    n: int

    def table(self) -> str:
        lines = ["| estimator | value | 95 % interval | ESS |", "|---|---:|---|---:|"]
        for e in self.estimates.values():
            lines.append(f"| {e.estimator} | {e.value:.4f} | [{e.lo:.4f}, {e.hi:.4f}] | {e.ess:,.0f} |")
        lines.append(f"| logged policy (on-policy mean) | {self.logged_value:.4f} | | {self.n:,} |")
        return "\n".join(lines)


def evaluate(data: LoggedData, target: Target, *, folds: int = 2, seed: int = 0,
             propensity: np.ndarray | None = None) -> Report:  # fmt: skip
    """IPS, SNIPS, DM and DR (cross-fitted) estimates of ``target``'s value on ``data``.
    ``propensity`` overrides the logged propensities (e.g. to show what a wrong one does)."""
    if not data.rows:
        raise InvalidArgument("no settled decisions to evaluate")
    pis = [np.asarray(target(r), dtype=float) for r in data.rows]
    pi_chosen = np.array([pi[r.chosen] for pi, r in zip(pis, data.rows, strict=True)])
    q = cross_fit_predictions(data, folds=folds, seed=seed)
    dm_target = np.array([float(pi @ qi) for pi, qi in zip(pis, q, strict=True)])
    q_chosen = np.array([qi[r.chosen] for qi, r in zip(q, data.rows, strict=True)])
    p = data.propensity if propensity is None else np.asarray(propensity, dtype=float)
    est = all_estimates(pi_chosen, p, data.reward, dm_target, q_chosen)
    return Report(est, float(data.reward.mean()), len(data.rows))


__all__ = [
    "LoggedData", "LoggedRow", "Report", "RidgeRewardModel", "Target", "cross_fit_predictions",
    "evaluate", "from_decisions", "from_dsjson", "from_engine", "open_existing", "policy_target",
]  # fmt: skip
