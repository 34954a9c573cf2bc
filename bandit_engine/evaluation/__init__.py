"""Off-policy evaluation: IPS, SNIPS, DM and DR with intervals and effective sample size, on the
engine's ledger or on dsjson files."""

from .data import (
    LoggedData,
    LoggedRow,
    Report,
    candidate_notes,
    cross_fit_predictions,
    evaluate,
    from_decisions,
    from_dsjson,
    from_engine,
    open_existing,
    policy_target,
)
from .estimators import Estimate, all_estimates, dm, dr, ips, snips

__all__ = [
    "Estimate",
    "LoggedData",
    "LoggedRow",
    "Report",
    "all_estimates",
    "candidate_notes",
    "cross_fit_predictions",
    "dm",
    "dr",
    "evaluate",
    "from_decisions",
    "from_dsjson",
    "from_engine",
    "ips",
    "open_existing",
    "policy_target",
    "snips",
]
