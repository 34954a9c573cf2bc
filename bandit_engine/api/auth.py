"""Bearer-key authentication and role checks. Missing or unknown key -> 401; wrong role -> 403."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from flask import current_app, g, request

from ..errors import Forbidden, Unauthorized
from ..governance import Governance, Principal

F = TypeVar("F", bound=Callable[..., Any])

READERS = ("analyst", "admin", "approver")


def principal() -> Principal:
    return g.principal  # type: ignore[no-any-return]


def requires(*roles: str) -> Callable[[F], F]:
    """Guard a view: the caller's key must hold one of ``roles``."""

    def deco(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            header = request.headers.get("Authorization", "")
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            gov: Governance = current_app.extensions["bandit_engine.governance"]
            p = gov.authenticate(key.strip())
            if p is None:
                raise Unauthorized("unknown or revoked API key")
            if p.role not in roles:
                raise Forbidden(f"role {p.role!r} may not call this route; needs one of {list(roles)}")
            g.principal = p
            return fn(*args, **kwargs)

        wrapper.roles = roles  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return deco
