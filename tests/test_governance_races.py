"""Two approvers at once: a change being applied holds back every other change to the same
settings of the same target, so an older change can never land after a newer one and undo it.
On every backend's governance store (in-memory SQLite, SQLite, the real PostgreSQL with its row
locks), with interleavings forced through the apply step and with real threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import update

from bandit_engine import ManualClock
from bandit_engine.errors import ChangeNotApproved, InvalidArgument
from bandit_engine.governance import APPLY_TIMEOUT_MS, Change, Governance, Principal
from bandit_engine.governance_models import ChangeRow
from bandit_engine.ledger.migrate import upgrade_schema
from bandit_engine.ledger.sql import make_engine


@pytest.fixture
def gov(ledger_url: str, clock: ManualClock) -> Iterator[Governance]:
    """Governance where the API keeps it for each ledger backend: the ledger's own database,
    or a private in-memory SQLite one beside the in-memory ledger."""
    if ledger_url == "memory://":
        yield Governance.in_memory(clock=clock)
        return
    engine = make_engine(ledger_url)
    upgrade_schema(engine)
    try:
        yield Governance(engine, clock=clock)
    finally:
        engine.dispose()


def principals(gov: Governance) -> tuple[Principal, Principal, Principal]:
    out = []
    for role in ("admin", "approver", "approver"):
        key, _ = gov.create_key(role)
        p = gov.authenticate(key)
        assert p is not None
        out.append(p)
    return out[0], out[1], out[2]


class Target:
    """What approving a change sets (an offer's settings), and the order the applies ran in."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.applied: list[int] = []

    def apply(self, ch: Change) -> None:
        self.applied.append(ch.change_id)
        self.settings.update(ch.settings)


def test_an_older_change_cannot_be_approved_while_a_newer_one_is_being_applied(gov: Governance) -> None:
    admin, a, b = principals(gov)
    target = Target()
    older = gov.propose("offer", "o", {"budget": 80.0}, admin).change_id
    newer = gov.propose("offer", "o", {"budget": 60.0}, admin).change_id
    refused: list[str] = []

    def apply_newer(ch: Change) -> None:  # the other approver gets in while this one applies
        with pytest.raises(ChangeNotApproved) as e:
            gov.decide(older, b, approve=True, apply=target.apply)
        refused.append(str(e.value))
        target.apply(ch)

    gov.decide(newer, a, approve=True, apply=apply_newer)
    assert refused == [
        f"change {newer}, which also sets budget of offer 'o', is being applied; try again in a moment"
    ]
    assert gov.get_change(older).status == "pending" and target.applied == [newer]
    with pytest.raises(ChangeNotApproved, match=f"the newer change {newer} already set budget"):
        gov.decide(older, b, approve=True, apply=target.apply)  # and once it is approved: stale
    assert target.settings == {"budget": 60.0}


def test_a_newer_change_waits_until_an_older_one_is_applied(gov: Governance) -> None:
    """The race the stale check alone lost: the older change passed its check before the newer
    one was approved, so its apply could land last (80 over the approved 60)."""
    admin, a, b = principals(gov)
    target = Target()
    older = gov.propose("offer", "o", {"budget": 80.0, "max_impressions": 5}, admin).change_id
    newer = gov.propose("offer", "o", {"budget": 60.0}, admin).change_id
    other = gov.propose("offer", "o", {"member_cap": {"max": 2, "window_days": 7}}, admin).change_id

    def apply_older(ch: Change) -> None:
        with pytest.raises(ChangeNotApproved, match=f"change {older}, which also sets budget"):
            gov.decide(newer, b, approve=True, apply=target.apply)
        gov.decide(other, b, approve=True, apply=target.apply)  # other settings go ahead
        target.apply(ch)

    gov.decide(older, a, approve=True, apply=apply_older)
    assert target.applied == [other, older]
    assert gov.get_change(newer).status == "pending"
    gov.decide(newer, b, approve=True, apply=target.apply)  # now it can: newer lands last
    assert target.settings["budget"] == 60.0 and target.settings["max_impressions"] == 5
    assert [gov.get_change(c).status for c in (older, newer, other)] == ["approved"] * 3


def test_a_rejection_is_not_held_back_and_a_failed_apply_releases_the_claim(gov: Governance) -> None:
    admin, a, b = principals(gov)
    older = gov.propose("offer", "o", {"budget": 80.0}, admin).change_id
    newer = gov.propose("offer", "o", {"budget": 60.0}, admin).change_id

    def failing(ch: Change) -> None:
        gov.decide(older, b, approve=False)  # rejecting the other change is always possible
        raise ValueError("apply failed")

    with pytest.raises(ValueError):
        gov.decide(newer, a, approve=True, apply=failing)
    assert gov.get_change(older).status == "rejected"
    ch = gov.get_change(newer)
    assert ch.status == "pending" and ch.decided_at is None  # back to pending, claim gone
    assert gov.decide(newer, a, approve=True).status == "approved"


def test_a_claim_abandoned_mid_apply_lapses(gov: Governance, clock: ManualClock) -> None:
    """A decider that died between claiming a change and recording the decision leaves it
    ``applying``: it holds back the same settings for ``APPLY_TIMEOUT_MS``, then lapses, and
    the abandoned change can be decided again."""
    admin, a, b = principals(gov)
    dead = gov.propose("offer", "o", {"budget": 80.0}, admin).change_id
    newer = gov.propose("offer", "o", {"budget": 60.0}, admin).change_id
    with gov._engine.begin() as c:  # what the dead process left behind
        c.execute(update(ChangeRow).where(ChangeRow.id == dead)
                  .values(status="applying", decided_at=clock.now_ms()))  # fmt: skip
    assert [c.change_id for c in gov.changes("applying")] == [dead]
    with pytest.raises(ChangeNotApproved, match="being decided by someone else"):
        gov.decide(dead, b, approve=True)
    with pytest.raises(ChangeNotApproved, match=f"change {dead}, which also sets budget"):
        gov.decide(newer, b, approve=True)
    clock.advance(ms=APPLY_TIMEOUT_MS - 1)
    with pytest.raises(ChangeNotApproved):
        gov.decide(newer, b, approve=True)
    clock.advance(ms=2)
    assert gov.decide(newer, b, approve=True).status == "approved"
    with pytest.raises(ChangeNotApproved, match="is stale"):  # lapsed, but older than newer
        gov.decide(dead, a, approve=True)
    assert gov.decide(dead, a, approve=False).status == "rejected"


def race(
    gov: Governance, admin: Principal, a: Principal, b: Principal, target_id: str
) -> tuple[Target, int, int]:
    """Two approvers at once: ``a`` approves the older change, ``b`` the newer (retried while
    the older is being applied). Returns what was applied, and the two changes' ids."""
    target = Target()
    older = gov.propose("offer", target_id, {"budget": 80.0}, admin).change_id
    newer = gov.propose("offer", target_id, {"budget": 60.0}, admin).change_id
    start = threading.Barrier(2)
    lock = threading.Lock()

    def slow_apply(ch: Change) -> None:
        time.sleep(0.003)
        with lock:
            target.apply(ch)

    def approve(cid: int, who: Principal, retry: bool) -> None:
        start.wait()
        for _ in range(500):
            try:
                gov.decide(cid, who, approve=True, apply=slow_apply)
                return
            except ChangeNotApproved as e:
                if not retry or "is being applied" not in str(e):
                    return
                time.sleep(0.002)

    threads = [threading.Thread(target=approve, args=(older, a, False)),
               threading.Thread(target=approve, args=(newer, b, True))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return target, older, newer


def test_racing_approvers_never_leave_an_older_value_in_place(gov: Governance) -> None:
    """Real threads: each round two approvers approve an older and a newer change to the same
    budget at once (the apply takes a few milliseconds); a refused newer change is retried, a
    refused older one is left. Whatever the interleaving, the budget ends at the newer value,
    and the applies ran in id order."""
    admin, a, b = principals(gov)
    for r in range(12):
        target, older, newer = race(gov, admin, a, b, f"o{r}")
        assert gov.get_change(newer).status == "approved", r
        assert target.settings == {"budget": 60.0}, (r, target.applied)
        assert target.applied in ([newer], [older, newer]), r


def test_a_lapsed_claim_is_finished_by_approving_it_not_rejected(gov: Governance, clock: ManualClock) -> None:
    """An approver that died (or could not record the approval) after applying a change left it
    ``applying``; once lapsed it could be rejected, leaving a rejected change in force with no
    approval in the audit log. It can only be approved again now, which records the approval,
    unless newer approved changes have since set everything it sets. A re-approval whose apply
    fails leaves the claim as it was (not pending, where it could be rejected)."""
    admin, a, b = principals(gov)
    applied = []
    cid = gov.propose("offer", "o", {"budget": 80.0}, admin).change_id
    with gov._engine.begin() as c:  # what the approving process left behind
        c.execute(update(ChangeRow).where(ChangeRow.id == cid)
                  .values(status="applying", decided_at=clock.now_ms()))  # fmt: skip
    claimed = gov.get_change(cid).decided_at
    clock.advance(ms=APPLY_TIMEOUT_MS + 1)
    with pytest.raises(ChangeNotApproved, match="may be in force"):
        gov.decide(cid, b, approve=False)

    def failing(ch: Change) -> None:
        raise ValueError("apply failed")

    with pytest.raises(ValueError):
        gov.decide(cid, b, approve=True, apply=failing)
    ch = gov.get_change(cid)
    assert (ch.status, ch.decided_at) == ("applying", claimed)  # the lapsed claim, as it was
    with pytest.raises(ChangeNotApproved, match="may be in force"):
        gov.decide(cid, b, approve=False)
    assert gov.decide(cid, b, approve=True, apply=applied.append).status == "approved"
    assert [c.change_id for c in applied] == [cid]
    assert [e.action for e in gov.audit_log()][-1] == "change.approve"
    with pytest.raises(InvalidArgument, match="NUL"):  # PostgreSQL text cannot hold it
        gov.decide(gov.propose("offer", "o", {"budget": 70.0}, admin).change_id, b, approve=False,
                   reason="ok\x00")  # fmt: skip


def revoke_during_approvals(gov: Governance, approver: Principal, r: int) -> None:
    """One round: a key's four changes (two targets, ids interleaved) are approved newest
    first, each apply slow, while the key is revoked; either thread may start first."""
    key, rec = gov.create_key("admin", name=f"leaver{r}")
    p = gov.authenticate(key)
    assert p is not None
    cids = [gov.propose("offer", f"t{r}.{i % 2}", {"budget": float(i)}, p).change_id
            for i in range(4)]  # fmt: skip
    applied: list[int] = []
    errors: list[BaseException] = []
    withdrawn: list[int] = []

    def slow(ch: Change) -> None:
        time.sleep(0.002)
        applied.append(ch.change_id)

    def approve() -> None:
        for cid in reversed(cids):  # the newest first: the older ones are then stale
            try:
                gov.decide(cid, approver, approve=True, apply=slow)
            except ChangeNotApproved:
                pass
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=approve),
               threading.Thread(target=lambda: withdrawn.extend(gov.revoke_key(rec.key_id)))]
    for t in threads[:: 1 if r % 2 else -1]:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads), (r, errors)
    status = {cid: gov.get_change(cid).status for cid in cids}
    assert "pending" not in status.values() and "applying" not in status.values(), (r, status)
    assert sorted(withdrawn) == [c for c in cids if status[c] == "withdrawn"], (r, status)
    assert sorted(applied) == [c for c in cids if status[c] == "approved"], (r, status)


def test_revoking_a_proposer_while_its_change_is_approved_settles_it_one_way(gov: Governance) -> None:
    """Real threads: an approver approves the changes of a key that is revoked at the same
    moment, on each backend's store and its locks. Each change ends approved and applied, or
    withdrawn and never applied; none stays pending, and revoking never deadlocks with the
    decider's row locks."""
    _, a, _b = principals(gov)
    for r in range(8):
        revoke_during_approvals(gov, a, r)
