"""Request parsing: strict JSON (no NaN/Infinity), typed fields, no unknown fields.

Syntax problems are 400 (``invalid_json``, ``invalid_body``); well-formed JSON with wrong types
or values is 422 (``invalid_argument``, ``unknown_field``, ``missing_field``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from flask import request

from ..catalog import is_finite_number, is_text, shown
from ..errors import InvalidArgument
from .errors import ApiError

MAX_BODY_BYTES = 64 * 1024


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_QUERY_INT = re.compile(r"-?[0-9]{1,19}")
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)  # built once, not per request


def raw_body() -> bytes:
    """The request body; 413 over 64 KiB. Werkzeug refuses a longer ``Content-Length`` itself,
    but a chunked body has no length: its stream stops, silently, at the limit. One more byte
    from the server's input tells whether there was more."""
    raw = request.get_data(cache=True)
    if (
        request.content_length is None
        and len(raw) >= MAX_BODY_BYTES
        and request.environ["wsgi.input"].read(1)
    ):
        raise ApiError(413, "payload_too_large", "request body is larger than 64 KiB")
    return raw


def json_body() -> dict[str, Any]:
    """The request body as a JSON object."""
    body = optional_json_body()
    if body is None:
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    return body


def optional_json_body() -> dict[str, Any] | None:
    """The request body as a JSON object, or None when there is no body (chunked or not)."""
    raw = raw_body()
    if not raw:
        return None
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ApiError(400, "invalid_json", "the request body starts with a byte order mark; send UTF-8 without one")
    try:
        body = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, "invalid_json", f"malformed JSON body: {exc}"[:300]) from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", f"the request body must be a JSON object, got {type(body).__name__}")
    if _SUSPECT_ESCAPE.search(raw):  # rare: only then is every string checked
        _check_strings(body)
    return body


# A JSON escape that decodes to NUL or to a surrogate: both are valid JSON, but a lone surrogate
# is not Unicode text (it fails every UTF-8 encode: hashing, VW, the database) and PostgreSQL's
# text and jsonb cannot hold NUL. A valid surrogate pair matches too and passes the check.
_SUSPECT_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value or not is_text(value):
            raise InvalidArgument(
                f"strings must be valid Unicode text without NUL characters, got {shown(value, 40)}"
            )
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def fields(body: Mapping[str, Any], *, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise ApiError(422, "unknown_field", f"unknown fields: {unknown[:10]}")
    missing = [f for f in required if f not in body]
    if missing:
        raise ApiError(422, "missing_field", f"missing required fields: {missing}")


def string(body: Mapping[str, Any], name: str, *, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, str):
        raise InvalidArgument(f"{name} must be a string, got {type(v).__name__}")
    return v


def number(body: Mapping[str, Any], name: str, *, default: Any = None, nullable: bool = True) -> Any:
    if name not in body:
        return default
    v = body[name]
    if v is None and nullable:
        return None
    if not is_finite_number(v):
        raise InvalidArgument(f"{name} must be a finite number, got {shown(v)}")
    return v


def boolean(body: Mapping[str, Any], name: str, *, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise InvalidArgument(f"{name} must be a boolean, got {v!r}"[:200])
    return v


def obj(body: Mapping[str, Any], name: str, *, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidArgument(f"{name} must be a JSON object, got {type(v).__name__}")
    return v


def array(body: Mapping[str, Any], name: str, *, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return None
    if not isinstance(v, list):
        raise InvalidArgument(f"{name} must be a JSON array, got {type(v).__name__}")
    return v


def query_int(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not _QUERY_INT.fullmatch(raw):  # int() also takes " 10", "1_0" and non-ASCII digits
        raise InvalidArgument(f"query parameter {name} must be an integer, got {raw!r}"[:200])
    v = int(raw)
    if not lo <= v <= hi:
        raise InvalidArgument(f"query parameter {name} must be in [{lo}, {hi}], got {v}")
    return v
