"""The OpenAPI document validates, and schemathesis drives the live app with no server error."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from tests.api_fixtures import Api, make_api, seed


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Any:
    a = make_api(tmp_path_factory.mktemp("openapi"))
    seed(a)
    yield a
    a.engine.ledger.close()


def test_document_validates(live: Api) -> None:
    doc = live.call("GET", "/openapi.json").json
    validate(doc)
    assert doc["openapi"] == "3.1.0"
    rules = {r.rule.replace("<int:", "{").replace("<", "{").replace(">", "}")
             for r in live.app.url_map.iter_rules() if r.endpoint != "static"}  # fmt: skip
    assert rules == set(doc["paths"])  # every route is documented, nothing more


@pytest.fixture(scope="module")
def api_schema(live: Api) -> Any:
    return schemathesis.openapi.from_wsgi("/openapi.json", live.app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))  # fmt: skip
def test_no_server_errors(case: Any, live: Api) -> None:
    roles = case.operation.definition.raw.get("x-roles")
    headers = {"Authorization": f"Bearer {live.keys[roles[0]]}"} if roles else {}
    response = case.call(headers=headers)
    assert response.status_code < 500, (case.method, case.path, response.text[:300])
    if response.status_code >= 400:
        err = response.json()["error"]
        assert err["code"] and err["message"]
