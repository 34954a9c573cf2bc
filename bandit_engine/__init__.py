"""bandit_engine: decides which loyalty offer each member gets, and learns from redemptions.

>>> from bandit_engine import Engine, Offer
"""

from .catalog import CHANNELS, ChannelConfig, MemberCap, Offer, PolicySpec, Rule
from .clock import Clock, ManualClock, SystemClock
from .engine import Engine, EngineConfig
from .errors import (
    BanditEngineError,
    CapExceeded,
    ChangeNotApproved,
    Conflict,
    CostAboveReservation,
    Forbidden,
    InvalidArgument,
    ModelLoading,
    OfferExists,
    PolicyUnavailable,
    RewardWindowClosed,
    StorageError,
    Unauthorized,
    UnknownChannel,
    UnknownEvent,
    UnknownModelGroup,
    UnknownOffer,
    UnknownPolicy,
)
from .ledger.records import Decision, Feedback, OfferState, RewardOutcome

__version__ = "0.1.0"

__all__ = [
    "CHANNELS",
    "BanditEngineError",
    "CapExceeded",
    "ChangeNotApproved",
    "ChannelConfig",
    "Clock",
    "Conflict",
    "CostAboveReservation",
    "Decision",
    "Engine",
    "EngineConfig",
    "Feedback",
    "Forbidden",
    "InvalidArgument",
    "ManualClock",
    "MemberCap",
    "ModelLoading",
    "Offer",
    "OfferExists",
    "OfferState",
    "PolicySpec",
    "PolicyUnavailable",
    "RewardOutcome",
    "RewardWindowClosed",
    "Rule",
    "StorageError",
    "SystemClock",
    "Unauthorized",
    "UnknownChannel",
    "UnknownEvent",
    "UnknownModelGroup",
    "UnknownOffer",
    "UnknownPolicy",
    "__version__",
]
