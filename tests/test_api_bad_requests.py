"""A table of bad requests: each gets its 4xx status and error code, and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.api_fixtures import Api, seeded_api

LONG = "x" * 129
HUGE_INT = 10**400  # a valid JSON number no float holds
OK_CHOOSE = {"member_id": "m-2", "channel": "email"}
OK_OFFER = {"offer_id": "new-offer", "channels": ["email"], "cost": 1.0, "features": {"k": 1}}


def choose(**kw: Any) -> dict[str, Any]:
    return {**OK_CHOOSE, **kw}


def offer(**kw: Any) -> dict[str, Any]:
    return {**OK_OFFER, **kw}


def drop(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


RAW = "raw"  # the body is sent verbatim
# (name, method, path, role, body, status, code)
CASES: list[tuple[str, str, str, str, Any, int, str]] = [
    # --- choose: syntax
    ("choose-empty-body", "POST", "/v1/choose", "decide", (RAW, ""), 400, "invalid_json"),
    ("choose-not-json", "POST", "/v1/choose", "decide", (RAW, "member_id=m"), 400, "invalid_json"),
    ("choose-truncated", "POST", "/v1/choose", "decide", (RAW, '{"member_id": "m"'), 400, "invalid_json"),
    ("choose-trailing", "POST", "/v1/choose", "decide", (RAW, '{"member_id": "m"} x'), 400, "invalid_json"),
    ("choose-nan", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"x":NaN}}'), 400, "invalid_json"),
    ("choose-infinity", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"x":Infinity}}'), 400, "invalid_json"),
    ("choose-neg-infinity", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"x":-Infinity}}'), 400, "invalid_json"),
    ("choose-huge-number", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"x":1e999}}'), 422, "invalid_argument"),
    ("choose-huge-integer", "POST", "/v1/choose", "decide",  # a float would overflow to inf
     (RAW, '{"member_id":"m","channel":"email","context":{"x":10000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000}}'), 422, "invalid_argument"),
    ("choose-integer-past-2-53", "POST", "/v1/choose", "decide", choose(context={"x": 2**53 + 1}), 422, "invalid_argument"),
    ("choose-byte-order-mark", "POST", "/v1/choose", "decide",
     (RAW, b'\xef\xbb\xbf{"member_id":"m","channel":"email"}'), 400, "invalid_json"),
    ("choose-consent-string", "POST", "/v1/choose", "decide", choose(consent="no"), 422, "invalid_argument"),
    ("choose-array-body", "POST", "/v1/choose", "decide", [OK_CHOOSE], 400, "invalid_body"),
    ("choose-string-body", "POST", "/v1/choose", "decide", "hello", 400, "invalid_body"),
    ("choose-null-body", "POST", "/v1/choose", "decide", (RAW, "null"), 400, "invalid_body"),
    ("choose-invalid-utf8", "POST", "/v1/choose", "decide", (RAW, b'{"member_id": "\xff"}'), 400, "invalid_json"),
    ("choose-too-large", "POST", "/v1/choose", "decide",
     choose(context={"pad": "y" * 200, **{f"k{i}": "z" * 250 for i in range(300)}}), 413, "payload_too_large"),
    # --- choose: fields
    ("choose-missing-member", "POST", "/v1/choose", "decide", drop(OK_CHOOSE, "member_id"), 422, "missing_field"),
    ("choose-missing-channel", "POST", "/v1/choose", "decide", drop(OK_CHOOSE, "channel"), 422, "missing_field"),
    ("choose-unknown-field", "POST", "/v1/choose", "decide", choose(extra=1), 422, "unknown_field"),
    ("choose-member-int", "POST", "/v1/choose", "decide", choose(member_id=5), 422, "invalid_argument"),
    ("choose-member-null", "POST", "/v1/choose", "decide", choose(member_id=None), 422, "invalid_argument"),
    ("choose-member-list", "POST", "/v1/choose", "decide", choose(member_id=["m"]), 422, "invalid_argument"),
    ("choose-member-empty", "POST", "/v1/choose", "decide", choose(member_id=""), 422, "invalid_argument"),
    ("choose-member-long", "POST", "/v1/choose", "decide", choose(member_id=LONG), 422, "invalid_argument"),
    ("choose-member-space", "POST", "/v1/choose", "decide", choose(member_id="a b"), 422, "invalid_argument"),
    ("choose-member-leading-dash", "POST", "/v1/choose", "decide", choose(member_id="-m"), 422, "invalid_argument"),
    ("choose-channel-int", "POST", "/v1/choose", "decide", choose(channel=1), 422, "invalid_argument"),
    ("choose-channel-empty", "POST", "/v1/choose", "decide", choose(channel=""), 422, "invalid_argument"),
    ("choose-channel-unknown", "POST", "/v1/choose", "decide", choose(channel="fax"), 404, "unknown_channel"),
    ("choose-context-list", "POST", "/v1/choose", "decide", choose(context=[1, 2]), 422, "invalid_argument"),
    ("choose-context-string", "POST", "/v1/choose", "decide", choose(context="tier=gold"), 422, "invalid_argument"),
    ("choose-context-number", "POST", "/v1/choose", "decide", choose(context=3), 422, "invalid_argument"),
    ("choose-context-value-list", "POST", "/v1/choose", "decide", choose(context={"a": [1]}), 422, "invalid_argument"),
    ("choose-context-value-dict", "POST", "/v1/choose", "decide", choose(context={"a": {"b": 1}}), 422, "invalid_argument"),
    ("choose-context-value-null", "POST", "/v1/choose", "decide", choose(context={"a": None}), 422, "invalid_argument"),
    ("choose-context-empty-key", "POST", "/v1/choose", "decide", choose(context={"": 1}), 422, "invalid_argument"),
    ("choose-context-long-key", "POST", "/v1/choose", "decide", choose(context={"k" * 65: 1}), 422, "invalid_argument"),
    ("choose-context-long-value", "POST", "/v1/choose", "decide", choose(context={"k": "v" * 257}), 422, "invalid_argument"),
    ("choose-context-reserved-channel", "POST", "/v1/choose", "decide",
     choose(context={"channel": "push"}), 422, "invalid_argument"),
    ("choose-context-reserved-member", "POST", "/v1/choose", "decide",
     choose(context={"member.exposures": 0}), 422, "invalid_argument"),
    ("choose-context-too-many", "POST", "/v1/choose", "decide",
     choose(context={f"k{i}": i for i in range(65)}), 422, "invalid_argument"),
    ("choose-event-int", "POST", "/v1/choose", "decide", choose(event_id=7), 422, "invalid_argument"),
    ("choose-event-empty", "POST", "/v1/choose", "decide", choose(event_id=""), 422, "invalid_argument"),
    ("choose-event-long", "POST", "/v1/choose", "decide", choose(event_id=LONG), 422, "invalid_argument"),
    ("choose-event-other-member", "POST", "/v1/choose", "decide", choose(event_id="ev-1"), 409, "conflict"),
    ("choose-activate-string", "POST", "/v1/choose", "decide", choose(activate="yes"), 422, "invalid_argument"),
    ("choose-activate-int", "POST", "/v1/choose", "decide", choose(activate=1), 422, "invalid_argument"),
    # --- reward
    ("reward-empty", "POST", "/v1/reward", "decide", {}, 422, "missing_field"),
    ("reward-missing-reward", "POST", "/v1/reward", "decide", {"event_id": "ev-1"}, 422, "missing_field"),
    ("reward-unknown-event", "POST", "/v1/reward", "decide", {"event_id": "nope", "reward": 1}, 404, "unknown_event"),
    ("reward-nan", "POST", "/v1/reward", "decide", (RAW, '{"event_id":"ev-1","reward":NaN}'), 400, "invalid_json"),
    ("reward-infinity", "POST", "/v1/reward", "decide", (RAW, '{"event_id":"ev-1","reward":Infinity}'), 400, "invalid_json"),
    ("reward-string", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": "1"}, 422, "invalid_argument"),
    ("reward-bool", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": True}, 422, "invalid_argument"),
    ("reward-null", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": None}, 422, "invalid_argument"),
    ("reward-huge", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": 1e12}, 422, "invalid_argument"),
    ("reward-cost-negative", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": 1, "cost": -1}, 422, "invalid_argument"),
    ("reward-cost-string", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": 1, "cost": "1"}, 422, "invalid_argument"),
    ("reward-cost-above", "POST", "/v1/reward", "decide",
     {"event_id": "ev-1", "reward": 1, "cost": 1000}, 422, "cost_above_reservation"),
    ("reward-event-int", "POST", "/v1/reward", "decide", {"event_id": 1, "reward": 1}, 422, "invalid_argument"),
    ("reward-event-empty", "POST", "/v1/reward", "decide", {"event_id": "", "reward": 1}, 422, "invalid_argument"),
    ("reward-event-long", "POST", "/v1/reward", "decide", {"event_id": LONG, "reward": 1}, 422, "invalid_argument"),
    ("reward-unknown-field", "POST", "/v1/reward", "decide", {"event_id": "ev-1", "reward": 1, "x": 1}, 422, "unknown_field"),
    ("reward-array", "POST", "/v1/reward", "decide", [{"event_id": "ev-1", "reward": 1}], 400, "invalid_body"),
    ("reward-malformed", "POST", "/v1/reward", "decide", (RAW, "{'event_id': 'ev-1'}"), 400, "invalid_json"),
    # --- activate
    ("activate-unknown", "POST", "/v1/events/nope/activate", "decide", None, 404, "unknown_event"),
    ("activate-bad-id", "POST", "/v1/events/-bad/activate", "decide", None, 422, "invalid_argument"),
    ("activate-unknown-field", "POST", "/v1/events/ev-1/activate", "decide", {"x": 1}, 422, "unknown_field"),
    ("activate-get", "GET", "/v1/events/ev-1/activate", "decide", None, 405, "method_not_allowed"),
    # --- offers POST
    ("offer-empty", "POST", "/v1/offers", "admin", {}, 422, "missing_field"),
    ("offer-missing-cost", "POST", "/v1/offers", "admin", drop(OK_OFFER, "cost"), 422, "missing_field"),
    ("offer-missing-channels", "POST", "/v1/offers", "admin", drop(OK_OFFER, "channels"), 422, "missing_field"),
    ("offer-unknown-field", "POST", "/v1/offers", "admin", offer(colour="red"), 422, "unknown_field"),
    ("offer-bad-id", "POST", "/v1/offers", "admin", offer(offer_id="has space"), 422, "invalid_argument"),
    ("offer-empty-id", "POST", "/v1/offers", "admin", offer(offer_id=""), 422, "invalid_argument"),
    ("offer-long-id", "POST", "/v1/offers", "admin", offer(offer_id=LONG), 422, "invalid_argument"),
    ("offer-id-int", "POST", "/v1/offers", "admin", offer(offer_id=12), 422, "invalid_argument"),
    ("offer-channels-empty", "POST", "/v1/offers", "admin", offer(channels=[]), 422, "invalid_argument"),
    ("offer-channels-string", "POST", "/v1/offers", "admin", offer(channels="email"), 422, "invalid_argument"),
    ("offer-channels-ints", "POST", "/v1/offers", "admin", offer(channels=[1]), 422, "invalid_argument"),
    ("offer-channel-unknown", "POST", "/v1/offers", "admin", offer(channels=["fax"]), 404, "unknown_channel"),
    ("offer-cost-negative", "POST", "/v1/offers", "admin", offer(cost=-1), 422, "invalid_argument"),
    ("offer-cost-string", "POST", "/v1/offers", "admin", offer(cost="5"), 422, "invalid_argument"),
    ("offer-cost-huge", "POST", "/v1/offers", "admin", offer(cost=1e15), 422, "invalid_argument"),
    ("offer-cost-nan", "POST", "/v1/offers", "admin",
     (RAW, json.dumps(OK_OFFER).replace('"cost": 1.0', '"cost": NaN')), 400, "invalid_json"),
    ("offer-budget-negative", "POST", "/v1/offers", "admin", offer(budget=-5), 422, "invalid_argument"),
    ("offer-budget-bool", "POST", "/v1/offers", "admin", offer(budget=True), 422, "invalid_argument"),
    ("offer-budget-infinity", "POST", "/v1/offers", "admin",
     (RAW, json.dumps(offer(budget=1)).replace('"budget": 1', '"budget": Infinity')), 400, "invalid_json"),
    ("offer-features-list", "POST", "/v1/offers", "admin", offer(features=["a"]), 422, "invalid_argument"),
    ("offer-features-nested", "POST", "/v1/offers", "admin", offer(features={"a": {"b": 1}}), 422, "invalid_argument"),
    ("offer-max-impr-huge", "POST", "/v1/offers", "admin", offer(max_impressions=10**30), 422, "invalid_argument"),
    ("offer-member-cap-huge", "POST", "/v1/offers", "admin",
     offer(member_cap={"max": 10**30, "window_days": 7}), 422, "invalid_argument"),
    ("offer-starts-at-huge", "POST", "/v1/offers", "admin", offer(starts_at=10**30), 422, "invalid_argument"),
    ("offer-starts-at-negative", "POST", "/v1/offers", "admin", offer(starts_at=-5), 422, "invalid_argument"),
    ("offer-feature-huge-integer", "POST", "/v1/offers", "admin", offer(features={"d": 10**400}), 422, "invalid_argument"),
    ("offer-65-features", "POST", "/v1/offers", "admin",
     offer(features={f"f{i}": i for i in range(65)}), 422, "invalid_argument"),
    ("offer-rule-extra-key", "POST", "/v1/offers", "admin",
     offer(rules=[{"field": "tier", "op": "eq", "value": "gold", "x": 1}]), 422, "invalid_argument"),
    ("offer-max-impr-negative", "POST", "/v1/offers", "admin", offer(max_impressions=-1), 422, "invalid_argument"),
    ("offer-max-impr-float", "POST", "/v1/offers", "admin", offer(max_impressions=1.5), 422, "invalid_argument"),
    ("offer-member-cap-zero", "POST", "/v1/offers", "admin", offer(member_cap={"max": 0, "window_days": 7}), 422, "invalid_argument"),
    ("offer-member-cap-extra", "POST", "/v1/offers", "admin", offer(member_cap={"max": 1, "days": 7}), 422, "invalid_argument"),
    ("offer-member-cap-list", "POST", "/v1/offers", "admin", offer(member_cap=[1, 7]), 422, "invalid_argument"),
    ("offer-member-cap-window", "POST", "/v1/offers", "admin", offer(member_cap={"max": 1, "window_days": 0}), 422, "invalid_argument"),
    ("offer-window-inverted", "POST", "/v1/offers", "admin", offer(starts_at=2000, ends_at=1000), 422, "invalid_argument"),
    ("offer-starts-bool", "POST", "/v1/offers", "admin", offer(starts_at=True), 422, "invalid_argument"),
    ("offer-starts-garbage", "POST", "/v1/offers", "admin", offer(starts_at="next tuesday"), 422, "invalid_argument"),
    ("offer-active-string", "POST", "/v1/offers", "admin", offer(active="true"), 422, "invalid_argument"),
    ("offer-rule-bad-op", "POST", "/v1/offers", "admin", offer(rules=[{"field": "t", "op": "like", "value": 1}]), 422, "invalid_argument"),
    ("offer-rule-string", "POST", "/v1/offers", "admin", offer(rules=["tier == gold"]), 422, "invalid_argument"),
    ("offer-rule-missing", "POST", "/v1/offers", "admin", offer(rules=[{"field": "t"}]), 422, "invalid_argument"),
    ("offer-exists", "POST", "/v1/offers", "admin", offer(offer_id="plain-a", features={"category": "home"}), 409, "conflict"),
    ("offer-exists-governed", "POST", "/v1/offers", "admin", offer(offer_id="capped", budget=5), 409, "conflict"),
    # --- offers PATCH / GET
    ("patch-unknown-offer", "PATCH", "/v1/offers/nope", "admin", {"cost": 1}, 404, "unknown_offer"),
    ("patch-features", "PATCH", "/v1/offers/plain-a", "admin", {"features": {"category": "toys"}}, 409, "conflict"),
    ("patch-cost-negative", "PATCH", "/v1/offers/plain-a", "admin", {"cost": -1}, 422, "invalid_argument"),
    ("patch-budget-string", "PATCH", "/v1/offers/capped", "admin", {"budget": "lots"}, 422, "invalid_argument"),
    ("patch-budget-below-spent", "PATCH", "/v1/offers/solo", "admin", {"budget": 0.5}, 409, "conflict"),
    ("patch-offer-id", "PATCH", "/v1/offers/plain-a", "admin", {"offer_id": "other"}, 422, "unknown_field"),
    ("patch-unknown-field", "PATCH", "/v1/offers/plain-a", "admin", {"colour": "red"}, 422, "unknown_field"),
    ("patch-channel-unknown", "PATCH", "/v1/offers/plain-a", "admin", {"channels": ["fax"]}, 404, "unknown_channel"),
    ("patch-budget-below-mixed", "PATCH", "/v1/offers/solo", "admin", {"budget": 0.5, "cost": 0.5}, 409, "conflict"),
    ("patch-array", "PATCH", "/v1/offers/plain-a", "admin", [1], 400, "invalid_body"),
    ("patch-empty-body", "PATCH", "/v1/offers/plain-a", "admin", (RAW, ""), 400, "invalid_json"),
    ("patch-cap-invalid", "PATCH", "/v1/offers/capped", "admin", {"max_impressions": -3}, 422, "invalid_argument"),
    ("get-unknown-offer", "GET", "/v1/offers/nope", "analyst", None, 404, "unknown_offer"),
    ("delete-offer", "DELETE", "/v1/offers/plain-a", "admin", None, 405, "method_not_allowed"),
    # --- channels
    ("channel-unknown", "PUT", "/v1/channels/fax", "admin", {"exploration_floor": 0.1}, 404, "unknown_channel"),
    # --- model groups (seeded: site and in_app learn group "apps")
    ("group-unknown", "PUT", "/v1/model-groups/nope", "admin", {"policy": {"family": "uniform"}}, 404, "unknown_model_group"),
    ("group-empty-body", "PUT", "/v1/model-groups/apps", "admin", {}, 422, "missing_field"),
    ("group-unknown-field", "PUT", "/v1/model-groups/apps", "admin",
     {"policy": {"family": "uniform"}, "channels": ["site"]}, 422, "unknown_field"),
    ("group-policy-string", "PUT", "/v1/model-groups/apps", "admin", {"policy": "uniform"}, 422, "invalid_argument"),
    ("group-policy-null", "PUT", "/v1/model-groups/apps", "admin", {"policy": None}, 422, "invalid_argument"),
    ("group-policy-unknown", "PUT", "/v1/model-groups/apps", "admin", {"policy": {"family": "oracle"}}, 422, "unknown_policy"),
    ("group-policy-extra-key", "PUT", "/v1/model-groups/apps", "admin",
     {"policy": {"family": "thompson", "segment_by": ["tier"]}}, 422, "invalid_argument"),
    ("group-policy-bad-param", "PUT", "/v1/model-groups/apps", "admin",
     {"policy": {"family": "thompson", "params": {"no_such_param": 1}}}, 422, "invalid_argument"),
    ("group-policy-params-list", "PUT", "/v1/model-groups/apps", "admin",
     {"policy": {"family": "thompson", "params": [1]}}, 422, "invalid_argument"),
    ("group-malformed", "PUT", "/v1/model-groups/apps", "admin", (RAW, "{"), 400, "invalid_json"),
    ("group-post", "POST", "/v1/model-groups/apps", "admin", {"policy": {"family": "uniform"}}, 405, "method_not_allowed"),
    ("group-decide-role", "PUT", "/v1/model-groups/apps", "decide", {"policy": {"family": "uniform"}}, 403, "forbidden"),
    # --- engine-wide settings
    ("settings-empty", "PUT", "/v1/settings", "admin", {}, 422, "missing_field"),
    ("settings-unknown-field", "PUT", "/v1/settings", "admin", {"member_cap": None, "x": 1}, 422, "unknown_field"),
    ("settings-cap-string", "PUT", "/v1/settings", "admin", {"member_cap": "3/7"}, 422, "invalid_argument"),
    ("settings-cap-list", "PUT", "/v1/settings", "admin", {"member_cap": [3, 7]}, 422, "invalid_argument"),
    ("settings-cap-missing-window", "PUT", "/v1/settings", "admin", {"member_cap": {"max": 3}}, 422, "invalid_argument"),
    ("settings-cap-extra-key", "PUT", "/v1/settings", "admin",
     {"member_cap": {"max": 3, "window_days": 7, "channel": "email"}}, 422, "invalid_argument"),
    ("settings-cap-zero", "PUT", "/v1/settings", "admin", {"member_cap": {"max": 0, "window_days": 7}}, 422, "invalid_argument"),
    ("settings-cap-float-max", "PUT", "/v1/settings", "admin",
     {"member_cap": {"max": 2.5, "window_days": 7}}, 422, "invalid_argument"),
    ("settings-cap-bool-max", "PUT", "/v1/settings", "admin",
     {"member_cap": {"max": True, "window_days": 7}}, 422, "invalid_argument"),
    ("settings-cap-window-negative", "PUT", "/v1/settings", "admin",
     {"member_cap": {"max": 3, "window_days": -1}}, 422, "invalid_argument"),
    ("settings-cap-window-huge", "PUT", "/v1/settings", "admin",
     {"member_cap": {"max": 3, "window_days": 1e9}}, 422, "invalid_argument"),
    ("settings-cap-window-nan", "PUT", "/v1/settings", "admin",
     (RAW, '{"member_cap": {"max": 3, "window_days": NaN}}'), 400, "invalid_json"),
    ("settings-post", "POST", "/v1/settings", "admin", {"member_cap": None}, 405, "method_not_allowed"),
    ("channel-holdout-high", "PUT", "/v1/channels/email", "admin", {"holdout_fraction": 1.5}, 422, "invalid_argument"),
    ("channel-holdout-nan", "PUT", "/v1/channels/email", "admin", (RAW, '{"holdout_fraction": NaN}'), 400, "invalid_json"),
    ("channel-holdout-string", "PUT", "/v1/channels/email", "admin", {"holdout_fraction": "0.1"}, 422, "invalid_argument"),
    ("channel-policy-unknown", "PUT", "/v1/channels/email", "admin", {"policy": {"family": "oracle"}}, 422, "unknown_policy"),
    ("channel-policy-string", "PUT", "/v1/channels/email", "admin", {"policy": "thompson"}, 422, "invalid_argument"),
    ("channel-policy-bad-param", "PUT", "/v1/channels/email", "admin",
     {"policy": {"family": "thompson", "params": {"no_such_param": 1}}}, 422, "invalid_argument"),
    ("channel-window-zero", "PUT", "/v1/channels/email", "admin", {"reward_window_days": 0}, 422, "invalid_argument"),
    ("channel-aggregation", "PUT", "/v1/channels/email", "admin", {"aggregation": "max"}, 422, "invalid_argument"),
    ("channel-default-offer", "PUT", "/v1/channels/email", "admin", {"default_offer": "nope"}, 404, "unknown_offer"),
    ("channel-floor-zero", "PUT", "/v1/channels/email", "admin", {"exploration_floor": 0}, 422, "invalid_argument"),
    ("channel-unknown-field", "PUT", "/v1/channels/email", "admin", {"budget": 1}, 422, "unknown_field"),
    ("channel-name-mismatch", "PUT", "/v1/channels/email", "admin", {"name": "push"}, 422, "invalid_argument"),
    ("channel-malformed", "PUT", "/v1/channels/email", "admin", (RAW, "{"), 400, "invalid_json"),
    ("channel-model-group-space", "PUT", "/v1/channels/email", "admin", {"model_group": "a b"}, 422, "invalid_argument"),
    ("channel-model-group-number", "PUT", "/v1/channels/email", "admin", {"model_group": 5}, 422, "invalid_argument"),
    ("channel-model-group-long", "PUT", "/v1/channels/email", "admin", {"model_group": "g" * 101}, 422, "invalid_argument"),
    # --- changes, audit, reports
    ("approve-unknown", "POST", "/v1/changes/999/approve", "approver", None, 404, "unknown_change"),
    ("approve-id-past-64-bits", "POST", "/v1/changes/9223372036854775808/approve", "approver", None, 404,
     "unknown_change"),
    ("reject-id-huge", "POST", "/v1/changes/99999999999999999999/reject", "approver", None, 404, "unknown_change"),
    ("channel-default-offer-elsewhere", "PUT", "/v1/channels/sms", "admin", {"default_offer": "plain-b"}, 422,
     "invalid_argument"),
    ("approve-non-int", "POST", "/v1/changes/abc/approve", "approver", None, 404, "not_found"),
    ("reject-unknown", "POST", "/v1/changes/999/reject", "approver", None, 404, "unknown_change"),
    ("approve-reason-long", "POST", "/v1/changes/999/approve", "approver", {"reason": "r" * 1001}, 422, "invalid_argument"),
    ("approve-unknown-field", "POST", "/v1/changes/1/approve", "approver", {"why": "x"}, 422, "unknown_field"),
    ("changes-bad-status", "GET", "/v1/changes?status=maybe", "analyst", None, 422, "invalid_argument"),
    ("changes-bad-kind", "GET", "/v1/changes?kind=offers", "analyst", None, 422, "invalid_argument"),
    ("changes-empty-target", "GET", "/v1/changes?target=", "analyst", None, 422, "invalid_argument"),
    ("withdraw-unknown", "POST", "/v1/changes/999/withdraw", "admin", None, 404, "unknown_change"),
    ("withdraw-non-int", "POST", "/v1/changes/abc/withdraw", "admin", None, 404, "not_found"),
    ("withdraw-reason-long", "POST", "/v1/changes/999/withdraw", "admin", {"reason": "r" * 1001}, 422,
     "invalid_argument"),
    ("withdraw-unknown-field", "POST", "/v1/changes/1/withdraw", "admin", {"why": "x"}, 422, "unknown_field"),
    ("audit-limit-zero", "GET", "/v1/audit?limit=0", "analyst", None, 422, "invalid_argument"),
    ("audit-limit-text", "GET", "/v1/audit?limit=ten", "analyst", None, 422, "invalid_argument"),
    ("audit-limit-space", "GET", "/v1/audit?limit=%2010", "analyst", None, 422, "invalid_argument"),
    ("audit-limit-underscore", "GET", "/v1/audit?limit=1_0", "analyst", None, 422, "invalid_argument"),
    ("audit-limit-arabic-digits", "GET", "/v1/audit?limit=%D9%A1%D9%A0", "analyst", None, 422, "invalid_argument"),
    ("changes-after-huge", "GET", "/v1/changes?after=1" + "0" * 30, "analyst", None, 422, "invalid_argument"),
    ("changes-limit-above-max", "GET", "/v1/changes?limit=10001", "analyst", None, 422,
     "invalid_argument"),
    ("audit-limit-above-max", "GET", "/v1/audit?limit=5001", "analyst", None, 422,
     "invalid_argument"),
    ("lift-unknown-channel", "GET", "/v1/reports/lift?channel=fax", "analyst", None, 404, "unknown_channel"),
    # --- integers no float holds (math.isfinite raised OverflowError: a 500)
    ("reward-huge-integer", "POST", "/v1/reward", "decide",
     (RAW, '{"event_id":"ev-1","reward":100000000000000000000000000000000000000000000000000000000000}'), 422, "invalid_argument"),
    ("reward-cost-huge-integer", "POST", "/v1/reward", "decide",
     (RAW, '{"event_id":"ev-1","reward":1,"cost":-100000000000000000000000000000000000000000000000000000000000}'), 422, "invalid_argument"),
    ("offer-cost-huge-integer", "POST", "/v1/offers", "admin", offer(cost=HUGE_INT), 422, "invalid_argument"),
    ("offer-budget-huge-integer", "POST", "/v1/offers", "admin", offer(budget=HUGE_INT), 422, "invalid_argument"),
    ("patch-budget-huge-integer", "PATCH", "/v1/offers/capped", "admin", {"budget": HUGE_INT}, 422,
     "invalid_argument"),
    ("channel-holdout-huge-integer", "PUT", "/v1/channels/email", "admin", {"holdout_fraction": HUGE_INT}, 422,
     "invalid_argument"),
    ("channel-window-huge-integer", "PUT", "/v1/channels/email", "admin", {"reward_window_days": HUGE_INT}, 422,
     "invalid_argument"),
    ("channel-lin-ts-param-huge-integer", "PUT", "/v1/channels/email", "admin",
     {"policy": {"family": "lin_ts", "params": {"prior_variance": HUGE_INT}}}, 422, "invalid_argument"),
    ("channel-vw-param-huge-integer", "PUT", "/v1/channels/email", "admin",
     {"policy": {"family": "vw", "params": {"gamma_scale": HUGE_INT}}}, 422, "invalid_argument"),
    # --- strings that are not text: a lone surrogate fails every hash and write; NUL, PostgreSQL
    ("choose-context-lone-surrogate", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"k":"\\ud800"}}'), 422, "invalid_argument"),
    ("choose-context-key-lone-surrogate", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"a\\udc00":1}}'), 422, "invalid_argument"),
    ("choose-context-nul", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"k":"a\\u0000b"}}'), 422, "invalid_argument"),
    ("choose-context-key-nul", "POST", "/v1/choose", "decide",
     (RAW, '{"member_id":"m","channel":"email","context":{"a\\u0000":1}}'), 422,
     "invalid_argument"),
    ("offer-feature-key-nul", "POST", "/v1/offers", "admin",
     (RAW, json.dumps(offer(features={"k": 1})).replace('"k"', '"k\\u0000"')), 422,
     "invalid_argument"),
    ("channel-salt-lone-surrogate", "PUT", "/v1/channels/email", "admin", (RAW, '{"salt":"\\uDBFF"}'), 422,
     "invalid_argument"),
    ("approve-reason-nul", "POST", "/v1/changes/1/approve", "approver", (RAW, '{"reason":"ok\\u0000"}'), 422,
     "invalid_argument"),
    ("offer-rule-infinite", "POST", "/v1/offers", "admin",
     (RAW, json.dumps(offer(rules=[{"field": "x", "op": "lt", "value": 1}])).replace('"value": 1', '"value": 1e400')),
     422, "invalid_argument"),
    ("offer-rule-in-infinite", "POST", "/v1/offers", "admin",
     (RAW, json.dumps(offer(rules=[{"field": "x", "op": "in", "value": [1]}])).replace('[1]', '[1, -1e999]')),
     422, "invalid_argument"),
    # --- ids with a trailing newline (a regex's $ matches before one)
    ("offer-id-newline", "POST", "/v1/offers", "admin", offer(offer_id="promo\n"), 422, "invalid_argument"),
    ("choose-event-newline", "POST", "/v1/choose", "decide", choose(event_id="e-9\n"), 422, "invalid_argument"),
    ("choose-member-newline", "POST", "/v1/choose", "decide", choose(member_id="m-2\n"), 422, "invalid_argument"),
    ("channel-model-group-newline", "PUT", "/v1/channels/email", "admin", {"model_group": "g\n"}, 422,
     "invalid_argument"),
    # --- routes
    ("choose-get", "GET", "/v1/choose", "decide", None, 405, "method_not_allowed"),
    ("double-slash", "GET", "/v1//offers", "analyst", None, 404, "not_found"),
    ("double-slash-approve", "POST", "/v1/changes//1/approve", "approver", None, 404, "not_found"),
    ("options", "OPTIONS", "/v1/offers", "analyst", None, 405, "method_not_allowed"),
    ("options-no-key", "OPTIONS", "/v1/choose", None, None, 405, "method_not_allowed"),
    ("unknown-route", "GET", "/v1/nothing-here", "decide", None, 404, "not_found"),
    ("unknown-root", "POST", "/admin", None, {}, 404, "not_found"),
]


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from seeded_api(tmp_path_factory, "bad")


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 100
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,method,path,role,body,status,code", CASES, ids=[c[0] for c in CASES])
def test_bad_request(shared_api: Api, name: str, method: str, path: str, role: str | None,
                     body: Any, status: int, code: str) -> None:  # fmt: skip
    before = shared_api.state()
    if isinstance(body, tuple) and body[0] == RAW:
        r = shared_api.call(method, path, role, data=body[1])
    else:
        r = shared_api.call(method, path, role, json=body)
    assert r.status_code == status, r.get_data(as_text=True)[:300]
    assert r.is_json, r.get_data(as_text=True)[:300]
    err = r.json["error"]
    assert err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.get_data(as_text=True)
    assert shared_api.state() == before
