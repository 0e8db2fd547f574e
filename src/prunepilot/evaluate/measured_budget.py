"""Projector for measured targets (latency_ms, memory_mb): bracket the target with real measurements.

MACs and params are exact functions of a plan, so the projector can solve for them by counting. Latency and
memory are not: they are measured, noisy (latency) and only roughly monotone in the knob. Here the plan's
shape is fixed and a scalar knob `s` in [lo, hi] scales it (e.g. the pruning scale: s=0 dense, s=1 the most
compression the plan allows); `build(s)` makes the candidate and `measure(candidate)` returns one sample of
the metric. The metric is assumed non-increasing in `s` (more compression, smaller metric).

Search: measure both ends, then shrink the bracket [feasible s, infeasible s] with a safeguarded secant step
(regula falsi with bisection fallback). A single sample decides when it is clearly on one side of the cap;
a sample within the noise margin of the cap is repeated and the median decides. Every candidate that meets
the cap (median <= goal * (1 + over)) is kept; the best is the least-compressed one (smallest `s`), which
for a quality-monotone knob is the most accurate. The total number of samples is bounded by
`max_measurements`, so the search always terminates.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..budget import Band
from ..errors import BudgetError

C = TypeVar("C")


@dataclass
class Probe:
    """All samples taken at one knob value."""

    knob: float
    samples: list[float] = field(default_factory=list)

    @property
    def value(self) -> float:
        return statistics.median(self.samples)

    def to_json(self) -> dict[str, Any]:
        return {"knob": self.knob, "value": self.value, "samples": list(self.samples)}


@dataclass
class BracketResult(Generic[C]):
    """Outcome of a bracketing search; `best` is None when even the most compressed point misses the cap."""

    goal: float
    cap: float
    best: Probe | None
    best_candidate: C | None
    within_band: bool
    n_measurements: int
    probes: list[Probe]
    stop_reason: str

    @property
    def feasible(self) -> bool:
        return self.best is not None

    @property
    def error(self) -> float | None:
        """(achieved - goal) / goal of the best point."""
        return None if self.best is None else (self.best.value - self.goal) / self.goal

    def to_json(self) -> dict[str, Any]:
        return {
            "goal": self.goal,
            "cap": self.cap,
            "best": None if self.best is None else self.best.to_json(),
            "error": self.error,
            "within_band": self.within_band,
            "n_measurements": self.n_measurements,
            "stop_reason": self.stop_reason,
            "probes": [p.to_json() for p in self.probes],
        }


class _Budgeted(Generic[C]):
    """Wraps build/measure with the sample budget and the candidate cache."""

    def __init__(self, build: Callable[[float], C], measure: Callable[[C], float], max_measurements: int) -> None:
        self.build, self.measure, self.left = build, measure, max_measurements
        self.probes: dict[float, Probe] = {}
        self.candidates: dict[float, C] = {}
        self.used = 0

    def sample(self, knob: float) -> Probe:
        if self.left <= 0:
            raise _OutOfBudget
        if knob not in self.candidates:
            self.candidates[knob] = self.build(knob)
        v = float(self.measure(self.candidates[knob]))
        if not math.isfinite(v):
            raise BudgetError("a measured budget metric must be a finite number", v, "check the measure function")
        self.left -= 1
        self.used += 1
        p = self.probes.setdefault(knob, Probe(knob))
        p.samples.append(v)
        return p


class _OutOfBudget(Exception):
    pass


def bracket_measured_target(
    build: Callable[[float], C],
    measure: Callable[[C], float],
    goal: float,
    *,
    band: Band | None = None,
    lo: float = 0.0,
    hi: float = 1.0,
    noise: float = 0.03,
    repeats: int = 3,
    knob_tol: float = 1e-3,
    max_measurements: int = 24,
) -> BracketResult[C]:
    """Find the least-compressed knob whose measured metric meets `goal` (a cap) within `band`.

    `noise` is the relative half-width around the cap inside which one sample is not trusted: such points
    are re-measured up to `repeats` samples and judged on the median. Stops when a feasible point lies
    inside the band (error >= -under), when the bracket is narrower than `knob_tol`, or when
    `max_measurements` samples have been taken.
    """
    band = band or Band()
    if goal <= 0:
        raise BudgetError("a measured target must be positive", goal, "give a positive latency/memory goal")
    if not lo < hi:
        raise BudgetError("the knob range must satisfy lo < hi", (lo, hi), "e.g. lo=0.0, hi=1.0")
    if max_measurements < 2:
        raise BudgetError("bracketing needs at least 2 measurements", max_measurements, "raise max_measurements")
    cap = goal * (1 + band.over)
    floor = goal * (1 - band.under)
    run: _Budgeted[C] = _Budgeted(build, measure, max_measurements)

    def judge(knob: float) -> Probe:
        """Sample `knob`; repeat while the median sits within the noise margin of the cap."""
        p = run.sample(knob)
        while abs(p.value - cap) <= noise * cap and len(p.samples) < repeats and run.left > 0:
            p = run.sample(knob)
        return p

    best: Probe | None = None

    def consider(p: Probe) -> None:
        nonlocal best
        if p.value <= cap and (best is None or p.knob < best.knob):
            best = p

    def in_band(p: Probe | None) -> bool:
        return p is not None and floor <= p.value <= cap

    stop = "max_measurements reached"
    try:
        p_hi = judge(hi)
        consider(p_hi)
        if p_hi.value > cap:
            stop = f"infeasible: the most compressed point (knob={hi:g}) measures {p_hi.value:.4g} > cap {cap:.4g}"
            return _result(goal, cap, None, run, False, stop)
        p_lo = judge(lo)
        consider(p_lo)
        if p_lo.value <= cap:
            stop = f"the least compressed point (knob={lo:g}) already meets the cap"
            return _result(goal, cap, p_lo, run, in_band(p_lo), stop)
        # invariant: lo infeasible (value > cap), hi feasible and below the band (else we stopped);
        # aim the secant at the band's middle, so g = value - target changes sign across [lo, hi]
        target = (cap + floor) / 2
        g_lo, g_hi = p_lo.value - target, p_hi.value - target
        kept = 0  # Illinois: when one end is kept twice in a row, halve its g to avoid one-sided creep
        while True:
            if in_band(best):
                stop = "a feasible point inside the band"
                break
            if hi - lo <= knob_tol:
                stop = f"bracket narrower than {knob_tol:g}"
                break
            width = hi - lo
            s = lo + g_lo * width / (g_lo - g_hi) if g_lo != g_hi else lo + width / 2
            s = min(max(s, lo + 0.1 * width), hi - 0.1 * width)  # safeguard: always shrink meaningfully
            p = judge(s)
            consider(p)
            if p.value > cap:  # still infeasible: move the lower end up
                lo, g_lo = s, p.value - target
                if kept == -1:
                    g_hi /= 2
                kept = -1
            else:
                hi, g_hi = s, p.value - target
                if kept == 1:
                    g_lo /= 2
                kept = 1
    except _OutOfBudget:
        stop = "max_measurements reached"
    return _result(goal, cap, best, run, in_band(best), stop)


def _result(goal: float, cap: float, best: Probe | None, run: _Budgeted[C], within: bool, stop: str) -> BracketResult[C]:
    return BracketResult(
        goal=goal,
        cap=cap,
        best=best,
        best_candidate=None if best is None else run.candidates.get(best.knob),
        within_band=within,
        n_measurements=run.used,
        probes=sorted(run.probes.values(), key=lambda p: p.knob),
        stop_reason=stop,
    )


def make_latency_measure(
    example_input: Any,
    *,
    runs: int = 5,
    warmup: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    threads: int | None = None,
) -> Callable[[Any], float]:
    """A `measure` for latency_ms: median of `runs` timed forward passes after `warmup` (clock injectable).

    One call of the returned function is one *sample* (a median over `runs`); the bracketing search takes
    more samples near the cap.
    """
    import torch

    def measure(model: Any) -> float:
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            with torch.inference_mode():
                for _ in range(warmup):
                    model(*args)
                ts: list[float] = []
                for _ in range(runs):
                    t0 = clock()
                    model(*args)
                    ts.append((clock() - t0) * 1000.0)
            return statistics.median(ts)
        finally:
            torch.set_num_threads(old)

    return measure


def make_memory_measure(example_input: Any | None = None) -> Callable[[Any], float]:
    """A `measure` for memory_mb: serialized weights + peak activations (deterministic, one sample suffices)."""
    from .memory import memory_mb

    return lambda model: memory_mb(model, example_input)


def knob_grid(lo: float, hi: float, n: int) -> Sequence[float]:
    """Evenly spaced knobs (for plotting a measured trade-off curve next to the bracketing result)."""
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)] if n > 1 else [lo]
