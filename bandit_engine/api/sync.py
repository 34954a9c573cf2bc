"""Keeping each worker's policies current when several processes serve one database.

Design (documented in the README's HTTP section):

* Every API worker opens its Engine with ``learn_in_process=False`` and calls ``engine.sync()``
  at most once per ``sync_interval`` seconds (default 1 s) before a choose. ``sync()`` replays
  the feedback log tail in log order; policy state is a deterministic function of that ordered
  log, so every worker converges on the same model and version. The cost when nothing is new is
  one indexed query.
* ``bandit-engine learner`` runs the same replay in one process and writes a snapshot when
  something was learned (at most every ``--every`` seconds), so a (re)starting worker restores
  the latest snapshot and replays only the tail.
* PostgreSQL hands out feedback sequence numbers before commit, so a reader can see seq N+1
  while N is still uncommitted. :class:`GapSafeLedger` stops reading at such a gap and only
  skips it once it has stayed open for ``gap_grace`` seconds (a rolled-back insert leaves a
  permanent hole). Decisions therefore reflect new rewards within ``sync_interval`` (plus
  ``gap_grace`` in the rare case of an aborted reward transaction).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..ledger.records import Feedback

DEFAULT_SYNC_INTERVAL = 1.0
DEFAULT_GAP_GRACE = 2.0


class GapSafeLedger:
    """Wraps a ledger; ``feedback_after`` never returns rows past a young gap in ``seq``.

    >>> from bandit_engine.ledger.records import Feedback
    >>> class L:
    ...     def feedback_after(self, seq, limit=10_000):
    ...         return [f for f in [Feedback(1, "a", "email", 1.0, True),
    ...                             Feedback(3, "c", "email", 0.0, True)] if f.seq > seq]
    >>> [f.seq for f in GapSafeLedger(L(), gap_grace=60).feedback_after(0)]
    [1]
    >>> [f.seq for f in GapSafeLedger(L(), gap_grace=0).feedback_after(0)]
    [1, 3]
    """

    def __init__(self, inner: Any, *, gap_grace: float = DEFAULT_GAP_GRACE) -> None:
        self._inner = inner
        self.gap_grace = gap_grace
        self._gaps: dict[int, float] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @property
    def inner(self) -> Any:
        return self._inner

    def feedback_after(self, seq: int, limit: int = 10_000) -> list[Feedback]:
        rows = self._inner.feedback_after(seq, limit)
        out: list[Feedback] = []
        prev = seq
        now = time.monotonic()
        with self._lock:
            for f in rows:
                if f.seq != prev + 1:
                    first = self._gaps.setdefault(prev + 1, now)
                    if now - first < self.gap_grace:
                        break
                    self._gaps.pop(prev + 1, None)
                out.append(f)
                prev = f.seq
            if len(self._gaps) > 1000:
                self._gaps.clear()
        return out


class Syncer:
    """Calls ``engine.sync()`` at most once per ``interval`` seconds (0 = before every choose)."""

    def __init__(self, engine: Any, interval: float = DEFAULT_SYNC_INTERVAL) -> None:
        self.engine = engine
        self.interval = interval
        self._last = 0.0

    def maybe_sync(self) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        self.engine.sync()
