"""The service's CLI commands: keys create|list|revoke, learner, demo (a real server)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest
import requests
from click.testing import CliRunner

from bandit_engine import Offer
from bandit_engine.api import open_engine
from bandit_engine.cli import main
from bandit_engine.governance import Governance, UnknownKey
from bandit_engine.ledger.sql import make_engine
from tests.api_fixtures import free_port, stop_server


def test_keys_create_list_revoke(tmp_path) -> None:
    """Creating and revoking a key are audited, and revoking a key already revoked (or one that
    never existed) is an error, not a second revocation in the audit log."""
    url = f"sqlite:///{tmp_path / 'k.db'}"
    runner = CliRunner()
    r = runner.invoke(main, ["--database-url", url, "keys", "create", "--role", "analyst", "--name", "bi"])
    assert r.exit_code == 0, r.output
    key = r.output.strip()
    assert key.startswith("bek_") and "\n" not in key  # the key alone on stdout
    gov = Governance(make_engine(url))
    assert gov.authenticate(key).role == "analyst"
    listed = runner.invoke(main, ["--database-url", url, "keys", "list"]).output
    assert "analyst\tbi" in listed and key not in listed  # never shown again
    kid = gov.list_keys()[0].key_id
    assert runner.invoke(main, ["--database-url", url, "keys", "revoke", str(kid)]).exit_code == 0
    assert Governance(make_engine(url)).authenticate(key) is None
    assert "revoked" in runner.invoke(main, ["--database-url", url, "keys", "list"]).output
    for again in (kid, 999):
        r = runner.invoke(main, ["--database-url", url, "keys", "revoke", str(again)])
        assert isinstance(r.exception, UnknownKey)
        assert str(r.exception) == f"no active key with id {again}"
    audit = [(e.actor, e.action, e.target, dict(e.detail)) for e in gov.audit_log()]
    assert audit == [("cli", "key.create", f"key:{kid}", {"role": "analyst", "name": "bi"}),
                     ("cli", "key.revoke", f"key:{kid}", {})]  # fmt: skip
    bad = runner.invoke(main, ["--database-url", url, "keys", "create", "--role", "root"])
    assert bad.exit_code != 0
    # revoking a key names the pending changes it withdrew
    admin_key, admin = gov.create_key("admin", name="ops")
    proposer = gov.authenticate(admin_key)
    cid = gov.propose("settings", "engine", {"member_cap": None}, proposer).change_id
    r = runner.invoke(main, ["--database-url", url, "keys", "revoke", str(admin.key_id)])
    assert r.exit_code == 0 and r.output.splitlines() == [
        f"revoked key {admin.key_id}", f"withdrew its pending changes: {cid}"], r.output
    assert gov.get_change(cid).status == "withdrawn"


def test_learner_publishes_a_snapshot(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'l.db'}"
    eng = open_engine(url, seed=1)
    eng.add_offer(Offer("a", ["email"], cost=1.0))
    eng.add_offer(Offer("b", ["email"], cost=1.0))
    for i in range(5):
        d = eng.choose(f"m-{i}", "email")
        eng.reward(d.event_id, 1.0)
    assert eng.ledger.latest_snapshot("email") is None
    r = CliRunner().invoke(main, ["--database-url", url, "learner", "--once"])
    assert r.exit_code == 0, r.output
    snap = eng.ledger.latest_snapshot("email")
    assert snap is not None and snap.feedback_seq == eng.ledger.last_feedback_seq() and snap.version >= 5
    assert "after 5 updates" in r.output
    # nothing new: a second run restores the snapshots, counts no update and writes none
    again = CliRunner().invoke(main, ["--database-url", url, "learner", "--once"])
    assert again.exit_code == 0 and "snapshot" not in again.output, again.output
    assert eng.ledger.latest_snapshot("email").created_at == snap.created_at
    d = eng.choose("m-6", "email")
    eng.reward(d.event_id, 1.0)
    third = CliRunner().invoke(main, ["--database-url", url, "learner", "--once"])
    assert "after 1 updates" in third.output, third.output  # not the restored versions again
    # a fresh worker restores that snapshot and serves its version without replaying
    fresh = open_engine(url, seed=1)
    assert fresh.choose("m-new", "email").policy_version == snap.version + 1
    fresh.ledger.close()
    eng.ledger.close()
    bad = CliRunner().invoke(main, ["--database-url", url, "learner", "--poll", "0"])
    assert bad.exit_code == 2 and "--poll" in bad.output


def _demo(url: str, port: int, printed: list[str] | None = None,
          ) -> tuple[subprocess.Popen[str], dict[str, str]]:  # fmt: skip
    """Start `bandit-engine demo` and read the keys it prints (every line it printed before
    serving goes to ``printed``)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bandit_engine.cli", "--database-url", url, "demo", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    keys: dict[str, str] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if printed is not None:
            printed.append(line.rstrip("\n"))
        parts = line.split()
        if len(parts) == 2 and parts[1].startswith("bek_"):
            keys[parts[0]] = parts[1]
        if line.startswith("serving on"):
            break
    for _ in range(100):
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc, keys
        except requests.RequestException:
            time.sleep(0.1)
    stop_server(proc)
    raise AssertionError("demo server did not come up")


def test_demo_serves_the_seeded_catalog_and_a_restart_replaces_its_keys(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    base = None
    proc, keys = _demo(url, port := free_port())
    try:
        assert set(keys) == {"decide", "analyst", "admin", "approver"}
        base = f"http://127.0.0.1:{port}"
        h = {"Authorization": f"Bearer {keys['decide']}"}
        d = requests.post(f"{base}/v1/choose", json={"member_id": "m1", "channel": "email"}, headers=h).json()
        assert d["offer_id"] in {"welcome-5", "home-10", "fashion-15"}  # the demo's email offers
        assert requests.post(f"{base}/v1/reward", json={"event_id": d["event_id"], "reward": 1},
                             headers=h).json()["status"] == "recorded"  # fmt: skip
        metrics = requests.get(f"{base}/metrics").text
        assert 'bandit_engine_decisions_total{channel="email",group="' in metrics
        r = requests.patch(f"{base}/v1/offers/home-10", json={"budget": 900.0},
                           headers={"Authorization": f"Bearer {keys['admin']}"})  # fmt: skip
        assert r.status_code == 202, r.text
        cid = r.json()["change_id"]
    finally:
        stop_server(proc)
    printed: list[str] = []
    proc, new_keys = _demo(url, port := free_port(), printed)
    try:
        # revoking the previous start's keys withdrew their pending change, and says so
        assert ("withdrew the pending changes of the previous start's demo keys: "
                f"{cid}") in printed, printed  # fmt: skip
        listed = requests.get(f"http://127.0.0.1:{port}/v1/changes?status=withdrawn",
                              headers={"Authorization": f"Bearer {new_keys['analyst']}"}).json()
        assert [c["change_id"] for c in listed["changes"]] == [cid], listed
        base = f"http://127.0.0.1:{port}"
        old = requests.get(f"{base}/v1/offers", headers={"Authorization": f"Bearer {keys['analyst']}"})
        assert old.status_code == 401  # the previous start's keys were revoked
        offers = requests.get(f"{base}/v1/offers", headers={"Authorization": f"Bearer {new_keys['analyst']}"}).json()
        assert len(offers["offers"]) == 5  # seeded once, not twice
        assert sum(o["spent"] for o in offers["offers"]) > 0  # the first run's reward is kept
    finally:
        stop_server(proc)


def _chunked(base: str, path: str, key: str, body: bytes) -> tuple[int, dict]:
    """POST ``body`` with ``Transfer-Encoding: chunked`` (no Content-Length), as streaming
    clients and proxies send it."""
    import http.client
    import json
    from urllib.parse import urlsplit

    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
        conn.request("POST", path, body=chunks, encode_chunked=True,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})  # fmt: skip
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_chunked_bodies_are_read_and_held_to_the_64_kib_limit(tmp_path) -> None:
    """Behind gunicorn a chunked body has no Content-Length: it is still refused over 64 KiB
    (413, nothing logged), accepted at exactly 64 KiB, and read (not skipped) on the routes
    whose body is optional."""
    import json

    def body_of(size: int, **fields: object) -> bytes:
        raw = json.dumps({"member_id": "m-c", "channel": "email", **fields}).encode()
        return raw[:-1] + b" " * (size - len(raw)) + b"}"  # padded with JSON whitespace

    url = f"sqlite:///{tmp_path / 'c.db'}"
    proc, keys = _demo(url, port := free_port())
    base = f"http://127.0.0.1:{port}"
    try:
        ledger = make_engine(url)

        def count() -> int:
            with ledger.connect() as c:
                return int(c.exec_driver_sql("SELECT count(*) FROM decisions").scalar())

        before = count()
        status, err = _chunked(base, "/v1/choose", keys["decide"], body_of(64 * 1024 + 1))
        assert (status, err["error"]["code"]) == (413, "payload_too_large")
        # the server answers 413 after 64 KiB and closes: a client still sending may see a reset
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            assert _chunked(base, "/v1/choose", keys["decide"], body_of(2_000_000))[0] == 413
        assert count() == before
        status, d = _chunked(base, "/v1/choose", keys["decide"], body_of(64 * 1024, activate=False))
        assert status == 200 and d["active"] is False  # exactly the limit, and the body was read
        assert count() == before + 1
        status, err = _chunked(base, f"/v1/events/{d['event_id']}/activate", keys["decide"], b'{"bogus": 1}')
        assert (status, err["error"]["code"]) == (422, "unknown_field")
        status, ok = _chunked(base, f"/v1/events/{d['event_id']}/activate", keys["decide"], b"")
        assert status == 200 and ok["active"] is True
        r = requests.put(f"{base}/v1/channels/email", json={"holdout_fraction": 0.1},
                         headers={"Authorization": f"Bearer {keys['admin']}"})  # fmt: skip
        status, ch = _chunked(base, f"/v1/changes/{r.json()['change_id']}/reject", keys["approver"],
                              b'{"reason": "superseded by a later change"}')  # fmt: skip
        assert status == 200 and ch["reason"] == "superseded by a later change"
        ledger.dispose()
    finally:
        stop_server(proc)


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library would send these) and read the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n", 400, "bad_request"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
         "request_header_fields_too_large"),
        (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(120)) + b"\r\n",
         431, "request_header_fields_too_large"),
        (b"POST /v1/choose HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_request"),
        (b"POST /v1/choose HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
         400, "bad_request"),
    ],
    ids=["request-line", "http-version", "header-name", "header-over-8k", "121-headers", "length", "smuggling"],
)
def test_what_gunicorn_refuses_is_answered_in_json(tmp_path, request_bytes: bytes, status: int, code: str) -> None:
    """Requests gunicorn refuses never reach Flask; the served worker answers them in the API's
    error shape too (gunicorn's own page is HTML), and the server keeps serving."""
    import json

    url = f"sqlite:///{tmp_path / 'g.db'}"
    proc, _ = _demo(url, port := free_port())
    try:
        got, headers, body = _raw(port, request_bytes)
        assert (got, headers["Content-Type"]) == (status, "application/json"), body
        err = json.loads(body)["error"]
        assert err["code"] == code and err["message"] and b"<" not in body
        assert int(headers["Content-Length"]) == len(body)
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        stop_server(proc)


def test_expire_closes_windows_and_learns_nothing(tmp_path) -> None:
    """`bandit-engine expire` beside running servers only closes windows: a model it learned
    and checkpointed on exit could step past a reward a server is still committing, which
    restarted workers would then never learn."""
    from bandit_engine import Engine, ManualClock

    url = f"sqlite:///{tmp_path / 'x.db'}"
    eng = Engine.open(url, clock=ManualClock(start_ms=int(time.time() * 1000) - 10 * 86_400_000), seed=1)
    eng.add_offer(Offer("a", ["email"], cost=1.0))
    eid = eng.choose("m-1", "email").event_id  # its 7-day window closed 3 days ago
    eng.ledger.close()
    r = CliRunner().invoke(main, ["--database-url", url, "expire"])
    assert r.exit_code == 0 and "expired 1 decisions" in r.output, r.output
    check = Engine.open(url, seed=1, learn_in_process=False)
    assert check.get_decision(eid).status == "expired"
    assert all(check.ledger.latest_snapshot(ch) is None for ch in check.channels())
    check.ledger.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bandit_engine.cli", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.parametrize("args,says", [
    (["--database-url", "notaurl", "keys", "list"], "unsupported database URL"),
    (["--database-url", "mysql://u@h/db", "expire"], "unsupported database URL"),
    (["--database-url", "postgresql+psycopg://postgres@127.0.0.1:1/x", "db", "upgrade"], "database error"),
    (["db", "upgrade", "--revision", "9999"], "schema migration"),
    (["db", "downgrade", "--revision", "9999"], "schema migration"),
    (["prune", "--older-than", "200", "--archive", "/nonexistent/dir/a.jsonl"], "No such file or directory"),
    (["prune", "--older-than", "1e308", "--no-archive"], "at most 36 500"),
])  # fmt: skip
def test_operator_errors_are_one_line_and_exit_2(tmp_path, args: list[str], says: str) -> None:
    if args[0] != "--database-url":
        url = f"sqlite:///{tmp_path / 'c.db'}"
        # prune and downgrade refuse a missing file (in process: a subprocess per case cost ~1 s)
        assert CliRunner().invoke(main, ["--database-url", url, "db", "upgrade"]).exit_code == 0
        args = ["--database-url", url, *args]
    r = _cli(*args)
    assert r.returncode == 2, r.stderr[-1500:]
    assert r.stderr.startswith("error: ") and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_database_host_that_never_answers_is_an_error_within_seconds() -> None:
    """libpq waits for ever by default: a database host that went silent (a partition) hung
    every command and request, and each new worker in its first connect. Here a listener that
    accepts connections and never answers."""
    import socket
    import threading

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        held: list[object] = []
        hold = threading.Thread(target=lambda: held.extend(srv.accept() for _ in range(3)))
        hold.daemon = True
        hold.start()
        url = f"postgresql+psycopg://postgres@127.0.0.1:{srv.getsockname()[1]}/test"
        t0 = time.monotonic()
        r = _cli("--database-url", url, "keys", "list")
        took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == "error: database error: connection timeout expired", r.stderr
    assert took < 30  # 5 s to connect, plus the interpreter's start


def test_read_commands_never_migrate_the_schema(tmp_path) -> None:
    """`keys list` upgraded a schema an operator had just downgraded for the older servers
    being rolled back to, and so did `evaluate`, `export-dsjson`, `expire`, `prune` and the
    `learner` (an analyst's newer checkout evaluating against production locked the running
    servers out); each says what to run instead, and changes nothing."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert CliRunner().invoke(main, ["--database-url", url, "db", "upgrade"]).exit_code == 0
    down = ["--database-url", url, "db", "downgrade", "--revision", "-1"]
    assert CliRunner().invoke(main, down).exit_code == 0
    before = CliRunner().invoke(main, ["--database-url", url, "db", "current"]).output
    for command in (
        ["keys", "list"], ["keys", "revoke", "1"], ["expire"], ["learner", "--once"],
        ["export-dsjson"], ["evaluate", "--channel", "email", "--policy", "thompson"],
        ["prune", "--older-than", "365", "--no-archive"],
    ):  # fmt: skip
        r = _cli("--database-url", url, *command)
        assert r.returncode == 2 and "run `bandit-engine db upgrade`" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        assert CliRunner().invoke(main, ["--database-url", url, "db", "current"]).output == before


def test_a_key_id_beyond_a_64_bit_integer_is_a_usage_error(tmp_path) -> None:
    """On SQLite it was a 53-line OverflowError traceback."""
    url = f"sqlite:///{tmp_path / 'c.db'}"
    assert CliRunner().invoke(main, ["--database-url", url, "db", "upgrade"]).exit_code == 0
    for key_id in ("9223372036854775808", "0"):
        r = CliRunner().invoke(main, ["--database-url", url, "keys", "revoke", key_id])
        assert r.exit_code == 2 and "Invalid value for 'KEY_ID'" in r.output, r.output


@pytest.mark.parametrize("command", [["serve"], ["demo"]])
def test_a_port_out_of_range_is_a_usage_error(command: list[str]) -> None:
    """Port 70000 was a traceback from the socket layer."""
    for port in ("70000", "-1"):
        r = CliRunner().invoke(main, [*command, "--port", port])
        assert r.exit_code == 2 and f"Invalid value for '--port': {port} is not in the range 0<=x<=65535" in r.output


@pytest.mark.parametrize("command", [
    ["keys", "list"], ["keys", "revoke", "1"], ["db", "downgrade", "--revision", "base"], ["expire"],
    ["learner", "--once"], ["prune", "--older-than", "200", "--no-archive"],
    ["serve", "--port", "0"],
])  # fmt: skip
def test_commands_that_read_or_maintain_a_ledger_refuse_a_sqlite_file_that_is_not_there(tmp_path, command) -> None:
    """A mistyped path created an empty database and read it ("expired 0 decisions", no keys),
    leaving the empty file behind; `serve` served it, answering every request 401."""
    typo = tmp_path / "bandt.db"
    r = _cli("--database-url", f"sqlite:///{typo}", *command)
    assert r.returncode == 2, r.stderr[-1500:]
    said = f"error: no ledger at sqlite:///{typo}: the SQLite file '{typo}' does not exist"
    if command[0] == "serve":  # what to run instead
        said += ("; set one up with `bandit-engine db upgrade` and give it a key with "
                 "`bandit-engine keys create`, or serve the demo with `bandit-engine demo`")
    assert r.stderr.strip() == said
    assert not list(tmp_path.iterdir())


def test_the_commands_that_set_a_database_up_still_create_it(tmp_path) -> None:
    """`db current` on a file that is not there reads no schema, says the file is missing and
    creates nothing; `db upgrade` and `keys create` create the file (`demo` too, `make run` on
    a fresh machine: test_demo_serves_the_seeded_catalog_and_a_restart_replaces_its_keys)."""
    url = f"sqlite:///{tmp_path / 'new.db'}"
    r = CliRunner().invoke(main, ["--database-url", url, "db", "current"])
    missing = f"base (empty: the SQLite file '{tmp_path / 'new.db'}' does not exist)"
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"schema at revision {missing}; head is "), r.output
    assert not list(tmp_path.iterdir())
    assert CliRunner().invoke(main, ["--database-url", url, "db", "upgrade"]).exit_code == 0
    assert (tmp_path / "new.db").is_file()
    for command in (["keys", "list"], ["expire"], ["learner", "--once"], ["db", "current"]):
        r = CliRunner().invoke(main, ["--database-url", url, *command])
        assert r.exit_code == 0, (command, r.output)
    other = f"sqlite:///{tmp_path / 'keys.db'}"
    assert CliRunner().invoke(main, ["--database-url", other, "keys", "create", "--role", "admin"]).exit_code == 0
