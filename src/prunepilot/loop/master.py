"""Master: runs any Job with any Strategist. propose -> project -> evaluate -> judge -> record.

It knows no model kind. The journal is the only state: a run killed at any moment (kill -9 included)
continues from its last recorded attempt, because the job derives its next step from the attempts alone."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..agents.context import Context, Strategist
from ..agents.llm.retry import redact
from ..attempt import Attempt
from ..errors import PrunepilotError
from ..journal import Journal
from .job import Job, Outcome, Step


@dataclass
class LoopLimits:
    max_attempts: int = 200  # a hard stop whatever the job's own rules say
    wall_time_s: float | None = None
    systematic_failures: int = 3  # this many failed attempts with nothing feasible yet: stop and say why


class Master:
    def __init__(self, job: Job, strategist: Strategist, journal: Journal, run_id: str, *, seed: int = 0,
                 limits: LoopLimits | None = None, priors: list[dict[str, Any]] | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.job, self.strategist, self.journal, self.run_id = job, strategist, journal, run_id
        self.seed, self.limits, self.priors, self.log = seed, limits or LoopLimits(), priors or [], log

    def run(self) -> Attempt | None:
        """Continue from whatever the journal holds; return the best attempt (None: nothing feasible)."""
        t0 = time.perf_counter()
        history = self.journal.attempts(self.run_id)
        if history:
            self.log(f"resuming after {len(history)} recorded attempts")
        while len(history) < self.limits.max_attempts:
            if self.limits.wall_time_s and time.perf_counter() - t0 > self.limits.wall_time_s:
                self.log("stopping: wall-time budget spent")
                break
            step = self.job.next_step(history)
            if step is None:
                break
            attempt = self._attempt(len(history), step, history)
            history.append(attempt)
            self._check_systematic(history)
        return self.job.best(history)

    def _attempt(self, index: int, step: Step, history: list[Attempt]) -> Attempt:
        t = time.perf_counter()
        ctx = Context(self.job.kind, self.job.context_profile(), self.job.budget_json(), list(history),
                      phase=step.phase, step=dict(step.info), seed=self.seed, priors=self.priors)
        base: dict[str, Any] = {"index": index, "job": self.job.kind, "phase": step.phase, "step": step.info}
        name = getattr(self.strategist, "name", type(self.strategist).__name__)
        try:
            plan = step.plan if step.plan is not None else self.strategist.propose(ctx)
        except Exception as exc:  # a strategist bug wastes an attempt, never the run
            self._journal_calls(index, ctx)
            return self._record(Attempt(**base, strategist=name, verdict="failed", error=_one_line(exc),
                                        traceback=redact(traceback.format_exc()), llm_calls=len(ctx.llm_calls),
                                        fallback_reason=redact(ctx.fallback_reason) if ctx.fallback_reason else None,
                                        seconds=time.perf_counter() - t), None)
        self._journal_calls(index, ctx)
        if step.plan is not None:
            name = step.plan.source or "job"
        elif plan is not None and plan.source:
            name = plan.source
        fallback = redact(ctx.fallback_reason) if ctx.fallback_reason else None
        if plan is None and step.none_ends_phase:
            return self._record(Attempt(**base, strategist=name, verdict="exhausted", llm_calls=len(ctx.llm_calls),
                                        fallback_reason=fallback, reflection=f"{name} had nothing more to propose in the {step.phase} phase",
                                        seconds=time.perf_counter() - t), None)
        common = dict(base, strategist=name, plan=plan.model_dump() if plan else None, fallback_reason=fallback,
                      rationale=plan.rationale if plan else "", llm_calls=len(ctx.llm_calls))
        try:
            outcome = self.job.evaluate(self.job.project(plan, step), step, history)
            judged = self.job.judge(step, outcome, history)
        except Exception as exc:  # a bad plan wastes an attempt, never the run
            return self._record(Attempt(**common, verdict="failed", error=_one_line(exc),
                                        traceback=redact(traceback.format_exc()), seconds=time.perf_counter() - t), None)
        attempt = Attempt(**common, allocation=outcome.allocation, projected=outcome.projected, metrics=outcome.metrics,
                          errors=outcome.errors, within_band=outcome.within_band, score=judged.score,
                          verdict=judged.verdict, reflection=judged.reflection, extra=outcome.extra,
                          seconds=time.perf_counter() - t)
        return self._record(attempt, outcome if judged.verdict in ("best", "accept", "forced", "reference") else None)

    def _record(self, attempt: Attempt, keep: Outcome | None) -> Attempt:
        if keep is not None:
            self.job.keep(attempt.index, keep)
        self.journal.record_attempt(self.run_id, attempt)
        self.log(_line(attempt))
        return attempt

    def _journal_calls(self, index: int, ctx: Context) -> None:
        for call in ctx.llm_calls:
            self.journal.record_llm_call(self.run_id, index, call)

    def _check_systematic(self, history: list[Attempt]) -> None:
        n = self.limits.systematic_failures
        if len(history) < n or any(a.feasible for a in history):
            return
        tail = history[-n:]
        if all(a.verdict == "failed" for a in tail):
            errs = sorted({a.error or "?" for a in tail})
            raise PrunepilotError(
                f"the last {n} attempts all failed and none was feasible, so the failure is systematic",
                "; ".join(errs)[:400],
                f"read the tracebacks with `prunepilot runs show {self.run_id}`; fix the cause, then "
                f"`prunepilot runs resume {self.run_id}` continues the run",
            )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return redact(f"{type(exc).__name__}: {text}")[:500]


def _line(a: Attempt) -> str:
    parts = [f"attempt {a.index} ({a.phase}, {a.strategist}): {a.verdict}"]
    if a.errors:
        parts.append(", ".join(f"{m} {e:+.2%}" for m, e in a.errors.items()))
    for key in ("score", "accuracy", "probe_ppl", "probe_kl"):
        if key in a.metrics:
            parts.append(f"{key} {a.metrics[key]:.4f}")
    if a.error:
        parts.append(a.error[:160])
    return ", ".join(parts) + f" ({a.seconds:.0f}s)"
