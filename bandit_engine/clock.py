"""Injected time. The engine never reads the wall clock directly, so the simulator can run
days of campaign in seconds. Time is integer milliseconds since the Unix epoch (UTC)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

MS_PER_DAY = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to (simulations, tests).

    >>> c = ManualClock(start_ms=0)
    >>> c.advance(days=1.5); c.now_ms()
    129600000
    """

    def __init__(self, start_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01T00:00Z
        self._now = int(start_ms)

    def now_ms(self) -> int:
        return self._now

    def set(self, now_ms: int) -> None:
        if now_ms < self._now:
            raise ValueError(f"time cannot go backwards: {now_ms} < {self._now}")
        self._now = int(now_ms)

    def advance(self, *, days: float = 0.0, seconds: float = 0.0, ms: int = 0) -> None:
        self.set(self._now + int(days * MS_PER_DAY) + int(seconds * 1000) + int(ms))


def to_ms(value: datetime | int | float | str | None) -> int | None:
    """Accept a datetime (naive = UTC), an ISO-8601 string, or epoch milliseconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError("a timestamp cannot be a bool")
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    # exact integer arithmetic: int(timestamp() * 1000) truncates a float product, which
    # lands 1 ms early for about a quarter of the millisecond instants after 2038
    return (value - _EPOCH) // _ONE_MS


def iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (_EPOCH + timedelta(milliseconds=ms)).isoformat().replace("+00:00", "Z")
