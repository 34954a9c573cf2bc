"""The role matrix: every route x every role (and no key / a bad key) -> 2xx, 401 or 403."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from bandit_engine.api.openapi import openapi_document
from tests.api_fixtures import ROLES, Api, seeded_api

Prep = Callable[[Api], tuple[str, Any]]


def _new_event(api: Api) -> str:
    r = api.call("POST", "/v1/choose", "decide",
                 json={"member_id": "m-roles", "channel": "email", "activate": False})  # fmt: skip
    return r.json["event_id"]


def _pending_change(api: Api) -> int:
    n = len(api.gov.changes())
    r = api.call("PATCH", "/v1/offers/capped", "admin", json={"budget": 60.0 + n})
    assert r.status_code == 202, r.json
    return r.json["change_id"]


_counter = itertools.count()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from seeded_api(tmp_path_factory, "roles")

# (method, path template, allowed roles, prepare -> (path, json body))
ROUTES: list[tuple[str, str, tuple[str, ...], Prep]] = [
    ("POST", "/v1/choose", ("decide",), lambda a: ("/v1/choose", {"member_id": "m-r", "channel": "email"})),
    ("POST", "/v1/reward", ("decide",), lambda a: ("/v1/reward", {"event_id": _new_event(a), "reward": 0})),
    ("POST", "/v1/events/{event_id}/activate", ("decide",),
     lambda a: (f"/v1/events/{_new_event(a)}/activate", None)),
    ("GET", "/v1/offers", ("analyst", "admin", "approver"), lambda a: ("/v1/offers", None)),
    ("POST", "/v1/offers", ("admin",), lambda a: (
        "/v1/offers", {"offer_id": f"r-{next(_counter)}", "channels": ["push"], "cost": 1})),
    ("GET", "/v1/offers/{offer_id}", ("analyst", "admin", "approver"), lambda a: ("/v1/offers/plain-a", None)),
    ("PATCH", "/v1/offers/{offer_id}", ("admin",), lambda a: ("/v1/offers/plain-a", {"cost": 1.5})),
    ("GET", "/v1/channels", ("analyst", "admin", "approver"), lambda a: ("/v1/channels", None)),
    ("GET", "/v1/channels/{name}", ("analyst", "admin", "approver"), lambda a: ("/v1/channels/push", None)),
    ("PUT", "/v1/channels/{name}", ("admin",), lambda a: ("/v1/channels/site", {"exploration_floor": 0.05})),
    ("PUT", "/v1/model-groups/{group}", ("admin",), lambda a: (
        "/v1/model-groups/apps", {"policy": {"family": "thompson", "params": {"prior_beta": 1.0 + next(_counter)}}})),
    ("GET", "/v1/settings", ("analyst", "admin", "approver"), lambda a: ("/v1/settings", None)),
    ("PUT", "/v1/settings", ("admin",),
     lambda a: ("/v1/settings", {"member_cap": {"max": 3 + next(_counter), "window_days": 7}})),
    ("GET", "/v1/changes", ("analyst", "admin", "approver"), lambda a: ("/v1/changes?status=pending", None)),
    ("POST", "/v1/changes/{change_id}/approve", ("approver",),
     lambda a: (f"/v1/changes/{_pending_change(a)}/approve", None)),
    ("POST", "/v1/changes/{change_id}/reject", ("approver",),
     lambda a: (f"/v1/changes/{_pending_change(a)}/reject", None)),
    ("POST", "/v1/changes/{change_id}/withdraw", ("admin",),  # the proposing key: admin's
     lambda a: (f"/v1/changes/{_pending_change(a)}/withdraw", None)),
    ("GET", "/v1/audit", ("analyst", "admin", "approver"), lambda a: ("/v1/audit", None)),
    ("GET", "/v1/reports/lift", ("analyst",), lambda a: ("/v1/reports/lift?channel=email", None)),
    ("GET", "/v1/reports/spend", ("analyst",), lambda a: ("/v1/reports/spend", None)),
]
CALLERS = (*ROLES, None, "bogus", "revoked")


def test_matrix_covers_every_documented_route() -> None:
    doc = openapi_document()
    documented = {(m.upper(), p) for p, item in doc["paths"].items() for m in item
                  if m != "parameters" and p.startswith("/v1")}  # fmt: skip
    assert documented == {(m, p) for m, p, _, _ in ROUTES}
    for m, p, roles, _ in ROUTES:
        assert sorted(doc["paths"][p][m.lower()]["x-roles"]) == sorted(roles), (m, p)


@pytest.mark.parametrize("caller", CALLERS, ids=[str(c) for c in CALLERS])
@pytest.mark.parametrize("route", ROUTES, ids=[f"{r[0]} {r[1]}" for r in ROUTES])
def test_role_matrix(api: Api, route: tuple[str, str, tuple[str, ...], Prep], caller: str | None) -> None:
    method, _, allowed, prep = route
    path, body = prep(api)
    if caller == "bogus":
        r = api.call(method, path, key="bek_not-a-real-key", json=body)
        expected = {401}
    elif caller == "revoked":
        key, rec = api.gov.create_key("admin", name="to-revoke")
        api.gov.revoke_key(rec.key_id)
        r = api.call(method, path, key=key, json=body)
        expected = {401}
    elif caller is None:
        r = api.call(method, path, json=body)
        expected = {401}
    else:
        r = api.call(method, path, caller, json=body)
        expected = {200, 201, 202} if caller in allowed else {403}
    assert r.status_code in expected, (r.status_code, r.get_data(as_text=True)[:300])
    if r.status_code >= 400:
        assert r.json["error"]["code"] == {401: "unauthorized", 403: "forbidden"}[r.status_code]


def test_open_routes_need_no_key(api: Api) -> None:
    assert api.call("GET", "/healthz").status_code == 200
    m = api.call("GET", "/metrics")
    assert m.status_code == 200 and b"bandit_engine_decisions_total" in m.data
    assert b'bandit_engine_budget_remaining{offer_id="capped"}' in m.data
    assert api.call("GET", "/openapi.json").json["openapi"] == "3.1.0"


def test_malformed_authorization_headers(api: Api) -> None:
    for header in ("Basic abc", "Bearer", "Bearer ", api.keys["decide"], "Token " + api.keys["decide"]):
        r = api.client.post("/v1/choose", json={"member_id": "m", "channel": "email"},
                            headers={"Authorization": header})  # fmt: skip
        assert r.status_code == 401, header
