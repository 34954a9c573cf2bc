"""The OpenAPI document validates, and schemathesis drives the live app with no server error."""

from __future__ import annotations

import re
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate

from tests.api_fixtures import Api, seeded_api


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from seeded_api(tmp_path_factory, "openapi")


def test_document_validates(live: Api) -> None:
    doc = live.call("GET", "/openapi.json").json
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    rules = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule)
             for r in live.app.url_map.iter_rules() if r.endpoint != "static"}  # fmt: skip
    assert rules == set(doc["paths"])  # every route is documented, nothing more


def _operations(live: Api) -> list[Any]:
    schema = schemathesis.openapi.from_wsgi("/openapi.json", live.app)
    return [op.ok() for op in schema.get_all_operations()]


def test_no_server_errors(live: Api) -> None:
    """Every documented operation, fed schema-generated (positive and negative) requests with a
    key of an allowed role: never a 5xx, always a JSON error body on 4xx."""
    ops = _operations(live)
    doc = live.call("GET", "/openapi.json").json
    documented = {f"{m.upper()} {p}" for p, item in doc["paths"].items() for m in item if m != "parameters"}
    # schemathesis leaves out the document's own route
    assert {op.label for op in ops} == documented - {"GET /openapi.json"}
    seen: dict[str, set[int]] = {}
    for op in ops:
        roles = op.definition.raw.get("x-roles")
        headers = {"Authorization": f"Bearer {live.keys[roles[0]]}"} if roles else {}
        _checker(op, headers, seen)()
    assert len(seen) == len(ops)
    assert any(200 <= s < 300 for codes in seen.values() for s in codes)


def _checker(op: Any, headers: dict[str, str], seen: dict[str, set[int]]) -> Any:
    @given(case=op.as_strategy())
    @settings(max_examples=15, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case: Any) -> None:
        response = case.call(headers=headers)
        seen.setdefault(op.label, set()).add(response.status_code)
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
        if response.status_code >= 400:
            err = response.json()["error"]
            assert err["code"] and err["message"]

    return check


def test_the_documented_reward_bounds_are_the_ones_the_api_enforces(live: Api) -> None:
    """The document said only "number" for a reward, a default and a provisional reward: a
    client generating requests from it sent values the engine refuses. Each bound is checked
    on both sides: the documented maximum (and minimum) passes validation, just past it is a
    422 (an unknown event is a 404 once the body is valid; a channel setting is governed)."""
    doc = live.call("GET", "/openapi.json").json
    reward = doc["paths"]["/v1/reward"]["post"]["requestBody"]["content"]["application/json"]
    bounds = reward["schema"]["properties"]["reward"]
    assert bounds["maximum"] == -bounds["minimum"] > 0
    for edge in (bounds["minimum"], bounds["maximum"]):
        body = {"event_id": "no-such-event", "reward": edge}
        assert live.call("POST", "/v1/reward", "decide", body).status_code == 404
        body["reward"] = edge * (1 + 1e-9)
        r = live.call("POST", "/v1/reward", "decide", body)
        assert r.status_code == 422 and r.json["error"]["code"] == "invalid_argument", r.json
    put = doc["paths"]["/v1/channels/{name}"]["put"]["requestBody"]["content"]["application/json"]
    props = put["schema"]["properties"]
    for name in ("default_reward", "provisional_reward"):
        assert props[name]["maximum"] == bounds["maximum"], name
        assert props[name]["minimum"] == bounds["minimum"], name
        before = live.call("GET", "/v1/changes", "analyst").json
        over = live.call("PUT", "/v1/channels/email", "admin", {name: bounds["maximum"] * 1.01})
        assert over.status_code == 422 and over.json["error"]["code"] == "invalid_argument"
        assert live.call("GET", "/v1/changes", "analyst").json == before
        ok = live.call("PUT", "/v1/channels/email", "admin", {name: bounds["maximum"]})
        assert ok.status_code in (200, 202), ok.json


def test_the_documented_reserved_names_are_the_ones_the_api_refuses(live: Api) -> None:
    """The document let through context keys the engine refuses (``o.*``, ``=``) and offer
    feature names it refuses (``offer``, ``=``): a client validating against it got 422s. Each
    name is accepted by the schema exactly when the API accepts it."""
    from jsonschema import Draft202012Validator

    doc = live.call("GET", "/openapi.json").json
    choose = doc["paths"]["/v1/choose"]["post"]["requestBody"]["content"]["application/json"]
    context = Draft202012Validator(choose["schema"]["properties"]["context"])
    for key in ("tier", "o.x", "a=b", "channel", "member.x", "origin", "o", "membership"):
        r = live.call("POST", "/v1/choose", "decide",
                      {"member_id": "m1", "channel": "email", "context": {key: 1}})  # fmt: skip
        assert context.is_valid({key: 1}) == (r.status_code == 200), (key, r.json)
    create = doc["paths"]["/v1/offers"]["post"]["requestBody"]["content"]["application/json"]
    features = Draft202012Validator(create["schema"]["properties"]["features"])
    for k, name in enumerate(("kind", "offer", "a=b", "offers", "o.x")):
        r = live.call("POST", "/v1/offers", "admin", {"offer_id": f"names-{k}", "channels":
                                                     ["email"], "cost": 1, "features": {name: 1}})
        assert features.is_valid({name: 1}) == (r.status_code == 201), (name, r.json)
