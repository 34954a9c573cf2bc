"""The simulator: scenarios, the ground-truth world, the runner through the engine, oracles."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bandit_engine.catalog import PolicySpec
from bandit_engine.cli import main, run
from bandit_engine.errors import InvalidArgument
from bandit_engine.simulation import Scenario, Simulator, World, solve_budget_duals
from bandit_engine.simulation.world import Exposure

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((ROOT / "simulations").glob("*.toml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_every_scenario_file_loads(path: Path) -> None:
    s = Scenario.load(path)
    assert s.name == path.stem
    assert s.source is not None and "[[offers]]" in s.source
    assert len(s.offers) >= 6 and len(s.policies) >= 3


def test_required_scenarios_exist() -> None:
    assert {p.stem for p in SCENARIOS} >= {"default", "tight_budget", "fatigue", "cold_start"}
    assert Scenario.load(ROOT / "simulations/tight_budget.toml").budgeted
    cold = Scenario.load(ROOT / "simulations/cold_start.toml")
    assert any(o.starts_day for o in cold.offers)


BAD_SCENARIOS = [
    ({"bogus": 1}, r"unknown scenario fields: \['bogus'\]"),
    ({"offers": [{"id": "x", "kind": "coupon"}]}, r"kind must be one of"),
    ({"offers": [{"id": "x", "kind": "points", "channels": ["fax"]}]}, r"channels \['fax'\] not in the scenario"),
    ({"offers": [{"id": "x", "kind": "points", "depth": 1.5}]}, r"depth must be in \[0, 1\)"),
    ({"policies": [{"name": "p"}]}, r"exactly one of family or baseline"),
    ({"policies": [{"name": "p", "baseline": "magic"}]}, r"baseline must be one of"),
    ({"decisions": 0}, r"decisions must be an integer in \[1, 10_000_000\], got 0"),
    ({"world": {"fatigue": -1}}, r"world.fatigue must be >= 0"),
    ({"aggregation": "max"}, r"aggregation must be 'first' or 'sum'"),
    # wrong types: one clear error each, not a crash (some of them mid-simulation)
    ({"members": "4000"}, r"members must be an integer in \[1, 1_000_000\], got '4000'"),
    ({"days": "28"}, r"days must be a number > 0 and <= 3660, got '28'"),
    ({"decisions": 2.5}, r"decisions must be an integer in \[1, "),
    ({"seeds": 3}, r"seeds must be a list, got 3"),
    ({"seeds": [1, "2"]}, r"seeds must be a list of integers >= 0"),
    ({"seeds": [1, 1]}, r"duplicate seeds in \[1, 1\]"),
    ({"channels": "email"}, r"channels must be a list, got 'email'"),
    ({"channels": ["email", "email"]}, r"duplicate channels"),
    ({"offers": [{"id": "x", "kind": "points", "cost": "2.0"}]}, r"offer 'x': cost must be a number, got '2.0'"),
    ({"offers": [{"id": "x", "kind": "points", "margin": True}]}, r"offer 'x': margin must be a number"),
    ({"offers": [{"id": "x", "kind": "points", "channels": "email"}]}, r"offer 'x': channels must be a list"),
    ({"offers": [{"kind": "points"}]}, r"offers\[1\] needs an id"),
    ({"offers": ["x"]}, r"offers\[1\] must be a table"),
    ({"offers": [{"id": "x", "kind": "points", "budget": -5}]}, r"offer 'x': budget must be a finite amount >= 0"),
    ({"world": {"fatigue": "0.3"}}, r"world.fatigue must be >= 0, got '0.3'"),
    ({"world": 3}, r"world must be a table"),
    ({"exploration_floor": "x"}, r"exploration_floor must be a finite number"),
    ({"reward_window_days": -1}, r"reward_window_days must be in"),
    ({"member_cap": {"max": 0, "window_days": 7}}, r"MemberCap.max must be"),
    ({"policies": [{"name": "p", "family": "thompson", "pacing": "no"}]}, r"policy 'p': pacing must be true or false"),
    ({"policies": [{"name": "p", "family": "thompson", "params": [1]}]}, r"policy 'p': PolicySpec.params must be a mapping"),
    # a scenario policy named like a reference would merge into the reference's row
    ({"policies": [{"name": "oracle", "family": "thompson"}]}, r"policy 'oracle': the name is reserved"),
    ({"policies": [{"name": "budget_oracle", "family": "thompson"}]}, r"the name is reserved"),
    ({"policies": [{"name": "truth_paced", "baseline": "segment_rules"}]}, r"the name is reserved"),
    ({"policies": [{"name": "bayes_oracle", "family": "uniform"}]}, r"the name is reserved"),
    ({"policies": [{"name": "random", "family": "thompson"}]}, r"'random' is the uniform baseline"),
    ({"policies": [{"name": "random", "baseline": "segment_rules"}]}, r"'random' is the uniform baseline"),
    ({"policies": [{"name": "t", "family": "thompson"}, {"name": "t", "family": "lin_ts"}]}, r"duplicate policy names \['t'\]"),
    # a name MLflow refuses as a metric key crashed the command after every run had finished
    ({"policies": [{"name": "blast (ok)", "family": "uniform"}]}, r"policy 'blast \(ok\)': a policy name is up to 200 letters"),
    ({"policies": [{"name": "a:b", "family": "uniform"}]}, r"policy 'a:b': a policy name is"),
    ({"policies": [{"name": "/t", "family": "uniform"}]}, r"not path-like"),
    ({"policies": [{"name": "a//t", "family": "uniform"}]}, r"not path-like"),
    ({"policies": [{"name": "x" * 201, "family": "uniform"}]}, r"a policy name is up to 200"),
    # an offer id the catalog does not have ran uniform random
    ({"policies": [{"name": "b", "baseline": "batch_and_blast", "offer": "home10"}]},
     r"policy 'b': unknown offers \['home10'\]; the scenario has \['a'\]"),
    ({"policies": [{"name": "f", "family": "fixed", "params": {"offers": ["a", "zz"]}}]}, r"policy 'f': unknown offers \['zz'\]"),
    ({"policies": [{"name": "t", "family": "thompson", "offer": "a"}]}, r"policy 't': offer is the one offer of a batch_and_blast"),
    # a family or parameter error was found only after the reference runs
    ({"policies": [{"name": "t", "family": "nope"}]}, r"policy 't': unknown policy family 'nope'; known: \["),
    ({"policies": [{"name": "t", "family": "thompson", "params": {"prior_alpha": -1}}]}, r"policy 't': thompson: prior_alpha must be"),
    ({"policies": [{"name": "t", "family": "lin_ts", "params": {"bogus": 1}}]},
     r"policy 't': bad parameters for policy 'lin_ts': unknown parameters \['bogus'\]"),
    ({"policies": [{"name": "t", "family": "fixed"}]}, r"policy 't': fixed: offers must be a non-empty list"),
]


@pytest.mark.parametrize(("change", "message"), BAD_SCENARIOS)
def test_bad_scenarios_are_rejected_with_a_clear_message(change: dict, message: str) -> None:
    base = {
        "name": "t",
        "offers": [{"id": "a", "kind": "points"}],
        "policies": [{"name": "random", "family": "uniform"}],
    }
    with pytest.raises(InvalidArgument, match=message):
        Scenario.from_dict({**base, **change})


def test_simulator_families_and_baselines_validate_and_stay_out_of_the_product_registry() -> None:
    from bandit_engine.policies.registry import families

    s = Scenario.from_dict({"name": "t", "offers": [{"id": "a", "kind": "points"}], "policies": [
        {"name": "rules", "family": "segment_rules"}, {"name": "rules_baseline", "baseline": "segment_rules"},
        {"name": "blast", "baseline": "batch_and_blast", "offer": "a"}, {"name": "best", "baseline": "best_fixed"},
        {"name": "f", "family": "fixed", "params": {"offers": ["a"]}}, {"name": "x.y-z /w_1", "family": "uniform"},
    ]})  # fmt: skip
    assert len(s.policies) == 6 and "segment_rules" not in families()


def test_unknown_policy_selection_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="unknown policies"):
        Scenario.default().select_policies(["nope"])


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``bandit-engine ARGS`` through the console script's entry point (``run``, which turns the
    engine's errors into one line and exit 2): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["bandit-engine", *args])
    with pytest.raises(SystemExit) as exit_:
        run()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


MALFORMED = [
    ('members = 4000', 'members = "4000"', "members must be an integer in [1, "),
    ('days = 28', 'days = "28"', "days must be a number > 0"),
    ('seeds = [1, 2, 3]', 'seeds = 3', "seeds must be a list"),
    ('cost = 2.0', 'cost = "2.0"', "offer 'home-10': cost must be a number"),
    ('channels = ["email", "push", "in_app"]', 'channels = "email"', "channels must be a list"),
    ('name = "thompson"\n', 'name = "oracle"\n', "policy 'oracle': the name is reserved"),
    ('name = "thompson_segmented"', 'name = "random"', "'random' is the uniform baseline"),
    ('offer = "fashion-30"', 'offer = "fashion30"', "policy 'batch_and_blast': unknown offers ['fashion30']"),
    ('prior_variance = 0.05,', 'prior_variance = -1,', "policy 'lin_ts': lin_ts: prior_variance must be"),
    ('name = "segment_rules"', 'name = "segment rules (v2)"', "policy 'segment rules (v2)': a policy name is"),
    # sizes a run cannot hold: a 7 TiB allocation error, a run drawing members without end, an
    # int64 overflow of the simulated clock ("time cannot go backwards") -- tracebacks all
    ('decisions = 20000', 'decisions = 1000000000000',
     "decisions must be an integer in [1, 10_000_000]"),
    ('members = 4000', 'members = 100000000000', "members must be an integer in [1, 1_000_000]"),
    ('days = 28', 'days = 1e12', "days must be a number > 0 and <= 3660"),
    ('days = 28', 'days = 28\nstart_ms = 9223372036854775807',
     "start_ms must be epoch ms from 1970 to"),
    # a key a table does not take read "OfferSpec.__init__() got an unexpected keyword argument"
    ('margin = 9.0', 'margin = 9.0\nmargn = 1',
     "offer 'home-10': unknown fields ['margn']; known: ["),
    ('fatigue = 0.3', 'fatigue = 0.3\nfatige = 1', "[world]: unknown fields ['fatige']; known: ["),
    ('baseline = "segment_rules"', 'baseline = "segment_rules"\nofer = "x"',
     "policies[4] ('segment_rules'): unknown fields ['ofer']; known: ["),
]


@pytest.mark.parametrize(("old", "new", "message"), MALFORMED,
                         ids=[m[1].split()[0] + "-" + m[1].split()[-1][:24] for m in MALFORMED])
def test_malformed_scenario_files_are_one_line_errors_with_exit_2(
    old: str, new: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    text = (ROOT / "simulations/default.toml").read_text()
    assert text.count(old) >= 1
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(old, new, 1))
    code, out, err = _cli(monkeypatch, capsys, "simulate", str(bad), "--policies", "segment_rules", "--seeds", "1",
                          "--decisions", "50", "--no-tracking", "--no-progress")  # fmt: skip
    assert code == 2 and message in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "| policy |" not in out  # refused before simulating


def test_a_scenario_file_that_is_not_utf8_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """It was a UnicodeDecodeError traceback; a leading BOM (editors on Windows) is fine."""
    bad = tmp_path / "latin1.toml"
    bad.write_bytes((ROOT / "simulations/default.toml").read_bytes().replace(b"# ", "# é ".encode("latin-1"), 1))
    code, out, err = _cli(monkeypatch, capsys, "simulate", str(bad), "--no-tracking", "--no-progress")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {bad}: not UTF-8 text (invalid continuation byte at byte "), err
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + (ROOT / "simulations/default.toml").read_bytes())
    assert Scenario.load(bom).name == "default" and Scenario.load(bom).source.startswith("# ")


def test_repeated_policies_and_seeds_run_once() -> None:
    s = Scenario.default().with_(members=100)
    assert [p.name for p in s.select_policies(["thompson", "random", "thompson"]).policies] == ["thompson", "random"]
    sim = Simulator(s.select_policies(["random"]), decisions=50)
    c = sim.compare([3, 3])
    assert sorted((r.policy, r.seed) for r in c.runs) == [("oracle", 3), ("random", 3)]
    assert {row["policy"]: row["seeds"] for row in c.summary()} == {"random": 1, "oracle": 1}
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/default.toml"), "--policies", "segment_rules,segment_rules",
        "--seeds", "4,4", "--decisions", "100", "--no-tracking", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.count("| segment_rules |") == 1 and "seeds [4]" in result.output


def test_numeric_options_are_range_checked() -> None:
    """``--decisions 0`` ran the scenario's full count, ``-1`` crashed; seeds must be >= 0."""
    with pytest.raises(InvalidArgument, match=r"decisions must be an integer in \[1, "):
        Simulator(Scenario.default(), decisions=0)
    with pytest.raises(InvalidArgument, match=r"seeds must be integers >= 0 .*got \[-1\]"):
        Simulator(Scenario.default().with_(members=100), decisions=10).compare([-1])
    for args in (["--decisions", "0"], ["--decisions", "-1"], ["--jobs", "0"], ["--seeds", "-1"],
                 ["--decisions", "10000001"]):  # fmt: skip
        result = CliRunner().invoke(main, ["simulate", str(ROOT / "simulations/default.toml"), *args,
                                           "--no-tracking", "--no-progress"])  # fmt: skip
        assert result.exit_code == 2, (args, result.output)
        assert "Invalid value" in result.output and "Traceback" not in result.output, args


def test_json_out_that_cannot_be_written_fails_before_simulating(tmp_path: Path) -> None:
    """Permission bits passed every path for root, so a file that cannot be created was found
    only after the whole simulation; the check opens it, and leaves nothing behind."""
    for target in ("/proc/nope.json", str(tmp_path / "x.json")):
        result = CliRunner().invoke(main, [
            "simulate", str(ROOT / "simulations/default.toml"), "--policies", "segment_rules",
            "--seeds", "1", "--decisions", "100", "--no-tracking", "--no-progress",
            "--json-out", target,
        ])  # fmt: skip
        if target.startswith("/proc"):
            assert result.exit_code == 2, result.output
            assert "'--json-out'" in result.output and "cannot be written" in result.output
            assert "| policy |" not in result.output
        else:  # a writable path: written once, after the run
            assert result.exit_code == 0, result.output
            assert json.loads(Path(target).read_text())[0]["policy"]


def test_json_out_into_a_missing_directory_fails_before_simulating(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/default.toml"), "--policies", "segment_rules", "--seeds", "1",
        "--decisions", "100", "--no-tracking", "--no-progress", "--json-out", str(tmp_path / "nodir" / "x.json"),
    ])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--json-out" in result.output and "does not exist" in result.output
    assert "| policy |" not in result.output and not (tmp_path / "nodir").exists()


# the world -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world() -> World:
    return World(Scenario.load(ROOT / "simulations/default.toml").with_(members=400), seed=5)


def test_world_is_reproducible_and_context_is_observable_only(world: World) -> None:
    again = World(world.scenario, seed=5)
    assert [m.context for m in again.members[:20]] == [m.context for m in world.members[:20]]
    assert np.array_equal(again._static, world._static)
    ctx = world.members[0].context
    assert "price_sensitivity" not in ctx and "affinity" not in ctx
    assert set(ctx) >= {"tier", "lifecycle", "tenure_days", "recency_days", "frequency", "monetary"}


def test_best_offer_differs_by_member(world: World) -> None:
    ids = [o.offer_id for o in world.offers if o.kind != "early_access"]
    best = {max(ids, key=lambda o: world.expected_reward(m, o, "email", [])) for m in world.members}
    assert len(best) >= 4


def test_fatigue_conditioning_and_channel_effects(world: World) -> None:
    m = world.members[3]
    t0 = world.start_ms + 10 * 86_400_000
    fresh = world.expected_reward(m, "home-10", "email", [], t0)
    tired = world.expected_reward(m, "home-10", "email", [Exposure("home-10", t0 - 1000)] * 3, t0)
    assert tired < fresh
    conditioned = world.expected_reward(m, "points-2x", "email", [Exposure("fashion-30", t0 - 1000)] * 3, t0)
    assert conditioned < world.expected_reward(m, "points-2x", "email", [], t0)
    # old exposures outside the fatigue window do not count
    old = world.expected_reward(m, "home-10", "email", [Exposure("home-10", t0 - 40 * 86_400_000)], t0)
    assert old == pytest.approx(fresh)
    assert world.expected_reward(m, "home-10", "in_app", []) != world.expected_reward(m, "home-10", "sms", [])


def test_delays_stay_inside_the_reward_window(world: World) -> None:
    window = 7 * 86_400_000
    delays = [world.delay_ms(u, window) for u in np.linspace(0, 0.999999, 50)]
    assert min(delays) == 0 and max(delays) < window
    assert delays == sorted(delays)


# the runner ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> Simulator:
    s = Scenario.load(ROOT / "simulations/default.toml").with_(members=300)
    return Simulator(s.select_policies(["random", "best_fixed", "segment_rules", "thompson_segmented"]), decisions=600)


@pytest.fixture(scope="module")
def comparison(small: Simulator):
    return small.compare([11], keep_engines=True)


def test_runs_go_through_the_engine(comparison) -> None:
    for r in comparison.runs:
        assert r.engine is not None
        assert r.engine.ledger.count_decisions() == r.decisions == 600
        logged = [d for d in r.engine.ledger.decisions() if d.offer_id is not None and d.learnable]
        assert len(logged) == r.served
        assert all(0 < d.probability <= 1 for d in logged)


def test_oracle_beats_every_policy_and_lift_is_normalized(comparison) -> None:
    rows = {r.policy: comparison.per_run(r) for r in comparison.runs}
    oracle = rows["oracle"]["expected_reward"]
    for name, m in rows.items():
        assert m["expected_reward"] <= oracle + 1e-9, name
        assert m["overspend"] == 0 and m["cap_breaches"] == 0
    assert rows["oracle"]["normalized_lift"] == pytest.approx(1.0)
    assert rows["random"]["normalized_lift"] == pytest.approx(0.0)
    assert rows["segment_rules"]["normalized_lift"] > 0.1  # knows the top category
    r = comparison.runs[0]
    assert len(r.curve["step"]) == len(r.curve["expected_reward"]) >= 40
    assert r.curve["step"][-1] == 600
    assert {"treatment_rate", "holdout_rate", "lift", "lift_lo", "lift_hi"} <= set(r.holdout)
    table = comparison.table()
    assert "| oracle |" in table and "normalized lift" in table


def test_simulation_families_do_not_leak_into_the_product_registry(comparison) -> None:
    from bandit_engine.policies.registry import families

    assert not {"sim_oracle", "sim_truth_paced", "sim_bayes_oracle", "segment_rules"} & set(families())


def test_seeds_in_parallel_processes_give_the_sequential_comparison(small: Simulator) -> None:
    seeds = [11, 12, 13]
    seen: list[tuple[str, int]] = []
    ticks: list[int] = []
    par = small.compare(seeds, jobs=2, artifacts=True, on_run=lambda r: seen.append((r.policy, r.seed)),
                        progress=ticks.append)  # fmt: skip
    seq = small.compare(seeds, artifacts=True)
    assert [(r.policy, r.seed) for r in par.runs] == [(r.policy, r.seed) for r in seq.runs] == seen
    for p, s in zip(par.runs, seq.runs, strict=True):
        assert p.metrics() | {"decisions_per_s": 0} == s.metrics() | {"decisions_per_s": 0}
        assert p.curve == s.curve and p.offer_mix == s.offer_mix
        assert p.artifacts.keys() == s.artifacts.keys() and p.engine is None
        assert p.artifacts["decisions_sample.dsjson"] == s.artifacts["decisions_sample.dsjson"]
    assert {s.seed for s in seq.runs} == set(seeds) and sum(ticks) == 600 * len(seq.runs)
    for a, b in zip(par.summary(), seq.summary(), strict=True):  # the table, timings aside
        assert {k: v for k, v in a.items() if "per_s" not in k} == {k: v for k, v in b.items() if "per_s" not in k}
    with pytest.raises(InvalidArgument, match="keep_engines"):
        small.compare(seeds, jobs=2, keep_engines=True)
    with pytest.raises(InvalidArgument, match="jobs"):
        small.compare(seeds, jobs=0)


def test_a_run_reports_what_it_used_and_its_spec_is_deterministic() -> None:
    """Runs that differ only in pacing, member cap or model group differ in their settings; the
    oracles report the floor they ran at, and no per-process world key."""
    from bandit_engine.simulation.scenario import PolicyEntry

    base = Scenario.load(ROOT / "simulations/tight_budget.toml").with_(members=100)
    s = base.with_(policies=(
        PolicyEntry("paced", family="thompson"),
        PolicyEntry("hard", family="thompson", pacing=False),
        PolicyEntry("capped", family="thompson", member_cap={"max": 2, "window_days": 7}),
        PolicyEntry("pooled", family="thompson", model_group="all"),
    ))  # fmt: skip
    runs = {r.policy: r for r in Simulator(s, decisions=60).compare([2]).runs}
    assert len({r.spec["family"] for n, r in runs.items() if n in ("paced", "hard", "capped", "pooled")}) == 1
    settings = {n: runs[n].settings for n in ("paced", "hard", "capped", "pooled")}
    assert settings["paced"]["pacing"] == "paced" and settings["hard"]["pacing"] == "hard stop"
    assert settings["capped"]["member_cap"] == {"max": 2, "window_days": 7} and settings["paced"]["member_cap"] is None
    assert settings["pooled"]["model_group"] == "all" and settings["paced"]["model_group"] is None
    assert len({repr(sorted(v.items())) for v in settings.values()}) == 4
    assert settings["paced"]["exploration_floor"] == base.exploration_floor
    assert settings["paced"]["provisional_reward"] == base.provisional_reward
    for ref in ("oracle", "budget_oracle", "truth_paced"):
        assert runs[ref].settings["exploration_floor"] == 1e-6, ref
        assert "world" not in runs[ref].spec["params"], ref
    assert runs["oracle"].settings["pacing"] == "no budgets" and runs["oracle"].settings["unconstrained"] is True
    again = {r.policy: r for r in Simulator(s, decisions=60).compare([2]).runs}
    assert all(again[n].spec == runs[n].spec and again[n].settings == runs[n].settings for n in runs)


def test_common_random_numbers_make_runs_reproducible(small: Simulator) -> None:
    a = small.run("random", PolicySpec("uniform"), 11)
    b = small.run("random", PolicySpec("uniform"), 11)
    assert (a.expected_reward, a.redemptions, a.spend) == (b.expected_reward, b.redemptions, b.spend)
    c = small.run("random", PolicySpec("uniform"), 12)
    assert c.expected_reward != a.expected_reward


def test_budgets_are_never_overspent_and_pacing_is_measured() -> None:
    s = Scenario.load(ROOT / "simulations/tight_budget.toml").with_(members=300)
    # shrink budgets so they bind within a small run
    offers = tuple(o if o.budget is None else type(o)(**{**o.__dict__, "budget": 20.0}) for o in s.offers)
    s = s.with_(offers=offers).select_policies(["thompson_segmented", "thompson_hard_stop"])
    sim = Simulator(s, decisions=800)
    c = sim.compare([3])
    runs = {r.policy: r for r in c.runs}
    assert set(runs) == {"random", "oracle", "budget_oracle", "truth_paced", "thompson_segmented",
                         "thompson_hard_stop"}  # fmt: skip
    for name in ("budget_oracle", "truth_paced", "thompson_segmented", "thompson_hard_stop"):
        r = runs[name]
        assert r.overspend == 0 and r.cap_breaches == 0, name
        assert r.budget_used is not None and 0 < r.budget_used <= 1.0
        assert r.pacing_error is not None
    # the unconstrained oracle ignores budgets: it spends more on the budgeted offers
    assert runs["oracle"].expected_reward >= runs["budget_oracle"].expected_reward
    assert runs["thompson_hard_stop"].budget_used > 0.5
    # with nothing to learn, the engine's pacing comes close to the budget-feasible oracle
    assert runs["truth_paced"].expected_reward >= 0.97 * runs["budget_oracle"].expected_reward
    assert runs["truth_paced"].expected_reward > runs["thompson_segmented"].expected_reward


def test_member_caps_are_enforced_by_the_engine() -> None:
    s = Scenario.load(ROOT / "simulations/fatigue.toml").with_(members=60).select_policies(["lin_ts_capped"])
    r = Simulator(s, decisions=500).compare([2]).by("lin_ts_capped")[0]
    assert r.cap_breaches == 0
    assert r.reasons.get("member_cap", 0) > 0


def test_budget_duals_price_only_binding_budgets() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.5, size=(2000, 3))
    p[:, 0] += 0.2  # offer 0 is best for everyone
    elig = np.ones_like(p, dtype=bool)
    costs = np.array([2.0, 1.0, 1.0])
    unconstrained = (p[:, 0] * costs[0]).sum()
    lam, bound = solve_budget_duals(p, elig, costs, np.array([0.3 * unconstrained, np.inf, np.inf]))
    assert lam[0] > 0 and lam[1] == lam[2] == 0
    choice = np.argmax(p * (1 - lam * costs), axis=1)
    spend0 = (p[choice == 0, 0] * costs[0]).sum()
    assert spend0 <= 0.3 * unconstrained * 1.05
    # the dual bound lies between the unconstrained optimum and (about) the priced greedy value
    assert p.max(1).sum() >= bound >= 0.99 * p[np.arange(2000), choice].sum()


def test_budget_duals_are_solved_on_the_arrivals_the_engine_can_serve_an_offer_to() -> None:
    """Hold-out members and members without consent get the channel default, never an offer.
    The duals were solved over them too: they priced the budgets for demand that never comes,
    and the LP's bound counted their rewards, above what serving every other arrival its best
    offer could earn."""
    from dataclasses import replace

    s = Scenario.load(ROOT / "simulations/tight_budget.toml")
    s = s.with_(members=300, holdout_fraction=0.3)
    offers = tuple(o if o.budget is None else replace(o, budget=15.0) for o in s.offers)
    s = s.with_(offers=offers, world=replace(s.world, consent_rate=0.8))
    sim = Simulator(s, decisions=1200)
    seed = 2
    # which arrivals a run could serve an offer to, read from the run's own decisions
    r = sim.run("uniform", PolicySpec("uniform"), seed, keep_engine=True)
    by_t = {int(d.event_id.split("-")[1]): d for d in r.engine.ledger.decisions()}
    mask = np.array([by_t[t].group != "holdout" and by_t[t].reason != "no_consent"
                     for t in range(1200)])  # fmt: skip
    assert 0.5 < mask.mean() < 0.65
    prices, bound = sim.budget_prices(seed)
    probs, elig, offs = sim._mean_probs(seed)
    costs = np.array([o.cost_cents / 100 for o in offs])
    budgets = np.array([np.inf if o.budget_cents is None else o.budget_cents / 100 for o in offs])
    lam, lp_bound = solve_budget_duals(probs[mask], elig[mask], costs, budgets)
    assert prices == {o.offer_id: float(v) for o, v in zip(offs, lam, strict=True) if v > 0}
    assert prices and bound == lp_bound
    # an upper bound on the feasible optimum of the arrivals that can be served (it read 371)
    assert bound <= np.where(elig, probs, 0.0)[mask].max(1).sum()  # 266
    assert sim.servable(seed).tolist() == mask.tolist()


def test_simulate_command_prints_a_table(tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    result = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/default.toml"), "--policies", "random,segment_rules",
        "--seeds", "4", "--decisions", "200", "--no-tracking", "--no-progress", "--json-out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| segment_rules |" in result.output and "| oracle |" in result.output
    assert "bayes_oracle" not in result.output  # only with --ceiling
    assert '"policy": "segment_rules"' in out.read_text()
    with_ceiling = CliRunner().invoke(main, [
        "simulate", str(ROOT / "simulations/tight_budget.toml"), "--policies", "random", "--seeds", "4",
        "--decisions", "200", "--no-tracking", "--no-progress", "--ceiling",
    ])  # fmt: skip
    assert with_ceiling.exit_code == 0, with_ceiling.output
    assert "| bayes_oracle |" in with_ceiling.output and "| bayes_budget_oracle |" in with_ceiling.output
    sc = Scenario.load(ROOT / "simulations/tight_budget.toml").select_policies(["random"])
    comp = Simulator(sc, decisions=50).compare([4], ceiling=True)
    assert len(comp.runs) == Simulator(sc, decisions=50).total_runs(1, ceiling=True) == 6


@pytest.mark.parametrize("seeds", ["x", ",", "1,,2", "", "2,"])
def test_simulate_command_rejects_bad_seeds(seeds: str) -> None:
    """An empty item was skipped: "," ran the scenario's own seeds and "1,,2" ran 1 and 2."""
    result = CliRunner().invoke(main, ["simulate", str(ROOT / "simulations/default.toml"),
                                       "--seeds", seeds, "--policies", "random",
                                       "--decisions", "50", "--no-tracking",
                                       "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--seeds': expected comma-separated integers" in result.output
    assert "| policy |" not in result.output


# the context carries the signal; over-contact has a cost ---------------------------------------
def test_context_has_noisy_proxies_of_the_latent_traits(world: World) -> None:
    cats = world.categories
    shares = np.array([[m.context[f"share_{c}"] for c in cats] for m in world.members])
    affinity = np.array([m.affinity for m in world.members])
    assert np.allclose(shares.sum(1), 1.0, atol=0.01)
    corr = [np.corrcoef(shares[:, j], affinity[:, j])[0, 1] for j in range(len(cats))]
    assert min(corr) > 0.8  # informative ...
    assert not np.allclose(shares, affinity, atol=0.05)  # ... but noisy
    promo = np.array([m.context["promo_share"] for m in world.members])
    sens = np.array([m.price_sensitivity for m in world.members])
    assert np.corrcoef(promo, sens)[0, 1] > 0.6
    top = [m.context["top_category"] for m in world.members]
    assert all(t == cats[int(np.argmax(s))] for t, s in zip(top, shares, strict=True))


def test_the_context_oracle_reaches_most_of_the_oracle_lift() -> None:
    from bandit_engine.simulation.oracles import context_ceiling

    s = Scenario.load(ROOT / "simulations/default.toml").with_(members=1500)
    sim = Simulator(s, decisions=5000)
    w, arr = sim.world(4)
    c = context_ceiling(w, arr.member, arr.channel, arr.time_ms, sim.offers(unconstrained=True),
                        train_members=6000)  # fmt: skip
    assert c["random"] < c["context_oracle"] <= c["oracle"]
    assert c["lift"] > 0.9
    # the same fit without the purchase-history proxies (segment attributes and top category only)
    blind = context_ceiling(w, arr.member, arr.channel, arr.time_ms, sim.offers(unconstrained=True),
                            train_members=6000, proxies=False)  # fmt: skip
    assert blind["lift"] < c["lift"] - 0.05


def test_context_posterior_is_what_the_context_tells_of_the_latent_traits(world: World) -> None:
    """``World.context_posterior``: seeded draws of the static logits given the observable
    context. Their weighted mean tracks each member's true logits far better than the
    population's mean per offer does, but not exactly (the traits stay latent)."""
    samples, w = world.context_posterior(7)
    again, w2 = world.context_posterior(7)
    assert samples.shape == (400, len(world.offers)) and w.shape == (400,)
    assert np.array_equal(samples, again) and np.array_equal(w, w2)
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    members = range(200)
    post = np.array([w @ s for s, w in (world.context_posterior(m) for m in members)])
    true = world._static[list(members)]
    centred = true - true.mean(0)
    assert ((post - true) ** 2).mean() < 0.35 * (centred**2).mean()
    assert not np.allclose(post, true, atol=0.05)
    # the latent traits alone, through the same formula, give back the truth exactly
    m = world.members[3]
    assert np.array_equal(
        world.static_logit(m.context, m.affinity, m.price_sensitivity, m.responsiveness),
        world._static[3],
    )


def test_the_bayes_oracle_is_a_ceiling_short_of_the_oracles_and_far_above_a_rule() -> None:
    """``compare(ceiling=True)`` adds ``bayes_oracle`` (greedy on what the context tells, through
    the engine) and, with budgets, ``bayes_budget_oracle``: short of the oracles (the context
    is noisy), far above random and a hand-written rule, never overspending."""
    sc = Scenario.load(ROOT / "simulations/default.toml").with_(members=600)
    comp = Simulator(sc.select_policies(["segment_rules"]), decisions=1500).compare([3], ceiling=True)
    rows = {r.policy: comp.per_run(r) for r in comp.runs}
    bayes = rows["bayes_oracle"]["normalized_lift"]
    assert rows["segment_rules"]["normalized_lift"] + 0.2 < bayes < 0.99
    assert bayes > 0.85
    tight = Scenario.load(ROOT / "simulations/tight_budget.toml").with_(members=600)
    comp = Simulator(tight.select_policies(["random"]), decisions=3000).compare([3], ceiling=True)
    rows = {r.policy: comp.per_run(r) for r in comp.runs}
    assert 0.8 < rows["bayes_budget_oracle"]["normalized_lift"] < 1.0
    assert rows["bayes_budget_oracle"]["overspend"] == 0 and rows["bayes_budget_oracle"]["spend"] > 0
    assert 0.8 < rows["bayes_oracle"]["lift_oracle"] < 1.0  # the unconstrained one, as the oracle


def test_opt_out_probability_grows_with_contacts_beyond_the_free_ones() -> None:
    s = Scenario.load(ROOT / "simulations/fatigue.toml").with_(members=20)
    w = World(s, 1)
    assert (w.optout_rate, w.optout_free_contacts) == (0.03, 4)
    t0 = w.start_ms + 10 * 86_400_000
    for i in range(6):
        w.expose(0, "home-10", t0 - i * 3_600_000)
    assert w.optout_probability(0, t0) == pytest.approx(0.03 * 2)
    assert w.optout_probability(1, t0) == 0.0
    later = t0 + 8 * 86_400_000  # every contact has left the 7-day window
    assert w.optout_probability(0, later) == 0.0
    default = World(Scenario.load(ROOT / "simulations/default.toml").with_(members=20), 1)
    default.expose(0, "home-10", t0)
    assert default.optout_probability(0, t0) == 0.0  # no over-contact cost unless configured


def test_frequency_caps_pay_off_when_over_contact_makes_members_opt_out() -> None:
    s = Scenario.load(ROOT / "simulations/fatigue.toml").with_(members=150)
    c = Simulator(s.select_policies(["lin_ts", "lin_ts_capped"]), decisions=3000).compare([2])
    runs = {r.policy: r for r in c.runs}
    capped, uncapped = runs["lin_ts_capped"], runs["lin_ts"]
    assert uncapped.opt_outs > 20 and capped.opt_outs == 0  # the cap (4 / 7 days) = the free contacts
    assert capped.cap_breaches == 0 and capped.reasons.get("member_cap", 0) > 0
    assert capped.expected_reward > uncapped.expected_reward
    # opted-out members get the channel default (no offer here), logged as without consent
    assert uncapped.reasons.get("no_consent", 0) > capped.reasons.get("no_consent", 0)
    assert "| opt-outs |" in c.table().splitlines()[0]


@pytest.mark.parametrize("aggregation", ["first", "sum"])
def test_scenario_aggregation_sets_when_the_engine_learns_a_redemption(aggregation: str) -> None:
    """"first" settles and learns a redemption when it arrives; "sum" keeps the decision open
    and learns every outcome (redeemed or not) when the window closes: equal feedback delays."""
    s = Scenario.default().with_(aggregation=aggregation, members=100)
    r = Simulator(s, decisions=300).run("thompson", PolicySpec("thompson"), 4, keep_engine=True)
    assert r.engine is not None and r.redemptions > 0
    assert {c.aggregation for c in r.engine.channels().values() if c.name in s.channels} == {aggregation}
    redeemed = [d for d in r.engine.ledger.decisions() if d.reward]
    assert len(redeemed) == r.redemptions
    assert {d.status for d in redeemed} == ({"closed"} if aggregation == "first" else {"expired"})


def test_a_policy_entry_can_learn_one_model_for_every_channel() -> None:
    """``model_group`` on a policy entry: every channel of the run learns the same model."""
    from bandit_engine.simulation.scenario import PolicyEntry

    s = Scenario.default().with_(members=100, policies=(
        PolicyEntry("pooled", family="shared_ts", model_group="all"),
        PolicyEntry("alone", family="shared_ts"),
    ))  # fmt: skip
    c = Simulator(s, decisions=300).compare([4], keep_engines=True)
    pooled, alone = c.by("pooled")[0].engine, c.by("alone")[0].engine
    pol = pooled.policy("email")
    assert all(pooled.policy(ch) is pol for ch in s.channels) and pol.version > 0
    assert {cfg.model_group for cfg in pooled.channels().values() if cfg.name in s.channels} == {"all"}
    assert alone.policy("push") is not alone.policy("email")


def _tenths_module():  # simulations/ is a folder of scenarios and scripts, not a package
    import importlib.util

    spec = importlib.util.spec_from_file_location("tenths", ROOT / "simulations/tenths.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_tenths_script_prints_lift_by_tenth_whose_total_is_the_comparisons_normalized_lift(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``simulations/tenths.py``: ten lifts per policy and seed, and a total equal to the one the
    summary table reports for the same runs; overrides reach the world, a policy and the scenario."""
    import subprocess
    import sys

    tenths = _tenths_module()
    base = Scenario.load(ROOT / "simulations/default.toml").select_policies(["segment_rules"])
    sc = tenths.apply_overrides(base, ["members=300", "decisions=1500", "world.fatigue=0"])
    assert (sc.members, sc.decisions, sc.world.fatigue) == (300, 1500, 0)
    lin = Scenario.load(ROOT / "simulations/default.toml").select_policies(["lin_ts"])
    assert tenths.apply_overrides(lin, ["lin_ts.dim=64"]).policies[0].params["dim"] == 64
    with pytest.raises(SystemExit, match="no policy or section 'nope'"):
        tenths.apply_overrides(base, ["nope.x=1"])
    with pytest.raises(SystemExit, match=r"error: .*unknown parameters \['dimm'\]"):  # found when the run builds it
        tenths.main([str(ROOT / "simulations/default.toml"), "lin_ts", "1", "lin_ts.dimm=3", "decisions=50"])
    capsys.readouterr()
    tenths.main([str(ROOT / "simulations/default.toml"), "segment_rules", "1", "members=300", "decisions=20"])
    short = capsys.readouterr().out  # tenths of 2 decisions: where oracle = random there is no lift
    assert "nan" not in short and "inf" not in short and " - " in short, short

    lift, total = tenths.lift_by_tenth(sc, [1])[("segment_rules", 1)]
    summary = Simulator(sc).compare([1]).summary()
    expected = next(r["normalized_lift"] for r in summary if r["policy"] == "segment_rules")
    assert lift.shape == (10,) and np.isfinite(lift).all()
    assert total == pytest.approx(expected, abs=1e-9)
    assert 0.0 < total < 1.0  # hand-written rules: better than random, short of the oracle

    out = subprocess.run(
        [sys.executable, str(ROOT / "simulations/tenths.py"), str(ROOT / "simulations/default.toml"),
         "segment_rules", "1", "members=300", "decisions=1500", "world.fatigue=0"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.splitlines()  # fmt: skip
    assert out[0].startswith("segment_rules seed 1: ") and len(out[0].split(":")[1].split()) == 12
    assert out[0].endswith(f"total {total:.3f}") and out[1] == f"segment_rules mean {total:.3f}"
    assert out[2].startswith("bayes_oracle seed 1: ") and out[3].startswith("bayes_oracle mean ")
    ceiling = float(out[3].split()[-1])
    assert total + 0.1 < ceiling < 1.0  # the ceiling of a policy seeing only the context
    bad = subprocess.run(
        [sys.executable, str(ROOT / "simulations/tenths.py"), str(ROOT / "simulations/default.toml"),
         "segment_rules", "1", "world.no_such_field=1"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_the_world_forgets_only_exposures_no_window_reads_any_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """A member's history was cut by count (``del h[:32]`` past 64), dropping exposures still
    inside the fatigue, conditioning and opt-out windows (20 members, 2 000 decisions: 635 of
    1 534 inside the 14-day fatigue window): the truth then undercounted fatigue. A world that
    forgets nothing now gives the same run."""
    s = Scenario.default().with_(members=20, days=28.0)
    trimmed = Simulator(s, decisions=2000).run("random", PolicySpec("uniform"), 1)
    with monkeypatch.context() as m:
        m.setattr(World, "expose", lambda self, i, oid, now: self.history.setdefault(i, []).append(Exposure(oid, now)))
        sim = Simulator(s, decisions=2000)
        full = sim.run("random", PolicySpec("uniform"), 1)
        assert max(len(h) for h in sim.world(1)[0].history.values()) > 64  # past the old cut
    assert (full.expected_reward, full.redemptions) == (trimmed.expected_reward, trimmed.redemptions)
    # what it keeps stays bounded: exposures inside the longest window, 64 at least
    w = World(s, 1)
    assert w.history_ms == 30 * 86_400_000  # conditioning, the longest window of this world
    times = [w.start_ms + k * 43_200_000 for k in range(300)]  # two a day for 150 days
    for t in times:
        w.expose(0, "home-10", t)
        inside = [x for x in times if t - w.history_ms < x <= t]
        assert [e.issued_at for e in w.history_of(0)][-len(inside):] == inside
        assert len(w.history_of(0)) <= max(65, len(inside))


def test_a_reference_oracle_that_earns_nothing_leaves_the_ratios_undefined(tmp_path: Path) -> None:
    """No member consents: every run earns 0, and vs oracle (policy / oracle - 1) divided by
    zero after all the runs. It is now undefined: "–" in the table, null in --json-out."""
    import json

    text = (ROOT / "simulations/default.toml").read_text().replace("[world]\n", "[world]\nconsent_rate = 0.0\n", 1)
    path = tmp_path / "nobody.toml"
    path.write_text(text)
    out = tmp_path / "summary.json"
    res = CliRunner().invoke(main, ["simulate", str(path), "--policies", "thompson", "--seeds", "1",
                                    "--decisions", "100", "--no-tracking", "--no-progress", "--json-out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if line.startswith("| thompson |"))
    assert row.split(" | ")[1:4] == ["0.0000", "–", "–"], row
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"random", "oracle", "thompson"}
    assert all(r["normalized_lift"] is None and r["vs_oracle"] is None and r["reward_rate"] == 0 for r in rows.values())
