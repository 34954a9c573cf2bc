"""A real ``bandit-engine serve`` process: what happens to the server when one of its workers
goes (a signal, a timeout's abort, a reload) or cannot boot."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from bandit_engine import Offer
from bandit_engine.api import open_engine, open_governance
from tests.api_fixtures import free_port, stop_server


def _children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (gunicorn's workers), from /proc."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


def _wait(check: Any, what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, dict[str, str]]]:
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    eng = open_engine(url)
    eng.add_offer(Offer("o1", ["email"], cost=1.0, features={"category": "home"}))
    key = open_governance(eng).create_key("decide", name="server-test")[0]
    eng.ledger.close()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bandit_engine.cli", "--database-url", url, "serve",
         "--workers", "2", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                return requests.get(f"{base}/healthz", timeout=5).status_code == 200
            except requests.RequestException:
                return False

        _wait(up, "the server to answer")
        _wait(lambda: len(_children(proc.pid)) == 2, "two workers")
        yield proc, base, {"Authorization": f"Bearer {key}"}
    finally:
        stop_server(proc)
        log.close()


def _decisions(base: str) -> float:
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("bandit_engine_decisions_total"))  # fmt: skip


@pytest.mark.slow
def test_a_worker_that_exits_is_replaced_and_the_counts_survive(server: Any) -> None:
    """A worker exiting by SystemExit (here SIGTERM to it alone) unwound through `serve`'s
    metrics block in the forked child and removed the directory every worker writes its
    counts to: /metrics lost them all, and the replacement worker failed to boot
    (FileNotFoundError), which made gunicorn's master stop the whole server."""
    proc, base, headers = server
    for i in range(5):
        r = requests.post(f"{base}/v1/choose", json={"member_id": f"m{i}", "channel": "email"},
                          headers=headers, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
    assert _decisions(base) == 5
    workers = _children(proc.pid)
    gone = min(workers)
    os.kill(gone, signal.SIGTERM)
    _wait(lambda: len(_children(proc.pid) - {gone}) == 2, "a replacement worker")
    time.sleep(1.0)  # the replacement boots (a failed boot stops the master within this)
    assert proc.poll() is None, "the master stopped"
    assert _decisions(base) == 5  # whichever worker answers
    for i in range(4):  # both workers serve, and count
        r = requests.post(f"{base}/v1/choose", json={"member_id": f"n{i}", "channel": "email"},
                          headers=headers, timeout=10)  # fmt: skip
        assert r.status_code == 200, r.text
    assert _decisions(base) == 9


class _Proxy:
    """A TCP proxy to the test database that can be cut (every connection reset, new ones
    refused) and restored on the same port: a database that goes away and comes back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list[Any] = []
        self._srv: Any = None
        self.restore()

    def restore(self) -> None:
        import socket
        import threading

        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._srv = srv

        def pipe(a: Any, b: Any) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        def accept() -> None:
            while True:
                try:
                    client, _ = srv.accept()
                except OSError:
                    return  # cut
                upstream = socket.create_connection(self.target)
                self._conns += [client, upstream]
                threading.Thread(target=pipe, args=(client, upstream), daemon=True).start()
                threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()

    def cut(self) -> None:
        import socket

        with contextlib.suppress(OSError):
            self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        for sock in self._conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._conns.clear()


@pytest.mark.slow
@pytest.mark.postgres
def test_the_learner_rides_out_a_database_outage(postgres_url: str, tmp_path: Path) -> None:
    """`bandit-engine learner` exited on the first database error (a 2 s outage: exit 2), so a
    deployment serving with --snapshot-interval 0 silently stopped checkpointing. It retries
    with backoff, and checkpoints what was learned meanwhile once the database is back."""
    from sqlalchemy.engine import make_url

    direct = make_url(postgres_url)
    proxy = _Proxy((direct.host or "127.0.0.1", direct.port or 5432))
    via_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    eng = open_engine(postgres_url)
    eng.add_offer(Offer("o1", ["email"], cost=1.0))
    eng.reward(eng.choose("m0", "email").event_id, 1.0)  # the learner's first checkpoint
    err = open(tmp_path / "learner.err", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bandit_engine.cli", "--database-url", via_proxy, "learner",
         "--every", "0.2", "--poll", "0.1"], stdout=subprocess.DEVNULL, stderr=err,
    )  # fmt: skip
    def checkpointed(version: int) -> bool:
        snap = eng.ledger.latest_snapshot("email")
        return snap is not None and snap.version >= version

    try:
        _wait(lambda: checkpointed(1), "the learner's first checkpoint")
        proxy.cut()
        d = eng.choose("m1", "email")
        eng.reward(d.event_id, 1.0)  # learned by the learner only once it reaches the database
        time.sleep(2.0)
        assert proc.poll() is None, (tmp_path / "learner.err").read_text()
        proxy.restore()
        _wait(lambda: checkpointed(2), "a checkpoint of the reward learned after the outage")
        assert proc.poll() is None
    finally:
        stop_server(proc)
        err.close()
        proxy.cut()
        eng.ledger.close()
    said = (tmp_path / "learner.err").read_text()
    assert "database error, retrying in" in said, said


@pytest.mark.slow
@pytest.mark.postgres
def test_a_worker_replaced_during_a_database_outage_boots_once_it_is_back(
    postgres_url: str, tmp_path: Path
) -> None:
    """A worker replaced while the database was down failed to boot, and gunicorn stops the
    whole server when a worker fails to boot: it stayed down after the database came back.
    The replacement retries until the database answers."""
    from sqlalchemy.engine import make_url

    direct = make_url(postgres_url)
    proxy = _Proxy((direct.host or "127.0.0.1", direct.port or 5432))
    via_proxy = direct.set(port=proxy.port).render_as_string(hide_password=False)
    eng = open_engine(postgres_url)
    eng.add_offer(Offer("o1", ["email"], cost=1.0))
    key = open_governance(eng).create_key("decide", name="outage")[0]
    headers = {"Authorization": f"Bearer {key}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "bandit_engine.cli", "--database-url", via_proxy, "serve",
         "--workers", "2", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def choose_ok() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            r = requests.post(f"{base}/v1/choose", json={"member_id": "m", "channel": "email"},
                              headers=headers, timeout=10)  # fmt: skip
        except requests.RequestException:
            return False
        return r.status_code == 200

    try:
        _wait(choose_ok, "the server to serve")
        _wait(lambda: len(_children(proc.pid)) == 2, "two workers")
        proxy.cut()
        gone = min(_children(proc.pid))
        os.kill(gone, signal.SIGKILL)
        _wait(lambda: len(_children(proc.pid) - {gone}) == 2, "a replacement worker")
        time.sleep(3.0)  # the replacement tries to boot against the missing database
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        proxy.restore()
        _wait(choose_ok, "the server to serve again")
        for _ in range(6):  # both workers, the replacement among them
            assert choose_ok()
        assert "database unreachable, retrying" in (tmp_path / "serve.log").read_text()
    finally:
        stop_server(proc)
        log.close()
        proxy.cut()
        eng.ledger.close()
