"""``bandit-engine simulate`` and ``bandit-engine evaluate`` (registered by :mod:`bandit_engine.cli`)."""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import click

from ..errors import BanditEngineError
from .scenario import MAX_DECISIONS


def _ints(value: str | None) -> list[int] | None:
    """Comma-separated seeds (integers >= 0, what the worlds' generators take); a seed given
    twice runs once. An empty item is a mistake (``1,,2``, ``,``), not a seed to skip: ``,``
    ran the scenario's own seeds."""
    if value is None:
        return None
    try:
        seeds = [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {value!r}", param_hint="'--seeds'"
        ) from None
    if any(s < 0 for s in seeds):
        raise click.BadParameter(
            f"seeds must be integers >= 0, got {value!r}", param_hint="'--seeds'"
        )
    return list(dict.fromkeys(seeds))


def _check_writable(path: Path | None) -> None:
    """Fail before the simulation, not after it, when its output cannot be written: by opening
    it for appending (and removing it again if that created it). Permission bits alone do not
    tell (root passes every check, and /proc refuses root too)."""
    if path is None:
        return
    parent = path.resolve().parent
    if not parent.is_dir():
        raise click.BadParameter(f"directory {str(parent)!r} does not exist", param_hint="'--json-out'")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise click.BadParameter(f"{str(path)!r} cannot be written: {exc.strerror or exc}",
                                 param_hint="'--json-out'") from None  # fmt: skip
    if not existed:
        path.unlink()


@click.command()
@click.argument("scenario_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--policies", default=None, help="Comma-separated policy names of the scenario (default: all).")
@click.option("--seeds", default=None, help="Comma-separated seeds (default: the scenario's).")
@click.option("--decisions", type=click.IntRange(min=1, max=MAX_DECISIONS), default=None,
              help="Decisions per run (default: the scenario's).")
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

    _check_writable(json_out)
    scenario = Scenario.load(scenario_file)
    if policies:
        scenario = scenario.select_policies([p.strip() for p in policies.split(",") if p.strip()])
    seed_list = _ints(seeds) or list(scenario.seeds)  # None: the scenario's
    sim = Simulator(scenario, decisions=decisions)
    total = sim.total_runs(len(seed_list), ceiling=ceiling) * sim.decisions
    bar = tqdm(total=total, unit="dec", disable=not progress, desc=scenario.name)
    tracker = None
    # the first MLflow failure once the runs have started: the simulation goes on without
    # tracking, its table and --json-out are still written, then the failure is reported
    tracking_failed: list[str] = []

    def track(log: Callable[[], object]) -> None:
        if tracker is None or tracking_failed:
            return
        try:
            log()
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            tracking_failed.append(f"{type(exc).__name__}: {first[:400]}")
            with contextlib.suppress(Exception):  # the store that just failed may fail this too
                tracker.close(failed=True)

    try:
        if not no_tracking:
            from ..tracking import Tracker

            tracker = Tracker(tracking_uri)
            tracker.start(scenario, {
                "scenario": scenario.name, "scenario_file": str(scenario_file),
                "seeds": ",".join(map(str, seed_list)), "decisions": sim.decisions,
                "policies": ",".join(p.name for p in scenario.policies),
            })  # fmt: skip
        from .runner import Comparison, RunResult

        # A run's relative metrics (normalized lift, vs oracle, regret and its curve) need its
        # seed's random baseline and reference oracle, which may finish after it (a scenario
        # policy named random runs last): a seed's runs are logged once all of them are in.
        # compare() hands them over seed by seed, also with --jobs.
        per_seed = sim.total_runs(1, ceiling=ceiling)
        waiting: dict[int, list[RunResult]] = defaultdict(list)

        def log_seed(runs: list[RunResult]) -> None:
            assert tracker is not None
            seed_comparison = Comparison(scenario, runs)
            for r in runs:
                track(lambda r=r: tracker.log_run(r, seed_comparison, scenario))
                r.artifacts = {}  # free them once logged

        def on_run(r: RunResult) -> None:
            if tracker is not None:
                waiting[r.seed].append(r)
                if len(waiting[r.seed]) == per_seed:
                    log_seed(waiting.pop(r.seed))

        comparison = sim.compare(seed_list, progress=bar.update, artifacts=tracker is not None, on_run=on_run,
                                 ceiling=ceiling, jobs=jobs)  # fmt: skip
        bar.close()
    except BaseException:
        if tracker is not None:
            tracker.close(failed=True)
        raise
    if tracker is not None:
        for runs in waiting.values():  # none, unless a seed ran other than total_runs says
            log_seed(runs)
        track(lambda: tracker.finish(comparison))
        if not tracking_failed:
            tracker.close()
    click.echo(f"\n{scenario.name}: {sim.decisions:,} decisions x seeds {seed_list}\n")
    click.echo(comparison.table())
    if json_out is not None:
        json_out.write_text(json.dumps(comparison.summary(), indent=2, default=float))
    if tracking_failed:
        raise BanditEngineError(f"MLflow logging failed ({tracking_failed[0]}); the summary "
                                f"above is complete, its MLflow parent run {tracker.parent_id} "
                                f"is FAILED")  # fmt: skip
    if tracker is not None:
        click.echo(f"\nMLflow: parent run {tracker.parent_id} at {tracker.uri}")


@click.command()
@click.option("--channel", default=None, help="Evaluate the logs of this channel (ledger mode).")
@click.option("--policy", "policy", required=True, help='Candidate policy: a family name or JSON {"family": ..., "params": {...}}.')
@click.option("--dsjson", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="Read logs from a dsjson file instead of the ledger.")
@click.option("--archive", "archives", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Also read the decisions `bandit-engine prune` archived to this file (before the ledger's; repeatable).")
@click.option("--train-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.5, show_default=True,
              help="Leading share of the logs the candidate learns from; it is evaluated on the rest.")
@click.option("--floor", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.02, show_default=True,
              help="Exploration floor of the candidate.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.pass_context
def evaluate(ctx: click.Context, channel: str | None, policy: str, dsjson: Path | None,
             archives: tuple[Path, ...], train_fraction: float, floor: float, seed: int) -> None:  # fmt: skip
    """Off-policy evaluation (IPS, SNIPS, DM, DR) of a candidate policy against logged decisions."""
    from ..catalog import PolicySpec
    from ..evaluation import candidate_notes, from_dsjson, from_engine, policy_target
    from ..evaluation import evaluate as run_eval

    try:
        spec_d = json.loads(policy) if policy.strip().startswith("{") else {"family": policy}
        spec = PolicySpec(**spec_d)
    except (ValueError, TypeError) as exc:
        raise click.BadParameter(f"--policy: {exc}") from None
    if dsjson is not None and archives:
        raise click.UsageError("--dsjson and --archive are two different sources; give one")
    if dsjson is not None and channel is not None:  # it was ignored: every line was evaluated
        raise click.UsageError("--channel selects the ledger's decisions; a dsjson file is "
                               "evaluated whole (export one channel with export-dsjson --channel)")
    if dsjson is not None:
        data = from_dsjson(dsjson)
        if data.unlabeled:  # not an error: a log may hold decisions whose outcome is still to come
            click.echo(f"note: skipped {data.unlabeled:,} unlabeled lines (no '_label_cost', no "
                       f"outcome yet) of {dsjson}: if they are mostly misses to come, the "
                       f"estimates read high", err=True)  # fmt: skip
    else:
        from ..evaluation import open_existing

        engine = open_existing(ctx.obj["database_url"])
        try:
            data = from_engine(engine, channel, archives=archives)
        finally:
            engine.ledger.close()
    if len(data) < 2:  # the one-line "error: ..." and exit 2 of every other refusal
        raise BanditEngineError(
            f"only {len(data)} settled decisions to evaluate; at least 2 are needed"
        )
    train, test = data.split(train_fraction)
    if len(test) < 2:  # one row: no interval, and DM's model half of the folds fitted on nothing
        raise BanditEngineError(
            f"only {len(test)} of the {len(data):,} settled decisions are left to evaluate once "
            f"the candidate learns from the first {train_fraction:g} of them; at least 2 are "
            "needed (lower --train-fraction)"
        )
    target = policy_target(spec, train, seed=seed, floor=floor)
    for note in candidate_notes(spec, test):
        click.echo(f"note: {note}", err=True)
    report = run_eval(test, target, seed=seed)
    click.echo(f"candidate {spec.family} {dict(spec.params)} on {report.n:,} decisions "
               f"(learned from {len(train):,})\n")  # fmt: skip
    click.echo(report.table())


COMMANDS = [simulate, evaluate]
