"""Reading PostgreSQL's feedback log in order: :class:`GapSafeLedger`.

PostgreSQL hands out feedback sequence numbers before commit, so a reader can see seq N+1 while
N is still uncommitted: reading past it would skip N for good (a model would never learn it,
and its snapshot would keep the loss). SQLite's writers are serialized and the in-memory
ledger numbers under its lock, so their logs commit in order; a
:class:`~bandit_engine.ledger.sql.SqlLedger` on PostgreSQL says it does not
(``commits_out_of_seq_order``) and :class:`~bandit_engine.engine.Engine` then reads its log
through this wrapper.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .records import Feedback

DEFAULT_GAP_GRACE = 2.0


class GapSafeLedger:
    """Wraps a ledger; ``feedback_after`` never returns rows past a young gap in ``seq``.

    A missing seq is either an insert not committed yet or a permanent hole (a rolled-back
    insert, or feedback ``prune`` moved to an archive). It is taken as permanent once some
    higher seq has been visible for ``gap_grace`` seconds: that seq was allocated after the
    missing one, so the missing one's transaction has had at least that long to commit. The
    reader keeps "horizons" (the log's highest visible seq, noted when a gap stops it): once a
    horizon is ``gap_grace`` old, every gap below it is passed at once. So a log with thousands
    of holes (a replay from the start after a prune) costs one wait, not one per hole.

    >>> from bandit_engine.ledger.records import Feedback
    >>> class L:
    ...     rows = [Feedback(1, "a", "email", 1.0, True), Feedback(3, "c", "email", 0.0, True),
    ...             Feedback(5, "e", "email", 0.0, True)]
    ...     def feedback_after(self, seq, limit=10_000):
    ...         return [f for f in self.rows if f.seq > seq]
    ...     def last_feedback_seq(self):
    ...         return 5
    >>> [f.seq for f in GapSafeLedger(L(), gap_grace=60).feedback_after(0)]
    [1]
    >>> [f.seq for f in GapSafeLedger(L(), gap_grace=0).feedback_after(0)]
    [1, 3, 5]
    """

    def __init__(self, inner: Any, *, gap_grace: float = DEFAULT_GAP_GRACE) -> None:
        self._inner = inner
        self.gap_grace = gap_grace
        self._horizon = 0  # every gap below this seq is permanent
        self._pending: list[tuple[float, int]] = []  # (when noted, highest visible seq then)
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
        with self._lock:
            for f in rows:
                if f.seq != prev + 1 and not self._permanent(f.seq):
                    break
                out.append(f)
                prev = f.seq
        return out

    def _permanent(self, after_gap: int) -> bool:
        """Whether the gap just below ``after_gap`` (a visible seq) is permanent."""
        now = time.monotonic()
        if after_gap > self._horizon_at(now) and (
            not self._pending or now - self._pending[-1][0] >= self.gap_grace / 4
        ):  # note the log's top now (at most 4 times per grace): it is the horizon a grace later
            self._pending.append((now, max(after_gap, int(self._inner.last_feedback_seq() or 0))))
        return after_gap <= self._horizon_at(now)

    def _horizon_at(self, now: float) -> int:
        """The horizon once every noted top at least ``gap_grace`` old has joined it."""
        while self._pending and now - self._pending[0][0] >= self.gap_grace:
            self._horizon = max(self._horizon, self._pending.pop(0)[1])
        return self._horizon
