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
