"""The simulator: a synthetic loyalty world with ground truth, driven through the same
:class:`~bandit_engine.engine.Engine` path that serves decisions (in-memory ledger, manual clock).
"""

from .oracles import solve_budget_duals
from .runner import Comparison, RunResult, Simulator, mean_ci
from .scenario import OfferSpec, PolicyEntry, Scenario, WorldConfig
from .world import Exposure, Member, World

__all__ = [
    "Comparison",
    "Exposure",
    "Member",
    "OfferSpec",
    "PolicyEntry",
    "RunResult",
    "Scenario",
    "Simulator",
    "World",
    "WorldConfig",
    "mean_ci",
    "solve_budget_duals",
]
