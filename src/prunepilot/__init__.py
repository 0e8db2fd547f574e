"""prunepilot: compress a trained neural network to a hard budget."""

from .budget import Band, Budget, ResolvedBudget, Target
from .errors import BudgetError, PlanError, PrunepilotError, SourceError
from .plan import Plan

__all__ = ["Band", "Budget", "ResolvedBudget", "Target", "Plan", "PrunepilotError", "BudgetError", "PlanError", "SourceError"]
__version__ = "0.1.0"
