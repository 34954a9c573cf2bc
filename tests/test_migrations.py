"""Schema upgrades on a live PostgreSQL database: what serving workers may do while one runs."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest

from bandit_engine.ledger.migrate import current_revision, head_revision, upgrade_schema
from bandit_engine.ledger.sql import make_engine
from tests.conftest import _psycopg_url

_FEEDBACK_ROW = "INSERT INTO feedback (event_id, channel, reward, learn) VALUES (%s, 'email', 0, true)"


def _index(conn: psycopg.Connection, name: str) -> tuple[bool, bool] | None:
    """(valid, unique) of the index ``name`` in this connection's schema, or None."""
    row = conn.execute(
        "SELECT i.indisvalid, i.indisunique FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE c.relname = %s AND c.relnamespace = current_schema()::regnamespace",
        (name,),
    ).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]))


def _upgrade_in_background(url: str, app: str) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []
    engine = make_engine(f"{url}&application_name={app}")

    def run() -> None:
        try:
            upgrade_schema(engine)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            engine.dispose()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def _wait_until_blocked(url: str, app: str, timeout_s: float = 20.0) -> None:
    """Until the upgrade's index build waits on a lock (the test's open writer)."""
    with psycopg.connect(_psycopg_url(url.split("?")[0]), autocommit=True) as conn:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if conn.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
                "AND query ILIKE 'CREATE INDEX%%' AND wait_event_type = 'Lock'",
                (app,),
            ).fetchone():
                return
            time.sleep(0.02)
    pytest.fail("the upgrade never started building its index")


def test_upgrading_to_0005_does_not_block_writes_to_the_feedback_log(postgres_url) -> None:
    """Migration 0005 indexes ``feedback``, the log every choose and reward appends to. While
    the index builds (here: while it waits for a writer's open transaction, as a build on a large
    table would for seconds), other writers must go on. A plain CREATE INDEX queues for a lock
    that every insert then queues behind: the second insert below timed out."""
    old = make_engine(postgres_url)
    try:
        upgrade_schema(old, "0004")
    finally:
        old.dispose()
    app = f"be-mig-{uuid.uuid4().hex[:8]}"
    url = _psycopg_url(postgres_url)
    with psycopg.connect(url) as open_writer, psycopg.connect(url, autocommit=True) as writer:
        open_writer.execute(_FEEDBACK_ROW, ("before-upgrade",))  # left uncommitted for now
        t, errors = _upgrade_in_background(postgres_url, app)
        _wait_until_blocked(postgres_url, app)
        writer.execute("SET lock_timeout = '3s'")
        writer.execute(_FEEDBACK_ROW, ("during-upgrade",))  # lock timeout: psycopg.errors.LockNotAvailable
        open_writer.commit()
        t.join(timeout=60)
        assert not t.is_alive() and not errors, errors
        assert _index(writer, "ix_feedback_event") == (True, False)
        assert writer.execute("SELECT count(*) FROM feedback").fetchone()[0] == 2
    check = make_engine(postgres_url)
    try:
        assert current_revision(check) == head_revision()
    finally:
        check.dispose()


def test_an_upgrade_that_failed_midway_through_0005_can_be_run_again(postgres_url) -> None:
    """A concurrent index build that fails leaves an invalid index behind (and the revision at
    0004). Running the upgrade again replaces it with a valid one."""
    engine = make_engine(postgres_url)
    try:
        upgrade_schema(engine, "0004")
        with psycopg.connect(_psycopg_url(postgres_url), autocommit=True) as conn:
            for _ in range(2):
                conn.execute(_FEEDBACK_ROW, ("twice",))
            with pytest.raises(psycopg.errors.UniqueViolation):  # a build that fails midway
                conn.execute("CREATE UNIQUE INDEX CONCURRENTLY ix_feedback_event ON feedback (event_id)")
            assert _index(conn, "ix_feedback_event") == (False, True)
            upgrade_schema(engine)
            assert current_revision(engine) == head_revision()
            assert _index(conn, "ix_feedback_event") == (True, False)
    finally:
        engine.dispose()
