"""Off-policy evaluation: estimators checked against truth, with coverage and error bounds that a
biased estimator (or a wrong propensity) fails."""

from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from bandit_engine import ChannelConfig, Engine, ManualClock, Offer, PolicySpec
from bandit_engine.cli import main, run
from bandit_engine.engine import to_dsjson
from bandit_engine.errors import BanditEngineError, InvalidArgument, UnknownChannel
from bandit_engine.evaluation import (
    LoggedData,
    LoggedRow,
    dm,
    dr,
    evaluate,
    from_dsjson,
    from_engine,
    ips,
    policy_target,
    snips,
)
from bandit_engine.simulation import Scenario, Simulator

ROOT = Path(__file__).resolve().parents[1]

# A small contextual world with an exact truth: 4 contexts, 3 offers.
MU = np.array([[0.10, 0.30, 0.05], [0.40, 0.10, 0.20], [0.05, 0.05, 0.50], [0.25, 0.20, 0.15]])
P_X = np.array([0.4, 0.3, 0.2, 0.1])
LOGGING = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
TARGET = np.array([[0.05, 0.9, 0.05], [0.9, 0.05, 0.05], [0.05, 0.05, 0.9], [0.9, 0.05, 0.05]])
TRUTH = float((P_X[:, None] * TARGET * MU).sum())
OFFERS = ("a", "b", "c")


def synthetic(seed: int, n: int) -> tuple[LoggedData, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.choice(4, size=n, p=P_X)
    u = rng.random(n)
    a = (u[:, None] > np.cumsum(LOGGING[x], axis=1)).sum(1)
    r = (rng.random(n) < MU[x, a]).astype(float)
    rows = [
        LoggedRow(f"e{i}", f"m{i}", {"segment": f"s{x[i]}"}, OFFERS, LOGGING[x[i]], int(a[i]),
                  float(LOGGING[x[i], a[i]]), float(r[i]))  # fmt: skip
        for i in range(n)
    ]
    return LoggedData(rows), x


def target(row: LoggedRow) -> np.ndarray:
    return TARGET[int(row.context["segment"][1:])]


@pytest.fixture(scope="module")
def replications() -> list[tuple[dict, dict]]:
    """50 replications of 1 500 logged decisions: (estimates, estimates with a wrong propensity)."""
    out = []
    for seed in range(50):
        data, x = synthetic(seed, 1500)
        rep = evaluate(data, target, seed=seed)
        wrong = evaluate(data, target, seed=seed, propensity=np.full(len(data), 1 / 3))
        out.append((rep.estimates, wrong.estimates))
    return out


@pytest.mark.parametrize("name", ["ips", "snips", "dr"])
def test_unbiased_estimators_cover_the_truth_and_are_accurate(replications, name: str) -> None:
    est = [r[0][name] for r in replications]
    coverage = np.mean([e.covers(TRUTH) for e in est])
    rel_err = np.array([abs(e.value - TRUTH) / TRUTH for e in est])
    bias = np.mean([e.value for e in est]) - TRUTH
    assert 0.86 <= coverage <= 1.0, coverage
    assert np.median(rel_err) < 0.08, np.median(rel_err)
    assert abs(bias) < 0.01 * TRUTH + 2 * np.std([e.value for e in est]) / np.sqrt(len(est))


def test_dms_interval_carries_the_reward_models_error(replications) -> None:
    """DM's interval came from the spread of its predictions alone, about 13 times too narrow
    (it covered the truth in 10 % of these replications): the reward model's own error is
    most of DM's. Its standard error now comes from a bootstrap that refits the model, and
    matches DM's spread over replications."""
    est = [r[0]["dm"] for r in replications]
    spread = float(np.std([e.value for e in est]))
    assert 0.8 <= np.mean([e.covers(TRUTH) for e in est]) <= 1.0
    assert 0.6 * spread < np.mean([e.se for e in est]) < 1.5 * spread, (spread, est[0])
    # without a standard error from the whole procedure, dm() claims no interval at all
    bare = dm(np.array([0.2, 0.3, 0.4]))
    assert bare.value == pytest.approx(0.3) and (bare.lo, bare.hi) == (-np.inf, np.inf)
    assert dm(np.zeros(3), se=0.0).hi == np.inf  # resamples without spread: no interval either


def test_terms_without_spread_have_no_interval() -> None:
    """Every reward 0, or the only rows the candidate weights redeemed alike: the normal
    interval collapsed to a point ([0, 0], or SNIPS [1, 1] from two rows), a certainty the logs
    cannot give. The estimate stands; its interval is unbounded."""
    pi, p = np.array([1.0, 0.0, 1.0, 0.0]), np.full(4, 0.5)
    zero = np.zeros(4)
    alike = np.array([1.0, 0.0, 1.0, 0.0])  # the two weighted rows both redeemed
    for e in (ips(pi, p, zero), snips(pi, p, zero), snips(pi, p, alike)):
        assert np.isfinite(e.value) and (e.lo, e.hi) == (-np.inf, np.inf), e
    for e in (ips(pi, p, alike), snips(pi, p, np.array([1.0, 0.0, 0.0, 0.0]))):
        assert 0 < e.se < np.inf, e  # IPS counts the unweighted rows as 0: a spread


@pytest.mark.parametrize("name", ["ips", "snips"])
def test_a_wrong_propensity_fails_coverage(replications, name: str) -> None:
    wrong = [r[1][name] for r in replications]
    coverage = np.mean([e.covers(TRUTH) for e in wrong])
    assert coverage < 0.5, coverage  # the same check that passes above catches the bias


def test_dr_is_robust_to_a_wrong_propensity_when_the_model_is_right(replications) -> None:
    # the cross-fitted model is saturated on 4 contexts, so DR stays near the truth even with
    # a wrong propensity: double robustness, not an accident of the checks
    rel = np.median([abs(r[1]["dr"].value - TRUTH) / TRUTH for r in replications])
    assert rel < 0.1


def test_dm_with_a_misspecified_model_is_biased() -> None:
    data, _ = synthetic(1, 3000)
    pi = np.array([target(r)[r.chosen] for r in data.rows])
    const = np.full(len(data), data.reward.mean())
    d = dr(pi, data.propensity, data.reward, const, const)  # DR survives a constant model
    assert d.covers(TRUTH)
    assert not (abs(const.mean() - TRUTH) < 0.01)  # while DM with it is off


def test_effective_sample_size() -> None:
    data, _ = synthetic(2, 2000)
    uniform_target = lambda row: LOGGING[int(row.context["segment"][1:])]  # noqa: E731
    rep = evaluate(data, uniform_target)
    assert rep.estimates["ips"].ess == pytest.approx(2000)
    far = evaluate(data, target)
    assert 50 < far.estimates["ips"].ess < 1500


def test_a_candidate_with_probability_zero_on_every_logged_action_has_no_ips_estimate() -> None:
    """IPS read 0 with the interval [0, 0] (all-zero terms), a certainty the logs cannot give:
    no logged decision carries weight (ESS 0). Like SNIPS it is undefined; DM and DR, from
    the reward model, still estimate it."""
    data, _ = synthetic(3, 600)
    elsewhere = lambda row: np.eye(3)[(row.chosen + 1) % 3]  # noqa: E731
    rep = evaluate(data, elsewhere)
    for name in ("ips", "snips"):
        e = rep.estimates[name]
        assert np.isnan(e.value) and (e.lo, e.hi, e.ess) == (-np.inf, np.inf, 0.0), e
    assert np.isfinite(rep.estimates["dr"].value) and rep.estimates["dr"].se > 0
    assert "| ips | nan | [-inf, inf] | 0 |" in rep.table()
    one = ips(np.array([0.0, 1.0]), np.array([0.5, 0.5]), np.array([1.0, 0.0]))
    assert (one.value, one.ess) == (0.0, 1.0)  # a single row with weight: an estimate


def test_the_standard_errors_are_the_textbook_ones() -> None:
    """Checked against the formulas on a small log: SNIPS's delta-method error centres each
    row's reward on the estimate (uncentred, its interval was ~75 % wider, covering 100 % of
    the time), and one row gives an unbounded interval (it read [2, 2], a certainty)."""
    pi = np.array([0.9, 0.1, 0.5, 0.8, 0.3])
    p = np.array([0.5, 0.5, 0.25, 0.4, 0.6])
    r = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    w, n = pi / p, 5
    v = float((w * r).sum() / w.sum())
    infl = n * w * (r - v) / w.sum()
    e = snips(pi, p, r)
    assert e.value == pytest.approx(v)
    assert e.se == pytest.approx(float(infl.std(ddof=1)) / np.sqrt(n))
    z = 1.959963984540054  # the normal 97.5 % quantile
    assert (e.lo, e.hi) == pytest.approx((v - z * e.se, v + z * e.se))
    terms = w * r
    assert ips(pi, p, r).se == pytest.approx(float(terms.std(ddof=1)) / np.sqrt(n))
    one = ips(np.array([1.0]), np.array([0.5]), np.array([1.0]))
    assert one.value == 2.0 and one.se == np.inf and (one.lo, one.hi) == (-np.inf, np.inf)


@pytest.mark.parametrize("pmf", [
    np.zeros(3), TARGET[0] / 2, np.array([1.0]), np.array([1.5, -0.5, 0.0]),
    np.array([np.nan, 0.5, 0.5]),
])  # fmt: skip
def test_a_target_pmf_that_is_not_a_distribution_over_the_eligible_offers_is_an_error(
    pmf: np.ndarray,
) -> None:
    """It was evaluated as given: an all-zero pmf read 0 for every estimator (the truth is
    0.34), half of one halved DM and IPS; a shorter one raised an IndexError."""
    data, _ = synthetic(3, 50)
    message = (r"^the target's pmf for event 'e0' must be 3 probabilities "
               r"\(one per eligible offer\) summing to 1, got \[")  # fmt: skip
    with pytest.raises(InvalidArgument, match=message):
        evaluate(data, lambda row: pmf)


BAD = [
    (dict(pi=[0.5], p=[0.0], r=[1.0]), r"propensities must be in \(0, 1\]"),
    (dict(pi=[0.5], p=[1.5], r=[1.0]), r"propensities must be in \(0, 1\]"),
    (dict(pi=[1.5], p=[0.5], r=[1.0]), r"target probabilities must be in \[0, 1\]"),
    (dict(pi=[0.5], p=[0.5], r=[np.nan]), r"rewards must be finite"),
    (dict(pi=[0.5, 0.5], p=[0.5], r=[1.0]), r"1-d of one length"),
    (dict(pi=[], p=[], r=[]), r"no logged decisions"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
@pytest.mark.parametrize("fn", [ips, snips])
def test_bad_inputs(fn, args: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        fn(np.array(args["pi"], dtype=float), np.array(args["p"], dtype=float), np.array(args["r"], dtype=float))


# on the engine's own logs ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def logged_run():
    s = Scenario.load(ROOT / "simulations/default.toml").with_(members=400)
    sim = Simulator(s, decisions=3000)
    return sim.run("uniform-logger", PolicySpec("uniform"), 21, keep_engine=True, record_truth=True)


def test_evaluating_policy_b_from_policy_a_logs_in_the_simulator(logged_run) -> None:
    data = from_engine(logged_run.engine)
    assert len(data) == logged_run.served

    def prefers_points(row: LoggedRow) -> np.ndarray:
        k = len(row.eligible)
        p = np.full(k, 0.1 / k)
        p[row.eligible.index("points-2x") if "points-2x" in row.eligible else 0] += 0.9
        return p

    truth = np.mean([prefers_points(r) @ logged_run.truth[r.event_id] for r in data.rows])
    rep = evaluate(data, prefers_points)
    for name in ("ips", "snips", "dr"):
        e = rep.estimates[name]
        assert e.covers(truth), (name, e, truth)
        assert abs(e.value - truth) < 3 * e.se and abs(e.value - truth) / truth < 0.35


def test_dsjson_round_trip_gives_the_same_estimates(logged_run) -> None:
    engine = logged_run.engine
    buf = io.StringIO()
    n = engine.export_dsjson(buf)
    offers = {o.offer_id: o for o in engine.offers()}
    from_json = from_dsjson(io.StringIO(buf.getvalue()))
    from_ledger = from_engine(engine)
    assert len(from_json) == len(from_ledger) == n
    for a, b in zip(from_json.rows[:200], from_ledger.rows[:200], strict=True):
        assert (a.eligible, a.chosen, a.propensity, a.reward) == (b.eligible, b.chosen, b.propensity, b.reward)
        assert np.allclose(a.pmf, b.pmf)
    first = next(d for d in engine.ledger.decisions() if d.offer_id is not None and d.learnable)
    assert to_dsjson(first, offers)["_label_probability"] == from_json.rows[0].propensity
    t = lambda row: np.full(len(row.eligible), 1 / len(row.eligible))  # noqa: E731
    assert evaluate(from_json, t).estimates["ips"].value == pytest.approx(evaluate(from_ledger, t).estimates["ips"].value)


def test_a_candidate_configuration_is_warmed_up_then_evaluated(logged_run) -> None:
    data = from_engine(logged_run.engine)
    train, test = data.split(0.5)
    tgt = policy_target(PolicySpec("thompson", {"segment_by": ["tier", "top_category"]}), train, seed=1)
    rep = evaluate(test, tgt)
    truth = np.mean([tgt(r) @ logged_run.truth[r.event_id] for r in test.rows])
    assert rep.estimates["dr"].covers(truth)
    assert rep.estimates["dr"].value > rep.logged_value  # a learned policy beats uniform logging


def test_bad_dsjson_line_is_reported() -> None:
    with pytest.raises(InvalidArgument, match="dsjson line 1"):
        from_dsjson(io.StringIO(json.dumps({"_label_cost": -1, "c": {}}) + "\n"))


def _record(**changes: object) -> dict:
    rec = {"EventId": "e1", "a": [2, 1, 3], "p": [0.5, 0.25, 0.25],
           "c": {"U": {"tier": "gold"}, "_multi": [{"A": {"offer": f"o{i}"}} for i in range(3)]},
           "_label_cost": -1.0, "_label_probability": 0.5, "_label_Action": 2, "_labelIndex": 1}  # fmt: skip
    return {**rec, **changes}


@pytest.mark.parametrize(("changes", "message"), [
    ({"a": [4, 1, 2]}, r"'a' must list 1-based actions in \[1, 3\]"),
    ({"a": [2, 0, 3]}, r"'a' must list 1-based actions in \[1, 3\]"),
    ({"a": [2, 1.5, 3]}, r"'a' must list 1-based actions"),
    ({"a": [2, 2, 3]}, r"'a' repeats an action"),
    ({"a": [2, 1, 3, 4], "p": [0.4, 0.2, 0.2, 0.2]}, r"'a' must list 1-based actions in \[1, 3\]"),
    ({"p": [0.5, 0.5]}, r"'p' must have one probability per action"),
    ({"_labelIndex": 7}, r"'_labelIndex' must be the 0-based chosen action, 1 \(the first of 'a'\), got 7"),
    ({"_labelIndex": -1}, r"'_labelIndex' must be the 0-based chosen action, 1 .*got -1"),  # was read from the end
    ({"_labelIndex": 0}, r"'_labelIndex' must be the 0-based chosen action"),
])  # fmt: skip
def test_dsjson_action_indexes_are_validated(changes: dict, message: str) -> None:
    good = json.dumps(_record(EventId="e0"))
    row = from_dsjson([good]).rows[0]
    assert (row.chosen, row.eligible[row.chosen], list(row.pmf)) == (1, "o1", [0.25, 0.5, 0.25])
    with pytest.raises(InvalidArgument, match="dsjson line 3: " + message):
        from_dsjson([good, "", json.dumps(_record(**changes))])


def _cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``bandit-engine ARGS`` through the console script's entry point (exit 2 and one line for
    the engine's errors): exit code, stdout, stderr."""
    monkeypatch.setattr(sys, "argv", ["bandit-engine", *args])
    with pytest.raises(SystemExit) as exit_:
        run()
    out = capsys.readouterr()
    return int(exit_.value.code or 0), out.out, out.err


@pytest.mark.parametrize("command", [["evaluate", "--channel", "email", "--policy", "uniform"], ["export-dsjson"]])
def test_reading_commands_refuse_a_sqlite_ledger_that_does_not_exist(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A mistyped path used to create an empty database and report 0 decisions."""
    typo = tmp_path / "ledgr.db"
    code, out, err = _cli(monkeypatch, capsys, "--database-url", f"sqlite:///{typo}", *command)
    assert code == 2, (out, err)
    assert err.strip() == f"error: no ledger at sqlite:///{typo}: the SQLite file '{typo}' does not exist"
    assert not typo.exists() and not list(tmp_path.iterdir())


def _uniform_engine(seed: int, **channel: Any) -> tuple[Engine, ManualClock]:
    """A memory engine choosing uniformly between two offers on email (``channel``: more
    ``ChannelConfig`` settings)."""
    clock = ManualClock()
    engine = Engine.open("memory://", clock=clock, seed=seed)
    for oid in ("o1", "o2"):
        engine.add_offer(Offer(oid, channels=["email"], cost=1.0))
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("uniform"), **channel))
    return engine, clock


def test_only_decisions_whose_window_closed_are_evaluated_or_exported() -> None:
    """A redemption settles its decision at once (``aggregation="first"``), a miss only when
    its window closes: the settled decisions of windows still open are mostly redemptions, so
    evaluating or exporting them would overstate every policy."""
    engine, clock = _uniform_engine(1)
    for k in range(40):
        d = engine.choose(f"m{k}", "email", {})
        if k % 4 == 0:
            assert engine.reward(d.event_id, 1.0).status == "recorded"
    assert len(from_engine(engine)) == 0  # every window still open (10 redemptions settled)
    assert engine.export_dsjson(io.StringIO()) == 0
    clock.advance(days=7, seconds=1)
    assert engine.expire() == 30  # the misses settle with the default reward
    data = from_engine(engine, "email")
    assert len(data) == 40 and data.reward.mean() == 0.25
    buf = io.StringIO()
    assert engine.export_dsjson(buf, channel="email") == 40
    assert from_dsjson(io.StringIO(buf.getvalue())).reward.mean() == 0.25
    with pytest.raises(UnknownChannel, match="unknown channel 'fax'; known: \\['email', "):
        engine.export_dsjson(io.StringIO(), channel="fax")


# the CLI ---------------------------------------------------------------------------------------
def test_evaluate_command_on_a_sqlite_ledger_and_on_dsjson(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    clock = ManualClock()
    engine = Engine.open(url, clock=clock, seed=3)
    for i in range(3):
        engine.add_offer(Offer(f"o{i}", channels=["email"], cost=1.0))
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    rng = np.random.default_rng(0)
    for k in range(400):
        d = engine.choose(f"m{k % 30}", "email", {"tier": "gold" if k % 2 else "silver"}, event_id=f"e{k}")
        engine.reward(d.event_id, float(rng.random() < (0.6 if d.offer_id == "o1" else 0.1)))
        clock.advance(seconds=60)
    clock.advance(days=8)  # past every reward window: the export holds settled cohorts only
    with open(tmp_path / "log.dsjson", "w") as fh:
        engine.export_dsjson(fh)
    engine.close()
    runner = CliRunner()
    res = runner.invoke(main, ["--database-url", url, "evaluate", "--channel", "email", "--policy",
                               '{"family": "fixed", "params": {"offers": ["o1"]}}'])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| dr |" in res.output and "| snips |" in res.output
    dr_value = float(next(line for line in res.output.splitlines() if line.startswith("| dr |")).split("|")[2])
    assert dr_value > 0.4  # o1 redeems at 0.6
    res2 = runner.invoke(main, ["evaluate", "--dsjson", str(tmp_path / "log.dsjson"), "--policy", "uniform"])
    assert res2.exit_code == 0, res2.output
    assert "| ips |" in res2.output
    bad = runner.invoke(main, ["evaluate", "--dsjson", str(tmp_path / "log.dsjson"), "--policy", "{bad"])
    assert bad.exit_code != 0
    fax = runner.invoke(main, ["--database-url", url, "evaluate", "--channel", "fax", "--policy", "uniform"])
    assert isinstance(fax.exception, InvalidArgument)  # the console script: "error: ..." and exit 2
    assert str(fax.exception).startswith("unknown channel 'fax'; the ledger has [") and "'email'" in str(fax.exception)
    for args in (["--floor", "0"], ["--floor", "1.5"], ["--seed", "-1"], ["--train-fraction", "1"]):
        res3 = runner.invoke(main, ["evaluate", "--dsjson", str(tmp_path / "log.dsjson"), "--policy", "uniform", *args])
        assert res3.exit_code == 2 and "Invalid value" in res3.output, (args, res3.output)
    # --channel with a dsjson file was ignored: every line was evaluated, the channel unchecked
    res4 = runner.invoke(main, ["evaluate", "--dsjson", str(tmp_path / "log.dsjson"),
                                "--policy", "uniform", "--channel", "no_such_channel"])  # fmt: skip
    assert res4.exit_code == 2 and "a dsjson file is evaluated whole" in res4.output, res4.output
    # too few decisions was click's "Error: ..." and exit 1, where every other refusal is the
    # console script's one line "error: ..." and exit 2
    (tmp_path / "one.dsjson").write_text(
        (tmp_path / "log.dsjson").read_text().splitlines()[0] + "\n", encoding="utf-8"
    )  # fmt: skip
    few = runner.invoke(main, ["evaluate", "--dsjson", str(tmp_path / "one.dsjson"),
                               "--policy", "uniform"])  # fmt: skip
    assert isinstance(few.exception, BanditEngineError), few.output
    assert str(few.exception) == "only 1 settled decisions to evaluate; at least 2 are needed"


# windows past their deadline that no expire closed yet; inactive decisions -------------------
def _open_windows_engine(aggregation: str = "first", default_reward: float = 0.0,
                         past: bool = True) -> tuple[Engine, ManualClock]:  # fmt: skip
    """40 decisions, every 4th redeemed (twice under "sum"), then (``past``) past every window
    with no ``expire`` run: a ledger between two runs of the service's expirer."""
    engine, clock = _uniform_engine(1, aggregation=aggregation, default_reward=default_reward)
    for k in range(40):
        d = engine.choose(f"m{k}", "email", {}, event_id=f"e{k}")
        if k % 4 == 0:
            engine.reward(d.event_id, 1.0, cost=0.0)
            if aggregation == "sum":
                engine.reward(d.event_id, 0.5, cost=0.0, reward_id=f"e{k}-2")
    if past:
        clock.advance(days=7, seconds=1)
    return engine, clock


def _read(engine: Engine) -> tuple[list[tuple[str, float]], list[tuple[str, float]], str]:
    buf = io.StringIO()
    engine.export_dsjson(buf)
    rows = [(r.event_id, r.reward) for r in from_engine(engine).rows]
    exported = [(r.event_id, r.reward) for r in from_dsjson(io.StringIO(buf.getvalue())).rows]
    return rows, exported, buf.getvalue()


@pytest.mark.parametrize(("aggregation", "default_reward", "mean"), [
    ("first", 0.0, 0.25), ("sum", 0.0, 0.375), ("first", 0.1, 0.25 + 0.75 * 0.1),
])  # fmt: skip
def test_windows_past_their_deadline_count_with_the_reward_expiry_will_give_them(
    aggregation: str, default_reward: float, mean: float
) -> None:
    """Before ``expire`` ran, the misses of closed windows were dropped while the redemptions
    stayed (10 decisions of 40, a mean of 1.0 instead of 0.25), and the export wrote the misses
    unlabeled (skipped when read back). Now both read what ``expire`` will write."""
    engine, _ = _open_windows_engine(aggregation, default_reward)
    assert {d.status for d in engine.ledger.decisions()} == ({"closed", "open"} if aggregation == "first" else {"open"})
    rows, exported, text = _read(engine)
    assert len(rows) == 40 and np.mean([r for _, r in rows]) == pytest.approx(mean)
    assert exported == rows and text.count('"_label_cost"') == 40
    assert engine.ledger.get_decision("e1").status == "open"  # read, not written
    assert engine.expire() == 30 if aggregation == "first" else 40
    assert _read(engine)[:2] == (rows, exported)  # what expire then wrote is what was read


def test_a_window_at_its_deadline_is_still_open() -> None:
    """A reward is still accepted at the deadline itself: the decision is not settled yet."""
    engine, clock = _open_windows_engine(past=False)
    d = engine.get_decision("e1")
    clock.set(d.deadline)
    assert engine.export_dsjson(io.StringIO()) == len(from_engine(engine)) == 10  # the redemptions
    clock.set(d.deadline + 1)
    assert engine.export_dsjson(io.StringIO()) == len(from_engine(engine)) == 40


def test_inactive_decisions_are_neither_evaluated_nor_exported() -> None:
    """The engine learns only from decisions that are learnable and active (an email never
    opened is not): those that expired inactive used to be evaluated, and exported, as misses."""
    engine, clock = _uniform_engine(2)
    for k in range(30):
        d = engine.choose(f"m{k}", "email", {}, event_id=f"e{k}", active=k % 3 != 0)
        if k % 3 == 1:
            engine.reward(d.event_id, 1.0)
    engine.activate("e3")  # activated later: learned from, so evaluated
    clock.advance(days=8)
    engine.expire()
    inactive = {d.event_id for d in engine.ledger.decisions() if not d.active}
    assert len(inactive) == 9
    rows, exported, _ = _read(engine)
    assert len(rows) == 21 and not {e for e, _ in rows} & inactive and "e3" in dict(rows)
    assert exported == rows
    assert np.mean([r for _, r in rows]) == pytest.approx(10 / 21)


# malformed dsjson -----------------------------------------------------------------------------
@pytest.mark.parametrize(("line", "message"), [
    ("[1, 2]", r"not a JSON object: '\[1, 2\]'"),
    ('"x"', r"not a JSON object"),
    ("{bad", r"not JSON \(Expecting property name enclosed in double quotes, column 2\)"),
    (_record(_label_cost=True), r"'_label_cost' \(-reward\) must be a finite number, got True"),
    (_record(_label_cost=float("nan")), r"'_label_cost' \(-reward\) must be a finite number, got nan"),
    (_record(_label_cost="-1"), r"'_label_cost' \(-reward\) must be a finite number, got '-1'"),
    (_record(_label_cost=1e308), r"'_label_cost' \(-reward\) must be between -1e\+12 and 1e\+12, "
                                 r"got 1e\+308$"),
    (_record(_label_cost=-10**300), r"'_label_cost' \(-reward\) must be between -1e\+12 and "
                                    r"1e\+12"),
    (_record(_label_probability=0.9), r"'_label_probability' must be the chosen action's probability, 0.5 "
                                      r"\(the first of 'p'\), got 0.9"),
    (_record(_label_probability=0), r"'_label_probability' must be the chosen action's probability"),
    (_record(_label_Action=1), r"'_label_Action' must be the 1-based chosen action, 2"),
    (_record(p=[0.5, 0.5, 0.5]), r"'p' must be probabilities summing to at most 1"),
    (_record(p=[0.0, 0.5, 0.5]), r"'p' must be .*, the chosen action's > 0, got \[0.0, 0.5, 0.5\]"),
    (_record(p=[float("nan"), 0.25, 0.25]), r"'p' must be probabilities"),
    (_record(EventId="e0"), r"EventId 'e0' is also on line 1: a decision is logged once"),
    (_record(c={"U": {}, "_multi": [{"A": {"offer": None}}, {"A": {"offer": "o1"}}]}, a=[2, 1], p=[0.5, 0.5]),
     r"'c._multi\[0\].A.offer' must be an offer id, got None"),
    (_record(c={"U": [1], "_multi": [{"A": {"offer": "o0"}}]}), r"'c.U' \(the context\) must be an object"),
    (_record(c={"U": {}, "_multi": [{"B": {}}]}), r"'c._multi' must list the eligible actions"),
    ('{"c": {"U": {"x": NaN}, "_multi": [{"A": {"offer": "o0"}}]}, "a": [1], "p": [1.0], '
     '"_label_cost": -1}', r"'c.U': context\['x'\] must be finite, got nan$"),
    (_record(c={"U": {"x": None}, "_multi": [{"A": {"offer": "o0"}}]}, a=[1], p=[1.0]),
     r"'c.U': context\['x'\] must be a number, string or bool, got None$"),
    (_record(c={"U": {"x": [1, 2]}, "_multi": [{"A": {"offer": "o0"}}]}, a=[1], p=[1.0]),
     r"'c.U': context\['x'\] must be a number"),
    (_record(c={"U": {"x": 10**400}, "_multi": [{"A": {"offer": "o0"}}]}, a=[1], p=[1.0]),
     r"'c.U': context\['x'\] must be an integer of magnitude <= 2\*\*53"),
    (_record(c={"U": {"x\ud800": 1}, "_multi": [{"A": {"offer": "o0"}}]}, a=[1], p=[1.0]),
     r"'c.U': context keys must be non-empty strings"),
    (_record(c={"U": {}, "_multi": [{"A": {"offer": "o0", "kind": "other"}},
                                    {"A": {"offer": "o1"}}, {"A": {"offer": "o2"}}]}),
     r"offer 'o0' has other features \('c._multi\[0\].A'\) than on line 1: "
     r"\{'kind': 'other'\} against \{\}"),
    ("[" * 100_000 + "]" * 100_000, r"not a dsjson record \(JSON nested too deeply to read\)"),
])  # fmt: skip
def test_malformed_dsjson_lines_are_errors_naming_the_line(line: str | dict, message: str) -> None:
    """They were skipped (not an object), read as a reward (``true``), counted twice (a
    repeated EventId), or read as the offer "None"; or they failed later in the estimators
    with no line to look at (a wrong propensity, a NaN reward). A context value a choose would
    refuse (NaN, a list, an integer beyond 2**53) read as a feature, silently moving every
    estimate, or crashed with a traceback; an offer's features on a later line were ignored;
    JSON nested 100 000 deep was a RecursionError traceback."""
    text = line if isinstance(line, str) else json.dumps(line)
    with pytest.raises(InvalidArgument, match="^dsjson line 2: " + message):
        from_dsjson([json.dumps(_record(EventId="e0")), text])


def test_a_huge_label_is_a_one_line_error_and_the_largest_allowed_one_evaluates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A finite but huge label (1e308) read as a reward: every estimate came out -3e306 with
    an infinite or NaN interval, and numpy overflow warnings on stderr."""
    lines = [json.dumps(_record(EventId=f"e{k}", _label_cost=-float(k % 2))) for k in range(20)]
    path = tmp_path / "log.json"
    path.write_text("\n".join([*lines[:7], json.dumps(_record(EventId="big", _label_cost=1e308)),
                               *lines[7:]]) + "\n")  # fmt: skip
    args = ("evaluate", "--dsjson", str(path), "--policy", "uniform")
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert (code, out) == (2, "")
    assert err == ("error: dsjson line 8: '_label_cost' (-reward) must be between -1e+12 and "
                   "1e+12, got 1e+308\n")  # fmt: skip
    edge = [*lines, json.dumps(_record(EventId="edge", _label_cost=-1e12))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = from_dsjson(edge)
        train, test = data.split(0.3)
        rep = evaluate(test, policy_target(PolicySpec("uniform"), train))
    for e in rep.estimates.values():
        assert all(np.isfinite([e.value, e.se, e.lo, e.hi, e.ess])), e
        assert e.lo <= e.value <= e.hi


def test_estimators_are_computed_stably_for_huge_rewards_and_weights() -> None:
    """Per-row terms were squared as they were: from |term| ~ 1e154 the standard error (and
    for SNIPS the weights' sum) overflowed to inf, or NaN, with numpy warnings. Estimates are
    linear in the rewards, so scaling the rewards scales value, se and interval exactly."""
    data, x = synthetic(4, 400)
    pi = np.array([target(r)[r.chosen] for r in data.rows])
    p, r = data.propensity, data.reward
    q = np.full(len(data), 0.2)
    for big in (1e150, 1e200, 1e300):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for fn, args in ((ips, ()), (snips, ()), (dr, (q, q))):
                one = fn(pi, p, r, *(a for a in args))
                scaled = fn(pi, p, r * big, *(a * big for a in args))
                assert scaled.value == pytest.approx(one.value * big, rel=1e-12), (fn, big)
                assert scaled.se == pytest.approx(one.se * big, rel=1e-12), (fn, big)
                assert np.isfinite([scaled.lo, scaled.hi]).all()
                assert scaled.ess == pytest.approx(one.ess)
            # tiny propensities, huge weights: SNIPS and the ESS do not depend on their scale
            tiny = snips(pi, p * 1e-300, r)
            assert tiny.value == pytest.approx(snips(pi, p, r).value, rel=1e-12)
            assert tiny.ess == pytest.approx(ips(pi, p, r).ess, rel=1e-12)
    # a term a float cannot hold (a weight of 1e300 on a reward of 1e10) is an error, not an inf
    with pytest.raises(InvalidArgument, match=r"^ips: the estimate overflows a float"):
        ips(np.array([1.0, 0.5]), np.array([1e-300, 0.5]), np.array([1e10, 1.0]))


def test_unlabeled_dsjson_lines_are_counted_and_the_cli_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    labelled = [json.dumps(_record(EventId=f"e{k}", _label_cost=-float(k % 2))) for k in range(6)]
    unlabeled = {k: v for k, v in _record(EventId="u1").items() if not k.startswith("_label")}
    data = from_dsjson([*labelled, json.dumps(unlabeled), ""])
    assert (len(data), data.unlabeled) == (6, 1)
    path = tmp_path / "log.json"
    path.write_text("\n".join([*labelled, json.dumps(unlabeled)]) + "\n")
    code, out, err = _cli(monkeypatch, capsys, "evaluate", "--dsjson", str(path), "--policy", "uniform")
    assert code == 0 and "| ips |" in out, err
    assert err.startswith("note: skipped 1 unlabeled lines (no '_label_cost', no outcome yet)"), err


def test_files_that_are_not_utf8_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """A Latin-1 dsjson file, or a database given as an archive, gave a UnicodeDecodeError
    traceback. A leading BOM is fine."""
    good = json.dumps(_record(EventId="e0")) + "\n" + json.dumps(_record(EventId="e1")) + "\n"
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(good.encode() + json.dumps(_record(EventId="é"), ensure_ascii=False).encode("latin-1") + b"\n")
    code, out, err = _cli(monkeypatch, capsys, "evaluate", "--dsjson", str(latin1), "--policy", "uniform")
    assert (code, err.strip()) == (2, f"error: dsjson line 3: not UTF-8 text (invalid continuation byte); "
                                      f"is {str(latin1)!r} a dsjson file?")  # fmt: skip
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + good.encode())
    assert len(from_dsjson(bom)) == 2
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Engine.open(url).close()
    code, out, err = _cli(monkeypatch, capsys, "--database-url", url, "evaluate", "--policy", "uniform",
                          "--archive", str(tmp_path / "ledger.db"))  # fmt: skip
    assert code == 2 and err.startswith(f"error: {tmp_path / 'ledger.db'}: archive: not UTF-8 text "), err
    assert len(err.strip().splitlines()) == 1


def test_a_fixed_candidate_naming_an_offer_the_logs_do_not_have_is_an_error(tmp_path: Path) -> None:
    """It evaluated uniform random over the eligible offers instead."""
    path = tmp_path / "log.json"
    path.write_text("".join(json.dumps(_record(EventId=f"e{k}")) + "\n" for k in range(4)))
    res = CliRunner().invoke(main, ["evaluate", "--dsjson", str(path), "--policy",
                                    '{"family": "fixed", "params": {"offers": ["o1", "zz"]}}'])  # fmt: skip
    assert isinstance(res.exception, InvalidArgument), res.output
    assert str(res.exception) == "fixed: unknown offers ['zz']; the logs have ['o0', 'o1', 'o2']"
    ok = CliRunner().invoke(main, ["evaluate", "--dsjson", str(path), "--policy",
                                   '{"family": "fixed", "params": {"offers": ["o1"]}}'])  # fmt: skip
    assert ok.exit_code == 0, ok.output


def test_too_few_decisions_left_after_the_training_share_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two lines, or 30 with --train-fraction 0.99, evaluated one decision (an unbounded
    interval, DM from a model fitted on nothing) and exited 0."""
    path = tmp_path / "log.json"
    path.write_text("".join(json.dumps(_record(EventId=f"e{k}")) + "\n" for k in range(30)))
    code, out, err = _cli(monkeypatch, capsys, "evaluate", "--dsjson", str(path), "--policy",
                          "uniform", "--train-fraction", "0.99")  # fmt: skip
    assert (code, out) == (2, ""), out
    assert err.strip() == ("error: only 1 of the 30 settled decisions are left to evaluate once "
                           "the candidate learns from the first 0.99 of them; at least 2 are "
                           "needed (lower --train-fraction)")  # fmt: skip
    code, out, err = _cli(monkeypatch, capsys, "evaluate", "--dsjson", str(path), "--policy",
                          "uniform", "--train-fraction", "0.9")  # fmt: skip
    assert code == 0 and "on 3 decisions (learned from 27)" in out, err


def test_the_cli_notes_what_the_logs_cannot_show_a_candidate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A candidate that scores with the member x offer history (lin_ts), evaluated on the logs
    of a policy that does not record it (uniform), was evaluated as if every member were new
    to every offer, without a word; so was vw's member id on a dsjson file, which has none."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    clock = ManualClock()
    engine = Engine.open(url, clock=clock, seed=3)
    for oid in ("o1", "o2"):
        engine.add_offer(Offer(oid, channels=["email"], cost=1.0))
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("uniform")))
    for k in range(40):
        if k == 20:  # half the log from a policy that records the history
            engine.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts")))
        d = engine.choose(f"m{k % 4}", "email", {"tier": "gold"}, event_id=f"e{k}")
        engine.reward(d.event_id, float(k % 3 == 0))
        clock.advance(seconds=60)
    clock.advance(days=8)
    engine.close()
    code, out, err = _cli(monkeypatch, capsys, "--database-url", url, "evaluate", "--policy",
                          "lin_ts", "--train-fraction", "0.25")  # fmt: skip
    assert code == 0, err
    assert err.strip() == ("note: 10 of 30 decisions were logged without the member x offer "
                           "history (exposures and redemptions of each offer) that lin_ts scores "
                           "with: their logging policy does not record it. It is evaluated on "
                           "them as if every member were new to every offer, not as it would "
                           "decide live")  # fmt: skip
    code, out, err = _cli(monkeypatch, capsys, "--database-url", url, "evaluate", "--policy",
                          "thompson")  # fmt: skip
    assert (code, err) == (0, "")  # a candidate without history features: nothing to say
    path = tmp_path / "log.json"
    path.write_text("".join(json.dumps(_record(EventId=f"e{k}")) + "\n" for k in range(6)))
    code, out, err = _cli(monkeypatch, capsys, "evaluate", "--dsjson", str(path), "--policy",
                          '{"family": "vw", "params": {"member_id": true}}')  # fmt: skip
    assert code == 0, err
    assert err.splitlines() == [
        "note: 3 of 3 decisions were logged without the member x offer history (exposures and "
        "redemptions of each offer) that vw scores with: their logging policy does not record "
        "it. It is evaluated on them as if every member were new to every offer, not as it "
        "would decide live",
        "note: the logs carry no member ids (a dsjson file does not): vw's member-id features "
        "see every decision as one member's"]  # fmt: skip


def test_an_edited_archive_line_is_a_one_line_error(tmp_path: Path) -> None:
    """An archived decision the engine could not have logged crashed the evaluation (an offer
    not among its eligible ones: ValueError; a null context value: TypeError), failed with no
    line (a probability of 5), or was learned from (a reward of 1e300)."""
    from bandit_engine.ledger.records import Decision, Pruned, read_archive

    d = Decision("e", "m", "email", "treatment", "o1", 0.5, "uniform", 0, 0, 1,
                 eligible=("o1", "o2"), pmf=(0.5, 0.5), status="closed", reward=1.0,
                 context={"tier": "gold"}, learnable=True)  # fmt: skip
    good = json.dumps(Pruned(d).to_json())
    assert [p.decision for p in read_archive([good])] == [d]
    for change, message in [
        ({"offer_id": "zz"}, "offer 'zz' is not among its eligible offers ['o1', 'o2']"),
        ({"context": {"x": None}}, "'context': context['x'] must be a number, string or "
                                   "bool, got None"),
        ({"probability": 5.0}, "'probability' must be in (0, 1], got 5.0"),
        ({"reward": 1e300}, "'reward' must be a number between -1e+12 and 1e+12, got 1e+300"),
        ({"reward": 10**400}, "'reward' must be a number between -1e+12 and 1e+12, got 1000"),
        ({"pmf": [0.5]}, "'pmf' must hold one probability per eligible offer, got [0.5]"),
        ({"offer_context": {"o1": {"seen": "x"}}}, "'offer_context' must map offers to"),
    ]:
        rec = json.loads(good)
        rec["decision"].update(change)
        with pytest.raises(InvalidArgument) as exc:
            list(read_archive([good.replace('"e"', '"e0"'), json.dumps(rec)]))
        assert exc.value.message.startswith(f"archive line 2: {message}"), (change, exc.value)


def test_the_dsjson_export_keeps_each_offers_member_history_features() -> None:
    """A candidate that reads member x offer history (``lin_ts``, ``shared_ts``, ``vw``) saw it
    when evaluated from the ledger but not from the export, which dropped it: it is now each
    action's namespace ``H`` (the engine's VW family's name for it), read back by from_dsjson."""
    clock = ManualClock()
    engine = Engine.open("memory://", clock=clock, seed=4)
    for oid in ("o1", "o2", "o3"):
        engine.add_offer(Offer(oid, channels=["email"], cost=1.0, features={"kind": oid}))
    engine.set_channel(ChannelConfig("email", policy=PolicySpec("lin_ts")))
    for k in range(60):
        d = engine.choose(f"m{k % 5}", "email", {"tier": "gold"}, event_id=f"e{k}")
        if k % 3 == 0:
            engine.reward(d.event_id, 1.0)
        clock.advance(seconds=3600)
    clock.advance(days=8)
    buf = io.StringIO()
    assert engine.export_dsjson(buf) == 60
    ledger, exported = from_engine(engine), from_dsjson(io.StringIO(buf.getvalue()))
    assert [r.offer_context for r in exported.rows] == [r.offer_context for r in ledger.rows]
    assert sum(bool(oc) for r in exported.rows for oc in r.offer_context) > 100
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert set(line["c"]["_multi"][0]["H"]) >= {"seen", "redeemed", "days_since_seen"}
    assert line["c"]["_multi"][0]["A"]["kind"] == "o1"
    tgt = policy_target(PolicySpec("lin_ts"), ledger.split(0.5)[0], seed=1)
    tgt_json = policy_target(PolicySpec("lin_ts"), exported.split(0.5)[0], seed=1)
    test_rows = zip(ledger.split(0.5)[1].rows, exported.split(0.5)[1].rows, strict=True)
    assert all(np.allclose(tgt(a), tgt_json(b)) for a, b in test_rows)  # the same candidate either way
