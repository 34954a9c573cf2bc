"""Alembic environment: the engine comes from ``config.attributes['engine']``."""

from __future__ import annotations

from alembic import context

from bandit_engine.ledger.models import Base

config = context.config
engine = config.attributes["engine"]

with engine.connect() as connection:
    if engine.dialect.name == "sqlite":
        connection = connection.execution_options(ledger_write=True)
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        if engine.dialect.name == "postgresql":
            # servers starting together on one database upgrade it one at a time: the next one
            # reads the revision after the first commits, and finds nothing to do (on SQLite the
            # transaction's BEGIN IMMEDIATE serializes them already)
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7283104455)")
        context.run_migrations()
    if connection.in_transaction():
        connection.commit()
