"""``bandit-engine``: the command line. Core commands live here; the HTTP service
(:mod:`bandit_engine.api.commands`) and the simulator/evaluation
(:mod:`bandit_engine.simulation.commands`) register theirs in their own modules."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import BanditEngineError

DEFAULT_DB = "sqlite:///bandit.db"


def database_url(ctx: click.Context) -> str:
    return ctx.obj["database_url"]


def existing_database(url: str, hint: str = "") -> str:
    """``url``, for a command that reads, maintains or serves a ledger: a SQLite file that is
    not there is an error (``hint`` says what to run instead). Opening one creates it, so a
    mistyped path would read as an empty ledger and leave an empty database behind. The
    commands that set a database up create it (``db upgrade``, ``demo``, ``keys create``)."""
    from .errors import InvalidArgument
    from .ledger.sql import sqlite_file

    db = sqlite_file(url)  # None for what is not a SQLite file
    if db is not None and not db.is_file():
        raise InvalidArgument(
            f"no ledger at {url}: the SQLite file {str(db)!r} does not exist{hint}")
    return url


@click.group()
@click.option(
    "--database-url",
    envvar="BANDIT_ENGINE_DATABASE_URL",
    default=DEFAULT_DB,
    show_default=True,
    show_envvar=True,
    help="Ledger URL: sqlite:///file.db or postgresql+psycopg://user@host/db.",
)
@click.pass_context
def main(ctx: click.Context, database_url: str) -> None:
    """bandit_engine: loyalty-offer decisions with contextual bandits."""
    ctx.ensure_object(dict)
    ctx.obj["database_url"] = database_url


@main.group()
def db() -> None:
    """Database schema."""


def _schema_at(
    ctx: click.Context, move: Callable[[Any, str], None] | None = None, revision: str = ""
) -> str:
    """The schema's revision, after ``move(engine, revision)`` (an upgrade or a downgrade).
    Only an upgrade creates a SQLite file that is not there: a downgrade refuses, and reading
    the revision of none is reading no schema."""
    from .ledger.migrate import current_revision, upgrade_schema
    from .ledger.sql import make_engine, sqlite_file

    url = database_url(ctx)
    if move is not upgrade_schema:
        db = sqlite_file(url)
        if move is None and db is not None and not db.exists():
            return f"base (empty: the SQLite file {str(db)!r} does not exist)"
        existing_database(url)
    engine = make_engine(url)
    if move is not None:
        move(engine, revision)
    return current_revision(engine) or "base (empty)"


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or upgrade the ledger schema (Alembic)."""
    from .ledger.migrate import upgrade_schema

    click.echo(f"schema at revision {_schema_at(ctx, upgrade_schema, revision)}")


@db.command("downgrade")
@click.option("--revision", required=True,
              help="The revision to go back to: e.g. 0004, -1 for one step, base for none.")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Undo migrations down to REVISION (stop the servers first: they expect the newer schema).

    Undoing a migration drops what it added (below 0004 the stored settings, below 0003 the
    kinds of feedback events, below 0002 keys, changes and the audit log), and upgrading again
    does not bring it back: back the database up first."""
    from .ledger.migrate import downgrade_schema

    click.echo(f"schema at revision {_schema_at(ctx, downgrade_schema, revision)}")


@db.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Print the schema's revision, and the newest this version of bandit_engine knows."""
    from .ledger.migrate import head_revision

    click.echo(f"schema at revision {_schema_at(ctx)}; head is {head_revision()}")


@main.command()
@click.pass_context
def expire(ctx: click.Context) -> None:
    """Close decisions whose reward window has passed (default reward, release reservations)."""
    from .engine import Engine

    # closes windows and writes their feedback, learns nothing: a model learned here and
    # checkpointed on close could step past a reward a server is still committing (a lower
    # seq), which restarted workers would then never learn. The serving workers learn it.
    with Engine.open(existing_database(database_url(ctx)), upgrade=False,
                     learn_in_process=False) as engine:  # fmt: skip
        n = engine.expire()
    click.echo(f"expired {n} decisions")


@main.command("export-dsjson")
@click.option("--channel", default=None, help="Only this channel's decisions (default: all).")
@click.option("--output", type=click.File("w"), default="-", show_default=True,
              help="The file to write (- is stdout).")
@click.pass_context
def export_dsjson(ctx: click.Context, channel: str | None, output: click.utils.LazyFile) -> None:
    """Write logged decisions as VW dsjson (one JSON object per line): those the engine learns
    from whose reward window has closed."""
    from .evaluation import open_existing

    engine = open_existing(database_url(ctx))  # a mistyped SQLite path is an error, not a new empty ledger
    try:
        n = engine.export_dsjson(output, channel=channel)  # type: ignore[arg-type]
    finally:
        engine.ledger.close()
    click.echo(f"exported {n} decisions", err=True)


@main.command()
@click.option("--older-than", "older_than", type=float, required=True, metavar="DAYS",
              help="Prune settled decisions issued more than DAYS ago (at least the longest window "
                   "the engine reads: 90 days of member history, member cap and reward windows).")
@click.option("--archive", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Append each pruned decision, with its rewards and feedback events, to this "
                   "JSON-lines file before deleting it.")
@click.option("--no-archive", is_flag=True, help="Delete without keeping a copy.")
@click.option("--batch", default=1000, show_default=True, type=click.IntRange(1, 10_000),
              help="Decisions per transaction.")
@click.pass_context
def prune(ctx: click.Context, older_than: float, archive: str | None, no_archive: bool, batch: int) -> None:
    """Retention: move old settled decisions out of the ledger (into --archive).

    Open decisions stay, and so does every decision a model restored from its latest checkpoint
    would still replay. `bandit-engine evaluate --archive FILE` reads the archive back."""
    from .clock import iso
    from .engine import Engine

    if (archive is None) == (not no_archive):
        raise click.UsageError("give --archive FILE (keep a copy) or --no-archive (discard)")
    engine = Engine.open(existing_database(database_url(ctx)), upgrade=False)
    try:
        if archive is None:
            report = engine.prune(older_than, None, batch=batch)
        else:
            with open(archive, "a+", encoding="utf-8") as out:  # a+: a torn last line is cut
                report = engine.prune(older_than, out, batch=batch)
    finally:
        engine.ledger.close()  # not engine.close(): this command loads no policy to checkpoint
    where = f", archived to {archive}" if archive else ""
    click.echo(f"pruned {report.pruned} decisions issued before {iso(report.before_ms)}{where}")
    for name in report.uncheckpointed:
        click.echo(f"channel {name}: no checkpoint of its current policy, so the decisions it learned "
                   "from were kept (serving workers write one every --snapshot-interval)", err=True)  # fmt: skip


# Commands contributed by other rooms; a missing module simply contributes nothing.
for _module in ("bandit_engine.api.commands", "bandit_engine.simulation.commands"):
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name is None or not _module.startswith(_exc.name):
            raise  # a real import error inside the module, not an absent room
        continue
    for _cmd in getattr(_mod, "COMMANDS", ()):
        main.add_command(_cmd)


def run() -> None:  # pragma: no cover - thin wrapper
    """The console script: an error an operator can act on is one line and exit 2, not a
    traceback (a database that cannot be reached or named, a schema newer than this code, a
    file that cannot be written)."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import ArgumentError, DBAPIError

    try:
        main(standalone_mode=True)
    except BanditEngineError as exc:
        _fail(exc.message)
    except ArgumentError as exc:  # a sqlite/postgresql URL that does not parse (others: make_engine)
        _fail(f"not a database URL bandit_engine can use (sqlite:///file.db or postgresql+psycopg://...): {exc}")
    except DBAPIError as exc:
        _fail(f"database error: {str(exc.orig or exc).strip().splitlines()[0]}")
    except CommandError as exc:
        _fail(f"schema migration: {exc} (is the database's schema newer than this bandit_engine?)")
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def _fail(message: str) -> None:
    message = " ".join(message.split())  # one line (a driver's message may carry a hint line)
    click.echo(f"error: {message[:1000]}", err=True)
    sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run()
