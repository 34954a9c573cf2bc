"""MLflow tracking: an isolated store per test, one parent and nested children, step metrics,
artifacts; ``import mlflow`` stays off the serving path."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from bandit_engine.cli import main, run
from bandit_engine.tracking import ENV_URI, artifact_root, default_uri, resolve_uri

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An MLflow store in a temp dir; fails the test if it leaks an active run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv(ENV_URI, uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    yield uri
    import mlflow

    active = mlflow.active_run()
    if active is not None:
        mlflow.end_run()
        pytest.fail(f"test leaked an active MLflow run {active.info.run_id}")


def test_uri_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_URI, raising=False)
    assert resolve_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    monkeypatch.setenv(ENV_URI, "http://example:5000")
    assert resolve_uri(None, tmp_path) == "http://example:5000"
    assert resolve_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"
    assert default_uri(tmp_path).endswith("/mlruns/mlflow.db")


def test_mlflow_is_not_imported_on_the_serving_path() -> None:
    code = (
        "import sys; import bandit_engine, bandit_engine.cli, bandit_engine.engine, "
        "bandit_engine.simulation, bandit_engine.simulation.commands, bandit_engine.evaluation, "
        "bandit_engine.tracking; assert 'mlflow' not in sys.modules, 'mlflow imported'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_simulate_logs_a_parent_and_nested_children(store: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/tight_budget.toml"), "--policies", "thompson_segmented",
        "--seeds", "5", "--decisions", "300", "--no-progress", "--tracking-uri", store,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("bandit_engine-simulations")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["policy"] for c in children} == {"random", "oracle", "budget_oracle", "truth_paced",
                                                        "thompson_segmented"}  # fmt: skip
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    child = next(c for c in children if c.data.tags["policy"] == "thompson_segmented")
    assert child.data.params["seed"] == "5" and child.data.params["family"] == "thompson"
    assert child.data.params["engine_version"]
    assert child.data.metrics["overspend"] == 0.0
    assert "normalized_lift" in child.data.metrics and "regret_budget_oracle" in child.data.metrics
    history = client.get_metric_history(child.info.run_id, "curve.expected_reward")
    assert len(history) >= 40 and history[-1].step == 300
    assert [h.step for h in history] == sorted(h.step for h in history)
    assert len(client.get_metric_history(child.info.run_id, "curve.regret")) >= 40
    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"reward_regret.png", "spend_pace.png", "offer_mix.png", "decisions_sample.dsjson"} <= names
    assert any(n.startswith("policy_") and n.endswith(".snapshot") for n in names)
    pnames = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"tight_budget.toml", "summary.md", "comparison.png"} <= pnames
    png = client.download_artifacts(child.info.run_id, "reward_regret.png", str(tmp_path))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = Path(client.download_artifacts(child.info.run_id, "decisions_sample.dsjson", str(tmp_path)))
    assert 0 < len(sample.read_text().splitlines()) <= 200
    assert "thompson_segmented.normalized_lift" in parent.data.metrics


def test_simulate_with_jobs_logs_every_seeds_runs_and_their_artifacts(store: str) -> None:
    """``--jobs 2``: seeds run in worker processes; the engines stay there, and what MLflow keeps
    of them (the dsjson sample, the policy snapshot) comes back with each run."""
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/tight_budget.toml"), "--policies", "thompson_segmented",
        "--seeds", "5,6", "--decisions", "200", "--no-progress", "--tracking-uri", store, "--jobs", "2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    exp = client.get_experiment_by_name("bandit_engine-simulations")
    children = [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 10  # 5 runs (4 references + the policy) x 2 seeds
    for c in children:  # each seed's runs are logged once its references are in, also from workers
        assert {"normalized_lift", "vs_oracle", "regret_budget_oracle"} <= set(c.data.metrics), c.data.tags
    assert {(c.data.tags["policy"], c.data.tags["seed"]) for c in children if c.data.tags["policy"] == "thompson_segmented"} == {
        ("thompson_segmented", "5"), ("thompson_segmented", "6")}  # fmt: skip
    for c in children:
        if c.data.tags["policy"] == "thompson_segmented":
            names = {a.path for a in client.list_artifacts(c.info.run_id)}
            assert "decisions_sample.dsjson" in names and any(n.endswith(".snapshot") for n in names)


def test_default_store_lives_under_mlruns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_URI, raising=False)
    from bandit_engine.simulation import Scenario, Simulator
    from bandit_engine.tracking import Tracker

    scenario = Scenario.default().select_policies(["random"])
    comparison = Simulator(scenario, decisions=100).compare([1])
    with Tracker(root=tmp_path) as t:
        t.start(scenario, {"scenario": scenario.name})
        for r in comparison.runs:
            t.log_run(r, comparison, scenario)
        t.finish(comparison)
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
    assert any(p.suffix == ".png" for p in (tmp_path / "mlruns").rglob("*.png"))
    import mlflow

    assert mlflow.active_run() is None


def _children(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bandit_engine-simulations")
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def test_every_child_run_gets_its_relative_metrics_even_when_its_references_finish_after_it(store: str) -> None:
    """``random`` as a scenario policy runs after ``thompson`` (and the oracle before it): a run
    logged as soon as it finished had no normalized lift (no random yet), and the oracle and
    random had neither lift nor regret. Every child now has them, and the regret curve."""
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/default.toml"), "--policies", "thompson,random",
        "--seeds", "2", "--decisions", "200", "--no-progress", "--tracking-uri", store,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    from mlflow.tracking import MlflowClient

    children = _children(store)
    assert sorted(c.data.tags["policy"] for c in children) == ["oracle", "random", "thompson"]
    for c in children:
        m = c.data.metrics
        assert {"normalized_lift", "vs_oracle", "regret_oracle"} <= set(m), c.data.tags["policy"]
        assert len(MlflowClient(store).get_metric_history(c.info.run_id, "curve.regret")) >= 40
    by = {c.data.tags["policy"]: c.data.metrics for c in children}
    assert by["oracle"]["normalized_lift"] == 1.0 and by["random"]["normalized_lift"] == 0.0
    assert 0.0 < by["thompson"]["regret_oracle"] == by["oracle"]["expected_reward"] - by["thompson"]["expected_reward"]


def test_child_params_tell_apart_what_the_runs_used(store: str) -> None:
    """Policies differing only in pacing show it; the oracles log the floor they ran at and no
    per-process world key, so the same command twice logs the same params."""
    args = ["simulate", str(ROOT / "simulations/tight_budget.toml"), "--policies",
            "thompson_segmented,thompson_hard_stop,lin_ts", "--seeds", "3", "--decisions", "100",
            "--no-progress", "--tracking-uri", store]  # fmt: skip
    for _ in range(2):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    children = _children(store)
    assert len(children) == 2 * 7
    params: dict[str, list[dict[str, str]]] = {}
    for c in children:
        params.setdefault(c.data.tags["policy"], []).append(c.data.params)
    assert all(a == b for a, b in params.values())  # deterministic: the second command logged the same
    paced, hard = params["thompson_segmented"][0], params["thompson_hard_stop"][0]
    assert paced["policy_params"] == hard["policy_params"] and paced["family"] == hard["family"]
    assert (paced["pacing"], hard["pacing"]) == ("paced", "hard stop")
    assert params["lin_ts"][0]["model_group"] == "all" and paced["model_group"] == "none"
    assert paced["member_cap"] == "none" and paced["exploration_floor"] == "0.005"
    assert paced["provisional_reward"] == "0.0"
    for ref in ("oracle", "budget_oracle", "truth_paced"):
        assert params[ref][0]["exploration_floor"] == "1e-06", ref
        assert "world" not in params[ref][0]["policy_params"], ref
    assert params["oracle"][0]["pacing"] == "no budgets" and params["random"][0]["exploration_floor"] == "0.005"


def test_a_sqlite_store_elsewhere_keeps_its_artifacts_beside_its_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not under ``./mlruns`` of the directory the command ran in."""
    monkeypatch.delenv(ENV_URI, raising=False)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert artifact_root(uri) == tmp_path / "store" and artifact_root("http://mlflow:5000") is None
    (tmp_path / "store").mkdir()
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/default.toml"), "--policies", "segment_rules", "--seeds", "1",
        "--decisions", "100", "--no-progress", "--tracking-uri", uri,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not list(cwd.iterdir()), list(cwd.rglob("*"))
    pngs = list((tmp_path / "store").rglob("reward_regret.png"))
    assert len(pngs) == 3  # random, oracle, segment_rules
    assert list((tmp_path / "store").rglob("summary.md"))


@pytest.mark.parametrize(("uri", "message"), [
    ("/tmp/notauri", "is not a tracking URI; give sqlite:///path/to/mlflow.db or http://host:port"),
    ("foo://bar", "cannot be used: "),
    ("http://127.0.0.1:9", "cannot be used: "),  # nothing listens on the discard port: refused at once
    # it took the runs and lost them at exit (the artifacts landed in ./mlruns)
    ("sqlite://", "is an in-memory database, lost when the command ends"),
    # a SQLite file that is not a database read as the ledger's error ("database error: ..."),
    # and one that cannot be opened had MLflow retry for 1 min 45 s first
    ("sqlite:///notdb.db", "cannot be used: notdb.db: file is not a database"),
    ("sqlite:///afile/mlflow.db", "cannot be used: afile/mlflow.db: "),
])  # fmt: skip
def test_a_tracking_uri_mlflow_cannot_use_is_one_line_and_exit_2(
    uri: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notdb.db").write_text("not a database\n")
    (tmp_path / "afile").write_text("a file, where the store's directory would be\n")
    monkeypatch.setattr(sys, "argv", ["bandit-engine", "simulate", str(ROOT / "simulations/default.toml"),
                                      "--policies", "segment_rules", "--seeds", "1", "--decisions", "50",
                                      "--no-progress", "--tracking-uri", uri])  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith(f"error: MLflow tracking URI {uri!r} ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import os

    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the bounded first request leaves no trace


def _parents(uri: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bandit_engine-simulations")
    return [r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]


def _run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``bandit-engine ARGS`` through the console script (one line and exit 2 for its errors)."""
    monkeypatch.setattr(sys, "argv", ["bandit-engine", *args])
    with pytest.raises(SystemExit) as exit_:
        run()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


@pytest.mark.parametrize("failing", ["finish", "log_run"])
def test_a_tracking_failure_after_the_runs_started_keeps_the_table_and_json(
    failing: str, store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """MLflow refusing a metric key crashed the command once every run had finished, and the
    summary was lost. The simulation now completes without tracking; the table and --json-out
    are written, then the failure is one line (exit 2) and the parent run is FAILED."""
    from mlflow.exceptions import MlflowException

    from bandit_engine.tracking import Tracker

    def boom(*_args: object, **_kw: object) -> None:
        raise MlflowException("Invalid metric name: 'x'.\nmore detail")

    monkeypatch.setattr(Tracker, failing, boom)
    out_json = tmp_path / "summary.json"
    code, out, err = _run_cli(monkeypatch, capsys, "simulate", str(ROOT / "simulations/default.toml"),
                              "--policies", "segment_rules", "--seeds", "1", "--decisions", "100",
                              "--no-progress", "--tracking-uri", store, "--json-out", str(out_json))  # fmt: skip
    assert code == 2, err
    assert "| segment_rules |" in out and "| oracle |" in out
    assert {r["policy"] for r in __import__("json").loads(out_json.read_text())} == {"random", "oracle", "segment_rules"}
    last = err.strip().splitlines()[-1]  # after MLflow's own INFO lines (creating the store)
    assert "Traceback" not in err and last.startswith("error: MLflow logging failed (MlflowException: "
                                                      "Invalid metric name: 'x'.); the summary above is "
                                                      "complete, its MLflow parent run "), err  # fmt: skip
    (parent,) = _parents(store)
    assert parent.info.status == "FAILED" and last.endswith(f"parent run {parent.info.run_id} is FAILED")


def test_a_scenario_name_with_a_slash_is_logged_and_a_failed_start_ends_its_run(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The scenario file was logged as ``<name>.toml``: "promo/q3" was a path into a directory
    that did not exist, and the parent run, already created, was left RUNNING."""
    path = tmp_path / "promo.toml"
    path.write_text((ROOT / "simulations/default.toml").read_text().replace('name = "default"', 'name = "promo/q3"', 1))
    args = ["simulate", str(path), "--policies", "segment_rules", "--seeds", "1", "--decisions", "50",
            "--no-progress", "--tracking-uri", store]  # fmt: skip
    code, out, err = _run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    from mlflow.tracking import MlflowClient

    (parent,) = _parents(store)
    assert parent.info.status == "FINISHED" and parent.data.tags["scenario"] == "promo/q3"
    assert "promo_q3.toml" in {a.path for a in MlflowClient(store).list_artifacts(parent.info.run_id)}

    def refuse(*_args: object, **_kw: object) -> None:
        raise OSError(28, "No space left on device", "promo_q3.toml")

    monkeypatch.setattr(MlflowClient, "log_artifact", refuse)
    code, out, err = _run_cli(monkeypatch, capsys, *args)
    assert (code, err.strip().splitlines()[-1]) == (2, "error: No space left on device: promo_q3.toml")
    assert "Traceback" not in err
    assert sorted(p.info.status for p in _parents(store)) == ["FAILED", "FINISHED"]  # none left RUNNING
