"""One registry of policy families: adding a family is one module plus one entry here."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

from ..catalog import PolicySpec
from ..errors import InvalidArgument, UnknownPolicy
from .base import Policy

_FAMILIES: dict[str, Callable[..., Policy]] = {}


def register(family: str, factory: Callable[..., Policy]) -> None:
    if family in _FAMILIES:
        raise ValueError(f"policy family {family!r} is already registered")
    _FAMILIES[family] = factory


def unregister(family: str) -> None:
    """Remove a family (e.g. simulation-only oracles registered for the length of a run)."""
    _FAMILIES.pop(family, None)


def families() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def make_policy(spec: PolicySpec | Mapping[str, Any], *, seed: int = 0) -> Policy:
    _load_builtin()
    if isinstance(spec, Mapping):
        spec = PolicySpec(**spec)
    factory = _FAMILIES.get(spec.family)
    if factory is None:
        known = [f for f in sorted(_FAMILIES) if not f.startswith("sim_")]  # the simulator's own
        raise UnknownPolicy(f"unknown policy family {spec.family!r}; known: {known}")
    try:
        return factory(seed=seed, **dict(spec.params))
    except TypeError as exc:  # unexpected keyword -> a clear configuration error, in the caller's terms
        accepted = [n for n in inspect.signature(factory).parameters if n not in ("self", "seed")]
        unknown = sorted(set(spec.params) - set(accepted))
        detail = f"unknown parameters {unknown}; accepted: {accepted}" if unknown else str(exc).split(") ", 1)[-1]
        raise InvalidArgument(f"bad parameters for policy {spec.family!r}: {detail}") from None


def records_history(family: str) -> bool | None:
    """Whether a family's decisions log the member x offer history it scores with
    (``Policy.uses_offer_context``; the engine summarizes it only for such a family): None for a
    family this process does not register, or whose factory does not say."""
    _load_builtin()
    flag = getattr(_FAMILIES.get(family), "uses_offer_context", None)
    return flag if isinstance(flag, bool) else None


_loaded = False
_load_lock = threading.Lock()


def _load_builtin() -> None:
    """Register the built-in families once. Threads may race here (a serving worker's first
    request and its background sync): the flag is set only once every family is registered,
    so no thread sees a partial registry."""
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        from . import baselines, linear, shared, thompson, vw

        for mod in (baselines, thompson, linear, shared, vw):
            for family, factory in mod.FAMILIES.items():
                register(family, factory)
        _loaded = True
