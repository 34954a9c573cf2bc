"""A serving worker's background policy sync (``bandit_engine.api.sync.Syncer``), in process.

The multi-process test (``test_api_multiprocess.py``) covers the served path end to end; here
the thread's behaviour is pinned down: it learns with no request to drive it, survives the
database failing under it (counted on ``/metrics``), and stops."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable

import pytest

from bandit_engine import ChannelConfig, Engine, Offer, PolicySpec
from bandit_engine.api import create_app
from bandit_engine.api.sync import Syncer


def _until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bandit-engine-sync"]


def test_a_worker_learns_in_the_background_and_survives_a_database_failure(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'sync.db'}"
    writer = Engine.open(url, seed=11)  # learns in process: the reference model
    app = create_app({"DATABASE_URL": url, "SYNC_INTERVAL": 0.05, "SEED": 11})
    eng = app.extensions["bandit_engine"]
    syncer: Syncer = app.extensions["bandit_engine.syncer"]
    registry = app.extensions["bandit_engine.metrics"].registry
    try:
        for i, cat in enumerate(("home", "toys", "beauty")):
            writer.add_offer(Offer(f"o{i}", ["email"], cost=1.0, features={"category": cat}))
        before = len(_sync_threads())
        syncer.maybe_sync()  # what a choose calls: starts the thread, does not sync itself
        syncer.maybe_sync()
        assert len(_sync_threads()) == before + 1

        def rewards(n: int, start: int) -> None:
            for i in range(start, start + n):
                d = writer.choose(f"m{i % 9}", "email", {"tier": ("gold", "silver")[i % 2]})
                writer.reward(d.event_id, float(i % 3 == 0))

        def caught_up() -> bool:
            return eng.policy("email").serialize() == writer.policy("email").serialize()

        rewards(40, 0)
        assert _until(caught_up), "no request was made: only the thread can have learned"
        assert eng.policy("email").version == 40

        with sqlite3.connect(tmp_path / "sync.db") as db:  # the log goes away under the thread
            db.execute("ALTER TABLE feedback RENAME TO feedback_away")
        assert _until(lambda: (registry.get_sample_value("bandit_engine_background_failures_total", {"task": "sync"}) or 0) >= 2)
        with sqlite3.connect(tmp_path / "sync.db") as db:
            db.execute("ALTER TABLE feedback_away RENAME TO feedback")
        rewards(25, 40)
        assert _until(caught_up), "the thread kept going after the failures"
        assert eng.policy("email").version == 65
    finally:
        syncer.stop()
        eng.ledger.close()
        writer.ledger.close()
    assert len(_sync_threads()) == before


def test_sync_interval_zero_syncs_in_the_request_and_starts_no_thread(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'sync0.db'}"
    writer = Engine.open(url, seed=3)
    app = create_app({"DATABASE_URL": url, "SYNC_INTERVAL": 0, "SEED": 3})
    eng = app.extensions["bandit_engine"]
    try:
        writer.add_offer(Offer("o1", ["email"], cost=1.0, features={"category": "home"}))
        d = writer.choose("m1", "email")
        writer.reward(d.event_id, 1.0)
        before = len(_sync_threads())
        app.extensions["bandit_engine.syncer"].maybe_sync()
        assert eng.policy("email").version == 1  # learned at once, in this thread
        assert len(_sync_threads()) == before
    finally:
        eng.ledger.close()
        writer.ledger.close()
    with pytest.raises(ValueError):
        Syncer(eng, -1.0)


@pytest.mark.parametrize("expire_interval", [0.1, 0.0])
def test_a_worker_closes_due_reward_windows_in_the_background(tmp_path, clock, expire_interval) -> None:
    """With no request and no cron job, the worker's thread closes windows that have passed:
    default reward, reservation back to the budget, the miss learned; a window still open is
    left alone, a failure is counted and retried. ``EXPIRE_INTERVAL = 0`` closes nothing."""
    url = f"sqlite:///{tmp_path / 'expire.db'}"
    app = create_app({"DATABASE_URL": url, "SYNC_INTERVAL": 0.05, "EXPIRE_INTERVAL": expire_interval,
                      "SEED": 5, "CLOCK": clock})  # fmt: skip
    eng = app.extensions["bandit_engine"]
    syncer: Syncer = app.extensions["bandit_engine.syncer"]
    registry = app.extensions["bandit_engine.metrics"].registry

    def expired() -> float:
        return registry.get_sample_value("bandit_engine_expired_decisions_total") or 0.0

    try:
        eng.set_channel(ChannelConfig("email", policy=PolicySpec("thompson"), reward_window_days=1))
        eng.add_offer(Offer("o1", ["email"], cost=2.0, budget=10.0, features={"category": "home"}))
        first = [eng.choose(f"m{i}", "email") for i in range(5)]
        assert eng.choose("m9", "email").offer_id is None  # the budget is all liability now
        eng.reward(first[0].event_id, 1.0)
        clock.advance(days=0.5)
        late = eng.choose("m0", "email")  # nothing was freed yet
        assert late.offer_id is None
        syncer.maybe_sync()
        assert _until(lambda: eng.policy("email").version == 1)
        time.sleep(0.5)  # several expiry intervals: the windows are still open
        assert {eng.get_decision(d.event_id).status for d in first[1:]} == {"open"}
        assert eng.ledger.offer_states()["o1"].committed_cents == 800

        clock.advance(days=1)  # the four unrewarded windows have passed
        if not expire_interval:
            time.sleep(0.5)
            assert {eng.get_decision(d.event_id).status for d in first[1:]} == {"open"}
            assert expired() == 0 and eng.policy("email").version == 1
            return
        assert _until(lambda: expired() == 4)
        assert {eng.get_decision(d.event_id).status for d in first[1:]} == {"expired"}
        st = eng.ledger.offer_states()["o1"]
        assert (st.committed_cents, st.spent_cents) == (0, 200)
        assert _until(lambda: eng.policy("email").version == 5)  # the four misses were learned
        assert eng.choose("m7", "email").offer_id == "o1"  # the budget is usable again

        with sqlite3.connect(tmp_path / "expire.db") as db:  # the log goes away under the thread
            db.execute("ALTER TABLE decisions RENAME TO decisions_away")
        assert _until(lambda: (registry.get_sample_value("bandit_engine_background_failures_total", {"task": "expire"}) or 0) >= 2)
        with sqlite3.connect(tmp_path / "expire.db") as db:
            db.execute("ALTER TABLE decisions_away RENAME TO decisions")
        clock.advance(days=2)
        assert _until(lambda: expired() == 5), "the thread kept closing windows after the failures"
    finally:
        syncer.stop()
        eng.ledger.close()
    with pytest.raises(ValueError):
        Syncer(eng, 1.0, expire_interval=-1.0)


def test_a_worker_checkpoints_what_it_learned_so_a_restart_replays_only_the_tail(tmp_path) -> None:
    """With no learner process, the worker's thread writes a snapshot once it has learned past
    the stored one (and not otherwise); a restarted engine restores it and replays nothing;
    a failed checkpoint is counted and retried."""
    path = tmp_path / "snap.db"
    url = f"sqlite:///{path}"
    writer = Engine.open(url, seed=11, snapshot_every=10**6)  # the reference; writes no snapshot
    app = create_app({"DATABASE_URL": url, "SYNC_INTERVAL": 0.05, "SNAPSHOT_INTERVAL": 0.2,
                      "EXPIRE_INTERVAL": 0, "SEED": 11})  # fmt: skip
    eng = app.extensions["bandit_engine"]
    syncer: Syncer = app.extensions["bandit_engine.syncer"]
    registry = app.extensions["bandit_engine.metrics"].registry

    def rewards(n: int, start: int) -> None:
        for i in range(start, start + n):
            d = writer.choose(f"m{i % 9}", "email", {"tier": ("gold", "silver")[i % 2]})
            writer.reward(d.event_id, float(i % 3 == 0))

    def stored_seq() -> int:
        snap = eng.ledger.latest_snapshot("email")
        return -1 if snap is None else snap.feedback_seq

    def rows() -> int:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT count(*) FROM snapshots").fetchone()[0]

    try:
        for i, cat in enumerate(("home", "toys", "beauty")):
            writer.add_offer(Offer(f"o{i}", ["email"], cost=1.0, features={"category": cat}))
        rewards(40, 0)
        syncer.maybe_sync()
        assert _until(lambda: stored_seq() == 40)
        snap = eng.ledger.latest_snapshot("email")
        assert snap.version == 40 and snap.data == writer.policy("email").serialize()

        def all_stored() -> bool:  # every loaded model (each default channel's too) at 40
            snaps = [eng.ledger.latest_snapshot(m) for m in list(eng._policies)]
            return all(s is not None and s.feedback_seq == 40 for s in snaps)

        assert _until(all_stored)  # the thread's turn wrote them one after another
        written = rows()
        time.sleep(0.7)  # three checkpoint turns with nothing new learned: nothing written
        assert rows() == written

        rewards(10, 40)
        assert _until(lambda: stored_seq() == 50)
        fresh = Engine.open(url, seed=11, learn_in_process=False)
        replayed: list[int] = []
        read = fresh.ledger.feedback_after
        fresh.ledger.feedback_after = lambda seq, limit: replayed.extend(f.seq for f in read(seq, limit)) or read(seq, limit)  # type: ignore[method-assign]
        try:
            assert fresh.policy("email").version == 50
            assert replayed == [] and fresh.policy("email").serialize() == writer.policy("email").serialize()
        finally:
            fresh.ledger.close()

        with sqlite3.connect(path) as db:  # the checkpoints' table goes away under the thread
            db.execute("ALTER TABLE snapshots RENAME TO snapshots_away")
        rewards(5, 50)
        failures = {"task": "snapshot"}
        assert _until(lambda: (registry.get_sample_value("bandit_engine_background_failures_total", failures) or 0) >= 1)
        with sqlite3.connect(path) as db:
            db.execute("ALTER TABLE snapshots_away RENAME TO snapshots")
        assert _until(lambda: stored_seq() == 55), "the thread kept checkpointing after the failure"
    finally:
        syncer.stop()
        eng.ledger.close()
        writer.ledger.close()
