"""Schema migrations: they build the schema the models describe, every one of them can be undone,
and on PostgreSQL serving workers keep writing while one runs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import CheckConstraint, Engine, inspect

import bandit_engine.governance_models  # noqa: F401 - registers the governance tables on Base
from bandit_engine.cli import main
from bandit_engine.errors import StorageError
from bandit_engine.ledger.migrate import (
    MIGRATION_LOCK,
    MIGRATIONS,
    current_revision,
    downgrade_schema,
    head_revision,
    upgrade_schema,
)
from bandit_engine.ledger.models import Base
from bandit_engine.ledger.sql import SqlLedger, make_engine
from tests.conftest import _psycopg_url
from tests.test_api_cli import _cli

_FEEDBACK_ROW = (
    "INSERT INTO feedback (event_id, channel, reward, learn) VALUES (%s, 'email', 0, true)"
)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db(request: pytest.FixtureRequest, tmp_path) -> Iterator[Engine]:
    url = (
        f"sqlite:///{tmp_path / 'm.db'}" if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )  # fmt: skip
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _drift(engine: Engine) -> list[object]:
    """What autogenerate would change to make the database match the models: tables, columns,
    types, nullability, server defaults, indexes and unique constraints."""
    with engine.connect() as conn:
        opts = {"compare_type": True, "compare_server_default": True}
        ctx = MigrationContext.configure(conn, opts=opts)
        return list(compare_metadata(ctx, Base.metadata))


def test_the_migrations_build_the_schema_the_models_describe(empty_db) -> None:
    """The ORM models and the Alembic history describe one schema: an index or a default
    declared in one and not the other would go unnoticed by every other test (the models
    declared none of the server defaults the migrations create, until this test)."""
    upgrade_schema(empty_db)
    assert _drift(empty_db) == []
    # autogenerate does not compare CHECK constraints: the caps the database enforces
    db = inspect(empty_db)
    built = {(t, c["name"]) for t in db.get_table_names() for c in db.get_check_constraints(t)}
    declared = {
        (t.name, c.name) for t in Base.metadata.tables.values()
        for c in t.constraints if isinstance(c, CheckConstraint)
    }  # fmt: skip
    assert built == declared and len(declared) == 5


def test_every_migration_can_be_undone_and_redone(empty_db) -> None:
    """Down one revision at a time to an empty database, then up again to the same schema."""
    upgrade_schema(empty_db)
    while current_revision(empty_db) is not None:
        downgrade_schema(empty_db, "-1")
    assert set(inspect(empty_db).get_table_names()) <= {"alembic_version"}
    upgrade_schema(empty_db)
    assert current_revision(empty_db) == head_revision()
    assert _drift(empty_db) == []


def test_the_cli_reports_upgrades_and_downgrades_the_schema(tmp_path) -> None:
    def cli(*args: str) -> str:
        url = f"sqlite:///{tmp_path / 'c.db'}"
        r = CliRunner().invoke(main, ["--database-url", url, "db", *args])
        assert r.exit_code == 0, r.output
        return r.output.strip()

    head = head_revision()
    before = ScriptDirectory(str(MIGRATIONS)).get_revision(head).down_revision
    missing = f"base (empty: the SQLite file '{tmp_path / 'c.db'}' does not exist)"
    assert cli("current") == f"schema at revision {missing}; head is {head}"
    assert cli("upgrade") == f"schema at revision {head}"
    assert cli("downgrade", "--revision", "-1") == f"schema at revision {before}"
    assert cli("current") == f"schema at revision {before}; head is {head}"
    assert cli("downgrade", "--revision", "base") == "schema at revision base (empty)"
    missing = CliRunner().invoke(main, ["db", "downgrade"])  # no default: an operator names it
    assert missing.exit_code == 2 and "--revision" in missing.output


def test_a_schema_newer_than_this_version_is_refused_with_a_clear_error(tmp_path) -> None:
    """A newer version upgraded the database (a rolling deploy, an old worker restarting):
    opening it says so, where Alembic said "Can't locate revision identified by '0099'"."""
    url = f"sqlite:///{tmp_path / 'n.db'}"
    SqlLedger(url).close()
    engine = make_engine(url)
    try:
        with engine.begin() as c:
            c.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        with pytest.raises(StorageError, match="at revision '0099', which this version of "
                           "bandit_engine does not know") as err:  # fmt: skip
            SqlLedger(url)
        assert f"db downgrade --revision {head_revision()}" in str(err.value)
        r = _cli("--database-url", url, "db", "upgrade")
        assert r.returncode == 2 and r.stderr.startswith("error: "), r.stderr[-1500:]
        assert "does not know" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        # a command that only reads said to run `db upgrade`, which then refused as above
        with pytest.raises(StorageError, match="which this version of bandit_engine does not "
                           "know") as err:  # fmt: skip
            SqlLedger(url, upgrade=False)
        assert "run `bandit-engine db upgrade`" not in str(err.value)
        assert current_revision(engine) == "0099"  # nothing changed
    finally:
        engine.dispose()


def _revision(url: str) -> str | None:
    """The schema's revision, read on an engine of the test's own."""
    engine = make_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def _index(conn: psycopg.Connection, name: str) -> tuple[bool, bool] | None:
    """(valid, unique) of the index ``name`` in this connection's schema, or None."""
    row = conn.execute(
        "SELECT i.indisvalid, i.indisunique FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
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
        # on the old migration: psycopg.errors.LockNotAvailable (lock timeout)
        writer.execute(_FEEDBACK_ROW, ("during-upgrade",))
        open_writer.commit()
        t.join(timeout=60)
        assert not t.is_alive() and not errors, errors
        assert _index(writer, "ix_feedback_event") == (True, False)
        assert writer.execute("SELECT count(*) FROM feedback").fetchone()[0] == 2
    assert _revision(postgres_url) == head_revision()


def test_an_upgrade_waits_for_another_processs_and_says_so(postgres_url, caplog) -> None:
    """The migration lock is another session's for a while (a long upgrade elsewhere): this
    upgrade waits, logs that it does every ten seconds, and runs once the lock is free."""
    with psycopg.connect(_psycopg_url(postgres_url), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        with caplog.at_level("WARNING", logger="bandit_engine.migrate"):
            t, errors = _upgrade_in_background(postgres_url, f"be-mig-{uuid.uuid4().hex[:8]}")
            t.join(timeout=10.5)
            assert t.is_alive(), "the upgrade did not wait for the lock"
            other.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            t.join(timeout=60)
    assert not t.is_alive() and not errors, errors
    assert "waiting 10 s for another process's schema upgrade" in caplog.text
    assert _revision(postgres_url) == head_revision()


def test_a_server_starting_on_a_current_schema_does_not_wait_for_the_migration_lock(
    postgres_url,
) -> None:
    """Another process holds the migration lock (a long upgrade of another schema in the same
    database: the lock is the database's; or a stuck one): a ledger opened on a schema already
    at head starts at once."""
    SqlLedger(postgres_url).close()  # upgraded to head
    with psycopg.connect(_psycopg_url(postgres_url), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        opened = threading.Thread(target=lambda: SqlLedger(postgres_url).close(), daemon=True)
        opened.start()
        opened.join(timeout=5.0)
        started = not opened.is_alive()
        other.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))  # let a waiter finish
        opened.join(timeout=30)
    assert started, "the ledger waited for the migration lock on a schema already at head"


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
                conn.execute(
                    "CREATE UNIQUE INDEX CONCURRENTLY ix_feedback_event ON feedback (event_id)"
                )
            assert _index(conn, "ix_feedback_event") == (False, True)
            upgrade_schema(engine)
            assert current_revision(engine) == head_revision()
            assert _index(conn, "ix_feedback_event") == (True, False)
    finally:
        engine.dispose()


def test_0007_keeps_every_row_and_numbers_after_the_newest_ever(tmp_path) -> None:
    """0007 copies SQLite's decisions and feedback into AUTOINCREMENT tables: every row (and
    its number) survives the copy both ways, the CHECK constraint holds, and after it a number
    deleted from the top is never handed out again."""
    from bandit_engine import Engine, Offer

    url = f"sqlite:///{tmp_path / 'l.db'}"
    eng = Engine.open(url, seed=1)
    eng.add_offer(Offer("o", ["email"], cost=1.0, budget=100.0))
    for i in range(20):
        eng.reward(eng.choose(f"m{i}", "email").event_id, float(i % 2))
    eng.ledger.close()
    engine = make_engine(url)

    def rows() -> tuple[list[tuple[object, ...]], ...]:
        with engine.connect() as c:
            return tuple(c.exec_driver_sql(f"SELECT * FROM {t} ORDER BY seq").fetchall()
                         for t in ("decisions", "feedback"))  # fmt: skip

    before = rows()
    assert len(before[0]) == 20 and len(before[1]) == 20
    downgrade_schema(engine, "0006")
    assert rows() == before
    upgrade_schema(engine)
    assert current_revision(engine) == head_revision() and rows() == before
    checks = {c["name"] for c in inspect(engine).get_check_constraints("decisions")}
    assert "ck_decisions_spent" in checks
    top = before[1][-1][0]
    with engine.begin() as c:
        c.exec_driver_sql("DELETE FROM feedback WHERE seq = ?", (top,))
        c.exec_driver_sql("INSERT INTO feedback (event_id, channel, reward, learn, kind) "
                          "VALUES ('e', 'email', 0, 1, 'final')")  # fmt: skip
        assert c.exec_driver_sql("SELECT max(seq) FROM feedback").scalar() == top + 1
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_0008_moves_the_booked_cost_of_open_decisions_into_settled(
    backend: str, request: pytest.FixtureRequest, tmp_path
) -> None:
    """Before 0008 a redemption on a ``sum`` channel entered an offer's ``settled_cents`` only
    when its window closed. Downgraded, the counter reads as the old code left it (short of the
    open decisions' booked cost); upgraded again, ``settled + committed`` is every reservation
    ever made, as the engine now keeps it."""
    from bandit_engine import ChannelConfig, Engine, Offer, PolicySpec

    url = (f"sqlite:///{tmp_path / 'l.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_url"))  # fmt: skip
    eng = Engine.open(url, seed=1)
    eng.set_channel(ChannelConfig("push", policy=PolicySpec("uniform"), aggregation="sum"))
    eng.add_offer(Offer("o", ["push"], cost=2.0, budget=100.0))
    eng.add_offer(Offer("idle", ["push"], cost=1.0, budget=100.0, active=False))
    events = [eng.choose(f"m{i}", "push").event_id for i in range(5)]
    eng.reward(events[0], 1.0)  # books 2.00
    eng.reward(events[1], 1.0, cost=0.5)
    eng.ledger.close()
    engine = make_engine(url)

    def settled() -> dict[str, tuple[int, int]]:
        with engine.connect() as c:
            rows = c.exec_driver_sql("SELECT offer_id, settled_cents, committed_cents FROM offers")
            return {r[0]: (r[1], r[2]) for r in rows}

    try:
        assert settled() == {"o": (250, 750), "idle": (0, 0)}
        downgrade_schema(engine, "0007")
        assert settled() == {"o": (0, 750), "idle": (0, 0)}
        upgrade_schema(engine)
        assert settled() == {"o": (250, 750), "idle": (0, 0)}
    finally:
        engine.dispose()
