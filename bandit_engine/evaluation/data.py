"""Logged decisions -> arrays for the estimators; a cross-fitted reward model; evaluation of a
candidate policy configuration against the logs.

Logs come from the engine's own ledger (:func:`from_decisions`, :func:`from_engine`, which also
reads retention archives) or from VW dsjson files (:func:`from_dsjson`, the format of
``bandit-engine export-dsjson``).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from ..catalog import Offer, PolicySpec, check_features, is_finite_number, shown
from ..errors import InvalidArgument
from ..exploration import event_rng
from ..features import FeatureHasher
from ..ledger.records import SETTLED_REWARD_LIMIT, Decision, read_archive
from ..ledger.settle import settled_by
from ..policies.registry import make_policy, records_history
from .estimators import Estimate, all_estimates

if TYPE_CHECKING:
    from ..engine import Engine

# |reward| of a dsjson label. The engine takes rewards up to 1e9 each (a sum-aggregated
# decision adds several), so a larger label is a file written wrong; finite but huge (1e300),
# it read as a reward and made every estimate and interval overflow (inf, nan, warnings).
# An archived decision's reward has the same bound.
LABEL_LIMIT = SETTLED_REWARD_LIMIT


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
    history: bool = True  # the logging policy recorded the member x offer history


@dataclass
class LoggedData:
    rows: list[LoggedRow]
    offers: dict[str, Offer] = field(default_factory=dict)
    # dsjson lines without a label (no ``_label_cost``: no outcome yet) that were skipped; an
    # estimate from the labelled ones is biased if their outcome would differ (:func:`from_dsjson`)
    unlabeled: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def propensity(self) -> np.ndarray:
        return np.array([r.propensity for r in self.rows])

    @property
    def reward(self) -> np.ndarray:
        return np.array([r.reward for r in self.rows])

    @property
    def without_history(self) -> int:
        """Rows logged without the member x offer history (by a family that does not use it,
        or from a dsjson file with no 'H' at all): a candidate that uses it sees them as if
        every member were new to every offer."""
        return sum(not r.history for r in self.rows)

    def split(self, fraction: float) -> tuple[LoggedData, LoggedData]:
        k = int(len(self.rows) * fraction)
        return LoggedData(self.rows[:k], self.offers), LoggedData(self.rows[k:], self.offers)


def from_decisions(
    decisions: Iterable[Decision], offers: Iterable[Offer] = (), *, closed_by: int | None = None,
    default_rewards: Mapping[str, float] | None = None,
) -> LoggedData:
    """Settled, learnable, active treatment decisions (those with a reward), in log order: what
    the engine learns from (an inactive decision, e.g. an email never opened, is not). With
    ``closed_by`` (epoch ms), only those whose reward window had closed by then: a redemption
    settles its decision at once (``aggregation="first"``) but a miss only when the window
    closes, so the settled decisions of windows still open are mostly redemptions, and an
    estimate from them would read too high. A decision still ``open`` past its deadline (no
    ``expire`` has run since) counts with the reward expiry will give it: its accumulated
    reward (``aggregation="sum"``), else its channel's ``default_rewards`` entry (0 if none);
    dropping it would keep the redemptions of those windows and lose their misses."""
    rows = []
    for d in decisions:
        if d.offer_id is None or not d.learnable or not d.active:
            continue
        if closed_by is not None:  # as expiry would settle it, if no expiry has run since
            settled = settled_by(d, closed_by, (default_rewards or {}).get(d.channel, 0.0))
            if settled is None:
                continue
            d = settled
        if d.reward is None or d.status not in ("closed", "expired"):
            continue
        i = d.eligible.index(d.offer_id)
        rows.append(LoggedRow(
            d.event_id, d.member_id, dict(d.context), tuple(d.eligible), np.asarray(d.pmf, dtype=float),
            i, float(d.probability or d.pmf[i]), float(d.reward),
            tuple(dict(d.offer_context.get(o, {})) for o in d.eligible),
            records_history(d.policy_name) is not False,
        ))  # fmt: skip
    return LoggedData(rows, {o.offer_id: o for o in offers})


def open_existing(url: str) -> Engine:
    """An engine on an existing ledger, to read its logs, whose schema must be this version's
    newest (reading never migrates it). ``Engine.open`` creates a SQLite file that is not
    there: for a command that only reads, a mistyped path would then read as an empty ledger
    ("0 settled decisions") and leave an empty database behind."""
    from ..engine import Engine
    from ..ledger.sql import sqlite_file

    db = sqlite_file(url)  # None for what is not a SQLite file (not a URL: Engine.open says so)
    if db is not None and not db.is_file():
        raise InvalidArgument(f"no ledger at {url}: the SQLite file {str(db)!r} does not exist")
    return Engine.open(url, upgrade=False)  # reading a ledger never migrates it


def from_engine(engine: Any, channel: str | None = None, *, archives: Iterable[str | Path] = ()) -> LoggedData:
    """The ledger's decisions (of ``channel``) whose reward window has closed by the engine's
    clock, with the reward they settled with or, if no ``expire`` closed them yet, the one it
    will give them (see :func:`from_decisions`), after those of retention ``archives`` (files
    ``Engine.prune`` wrote; a decision in both counts once). A channel neither the ledger nor
    an archive knows is an error, not an empty log."""
    archived: dict[str, Decision] = {}
    for path in archives:
        with open(path, encoding="utf-8") as f:
            try:
                for p in read_archive(f):
                    if channel is None or p.decision.channel == channel:
                        archived.setdefault(p.decision.event_id, p.decision)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{path}: {exc.message}") from None
    if channel is not None and not archived:
        known = engine.channels()
        if channel not in known:
            raise InvalidArgument(f"unknown channel {channel!r}; the ledger has {sorted(known)}")
    live = (d for d in engine.ledger.decisions(channel=channel) if d.event_id not in archived)
    return from_decisions(
        itertools.chain(archived.values(), live), engine.offers(), closed_by=engine.clock.now_ms(),
        default_rewards=engine.default_rewards(),
    )


def from_dsjson(source: str | Path | IO[str] | Iterable[str]) -> LoggedData:
    """Parse dsjson lines (``a`` 1-based with the chosen action first, ``p`` in the same order,
    ``c._multi[*].A.offer`` the eligible offers, ``c._multi[*].H`` their member x offer history
    features, ``_label_cost`` = -reward, ``_labelIndex`` the 0-based chosen action). Actions out
    of range, repeated, or a ``_labelIndex`` that is not the first of ``a`` are errors naming the
    line: read as indexes they would crash, or (a negative index counts from the end) silently
    evaluate another action than the one logged.

    So is every other malformed line, rather than a line skipped or misread: one that is not a
    JSON object (or not UTF-8 text), a ``_label_cost`` or ``p`` that is not a finite number, a
    ``_label_probability`` other than the chosen action's ``p``, an offer that is not an id, an
    ``EventId`` an earlier line has (it would count twice). A line without ``_label_cost`` (a
    decision with no outcome yet) is skipped and counted in ``unlabeled`` (``bandit-engine
    evaluate`` says how many): if those are mostly misses still to come, the labelled lines
    overstate every policy. A label beyond ``LABEL_LIMIT`` (1e12) in magnitude is an error too:
    no reward the engine logs comes near it, and the estimators' arithmetic overflowed."""
    lines = _read_utf8(source).split("\n") if isinstance(source, str | Path) else list(source)
    rows = []
    offers: dict[str, Offer] = {}
    seen: dict[str, int] = {}  # EventId -> its line
    first_seen: dict[str, tuple[int, dict[str, Any]]] = {}  # offer -> its first line, features
    unlabeled = 0
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise InvalidArgument(f"dsjson line {n}: not a JSON object: {line[:80]!r}")
            if "EventId" in rec:
                eid = str(rec["EventId"])
                if eid in seen:
                    raise InvalidArgument(f"dsjson line {n}: EventId {eid!r} is also on line "
                                          f"{seen[eid]}: a decision is logged once")  # fmt: skip
                seen[eid] = n
            if "_label_cost" not in rec:
                unlabeled += 1
                continue
            cost = rec["_label_cost"]
            if not is_finite_number(cost):
                raise InvalidArgument(f"dsjson line {n}: '_label_cost' (-reward) must be a finite "
                                      f"number, got {cost!r}")  # fmt: skip
            if abs(cost) > LABEL_LIMIT:
                raise InvalidArgument(f"dsjson line {n}: '_label_cost' (-reward) must be "
                                      f"between {-LABEL_LIMIT:g} and {LABEL_LIMIT:g}, "
                                      f"got {cost!r}")  # fmt: skip
            c = rec["c"]
            multi = c["_multi"] if isinstance(c, dict) else None
            if not isinstance(multi, list) or not multi or not all(
                isinstance(m, dict) and isinstance(m.get("A"), dict) for m in multi
            ):
                raise InvalidArgument(f"dsjson line {n}: 'c._multi' must list the eligible "
                                      f"actions, each {{\"A\": {{\"offer\": ...}}}}")  # fmt: skip
            context = c.get("U", {})
            if not isinstance(context, dict):
                raise InvalidArgument(f"dsjson line {n}: 'c.U' (the context) must be an object, "
                                      f"got {context!r}")  # fmt: skip
            try:  # what a choose would take: a NaN or a list read as a feature, silently
                check_features("context", context)
            except InvalidArgument as exc:
                raise InvalidArgument(f"dsjson line {n}: 'c.U': {exc.message}") from None
            eligible, history = [], []
            for j, m in enumerate(multi):
                a = dict(m["A"])
                oid = a.pop("offer", None)
                if not (isinstance(oid, str) and oid) and not _is_int(oid):
                    raise InvalidArgument(f"dsjson line {n}: 'c._multi[{j}].A.offer' must be an "
                                          f"offer id, got {oid!r}")  # fmt: skip
                oid = str(oid)
                eligible.append(oid)
                h = m.get("H", {})  # the member x offer history features (Engine.export_dsjson)
                if not isinstance(h, dict) or not all(is_finite_number(v) for v in h.values()):
                    raise InvalidArgument(f"dsjson line {n}: 'c._multi[{j}].H' (member x "
                                          f"offer history) must map names to numbers, "
                                          f"got {h!r}")  # fmt: skip
                history.append(h)
                if oid not in offers:
                    try:
                        offers[oid] = Offer(oid, channels=["dsjson"], features=a)
                    except InvalidArgument as exc:
                        msg = f"dsjson line {n}: offer {oid!r}: {exc.message}"
                        raise InvalidArgument(msg) from None
                    first_seen[oid] = (n, a)
                elif a != first_seen[oid][1]:  # one offer, one set of features: which to use?
                    raise InvalidArgument(
                        f"dsjson line {n}: offer {oid!r} has other features ('c._multi[{j}].A') "
                        f"than on line {first_seen[oid][0]}: {shown(a)} against "
                        f"{shown(first_seen[oid][1])}"
                    )
            k = len(eligible)
            actions, probs = rec["a"], rec["p"]
            if not isinstance(actions, list) or not actions or not all(_is_int(a) and 1 <= a <= k for a in actions):
                raise InvalidArgument(f"dsjson line {n}: 'a' must list 1-based actions in [1, {k}] (the {k} of "
                                      f"'c._multi'), got {actions!r}")  # fmt: skip
            if len(set(actions)) != len(actions):
                raise InvalidArgument(f"dsjson line {n}: 'a' repeats an action: {actions!r}")
            if not isinstance(probs, list) or len(probs) != len(actions):
                raise InvalidArgument(f"dsjson line {n}: 'p' must have one probability per action of 'a', got {probs!r}")
            if not all(is_finite_number(p_i) and 0 <= p_i <= 1 for p_i in probs) or (
                not probs[0] > 0 or sum(probs) > 1 + 1e-6
            ):
                raise InvalidArgument(f"dsjson line {n}: 'p' must be probabilities summing to at "
                                      f"most 1, the chosen action's > 0, got {probs!r}")
            pmf = np.zeros(k)
            for a_i, p_i in zip(actions, probs, strict=True):
                pmf[a_i - 1] = float(p_i)
            chosen = actions[0] - 1
            label = rec.get("_labelIndex", chosen)
            if not _is_int(label) or label != chosen:
                raise InvalidArgument(f"dsjson line {n}: '_labelIndex' must be the 0-based chosen action, "
                                      f"{chosen} (the first of 'a'), got {label!r}")  # fmt: skip
            label_action = rec.get("_label_Action", chosen + 1)
            if not _is_int(label_action) or label_action != chosen + 1:
                raise InvalidArgument(f"dsjson line {n}: '_label_Action' must be the 1-based "
                                      f"chosen action, {chosen + 1} (the first of 'a'), "
                                      f"got {label_action!r}")  # fmt: skip
            propensity = rec.get("_label_probability", probs[0])
            # the same number twice in the format: one that differs is a file written wrong
            if not (is_finite_number(propensity) and 0 < propensity <= 1
                    and math.isclose(propensity, probs[0], rel_tol=1e-3)):  # fmt: skip
                raise InvalidArgument(f"dsjson line {n}: '_label_probability' must be the chosen "
                                      f"action's probability, {probs[0]!r} (the first of 'p'), "
                                      f"got {propensity!r}")  # fmt: skip
            rows.append(LoggedRow(
                str(rec.get("EventId", n)), "", dict(context), tuple(eligible), pmf,
                chosen, float(propensity), -float(cost), tuple(history),
            ))  # fmt: skip
        except InvalidArgument:
            raise
        except KeyError as exc:
            raise InvalidArgument(f"dsjson line {n}: no {exc.args[0]!r}") from None
        except json.JSONDecodeError as exc:
            msg = f"dsjson line {n}: not JSON ({exc.msg}, column {exc.colno})"
            raise InvalidArgument(msg) from None
        except RecursionError:
            raise InvalidArgument(f"dsjson line {n}: not a dsjson record (JSON nested too "
                                  f"deeply to read)") from None  # fmt: skip
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"dsjson line {n}: {exc!r}"[:300]) from None
    if not any(any(r.offer_context) for r in rows):  # no 'H' anywhere: not recorded
        rows = [replace(r, history=False) for r in rows]
    return LoggedData(rows, offers, unlabeled)


def _read_utf8(path: str | Path) -> str:
    """A file's text; a byte that is not UTF-8 is an error naming its line (a leading BOM is
    dropped, as editors on Windows write one)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InvalidArgument(f"dsjson line {line}: not UTF-8 text ({exc.reason}); is "
                              f"{str(path)!r} a dsjson file?") from None


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# reward model ------------------------------------------------------------------------------
# DM's standard error: this many bootstrap resamples of the rows, each refitting the cross-fitted
# reward model (the se itself is then within ~5 % of its limit)
DM_BOOTSTRAP = 200
DIM = 64  # hashed context features of the reward model


@dataclass(frozen=True)
class _Design:
    """The rows as arrays: hashed context ``xs`` (n x dim), each row's chosen offer and eligible
    offers as indexes into ``offer_ids`` (``eligible`` padded with 0 past a row's own offers)."""

    xs: np.ndarray
    reward: np.ndarray
    chosen: np.ndarray
    eligible: np.ndarray
    offer_ids: tuple[str, ...]


def _design(data: LoggedData, dim: int) -> _Design:
    rows = data.rows
    hasher = FeatureHasher(dim)
    xs = np.array([hasher.vector(r.context) for r in rows]) if rows else np.zeros((0, dim))
    index: dict[str, int] = {}
    for r in rows:
        for o in r.eligible:
            index.setdefault(o, len(index))
    k = max((len(r.eligible) for r in rows), default=1)
    eligible = np.zeros((len(rows), k), dtype=np.intp)
    for i, r in enumerate(rows):
        eligible[i, :len(r.eligible)] = [index[o] for o in r.eligible]
    chosen = np.array([index[r.eligible[r.chosen]] for r in rows], dtype=np.intp)
    return _Design(xs, np.array([r.reward for r in rows], dtype=float), chosen, eligible,
                   tuple(index))  # fmt: skip


def _cross_fit(d: _Design, fold: np.ndarray, folds: int, counts: np.ndarray,
               alpha: float = 1.0) -> np.ndarray:  # fmt: skip
    """The reward model's prediction for every row and every offer (n x offers), each row's
    from a model fitted without its fold: per offer, a ridge regression on the hashed context
    of the rows that chose it, shrunk to the mean reward, clipped to the rewards' range. Rows
    count ``counts`` times (a bootstrap resample; 1 each for the data as logged)."""
    n, dim = d.xs.shape
    q = np.zeros((n, len(d.offer_ids)))
    for k in range(folds):
        w = np.where(fold != k, counts, 0).astype(float)
        train = w > 0
        if train.any():
            mean = float(w @ d.reward / w.sum())
            lo, hi = float(d.reward[train].min()), float(d.reward[train].max())
        else:
            mean, lo, hi = 0.0, 0.0, 1.0
        weights = np.zeros((dim, len(d.offer_ids)))
        for o in np.unique(d.chosen[train]):
            m = train & (d.chosen == o)
            x, wm = d.xs[m], w[m]
            weights[:, o] = np.linalg.solve((x * wm[:, None]).T @ x + alpha * np.eye(dim),
                                            x.T @ (wm * (d.reward[m] - mean)))  # fmt: skip
        test = fold == k
        q[test] = np.clip(mean + d.xs[test] @ weights, lo, hi)
    return q


def _folds(n: int, folds: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % folds


def cross_fit_predictions(
    data: LoggedData, folds: int = 2, seed: int = 0, dim: int = DIM,
) -> list[np.ndarray]:  # fmt: skip
    """q_hat(x_i, a) for every eligible a of every row, each from a model fitted without row
    i's fold."""
    d = _design(data, dim)
    q = _cross_fit(d, _folds(len(data.rows), folds, seed), folds, np.ones(len(data.rows)))
    return [q[i, d.eligible[i, : len(r.eligible)]] for i, r in enumerate(data.rows)]


def _dm_terms(d: _Design, pis: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per row, ``sum_a pi(a|x_i) q(x_i, a)`` over its eligible offers (``pis`` padded with 0
    like ``d.eligible``)."""
    return (pis * q[np.arange(len(q))[:, None], d.eligible]).sum(axis=1)


def _dm_bootstrap_se(d: _Design, pis: np.ndarray, fold: np.ndarray, folds: int, seed: int,
                     draws: int = DM_BOOTSTRAP) -> float:  # fmt: skip
    """The standard error of DM (``mean_i sum_a pi(a|x_i) q(x_i, a)``) over bootstrap resamples
    of the rows, each refitting the cross-fitted model: the reward model's own error is most
    of DM's. A row keeps its fold in every resample, so no copy of it trains the model that
    predicts it. ``pis`` is the target's pmf per row, padded like ``d.eligible``."""
    n = d.xs.shape[0]
    if n < 2:
        return float("inf")
    rng = np.random.default_rng([seed, 0x0D3])
    values = np.empty(draws)
    for b in range(draws):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        values[b] = counts @ _dm_terms(d, pis, _cross_fit(d, fold, folds, counts)) / n
    return float(values.std(ddof=1))


# targets -----------------------------------------------------------------------------------
Target = Callable[[LoggedRow], np.ndarray]


def policy_target(spec: PolicySpec | Mapping[str, Any], train: LoggedData, *, seed: int = 0,
                  floor: float = 0.02) -> Target:  # fmt: skip
    """A candidate policy configuration, warmed up on ``train`` logs (learning from the logged
    action, propensity and reward), then frozen: its pmf on each evaluated row."""
    from ..policies.base import Scoring

    pol = make_policy(spec, seed=seed)
    offers = train.offers
    if pol.family == "fixed" and offers:  # an offer the logs never had: a typo, run as uniform
        unknown = [o for o in pol.offers if o not in offers]  # type: ignore[attr-defined]
        if unknown:
            raise InvalidArgument(f"fixed: unknown offers {unknown}; the logs have "
                                  f"{sorted(offers)}")  # fmt: skip

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


def candidate_notes(spec: PolicySpec | Mapping[str, Any], data: LoggedData) -> list[str]:
    """What the logs cannot show a candidate that it would see live, one sentence each: the
    member x offer history its features use, where the logging policy did not record it; the
    member id, where a dsjson file does not carry it."""
    pol = make_policy(spec)
    notes = []
    if pol.uses_offer_context and data.without_history:
        notes.append(
            f"{data.without_history:,} of {len(data):,} decisions were logged without the member "
            f"x offer history (exposures and redemptions of each offer) that {pol.family} "
            "scores with: their logging policy does not record it. It is evaluated on them as "
            "if every member were new to every offer, not as it would decide live"
        )
    if getattr(pol, "member_id", False) is True and any(not r.member_id for r in data.rows):
        notes.append(f"the logs carry no member ids (a dsjson file does not): {pol.family}'s "
                     "member-id features see every decision as one member's")  # fmt: skip
    return notes


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


def _target_pmf(target: Target, row: LoggedRow) -> np.ndarray:
    """``target``'s pmf on ``row``: one probability per eligible offer, summing to 1. One that
    summed to less (all zeros, or half) was evaluated as it was: DM and DR scaled down, IPS
    read as low, no error; one of the wrong length crashed (IndexError) or read shifted."""
    pi = np.asarray(target(row), dtype=float)
    k = len(row.eligible)
    valid = pi.shape == (k,) and bool(np.all(np.isfinite(pi)) and np.all(pi >= 0))
    if not valid or abs(pi.sum() - 1) > 1e-6:
        raise InvalidArgument(f"the target's pmf for event {row.event_id!r} must be {k} "
                              f"probabilities (one per eligible offer) summing to 1, "
                              f"got {np.array2string(pi, threshold=12)}")  # fmt: skip
    return pi


def evaluate(data: LoggedData, target: Target, *, folds: int = 2, seed: int = 0,
             propensity: np.ndarray | None = None) -> Report:  # fmt: skip
    """IPS, SNIPS, DM and DR (cross-fitted) estimates of ``target``'s value on ``data``.
    ``propensity`` overrides the logged propensities (e.g. to show what a wrong one does)."""
    if not data.rows:
        raise InvalidArgument("no settled decisions to evaluate")
    pis = [_target_pmf(target, r) for r in data.rows]
    pi_chosen = np.array([pi[r.chosen] for pi, r in zip(pis, data.rows, strict=True)])
    d = _design(data, DIM)
    padded = np.zeros(d.eligible.shape)
    for i, pi in enumerate(pis):
        padded[i, : pi.size] = pi
    fold = _folds(len(data.rows), folds, seed)
    q = _cross_fit(d, fold, folds, np.ones(len(data.rows)))
    dm_target = _dm_terms(d, padded, q)
    q_chosen = q[np.arange(len(data.rows)), d.chosen]
    p = data.propensity if propensity is None else np.asarray(propensity, dtype=float)
    dm_se = _dm_bootstrap_se(d, padded, fold, folds, seed)
    est = all_estimates(pi_chosen, p, data.reward, dm_target, q_chosen, dm_se=dm_se)
    return Report(est, float(data.reward.mean()), len(data.rows))


__all__ = [
    "DM_BOOTSTRAP", "LABEL_LIMIT", "LoggedData", "LoggedRow", "Report", "Target",
    "candidate_notes", "cross_fit_predictions", "evaluate", "from_decisions", "from_dsjson",
    "from_engine", "open_existing", "policy_target",
]  # fmt: skip
