"""Built-in sparsity strategists: uniform, OWL, sensitivity (measured marginal cost + Lagrangian allocation).

Every strategist answers `propose(ctx) -> SparsityPlan` for the level the loop wants next and keeps no
hidden state: everything it knows (profile, current allocation, history, rollback penalties) is in ctx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from .calibrate import LinearInfo
from .plan import MAX_RATIO, SparsityPlan
from .profile import GRID, GRID_STEP, SensitivityProfile

OWL_LAMBDA = 0.08  # OWL's sparsity spread (+/- lambda around the target) for LLaMA-class models


@dataclass
class StepContext:
    profile: SensitivityProfile
    infos: list[LinearInfo]
    curves: dict[str, list[float]]  # name -> share of Wanda energy removed at each GRID sparsity
    target: float
    level: float  # global sparsity this step must reach
    current: dict[str, float]  # per-layer sparsity at the last checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    penalties: dict[str, float] = field(default_factory=dict)  # group -> cost multiplier from rollbacks


class Strategist(Protocol):
    name: str

    def propose(self, ctx: StepContext) -> SparsityPlan: ...


class UniformStrategist:
    """Every layer at the same sparsity (the Wanda / SparseGPT default)."""

    name = "uniform"

    def propose(self, ctx: StepContext) -> SparsityPlan:
        return SparsityPlan(default=ctx.level, rationale="uniform: every layer at the level", source=self.name)


class OWLStrategist:
    """Outlier-weighted layerwise sparsity (Yin et al. 2024): blocks with more Wanda outliers keep more."""

    name = "owl"

    def __init__(self, lam: float = OWL_LAMBDA) -> None:
        self.lam = lam

    def propose(self, ctx: StepContext) -> SparsityPlan:
        lod = ctx.profile.owl_block_outliers
        lo, hi = min(lod), max(lod)
        norm = [(v - lo) / (hi - lo) * 2 * self.lam if hi > lo else 0.0 for v in lod]
        mean = sum(norm) / len(norm)
        scale = ctx.level / ctx.target if ctx.target else 1.0  # same shape, scaled to the step's level
        ratios = {i.name: ctx.level - (norm[i.block] - mean) * scale for i in ctx.infos}
        return SparsityPlan(ratios=ratios, rationale=f"OWL M=5 lambda={self.lam}", source=self.name)


def _marginals(ctx: StepContext, name: str, params: int, alpha: float) -> list[float]:
    """Cost per pruned weight of each GRID step for one layer: alpha * dE/ds / params, made non-decreasing."""
    curve = ctx.curves[name]
    out, best = [], 0.0
    for j in range(len(GRID) - 1):
        m = alpha * (curve[j + 1] - curve[j]) / (params * GRID_STEP)
        best = max(best, m)
        out.append(best)
    return out


class SensitivityStrategist:
    """Allocate by equalising marginal cost per pruned weight (a Lagrangian over convex per-layer curves).

    Layer i's cost of sparsity s is alpha_i * E_i(s), E_i the share of its Wanda score energy removed.
    alpha_i is calibrated so the marginal cost at the target matches the group's measured NLL rise
    (profile.group_probe), or, without probes, so all layers tie at the target and the gradient z-score
    tilts them (beta). Rollbacks multiply the implicated groups' alpha (ctx.penalties)."""

    name = "sensitivity"

    def __init__(self, beta: float = 0.3, spread: float = 0.2) -> None:
        self.beta = beta
        self.spread = spread  # no layer further than this from the level: the cost model is local

    def _alpha(self, ctx: StepContext) -> dict[str, float]:
        t = min(max(ctx.target, GRID_STEP), GRID[-2])
        j = int(round(t / GRID_STEP))
        total = sum(i.params for i in ctx.infos)
        by = {l.name: l for l in ctx.profile.layers}
        alpha = {}
        for info in ctx.infos:
            curve = ctx.curves[info.name]
            slope = max((curve[min(j + 2, len(GRID) - 1)] - curve[max(j - 2, 0)]) / (4 * GRID_STEP), 1e-9)
            lp = by[info.name]
            probe = ctx.profile.group_probe.get(lp.group)
            if probe is not None:
                per_weight = max(probe, 1e-6) * 100 / total  # NLL rise per pruned weight at the target
            else:
                per_weight = math.exp(self.beta * lp.grad_z) / total
            alpha[info.name] = per_weight * info.params / slope * ctx.penalties.get(lp.group, 1.0)
        return alpha

    def allocate(self, ctx: StepContext) -> dict[str, float]:
        alpha = self._alpha(ctx)
        marg = {i.name: _marginals(ctx, i.name, i.params, alpha[i.name]) for i in ctx.infos}
        total = sum(i.params for i in ctx.infos)
        cap = int(round(MAX_RATIO / GRID_STEP))

        lo_all = max(ctx.level - self.spread, 0.0)
        hi_all = min(ctx.level + self.spread, MAX_RATIO)

        def alloc(lam: float) -> dict[str, float]:
            out = {}
            for i in ctx.infos:
                steps = sum(1 for m in marg[i.name][:cap] if m <= lam)
                s = min(max(steps * GRID_STEP, lo_all), hi_all)
                out[i.name] = max(s, ctx.current.get(i.name, 0.0))
            return out

        lo, hi = -30.0, 5.0  # log10 of lambda
        for _ in range(50):
            mid = (lo + hi) / 2
            got = sum(r * i.params for i, r in zip(ctx.infos, alloc(10**mid).values())) / total
            lo, hi = (mid, hi) if got < ctx.level else (lo, mid)
        return alloc(10**hi)

    def propose(self, ctx: StepContext) -> SparsityPlan:
        ratios = self.allocate(ctx)
        src = "measured group probes" if ctx.profile.group_probe else f"gradient z-scores (beta={self.beta})"
        pen = {g: round(p, 2) for g, p in ctx.penalties.items() if p != 1.0}
        why = f"equalised marginal cost per pruned weight; costs from {src}" + (f"; rollback penalties {pen}" if pen else "")
        return SparsityPlan(ratios=ratios, rationale=why, source=self.name)


BUILTINS: dict[str, type] = {"uniform": UniformStrategist, "owl": OWLStrategist, "sensitivity": SensitivityStrategist}
