"""The request path's PostgreSQL plans stay index lookups when the ledger grows under them.

psycopg prepares a statement on its sixth execution, and PostgreSQL then settles on a generic
plan, which it keeps until something invalidates it: DDL, or statistics from (auto)vacuum or
ANALYZE. A serving connection makes its plans in its first seconds, while the tables are nearly
empty, where a scan of the wrong index or of the whole table costs the same as the right
lookup. Until the table is analyzed (never, where autovacuum is off, as on this project's CI
database), such a plan stays. Three did: a reward scanned every open decision (with a few thousand
open, a choose+reward pair cost PostgreSQL 3.7-6.7 ms of CPU instead of 1.1), and the sync's and
the expiry's batch lookups read the whole decisions table.

This test makes every statement's plan on near-empty tables (the tables' autovacuum switched off,
so nothing re-plans them), grows them to 20 000 rows without ANALYZE, and reads the plans
the same connection then runs (auto_explain, sent to the client as notices): every read of a
table that grows with traffic must go through the intended index. The catalog grows only by
catalog writes: a second test grows it from 6 offers to 2 006 under the plans of a 6-offer
catalog, and checks that a choose then reads the offers it needs by their key, not by a scan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import psycopg

from bandit_engine import ChannelConfig, Engine, MemberCap, Offer
from bandit_engine.engine import EngineConfig
from bandit_engine.ledger.sql import SqlLedger
from tests.conftest import _psycopg_url

GROWING = ("decisions", "feedback", "rewards", "members")
# statement -> {growing table: the index it must be read through}; statements that only insert
# into growing tables (or only touch offers, which hold the catalog) read none of them
EXPECTED: dict[str, dict[str, str]] = {
    "decision": {"decisions": "decisions_event_id_key"},
    "decision_lock": {"decisions": "decisions_event_id_key"},
    "decisions_in": {"decisions": "decisions_event_id_key"},
    "decision_for_reward": {
        "decisions": "decisions_event_id_key", "rewards": "ux_rewards_event_reward",
    },
    "settle_reward_cas": {"decisions": "decisions_pkey"},
    "settle_decision": {"decisions": "decisions_pkey"},
    "settle_many": {"decisions": "decisions_pkey"},
    "read_state": {"decisions": "ix_decisions_member_issued"},
    "history": {"decisions": "ix_decisions_member_issued"},
    "count_exposures": {"decisions": "ix_decisions_member_issued"},
    "count_offer_exposures": {"decisions": "ix_decisions_member_issued"},
    "touch_member": {"members": "members_pkey"},
    "due": {"decisions": "ix_decisions_status_deadline"},
    "feedback_after": {"feedback": "feedback_pkey"},
}
ROUNDS = 15  # > 11: psycopg prepares on the 6th execution, PostgreSQL goes generic after 5 more


def _normalized(sql: str) -> str:
    return re.sub(r"%\(\w+\)s|\$\d+", "?", " ".join(sql.split()))


def _reads(node: dict[str, Any], out: dict[str, set[str]]) -> dict[str, set[str]]:
    """{table: the indexes (or "Seq Scan") a plan reads it through}."""
    rel = node.get("Relation Name")
    if rel is not None and node["Node Type"] != "ModifyTable":
        if node["Node Type"] == "Bitmap Heap Scan":
            out.setdefault(rel, set()).update(_bitmap_indexes(node))
        else:
            out.setdefault(rel, set()).add(node.get("Index Name") or node["Node Type"])
    for child in node.get("Plans", []):
        if node["Node Type"] != "Bitmap Heap Scan":
            _reads(child, out)
    return out


def _bitmap_indexes(node: dict[str, Any]) -> set[str]:
    found = {node["Index Name"]} if "Index Name" in node else set()
    for child in node.get("Plans", []):
        found |= _bitmap_indexes(child)
    return found


def _traffic(eng: Engine, round_: int) -> None:
    """One round of everything the request path and a worker's background thread send."""
    n = f"{round_}"
    d = eng.choose(f"m{n}", "email", {"x": round_})  # read_state, member caps, reserve_and_insert
    eng.reward(d.event_id, 1.0)  # decision_for_reward, settle_reward_cas
    # reserve_insert_provisional, then decision_lock and settle_decision
    p = eng.choose(f"p{n}", "push", {"x": round_}, event_id=f"prov-{n}", active=False)
    eng.activate(p.event_id)
    eng.choose(f"q{n}", "sms", {"x": round_})  # no offers: insert_decision
    eng.ledger.member_history(f"m{n}", 0)  # history
    assert eng.get_decision(d.event_id).status == "closed"  # decision
    eng.clock.advance(days=8)  # past every reward window: due, settle_many, insert_feedbacks
    eng.expire()
    eng.sync()  # feedback_after, decisions_in


def _grow(url: str, n: int) -> None:
    """``n`` open decisions (as wide as served ones), feedback events, rewards and members,
    without ANALYZE."""
    payload = json.dumps({
        "eligible": [f"e{i}" for i in range(8)], "pmf": [0.125] * 8,
        "context": {f"feature_{j}": 0.123456 for j in range(30)},
        "offer_context": {}, "reason": None,
    })  # fmt: skip
    with _connect(url) as conn:
        conn.execute(
            "INSERT INTO decisions (event_id, member_id, channel, grp, offer_id, probability, "
            "policy_name, policy_version, issued_at, deadline, payload, reserved_cents, "
            "spent_cents, active, learnable, status, reward, reward_count) "
            "SELECT 'bulk-' || i, 'bulk-member-' || i, 'email', 'treatment', NULL, 1.0, "
            "'thompson', 0, 0, 9000000000000000, %s, 0, 0, true, false, 'open', NULL, 0 "
            "FROM generate_series(1, %s) i",
            (payload, n),
        )
        conn.execute(
            "INSERT INTO feedback (event_id, channel, reward, learn, kind) "
            "SELECT 'bulk-' || i, 'email', 0.0, false, 'reward' FROM generate_series(1, %s) i", (n,)
        )
        conn.execute(
            "INSERT INTO rewards (event_id, reward_id, value, cost_cents, at) "
            "SELECT 'bulk-' || i, 'bulk-' || i, 0.0, 0, 0 FROM generate_series(1, %s) i", (n,)
        )
        conn.execute(
            "INSERT INTO members (member_id, touches) "
            "SELECT 'bulk-member-' || i, 1 FROM generate_series(1, %s) i", (n,)
        )


def _explained(postgres_url: str) -> str:
    """``postgres_url`` for connections that send the plan of every statement they run to the
    client as a notice (auto_explain, loaded per session: the test user is a superuser)."""
    return postgres_url + "%20".join(
        ["", "-csession_preload_libraries%3Dauto_explain", "-cauto_explain.log_min_duration%3D0",
         "-cauto_explain.log_level%3Dnotice", "-cauto_explain.log_format%3Djson"]
    )  # fmt: skip


def _watch_plans(hot: Any, on_plan: Callable[[str, dict[str, set[str]]], None]) -> None:
    """Call ``on_plan(statement name, {table: indexes or "Seq Scan"})`` for every plan of the
    hot path's statements that this thread's connection runs from now on."""
    names = {_normalized(sql): name for name, sql in hot._sql.items()}

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        msg = diag.message_primary or ""
        if "plan:" in msg:
            explained = json.loads(msg[msg.index("plan:") + len("plan:") :])
            name = names.get(_normalized(explained["Query Text"]))
            if name is not None:
                on_plan(name, _reads(explained["Plan"], {}))

    hot._owned().connection.add_notice_handler(on_notice)


def _connect(url: str) -> psycopg.Connection[Any]:
    """A connection of the test's own to the schema of ``url`` (a ``postgres_url``)."""
    conn = psycopg.connect(_psycopg_url(url.split("?")[0]), autocommit=True)
    schema = re.search(r"search_path%3D(\w+)", url).group(1)  # type: ignore[union-attr]
    conn.execute(f'SET search_path = "{schema}"')
    return conn


def _serving_engine(postgres_url: str, clock: Any, frozen: tuple[str, ...]) -> Engine:
    """A worker's engine whose connection reports its plans (:func:`_explained`), on a 6-offer
    catalog over three channels (one learning provisionally, one without offers) with member
    caps; autovacuum is off on the ``frozen`` tables, so nothing re-plans them behind the
    test's back."""
    eng = Engine(SqlLedger(_explained(postgres_url)), clock=clock,
                 config=EngineConfig(learn_in_process=False))  # fmt: skip
    eng.set_channels([
        ChannelConfig("email"), ChannelConfig("push", provisional_reward=0.0),
        ChannelConfig("sms"),
    ])  # fmt: skip
    eng.set_member_cap(MemberCap(max=1000, window_days=30))  # count_exposures
    for i in range(3):
        eng.add_offer(Offer(f"e{i}", ["email"], cost=1.0, budget=10_000,
                            member_cap={"max": 1000, "window_days": 30}))  # fmt: skip
        eng.add_offer(Offer(f"p{i}", ["push"], cost=1.0, budget=10_000))
    with _connect(postgres_url) as conn:
        for table in frozen:
            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    return eng


def test_plans_made_on_small_tables_stay_index_lookups_as_the_tables_grow(
    postgres_url, clock
) -> None:
    eng = _serving_engine(postgres_url, clock, GROWING)
    try:
        for r in range(ROUNDS):  # the plans are made here, on tables of a few dozen rows
            _traffic(eng, r)
        _grow(postgres_url, 20_000)

        plans: dict[str, dict[str, set[str]]] = {}

        def on_plan(name: str, reads: dict[str, set[str]]) -> None:
            plans[name] = {t: i for t, i in reads.items() if t in GROWING}

        _watch_plans(eng.ledger._hot, on_plan)  # type: ignore[attr-defined]
        _traffic(eng, ROUNDS)
    finally:
        eng.ledger.close()

    assert set(EXPECTED) <= set(plans), f"statements not exercised: {set(EXPECTED) - set(plans)}"
    wrong = {
        name: reads for name, reads in plans.items()
        if reads != {t: {i} for t, i in EXPECTED.get(name, {}).items()}
    }  # fmt: skip
    assert not wrong, f"plans reading a growing table other than through its index: {wrong}"


def test_plans_on_the_offers_table_are_re_made_when_the_catalog_grows(postgres_url, clock) -> None:
    """The catalog is tiny when a worker's connections make their plans, so reading offers by a
    scan is right then; it grows only through catalog writes, which move the catalog version,
    and a connection re-makes its plans after the version moved (``DEALLOCATE ALL``)."""
    eng = _serving_engine(postgres_url, clock, ("offers",))
    admin = SqlLedger(postgres_url)  # another process's catalog writes
    try:
        for r in range(ROUNDS):
            _traffic(eng, r)
        for i in range(2_000):
            admin.put_offer(Offer(f"bulk-{i}", ["site"], cost=1.0, budget=10_000))

        plans: dict[str, set[str]] = {}

        def on_plan(name: str, reads: dict[str, set[str]]) -> None:
            plans.setdefault(name, set()).update(reads.get("offers", ()))

        eng.offers()  # the engine reads the catalog version: it moved
        for r in range(ROUNDS, 2 * ROUNDS):  # the statements are prepared again
            _traffic(eng, r)
        _watch_plans(eng.ledger._hot, on_plan)  # type: ignore[attr-defined]
        _traffic(eng, 2 * ROUNDS)
    finally:
        admin.close()
        eng.ledger.close()
    assert plans.get("read_state") == {"offers_pkey"}, plans
    scans = {name: reads for name, reads in plans.items() if "Seq Scan" in reads}
    assert not scans, f"statements scanning the grown catalog: {scans}"


def test_a_rolled_back_choose_keeps_the_connections_prepared_statements(
    postgres_url, clock
) -> None:
    """A choose under member caps runs in a transaction, which a re-sent event id or a cap
    broken since the read (a lost race) rolls back. psycopg's own ROLLBACK would have dropped
    every prepared statement of the connection (``DEALLOCATE ALL``), so after each such choose
    the request path's statements were parsed and planned anew for five executions each."""
    # history_limit=1: the engine sees one of the member's exposures, the ledger's cap check
    # counts both, so the third choose loses its race with the cap deterministically
    eng = Engine(SqlLedger(postgres_url), clock=clock,
                 config=EngineConfig(learn_in_process=False, history_limit=1))  # fmt: skip
    eng.set_channel(ChannelConfig("email"))
    eng.set_member_cap(MemberCap(max=2, window_days=30))
    eng.add_offer(Offer("e0", ["email"], cost=1.0, budget=10_000))
    hot = eng.ledger._hot  # type: ignore[attr-defined]

    def prepared() -> set[tuple[str, str]]:
        with hot._connection() as cur:
            return set(cur.execute("SELECT name, statement FROM pg_prepared_statements").fetchall())

    try:
        for r in range(ROUNDS):  # prepares the member-capped choose's statements
            eng.choose(f"m{r}", "email", event_id=f"ev-{r}")
        before = prepared()
        texts = {_normalized(sql) for _, sql in before}
        assert {name for name, sql in hot._sql.items() if _normalized(sql) in texts} >= {
            "read_state", "member_row", "touch_member", "count_exposures", "reserve_and_insert",
        }, before
        assert eng.choose("m0", "email", event_id="ev-0").resent  # the insert fails: rolled back
        assert prepared() == before
        eng.choose("m1", "email")  # m1's second exposure
        lost = eng.choose("m1", "email")  # sees one exposure, the cap check counts two
        assert (lost.offer_id, lost.reason) == (None, "member_cap")
        assert prepared() == before
    finally:
        eng.ledger.close()


def test_choose_keeps_working_across_catalog_writes_at_any_point_of_a_connections_life(
    postgres_url, clock
) -> None:
    """Each catalog write makes a connection drop its prepared statements (``DEALLOCATE ALL``)
    before its next operation, and psycopg must forget them with it. It did not when the
    connection had sent a ``DEALLOCATE ALL`` before it had prepared anything (a catalog write in
    a worker's first requests): psycopg then counted that text as an ordinary statement and
    skipped its check the next time, so the server dropped the statements while psycopg kept
    running them by name, and every choose on the connection failed until a restart."""
    eng = Engine(SqlLedger(postgres_url), clock=clock)
    hot = eng.ledger._hot  # type: ignore[attr-defined]

    def prepared() -> int:
        with hot._connection() as cur:
            return int(cur.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0])

    try:
        eng.add_offer(Offer("a", ["email"], cost=1.0))
        eng.choose("m0", "email")  # the thread's connection opens
        eng.add_offer(Offer("w0", ["email"], cost=1.0))
        assert prepared() == 0  # this drop comes before anything is prepared
        served = 0
        for write in range(1, 4):
            for r in range(ROUNDS):  # prepares the choose's statements (6th execution on)
                served += eng.choose(f"m{write}-{r}", "email").offer_id is not None
            assert prepared() > 0
            eng.add_offer(Offer(f"w{write}", ["email"], cost=1.0))
        served += sum(eng.choose(f"last-{r}", "email").offer_id is not None for r in range(ROUNDS))
    finally:
        eng.ledger.close()
    assert served == 4 * ROUNDS
