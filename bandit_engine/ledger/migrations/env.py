"""Alembic environment: the engine comes from ``config.attributes['engine']``."""

from __future__ import annotations

import logging
import time

from alembic import context
from sqlalchemy import Connection

import bandit_engine.governance_models  # noqa: F401 - the governance tables share Base's metadata
from bandit_engine.ledger.migrate import MIGRATION_LOCK
from bandit_engine.ledger.models import Base

config = context.config
engine = config.attributes["engine"]

# Servers starting together on one database upgrade it one at a time: each reads the revision
# only once it holds the migration lock, so the next one finds nothing left to do.
#
# PostgreSQL: a session-level advisory lock, held from before the revision read to after the
# last migration. It must outlive a commit: a migration that builds an index CONCURRENTLY (so
# that writers are not blocked while it builds, 0005) commits the migrations before it. The
# lock is polled with pg_try_advisory_lock, never waited for in a statement: a server blocked
# inside pg_advisory_lock() holds a snapshot for as long as it waits, and CREATE INDEX
# CONCURRENTLY waits for every older snapshot to go, i.e. for the server that waits for it.
#
# SQLite: Alembic would run each migration in a transaction of its own (it counts SQLite's DDL
# as non-transactional), so a second server could read the revision between two of the first's
# migrations and run the next one again ("duplicate column name", 2 starts in 28 with 6
# processes); one BEGIN IMMEDIATE opened here holds the write lock from the revision read to the
# last migration (Alembic runs inside a transaction it finds open).
LOCK_POLL_S = 0.05
LOCK_LOG_S = 10.0  # how often a process waiting for another's upgrade says so
log = logging.getLogger("bandit_engine.migrate")


def _lock(connection: Connection) -> None:
    started = said = time.monotonic()
    while not connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({MIGRATION_LOCK})").scalar():
        connection.rollback()  # no snapshot held while waiting
        if time.monotonic() - said >= LOCK_LOG_S:  # a long upgrade (an index on a large table)
            said = time.monotonic()
            log.warning("waiting %.0f s for another process's schema upgrade", said - started)
        time.sleep(LOCK_POLL_S)
    connection.commit()


with engine.connect() as connection:
    pg = engine.dialect.name == "postgresql"
    if pg:
        _lock(connection)
    elif engine.dialect.name == "sqlite":
        connection = connection.execution_options(ledger_write=True)
        connection.begin()
    try:
        context.configure(
            connection=connection, target_metadata=Base.metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
        if connection.in_transaction():
            connection.commit()
    finally:
        if pg:
            connection.rollback()  # a failed migration's transaction, if any, so the unlock runs
            connection.exec_driver_sql(f"SELECT pg_advisory_unlock({MIGRATION_LOCK})")
            connection.commit()
