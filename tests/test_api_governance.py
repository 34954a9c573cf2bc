"""Governance and the decision flow over HTTP: changes need another key's approval, pending
changes have no effect, everything is audited; choose/reward semantics."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from bandit_engine import ChannelConfig, Engine, MemberCap, Offer
from bandit_engine.errors import Forbidden
from tests.api_fixtures import Api, api_fixture, make_api  # noqa: F401  (fixture)


def choose(api: Api, member: str, channel: str = "email", **kw: object) -> dict:
    r = api.call("POST", "/v1/choose", "decide", json={"member_id": member, "channel": channel, **kw})
    assert r.status_code == 200, r.json
    return r.json


def test_proposer_can_never_approve(api: Api) -> None:
    """Only an approver key decides a change, and never the proposer's: another admin key, of
    another name, cannot approve or reject an admin's budget change (two admins cannot raise
    budgets without an approver)."""
    r = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 80.0})
    assert r.status_code == 202
    cid = r.json["change_id"]
    other_admin, _ = api.gov.create_key("admin", name="other-admin")
    before = api.state()
    for action in ("approve", "reject"):
        r = api.call("POST", f"/v1/changes/{cid}/{action}", key=other_admin)
        assert r.status_code == 403 and "role 'admin' may not" in r.json["error"]["message"], r.json
    assert api.state() == before
    admin = api.gov.authenticate(api.keys["admin"])
    with pytest.raises(Forbidden):  # even if a proposer somehow reached the approve step
        api.gov.decide(cid, admin, approve=True)
    assert api.call("POST", f"/v1/changes/{cid}/approve", "admin").status_code == 403
    # an approver key that proposes (through the governance layer) cannot approve its own change
    approver = api.gov.authenticate(api.keys["approver"])
    own = api.gov.propose("offer", "capped", {"budget": 90.0}, approver)
    r = api.call("POST", f"/v1/changes/{own.change_id}/approve", "approver")
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
    assert api.gov.get_change(own.change_id).status == "pending"
    assert api.engine.get_offer("capped").budget == 50.0


def test_a_key_of_the_proposers_name_cannot_decide_its_change(api: Api) -> None:
    """Four eyes are two people: alice's approver key could approve what alice's admin key
    proposed, since only the key was compared. Names say whose a key is; an approver of
    another name decides it."""
    alice_admin = api.gov.create_key("admin", name="alice")[0]
    alice_approver = api.gov.create_key("approver", name="alice")[0]
    r = api.call("PATCH", "/v1/offers/capped", key=alice_admin, json={"budget": 80.0})
    assert r.status_code == 202
    cid = r.json["change_id"]
    for action in ("approve", "reject"):
        r = api.call("POST", f"/v1/changes/{cid}/{action}", key=alice_approver)
        assert r.status_code == 403 and "named 'alice'" in r.json["error"]["message"], r.json
    assert api.gov.get_change(cid).status == "pending"
    assert api.engine.get_offer("capped").budget == 50.0
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    assert api.engine.get_offer("capped").budget == 80.0


def test_pending_budget_change_has_no_effect_until_approved(tmp_path) -> None:
    api = make_api(tmp_path)
    try:
        r = api.call("POST", "/v1/offers", "admin",
                     json={"offer_id": "tight", "channels": ["push"], "cost": 1.0, "budget": 2.0})  # fmt: skip
        assert r.status_code == 202 and r.json["status"] == "pending"
        cid = r.json["change_id"]
        got = api.call("GET", "/v1/offers/tight", "analyst").json
        assert got["active"] is False and got["budget"] is None and got["pending_changes"] == [cid]
        assert choose(api, "m-0", "push")["offer_id"] is None  # created inactive
        r = api.call("POST", f"/v1/changes/{cid}/approve", "approver", json={"reason": "ok"})
        assert r.status_code == 200 and r.json["status"] == "approved"
        got = api.call("GET", "/v1/offers/tight", "analyst").json
        assert got["active"] is True and got["budget"] == 2.0
        served = [choose(api, f"m-{i}", "push")["offer_id"] for i in range(4)]
        assert served == ["tight", "tight", None, None]  # budget of 2 at cost 1
        # raising the budget is governed: pending -> still capped
        r = api.call("PATCH", "/v1/offers/tight", "admin", json={"budget": 5.0})
        assert r.status_code == 202
        cid2 = r.json["change_id"]
        assert choose(api, "m-9", "push")["offer_id"] is None
        assert api.call("GET", "/v1/offers/tight", "analyst").json["budget"] == 2.0
        assert api.call("POST", f"/v1/changes/{cid2}/approve", "approver").status_code == 200
        assert choose(api, "m-10", "push")["offer_id"] == "tight"
        # a decided change cannot be decided again
        r = api.call("POST", f"/v1/changes/{cid2}/reject", "approver")
        assert r.status_code == 409 and r.json["error"]["code"] == "change_not_approved"
        st = api.call("GET", "/v1/offers/tight", "analyst").json
        assert st["committed"] == 3.0 and st["impressions"] == 3 and st["remaining_budget"] == 2.0
        actions = [e["action"] for e in api.call("GET", "/v1/audit", "analyst").json["entries"]]
        for a in ("offer.create", "change.propose", "change.approve"):
            assert a in actions
    finally:
        api.engine.ledger.close()


def test_an_offers_member_cap_is_governed(api: Api) -> None:
    """An offer's per-member cap is governed: an admin's PATCH of it, and an offer created with
    one, wait for an approver (the offer is off until then)."""
    cap = {"max": 1, "window_days": 7}
    r = api.call("PATCH", "/v1/offers/plain-a", "admin", json={"member_cap": cap})
    assert r.status_code == 202 and r.json["status"] == "pending", r.json
    assert api.gov.get_change(r.json["change_id"]).settings == {"member_cap": cap}
    assert api.call("GET", "/v1/offers/plain-a", "analyst").json["member_cap"] is None
    r = api.call("POST", f"/v1/changes/{r.json['change_id']}/approve", "approver")
    assert r.status_code == 200
    assert api.call("GET", "/v1/offers/plain-a", "analyst").json["member_cap"] == cap
    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "once", "channels": ["email"], "cost": 1, "member_cap": cap})
    assert r.status_code == 202 and r.json["status"] == "pending", r.json
    got = api.call("GET", "/v1/offers/once", "analyst").json
    assert (got["active"], got["member_cap"]) == (False, None)


def test_an_older_change_cannot_undo_a_newer_approved_one(api: Api) -> None:
    """Two pending budget changes: once the newer one is approved, approving the older one
    would silently undo it, so it is refused (409, nothing changes) and can only be rejected.
    A change to other settings of the same offer is not held back."""
    older = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 80.0}).json["change_id"]
    caps = api.call("PATCH", "/v1/offers/capped", "admin", json={"max_impressions": 7}).json["change_id"]
    newer = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 60.0}).json["change_id"]
    assert api.call("POST", f"/v1/changes/{newer}/approve", "approver").status_code == 200
    r = api.call("POST", f"/v1/changes/{older}/approve", "approver")
    assert r.status_code == 409 and r.json["error"]["code"] == "change_not_approved"
    assert f"the newer change {newer} already set budget of offer 'capped'" in r.json["error"]["message"]
    assert api.engine.get_offer("capped").budget == 60.0
    assert api.gov.get_change(older).status == "pending"
    assert api.call("POST", f"/v1/changes/{caps}/approve", "approver").status_code == 200
    assert api.engine.get_offer("capped").max_impressions == 7
    assert api.call("POST", f"/v1/changes/{older}/reject", "approver").status_code == 200


def test_rejected_change_and_pending_offer_cannot_be_activated(api: Api) -> None:
    """A rejected creation change leaves its offer off and without its caps, and the audit log
    keeps the approver's reason for rejecting it."""
    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "gated", "channels": ["email"], "cost": 1, "max_impressions": 3})
    cid = r.json["change_id"]
    r = api.call("PATCH", "/v1/offers/gated", "admin", json={"active": True})
    assert r.status_code == 409  # activation waits for the approval
    r = api.call("POST", f"/v1/changes/{cid}/reject", "approver", json={"reason": "no caps"})
    assert r.status_code == 200
    got = api.call("GET", "/v1/offers/gated", "analyst").json
    assert got["active"] is False and got["max_impressions"] is None and got["pending_changes"] == []
    pending = api.call("GET", "/v1/changes?status=pending", "analyst").json["changes"]
    assert cid not in [c["change_id"] for c in pending]
    entries = api.call("GET", "/v1/audit", "approver").json["entries"]
    assert [e["detail"] for e in entries if e["action"] == "change.reject"] == [
        {"change_id": cid, "reason": "no caps"}]


def test_channel_holdout_is_governed(api: Api) -> None:
    r = api.call("PUT", "/v1/channels/email", "admin",
                 json={"holdout_fraction": 1.0, "exploration_floor": 0.02})  # fmt: skip
    assert r.status_code == 202
    ch = {c["name"]: c for c in api.call("GET", "/v1/channels", "admin").json["channels"]}["email"]
    assert ch["holdout_fraction"] == 0.0 and ch["exploration_floor"] == 0.02  # ungoverned applied
    assert choose(api, "m-h1")["group"] == "treatment"
    assert api.call("POST", f"/v1/changes/{r.json['change_id']}/approve", "approver").status_code == 200
    d = choose(api, "m-h2")
    assert d["group"] == "holdout" and d["offer_id"] is None


def test_the_cross_channel_member_cap_is_a_governed_setting(api: Api, tmp_path) -> None:
    assert api.call("GET", "/v1/settings", "analyst").json == {"member_cap": None}
    cap = {"max": 2, "window_days": 7}
    r = api.call("PUT", "/v1/settings", "admin", json={"member_cap": cap})
    assert r.status_code == 202 and r.json["status"] == "pending" and r.json["member_cap"] is None
    cid = r.json["change_id"]
    served = [choose(api, "m-p", ch)["offer_id"] for ch in ("email", "push", "email")]
    assert None not in served  # pending: no effect
    assert api.call("POST", f"/v1/changes/{cid}/approve", "admin").status_code == 403  # proposer
    r = api.call("POST", f"/v1/changes/{cid}/approve", "approver")
    assert r.status_code == 200 and r.json["status"] == "approved"
    assert api.call("GET", "/v1/settings", "approver").json == {"member_cap": cap}
    served = [choose(api, "m-c", ch) for ch in ("email", "push", "email", "sms")]
    assert [d["offer_id"] is not None for d in served] == [True, True, False, False]
    assert {d.get("reason") for d in served[2:]} == {"member_cap"}  # two in a week, all channels
    # a worker opened on the same database, with nothing in its config, enforces the same cap
    other = Engine.open(f"sqlite:///{tmp_path / 'api.db'}", clock=api.clock)
    try:
        assert other.member_cap == MemberCap(2, 7) and other.choose("m-c", "push").offer_id is None
    finally:
        other.ledger.close()
    r = api.call("PUT", "/v1/settings", "admin", json={"member_cap": cap})
    assert r.status_code == 200 and r.json == {"member_cap": cap}  # unchanged: no change request
    assert api.call("GET", "/v1/changes?status=pending", "analyst").json["changes"] == []
    audit = [(e["action"], e["target"]) for e in api.call("GET", "/v1/audit", "analyst").json["entries"]]
    assert ("change.propose", "settings:engine") in audit and ("change.approve", "settings:engine") in audit
    r = api.call("PUT", "/v1/settings", "admin", json={"member_cap": None})  # lifting it: governed too
    assert r.status_code == 202 and choose(api, "m-c", "push")["offer_id"] is None
    assert api.call("POST", f"/v1/changes/{r.json['change_id']}/approve", "approver").status_code == 200
    assert choose(api, "m-c", "push")["offer_id"] is not None


def test_a_model_group_switches_policy_in_one_request(api: Api) -> None:
    """Every channel of the group gets the new policy at once (one PUT, audited); the channels
    keep their other settings; a single channel still cannot leave its group's policy."""
    r = api.call("PUT", "/v1/channels/site", "admin", json={"exploration_floor": 0.05})
    assert r.status_code == 200
    spec = {"family": "lin_ts", "params": {"dim": 16}}
    r = api.call("PUT", "/v1/model-groups/apps", "admin", json={"policy": spec})
    assert r.status_code == 200, r.json
    assert r.json == {"model_group": "apps", "policy": spec, "channels": ["in_app", "site"]}
    channels = {c["name"]: c for c in api.call("GET", "/v1/channels", "analyst").json["channels"]}
    assert channels["site"]["policy"] == channels["in_app"]["policy"] == spec
    assert channels["site"]["exploration_floor"] == 0.05 and channels["site"]["model_group"] == "apps"
    assert channels["email"]["policy"]["family"] == "thompson"  # not in the group: untouched
    entries = api.call("GET", "/v1/audit", "analyst").json["entries"]
    switch = [e for e in entries if e["action"] == "model_group.update"]
    assert len(switch) == 1 and switch[0]["target"] == "model_group:apps"
    assert switch[0]["detail"]["channels"] == ["in_app", "site"]
    r = api.call("PUT", "/v1/channels/site", "admin", json={"policy": {"family": "thompson"}})
    assert r.status_code == 422 and "set_group_policy" in r.json["error"]["message"]


def test_channels_join_a_model_group_over_http(api: Api) -> None:
    """``model_group`` is a learning setting (not governed): it applies at once, is audited,
    and a group whose channels disagree on the policy is refused with nothing changed."""
    spec = {"family": "lin_ts", "params": {"dim": 16}}
    r = api.call("PUT", "/v1/channels/email", "admin", json={"policy": spec, "model_group": "web"})
    assert r.status_code == 200 and r.json["model_group"] == "web"
    before = api.call("GET", "/v1/channels", "admin").json
    r = api.call("PUT", "/v1/channels/push", "admin", json={"model_group": "web"})  # still thompson
    assert r.status_code == 422 and r.json["error"]["code"] == "invalid_argument"
    assert "model_group" in r.json["error"]["message"]
    assert api.call("GET", "/v1/channels", "admin").json == before
    r = api.call("PUT", "/v1/channels/push", "admin", json={"policy": spec, "model_group": "web"})
    assert r.status_code == 200
    audit = api.call("GET", "/v1/audit", "analyst").json["entries"]
    grouped = [e["target"] for e in audit if e["action"] == "channel.update" and "model_group" in e["detail"]]
    assert sorted(grouped) == ["channel:email", "channel:push"]  # the refused PUT left no entry
    v0 = choose(api, "m-g0")["policy"]["version"]
    d = choose(api, "m-g1", channel="push")
    assert api.call("POST", "/v1/reward", "decide", json={"event_id": d["event_id"], "reward": 1}).status_code == 200
    api.engine.sync()
    assert choose(api, "m-g2")["policy"]["version"] > v0  # a push reward teaches the email model


def test_choose_reward_flow_and_idempotency(api: Api) -> None:
    d = choose(api, "m-5", event_id="evt-5", context={"tier": "gold", "visits": 3, "app": True})
    assert d["offer_id"] in ("plain-a", "plain-b", "capped") and 0 < d["probability"] <= 1
    again = choose(api, "m-5", event_id="evt-5", context={"tier": "silver"})
    assert again["offer_id"] == d["offer_id"] and again["probability"] == d["probability"]
    before = api.engine.ledger.count_decisions()
    r = api.call("POST", "/v1/reward", "decide", json={"event_id": "evt-5", "reward": 1})
    assert r.status_code == 200 and r.json["status"] == "recorded"
    r = api.call("POST", "/v1/reward", "decide", json={"event_id": "evt-5", "reward": 1})
    assert r.json["status"] == "duplicate"
    assert api.engine.ledger.count_decisions() == before
    unit = api.engine.get_offer(d["offer_id"]).cost
    assert api.call("GET", f"/v1/offers/{d['offer_id']}", "analyst").json["spent"] == unit


def test_a_resent_event_id_is_counted_once_in_the_metrics(api: Api) -> None:
    def counted() -> float:
        text = api.call("GET", "/metrics").get_data(as_text=True)
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("bandit_engine_decisions_total"))  # fmt: skip

    before = counted()
    first = choose(api, "m-resend", event_id="evt-resend")
    assert counted() == before + 1
    for _ in range(2):
        assert choose(api, "m-resend", event_id="evt-resend") == first
    assert counted() == before + 1


def test_invented_http_methods_do_not_grow_the_metrics(api: Api) -> None:
    """The latency histogram was labelled by the request's method as sent: 200 requests with
    invented methods and no key made 2 600 series lines (a /metrics page growing without
    bound). Any method outside the standard ones is one label, "other"."""
    def series() -> set[str]:
        text = api.call("GET", "/metrics").get_data(as_text=True)
        return {line.rsplit(" ", 1)[0] for line in text.splitlines()
                if line.startswith("bandit_engine_request_seconds")}  # fmt: skip

    api.client.open("/v1/offers", method="BREW")
    series()  # its own route's series exist from the second reading on
    before = series()
    assert any('method="other"' in s for s in before), sorted(before)[:5]
    for i in range(50):
        r = api.client.open(f"/v1/offers/x{i}", method=f"BREW{i}")
        assert r.status_code == 405 and r.json["error"]["code"] == "method_not_allowed"
    assert series() == before


def test_policy_version_moves_after_reward(api: Api) -> None:
    v0 = choose(api, "m-v0")["policy"]["version"]
    for i in range(3):
        e = choose(api, f"m-v{i + 1}")["event_id"]
        assert api.call("POST", "/v1/reward", "decide", json={"event_id": e, "reward": 1}).status_code == 200
    assert choose(api, "m-v9")["policy"]["version"] >= v0 + 3


def test_window_closed_and_activation(api: Api) -> None:
    """Past its deadline (not yet expired), a decision can be neither rewarded nor activated,
    and both say its window closed (activating said it was "already settled"); once a reward
    settles it, both say it is settled."""
    d = choose(api, "m-w", activate=False)
    r = api.call("POST", f"/v1/events/{d['event_id']}/activate", "decide")
    assert r.status_code == 200 and r.json["active"] is True
    late = choose(api, "m-w2", activate=False)
    api.clock.advance(days=8)
    before = api.state()
    r = api.call("POST", "/v1/reward", "decide", json={"event_id": d["event_id"], "reward": 1})
    assert r.status_code == 409 and r.json["error"]["code"] == "reward_window_closed"
    r = api.call("POST", f"/v1/events/{late['event_id']}/activate", "decide")
    assert r.status_code == 409 and r.json["error"]["code"] == "reward_window_closed"
    assert r.json["error"]["message"].startswith(
        f"the reward window of event {late['event_id']!r} closed at {late['deadline']} (now ")
    assert api.state() == before
    fresh = choose(api, "m-w3")
    assert api.call("POST", "/v1/reward", "decide",
                    json={"event_id": fresh["event_id"], "reward": 1}).status_code == 200
    r = api.call("POST", f"/v1/events/{fresh['event_id']}/activate", "decide")
    assert r.status_code == 409, r.json
    assert r.json["error"]["message"] == f"event {fresh['event_id']!r} is already settled (closed)"


def test_reports(api: Api) -> None:
    api.engine.add_offer(Offer("paced", ["site"], cost=1.0, budget=10.0,
                               ends_at=api.clock.now_ms() + 10 * 86_400_000))  # fmt: skip
    api.clock.advance(days=1)
    for i in range(4):
        e = choose(api, f"m-s{i}", "site")["event_id"]
        api.call("POST", "/v1/reward", "decide", json={"event_id": e, "reward": i % 2})
    rows = {r["offer_id"]: r for r in api.call("GET", "/v1/reports/spend", "analyst").json["offers"]}
    paced = rows["paced"]
    # two redemptions booked at unit cost; the two zero rewards released their reservations
    assert paced["budget"] == 10.0 and paced["spent"] == 2.0 and paced["committed"] == 0.0
    assert paced["remaining_budget"] == 8.0
    assert paced["spend_per_day"] == pytest.approx(2.0) and paced["projected_exhaustion"] is not None
    api.clock.advance(days=api.engine.channel("site").reward_window_days)
    lift = api.call("GET", "/v1/reports/lift?channel=site", "analyst").json["channels"][0]
    assert lift["treatment"]["n"] == 4 and lift["treatment"]["rate"] == 0.5
    lo, hi = lift["treatment"]["ci95"]
    assert lo < 0.5 < hi and lift["holdout"]["n"] == 0 and lift["lift"] is None


def test_approval_that_cannot_apply_changes_nothing(api: Api) -> None:
    r = api.call("PATCH", "/v1/offers/solo", "admin", json={"budget": 3.0})
    assert r.status_code == 202
    cid = r.json["change_id"]
    for i in range(3):  # commitments grow past the proposed budget while it waits
        assert choose(api, f"m-sms-{i}", "sms")["offer_id"] == "solo"
    before = api.state()
    r = api.call("POST", f"/v1/changes/{cid}/approve", "approver")
    assert r.status_code == 409 and r.json["error"]["code"] == "conflict"
    assert api.state() == before  # still pending, budget unchanged, nothing audited
    assert api.gov.get_change(cid).status == "pending"
    assert api.call("POST", f"/v1/changes/{cid}/reject", "approver").status_code == 200


def test_holdout_outcomes_are_reported_and_the_lift_report_measures_them(api: Api) -> None:
    """With no default offer, hold-out members get nothing, yet their outcomes are reported
    (reward) and their windows close with the default reward, so both groups are measured."""
    api.engine.set_channel(dataclasses.replace(api.engine.channel("push"), holdout_fraction=0.5))
    decisions = [choose(api, f"m-lift-{i}", "push") for i in range(40)]
    held = [d for d in decisions if d["group"] == "holdout"]
    treated = [d for d in decisions if d["group"] == "treatment"]
    assert len(held) >= 10 and len(treated) >= 10 and all(d["offer_id"] is None for d in held)
    for d in held[:4] + treated[:8]:
        r = api.call("POST", "/v1/reward", "decide", json={"event_id": d["event_id"], "reward": 1})
        assert r.status_code == 200 and r.json["status"] == "recorded", r.json
    before = api.state()
    r = api.call("POST", "/v1/reward", "decide", json={"event_id": held[5]["event_id"], "reward": 1, "cost": 1})
    assert r.status_code == 422 and api.state() == before  # a hold-out outcome has no cost
    api.clock.advance(days=8)
    api.engine.expire()
    lift = api.call("GET", "/v1/reports/lift?channel=push", "analyst").json["channels"][0]
    assert lift["holdout"]["n"] == len(held) and lift["holdout"]["rate"] == 4 / len(held)
    assert lift["treatment"]["n"] == len(treated) and lift["treatment"]["rate"] == 8 / len(treated)
    diff = lift["lift"]["difference"]
    assert diff == 8 / len(treated) - 4 / len(held)
    assert lift["lift"]["ci95"][0] < diff < lift["lift"]["ci95"][1]


def test_the_spend_report_projects_from_money_spent_within_the_campaign(api: Api) -> None:
    """spend_per_day counted open reservations as spend (50.0 a day with nothing redeemed),
    kept shrinking once the campaign had ended, and projected_exhaustion fell after the
    campaign's end (even past year 9999): none of those is a date a budget can run out."""
    day = 86_400_000
    start = api.clock.now_ms()
    api.engine.add_offer(Offer("held", ["site"], cost=5.0, budget=1000.0, ends_at=start + 10 * day))
    api.clock.advance(days=1)
    events = [choose(api, f"m-held-{i}", "site")["event_id"] for i in range(4)]

    def row() -> dict[str, Any]:
        rows = api.call("GET", "/v1/reports/spend", "analyst").json["offers"]
        return next(r for r in rows if r["offer_id"] == "held")

    r = row()
    assert r["committed"] == 20.0 and r["spent"] == 0.0
    assert r["spend_per_day"] == 0.0 and r["projected_exhaustion"] is None
    api.call("POST", "/v1/reward", "decide", json={"event_id": events[0], "reward": 1})
    api.clock.advance(days=1)  # 5.00 spent in 2 days: 2.50 a day, 975 left: 390 days > the end
    r = row()
    assert r["spend_per_day"] == pytest.approx(2.5) and r["projected_exhaustion"] is None
    api.clock.advance(days=20)  # the campaign ended 12 days ago: its rate stays its own
    assert row()["spend_per_day"] == pytest.approx(0.5)


def test_the_lift_report_waits_for_reward_windows_to_close(api: Api) -> None:
    """A redemption settles its decision at once, a miss only when its window closes: the
    report counted the settled decisions of open windows, i.e. mostly redemptions (the audit
    read a rate of 1.0 from 2 redemptions out of 4 decisions). It counts a decision once its
    window has closed, with what expiry gives it if no expiry has run yet."""
    api.engine.add_offer(Offer("windowed", ["site"], cost=1.0))
    events = [choose(api, f"m-win-{i}", "site")["event_id"] for i in range(4)]
    for e in events[:2]:
        r = api.call("POST", "/v1/reward", "decide", json={"event_id": e, "reward": 1})
        assert r.status_code == 200

    def treatment() -> dict[str, Any]:
        r = api.call("GET", "/v1/reports/lift?channel=site", "analyst")
        return r.json["channels"][0]["treatment"]

    assert treatment() == {"n": 0, "rate": None, "ci95": None}
    api.clock.advance(days=api.engine.channel("site").reward_window_days)  # at the deadline
    assert treatment()["n"] == 2  # the misses may still be rewarded at the deadline itself
    api.clock.advance(ms=1)
    before = api.state()
    assert treatment()["n"] == 4 and treatment()["rate"] == 0.5  # no expire has run
    assert api.state() == before  # the report wrote nothing
    api.engine.expire()
    assert treatment()["n"] == 4 and treatment()["rate"] == 0.5


def test_redemption_rates_get_intervals_that_do_not_collapse_to_a_point(api: Api) -> None:
    """With 0/1 rewards, the normal interval of a group with no redemption (or all) was [0, 0]
    (or [1, 1]) however small the group: certainty from 10 members. Each group gets Wilson's
    score interval and the difference Newcombe's (checked against their closed forms: 0 of n
    has the upper bound z^2 / (n + z^2))."""
    api.engine.set_channel(dataclasses.replace(api.engine.channel("push"), holdout_fraction=0.5))
    api.engine.add_offer(Offer("rate", ["push"], cost=1.0))
    decisions = [choose(api, f"m-rate-{i}", "push") for i in range(60)]
    treated = [d for d in decisions if d["group"] == "treatment"][:12]
    for d in treated[:3]:  # 3 redemptions among the treated, none in the hold-out
        api.call("POST", "/v1/reward", "decide", json={"event_id": d["event_id"], "reward": 1})
    api.clock.advance(days=8)
    report = api.call("GET", "/v1/reports/lift?channel=push", "analyst").json["channels"][0]
    t, h = report["treatment"], report["holdout"]
    z2 = 1.959963984540054**2
    assert h["rate"] == 0 and h["ci95"] == [0.0, pytest.approx(z2 / (h["n"] + z2))]
    p, n = t["rate"], t["n"]
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = (z2 * (p * (1 - p) / n + z2 / (4 * n * n))) ** 0.5 / (1 + z2 / n)
    assert t["ci95"] == [pytest.approx(centre - half), pytest.approx(centre + half)]
    lo, hi = report["lift"]["ci95"]
    diff = report["lift"]["difference"]
    assert diff == p
    assert lo == pytest.approx(diff - ((p - t["ci95"][0]) ** 2 + h["ci95"][1] ** 2) ** 0.5)
    assert hi == pytest.approx(t["ci95"][1]) and lo < diff < hi  # the hold-out's rate: 0 to 0


def test_reward_amounts_get_the_normal_interval_from_the_sample_variance(api: Api) -> None:
    """Rewards that are amounts (points, mixed with 0 and 1) are not redemptions: a group of
    them gets the normal interval from the sample variance (divided by n - 1), not Wilson's,
    which is for 0/1 outcomes only."""
    api.engine.set_channel(dataclasses.replace(api.engine.channel("push"), holdout_fraction=0.5))
    decisions = [choose(api, f"m-amount-{i}", "push") for i in range(30)]
    held = [d for d in decisions if d["group"] == "holdout"]
    treated = [d for d in decisions if d["group"] == "treatment"]
    assert len(held) >= 5 and len(treated) >= 5
    given = {"holdout": [1.0, 3.0, 0.5], "treatment": [2.0, 1.0, 4.0, 0.0]}
    for group, ds in (("holdout", held), ("treatment", treated)):
        for d, value in zip(ds, given[group], strict=False):
            body = {"event_id": d["event_id"], "reward": value}
            r = api.call("POST", "/v1/reward", "decide", json=body)
            assert r.status_code == 200, r.json
    api.clock.advance(days=8)  # the windows close: the others count with the default reward, 0
    report = api.call("GET", "/v1/reports/lift?channel=push", "analyst").json["channels"][0]
    z = 1.959963984540054
    stats: dict[str, tuple[float, float]] = {}
    for group, ds in (("holdout", held), ("treatment", treated)):
        values = given[group] + [0.0] * (len(ds) - len(given[group]))
        n, m = len(values), sum(values) / len(values)
        var = sum((x - m) ** 2 for x in values) / (n - 1)
        half = z * (var / n) ** 0.5
        assert report[group] == {"n": n, "rate": pytest.approx(m),
                                 "ci95": [pytest.approx(m - half), pytest.approx(m + half)]}
        stats[group] = (m, var / n)
    diff = stats["treatment"][0] - stats["holdout"][0]
    half = z * (stats["treatment"][1] + stats["holdout"][1]) ** 0.5
    assert report["lift"] == {"difference": pytest.approx(diff),
                              "ci95": [pytest.approx(diff - half), pytest.approx(diff + half)]}


def test_one_outcome_has_a_rate_but_no_interval(api: Api) -> None:
    api.engine.add_offer(Offer("lone", ["site"], cost=1.0))
    e = choose(api, "m-lone", "site")["event_id"]
    api.call("POST", "/v1/reward", "decide", json={"event_id": e, "reward": 1})
    api.clock.advance(days=api.engine.channel("site").reward_window_days)
    lift = api.call("GET", "/v1/reports/lift?channel=site", "analyst").json["channels"][0]
    assert lift["treatment"] == {"n": 1, "rate": 1.0, "ci95": None} and lift["lift"] is None


def test_a_pending_offer_cannot_be_paused_or_activated_before_approval(api: Api) -> None:
    """Approval activates a created offer, so a pause sent while it waits would be overridden
    silently: it is refused, and withdrawing the offer means withdrawing (or rejecting) the
    change. Sending the value it has (a full-body edit) is no change, and is not refused."""
    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "waiting", "channels": ["email"], "cost": 1, "budget": 10})
    cid = r.json["change_id"]
    before = api.state()
    r = api.call("PATCH", "/v1/offers/waiting", "admin", json={"active": True})
    assert r.status_code == 409 and "proposer can withdraw it" in r.json["error"]["message"]
    r = api.call("PATCH", "/v1/offers/waiting", "admin", json={"active": False, "cost": 1})
    assert r.status_code == 200 and r.json["active"] is False
    assert api.state() == before
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    assert api.call("GET", "/v1/offers/waiting", "analyst").json["active"] is True
    r = api.call("PATCH", "/v1/offers/waiting", "admin", json={"active": False})  # now it is live: fine
    assert r.status_code == 200 and r.json["active"] is False


def test_the_holdout_salt_is_governed(api: Api) -> None:
    """The salt decides who is in the hold-out: changing it reshuffles the groups."""
    r = api.call("PUT", "/v1/channels/email", "admin", json={"salt": "reshuffled"})
    assert r.status_code == 202 and r.json["salt"] == "email"
    assert api.call("GET", "/v1/channels/email", "analyst").json["salt"] == "email"
    assert api.call("POST", f"/v1/changes/{r.json['change_id']}/approve", "approver").status_code == 200
    assert api.call("GET", "/v1/channels/email", "analyst").json["salt"] == "reshuffled"


def test_the_reward_window_and_the_default_offer_are_governed(api: Api) -> None:
    """The reward window is part of the reward (a redemption on day 5 counts under a 7-day
    window, not a 3-day one) and the default offer is what the hold-out gets, i.e. what the
    lift is measured against: an admin could change either alone. A proposal an approval could
    not apply (a default offer not on the channel) was only refused at approval; now at once,
    with nothing written."""
    r = api.call("PUT", "/v1/channels/email", "admin",
                 json={"reward_window_days": 3, "default_offer": "plain-b"})  # fmt: skip
    assert r.status_code == 202, r.json
    assert r.json["reward_window_days"] == 7.0 and r.json["default_offer"] is None
    got = api.call("GET", "/v1/channels/email", "analyst").json
    assert got["reward_window_days"] == 7.0 and got["default_offer"] is None
    cid = r.json["change_id"]
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    got = api.call("GET", "/v1/channels/email", "analyst").json
    assert got["reward_window_days"] == 3 and got["default_offer"] == "plain-b"
    before = api.state()
    r = api.call("PUT", "/v1/channels/sms", "admin",
                 json={"default_offer": "plain-a", "exploration_floor": 0.2})  # fmt: skip
    assert r.status_code == 422, r.json
    assert "not offered on channel 'sms'" in r.json["error"]["message"]
    assert api.state() == before  # neither the pending change nor the ungoverned field


def test_ids_with_a_slash_reach_their_routes_and_consent_travels(api: Api) -> None:
    r = api.call("POST", "/v1/offers", "admin", json={"offer_id": "promo/2026", "channels": ["push"], "cost": 1})
    assert r.status_code == 201
    for path in ("/v1/offers/promo/2026", "/v1/offers/promo%2F2026"):
        assert api.call("GET", path, "analyst").json["offer_id"] == "promo/2026"
    r = api.call("PATCH", "/v1/offers/promo/2026", "admin", json={"active": False})
    assert r.status_code == 200 and r.json["active"] is False
    d = choose(api, "m-slash", "email", event_id="order/123", activate=False)
    r = api.call("POST", "/v1/events/order/123/activate", "decide")
    assert r.status_code == 200 and r.json == {"event_id": "order/123", "active": True, "status": "open"}
    assert d["active"] is False
    d = choose(api, "m-no-consent", "email", consent=False)
    assert d["offer_id"] is None and d["reason"] == "no_consent"


def test_channel_and_model_group_names_with_a_slash_reach_their_routes(api: Api) -> None:
    """Names may hold "/" (the id rule allows it, and choose took such a channel), but the
    channel and model-group routes took one path segment: 404 "no such route" either way."""
    api.engine.set_channel(ChannelConfig("web/eu", model_group="g/1"))
    for path in ("/v1/channels/web/eu", "/v1/channels/web%2Feu"):
        assert api.call("GET", path, "analyst").json["name"] == "web/eu"
    r = api.call("PUT", "/v1/channels/web%2Feu", "admin", json={"exploration_floor": 0.05})
    assert r.status_code == 200 and r.json["exploration_floor"] == 0.05
    policy = {"family": "thompson", "params": {"prior_alpha": 2}}
    for path in ("/v1/model-groups/g/1", "/v1/model-groups/g%2F1"):
        r = api.call("PUT", path, "admin", json={"policy": policy})
        assert r.status_code == 200 and r.json["channels"] == ["web/eu"], r.json
    assert api.engine.channel("web/eu").policy.params == {"prior_alpha": 2}


def test_a_401_names_its_scheme_and_metrics_say_their_charset_once(api: Api) -> None:
    r = api.call("GET", "/v1/offers")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    ctype = api.call("GET", "/metrics").headers["Content-Type"]
    assert ctype.count("charset") == 1 and ctype.startswith("text/plain; version=0.0.4")


def test_an_offer_created_inactive_with_caps_cannot_be_switched_on_before_they_are_approved(api: Api) -> None:
    """Created with governed settings, an offer is stored without them until the change is
    approved. With ``"active": false`` the change does not switch it on when approved, and it
    used to let a PATCH switch the offer on at once: serving with none of its caps, which could
    then never be approved (the budget was below what it had spent)."""
    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "staged", "channels": ["site"], "cost": 1.0, "budget": 2.0, "max_impressions": 2,
        "active": False,
    })  # fmt: skip
    assert r.status_code == 202
    cid = r.json["change_id"]
    change = api.call("GET", "/v1/changes?status=pending", "analyst").json["changes"][-1]
    assert (change["change_id"], change["creates"], change["activate"]) == (cid, True, False)
    r = api.call("PATCH", "/v1/offers/staged", "admin", json={"active": True})
    assert r.status_code == 409 and f"change {cid}" in r.json["error"]["message"]
    assert choose(api, "m-0", "site")["offer_id"] is None  # site's only offer: not live yet
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    got = api.call("GET", "/v1/offers/staged", "analyst").json
    assert (got["active"], got["budget"], got["max_impressions"]) == (False, 2.0, 2)
    assert api.call("PATCH", "/v1/offers/staged", "admin", json={"active": True}).status_code == 200
    served = [choose(api, f"m-{i}", "site")["offer_id"] for i in range(4)]
    assert served == ["staged", "staged", None, None]  # its caps hold from its first choose


def test_change_requests_are_listed_page_by_page(api: Api) -> None:
    """``GET /v1/changes`` stopped silently at the 10 000 oldest; it pages with ``after`` and
    ``limit`` as the audit log does, whose page after an entry starts with the next entry."""
    ids = [api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 60.0 + i}).json["change_id"]
           for i in range(5)]  # fmt: skip
    seen, after = [], 0
    while True:
        page = api.call("GET", f"/v1/changes?status=pending&after={after}&limit=2", "analyst").json["changes"]
        if not page:
            break
        assert len(page) <= 2
        seen += [c["change_id"] for c in page]
        after = page[-1]["change_id"]
    assert seen == ids
    r = api.call("GET", "/v1/changes?limit=0", "analyst")
    assert r.status_code == 422 and r.json["error"]["code"] == "invalid_argument"
    audit = [e["audit_id"] for e in api.call("GET", "/v1/audit", "analyst").json["entries"]]
    page = api.call("GET", f"/v1/audit?after={audit[2]}&limit=2", "analyst").json["entries"]
    assert [e["audit_id"] for e in page] == audit[3:5]


def test_an_offer_switched_on_with_a_budget_goes_live_when_the_budget_is_approved(api: Api) -> None:
    """A PATCH that switches an inactive offer on together with a governed setting used to
    switch it on at once, serving with no budget while the budget waited (and still after a
    rejection). The switch now waits for the change, and a rejection leaves the offer off; a
    PATCH of ``active`` alone meanwhile is refused, as it would serve without the budget."""
    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "promo", "channels": ["sms"], "cost": 1.0, "budget": 10.0})
    assert api.call("POST", f"/v1/changes/{r.json['change_id']}/reject", "approver").status_code == 200
    for attempt in ("reject", "approve"):
        r = api.call("PATCH", "/v1/offers/promo", "admin", json={"active": True, "budget": 2.0})
        assert r.status_code == 202, r.json
        change = api.gov.get_change(r.json["change_id"])
        assert change.activate and dict(change.settings) == {"budget": 2.0}
        before = api.state()
        r = api.call("PATCH", "/v1/offers/promo", "admin", json={"active": True})
        assert r.status_code == 409 and f"change {change.change_id}" in r.json["error"]["message"]
        assert api.state() == before
        got = api.call("GET", "/v1/offers/promo", "analyst").json
        assert (got["active"], got["budget"]) == (False, None)
        assert choose(api, f"m-{attempt}", "sms")["offer_id"] == "solo"  # not promo
        r = api.call("POST", f"/v1/changes/{change.change_id}/{attempt}", "approver")
        assert r.status_code == 200
    got = api.call("GET", "/v1/offers/promo", "analyst").json
    assert (got["active"], got["budget"]) == (True, 2.0)


def test_a_cap_below_the_impressions_counted_is_refused_when_proposed(api: Api) -> None:
    """An impression cap the offer has already passed could never be approved (the approval
    fails with 409 and the change stays pending for ever): it is refused at once, as a budget
    below what is spent and committed is, and nothing is recorded. A budget of exactly what is
    spent and committed is accepted and approved (it freezes the offer)."""
    for i in range(3):
        choose(api, f"m-cap-{i}", "sms")
    counted = api.engine.offer_state("solo").impressions
    assert counted >= 3
    before = api.state()
    r = api.call("PATCH", "/v1/offers/solo", "admin", json={"max_impressions": counted - 1})
    assert r.status_code == 409 and "impressions already counted" in r.json["error"]["message"]
    assert api.state() == before
    r = api.call("PATCH", "/v1/offers/solo", "admin", json={"max_impressions": counted})
    assert r.status_code == 202
    st = api.engine.offer_state("solo")
    held = (st.spent_cents + st.committed_cents) / 100
    assert held >= 3
    r = api.call("PATCH", "/v1/offers/solo", "admin", json={"budget": held})
    assert r.status_code == 202, r.json
    r = api.call("POST", f"/v1/changes/{r.json['change_id']}/approve", "approver")
    assert r.status_code == 200 and api.engine.get_offer("solo").budget == held


def test_the_proposer_withdraws_its_own_pending_change(api: Api) -> None:
    """Setting the old value again left the change there to be approved, and only an approver
    could reject it: the proposing key can withdraw it. Another key cannot (an approver rejects
    instead); a decided change cannot be withdrawn, nor a withdrawn one approved."""
    cid = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 500.0}).json["change_id"]
    r = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 50.0})  # the old value
    assert r.status_code == 200 and api.gov.get_change(cid).status == "pending"
    other_admin, _ = api.gov.create_key("admin", name="other-admin")
    before = api.state()
    r = api.call("POST", f"/v1/changes/{cid}/withdraw", key=other_admin)
    assert r.status_code == 403 and "only its proposer" in r.json["error"]["message"]
    assert api.call("POST", f"/v1/changes/{cid}/withdraw", "approver").status_code == 403
    assert api.call("POST", "/v1/changes/999999/withdraw", "admin").status_code == 404
    assert api.state() == before
    r = api.call("POST", f"/v1/changes/{cid}/withdraw", "admin", json={"reason": "typo"})
    assert r.status_code == 200 and (r.json["status"], r.json["reason"]) == ("withdrawn", "typo")
    r = api.call("POST", f"/v1/changes/{cid}/approve", "approver")
    assert r.status_code == 409 and r.json["error"]["code"] == "change_not_approved"
    assert api.engine.get_offer("capped").budget == 50.0
    r = api.call("POST", f"/v1/changes/{cid}/withdraw", "admin")
    assert r.status_code == 409 and "withdrawn, not pending" in r.json["error"]["message"]
    entries = api.call("GET", "/v1/audit", "analyst").json["entries"]
    assert [e["detail"] for e in entries if e["action"] == "change.withdraw"] == [
        {"change_id": cid, "reason": "typo"}]
    listed = api.call("GET", "/v1/changes?status=withdrawn", "analyst").json["changes"]
    assert [c["change_id"] for c in listed] == [cid]
    # a withdrawn creation change leaves its offer off, without its caps, as a rejection does
    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "second-thoughts", "channels": ["email"], "cost": 1, "budget": 5})
    assert api.call("POST", f"/v1/changes/{r.json['change_id']}/withdraw", "admin").status_code == 200
    got = api.call("GET", "/v1/offers/second-thoughts", "analyst").json
    assert (got["active"], got["budget"], got["pending_changes"]) == (False, None, [])


def test_revoking_a_key_withdraws_the_changes_it_left_pending(api: Api) -> None:
    """A revoked key's proposals stayed approvable: a leaked or departed admin key's budget
    raise went live on the next approver's click, and nobody could withdraw it. Revoking a key
    withdraws its pending changes (audited), creation changes included; other keys' changes
    stay pending. A change a revoked key left pending before this (an older store) can be
    rejected but not approved."""
    leaver, rec = api.gov.create_key("admin", name="leaver")
    raise_cid = api.call("PATCH", "/v1/offers/capped", key=leaver,
                         json={"budget": 5000.0}).json["change_id"]  # fmt: skip
    r = api.call("POST", "/v1/offers", key=leaver, json={
        "offer_id": "by-leaver", "channels": ["email"], "cost": 1, "budget": 5})
    create_cid = r.json["change_id"]
    others = api.call("PATCH", "/v1/offers/capped", "admin", json={"max_impressions": 900})
    assert others.status_code == 202
    assert api.gov.revoke_key(rec.key_id, actor="cli") == [raise_cid, create_cid]
    for cid in (raise_cid, create_cid):
        ch = api.gov.get_change(cid)
        assert (ch.status, ch.reason) == (
            "withdrawn", f"withdrawn: the proposing key {rec.key_id} was revoked")
        r = api.call("POST", f"/v1/changes/{cid}/approve", "approver")
        assert r.status_code == 409 and "withdrawn, not pending" in r.json["error"]["message"]
    assert api.engine.get_offer("capped").budget == 50.0
    got = api.call("GET", "/v1/offers/by-leaver", "analyst").json
    assert (got["active"], got["budget"], got["pending_changes"]) == (False, None, [])
    audit = [(e["actor"], e["action"], e["detail"].get("change_id"))
             for e in api.call("GET", "/v1/audit", "analyst").json["entries"]]
    assert audit[-3:] == [("cli", "key.revoke", None), ("cli", "change.withdraw", raise_cid),
                          ("cli", "change.withdraw", create_cid)]  # fmt: skip
    cid = others.json["change_id"]
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    # a store where a key was revoked before revoking withdrew anything
    from sqlalchemy import update

    from bandit_engine.governance_models import ApiKeyRow

    gone, gone_rec = api.gov.create_key("admin", name="gone")
    stale = api.call("PATCH", "/v1/offers/capped", key=gone, json={"budget": 70.0})
    with api.gov._tx(write=True) as c:
        c.execute(update(ApiKeyRow).where(ApiKeyRow.id == gone_rec.key_id).values(revoked_at=1))
    before = api.state()
    r = api.call("POST", f"/v1/changes/{stale.json['change_id']}/approve", "approver")
    assert r.status_code == 409 and "since revoked" in r.json["error"]["message"], r.json
    assert api.state() == before
    r = api.call("POST", f"/v1/changes/{stale.json['change_id']}/reject", "approver")
    assert r.status_code == 200 and r.json["status"] == "rejected"


def test_changes_are_filtered_by_kind_and_target(api: Api) -> None:
    """``kind`` and ``target`` were ignored: every change came back."""
    offer = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 70.0}).json["change_id"]
    other = api.call("PATCH", "/v1/offers/solo", "admin", json={"budget": 70.0}).json["change_id"]
    channel = api.call("PUT", "/v1/channels/email", "admin",
                       json={"holdout_fraction": 0.1}).json["change_id"]  # fmt: skip

    def ids(query: str) -> list[int]:
        r = api.call("GET", f"/v1/changes?{query}", "analyst")
        assert r.status_code == 200, r.json
        return [c["change_id"] for c in r.json["changes"]]

    assert ids("kind=offer&target=capped") == [offer]
    assert ids("kind=offer") == [offer, other]
    assert ids("kind=channel&status=pending") == [channel]
    assert ids("target=email") == [channel]
    for bad in ("kind=offers", "target=", "target=" + "x" * 200):
        r = api.call("GET", f"/v1/changes?{bad}", "analyst")
        assert r.status_code in (400, 422) and r.json["error"]["code"] == "invalid_argument", bad


def test_channel_settings_are_read_and_compared_as_stored_now(tmp_path) -> None:
    """Two workers on one database: a PUT compared the body with the channel as this worker
    last read it (up to ``catalog_refresh_seconds`` old), so setting back a hold-out another
    worker had just approved looked like no change, answered 200, and left it in force."""
    from bandit_engine.api import create_app

    a = make_api(tmp_path)
    slow = Engine.open(f"sqlite:///{tmp_path / 'api.db'}", clock=a.clock, seed=12,
                       learn_in_process=False, catalog_refresh_seconds=3600.0)  # fmt: skip
    app = create_app({"ENGINE": slow, "SYNC_INTERVAL": 0.0, "CLOCK": a.clock})
    b = dataclasses.replace(a, app=app, client=app.test_client())
    try:
        assert b.call("GET", "/v1/channels/email", "analyst").json["holdout_fraction"] == 0.0
        cid = a.call("PUT", "/v1/channels/email", "admin",
                     json={"holdout_fraction": 0.5}).json["change_id"]  # fmt: skip
        assert a.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
        assert b.call("GET", "/v1/channels/email", "analyst").json["holdout_fraction"] == 0.5
        r = b.call("PUT", "/v1/channels/email", "admin", json={"holdout_fraction": 0.0})
        assert r.status_code == 202 and r.json["holdout_fraction"] == 0.5
        assert b.gov.get_change(r.json["change_id"]).settings == {"holdout_fraction": 0.0}
    finally:
        b.engine.ledger.close()
        a.engine.ledger.close()


def test_a_creation_change_being_applied_still_holds_its_offer(api: Api) -> None:
    """While an approver applies a creation change (``applying``: for a minute if its process
    died) the offer was shown with no pending change and a PATCH could switch it on, serving
    without the caps about to be applied. Its proposer cannot withdraw it meanwhile (a
    withdrawn change whose caps were then applied)."""
    from sqlalchemy import update

    from bandit_engine.governance_models import ChangeRow

    r = api.call("POST", "/v1/offers", "admin", json={
        "offer_id": "midway", "channels": ["email"], "cost": 1, "budget": 5})
    cid = r.json["change_id"]
    with api.gov._engine.begin() as c:  # as a decider that claimed it and has not finished
        c.execute(update(ChangeRow).where(ChangeRow.id == cid)
                  .values(status="applying", decided_at=api.clock.now_ms()))  # fmt: skip
    assert api.call("GET", "/v1/offers/midway", "analyst").json["pending_changes"] == [cid]
    listed = {o["offer_id"]: o for o in api.call("GET", "/v1/offers", "analyst").json["offers"]}
    assert listed["midway"]["pending_changes"] == [cid]  # the list says what the offer's GET says
    r = api.call("PATCH", "/v1/offers/midway", "admin", json={"active": True})
    assert r.status_code == 409 and f"change {cid}" in r.json["error"]["message"]
    assert api.engine.get_offer("midway").active is False
    before = api.state()
    r = api.call("POST", f"/v1/changes/{cid}/withdraw", "admin")
    assert r.status_code == 409 and "is being approved, not pending" in r.json["error"]["message"]
    assert api.state() == before


def test_the_audit_log_says_what_each_write_replaced(api: Api) -> None:
    """An approval's entry held only the change's id, and an edit's the request body: the
    values in force before could not be read back from the log. Each entry now holds what was
    written and what it replaced; an approval that also switches the offer on says it had been
    off."""
    r = api.call("PATCH", "/v1/offers/capped", "admin",
                 json={"budget": 75.0, "cost": 1.5, "max_impressions": 500})  # fmt: skip
    cid = r.json["change_id"]
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    cap = api.call("PUT", "/v1/channels/email", "admin", json={"holdout_fraction": 0.2,
                                                                "exploration_floor": 0.05})
    assert api.call("POST", f"/v1/changes/{cap.json['change_id']}/approve", "approver").status_code == 200
    entries = api.call("GET", "/v1/audit", "analyst").json["entries"]
    got = [(e["action"], e["target"], {k: v for k, v in e["detail"].items() if k != "reason"})
           for e in entries if e["action"] in ("offer.update", "channel.update", "change.approve")]
    assert got[-4:] == [
        ("offer.update", "offer:capped", {"cost": 1.5, "before": {"cost": 1.0}}),
        ("change.approve", "offer:capped",
         {"change_id": cid, "settings": {"budget": 75.0}, "before": {"budget": 50.0}}),
        ("channel.update", "channel:email",
         {"exploration_floor": 0.05, "before": {"exploration_floor": 0.01}}),
        ("change.approve", "channel:email", {"change_id": cap.json["change_id"],
         "settings": {"holdout_fraction": 0.2}, "before": {"holdout_fraction": 0.0}}),
    ]
    r = api.call("PATCH", "/v1/offers/plain-b", "admin", json={"active": False})
    assert r.status_code == 200
    r = api.call("PATCH", "/v1/offers/plain-b", "admin", json={"active": True, "budget": 9.0})
    cid = r.json["change_id"]
    assert api.call("POST", f"/v1/changes/{cid}/approve", "approver").status_code == 200
    entry = api.call("GET", "/v1/audit", "analyst").json["entries"][-1]
    assert (entry["action"], entry["detail"]) == ("change.approve", {
        "change_id": cid, "reason": None, "settings": {"budget": 9.0},
        "before": {"budget": None, "active": False}})  # fmt: skip
