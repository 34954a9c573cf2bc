"""The service's CLI commands: keys create|list|revoke, learner, demo (a real server)."""

from __future__ import annotations

import subprocess
import sys
import time

import requests
from click.testing import CliRunner

from bandit_engine import Offer
from bandit_engine.api import open_engine
from bandit_engine.cli import main
from bandit_engine.governance import Governance
from bandit_engine.ledger.sql import make_engine
from tests.api_fixtures import free_port, stop_server


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


def _demo(url: str, port: int) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start `bandit-engine demo` and read the keys it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bandit_engine.cli", "--database-url", url, "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    keys: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("bek_"):
            keys[parts[0]] = parts[1]
        if line.startswith("serving on"):
            break
    for _ in range(100):
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, keys
        except requests.RequestException:
            time.sleep(0.1)
    stop_server(proc)
    raise AssertionError("demo server did not come up")


def test_demo_serves_the_seeded_catalog_and_a_restart_replaces_its_keys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    base = None
    proc, keys = _demo(url, port := free_port())
    try:
        assert set(keys) == {"decide", "analyst", "admin", "approver"}
        base = f"http://127.0.0.1:{port}"
        h = {"Authorization": f"Bearer {keys['decide']}"}
        d = requests.post(f"{base}/v1/choose", json={"member_id": "m1", "channel": "email"}, headers=h).json()
        assert d["offer_id"] in {"welcome-5", "home-10", "fashion-15"}  # the demo's email offers
        assert requests.post(f"{base}/v1/reward", json={"event_id": d["event_id"], "reward": 1},
                             headers=h).json()["status"] == "recorded"  # fmt: skip
        metrics = requests.get(f"{base}/metrics").text
        assert 'bandit_engine_decisions_total{channel="email",group="' in metrics
    finally:
        stop_server(proc)
    proc, new_keys = _demo(url, port := free_port())
    try:
        base = f"http://127.0.0.1:{port}"
        old = requests.get(f"{base}/v1/offers", headers={"Authorization": f"Bearer {keys['analyst']}"})
        assert old.status_code == 401  # the previous start's keys were revoked
        offers = requests.get(f"{base}/v1/offers", headers={"Authorization": f"Bearer {new_keys['analyst']}"}).json()
        assert len(offers["offers"]) == 5  # seeded once, not twice
        assert sum(o["spent"] for o in offers["offers"]) > 0  # the first run's reward is kept
    finally:
        stop_server(proc)
