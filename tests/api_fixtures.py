"""Fixtures and helpers for the HTTP API tests (``tests/test_api_*.py``)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from bandit_engine import ChannelConfig, ManualClock, Offer
from bandit_engine.api import create_app
from bandit_engine.engine import Engine
from bandit_engine.governance import Governance

ROLES = ("decide", "analyst", "admin", "approver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_server(proc: subprocess.Popen[Any]) -> None:
    """Stop a server started by a test: SIGTERM (gunicorn drains), SIGKILL after 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class Api:
    app: Flask
    client: FlaskClient
    keys: dict[str, str]
    clock: ManualClock

    @property
    def engine(self) -> Engine:
        return self.app.extensions["bandit_engine"]

    @property
    def gov(self) -> Governance:
        return self.app.extensions["bandit_engine.governance"]

    def call(self, method: str, path: str, role: str | None = None, json: Any = None,
             data: bytes | str | None = None, key: str | None = None) -> Any:  # fmt: skip
        headers = {}
        k = key if key is not None else (self.keys[role] if role else None)
        if k is not None:
            headers["Authorization"] = f"Bearer {k}"
        kwargs: dict[str, Any] = {"headers": headers}
        if data is not None:
            kwargs["data"] = data
            kwargs["content_type"] = "application/json"
        elif json is not None:
            kwargs["json"] = json
        return self.client.open(path, method=method, **kwargs)

    def state(self) -> dict[str, Any]:
        """Everything a rejected request must leave unchanged."""
        eng = self.engine
        states = eng.ledger.offer_states()
        return {
            "offers": {o.offer_id: o.to_dict() for o in eng.offers()},
            "counters": {k: (s.spent_cents, s.committed_cents, s.impressions) for k, s in states.items()},
            "decisions": eng.ledger.count_decisions(),
            "channels": {k: c.to_dict() for k, c in eng.channels().items()},
            "settings": eng.ledger.settings(),
            "changes": [c.to_dict() for c in self.gov.changes()],
            "audit": len(self.gov.audit_log(limit=5000)),
        }


def make_api(tmp_path: Any, *, sync_interval: float = 0.0, url: str | None = None) -> Api:
    clock = ManualClock(start_ms=1_767_225_600_000)
    app = create_app({
        "DATABASE_URL": url or f"sqlite:///{tmp_path / 'api.db'}",
        "SYNC_INTERVAL": sync_interval, "CLOCK": clock, "SEED": 11,
    })  # fmt: skip
    app.config["TESTING"] = True
    gov = app.extensions["bandit_engine.governance"]
    keys = {role: gov.create_key(role, name=f"test-{role}")[0] for role in ROLES}
    return Api(app, app.test_client(), keys, clock)


def seed(api: Api) -> None:
    """Two plain offers and one budgeted, capped offer on email, one budgeted offer on sms with
    one open decision; one open decision ``ev-1`` on email; site and in_app learn one model
    (``model_group`` ``apps``)."""
    eng = api.engine
    eng.set_channels([ChannelConfig("site", model_group="apps"), ChannelConfig("in_app", model_group="apps")])
    eng.add_offer(Offer("plain-a", ["email", "push"], cost=1.0, features={"category": "home"}))
    eng.add_offer(Offer("plain-b", ["email"], cost=2.0, features={"category": "toys"}))
    eng.add_offer(Offer("capped", ["email"], cost=1.0, budget=50.0, max_impressions=500,
                        features={"category": "beauty"}))  # fmt: skip
    eng.add_offer(Offer("solo", ["sms"], cost=1.0, budget=50.0, features={"category": "grocery"}))
    r = api.call("POST", "/v1/choose", "decide", json={"member_id": "m-1", "channel": "sms"})
    assert r.status_code == 200 and r.json["offer_id"] == "solo", r.json
    r = api.call("POST", "/v1/choose", "decide",
                 json={"member_id": "m-1", "channel": "email", "event_id": "ev-1"})  # fmt: skip
    assert r.status_code == 200 and r.json["offer_id"] is not None, r.json


@pytest.fixture(name="api")
def api_fixture(tmp_path: Any) -> Iterator[Api]:
    a = make_api(tmp_path)
    seed(a)
    try:
        yield a
    finally:
        a.engine.ledger.close()


def seeded_api(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Api]:
    """A seeded app for a module-scoped fixture (``yield from seeded_api(...)``); closes the
    ledger afterwards."""
    a = make_api(tmp_path_factory.mktemp(name))
    seed(a)
    try:
        yield a
    finally:
        a.engine.ledger.close()
