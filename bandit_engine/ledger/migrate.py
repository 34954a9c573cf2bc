"""Alembic migrations, run programmatically (``bandit-engine db upgrade`` or on open)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

from ..errors import StorageError

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
    current, head = current_revision(engine), head_revision()
    if revision == "head" and current == head:
        return
    _refuse_unknown(current, head)
    command.upgrade(alembic_config(engine), revision)


def _refuse_unknown(current: str | None, head: str) -> None:
    """A schema at a revision this version does not have: Alembic's own message ("Can't locate
    revision") does not say what happened, and `db upgrade` cannot help."""
    if current is not None and not _known(current):
        raise StorageError(
            f"the database's schema is at revision {current!r}, which this version of "
            f"bandit_engine does not know (its newest is {head!r}): a newer version upgraded it "
            "(run that version, or undo its migrations with its `bandit-engine db downgrade "
            f"--revision {head}`), or the database belongs to another application"
        )


def require_head(engine: Engine) -> None:
    """For a command that reads or maintains a ledger without setting it up: the schema must be
    this version's newest, and is never migrated here (an operator rolling back, who has just
    downgraded it for the older servers, must not see ``keys list`` upgrade it again)."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        _refuse_unknown(current, head)  # newer: `db upgrade` would refuse it too
        raise StorageError(
            f"the database's schema is at revision {current or 'base (empty)'!r}, not this "
            f"version of bandit_engine's {head!r}: run `bandit-engine db upgrade` (with this "
            "version) first, or use the version that matches the schema"
        )


def _known(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory(str(MIGRATIONS)).get_revision(revision) is not None
    except CommandError:  # "Can't locate revision"
        return False


def downgrade_schema(engine: Engine, revision: str) -> None:
    """Undo migrations down to ``revision`` (``"-1"``: one step; ``"base"``: an empty database)."""
    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
