"""prunepilot: compress a trained neural network to a hard budget."""

import os as _os

# torch.profiler (per-op times, activation memory) makes kineto print "USDT: profiler_start" and, on a machine
# without a GPU, "ERROR: gpuGetDeviceCount failed" to stderr on every use: noise that reads like a failure.
# Kineto reads its level at its first use; a level the user set is kept.
_os.environ.setdefault("KINETO_LOG_LEVEL", "6")

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
