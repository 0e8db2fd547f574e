"""prunepilot: compress a trained neural network to a hard budget."""

from .budget import Band, Budget, ResolvedBudget, Target
from .errors import BudgetError, PlanError, PrunepilotError, SourceError
from .plan import Plan

_API = ("prune", "compress", "quantize", "sparsify", "Result")


def __getattr__(name: str):
    """The Python API (prunepilot.prune, .sparsify, ...), imported on first use so `import prunepilot` stays light."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'prunepilot' has no attribute {name!r}")


__all__ = [*_API, "Band", "Budget", "ResolvedBudget", "Target", "Plan", "PrunepilotError", "BudgetError", "PlanError", "SourceError"]
__version__ = "0.1.0"
