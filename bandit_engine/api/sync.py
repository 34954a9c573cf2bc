"""Keeping each worker's policies current when several processes serve one database.

Design (documented in the README's HTTP section):

* Every API worker opens its Engine with ``learn_in_process=False`` and a background thread
  (:class:`Syncer`) calls ``engine.sync()`` every ``sync_interval`` seconds (default 1 s).
  ``sync()`` replays the feedback log tail in log order; policy state is a deterministic
  function of that ordered log, so every worker converges on the same model and version. The
  cost when nothing is new is one indexed query. The thread learns in chunks of
  :data:`SYNC_CHUNK` events and holds the engine lock for one chunk at a time, so a request
  never pays for learning a whole interval of feedback (when a request paid for the sync, its
  latency grew with the feedback rate: ~30 ms for a second of ~450 rewards on PostgreSQL). The
  thread starts with the worker (``serve``) or on its first choose, and once at start loads
  every channel's model, so the first decisions do not wait for a snapshot restore either.
  With ``sync_interval = 0`` the sync runs in the request before every choose instead
  (deterministic; what the tests' in-process apps use).
* The same thread closes reward windows: every ``expire_interval`` seconds (default 60 s,
  and once at start) it calls ``engine.expire()``, so a decision whose window passed without
  a reward gets its channel's default reward, its reservation goes back to the budget, and the
  miss is learned by the next sync, with no cron job to forget (a forgotten one would leave budgets
  held by liability for ever and models that never hear of a miss). Every worker does it; on
  PostgreSQL the workers split the due rows (``FOR UPDATE SKIP LOCKED``) instead of queueing
  behind each other, and on SQLite expiry takes the write lock like any writer. A window
  closes at most ``expire_interval`` (+ ``interval``) late; a reward arriving meanwhile is
  rejected all the same (the deadline, not the status, decides).
* The thread also checkpoints: every ``snapshot_interval`` seconds (default 300 s) it writes a
  snapshot of each model it has learned further than the latest stored one, so a (re)starting
  worker restores it and replays only the tail (a replay from the start learns 10 000 to
  17 000 events a second, so without checkpoints a start would take a minute more per
  0.6-1 million events of history). With several workers each writes its own, identical ones
  for the same log position (the ledger keeps the 3 newest per model). ``bandit-engine learner`` does the same replay
  and checkpointing in one process, for deployments that keep serving workers from writing
  them (``--snapshot-interval 0``).
* PostgreSQL hands out feedback sequence numbers before commit, so a reader can see seq N+1
  while N is still uncommitted. :class:`GapSafeLedger` stops reading at such a gap and only
  skips it once a higher seq has been visible for ``gap_grace`` seconds (a rolled-back insert,
  or ``prune``, leaves a permanent hole; all the holes below one such seq are skipped at once). Decisions therefore reflect new rewards within ``sync_interval`` (plus
  ``gap_grace`` in the rare case of an aborted reward transaction).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ..ledger.gapsafe import DEFAULT_GAP_GRACE, GapSafeLedger

DEFAULT_SYNC_INTERVAL = 1.0
DEFAULT_EXPIRE_INTERVAL = 60.0
DEFAULT_SNAPSHOT_INTERVAL = 300.0
# events learned per hold of the engine lock by the background sync: ~1-5 ms of learning
SYNC_CHUNK = 64
log = logging.getLogger("bandit_engine.sync")
# the log reader an engine on PostgreSQL uses (bandit_engine.ledger.gapsafe), still importable
# from here
__all__ = ["DEFAULT_GAP_GRACE", "GapSafeLedger", "Syncer"]


class Syncer:
    """Keeps one process's engine current with the ledger: three background tasks.

    ``interval > 0``: a daemon thread runs, each at its own pace,

    * ``sync``: at once, then every ``interval`` seconds, in chunks of ``chunk`` events;
    * ``expire``: closes due reward windows at once, then every ``expire_interval`` seconds;
      how many it closed goes to ``on_expired``;
    * ``snapshot``: every ``snapshot_interval`` seconds, checkpoints the models this process has
      learned further than the stored snapshots (``Engine.snapshot(if_newer=True)``), so a
      restarting worker replays the log's tail only, with no learner process to run.

    An interval of 0 turns ``expire`` or ``snapshot`` off. :meth:`maybe_sync` (called before
    every choose) only makes sure the thread runs in this process (a thread does not survive
    ``fork``). A failed task (the database away) is logged, reported to ``on_error`` with its
    name and retried at its next turn; requests go on deciding with the policies they have.

    ``interval == 0``: :meth:`maybe_sync` syncs in the calling thread, every time, and there is
    no thread: nothing expires or is checkpointed by itself (a deterministic mode for tests and
    single-threaded embedding).
    """

    def __init__(self, engine: Any, interval: float = DEFAULT_SYNC_INTERVAL, *, chunk: int = SYNC_CHUNK,
                 expire_interval: float = DEFAULT_EXPIRE_INTERVAL,
                 snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL,
                 on_error: Callable[[str], None] | None = None,
                 on_expired: Callable[[int], None] | None = None) -> None:  # fmt: skip
        for name, value in (("sync", interval), ("expiry", expire_interval), ("snapshot", snapshot_interval)):
            if not value >= 0:
                raise ValueError(f"{name} interval must be >= 0 seconds, got {value!r}")
        self.engine = engine
        self.interval = interval
        self.chunk = chunk
        self.expire_interval = expire_interval
        self.snapshot_interval = snapshot_interval
        self.on_error = on_error  # called with the task's name after it failed (a metrics counter)
        self.on_expired = on_expired
        self._pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def maybe_sync(self) -> None:
        if self.interval <= 0:
            self.engine.sync()
        elif self._pid != os.getpid():
            self.start()

    def start(self) -> None:
        """Start this process's sync thread (no-op if it runs, or with ``interval == 0``)."""
        with self._start_lock:
            if self.interval <= 0 or self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._loop, args=(self._stop,), name="bandit-engine-sync", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this process's thread and wait for its current task to end (before closing the
        engine's ledger in process; a served worker's daemon thread ends with the worker)."""
        with self._start_lock:
            self._stop.set()
            thread, self._thread, self._pid = self._thread, None, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _expire(self) -> None:
        n = self.engine.expire()
        if self.on_expired is not None:
            self.on_expired(n)

    def _loop(self, stop: threading.Event) -> None:
        # (name, seconds between runs or None for every turn, task); off at 0 seconds
        tasks: list[tuple[str, float | None, Callable[[], Any]]] = [
            ("expire", self.expire_interval, self._expire),
            ("sync", None, lambda: self.engine.sync(chunk=self.chunk)),
            ("snapshot", self.snapshot_interval, lambda: self.engine.snapshot(if_newer=True)),
        ]
        # at once: expiry (what came due while no worker ran) and sync; the first checkpoint
        # after an interval of learning
        due = {"expire": time.monotonic(), "snapshot": time.monotonic() + self.snapshot_interval}
        while not stop.is_set():
            for name, every, task in tasks:
                if every is not None:
                    if every <= 0 or time.monotonic() < due[name]:
                        continue
                    due[name] = time.monotonic() + every
                try:
                    task()
                except Exception:  # the database away: keep serving, retry at the next turn
                    if self.on_error is not None:
                        self.on_error(name)
                    log.exception("background %s failed; retrying in %.1f s", name, every or self.interval)
            stop.wait(self.interval)
