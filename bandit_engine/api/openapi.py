"""The OpenAPI 3.1 document of the HTTP service (served at ``/openapi.json``).

Each operation lists the roles allowed to call it under ``x-roles``; the role-matrix test and
the schemathesis run read them from here, so the document and the code cannot drift silently.
"""

from __future__ import annotations

from typing import Any

from .. import __version__
from ..catalog import REWARD_LIMIT
from ..governance import CHANGE_KINDS, CHANGE_STATUSES

ID = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$"}
NUM = {"type": "number"}
OPT_NUM = {"type": ["number", "null"]}
SCALAR = {"type": ["number", "string", "boolean"]}
MONEY = {"type": "number", "minimum": 0, "maximum": 1e12}
OPT_MONEY = {"type": ["number", "null"], "minimum": 0, "maximum": 1e12}
REWARD = {"type": "number", "minimum": -REWARD_LIMIT, "maximum": REWARD_LIMIT}
TIME = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 253_402_300_799_999},  # epoch ms to 9999
                  {"type": "string"}, {"type": "null"}]}


def _err(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema or {"type": "object"}}}}


def _body(schema: dict[str, Any], required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _op(summary: str, roles: list[str], responses: dict[str, Any], body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    common = {"401": _err("missing or unknown key"), "403": _err("wrong role"),
              "400": _err("malformed request"), "422": _err("invalid values"),
              "413": _err("body over 64 KiB"),
              "503": _err("database unavailable or busy, or the model loading (retry); "
                          "or the channel's stored policy cannot be built "
                          "(policy_unavailable)")}  # fmt: skip
    op: dict[str, Any] = {"summary": summary, "x-roles": roles, "security": [{"bearer": []}],
                          "responses": {**common, **responses}}  # fmt: skip
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    return op


def _path(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema or ID}


READERS = ["analyst", "admin", "approver"]
CHANGE_ID = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}

MEMBER_CAP = {"type": ["object", "null"], "additionalProperties": False, "required": ["max", "window_days"],
              "properties": {"max": {"type": "integer", "minimum": 1, "maximum": 10**12},
                             "window_days": {"type": "number", "exclusiveMinimum": 0, "maximum": 3660}}}  # fmt: skip
SETTINGS = {"type": "object", "additionalProperties": False, "properties": {"member_cap": MEMBER_CAP}}
RULE = {"type": "object", "required": ["field", "op", "value"], "additionalProperties": False,
        "properties": {"field": {"type": "string", "minLength": 1},
                       "op": {"enum": ["in", "not_in", "eq", "ne", "gt", "gte", "lt", "lte"]},
                       "value": {}}}  # fmt: skip
# integers up to 2**53 (a float holds them exactly), strings up to 256 characters
FEATURES = {"type": "object", "maxProperties": 64, "propertyNames": {"minLength": 1, "maxLength": 64},
            "additionalProperties": {"anyOf": [
                {"type": "number", "not": {"type": "integer"}}, {"type": "boolean"},
                {"type": "integer", "minimum": -(2**53), "maximum": 2**53},
                {"type": "string", "maxLength": 256}]}}  # fmt: skip
# a choose's context: the engine's own feature names are refused (the history's ``member.*``
# and ``o.*``, the request's ``channel``), and so is ``=`` (a string feature is named key=value)
CONTEXT = {**FEATURES, "propertyNames": {"maxLength": 64, "minLength": 1, "not": {"anyOf": [
    {"const": "channel"}, {"pattern": r"^member\."}, {"pattern": r"^o\."}, {"pattern": "="}]}}}
# a new offer's feature names: not ``offer`` (the id's name in exports), no ``=``
OFFER_FEATURES = {**FEATURES, "propertyNames": {"maxLength": 64, "minLength": 1, "not": {
    "anyOf": [{"const": "offer"}, {"pattern": "="}]}}}  # fmt: skip
OFFER_PROPS: dict[str, Any] = {
    "channels": {"type": "array", "items": ID, "minItems": 1},
    "features": OFFER_FEATURES, "cost": MONEY, "budget": OPT_MONEY,
    "max_impressions": {"type": ["integer", "null"], "minimum": 0, "maximum": 10**12},
    "member_cap": MEMBER_CAP, "starts_at": TIME, "ends_at": TIME,
    "active": {"type": "boolean"}, "rules": {"type": "array", "items": RULE},
}  # fmt: skip
CHANNEL_PROPS: dict[str, Any] = {
    "name": ID,
    "policy": {"type": "object", "properties": {"family": {"type": "string"}, "params": {"type": "object"}}},
    "reward_window_days": {"type": "number", "minimum": 1e-6, "maximum": 366},
    "default_reward": REWARD, "aggregation": {"enum": ["first", "sum"]},
    "holdout_fraction": {"type": "number", "minimum": 0, "maximum": 1},
    "default_offer": {"type": ["string", "null"]},
    "exploration_floor": {"type": "number", "minimum": 1e-6, "maximum": 1}, "salt": {"type": "string"},
    "provisional_reward": {**REWARD, "type": ["number", "null"]},
    "model_group": {"type": ["string", "null"]},
}  # fmt: skip
DECISION = {
    "type": "object", "required": ["event_id", "offer_id", "probability", "group", "policy"],
    "properties": {
        "event_id": {"type": "string"}, "offer_id": {"type": ["string", "null"]},
        "probability": {"type": ["number", "null"]}, "group": {"enum": ["treatment", "holdout"]},
        "policy": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "integer"}}},
        "reason": {"type": "string"},
    },
}  # fmt: skip
PENDING = {"type": "object", "required": ["change_id", "status"],
           "properties": {"change_id": {"type": "integer"}, "status": {"const": "pending"}}}  # fmt: skip
REASON = _body({"type": "object", "additionalProperties": False,
                "properties": {"reason": {"type": "string", "maxLength": 1000}}}, required=False)  # fmt: skip


def openapi_document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/choose": {"post": _op("Choose an offer for a member on a channel", ["decide"], {
            "200": _ok("the decision (a re-sent event_id returns the original)", DECISION),
            "404": _err("unknown channel"), "409": _err("event id reused for another member")},
            _body({"type": "object", "additionalProperties": False, "required": ["member_id", "channel"],
                   "properties": {"member_id": ID, "channel": ID, "context": CONTEXT, "event_id": ID,
                                  "activate": {"type": "boolean", "description": (
                                      "false: a deferred decision (an email not yet opened), "
                                      "learned once POST /v1/events/{event_id}/activate")},
                                  "consent": {"type": "boolean", "description": (
                                      "false: serves nothing (or the channel's default offer) "
                                      "and learns nothing")}}}))},  # fmt: skip
        "/v1/reward": {"post": _op("Record the reward of a decision", ["decide"], {
            "200": _ok("recorded or duplicate", {"type": "object", "required": ["event_id", "status"],
                       "properties": {"status": {"enum": ["recorded", "duplicate"]}}}),
            "404": _err("unknown event"), "409": _err("reward window closed")},
            _body({"type": "object", "additionalProperties": False, "required": ["event_id", "reward"],
                   "properties": {"event_id": ID, "reward": REWARD, "cost": OPT_MONEY,
                                  "reward_id": ID}}))},  # fmt: skip
        "/v1/events/{event_id}/activate": {
            "parameters": [_path("event_id")],
            "post": _op("Activate a deferred decision", ["decide"], {
                "200": _ok("activated"), "404": _err("unknown event"), "409": _err("already settled, or its reward window has passed")},
                _body({"type": "object", "additionalProperties": False, "properties": {}}, required=False))},  # fmt: skip
        "/v1/offers": {
            "get": _op("List offers with live state", READERS, {"200": _ok("offers")}),
            "post": _op("Create an offer (governed settings -> 202 pending change)", ["admin"], {
                "201": _ok("created"), "202": _ok("created inactive, change pending", PENDING),
                "404": _err("unknown channel"), "409": _err("offer exists")},
                _body({"type": "object", "additionalProperties": False,
                       "required": ["offer_id", "channels", "cost"],
                       "properties": {"offer_id": ID, **OFFER_PROPS}}))},  # fmt: skip
        "/v1/offers/{offer_id}": {
            "parameters": [_path("offer_id")],
            "get": _op("One offer with live state", READERS, {"200": _ok("offer"), "404": _err("unknown offer")}),
            "patch": _op("Edit an offer (governed settings -> 202 pending change)", ["admin"], {
                "200": _ok("applied"), "202": _ok("change pending", PENDING),
                "404": _err("unknown offer"), "409": _err("conflict")},
                _body({"type": "object", "additionalProperties": False, "properties": OFFER_PROPS}))},  # fmt: skip
        "/v1/channels": {"get": _op("List channels", READERS, {"200": _ok("channels")})},
        "/v1/channels/{name}": {
            "parameters": [_path("name")],
            "get": _op("One channel's settings", READERS, {"200": _ok("channel"), "404": _err("unknown channel")}),
            "put": _op("Configure a channel (its reward and hold-out are governed)", ["admin"], {
                "200": _ok("applied"), "202": _ok("change pending", PENDING),
                "404": _err("unknown channel or default offer")},
                _body({"type": "object", "additionalProperties": False, "properties": CHANNEL_PROPS}))},  # fmt: skip
        "/v1/model-groups/{group}": {
            "parameters": [_path("group")],
            "put": _op("Switch the policy of every channel of a model group at once", ["admin"], {
                "200": _ok("applied"), "404": _err("no channel learns this model group")},
                _body({"type": "object", "additionalProperties": False, "required": ["policy"],
                       "properties": {"policy": CHANNEL_PROPS["policy"]}}))},  # fmt: skip
        "/v1/settings": {
            "get": _op("Engine-wide settings: the member cap shared by every channel", READERS,
                       {"200": _ok("settings", SETTINGS)}),
            "put": _op("Change engine-wide settings (all governed: a pending change)", ["admin"], {
                "200": _ok("unchanged", SETTINGS), "202": _ok("change pending", PENDING)},
                _body({**SETTINGS, "required": ["member_cap"]}))},  # fmt: skip
        "/v1/changes": {"get": _op(
            "List change requests, oldest first (page on with after = the last change_id)",
            READERS, {"200": _ok("changes")}, params=[
                {"name": "status", "in": "query", "required": False,
                 "schema": {"enum": list(CHANGE_STATUSES)}},
                {"name": "kind", "in": "query", "required": False,
                 "schema": {"enum": list(CHANGE_KINDS)}},
                {"name": "target", "in": "query", "required": False, "schema": ID},
                {"name": "after", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 0}},
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}])},  # fmt: skip
        "/v1/changes/{change_id}/approve": {
            "parameters": [_path("change_id", CHANGE_ID)],
            "post": _op("Approve a change (never by its proposer)", ["approver"], {
                "200": _ok("approved and applied"), "404": _err("unknown change"),
                "409": _err("not pending, or cannot apply")}, REASON)},  # fmt: skip
        "/v1/changes/{change_id}/reject": {
            "parameters": [_path("change_id", CHANGE_ID)],
            "post": _op("Reject a change", ["approver"], {
                "200": _ok("rejected"), "404": _err("unknown change"), "409": _err("not pending")}, REASON)},  # fmt: skip
        "/v1/changes/{change_id}/withdraw": {
            "parameters": [_path("change_id", CHANGE_ID)],
            "post": _op("Withdraw a pending change (only by the key that proposed it)", ["admin"], {
                "200": _ok("withdrawn"), "404": _err("unknown change"),
                "409": _err("not pending")}, REASON)},  # fmt: skip
        "/v1/audit": {"get": _op("The audit log", READERS, {"200": _ok("entries")}, params=[
            {"name": "after", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0}},
            {"name": "limit", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 1, "maximum": 5000}}])},  # fmt: skip
        "/v1/reports/lift": {"get": _op("Treatment vs hold-out reward rate with 95 % intervals", ["analyst"], {
            "200": _ok("per channel"), "404": _err("unknown channel")}, params=[
            {"name": "channel", "in": "query", "required": False, "schema": ID}])},  # fmt: skip
        "/v1/reports/spend": {"get": _op("Budget, spent, committed, pacing, projected exhaustion", ["analyst"],
                                         {"200": _ok("per offer")})},  # fmt: skip
        "/healthz": {"get": {"summary": "Liveness and database check", "security": [],
                             "responses": {"200": _ok("ok"), "503": _err("database unavailable")}}},  # fmt: skip
        "/metrics": {"get": {"summary": "Prometheus metrics", "security": [], "responses": {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},  # fmt: skip
        "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": _ok("OpenAPI 3.1")}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "bandit_engine", "version": __version__,
                 "description": "Contextual-bandit decisions for loyalty offers."},  # fmt: skip
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {"type": "object", "required": ["code", "message"],
                                         "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}},
            }},
        },  # fmt: skip
        "security": [{"bearer": []}],
    }
