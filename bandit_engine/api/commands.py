"""CLI commands of the HTTP service: ``serve``, ``keys``, ``demo``, ``learner``.

They are registered on the ``bandit-engine`` group by :mod:`bandit_engine.cli` (``COMMANDS``).
The database URL comes from the group's ``--database-url`` / ``BANDIT_ENGINE_DATABASE_URL``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

DEMO_OFFERS: list[dict[str, Any]] = [
    {"offer_id": "welcome-5", "channels": ["email", "push"], "cost": 5.0,
     "features": {"category": "grocery", "discount": 0.05}},
    {"offer_id": "home-10", "channels": ["email", "site"], "cost": 10.0,
     "features": {"category": "home", "discount": 0.10}},
    {"offer_id": "beauty-2x", "channels": ["push", "in_app"], "cost": 3.0,
     "features": {"category": "beauty", "points_multiplier": 2}},
    {"offer_id": "fashion-15", "channels": ["email", "in_app", "site"], "cost": 15.0,
     "features": {"category": "fashion", "discount": 0.15}},
    {"offer_id": "toys-bundle", "channels": ["site", "push"], "cost": 8.0,
     "features": {"category": "toys", "discount": 0.20}},
]  # fmt: skip
DEMO_BUDGET = 500.0


def _url(ctx: click.Context) -> str:
    return ctx.find_root().obj["database_url"]


def _existing_url(ctx: click.Context, hint: str = "") -> str:
    """The database URL of a command that reads, maintains or serves it: a SQLite file that is
    not there is an error, not a new empty database (``demo`` and ``keys create`` set one
    up)."""
    from ..cli import existing_database

    return existing_database(_url(ctx), hint)


def _gov(url: str, *, upgrade: bool = True) -> Any:
    """Governance on ``url``, after creating or upgrading its schema; with ``upgrade=False``
    (commands that only read or maintain a ledger) the schema must already be current."""
    from ..governance import Governance
    from ..ledger.migrate import require_head, upgrade_schema
    from ..ledger.sql import make_engine

    engine = make_engine(url)
    (upgrade_schema if upgrade else require_head)(engine)
    return Governance(engine)


def serve_app(config: dict[str, Any], host: str, port: int, workers: int, **options: Any) -> None:
    """Serve ``create_app(config)`` with gunicorn sync workers (:class:`.worker.JsonErrorWorker`:
    what gunicorn refuses before Flask sees it gets a JSON error too); each worker builds its
    own app (no preload), so no database connection is shared across a fork.

    Run it inside :func:`multiprocess_metrics` so ``/metrics`` aggregates every worker."""
    from gunicorn.app.base import BaseApplication

    # imported here, not in the handler: gunicorn calls child_exit from its SIGCHLD handler, and
    # a second worker exiting during the first import re-entered it half-initialized (an
    # ImportError at shutdown, and that worker's gauges never marked dead)
    from prometheus_client import multiprocess

    def child_exit(_server: Any, worker: Any) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.mark_process_dead(worker.pid)

    from .worker import JsonErrorWorker  # sync, with JSON pages for what gunicorn refuses

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            opts = {"bind": f"{host}:{port}", "workers": workers, "worker_class": JsonErrorWorker,
                    "preload_app": False, "accesslog": None, "timeout": 60,
                    "keepalive": 5, "child_exit": child_exit, **options}  # fmt: skip
            for k, v in opts.items():
                self.cfg.set(k, v)

        def load(self) -> Any:  # in the worker, after the fork
            from . import create_app

            app = _with_database_retries(lambda: create_app(config))
            app.extensions["bandit_engine.syncer"].start()  # loads the models before traffic
            return app

    _App().run()


BOOT_RETRY_SECONDS = 30.0  # a worker's retries of an unreachable database, inside its 60 s timeout


def _with_database_retries(boot: Callable[[], Any]) -> Any:
    """``boot()`` (a worker's app), retried with backoff while the database cannot be reached.

    gunicorn stops the whole server when a worker fails to boot: one replaced during a
    database outage (a crash, a timeout, a restart) took every worker down with it, and the
    server stayed down once the database was back. A worker keeps trying for
    ``BOOT_RETRY_SECONDS``, then exits like any worker that died, so the master replaces it and
    the next one tries again; the workers that are up answer 503 meanwhile."""
    from sqlalchemy.exc import DBAPIError

    from ..errors import StorageError

    deadline, delay = time.monotonic() + BOOT_RETRY_SECONDS, 0.5
    while True:
        try:
            return boot()
        except (StorageError, DBAPIError) as exc:
            said = " ".join(str(getattr(exc, "message", exc)).split())[:300]
            if time.monotonic() + delay > deadline:
                print(f"worker {os.getpid()}: database unreachable, exiting to be replaced: {said}",
                      file=sys.stderr, flush=True)  # fmt: skip
                sys.exit(1)  # not gunicorn's boot-error code (3), which stops the master
            print(f"worker {os.getpid()}: database unreachable, retrying in {delay:g} s: {said}",
                  file=sys.stderr, flush=True)  # fmt: skip
            time.sleep(delay)
            delay = min(2 * delay, 5.0)


@contextmanager
def multiprocess_metrics() -> Iterator[None]:
    """prometheus-client's multiprocess mode for a gunicorn server: every worker writes its
    counters to one directory and ``/metrics`` sums them, whichever worker answers. Uses
    ``PROMETHEUS_MULTIPROC_DIR`` if set (it must then be emptied before each start), else a fresh
    temporary directory removed on exit. Must run before anything imports prometheus_client
    (it picks its value store at import)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield
        return
    if "prometheus_client" in sys.modules:
        raise click.ClickException("internal error: prometheus_client was imported before the metrics directory was set")
    path = tempfile.mkdtemp(prefix="bandit-engine-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    owner = os.getpid()
    try:
        yield
    finally:
        # gunicorn forks its workers inside this block, and a worker that exits by SystemExit
        # (SIGTERM to it, a timeout's abort, a reload) unwinds through here too: it removed the
        # directory under the live server, and the next worker failed to boot, which stops the
        # master. Only the process that made the directory removes it.
        if os.getpid() == owner:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
            shutil.rmtree(path, ignore_errors=True)


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--sync-interval", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between policy syncs from the feedback log, per worker (a "
                   "background thread; 0 syncs in the request before every choose).")
@click.option("--expire-interval", default=60.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between closings of due reward windows by each worker's background "
                   "thread (default reward, reservation released); 0 leaves it to "
                   "`bandit-engine expire`. Needs --sync-interval > 0.")
@click.option("--snapshot-interval", default=300.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between policy checkpoints written by each worker's background "
                   "thread when it has learned something new, so restarts replay only the log's "
                   "tail; 0 leaves them to `bandit-engine learner`. Needs --sync-interval > 0.")
@click.pass_context
def serve(ctx: click.Context, host: str, port: int, workers: int, sync_interval: float,
          expire_interval: float, snapshot_interval: float) -> None:
    """Serve the HTTP API with gunicorn."""
    with multiprocess_metrics():
        from . import open_engine

        # a server on a new SQLite file would hold no keys: every request a 401
        url = _existing_url(ctx, hint=(
            "; set one up with `bandit-engine db upgrade` and give it a key with "
            "`bandit-engine keys create`, or serve the demo with `bandit-engine demo`"))
        _gov(url)  # create or upgrade the schema once, before the workers start
        open_engine(url).ledger.close()  # and the default channels, so workers never race on them
        config = {"DATABASE_URL": url, "SYNC_INTERVAL": sync_interval,
                  "EXPIRE_INTERVAL": expire_interval, "SNAPSHOT_INTERVAL": snapshot_interval}
        serve_app(config, host, port, workers)


@click.group()
def keys() -> None:
    """API keys (only their hashes are stored)."""


@keys.command("create")
@click.option("--role", required=True, type=click.Choice(["decide", "analyst", "admin", "approver"]))
@click.option("--name", default="", help="A label for the key.")
@click.pass_context
def keys_create(ctx: click.Context, role: str, name: str) -> None:
    """Create a key and print it alone on stdout (it is not shown again)."""
    key, _ = _gov(_url(ctx)).create_key(role, name=name)
    click.echo(key)


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """List keys: id, role, name, prefix, revoked."""
    for k in _gov(_existing_url(ctx), upgrade=False).list_keys():
        state = "revoked" if k.revoked_at else "active"
        click.echo(f"{k.key_id}\t{k.role}\t{k.name}\t{k.prefix}…\t{state}")


@keys.command("revoke")
@click.argument("key_id", type=click.IntRange(1, 2**63 - 1))
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: int) -> None:
    """Revoke a key by id (effective on every worker within a second); the changes it
    proposed that are still pending are withdrawn."""
    withdrawn = _gov(_existing_url(ctx), upgrade=False).revoke_key(key_id)
    click.echo(f"revoked key {key_id}")
    if withdrawn:
        click.echo("withdrew its pending changes: " + ", ".join(map(str, withdrawn)))


def seed_demo(url: str) -> list[str]:
    """Seed the demo catalog when the database has no offer. Returns the offers added."""
    from ..catalog import Offer
    from . import open_engine

    eng = open_engine(url)
    try:
        if eng.offers():
            return []
        for spec in DEMO_OFFERS:
            eng.add_offer(Offer.from_dict({**spec, "budget": DEMO_BUDGET}))
        return [s["offer_id"] for s in DEMO_OFFERS]
    finally:
        eng.ledger.close()


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.pass_context
def demo(ctx: click.Context, host: str, port: int, workers: int) -> None:
    """Seed a demo catalog (if empty), create one key per role (printed once), and serve.

    Each start revokes the previous start's demo keys, so only the keys just printed work, and
    withdraws the changes they left pending."""
    with multiprocess_metrics():  # before anything imports prometheus_client
        url = _url(ctx)
        gov = _gov(url)
        added = seed_demo(url)
        if added:
            click.echo(f"seeded demo offers: {', '.join(added)} (budget {DEMO_BUDGET:.2f} each)")
        roles = ("decide", "analyst", "admin", "approver")
        withdrawn = []
        for k in gov.list_keys():
            if k.revoked_at is None and k.name in {f"demo-{r}" for r in roles}:
                withdrawn += gov.revoke_key(k.key_id)
        if withdrawn:
            click.echo("withdrew the pending changes of the previous start's demo keys: "
                       + ", ".join(map(str, withdrawn)))  # fmt: skip
        click.echo("demo API keys (shown once; only hashes are stored; revoked at the next start):")
        for role in roles:
            key, _rec = gov.create_key(role, name=f"demo-{role}")
            click.echo(f"  {role:9s} {key}")
        click.echo(f"serving on http://{host}:{port}  (try: curl -s http://{host}:{port}/healthz)")
        serve_app({"DATABASE_URL": url}, host, port, workers)


LEARNER_MAX_BACKOFF = 30.0  # seconds between a failing learner's retries, at most


@click.command()
@click.option("--every", default=5.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds between snapshots (only when something was learned).")
@click.option("--poll", default=0.5, show_default=True, type=click.FloatRange(min=0.01), help="Seconds between log reads.")
@click.option("--once", is_flag=True, help="Sync and snapshot once, then exit.")
@click.pass_context
def learner(ctx: click.Context, every: float, poll: float, once: bool) -> None:
    """Apply rewards in log order and publish versioned policy snapshots. A database error
    (unreachable, a failover) is reported and retried with backoff, as the workers' background
    thread does; with --once it is the command's error."""
    from ..errors import StorageError
    from . import open_engine

    eng = open_engine(_existing_url(ctx), upgrade=False)
    learned, last, backoff = 0, time.monotonic(), poll
    try:
        while True:
            try:
                learned += eng.sync()
                if learned and (once or time.monotonic() - last >= every):
                    n = eng.snapshot(if_newer=True)  # a model the stored snapshot holds: none
                    if n:
                        click.echo(f"snapshot of {n} policies after {learned} updates", err=True)
                    learned, last = 0, time.monotonic()
                backoff = poll
            except StorageError as exc:
                if once:
                    raise
                backoff = min(max(2 * backoff, 1.0), LEARNER_MAX_BACKOFF)
                first = " ".join(exc.message.split())[:300]
                click.echo(f"database error, retrying in {backoff:g} s: {first}", err=True)
                time.sleep(backoff)
                continue
            if once:
                return
            time.sleep(poll)
    except KeyboardInterrupt:  # pragma: no cover - interactive stop
        pass
    finally:
        eng.ledger.close()


COMMANDS = [serve, keys, demo, learner]
