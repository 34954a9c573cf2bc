"""The service's CLI commands: keys create|list|revoke, learner."""

from __future__ import annotations

from click.testing import CliRunner

from bandit_engine import Offer
from bandit_engine.api import open_engine
from bandit_engine.cli import main
from bandit_engine.governance import Governance
from bandit_engine.ledger.sql import make_engine


def test_keys_create_list_revoke(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'k.db'}"
    runner = CliRunner()
    r = runner.invoke(main, ["--database-url", url, "keys", "create", "--role", "analyst", "--name", "bi"])
    assert r.exit_code == 0, r.output
    key = r.output.strip()
    assert key.startswith("bek_") and "\n" not in key  # the key alone on stdout
    gov = Governance(make_engine(url))
    assert gov.authenticate(key).role == "analyst"
    listed = runner.invoke(main, ["--database-url", url, "keys", "list"]).output
    assert "analyst\tbi" in listed and key not in listed  # never shown again
    kid = gov.list_keys()[0].key_id
    assert runner.invoke(main, ["--database-url", url, "keys", "revoke", str(kid)]).exit_code == 0
    assert Governance(make_engine(url)).authenticate(key) is None
    assert "revoked" in runner.invoke(main, ["--database-url", url, "keys", "list"]).output
    bad = runner.invoke(main, ["--database-url", url, "keys", "create", "--role", "root"])
    assert bad.exit_code != 0


def test_learner_publishes_a_snapshot(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    eng = open_engine(url, seed=1)
    eng.add_offer(Offer("a", ["email"], cost=1.0))
    eng.add_offer(Offer("b", ["email"], cost=1.0))
    for i in range(5):
        d = eng.choose(f"m-{i}", "email")
        eng.reward(d.event_id, 1.0)
    assert eng.ledger.latest_snapshot("email") is None
    r = CliRunner().invoke(main, ["--database-url", url, "learner", "--once"])
    assert r.exit_code == 0, r.output
    snap = eng.ledger.latest_snapshot("email")
    assert snap is not None and snap.feedback_seq == eng.ledger.last_feedback_seq() and snap.version >= 5
    # a fresh worker restores that snapshot and serves its version without replaying
    fresh = open_engine(url, seed=1)
    assert fresh.choose("m-new", "email").policy_version == snap.version
    fresh.ledger.close()
    eng.ledger.close()
