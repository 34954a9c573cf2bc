"""Building a model from the feedback log (a start, a restart, a policy change): it never stops
the other channels deciding, a choose waits for it at most ``model_wait``, and a checkpoint
that cannot be restored is replayed around, not served as an error."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bandit_engine import Engine, Offer, PolicySpec
from bandit_engine.engine import EngineConfig
from bandit_engine.errors import InvalidArgument, ModelLoading, StorageError
from bandit_engine.ledger.sql import SqlLedger
from bandit_engine.policies.registry import make_policy
from tests.api_fixtures import make_api, seed


def _build_threads(model: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"build-{model}"]


def _seeded(url: str) -> Engine:
    """An engine with offers on email and push, and rewards on both."""
    eng = Engine.open(url, seed=5)
    for ch in ("email", "push"):
        eng.add_offer(Offer(f"{ch}-a", [ch], cost=1.0, features={"category": "home"}))
        eng.add_offer(Offer(f"{ch}-b", [ch], cost=1.0, features={"category": "toys"}))
        for i in range(30):
            d = eng.choose(f"m{i}", ch)
            eng.reward(d.event_id, float(i % 3 == 0))
    return eng


class _SlowLog:
    """A real ledger whose feedback-log reads take ``delay`` seconds while ``slow`` is set: a
    log long enough that replaying it takes seconds, without writing one."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.slow = threading.Event()
        self.delay = 0.0
        self.down = False  # every log read fails, as with the database away
        self.reads = 0

    def feedback_after(self, seq: int, limit: int) -> Any:
        self.reads += 1
        if self.down:
            raise StorageError("ledger database error: the database is away")
        if self.slow.is_set():
            time.sleep(self.delay)
        return self.inner.feedback_after(seq, limit)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextmanager
def _slow_engine(tmp_path: Path, model_wait: float | None = None) -> Iterator[tuple[Any, ...]]:
    """(writer, slow, eng): a seeded SQLite ledger, a serving-like engine reading it through a
    :class:`_SlowLog`, and the engine that wrote it; every one closed afterwards."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    writer = _seeded(url)
    slow = _SlowLog(SqlLedger(url))
    config = EngineConfig(seed=5, learn_in_process=False, model_wait=model_wait)
    eng = Engine(slow, config=config)  # type: ignore[arg-type]
    try:
        yield writer, slow, eng
    finally:
        slow.slow.clear()
        eng.ledger.close()
        writer.ledger.close()


def test_a_model_being_built_blocks_neither_other_channels_nor_its_own_for_long(tmp_path) -> None:
    """A rebuild replayed the log under the engine's lock: every choose on every channel waited
    for it (a 240 000-event rebuild: every request 60 s, then a 500 as gunicorn killed the
    worker, whose replacement started the rebuild over). Now the other channels decide as
    usual, and a choose on the channel being built gets ModelLoading after ``model_wait``."""
    with _slow_engine(tmp_path, 0.3) as (writer, slow, eng):
        eng.sync()  # both models built, quickly
        # a policy change: email's model must be built again, from the whole log
        changed = PolicySpec("thompson", {"prior_alpha": 2.0})
        writer.set_channel(dataclasses.replace(writer.channel("email"), policy=changed))
        eng._refresh_catalog(force=True)
        slow.delay = 2.0
        slow.slow.set()
        syncing = threading.Thread(target=eng.sync)
        syncing.start()
        time.sleep(0.2)  # the sync is inside email's build
        t0 = time.monotonic()
        assert eng.choose("m-push", "push").offer_id is not None
        assert time.monotonic() - t0 < 1.0  # not the 2 s the build takes
        t0 = time.monotonic()
        with pytest.raises(ModelLoading, match="retry"):
            eng.choose("m-email", "email")
        assert 0.25 < time.monotonic() - t0 < 1.5
        syncing.join(10)
        assert not syncing.is_alive()
        slow.slow.clear()
        d = eng.choose("m-email", "email")  # built: served
        assert d.offer_id is not None
        assert eng.policy("email").serialize() == writer.policy("email").serialize()


def test_without_model_wait_a_choose_builds_its_model_and_waits_for_it(tmp_path: Path) -> None:
    """The embedded default: nothing to retry, the first choose pays for the build."""
    with _slow_engine(tmp_path) as (writer, slow, eng):
        slow.delay = 0.5
        slow.slow.set()
        t0 = time.monotonic()
        assert eng.choose("m", "email").offer_id is not None
        assert time.monotonic() - t0 >= 0.5
        assert eng.policy("email").serialize() == writer.policy("email").serialize()


@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_checkpoint_that_cannot_be_restored_is_replayed_around(ledger_url, damage) -> None:
    """A corrupt latest snapshot failed every choose on its channel (a 500 for a truncated
    one, a 422 "not a bandit_engine policy snapshot" for an overwritten one) and stopped the
    background sync of every channel. The model is rebuilt from the log instead."""
    if ledger_url == "memory://":
        pytest.skip("two engines share a database, not a process's memory")
    writer = _seeded(ledger_url)
    try:
        writer.snapshot()
        truth = writer.policy("email").serialize()  # learned in process: what a replay gives
        snap = writer.ledger.latest_snapshot("email")
        assert snap is not None
        data = snap.data[:-7] if damage == "truncated" else b"\x00" * len(snap.data)
        writer.ledger.save_snapshot(dataclasses.replace(snap, data=data))
        with pytest.raises((ValueError, InvalidArgument)):  # it is unusable indeed
            make_policy(writer.channel("email").policy, seed=5).restore(data)
        reader = Engine.open(ledger_url, seed=5, learn_in_process=False)
        try:
            assert reader.choose("m-after", "email").offer_id is not None
            assert reader.policy("email").serialize() == truth
            reader.sync()  # loads every channel's model: it failed on email's checkpoint
            d = writer.choose("m-push", "push")
            writer.reward(d.event_id, 1.0)
            before = reader.policy("push").version
            reader.sync()  # the other channels learn
            assert reader.policy("push").version == before + 1
        finally:
            reader.ledger.close()
    finally:
        writer.ledger.close()


def test_a_build_of_a_policy_changed_meanwhile_is_dropped(tmp_path: Path) -> None:
    """A background build that started before a policy change installed the old policy's model
    over the new one when it ended: chooses then waited for a rebuild, and a checkpoint written
    meanwhile stored the old policy as the channel's latest."""
    with _slow_engine(tmp_path, 0.05) as (writer, slow, eng):
        slow.delay = 1.0
        slow.slow.set()
        with pytest.raises(ModelLoading):  # a background build of thompson starts
            eng.choose("m", "email")
        (old_build,) = _build_threads("email")
        changed = PolicySpec("lin_ts", {"dim": 16})
        writer.set_channel(dataclasses.replace(writer.channel("email"), policy=changed))
        eng._refresh_catalog(force=True)
        slow.slow.clear()
        new = eng.policy("email")  # built in this thread, quickly
        assert new.family == "lin_ts"
        old_build.join(10)
        assert not old_build.is_alive()
        assert eng.policy("email") is new  # not replaced by the thompson build
        assert eng.snapshot() == 1  # the one model this engine has loaded: the new one
        assert slow.latest_snapshot("email").policy_name == eng._spec_key(eng.channel("email"))


def test_a_failing_build_is_one_error_not_a_storm_of_builds(tmp_path: Path) -> None:
    """With model_wait set, a build that failed (the database away) was started again and again
    until the deadline (11 000 builds in 10 s, a logged traceback each) and the caller got
    ModelLoading, "retry in a few seconds", whatever the cause. It gets the build's error."""
    with _slow_engine(tmp_path, 2.0) as (writer, slow, eng):
        slow.down = True
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="away"):
            eng.choose("m", "email")
        assert time.monotonic() - t0 < 1.5 and slow.reads == 1
        slow.down = False
        assert eng.choose("m", "email").offer_id is not None  # the next choose builds again


def test_close_stops_the_builds_running_in_the_background(tmp_path: Path) -> None:
    """A build left running after close() opened a connection once the ledger had closed its
    own (a PostgreSQL backend left open)."""
    with _slow_engine(tmp_path, 0.05) as (writer, slow, eng):
        slow.delay = 0.5
        slow.slow.set()
        with pytest.raises(ModelLoading):
            eng.choose("m", "email")
        (build,) = _build_threads("email")
        eng.close()
        assert not build.is_alive()
        assert "email" not in eng._policies  # it stopped, and installed nothing


@pytest.mark.parametrize("stored", [
    {"family": "lin_ts", "params": {"dim": 4096}},  # parameters a newer version bounds
    {"family": "retired_family", "params": {}},  # a family this process does not register
], ids=["out_of_bounds", "unknown_family"])  # fmt: skip
def test_a_stored_policy_that_cannot_be_built_is_the_servers_error(tmp_path: Path, stored) -> None:
    """A channel whose stored policy this process cannot build (written by another version, or
    by a process that registered a plugin family) answered every choose with 422
    ``invalid_argument`` or ``unknown_policy``, blaming a request that had nothing wrong. It is
    a 503 ``policy_unavailable`` that names the cause and the fix; other channels serve on, and
    once an admin sets a valid policy the channel serves again."""
    url = f"sqlite:///{tmp_path / 'api.db'}"
    first = make_api(tmp_path, url=url)
    seed(first)
    email = first.engine.channel("email")
    first.engine.ledger.put_channels([dataclasses.replace(email, policy=PolicySpec(**stored))])
    first.engine.ledger.close()
    api = make_api(tmp_path, url=url)  # a restart on the stored catalog
    try:
        before = api.state()
        r = api.call("POST", "/v1/choose", "decide", json={"member_id": "m-2", "channel": "email"})
        assert r.status_code == 503, r.json
        assert r.json["error"]["code"] == "policy_unavailable"
        message = r.json["error"]["message"]
        assert stored["family"] in message and "PUT /v1/channels/email" in message
        assert api.state() == before
        r = api.call("POST", "/v1/choose", "decide", json={"member_id": "m-2", "channel": "sms"})
        assert r.status_code == 200, r.json
        r = api.call("PUT", "/v1/channels/email", "admin", json={"policy": {"family": "thompson"}})
        assert r.status_code == 200, r.json
        r = api.call("POST", "/v1/choose", "decide", json={"member_id": "m-2", "channel": "email"})
        assert r.status_code == 200 and r.json["offer_id"] is not None, r.json
    finally:
        api.engine.ledger.close()
