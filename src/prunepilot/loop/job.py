"""The Job protocol: everything that differs between prune, sparsify and compress. The Master owns the loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ..attempt import Attempt, Verdict
from ..plan import Plan


@dataclass(frozen=True)
class Step:
    """What the job wants next, computed from the history alone (so a resumed run continues exactly)."""

    phase: str
    info: dict[str, Any] = field(default_factory=dict)  # shown to strategists, recorded in the Attempt
    plan: Plan | None = None  # a job-dictated candidate (e.g. the uniform reference): no strategist is asked
    none_ends_phase: bool = True  # a strategist answering None ends the phase (recorded as 'exhausted')


@dataclass
class Outcome:
    """A measured candidate. `candidate` is the in-memory artifact the job may keep (a pruned model)."""

    allocation: dict[str, Any]
    projected: dict[str, float]
    metrics: dict[str, float]
    errors: dict[str, float]
    within_band: bool
    candidate: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    score: float | None
    reflection: str = ""


class Job(Protocol):
    kind: str

    def context_profile(self) -> Any:
        """What strategists read as the profile."""
        ...

    def budget_json(self) -> dict[str, Any]: ...

    def next_step(self, history: list[Attempt]) -> Step | None:
        """The next step, or None when the job's loop is done (rounds, patience, phases all spent)."""
        ...

    def project(self, plan: Plan | None, step: Step) -> Any:
        """Meet the budget exactly (or raise a PrunepilotError that says why it cannot)."""
        ...

    def evaluate(self, projection: Any, step: Step, history: list[Attempt]) -> Outcome: ...

    def judge(self, step: Step, outcome: Outcome, history: list[Attempt]) -> Judgement: ...

    def keep(self, index: int, outcome: Outcome) -> None:
        """Persist a new best candidate. Called before the journal records the attempt, so a kill between the
        two only leaves a file that the redone attempt overwrites."""
        ...

    def best(self, history: list[Attempt]) -> Attempt | None: ...
