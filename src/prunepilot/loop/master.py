"""Master: runs any Job with any Strategist. propose -> project -> evaluate -> judge -> record.

It knows no model kind. The journal is the only state: a run killed at any moment (kill -9 included)
continues from its last recorded attempt, because the job derives its next step from the attempts alone.

Batches: a strategist with `independent(ctx) -> k` says its next k proposals do not depend on each other's
measurements; the Master proposes them against the history plus the pending siblings (verdict "pending"),
has the executor measure them at once (loop/executor.py: in-process, or Ray workers), then evaluates, judges
and records them one by one in proposal order, each with the step the job asks for at that point of the
history. A sibling the job would no longer ask for (its step changed) is dropped unrecorded, with every
sibling after it, so the journal reads exactly as if the candidates had been proposed one at a time."""

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
from . import executor as executors
from .job import Job, Outcome, Step


@dataclass
class LoopLimits:
    max_attempts: int = 200  # a hard stop whatever the job's own rules say
    wall_time_s: float | None = None
    systematic_failures: int = 3  # this many failed attempts with nothing feasible yet: stop and say why


class Master:
    def __init__(self, job: Job, strategist: Strategist, journal: Journal, run_id: str, *, seed: int = 0,
                 limits: LoopLimits | None = None, priors: list[dict[str, Any]] | None = None,
                 log: Callable[[str], None] = print, executor: Any = None) -> None:
        self.job, self.strategist, self.journal, self.run_id = job, strategist, journal, run_id
        self.seed, self.limits, self.priors, self.log = seed, limits or LoopLimits(), priors or [], log
        self.executor = executor if executor is not None else executors.current()
        self._said_serial = False

    def run(self) -> Attempt | None:
        """Continue from whatever the journal holds; return the best attempt (None: nothing feasible)."""
        t0 = time.perf_counter()
        history = self.journal.attempts(self.run_id)
        if history:
            self.log(f"resuming after {len(history)} recorded attempts")
        try:
            while len(history) < self.limits.max_attempts:
                if self.limits.wall_time_s and time.perf_counter() - t0 > self.limits.wall_time_s:
                    self.log("stopping: wall-time budget spent")
                    break
                step = self.job.next_step(history)
                if step is None:
                    break
                self._batch(step, history)
        finally:
            self.executor.finish()
        return self.job.best(history)

    # -------------------------------------------------------------------------------------------- batches
    def _context(self, step: Step, history: list[Attempt]) -> Context:
        return Context(self.job.kind, self.job.context_profile(), self.job.budget_json(), list(history),
                       phase=step.phase, step=dict(step.info), seed=self.seed, priors=self.priors)

    def _batch_size(self, step: Step, history: list[Attempt]) -> int:
        room = self.limits.max_attempts - len(history)
        if step.plan is not None or room <= 1:
            return 1
        ask = getattr(self.strategist, "independent", None)
        if ask is None:
            if self.executor.remote and not self._said_serial:
                self._said_serial = True
                name = getattr(self.strategist, "name", type(self.strategist).__name__)
                self.log(f"{name} proposes one candidate at a time (each reads the last one's result): the "
                         f"{self.executor.workers} workers measure them one by one (evolve proposes in batches)")
            return 1
        try:
            k = int(ask(self._context(step, history)))
        except Exception:  # a batch is an optimisation: a strategist bug here costs only the batching
            return 1
        return max(1, min(k, room))

    def _batch(self, step: Step, history: list[Attempt]) -> None:
        """Propose up to the strategist's independent count, measure them at once, record them in order."""
        n = self._batch_size(step, history)
        base = len(history)
        props: list[_Proposal] = []
        for i in range(n):
            p = self._propose(base + i, step, history + [q.pending for q in props if q.pending is not None])
            props.append(p)
            if p.done is not None or p.pending is None:
                break  # a failed or empty proposal ends the batch: what follows it is asked again afterwards
        if self.executor.remote:
            self._measure_remote(props, step, history)
        for i, p in enumerate(props):
            here = step if i == 0 else self.job.next_step(history)
            if i and not self._still_asked(p, step, here):
                break  # the job no longer asks for this sibling (one before it changed the job's state)
            if p.done is not None:
                self._journal_calls(p.done.index, p.ctx)
                attempt = self._record(p.done, None)
            else:
                attempt = self._evaluate(p, here, history)  # type: ignore[arg-type]
            history.append(attempt)
            self._check_systematic(history)

    def _still_asked(self, p: "_Proposal", step: Step, here: Step | None) -> bool:
        """Whether the job, at this sibling's place in the history, asks for a strategist's proposal in the same
        phase and projects the sibling's plan to the same candidate (as a one-at-a-time run would have)."""
        if here is None or here.phase != step.phase or here.plan is not None:
            return False
        if here.info == step.info or p.done is not None:
            return True
        alike = getattr(self.job, "projects_alike", None)  # the job knows which step fields its projector reads
        if alike is not None:
            return bool(alike(step, here))
        try:
            again = self.job.project(p.plan, here)
            alloc = getattr(self.job, "allocation_of", None)
            return _same(alloc(again), alloc(p.projection)) if alloc is not None else _same(again, p.projection)
        except Exception:
            return False

    def _measure_remote(self, props: list["_Proposal"], step: Step, history: list[Attempt]) -> None:
        job = self.job
        task_of = getattr(job, "remote_task", None)
        if task_of is None or not hasattr(job, "with_measurement"):
            raise PrunepilotError(f"the {job.kind} job cannot measure candidates on Ray workers yet", None,
                                  "drop --workers/--ray-address")
        todo: list[tuple[_Proposal, Any]] = []
        for p in props:
            if p.done is None and p.projection is not None:
                try:
                    payload = task_of(p.projection, step, history)
                except Exception:
                    continue  # evaluate() raises it again, in order, as this attempt's failure
                if payload is not None:
                    todo.append((p, payload))
        unique: list[Any] = []
        for _, payload in todo:
            if not any(_same(payload, u) for u in unique):
                unique.append(payload)  # a repeated allocation in one batch is measured once (then cached)
        if not unique:
            return
        results = self.executor.measure(job, unique)
        for p, payload in todo:
            got = results[next(k for k, u in enumerate(unique) if _same(payload, u))]
            p.remote_s = got.seconds
            if got.error is not None:
                p.remote_error = got
            else:
                p.projection = job.with_measurement(p.projection, got.value)

    def _propose(self, index: int, step: Step, history: list[Attempt]) -> "_Proposal":
        t = time.perf_counter()
        ctx = self._context(step, history)
        base: dict[str, Any] = {"index": index, "job": self.job.kind, "phase": step.phase, "step": step.info}
        name = getattr(self.strategist, "name", type(self.strategist).__name__)
        try:
            plan = step.plan if step.plan is not None else self.strategist.propose(ctx)
        except Exception as exc:  # a strategist bug wastes an attempt, never the run
            return _Proposal(ctx, t, done=Attempt(**base, strategist=name, verdict="failed", error=_one_line(exc),
                                                  traceback=redact(traceback.format_exc()), llm_calls=len(ctx.llm_calls),
                                                  fallback_reason=redact(ctx.fallback_reason) if ctx.fallback_reason else None,
                                                  seconds=time.perf_counter() - t))
        if step.plan is not None:
            name = step.plan.source or "job"
        elif plan is not None and plan.source:
            name = plan.source
        fallback = redact(ctx.fallback_reason) if ctx.fallback_reason else None
        if plan is None and step.none_ends_phase:
            return _Proposal(ctx, t, done=Attempt(**base, strategist=name, verdict="exhausted", llm_calls=len(ctx.llm_calls),
                                                  fallback_reason=fallback, reflection=f"{name} had nothing more to propose in the {step.phase} phase",
                                                  seconds=time.perf_counter() - t))
        common = dict(base, strategist=name, plan=plan.model_dump() if plan else None, fallback_reason=fallback,
                      rationale=plan.rationale if plan else "", llm_calls=len(ctx.llm_calls))
        p = _Proposal(ctx, t, plan=plan, common=common)
        try:
            p.projection = self.job.project(plan, step)
        except Exception as exc:  # a bad plan wastes an attempt, never the run
            p.done = Attempt(**common, verdict="failed", error=_one_line(exc), traceback=redact(traceback.format_exc()),
                             seconds=time.perf_counter() - t)
            return p
        alloc = getattr(self.job, "allocation_of", None)
        try:
            allocation = alloc(p.projection) if alloc is not None else {}
        except Exception:
            allocation = {}
        # what later siblings of the batch see of this one: its plan and allocation, not yet measured
        p.pending = Attempt.model_construct(**common, allocation=allocation, verdict="pending")
        p.propose_s = time.perf_counter() - t
        return p

    def _evaluate(self, p: "_Proposal", step: Step, history: list[Attempt]) -> Attempt:
        """Measure (unless a worker did), judge and record one proposal, at its place in the history."""
        t = time.perf_counter()
        common = {**p.common, "step": step.info}
        self._journal_calls(common["index"], p.ctx)
        if p.remote_error is not None:
            return self._record(Attempt(**common, verdict="failed", error=p.remote_error.error,
                                        traceback=redact(p.remote_error.traceback or ""),
                                        seconds=p.propose_s + p.remote_s + time.perf_counter() - t), None)
        try:
            outcome = self.job.evaluate(p.projection, step, history)
            judged = self.job.judge(step, outcome, history)
        except Exception as exc:  # a bad plan wastes an attempt, never the run
            return self._record(Attempt(**common, verdict="failed", error=_one_line(exc),
                                        traceback=redact(traceback.format_exc()),
                                        seconds=p.propose_s + p.remote_s + time.perf_counter() - t), None)
        attempt = Attempt(**common, allocation=outcome.allocation, projected=outcome.projected, metrics=outcome.metrics,
                          errors=outcome.errors, within_band=outcome.within_band, score=judged.score,
                          verdict=judged.verdict, reflection=judged.reflection, extra=outcome.extra,
                          seconds=p.propose_s + p.remote_s + time.perf_counter() - t)
        return self._record(attempt, outcome if judged.verdict in ("best", "accept", "forced", "reference") else None)

    def _attempt(self, index: int, step: Step, history: list[Attempt]) -> Attempt:
        """One proposal, measured and recorded (a batch of one)."""
        p = self._propose(index, step, history)
        if p.done is not None:
            self._journal_calls(index, p.ctx)
            return self._record(p.done, None)
        return self._evaluate(p, step, history)

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


@dataclass
class _Proposal:
    """One proposal of a batch on its way to the journal."""

    ctx: Context
    t0: float
    plan: Any = None
    common: dict[str, Any] | None = None
    projection: Any = None
    done: Attempt | None = None  # failed or exhausted before any measurement: recorded as it is
    pending: Attempt | None = None
    propose_s: float = 0.0
    remote_s: float = 0.0
    remote_error: Any = None


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return a is b


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
