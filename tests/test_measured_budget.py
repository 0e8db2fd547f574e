"""Measured-budget projector: bracketing with an injected (fake) measurement, noise, bounds, clocks."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from prunepilot.budget import Band
from prunepilot.errors import BudgetError
from prunepilot.evaluate.measured_budget import bracket_measured_target, make_latency_measure, make_memory_measure


def linear_metric(dense: float = 100.0, floor: float = 20.0):
    """metric(s) = dense - (dense - floor) * s: monotone, like latency versus pruning scale."""
    return lambda s: dense - (dense - floor) * s


def test_brackets_a_noiseless_target_into_the_band() -> None:
    f = linear_metric()
    built: list[float] = []

    def build(s: float) -> float:
        built.append(s)
        return s

    res = bracket_measured_target(build, f, goal=50.0, band=Band(over=0.01, under=0.05), noise=0.0)
    assert res.feasible and res.within_band
    assert 50 * 0.95 <= res.best.value <= 50 * 1.01
    assert res.best_candidate == res.best.knob
    assert res.n_measurements <= 6  # ends + a few secant steps on a linear curve
    assert len(built) == len(set(built))  # each candidate is built once
    assert res.stop_reason == "a feasible point inside the band"


def test_nonlinear_curve_still_converges() -> None:
    res = bracket_measured_target(lambda s: s, lambda s: 100 * (1 - s) ** 3 + 5, goal=30.0, noise=0.0)
    assert res.within_band and res.n_measurements <= 24


def test_noise_near_the_cap_is_resolved_by_repeated_medians() -> None:
    f = linear_metric()
    # deterministic +-4% noise, alternating: one sample can lie, the median of three cannot
    signs = itertools.cycle([1.04, 0.96, 1.0])
    res = bracket_measured_target(lambda s: s, lambda s: f(s) * next(signs), goal=50.0, noise=0.05, repeats=3,
                                  band=Band(over=0.02, under=0.10))
    assert res.feasible
    assert any(len(p.samples) == 3 for p in res.probes)  # near-boundary points were re-measured
    for p in res.probes:
        assert len(p.samples) in (1, 2, 3)
    assert res.best.value <= res.cap
    assert f(res.best.knob) <= 50.0 * 1.02 * 1.0001  # the true metric at the chosen point meets the cap


def test_infeasible_target_reports_the_most_compressed_measurement() -> None:
    res = bracket_measured_target(lambda s: s, linear_metric(floor=60.0), goal=40.0, noise=0.0)
    assert not res.feasible and res.best is None and res.best_candidate is None
    assert "infeasible" in res.stop_reason and res.n_measurements == 1
    assert res.to_json()["best"] is None


def test_already_feasible_at_the_least_compressed_point() -> None:
    res = bracket_measured_target(lambda s: s, linear_metric(), goal=120.0, noise=0.0, band=Band(over=0.0, under=0.9))
    assert res.best.knob == 0.0 and res.within_band
    assert "already meets" in res.stop_reason


def test_measurement_budget_bounds_the_search_and_keeps_the_best_feasible() -> None:
    calls = []

    def measure(s: float) -> float:
        calls.append(s)
        return 100 * (1 - s) ** 2 + 10  # curved: secant steps never land exactly on the goal

    # an impossibly narrow band cannot be hit: the search must stop at the sample budget
    res = bracket_measured_target(lambda s: s, measure, goal=50.0, band=Band(over=1e-9, under=1e-9), noise=0.0,
                                  max_measurements=7, knob_tol=1e-12)
    assert len(calls) == 7 == res.n_measurements
    assert res.stop_reason == "max_measurements reached"
    assert res.feasible and res.best.value <= res.cap
    feasible = [p.knob for p in res.probes if p.value <= res.cap]
    assert res.best.knob == min(feasible)


def test_knob_range_is_respected_and_errors_state_the_rule() -> None:
    seen: list[float] = []
    bracket_measured_target(lambda s: seen.append(s) or s, lambda s: 10 - 9 * s, goal=5.0, lo=0.2, hi=0.8, noise=0.0)
    assert all(0.2 <= s <= 0.8 for s in seen)
    with pytest.raises(BudgetError, match="positive"):
        bracket_measured_target(lambda s: s, lambda s: s, goal=0.0)
    with pytest.raises(BudgetError, match="lo < hi"):
        bracket_measured_target(lambda s: s, lambda s: s, goal=1.0, lo=1.0, hi=0.5)
    with pytest.raises(BudgetError, match="finite"):
        bracket_measured_target(lambda s: s, lambda s: float("nan"), goal=1.0)


def test_latency_measure_uses_the_injected_clock() -> None:
    ticks = itertools.count(step=0.002)  # every clock read advances 2 ms
    measure = make_latency_measure(torch.randn(1, 4), runs=5, warmup=1, clock=lambda: next(ticks))
    assert measure(nn.Linear(4, 4)) == pytest.approx(2.0)


def test_bracketing_a_real_memory_target_on_a_width_knob() -> None:
    """End to end with real measurements: the knob narrows an MLP's hidden width; memory_mb is measured."""
    x = torch.randn(2, 256)

    def build(s: float) -> nn.Module:
        hidden = max(8, int(round(2048 * (1 - s))))
        return nn.Sequential(nn.Linear(256, hidden), nn.ReLU(), nn.Linear(hidden, 256)).eval()

    measure = make_memory_measure(x)
    dense = measure(build(0.0))
    res = bracket_measured_target(build, measure, goal=0.4 * dense, noise=0.0, band=Band(over=0.01, under=0.05))
    assert res.within_band
    assert measure(res.best_candidate) <= 0.4 * dense * 1.01
