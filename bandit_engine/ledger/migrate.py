"""Alembic migrations, run programmatically (``bandit-engine db upgrade`` or on open)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(__file__).parent / "migrations"
# the PostgreSQL advisory lock that serializes processes upgrading one database
# (migrations/env.py)
MIGRATION_LOCK = 7283104455


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest migration: what opening a ledger upgrades its schema to."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def upgrade_schema(engine: Engine, revision: str = "head") -> None:
    """Upgrade to ``revision``. A schema already at head is left alone without taking the
    migration lock, as on every start of a server once the schema is current: starting servers
    then never queue behind a long upgrade elsewhere, nor hold session state on a pooled
    connection."""
    if revision == "head" and current_revision(engine) == head_revision():
        return
    command.upgrade(alembic_config(engine), revision)


def downgrade_schema(engine: Engine, revision: str) -> None:
    """Undo migrations down to ``revision`` (``"-1"``: one step; ``"base"``: an empty database)."""
    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
