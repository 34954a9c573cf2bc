"""``bandit-engine simulate`` and ``bandit-engine evaluate`` (registered by :mod:`bandit_engine.cli`)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _ints(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


@click.command()
@click.argument("scenario_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policies", default=None, help="Comma-separated policy names of the scenario (default: all).")
@click.option("--seeds", default=None, help="Comma-separated seeds (default: the scenario's).")
@click.option("--decisions", type=int, default=None, help="Decisions per run (default: the scenario's).")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: $BANDIT_ENGINE_MLFLOW_URI or sqlite:///mlruns/mlflow.db).")
@click.option("--no-tracking", is_flag=True, help="Do not log to MLflow.")
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write the summary rows as JSON.")
@click.option("--ceiling", is_flag=True, help="Also run the Bayes oracle: the best a policy seeing only the context could do.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run seeds in this many processes, a whole seed each (same results as 1).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def simulate(scenario_file: Path, policies: str | None, seeds: str | None, decisions: int | None,
             tracking_uri: str | None, no_tracking: bool, json_out: Path | None, ceiling: bool,
             jobs: int, progress: bool) -> None:  # fmt: skip
    """Compare policies on a simulated scenario through the engine; print a summary table."""
    from tqdm import tqdm

    from .runner import Simulator
    from .scenario import Scenario

    scenario = Scenario.load(scenario_file)
    if policies:
        scenario = scenario.select_policies([p.strip() for p in policies.split(",") if p.strip()])
    seed_list = _ints(seeds) or list(scenario.seeds)
    sim = Simulator(scenario, decisions=decisions)
    total = sim.total_runs(len(seed_list), ceiling=ceiling) * sim.decisions
    bar = tqdm(total=total, unit="dec", disable=not progress, desc=scenario.name)
    tracker = None
    if not no_tracking:
        from ..tracking import Tracker

        tracker = Tracker(tracking_uri)
        tracker.start(scenario, {
            "scenario": scenario.name, "scenario_file": str(scenario_file), "seeds": ",".join(map(str, seed_list)),
            "decisions": sim.decisions, "policies": ",".join(p.name for p in scenario.policies),
        })  # fmt: skip
    try:
        box: dict[str, object] = {}

        def on_run(r: object) -> None:
            if tracker is not None:
                from .runner import Comparison, RunResult

                assert isinstance(r, RunResult)
                partial = box.setdefault("runs", [])
                assert isinstance(partial, list)
                partial.append(r)
                tracker.log_run(r, Comparison(scenario, list(partial)), scenario)
                r.artifacts = {}  # free them once logged

        comparison = sim.compare(seed_list, progress=bar.update, artifacts=tracker is not None, on_run=on_run,
                                 ceiling=ceiling, jobs=jobs)  # fmt: skip
        bar.close()
        if tracker is not None:
            tracker.finish(comparison)
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        tracker.close()
    click.echo(f"\n{scenario.name}: {sim.decisions:,} decisions x seeds {seed_list}\n")
    click.echo(comparison.table())
    if tracker is not None:
        click.echo(f"\nMLflow: parent run {tracker.parent_id} at {tracker.uri}")
    if json_out is not None:
        json_out.write_text(json.dumps(comparison.summary(), indent=2, default=float))


@click.command()
@click.option("--channel", default=None, help="Evaluate the logs of this channel (ledger mode).")
@click.option("--policy", "policy", required=True, help='Candidate policy: a family name or JSON {"family": ..., "params": {...}}.')
@click.option("--dsjson", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Read logs from a dsjson file instead of the ledger.")
@click.option("--archive", "archives", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Also read the decisions `bandit-engine prune` archived to this file (before the ledger's; repeatable).")
@click.option("--train-fraction", type=float, default=0.5, show_default=True, help="Leading share of the logs the candidate learns from; it is evaluated on the rest.")
@click.option("--floor", type=float, default=0.02, show_default=True, help="Exploration floor of the candidate.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.pass_context
def evaluate(ctx: click.Context, channel: str | None, policy: str, dsjson: Path | None,
             archives: tuple[Path, ...], train_fraction: float, floor: float, seed: int) -> None:  # fmt: skip
    """Off-policy evaluation (IPS, SNIPS, DM, DR) of a candidate policy against logged decisions."""
    from ..catalog import PolicySpec
    from ..evaluation import evaluate as run_eval
    from ..evaluation import from_dsjson, from_engine, policy_target

    try:
        spec_d = json.loads(policy) if policy.strip().startswith("{") else {"family": policy}
        spec = PolicySpec(**spec_d)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(f"--policy: {exc}") from None
    if not 0.0 <= train_fraction < 1.0:
        raise click.BadParameter("--train-fraction must be in [0, 1)")
    if dsjson is not None and archives:
        raise click.UsageError("--dsjson and --archive are two different sources; give one")
    if dsjson is not None:
        data = from_dsjson(dsjson)
    else:
        from ..engine import Engine

        engine = Engine.open(ctx.obj["database_url"])
        try:
            data = from_engine(engine, channel, archives=archives)
        finally:
            engine.ledger.close()
    if len(data) < 2:
        raise click.ClickException(f"only {len(data)} settled decisions to evaluate")
    train, test = data.split(train_fraction)
    report = run_eval(test, policy_target(spec, train, seed=seed, floor=floor), seed=seed)
    click.echo(f"candidate {spec.family} {dict(spec.params)} on {report.n:,} decisions "
               f"(learned from {len(train):,})\n")  # fmt: skip
    click.echo(report.table())


COMMANDS = [simulate, evaluate]
