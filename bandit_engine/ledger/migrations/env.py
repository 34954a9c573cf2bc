"""Alembic environment: the engine comes from ``config.attributes['engine']``."""

from __future__ import annotations

from alembic import context

from bandit_engine.ledger.models import Base

config = context.config
engine = config.attributes["engine"]

# Servers starting together on one database upgrade it one at a time, each reading the revision
# inside the transaction that runs the migrations: the next one reads it after the first
# commits, and finds nothing to do. On PostgreSQL an advisory lock serializes them. On SQLite
# Alembic would run each migration in a transaction of its own (it counts SQLite's DDL as
# non-transactional), so a second server could read the revision between two of the first's
# migrations and run the next one again ("duplicate column name", 2 starts in 28 with 6
# processes); one BEGIN IMMEDIATE opened here holds the write lock from the revision read to the
# last migration (Alembic runs inside a transaction it finds open).
with engine.connect() as connection:
    if engine.dialect.name == "sqlite":
        connection = connection.execution_options(ledger_write=True)
        connection.begin()
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7283104455)")
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()
