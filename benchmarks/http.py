"""HTTP benchmark: choose and choose+reward throughput and p50/p99 latency (and each request's
p99.9) at 1, 8 and 32
concurrent clients, on SQLite and PostgreSQL, against a bare Flask JSON endpoint (the floor)
served by the same gunicorn configuration (2 sync workers) in the same run, each engine figure
right after its floor. For choose+reward the floor also sends two requests (a choose and a
reward) per operation, so both sides do the same HTTP work.

    python -m benchmarks --only http [--quick]

PostgreSQL runs when ``BANDIT_ENGINE_BENCH_POSTGRES_URL`` (or
``BANDIT_ENGINE_TEST_POSTGRES_URL``) is set, in a fresh schema dropped afterwards. The load
generator is Python threads with keep-alive connections on the same 2 cores as the server, so
absolute numbers are lower than with wrk; the ratio to the floor is the figure to watch.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

WORKERS = 2
CLIENTS = (1, 8, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve_floor(port: int, workers: int) -> None:
    """A bare Flask JSON endpoint under gunicorn: the floor every engine figure is judged by."""
    from flask import Flask, request
    from gunicorn.app.base import BaseApplication

    class _App(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for k, v in {"bind": f"127.0.0.1:{port}", "workers": workers, "worker_class": "sync",
                         "accesslog": None, "keepalive": 5}.items():  # fmt: skip
                self.cfg.set(k, v)

        def load(self) -> Any:
            app = Flask("floor")

            @app.post("/v1/choose")
            def choose() -> Any:
                body = request.get_json()
                return {"event_id": uuid.uuid4().hex, "offer_id": "x", "member_id": body["member_id"]}

            @app.post("/v1/reward")
            def reward() -> Any:
                body = request.get_json()
                return {"event_id": body["event_id"], "status": "recorded"}

            @app.get("/healthz")
            def healthz() -> Any:
                return {"status": "ok"}

            return app

    _App().run()


def _wait(port: int, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited early")
        time.sleep(0.1)
    raise RuntimeError("server did not come up")


def _cpu_seconds(server_pid: int) -> tuple[float, float]:
    """CPU seconds used so far by a server (its process and its gunicorn workers) and by every
    PostgreSQL process, read from /proc (Linux; zeros elsewhere)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    server = db = 0.0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        ppid, cpu = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
        if int(entry) == server_pid or ppid == server_pid:
            server += cpu
        elif name.startswith("postgres"):
            db += cpu
    return server, db


def _measure(port: int, key: str, clients: int, seconds: float, with_reward: bool, pid: int,
             event_ids: bool = False) -> dict[str, float]:  # fmt: skip
    """``_load`` plus the CPU the server and PostgreSQL spent per operation meanwhile."""
    s0, d0 = _cpu_seconds(pid)
    m = _load(port, key, clients, seconds, with_reward, event_ids)
    s1, d1 = _cpu_seconds(pid)
    ops = m.pop("ops")
    return {**m, "server_cpu_ms": 1000 * (s1 - s0) / ops, "db_cpu_ms": 1000 * (d1 - d0) / ops}


def _load(port: int, key: str, clients: int, seconds: float, with_reward: bool,
          event_ids: bool = False) -> dict[str, float]:  # fmt: skip
    """Closed-loop load: each client sends its next request when the last one answered (with
    ``event_ids``, each choose carries a fresh ``event_id``, as a service that may retry sends)."""
    lat: list[list[float]] = [[] for _ in range(clients)]  # per operation (a pair: both)
    req: list[list[float]] = [[] for _ in range(clients)]  # per HTTP request
    stop = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}

    def client(i: int) -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            choose = {"member_id": f"m-{i}-{n % 500}", "channel": "email",
                      "context": {"tier": "gold", "visits": n % 7}}  # fmt: skip
            if event_ids:
                choose["event_id"] = uuid.uuid4().hex
            body = json.dumps(choose)
            c.request("POST", "/v1/choose", body, headers)
            r = c.getresponse()
            d = json.loads(r.read())
            if r.status != 200:
                raise RuntimeError(f"choose -> {r.status}: {d}")
            t1 = time.perf_counter()
            req[i].append(t1 - t0)
            if with_reward and d.get("offer_id"):
                c.request("POST", "/v1/reward",
                          json.dumps({"event_id": d["event_id"], "reward": float(n % 3 == 0)}), headers)  # fmt: skip
                r = c.getresponse()
                r.read()
                if r.status != 200:
                    raise RuntimeError(f"reward -> {r.status}")
                req[i].append(time.perf_counter() - t1)
            lat[i].append(time.perf_counter() - t0)
            n += 1
        c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = sorted(x for xs in lat for x in xs)
    n = len(all_lat)
    out = {
        "ops": max(1, n),
        "ops_per_s": n / wall,
        "p50_ms": _quantile(all_lat, 0.5),
        "p99_ms": _quantile(all_lat, 0.99),
    }
    requests = sorted(x for xs in req for x in xs)
    if with_reward:  # the pair's p99 is two requests; this is each request's
        out["request_p99_ms"] = _quantile(requests, 0.99)
    # the tail a periodic stall (a worker's policy sync, a WAL checkpoint) shows up in first
    out["request_p999_ms"] = _quantile(requests, 0.999)
    return out


def _quantile(xs: list[float], q: float) -> float:
    """``q``-quantile of sorted seconds, in ms."""
    return 1000 * xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def _setup_engine_db(url: str) -> str:
    from bandit_engine import Offer
    from bandit_engine.api import open_engine, open_governance

    eng = open_engine(url)
    try:
        for i, cat in enumerate(("home", "beauty", "grocery", "fashion", "toys", "travel", "pets", "garden")):
            eng.add_offer(Offer(f"bench-{i}", ["email"], cost=1.0 + i, budget=1e9,
                                features={"category": cat, "discount": 0.05 * (i + 1)}))  # fmt: skip
        return open_governance(eng).create_key("decide", name="bench")[0]
    finally:
        eng.ledger.close()


def _start(cmd: list[str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(port, proc)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _postgres_schema() -> tuple[str, str, str] | None:
    base = os.environ.get("BANDIT_ENGINE_BENCH_POSTGRES_URL") or os.environ.get("BANDIT_ENGINE_TEST_POSTGRES_URL")
    if not base:
        return None
    import psycopg

    schema = f"be_bench_{uuid.uuid4().hex[:10]}"
    raw = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(raw, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}", raw, schema


def run(quick: bool = False) -> list[dict[str, Any]]:
    """Each engine figure is measured right after its floor (same endpoint shape, same client
    count), with both servers up, so a load change on the machine hits both alike."""
    seconds = 1.5 if quick else 5.0
    clients = (1, 8) if quick else CLIENTS
    rows: list[dict[str, Any]] = []
    floor_port = _free_port()
    floor = _start([sys.executable, "-m", "benchmarks.http", "floor", str(floor_port), str(WORKERS)], floor_port)
    backends: list[tuple[str, str, Any]] = []
    tmp = tempfile.mkdtemp(prefix="be-bench-")
    backends.append(("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}", None))
    pg = _postgres_schema()
    if pg is not None:
        backends.append(("postgres", pg[0], pg))
    try:
        for name, url, cleanup in backends:
            try:
                key = _setup_engine_db(url)
                port = _free_port()
                proc = _start([sys.executable, "-m", "bandit_engine.cli", "--database-url", url, "serve",
                               "--workers", str(WORKERS), "--port", str(port)], port)  # fmt: skip
                try:
                    # the floor does the same HTTP work: one request for choose, two for choose+reward;
                    # choose with an event id (idempotent retries) at 8 clients only
                    for endpoint, with_reward, event_ids, counts in (
                        ("choose", False, False, clients), ("choose+reward", True, False, clients),
                        ("choose, event_id", False, True, (8,)),
                    ):  # fmt: skip
                        for n in counts:
                            f = _measure(floor_port, "", n, seconds, with_reward, floor.pid, event_ids)
                            m = _measure(port, key, n, seconds, with_reward, proc.pid, event_ids)
                            rows.append({
                                "backend": name, "endpoint": endpoint, "clients": n, **m,
                                "floor_ops_per_s": f["ops_per_s"], "floor_p99_ms": f["p99_ms"],
                                **({"floor_request_p99_ms": f["request_p99_ms"]} if with_reward else {}),
                                "floor_request_p999_ms": f["request_p999_ms"],
                                "floor_server_cpu_ms": f["server_cpu_ms"],
                                "vs_floor": m["ops_per_s"] / f["ops_per_s"],
                            })  # fmt: skip
                finally:
                    _stop(proc)
            finally:
                if cleanup is not None:
                    import psycopg

                    with psycopg.connect(cleanup[1], autocommit=True) as conn:
                        conn.execute(f'DROP SCHEMA IF EXISTS "{cleanup[2]}" CASCADE')
    finally:
        _stop(floor)
    return rows


if __name__ == "__main__":
    if sys.argv[1] == "floor":
        serve_floor(int(sys.argv[2]), int(sys.argv[3]))
