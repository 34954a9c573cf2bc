"""The /v1 routes: thin views. Parse, call the engine (or governance), return a dict."""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, current_app, request

from .. import pacing
from ..catalog import MAX_EPOCH_MS, ChannelConfig, MemberCap, Offer, check_id, same_features
from ..clock import MS_PER_DAY
from ..engine import Engine
from ..errors import Conflict, InvalidArgument, OfferExists
from ..governance import (
    CHANGE_KINDS,
    CHANGE_STATUSES,
    CHANNEL_GOVERNED,
    OFFER_GOVERNED,
    Change,
    Governance,
)
from ..ledger.settle import settled_by
from . import validate as v
from .auth import READERS, principal, requires

bp = Blueprint("v1", __name__, url_prefix="/v1")
Z95 = 1.959963984540054
OFFER_FIELDS = ("offer_id", "channels", "features", "cost", "budget", "max_impressions",
                "member_cap", "starts_at", "ends_at", "active", "rules")  # fmt: skip
CHANNEL_FIELDS = tuple(f for f in ChannelConfig.__dataclass_fields__ if f != "name")


def engine() -> Engine:
    return current_app.extensions["bandit_engine"]  # type: ignore[no-any-return]


def gov() -> Governance:
    return current_app.extensions["bandit_engine.governance"]  # type: ignore[no-any-return]


def metrics() -> Any:
    return current_app.extensions["bandit_engine.metrics"]


# decide ------------------------------------------------------------------------------------------
@bp.post("/choose")
@requires("decide")
def choose() -> Any:
    body = v.json_body()
    v.fields(body, required=("member_id", "channel"), optional=("context", "event_id", "activate", "consent"))
    member_id = v.string(body, "member_id")
    channel = v.string(body, "channel")
    context = v.obj(body, "context", default={})
    event_id = v.string(body, "event_id")
    active = v.boolean(body, "activate", default=True)
    consent = v.boolean(body, "consent", default=True)
    check_id("member_id", member_id)
    check_id("channel", channel)
    eng = engine()
    eng.channel(channel)  # 404 before anything else
    current_app.extensions["bandit_engine.syncer"].maybe_sync()
    d = eng.choose(member_id, channel, context, event_id=event_id, active=active, consent=consent)
    if not d.resent:  # a re-sent event id is the same decision: counted once
        metrics().observe_decision(d)
    out: dict[str, Any] = {
        "event_id": d.event_id, "offer_id": d.offer_id, "probability": d.probability,
        "group": d.group, "policy": {"name": d.policy_name, "version": d.policy_version},
        "active": d.active, "deadline": d.deadline,
    }  # fmt: skip
    if d.reason:
        out["reason"] = d.reason
    return out


@bp.post("/reward")
@requires("decide")
def reward() -> Any:
    body = v.json_body()
    v.fields(body, required=("event_id", "reward"), optional=("cost", "reward_id"))
    event_id = v.string(body, "event_id")
    value = v.number(body, "reward", nullable=False)
    cost = v.number(body, "cost")
    reward_id = v.string(body, "reward_id")
    out = engine().reward(event_id, value, cost, reward_id=reward_id)
    metrics().rewards.labels(out.status).inc()
    return {"event_id": out.event_id, "status": out.status, "reward": out.reward,
            "spent": out.spent_cents / 100}  # fmt: skip


@bp.post("/events/<path:event_id>/activate")  # ids may hold "/"
@requires("decide")
def activate(event_id: str) -> Any:
    body = v.optional_json_body()
    if body is not None:
        v.fields(body)
    d = engine().activate(event_id)
    return {"event_id": d.event_id, "active": d.active, "status": d.status}


# offers --------------------------------------------------------------------------------------
def _pending_offer_changes(offer_id: str | None = None) -> list[Change]:
    """Offer changes not decided yet (pending, or being applied by an approver): of one offer,
    or of every offer with None."""
    return gov().changes(("pending", "applying"), kind="offer", target=offer_id)


def offer_view(o: Offer, st: Any, now: int, pending: list[Change]) -> dict[str, Any]:
    remaining = st.remaining_cents(o.budget_cents)
    return {
        **o.to_dict(),
        "spent": st.spent_cents / 100, "committed": st.committed_cents / 100,
        "impressions": st.impressions,
        "remaining_budget": None if remaining is None else remaining / 100,
        "pacing_price": pacing.price(o, st, now, engine().config.pacing_gain),
        "pending_changes": [c.change_id for c in pending],
    }  # fmt: skip


def _offer_from_body(body: dict[str, Any]) -> Offer:
    for name in ("cost", "budget"):
        v.number(body, name)
    for name in ("features", "member_cap"):
        v.obj(body, name)
    for name in ("channels", "rules"):
        v.array(body, name)
    if "max_impressions" in body and body["max_impressions"] is not None and (
        isinstance(body["max_impressions"], bool) or not isinstance(body["max_impressions"], int)
    ):
        raise InvalidArgument("max_impressions must be an integer")
    for name in ("starts_at", "ends_at"):
        x = body.get(name)
        if x is not None and (isinstance(x, bool) or not isinstance(x, int | str)):
            raise InvalidArgument(f"{name} must be epoch milliseconds or an ISO-8601 string")
    v.boolean(body, "active", default=True)
    if not all(isinstance(c, str) for c in body.get("channels") or []):
        raise InvalidArgument("channels must be a list of strings")
    if body.get("rules") and not all(isinstance(r, dict) for r in body["rules"]):
        raise InvalidArgument("rules must be a list of objects {field, op, value}")
    try:
        return Offer.from_dict(body)
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise InvalidArgument(f"invalid offer: {exc}"[:300]) from None


def _governed_offer_settings(o: Offer) -> dict[str, Any]:
    d = o.to_dict()
    return {k: d[k] for k in OFFER_GOVERNED}


@bp.post("/offers")
@requires("admin")
def create_offer() -> Any:
    body = v.json_body()
    v.fields(body, required=("offer_id", "channels", "cost"), optional=OFFER_FIELDS)
    offer = _offer_from_body(body)  # validates everything, governed settings included
    eng = engine()
    governed = {k: val for k, val in _governed_offer_settings(offer).items() if val is not None}
    if not governed:
        _create(eng, offer)
        gov().audit(principal().actor, "offer.create", f"offer:{offer.offer_id}", offer.to_dict())
        return _offer_get(offer.offer_id), 201
    # stored without its governed settings and switched off until the change is decided
    ungoverned = {**offer.to_dict(), **{k: None for k in OFFER_GOVERNED}, "active": False}
    _create(eng, Offer.from_dict(ungoverned))
    gov().audit(principal().actor, "offer.create", f"offer:{offer.offer_id}",
                {**ungoverned, "pending": governed})  # fmt: skip
    ch = gov().propose("offer", offer.offer_id, governed, principal(),
                       activate=offer.active, creates=True)  # fmt: skip
    return {"offer_id": offer.offer_id, "change_id": ch.change_id, "status": "pending"}, 202


def _create(eng: Engine, offer: Offer) -> None:
    try:
        eng.add_offer(offer, exist_ok=False)  # two admins racing to create one id: one wins
    except OfferExists:
        raise OfferExists(
            f"offer {offer.offer_id!r} already exists; use PATCH /v1/offers/{{id}}"
        ) from None


def _offer_get(offer_id: str) -> dict[str, Any]:
    eng = engine()
    o = eng.get_offer(offer_id)
    st = eng.ledger.offer_states([offer_id])[offer_id]
    return offer_view(o, st, eng.clock.now_ms(), _pending_offer_changes(offer_id))


@bp.get("/offers")
@requires(*READERS)
def list_offers() -> Any:
    eng = engine()
    offers = eng.offers()
    states = eng.ledger.offer_states([o.offer_id for o in offers])
    pending: dict[str, list[Change]] = {}
    for c in _pending_offer_changes():
        pending.setdefault(c.target, []).append(c)
    now = eng.clock.now_ms()
    return {"offers": [offer_view(o, states[o.offer_id], now, pending.get(o.offer_id, []))
                       for o in offers]}  # fmt: skip


@bp.get("/offers/<path:offer_id>")
@requires(*READERS)
def get_offer(offer_id: str) -> Any:
    return _offer_get(offer_id)


@bp.patch("/offers/<path:offer_id>")
@requires("admin")
def patch_offer(offer_id: str) -> Any:
    body = v.json_body()
    v.fields(body, optional=tuple(f for f in OFFER_FIELDS if f != "offer_id"))
    eng = engine()
    old = eng.get_offer(offer_id)
    new = _offer_from_body({**old.to_dict(), **body})  # validate the result before any write
    if not same_features(new.features, old.features):
        raise Conflict(f"features of {offer_id!r} are immutable; create a new offer id")
    old_gov, new_gov = _governed_offer_settings(old), _governed_offer_settings(new)
    governed = {k: new_gov[k] for k in OFFER_GOVERNED if new_gov[k] != old_gov[k]}
    creating = [c for c in _pending_offer_changes(offer_id) if c.creates or c.activate]
    if new.active != old.active and creating:  # its caps are not in force yet
        raise Conflict(
            f"offer {offer_id!r} awaits the decision on change {creating[0].change_id}, which "
            "holds the budget and caps it is to be switched on with; it is switched on or off "
            "only after that change is decided (its proposer can withdraw it)"
        )
    # switched on together with governed settings: on when they are approved, not before
    activate = bool(governed) and new.active and not old.active
    od, nd = old.to_dict(), new.to_dict()
    changes = {k: val for k, val in nd.items()
               if k not in OFFER_GOVERNED and val != od[k] and not (activate and k == "active")}
    if governed:  # validate the proposal against the live state before applying anything
        _check_offer_caps(eng, new)
    if changes:  # only what this request changes: an approval meanwhile keeps its settings
        eng.update_offer(offer_id, **changes)
        gov().audit(principal().actor, "offer.update", f"offer:{offer_id}",
                    {**changes, "before": {k: od[k] for k in changes}})  # fmt: skip
    if not governed:
        return _offer_get(offer_id), 200
    ch = gov().propose("offer", offer_id, governed, principal(), activate=activate)
    return {"offer_id": offer_id, "change_id": ch.change_id, "status": "pending"}, 202


def _check_offer_caps(eng: Engine, offer: Offer) -> None:
    """A proposal the live counters already break could never be approved: refuse it now
    (the engine refuses it again when an approval applies it)."""
    st = eng.ledger.offer_states([offer.offer_id]).get(offer.offer_id)
    if st is None:
        return
    if offer.budget_cents is not None and offer.budget_cents < st.spent_cents + st.committed_cents:
        raise Conflict(f"budget {offer.budget_cents / 100:.2f} of {offer.offer_id!r} is below "
                       f"what is already spent and committed")  # fmt: skip
    if offer.max_impressions is not None and offer.max_impressions < st.impressions:
        raise Conflict(f"max_impressions {offer.max_impressions} of {offer.offer_id!r} is below "
                       f"the {st.impressions} impressions already counted")  # fmt: skip


# channels ------------------------------------------------------------------------------------
@bp.get("/channels")
@requires(*READERS)
def list_channels() -> Any:
    return {"channels": [c.to_dict() for c in engine().channels().values()]}


@bp.get("/channels/<path:name>")
@requires(*READERS)
def get_channel(name: str) -> Any:
    return engine().channel(name, fresh=True).to_dict()


@bp.put("/channels/<path:name>")
@requires("admin")
def put_channel(name: str) -> Any:
    body = v.json_body()
    v.fields(body, optional=(*CHANNEL_FIELDS, "name"))
    if "name" in body and body["name"] != name:
        raise InvalidArgument("name in the body must match the URL")
    v.obj(body, "policy")
    eng = engine()
    old = eng.channel(name, fresh=True)  # compared with the body: another worker's write counts
    if body.get("default_offer") is not None:  # 404 for an unknown one (the engine checks it too)
        eng.get_offer(v.string(body, "default_offer"))
    try:
        new = ChannelConfig.from_dict({**old.to_dict(), **body, "name": name})
    except (TypeError, ValueError) as exc:
        if isinstance(exc, InvalidArgument):
            raise
        raise InvalidArgument(f"invalid channel settings: {exc}"[:300]) from None
    od, nd = old.to_dict(), new.to_dict()
    governed = {k: nd[k] for k in CHANNEL_GOVERNED if nd[k] != od[k]}
    changes = {k: val for k, val in nd.items() if k not in CHANNEL_GOVERNED and val != od[k]}
    if governed:  # a proposal an approval could not apply is refused now, with nothing written
        eng.check_channel(new)
    if changes:  # only what this request changes: an approval meanwhile keeps its settings
        eng.update_channel(name, **changes)
        gov().audit(principal().actor, "channel.update", f"channel:{name}",
                    {**changes, "before": {k: od[k] for k in changes}})  # fmt: skip
    out = eng.channel(name).to_dict()
    if not governed:
        return out, 200
    ch = gov().propose("channel", name, governed, principal())
    return {**out, "change_id": ch.change_id, "status": "pending"}, 202


@bp.put("/model-groups/<path:group>")
@requires("admin")
def put_model_group(group: str) -> Any:
    """Switch the policy of every channel of a model group at once (their one shared model)."""
    body = v.json_body()
    v.fields(body, required=("policy",))
    v.obj(body, "policy")
    channels = engine().set_group_policy(group, body["policy"])
    gov().audit(principal().actor, "model_group.update", f"model_group:{group}",
                {"policy": body["policy"], "channels": [c.name for c in channels]})  # fmt: skip
    return {"model_group": group, "policy": channels[0].policy.to_dict(),
            "channels": [c.name for c in channels]}  # fmt: skip


# settings ------------------------------------------------------------------------------------
def _settings() -> dict[str, Any]:
    cap = engine().member_cap
    return {"member_cap": None if cap is None else cap.to_dict()}


@bp.get("/settings")
@requires(*READERS)
def get_settings() -> Any:
    return _settings()


@bp.put("/settings")
@requires("admin")
def put_settings() -> Any:
    """Engine-wide settings (the member cap shared by every channel): all governed, so a change
    is a pending change request until an approver approves it."""
    body = v.json_body()
    v.fields(body, required=("member_cap",))
    cap = v.obj(body, "member_cap")
    wanted = {"member_cap": None if cap is None else MemberCap.from_dict(cap).to_dict()}
    current = _settings()
    if wanted == current:
        return current, 200
    ch = gov().propose("settings", "engine", wanted, principal())
    return {**current, "change_id": ch.change_id, "status": "pending"}, 202


# changes -------------------------------------------------------------------------------------
@bp.get("/changes")
@requires(*READERS)
def list_changes() -> Any:
    status = request.args.get("status")
    if status is not None and status not in CHANGE_STATUSES:
        raise InvalidArgument(f"status must be one of {list(CHANGE_STATUSES)}, got {status!r}"[:200])
    kind = request.args.get("kind")
    if kind is not None and kind not in CHANGE_KINDS:
        raise InvalidArgument(f"kind must be one of {list(CHANGE_KINDS)}, got {kind!r}"[:200])
    target = request.args.get("target")
    if target is not None:
        check_id("target", target)
    after = v.query_int("after", 0, 0, 2**62)
    limit = v.query_int("limit", 1000, 1, 10_000)
    changes = gov().changes(status, kind=kind, target=target, after=after, limit=limit)
    return {"changes": [c.to_dict() for c in changes]}


def _apply_change(ch: Change) -> dict[str, Any]:
    """Apply an approved change; returns the values it replaced, for the audit log."""
    eng = engine()
    if ch.kind == "offer":
        changes = dict(ch.settings)
        if ch.activate:
            changes["active"] = True
        old = eng.get_offer(ch.target).to_dict()
        eng.update_offer(ch.target, **changes)
    elif ch.kind == "settings":
        old = _settings()
        eng.set_member_cap(ch.settings["member_cap"])
    else:
        old = eng.channel(ch.target, fresh=True).to_dict()
        eng.update_channel(ch.target, **ch.settings)
    return {k: old.get(k) for k in (*ch.settings, *(("active",) if ch.activate else ()))}


def _decision_body() -> str | None:
    body = v.optional_json_body()
    if body is None:
        return None
    v.fields(body, optional=("reason",))
    return v.string(body, "reason")  # Governance.decide checks its length and text


@bp.post("/changes/<int:change_id>/approve")
@requires("approver")
def approve(change_id: int) -> Any:
    reason = _decision_body()
    return gov().decide(change_id, principal(), approve=True, apply=_apply_change, reason=reason).to_dict()


@bp.post("/changes/<int:change_id>/reject")
@requires("approver")
def reject(change_id: int) -> Any:
    reason = _decision_body()
    return gov().decide(change_id, principal(), approve=False, reason=reason).to_dict()


@bp.post("/changes/<int:change_id>/withdraw")
@requires("admin")
def withdraw(change_id: int) -> Any:
    reason = _decision_body()
    return gov().withdraw(change_id, principal(), reason=reason).to_dict()


@bp.get("/audit")
@requires(*READERS)
def audit() -> Any:
    after = v.query_int("after", 0, 0, 2**62)
    limit = v.query_int("limit", 500, 1, 5000)
    return {"entries": [e.to_dict() for e in gov().audit_log(after=after, limit=limit)]}


# reports -------------------------------------------------------------------------------------
def _wilson(p: float, n: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of a proportion ``p`` of ``n``."""
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(values: list[float]) -> dict[str, Any]:
    """A group's mean reward with its 95 % interval: Wilson's when every reward is 0 or 1
    (redeemed or not; the normal interval collapsed to a point, e.g. [0, 0] for no redemption
    in 10, however small the group), the normal one otherwise."""
    n = len(values)
    if n == 0:
        return {"n": 0, "rate": None, "ci95": None}
    m = sum(values) / n
    if n == 1:  # one outcome says nothing about its spread: no interval, not a zero-width one
        return {"n": 1, "rate": m, "ci95": None}
    var = sum((x - m) ** 2 for x in values) / (n - 1)
    if all(x in (0.0, 1.0) for x in values):
        return {"n": n, "rate": m, "ci95": list(_wilson(m, n)), "_var": var, "_binary": True}
    half = Z95 * math.sqrt(var / n)
    return {"n": n, "rate": m, "ci95": [m - half, m + half], "_var": var, "_binary": False}


def _difference(t: dict[str, Any], h: dict[str, Any]) -> list[float]:
    """95 % interval of treatment - hold-out: Newcombe's hybrid score interval from the two
    Wilson intervals when both groups' rewards are 0 or 1, the normal one otherwise."""
    diff = t["rate"] - h["rate"]
    if t["_binary"] and h["_binary"]:
        (l1, u1), (l2, u2) = t["ci95"], h["ci95"]
        lo = math.hypot(t["rate"] - l1, u2 - h["rate"])
        hi = math.hypot(u1 - t["rate"], h["rate"] - l2)
        return [diff - lo, diff + hi]
    half = Z95 * math.sqrt(t["_var"] / t["n"] + h["_var"] / h["n"])
    return [diff - half, diff + half]


@bp.get("/reports/lift")
@requires("analyst")
def lift() -> Any:
    """Treatment vs hold-out mean reward over the decisions whose reward window has closed
    (:func:`settled_by`: a redemption settles at once, a miss only at the close), with 95 %
    intervals (:func:`_rate`, :func:`_difference`)."""
    eng = engine()
    name = request.args.get("channel")
    names = [eng.channel(name).name] if name is not None else sorted(eng.channels())
    now = eng.clock.now_ms()
    defaults = eng.default_rewards()
    out = []
    for ch in names:
        groups: dict[str, list[float]] = {"treatment": [], "holdout": []}
        for d in eng.ledger.decisions(channel=ch):
            settled = settled_by(d, now, defaults.get(ch, 0.0))
            if settled is not None and settled.reward is not None:
                groups[settled.group].append(float(settled.reward))
        t, h = _rate(groups["treatment"]), _rate(groups["holdout"])
        lift_ = None
        if t["n"] > 1 and h["n"] > 1:
            lift_ = {"difference": t["rate"] - h["rate"], "ci95": _difference(t, h)}
        for g_ in (t, h):
            g_.pop("_var", None)
            g_.pop("_binary", None)
        out.append({"channel": ch, "treatment": t, "holdout": h, "lift": lift_})
    return {"channels": out}


@bp.get("/reports/spend")
@requires("analyst")
def spend() -> Any:
    eng = engine()
    offers = eng.offers()
    states = eng.ledger.offer_states([o.offer_id for o in offers])
    now = eng.clock.now_ms()
    rows = []
    for o in offers:
        st = states[o.offer_id]
        remaining = st.remaining_cents(o.budget_cents)
        exhaustion = None
        per_day = None
        if o.starts_at is not None and now > o.starts_at:
            # money spent (redemptions), not held: a reservation is not spend until redeemed;
            # over the campaign's time so far (it does not dilute once the campaign has ended)
            elapsed = max(1, min(now, o.ends_at or now) - o.starts_at)
            per_day = st.spent_cents / (elapsed / MS_PER_DAY) / 100
            if remaining is not None and st.spent_cents > 0:
                at = now + int(remaining / (st.spent_cents / elapsed))
                # none when the budget outlasts the campaign (it cannot run out by spending)
                exhaustion = at if at <= min(o.ends_at or MAX_EPOCH_MS, MAX_EPOCH_MS) else None
        rows.append({
            "offer_id": o.offer_id, "active": o.active,
            "budget": None if o.budget_cents is None else o.budget_cents / 100,
            "spent": st.spent_cents / 100, "committed": st.committed_cents / 100,
            "remaining_budget": None if remaining is None else remaining / 100,
            "impressions": st.impressions,
            "pacing_price": pacing.price(o, st, now, eng.config.pacing_gain),
            "spend_per_day": per_day, "projected_exhaustion": exhaustion,
        })  # fmt: skip
    return {"offers": rows, "now": now}


__all__ = ["bp"]
