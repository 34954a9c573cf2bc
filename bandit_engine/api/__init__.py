"""The HTTP service: a Flask app factory with one Engine in ``app.extensions``.

>>> app = create_app({"DATABASE_URL": "sqlite://"})
>>> app.test_client().get("/healthz").json["status"]
'ok'
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, g, request

from ..engine import Engine, EngineConfig
from ..governance import Governance
from .errors import register_error_handlers
from .sync import (
    DEFAULT_EXPIRE_INTERVAL,
    DEFAULT_GAP_GRACE,
    DEFAULT_SNAPSHOT_INTERVAL,
    DEFAULT_SYNC_INTERVAL,
    Syncer,
)
from .validate import MAX_BODY_BYTES

MODEL_WAIT = 10.0  # seconds a choose waits for its channel's model while it is built
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

DEFAULTS: dict[str, Any] = {
    "DATABASE_URL": "sqlite:///bandit.db",
    "SEED": 0,
    "SYNC_INTERVAL": DEFAULT_SYNC_INTERVAL,  # seconds between policy syncs per worker
    "EXPIRE_INTERVAL": DEFAULT_EXPIRE_INTERVAL,  # seconds between closings of due reward windows
    "SNAPSHOT_INTERVAL": DEFAULT_SNAPSHOT_INTERVAL,  # seconds between policy checkpoints
    "GAP_GRACE": DEFAULT_GAP_GRACE,
    "CLOCK": None,  # an injected Clock (tests, simulations)
}


def open_engine(url: str, *, seed: int = 0, clock: Any = None, gap_grace: float = DEFAULT_GAP_GRACE,
                model_wait: float = MODEL_WAIT, upgrade: bool = True) -> Engine:  # fmt: skip
    """An Engine for a serving worker: learning happens by replaying the ordered feedback log
    (``sync``), never from this process's own writes, so every worker and the learner agree.
    On PostgreSQL the engine reads that log through a :class:`GapSafeLedger`. A choose whose
    channel's model is still being built waits ``model_wait`` seconds for it, then is a 503
    (``model_loading``), well inside gunicorn's worker timeout (60 s): a long rebuild (a large
    log, no usable snapshot) no longer gets the worker killed and rebuilt again from zero.
    ``upgrade=False``: the schema must be at head already (the learner: :class:`SqlLedger`)."""
    if url == "memory://":
        from ..ledger.memory import MemoryLedger

        ledger: Any = MemoryLedger()
    else:
        from ..ledger.sql import SqlLedger

        # no WAL checkpoint in a request
        ledger = SqlLedger(url, background_checkpoints=True, upgrade=upgrade)
    config = EngineConfig(seed=seed, learn_in_process=False, gap_grace=gap_grace,
                          model_wait=model_wait)
    return Engine(ledger, clock=clock, config=config)


def open_governance(engine: Engine) -> Governance:
    inner = getattr(engine.ledger, "inner", engine.ledger)
    sa_engine = getattr(inner, "engine", None)
    if sa_engine is None:
        return Governance.in_memory(clock=engine.clock)
    return Governance(sa_engine, clock=engine.clock)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app. ``config`` keys: DATABASE_URL, SEED, SYNC_INTERVAL, EXPIRE_INTERVAL,
    SNAPSHOT_INTERVAL, GAP_GRACE, CLOCK, or ENGINE (a ready Engine, for tests)."""
    app = Flask(__name__)
    # before any route is added: "//" is a 404 like any unknown path (not werkzeug's redirect,
    # an HTML page), and OPTIONS a 405 like any other method a route does not take (not an
    # empty 200 without a key)
    app.url_map.merge_slashes = False
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False  # type: ignore[attr-defined]
    eng = app.config.get("ENGINE") or open_engine(
        app.config["DATABASE_URL"], seed=int(app.config["SEED"]), clock=app.config["CLOCK"],
        gap_grace=float(app.config["GAP_GRACE"]),
    )  # fmt: skip
    app.extensions["bandit_engine"] = eng
    app.extensions["bandit_engine.governance"] = open_governance(eng)
    from .metrics import Metrics  # here, not at import: `serve` sets up multiprocess metrics first

    metrics = app.extensions["bandit_engine.metrics"] = Metrics(eng)
    app.extensions["bandit_engine.syncer"] = Syncer(
        eng, float(app.config["SYNC_INTERVAL"]), expire_interval=float(app.config["EXPIRE_INTERVAL"]),
        snapshot_interval=float(app.config["SNAPSHOT_INTERVAL"]),
        on_error=metrics.background_failed,
        on_expired=metrics.expired.inc,
    )
    register_error_handlers(app)

    from .openapi import openapi_document
    from .views import bp

    app.register_blueprint(bp)

    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        t0 = g.get("t0")
        if t0 is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            # a label per method name a client invents would grow the series without bound
            method = request.method if request.method in _HTTP_METHODS else "other"
            current_app.extensions["bandit_engine.metrics"].latency.labels(
                rule, method).observe(time.perf_counter() - t0)  # fmt: skip
        return resp

    @app.get("/healthz")
    def healthz() -> Any:
        eng.ledger.catalog_version()  # the database answers
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        body = current_app.extensions["bandit_engine.metrics"].render()
        return Response(body, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json")
    def openapi() -> Any:
        return openapi_document()

    return app


__all__ = ["create_app", "open_engine", "open_governance"]
