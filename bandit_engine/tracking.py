"""MLflow tracking of simulations. ``import mlflow`` (~2.4 s) happens only inside these
functions, never on the serving path.

The store defaults to ``sqlite:///<root>/mlruns/mlflow.db`` with artifacts under ``<root>/mlruns``
(MLflow 3.17 would otherwise default to ``./mlflow.db``); ``BANDIT_ENGINE_MLFLOW_URI`` or
``--tracking-uri`` points it elsewhere (a server: ``http://host:5000``). A SQLite store keeps
the artifacts of the experiment it creates in its database's directory, as the default store
does (MLflow would put them under ``./mlruns`` of whatever directory the command ran in).

One parent run per ``simulate`` command, one nested child run per policy x seed with params,
step metrics (the curves, logged with ``MlflowClient.log_batch`` in chunks of 1 000), tags and
artifacts (PNG plots, the scenario file, a dsjson sample of the decision log, the policy
snapshot).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument

if TYPE_CHECKING:
    from .simulation.runner import Comparison, RunResult
    from .simulation.scenario import Scenario

ENV_URI = "BANDIT_ENGINE_MLFLOW_URI"
EXPERIMENT = "bandit_engine-simulations"
BATCH = 1000
# the first request to an http(s) store, which tells whether it answers at all: one try with this
# timeout (MLflow's defaults, 7 retries with backoff and 120 s each, hang for minutes on a wrong
# host); set MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT to override
CHECK_TIMEOUT_S = 10


def default_uri(root: str | Path = ".") -> str:
    return f"sqlite:///{Path(root).resolve() / 'mlruns' / 'mlflow.db'}"


def resolve_uri(override: str | None = None, root: str | Path = ".") -> str:
    """``--tracking-uri`` beats ``BANDIT_ENGINE_MLFLOW_URI`` beats the local ``mlruns/`` store.

    >>> resolve_uri("http://mlflow:5000")
    'http://mlflow:5000'
    """
    return override or os.environ.get(ENV_URI) or default_uri(root)


def artifact_root(uri: str) -> Path | None:
    """Where a SQLite store's experiment keeps its artifacts: its database's directory (for the
    default store, ``mlruns/``). None for other stores (MLflow's default location) and an
    in-memory database.

    >>> artifact_root("sqlite:////data/exp/mlflow.db")
    PosixPath('/data/exp')
    >>> artifact_root("http://mlflow:5000") is None
    True
    """
    from .ledger.sql import sqlite_file

    db = sqlite_file(uri)
    return None if db is None else db.resolve().parent


@contextmanager
def _first_request_bounded(uri: str) -> Iterator[None]:
    """Bound the retries and timeout of the first request to an http(s) store (see
    :data:`CHECK_TIMEOUT_S`), unless the user set MLflow's own variables."""
    changed = []
    if uri.startswith(("http://", "https://")):
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"), ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(CHECK_TIMEOUT_S))):
            if name not in os.environ:
                os.environ[name] = value
                changed.append(name)
    try:
        yield
    finally:
        for name in changed:
            os.environ.pop(name, None)


def _check_sqlite_store(uri: str) -> None:
    """A SQLite store must be a database file this process can open. MLflow retried a file it
    could not open for 1 min 45 s, and its error then read as the ledger's ("database error"); an
    in-memory store took the runs and lost them when the command ended."""
    from .ledger.sql import sqlite_file

    if not uri.startswith("sqlite:"):
        return
    db = sqlite_file(uri)
    if db is None:
        raise InvalidArgument(
            f"MLflow tracking URI {uri!r} is an in-memory database, lost when the command ends; "
            "give a file: sqlite:///path/to/mlflow.db"
        )
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(f"file:{db}?mode=rwc", uri=True, timeout=5)
        try:
            conn.execute("PRAGMA schema_version").fetchone()
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise InvalidArgument(f"MLflow tracking URI {uri!r} cannot be used: {db}: {why}") from None


def safe_file_name(name: str) -> str:
    """``name`` as one file name (a scenario named ``promo/q3`` is not a directory).

    >>> safe_file_name("promo/q3"), safe_file_name("default"), safe_file_name("..")
    ('promo_q3', 'default', 'scenario')
    """
    return re.sub(r"[^\w.\-]+", "_", name).strip("._")[:100] or "scenario"


def _chunks(items: Sequence[Any], n: int = BATCH) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Tracker:
    """Logs one simulate command. Use as a context manager; it never leaves a run active."""

    def __init__(self, uri: str | None = None, *, root: str | Path = ".", experiment: str = EXPERIMENT,
                 run_name: str | None = None) -> None:  # fmt: skip
        self.uri = resolve_uri(uri, root)
        self.root = Path(root).resolve()
        self.experiment = experiment
        self.run_name = run_name
        self.parent_id: str | None = None
        self.child_ids: list[str] = []
        self._client: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._ended = False

    # lifecycle -------------------------------------------------------------------------------
    def start(self, scenario: Scenario, params: dict[str, Any]) -> None:
        """Open the store and the parent run. A store MLflow cannot open or reach is one
        :class:`InvalidArgument` naming the URI (the CLI's exit 2), not MLflow's traceback."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from sqlalchemy.exc import SQLAlchemyError

        _check_sqlite_store(self.uri)
        try:
            with _first_request_bounded(self.uri):
                self._client = MlflowClient(self.uri)
                exp = self._client.get_experiment_by_name(self.experiment)
            if exp is None:
                root = artifact_root(self.uri)
                location = None
                if root is not None:  # the database's directory: _check_sqlite_store made it
                    location = root.as_uri()
                exp_id = self._client.create_experiment(self.experiment, artifact_location=location)
            else:
                exp_id = exp.experiment_id
        except (MlflowException, OSError, SQLAlchemyError) as exc:
            self._client = None
            if ":" not in self.uri:  # a bare path: MLflow's file store, which MLflow 3 refuses
                why = "is not a tracking URI; give sqlite:///path/to/mlflow.db or http://host:port"
            else:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
                why = f"cannot be used: {first[:400]}"
            raise InvalidArgument(f"MLflow tracking URI {self.uri!r} {why}") from None
        self._tmp = tempfile.TemporaryDirectory(prefix="be-mlflow-")
        run = self._client.create_run(
            exp_id, run_name=self.run_name or f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"scenario": scenario.name, "kind": "simulate"},
        )  # fmt: skip
        self.parent_id = run.info.run_id
        self._exp_id = exp_id
        try:  # the parent run exists: whatever fails now ends it FAILED, not left RUNNING
            self._log(self.parent_id, params=params)
            if scenario.source is not None:
                p = Path(self._tmp.name) / f"{safe_file_name(scenario.name)}.toml"
                p.write_text(scenario.source)
                self._client.log_artifact(self.parent_id, str(p))
        except BaseException:
            self.close(failed=True)
            raise

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(failed=exc_type is not None)

    def close(self, failed: bool = False) -> None:
        """End the parent run (once: a second call changes nothing)."""
        if self._client is not None and self.parent_id is not None and not self._ended:
            self._ended = True
            self._client.set_terminated(self.parent_id, "FAILED" if failed else "FINISHED")
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # logging ---------------------------------------------------------------------------------
    def _log(self, run_id: str, *, params: dict[str, Any] | None = None,
             metrics: list[tuple[str, float, int]] | None = None, tags: dict[str, str] | None = None) -> None:  # fmt: skip
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ps = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        ms = [Metric(k, float(v), now, int(step)) for k, v, step in (metrics or []) if v == v]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for chunk in _chunks(ps, 100):
            self._client.log_batch(run_id, params=list(chunk))
        for chunk in _chunks(ms):
            self._client.log_batch(run_id, metrics=list(chunk))
        if ts:
            self._client.log_batch(run_id, tags=ts)

    def log_run(self, result: RunResult, comparison: Comparison, scenario: Scenario) -> str:
        """One nested child run for a policy x seed."""
        from . import __version__

        assert self.parent_id is not None and self._tmp is not None, "call start() first"
        run = self._client.create_run(
            self._exp_id, run_name=f"{result.policy}-seed{result.seed}",
            tags={"mlflow.parentRunId": self.parent_id, "policy": result.policy,
                  "seed": str(result.seed), "scenario": scenario.name},
        )  # fmt: skip
        rid = run.info.run_id
        self.child_ids.append(rid)
        spec = result.spec
        params = {
            "scenario": scenario.name, "policy": result.policy, "family": spec["family"],
            "policy_params": json.dumps(spec["params"], sort_keys=True, default=str),
            "seed": result.seed, "decisions": result.decisions, "engine_version": __version__,
            "exploration_floor": scenario.exploration_floor, "channels": ",".join(scenario.channels),
        }  # fmt: skip
        # what the run used (the floor it applied, its pacing, member cap, model group, ...):
        # policies that differ only there differ in their params too
        for k, v in result.settings.items():
            params[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else "none" if v is None else v
        final = comparison.per_run(result)
        curve = result.curve
        series: list[tuple[str, float, int]] = []
        oracle = {r.policy: r for r in comparison.runs if r.seed == result.seed}.get(comparison.reference_oracle)
        for i, step in enumerate(curve.get("step", [])):
            for key in ("expected_reward", "redemptions", "net_value", "spend", "committed", "budget_used"):
                if key in curve:
                    series.append((f"curve.{key}", curve[key][i], step))
            if oracle is not None and i < len(oracle.curve.get("expected_reward", [])):
                series.append(("curve.regret", oracle.curve["expected_reward"][i] - curve["expected_reward"][i], step))
        series += [(k, v, result.decisions) for k, v in final.items()]
        self._log(rid, params=params, metrics=series)
        out = Path(self._tmp.name) / rid
        out.mkdir()
        for name, fig in plots(result, oracle).items():
            fig.savefig(out / f"{name}.png", dpi=80)
        for name, data in result.artifacts.items():  # compare(artifacts=True): log sample, snapshots
            (out / name).write_bytes(data)
        self._client.log_artifacts(rid, str(out))
        self._client.set_terminated(rid, "FINISHED")
        return rid

    def finish(self, comparison: Comparison) -> None:
        """Summary metrics and the comparison table and plot on the parent run."""
        assert self.parent_id is not None and self._tmp is not None
        metrics = []
        for row in comparison.summary():
            for k, v in row.items():
                if isinstance(v, float) and not k.endswith("_ci"):
                    metrics.append((f"{row['policy']}.{k}", v, 0))
        self._log(self.parent_id, metrics=metrics)
        out = Path(self._tmp.name) / "parent"
        out.mkdir(exist_ok=True)
        (out / "summary.md").write_text(comparison.table() + "\n")
        fig = comparison_plot(comparison)
        fig.savefig(out / "comparison.png", dpi=80)
        self._client.log_artifacts(self.parent_id, str(out))


# plots -----------------------------------------------------------------------------------------
def _figure(**kw: Any) -> Any:
    """A figure of its own, outside pyplot's list of open figures: nothing to close, no backend
    to choose (it renders with Agg), and a notebook shows only the figures a cell returns (plots
    made through pyplot stayed open, and the inline backend showed every one at the cell's end)."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def plots(result: RunResult, oracle: RunResult | None = None) -> dict[str, Any]:
    """Figures of one run: cumulative reward and regret, spend vs pace, offer mix by segment."""
    c = result.curve
    figs: dict[str, Any] = {}
    fig = _figure(figsize=(9, 3.2))
    ax = fig.subplots(1, 2)
    ax[0].plot(c["step"], c["expected_reward"], label=result.policy)
    if oracle is not None:
        ax[0].plot(oracle.curve["step"], oracle.curve["expected_reward"], "--", label=oracle.policy)
        n = min(len(c["step"]), len(oracle.curve["step"]))
        ax[1].plot(c["step"][:n], [o - p for o, p in zip(oracle.curve["expected_reward"][:n], c["expected_reward"][:n], strict=True)])
    ax[0].set(title="cumulative expected reward", xlabel="decisions")
    ax[0].legend()
    ax[1].set(title="regret vs oracle", xlabel="decisions")
    fig.tight_layout()
    figs["reward_regret"] = fig
    fig = _figure(figsize=(4.5, 3.2))
    ax1 = fig.subplots()
    if "budget_used" in c:
        ax1.plot(c["time_fraction"], c["budget_used"], label="budget used")
        ax1.plot([0, 1], [0, 1], ":", label="pace")
        ax1.set(title="spend vs pace", xlabel="campaign time", ylabel="fraction of budget")
    else:
        ax1.plot(c["time_fraction"], c["spend"], label="spend")
        ax1.set(title="spend", xlabel="campaign time", ylabel="currency")
    ax1.legend()
    fig.tight_layout()
    figs["spend_pace"] = fig
    fig = _figure(figsize=(6, 3.2))
    ax2 = fig.subplots()
    segs = sorted(result.offer_mix)
    offers = sorted({o for m in result.offer_mix.values() for o in m})
    bottom = [0.0] * len(segs)
    for o in offers:
        vals = []
        for s in segs:
            tot = sum(result.offer_mix[s].values()) or 1
            vals.append(result.offer_mix[s].get(o, 0) / tot)
        ax2.bar(segs, vals, bottom=bottom, label=o)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax2.set(title="offer mix by tier", ylabel="share")
    ax2.legend(fontsize=6, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    figs["offer_mix"] = fig
    return figs


def comparison_plot(comparison: Comparison) -> Any:
    """Cumulative expected reward of every policy (first seed)."""
    fig = _figure(figsize=(6, 3.5))
    ax = fig.subplots()
    seed = comparison.runs[0].seed if comparison.runs else 0
    for r in comparison.runs:
        if r.seed == seed:
            ax.plot(r.curve["step"], r.curve["expected_reward"], label=r.policy)
    ax.set(title=f"{comparison.scenario.name}: cumulative expected reward (seed {seed})", xlabel="decisions")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


@contextmanager
def tracking(uri: str | None, scenario: Scenario, params: dict[str, Any], *, root: str | Path = ".") -> Iterator[Tracker]:
    t = Tracker(uri, root=root)
    try:
        t.start(scenario, params)
        yield t
    except BaseException:
        t.close(failed=True)
        raise
    else:
        t.close()


__all__ = ["ENV_URI", "EXPERIMENT", "Tracker", "comparison_plot", "default_uri", "plots", "resolve_uri", "tracking"]
