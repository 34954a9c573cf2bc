"""JSON errors, mapped in one place: ``{"error": {"code", "message"}}``.

Engine errors carry their own ``code`` and ``status``; HTTP errors (404 route, 405, 413) keep
their status with a snake_case code; anything unexpected is a logged 500 without a trace.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from ..errors import BanditEngineError

log = logging.getLogger("bandit_engine.api")

_HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 411: "length_required",
    413: "payload_too_large", 415: "unsupported_media_type", 429: "too_many_requests",
}  # fmt: skip


class ApiError(BanditEngineError):
    """An error raised by the HTTP layer itself (malformed JSON, bad query string...)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def error_response(status: int, code: str, message: str) -> Response:
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(BanditEngineError)
    def _engine_error(exc: BanditEngineError) -> Any:
        if exc.status >= 500:
            log.error("server-side error: %s", exc.message)
        resp = error_response(exc.status, exc.code, exc.message)
        if exc.status == 401:  # RFC 9110: a 401 names the scheme to authenticate with
            resp.headers["WWW-Authenticate"] = 'Bearer realm="bandit_engine"'
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = {
            404: "no such route",
            405: "method not allowed on this route",
            413: "request body is larger than 64 KiB",
        }.get(status, exc.description or exc.name)
        resp = error_response(status, code, message)
        if status == 405 and exc.response is None:
            allowed = getattr(exc, "valid_methods", None)
            if allowed:
                resp.headers["Allow"] = ", ".join(allowed)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; it has been logged")
