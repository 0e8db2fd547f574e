"""What every strategist of every job reads, and the one Strategist protocol.

A strategist keeps no state: everything it knows is in the Context (profile, budget, history of Attempts,
the step the job asks for, prior runs on a matching model). A resumed or replayed run builds the same
contexts again, so it asks the same questions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..attempt import Attempt
from ..plan import Plan


@dataclass
class Context:
    kind: str  # the job kind: prune | sparsify | ...
    profile: Any  # the job's profile: a compact dict (prune) or a SensitivityProfile (sparsify)
    budget: dict[str, Any]
    history: list[Attempt]
    phase: str = "search"
    step: dict[str, Any] = field(default_factory=dict)  # job-specific: level, target, current allocation, guidance
    seed: int = 0
    priors: list[dict[str, Any]] = field(default_factory=list)  # compact views of earlier runs on a matching model
    # Output sink, not state: an LLM strategist appends one record per call here; the Master journals them.
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    fallback_reason: str | None = None  # set when an LLM strategist's answer was unusable and its fallback decided


class Strategist(Protocol):
    name: str
    kinds: tuple[str, ...]  # the job kinds it can propose for

    def propose(self, ctx: Context) -> Plan | None:
        """A plan for the step the context describes; None = nothing (more) to propose in this phase."""
        ...
