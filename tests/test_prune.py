"""Retention: ``Engine.prune`` / ``bandit-engine prune`` move old settled decisions, with their
rewards and feedback events, out of the ledger into an archive, and never anything the engine
still reads (SQLite and PostgreSQL)."""

from __future__ import annotations

import dataclasses
import io
import json
import threading

import pytest
from click.testing import CliRunner

from bandit_engine import ChannelConfig, Engine, ManualClock, MemberCap
from bandit_engine.cli import main
from bandit_engine.errors import InvalidArgument
from bandit_engine.evaluation import from_engine
from bandit_engine.ledger.records import Pruned, read_archive

from .conftest import catalog


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The SQL ledgers only (conftest's ``engine`` runs on them here): the in-memory one keeps
    everything."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")


def _history(engine: Engine, clock: ManualClock) -> dict[str, list[str]]:
    """200 days ago: 12 decisions rewarded (closed), 12 left open, 4 with no offer (sms has none);
    then 200 days later 6 fresh decisions. Returns the event ids by kind."""
    for o in catalog(3):
        engine.add_offer(o)
    ids: dict[str, list[str]] = {"rewarded": [], "unrewarded": [], "none": [], "recent": []}
    for i in range(24):
        d = engine.choose(f"m-{i}", "email", {"tier": "gold"})
        assert d.offer_id is not None
        if i % 2 == 0:
            engine.reward(d.event_id, 1.0 if i % 4 == 0 else 0.0)
            ids["rewarded"].append(d.event_id)
        else:
            ids["unrewarded"].append(d.event_id)
    for i in range(4):
        d = engine.choose(f"m-{i}", "sms", {})
        assert d.offer_id is None and d.status == "none"
        ids["none"].append(d.event_id)
    clock.advance(days=200)
    for i in range(6):
        ids["recent"].append(engine.choose(f"m-{i}", "email", {"tier": "gold"}).event_id)
    return ids


def _counters(engine: Engine) -> dict[str, tuple[int, int, int, int]]:
    return {k: (s.spent_cents, s.committed_cents, s.impressions, s.settled_cents)
            for k, s in engine.ledger.offer_states().items()}  # fmt: skip


def test_prune_moves_old_settled_decisions_to_the_archive_and_keeps_the_rest(
    engine: Engine, ledger_url: str, clock
) -> None:
    ids = _history(engine, clock)
    engine.snapshot()  # the email model's checkpoint covers the whole log
    money = _counters(engine)

    # the old unrewarded decisions are still open (no worker expired them): they stay
    out = io.StringIO()
    report = engine.prune(120, out)
    archived = list(read_archive(out.getvalue().splitlines()))
    assert report.pruned == len(archived) == 16  # 12 rewarded + 4 with no offer
    assert {p.decision.event_id for p in archived} == set(ids["rewarded"] + ids["none"])
    for eid in ids["rewarded"] + ids["none"]:
        assert engine.ledger.get_decision(eid) is None
    for eid in ids["unrewarded"] + ids["recent"]:
        assert engine.ledger.get_decision(eid) is not None
    assert engine.ledger.count_decisions() == 18
    assert report.uncheckpointed == ()

    # the archive holds each decision whole, with its reward and its feedback event
    by_id = {p.decision.event_id: p for p in archived}
    paid = by_id[ids["rewarded"][0]]  # i = 0: rewarded 1.0, booked the offer's cost
    assert paid.decision.status == "closed" and paid.decision.reward == 1.0
    assert paid.decision.context["tier"] == "gold" and paid.decision.pmf
    assert [(r.value, r.cost_cents) for r in paid.rewards] == [(1.0, paid.decision.spent_cents)]
    assert paid.decision.spent_cents > 0
    assert [(f.reward, f.kind) for f in paid.feedback] == [(1.0, "final")]
    assert by_id[ids["none"][0]].rewards == () and by_id[ids["none"][0]].feedback == ()
    assert Pruned.from_json(json.loads(json.dumps(paid.to_json()))) == paid
    # the ledger kept no reward or feedback event of a pruned decision
    pruned = {p.decision.event_id for p in archived}
    assert not {f.event_id for f in engine.ledger.feedback_after(0, 10_000)} & pruned

    # money and counters are the offers', not the decisions': untouched
    assert _counters(engine) == money

    # the unrewarded ones go once expired, with their feedback
    assert engine.expire() == 12
    out2 = io.StringIO()
    engine.snapshot()
    assert engine.prune(120, out2).pruned == 12
    assert {p.decision.event_id for p in read_archive(out2.getvalue().splitlines())} == set(ids["unrewarded"])
    assert engine.ledger.count_decisions() == 6
    assert engine.prune(120, None).pruned == 0  # nothing left that old

    # replay reproduces state: a fresh engine restores the checkpoint and replays the log's tail
    # past it, which is all there (the holes are behind the checkpoint)
    for eid in ids["recent"]:
        engine.reward(eid, 1.0)
    state = engine.policy("email").serialize()
    fresh = Engine.open(ledger_url, clock=clock, seed=7)
    try:
        assert fresh.policy("email").serialize() == state
        d = fresh.choose("m-new", "email", {"tier": "gold"})  # and it still serves
        assert d.offer_id is not None
    finally:
        fresh.ledger.close()


def test_prune_keeps_what_no_checkpoint_of_the_current_policy_covers(engine: Engine, clock) -> None:
    ids = _history(engine, clock)
    assert engine.expire() == 12

    # no checkpoint at all: what email learned from stays; sms (never learned) has nothing at risk
    report = engine.prune(120, None)
    assert report.pruned == 4 and report.uncheckpointed == ("email",)  # not sms, push, ...
    for eid in ids["rewarded"] + ids["unrewarded"]:
        assert engine.ledger.get_decision(eid) is not None

    # a checkpoint of another policy does not count: a worker running the new one replays from 0
    engine.snapshot()
    engine.set_channel(ChannelConfig("email", policy={"family": "thompson", "params": {"prior_beta": 2.0}}))
    report = engine.prune(120, None)
    assert report.pruned == 0 and report.covered["email"] == 0
    # once the new policy is checkpointed, its log is covered
    engine.policy("email")
    engine.snapshot()
    assert engine.prune(120, None).pruned == 24


def test_prune_refuses_to_cut_into_what_the_engine_reads(engine: Engine, clock) -> None:
    ids = _history(engine, clock)
    n = engine.ledger.count_decisions()
    assert engine.retention_floor_days() == 90
    for bad in (30, 89.9, True, float("nan"), float("inf"), "120", None):
        with pytest.raises(InvalidArgument):
            engine.prune(bad, None)  # type: ignore[arg-type]
    for bad_batch in (0, 10_001, 1.5, True):
        with pytest.raises(InvalidArgument):
            engine.prune(120, None, batch=bad_batch)  # type: ignore[arg-type]
    # a member cap window longer than the history raises the floor
    engine.set_member_cap(MemberCap(50, window_days=150))
    assert engine.retention_floor_days() == 150
    with pytest.raises(InvalidArgument, match="at least 150"):
        engine.prune(120, None)
    # and a long reward window too
    engine.set_channel(ChannelConfig("push", reward_window_days=200))
    assert engine.retention_floor_days() == 200
    assert engine.ledger.count_decisions() == n
    assert all(engine.ledger.get_decision(e) is not None for e in ids["rewarded"])


class _FailingArchive(io.StringIO):
    """Accepts ``ok`` batches, then fails (a full disk)."""

    def __init__(self, ok: int) -> None:
        super().__init__()
        self.ok = ok

    def write(self, s: str) -> int:
        if self.ok == 0:
            raise OSError(28, "No space left on device")
        self.ok -= 1
        return super().write(s)


def test_a_failing_archive_deletes_nothing_of_its_batch(engine: Engine, clock) -> None:
    ids = _history(engine, clock)
    engine.snapshot()
    archive = _FailingArchive(ok=1)
    with pytest.raises(OSError, match="No space"):
        engine.prune(120, archive, batch=5)
    done = {p.decision.event_id for p in read_archive(archive.getvalue().splitlines())}
    assert len(done) == 5  # the first batch: archived and deleted
    old = ids["rewarded"] + ids["none"]
    assert all((engine.ledger.get_decision(e) is None) == (e in done) for e in old)
    assert engine.ledger.count_decisions() == 34 - 5
    # the rest goes at the next run, into a working archive
    rest = io.StringIO()
    assert engine.prune(120, rest, batch=5).pruned == 11
    assert done.isdisjoint(p.decision.event_id for p in read_archive(rest.getvalue().splitlines()))


def test_concurrent_prunes_archive_each_decision_once(ledger_url: str, clock) -> None:
    first = Engine.open(ledger_url, clock=clock, seed=7)
    try:
        for o in catalog(3):
            first.add_offer(o)
        for i in range(300):
            d = first.choose(f"m-{i}", "email", {})
            first.reward(d.event_id, float(i % 2))
        first.snapshot()
        clock.advance(days=100)
    finally:
        first.ledger.close()
    engines = [Engine.open(ledger_url, clock=clock, seed=7) for _ in range(3)]
    archives = [io.StringIO() for _ in engines]
    counts: list[int] = []
    barrier = threading.Barrier(len(engines))

    def run(e: Engine, out: io.StringIO) -> None:
        barrier.wait()
        counts.append(e.prune(95, out, batch=20).pruned)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(engines, archives, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        seen = [[p.decision.event_id for p in read_archive(a.getvalue().splitlines())] for a in archives]
        flat = [e for ids in seen for e in ids]
        assert len(flat) == len(set(flat)) == sum(counts) == 300
        assert engines[0].ledger.count_decisions() == 0
    finally:
        for e in engines:
            e.ledger.close()


def test_the_memory_ledger_keeps_everything(clock) -> None:
    e = Engine.open("memory://", clock=clock)
    with pytest.raises(InvalidArgument, match="in-memory"):
        e.prune(120, None)


def test_cli_prunes_into_an_archive_that_evaluate_reads_back(tmp_path, clock) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    e = Engine.open(url, clock=clock, seed=7)
    try:
        ids = _history(e, clock)
        e.expire(clock.now_ms())
        for eid in ids["recent"]:
            e.reward(eid, 1.0)
        clock.advance(days=8)  # past the recent windows: evaluation reads closed windows only
        e.snapshot()
        before = len(from_engine(e))
    finally:
        e.ledger.close()
    archive = tmp_path / "archive.jsonl"
    runner = CliRunner()
    for args in ([], ["--archive", str(archive), "--no-archive"]):
        r = runner.invoke(main, ["--database-url", url, "prune", "--older-than", "120", *args])
        assert r.exit_code == 2 and "--no-archive" in r.output
    # the CLI's engine runs on the system clock, more than 120 days past the manual clock's
    # 2026-07-20: every settled decision is older than that (the recent ones too)
    r = runner.invoke(main, ["--database-url", url, "prune", "--older-than", "120", "--archive", str(archive)])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("pruned 34 decisions")
    assert len(archive.read_text().splitlines()) == 34
    r = runner.invoke(main, ["--database-url", url, "prune", "--older-than", "30", "--no-archive"])
    assert r.exit_code != 0 and "at least 90" in str(r.exception or r.output)
    e = Engine.open(url, clock=clock, seed=7)
    try:
        assert len(from_engine(e)) == 0  # every settled decision left the ledger...
        assert len(from_engine(e, archives=[archive])) == before == 30  # ...and is read back
        assert len(from_engine(e, archives=[archive, archive])) == before  # once each
    finally:
        e.ledger.close()
    r = runner.invoke(main, ["--database-url", url, "evaluate", "--policy", "uniform", "--archive", str(archive)])
    assert r.exit_code == 0, r.output
    assert "uniform" in r.output and "on " in r.output


def test_a_worker_passes_the_holes_a_prune_leaves_with_one_wait(engine: Engine, clock) -> None:
    """A prune leaves holes in the feedback log. A serving worker's reader (``GapSafeLedger``)
    takes a hole for an uncommitted insert until a higher seq has been visible for its grace;
    it used to wait that grace for each hole in turn, so a model rebuilt from the start of a
    pruned log (a new policy, an uncheckpointed channel) stalled every channel's learning for
    grace x holes. Now the holes below the log's top pass together after one grace."""
    import time

    from bandit_engine.api.sync import GapSafeLedger
    from bandit_engine.catalog import Offer

    for ch in ("email", "sms"):
        engine.add_offer(Offer(f"o-{ch}", [ch], cost=1.0))
    for i in range(30):  # email and sms feedback interleaved in the log
        for ch in ("email", "sms"):
            engine.reward(engine.choose(f"m-{i}", ch).event_id, float(i % 2))
    engine.snapshot()
    engine.set_channel(ChannelConfig("sms", policy={"family": "uniform"}))  # sms: no usable checkpoint
    clock.advance(days=200)
    assert engine.prune(120, None).pruned == 30  # email's, covered by its checkpoint
    log = getattr(engine.ledger, "inner", engine.ledger)  # on PostgreSQL the engine's is gap-safe
    kept = [f.seq for f in log.feedback_after(0, 10_000)]
    assert len(kept) == 30 and kept[-1] - len(kept) >= 29  # 30 holes between them

    reader, grace = GapSafeLedger(log, gap_grace=0.5), 0.5
    start, pos, got = time.monotonic(), 0, []
    while pos < kept[-1] and time.monotonic() - start < 10:
        batch = reader.feedback_after(pos, 4)
        if batch:
            got, pos = got + [f.seq for f in batch], batch[-1].seq
        else:
            time.sleep(0.02)
    elapsed = time.monotonic() - start
    assert got == kept
    assert grace <= elapsed < 3 * grace  # one wait; one per hole was 30 x 0.5 s


def test_events_after_a_prune_of_the_newest_rows_are_learned(ledger_url: str, clock) -> None:
    """SQLite numbered a new row max(seq) + 1: once a prune had deleted the newest feedback
    events (an idle ledger, every row old enough), the next ones took numbers at or below the
    checkpoint's log position, and neither the running engine nor one restoring the checkpoint
    ever learned them. Numbers are never handed out twice now (migration 0007)."""
    engine = Engine.open(ledger_url, clock=clock, seed=7)
    try:
        for o in catalog(3):
            engine.add_offer(o)
        for i in range(10):
            engine.reward(engine.choose(f"m-{i}", "email", {"tier": "gold"}).event_id, 1.0)
        engine.snapshot()
        log = getattr(engine.ledger, "inner", engine.ledger)  # the raw log (no gap-safe reader)
        top = max(f.seq for f in log.feedback_after(0, 1000))
        clock.advance(days=200)
        assert engine.prune(120, None).pruned == 10
        assert log.feedback_after(0, 1000) == []  # the newest events went too
        learned = engine.policy("email").version
        for i in range(3):
            engine.reward(engine.choose(f"n-{i}", "email", {"tier": "gold"}).event_id, 1.0)
        assert [f.seq > top for f in log.feedback_after(0, 1000)] == [True] * 3
        assert engine.policy("email").version == learned + 3  # learned in process
        state = engine.policy("email").serialize()
    finally:
        engine.ledger.close()
    fresh = Engine.open(ledger_url, clock=clock, seed=7, learn_in_process=False)
    try:  # restores the checkpoint, then replays what came after it
        assert fresh.policy("email").serialize() == state
    finally:
        fresh.ledger.close()


def test_an_archive_write_that_fails_leaves_no_torn_line(tmp_path, clock) -> None:
    """A batch whose archive write failed part-way (a full disk) deleted nothing, but left half
    a line in the archive; the re-run appended after it and the whole archive no longer read
    back (read_archive, evaluate --archive). A failed batch is cut from the file, and a torn
    last line already there (a crash in mid-write) is cut before the next batch."""
    import resource
    import signal
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    e = Engine.open(url, clock=clock, seed=7)
    try:
        for o in catalog(3):
            e.add_offer(o)
        for i in range(300):
            e.reward(e.choose(f"m-{i}", "email", {"tier": "gold"}).event_id, float(i % 2))
        e.snapshot()
        first = next(iter(e.ledger.decisions(limit=1)))
    finally:
        e.ledger.close()
    archive = tmp_path / "archive.jsonl"
    whole = json.dumps(Pruned(dataclasses.replace(first, event_id="earlier")).to_json())
    archive.write_text(whole + "\n" + whole[:40])  # an earlier run's line, then a torn one
    cmd = [sys.executable, "-m", "bandit_engine.cli", "--database-url", url, "prune",
           "--older-than", "180", "--archive", str(archive), "--batch", "200"]  # fmt: skip

    def small_disk() -> None:  # files stop growing past 150 kB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    r = subprocess.run(cmd, preexec_fn=small_disk, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "File too large" in r.stderr, r.stderr[-500:]
    text = archive.read_text()
    assert text.endswith("\n") and text.startswith(whole + "\n")  # the torn line is gone
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    with archive.open(encoding="utf-8") as f:
        ids = [p.decision.event_id for p in read_archive(f)]
    assert ids[0] == "earlier" and len(ids) == 1 + 300
