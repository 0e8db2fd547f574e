"""Attempt: the immutable record of one proposal, the same for every job (prune, sparsify, compress).

The journal stores Attempts; strategists read them as history; a resumed run rebuilds its whole loop
state from them (a job's next step is a pure function of the attempts so far)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ATTEMPT_VERSION = 1

# best: new best feasible candidate; worse: feasible, not better; infeasible: outside the budget band;
# accept / rollback / forced: a phased job's checkpoint moved / was rolled back / was forced at the end of
# a ramp; reference: a job-dictated baseline candidate; repeat: the same allocation as one already measured;
# exhausted: the strategist had nothing more to propose in this phase; failed: the attempt raised.
Verdict = Literal["best", "worse", "infeasible", "accept", "rollback", "forced", "reference", "repeat", "exhausted", "failed"]
FEASIBLE = ("best", "worse", "accept", "forced", "reference")


class Attempt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = ATTEMPT_VERSION
    index: int  # 0-based position in the run
    job: str  # prune | sparsify | compress
    phase: str = "search"  # search | ramp | reference | refine
    step: dict[str, Any] = Field(default_factory=dict)  # what the job asked for (level, target, ...)
    strategist: str = ""
    plan: dict[str, Any] | None = None
    fallback_reason: str | None = None
    allocation: dict[str, Any] = Field(default_factory=dict)  # the projected allocation, enough to re-apply it
    projected: dict[str, float] = Field(default_factory=dict)  # per group/family ratio (for people and analysts)
    metrics: dict[str, float] = Field(default_factory=dict)
    errors: dict[str, float] = Field(default_factory=dict)  # signed relative error per budget metric
    within_band: bool = False
    score: float | None = None  # higher is better; the job defines it (accuracy, -probe KL)
    verdict: Verdict
    rationale: str = ""
    reflection: str = ""
    error: str | None = None  # one line: what went wrong (failed attempts)
    traceback: str | None = None
    llm_calls: int = 0  # LLM calls made for this proposal (journaled beside it)
    seconds: float = 0.0
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.within_band and self.verdict in FEASIBLE

    @property
    def quality(self) -> float | None:
        """The prune job's ranking metric: `score` (the user's evaluate(), top-1 or agreement), else accuracy."""
        return quality_of(self.metrics)

    @property
    def plan_params(self) -> dict[str, float]:
        return dict((self.plan or {}).get("params") or {})


def quality_of(metrics: dict[str, Any]) -> float | None:
    value = metrics.get("score", metrics.get("accuracy"))
    return float(value) if value is not None else None


def score_name(metrics: dict[str, Any]) -> str:
    """What an attempt's score is, in words: the user's evaluate(), -MSE (a regression), accuracy or agreement."""
    if "evaluate" in metrics:
        return "evaluate()"
    if "neg_mse" in metrics:
        return "-MSE"
    if "accuracy" in metrics:
        return "accuracy"
    if "fidelity_agreement" in metrics:
        return "agreement with the dense model"
    return "score"
