"""One error root. Every error the engine raises on purpose derives from :class:`BanditEngineError`.

Each class carries a stable snake_case ``code`` and an HTTP ``status`` so the API maps errors to
responses in one place. Foreign errors (SQLAlchemy, VW) are translated at the edge.
"""

from __future__ import annotations


class BanditEngineError(Exception):
    """Root of every error raised by bandit_engine."""

    code = "bandit_engine_error"
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BanditEngineError, ValueError):
    """An argument or configuration value is malformed or out of range."""

    code = "invalid_argument"
    status = 422


class NotFound(BanditEngineError, KeyError):
    """Something named does not exist (a KeyError too, for callers that expect one)."""

    code = "not_found"
    status = 404

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class UnknownChannel(NotFound):
    code = "unknown_channel"
    status = 404


class UnknownModelGroup(NotFound):
    code = "unknown_model_group"
    status = 404


class UnknownOffer(NotFound):
    code = "unknown_offer"
    status = 404


class UnknownEvent(NotFound):
    code = "unknown_event"
    status = 404


class UnknownPolicy(NotFound):
    code = "unknown_policy"
    status = 422


class RewardWindowClosed(BanditEngineError):
    code = "reward_window_closed"
    status = 409


class CostAboveReservation(BanditEngineError):
    code = "cost_above_reservation"
    status = 422


class Conflict(BanditEngineError):
    """The request contradicts stored state (e.g. an offer id reused with other features)."""

    code = "conflict"
    status = 409


class OfferExists(Conflict):
    """An offer is created under an id the catalog already holds."""


class CatalogChanged(Conflict):
    """A catalog write conditioned on the catalog version it read found a newer one (another
    writer came first); the engine re-reads and retries it."""


class CapExceeded(BanditEngineError):
    """A reservation would break a budget, impression or frequency cap (handled inside choose)."""

    code = "cap_exceeded"
    status = 409

    def __init__(self, message: str, offer_id: str | None = None, cap: str = "") -> None:
        super().__init__(message)
        self.offer_id = offer_id
        self.cap = cap


class ChangeNotApproved(BanditEngineError):
    code = "change_not_approved"
    status = 409


class Forbidden(BanditEngineError):
    code = "forbidden"
    status = 403


class Unauthorized(BanditEngineError):
    code = "unauthorized"
    status = 401


class StorageError(BanditEngineError):
    """The ledger backend failed (connection lost, schema missing). Not the caller's fault."""

    code = "storage_error"
    status = 503


class ModelLoading(BanditEngineError):
    """The channel's model is still being built from the feedback log (a start, a policy
    change): retry shortly. Not the caller's fault."""

    code = "model_loading"
    status = 503


class PolicyUnavailable(BanditEngineError):
    """The channel's stored policy configuration cannot be built in this process (a family not
    registered here, or parameters a newer version refuses): an operator must set a valid
    policy. Not the caller's fault, and retrying will not help until then."""

    code = "policy_unavailable"
    status = 503
