"""Built-in strategists of the sparsify job: uniform, OWL, sensitivity (measured costs + a line search at the
target).

Every strategist answers `propose(ctx) -> Plan` for the level the job wants next (ctx.step: level, target,
current per-layer sparsity) and keeps no hidden state: everything it knows (profile, phase, history with
every rollback) is in the Context.
"""

from __future__ import annotations

import math
from typing import Any

from ..agents.context import Context
from ..attempt import Attempt
from ..plan import Plan
from .plan import MAX_RATIO
from .profile import SensitivityProfile

OWL_LAMBDA = 0.08  # OWL's sparsity spread (+/- lambda around the target) for LLaMA-class models


class UniformStrategist:
    """Every layer at the same sparsity (the Wanda / SparseGPT default)."""

    name = "uniform"
    kinds = ("sparsify",)

    def propose(self, ctx: Context) -> Plan | None:
        if ctx.phase == "refine":
            return None  # uniform has one allocation per level
        return Plan(default_ratio=ctx.step["level"], rationale="uniform: every layer at the level")


class OWLStrategist:
    """Outlier-weighted layerwise sparsity (Yin et al. 2024): blocks with more Wanda outliers keep more."""

    name = "owl"
    kinds = ("sparsify",)

    def __init__(self, lam: float = OWL_LAMBDA) -> None:
        self.lam = lam

    def propose(self, ctx: Context) -> Plan | None:
        if ctx.phase == "refine":
            return None  # OWL's shape is fixed by its outlier ratios
        level, target = ctx.step["level"], ctx.step["target"]
        lod = ctx.profile.owl_block_outliers
        lo, hi = min(lod), max(lod)
        norm = [(v - lo) / (hi - lo) * 2 * self.lam if hi > lo else 0.0 for v in lod]
        mean = sum(norm) / len(norm)
        scale = level / target if target else 1.0  # same shape, scaled to the step's level
        ratios = {l.name: min(max(level - (norm[l.block] - mean) * scale, 0.0), MAX_RATIO) for l in ctx.profile.layers}
        return Plan(ratios=ratios, default_ratio=level, rationale=f"OWL M=5 lambda={self.lam}")


def _log_cost_tilt(table: dict[Any, float], key: Any, layers: list[Any]) -> dict[str, float]:
    """Per layer: minus (log measured cost of its unit - parameter-weighted mean log cost). Costs at or below
    zero (noise) are floored at a tenth of the median positive cost."""
    pos = sorted(v for v in table.values() if v > 0)
    if not pos:
        return {}
    floor = 0.1 * pos[len(pos) // 2]
    logc = {k: math.log(max(v, floor)) for k, v in table.items()}
    total = sum(l.params for l in layers)
    mean = sum(logc[key(l)] * l.params for l in layers if key(l) in logc) / total
    return {l.name: -(logc[key(l)] - mean) for l in layers if key(l) in logc}


def sensitivity_tilt(profile: SensitivityProfile, beta: float = 0.3) -> tuple[dict[str, float], str]:
    """Direction to move sparsity in: positive = prune more. From measured costs when the profile has
    them (group + block, in log space), else from gradient z-scores (a weaker, static signal)."""
    tilt = {l.name: 0.0 for l in profile.layers}
    sources = []
    for table, key, what in ((profile.group_probe, lambda l: l.group, "group"),
                             (profile.block_probe, lambda l: l.block, "block")):
        if table:
            for n, v in _log_cost_tilt(table, key, profile.layers).items():
                tilt[n] += v
            sources.append(what)
    if sources:
        return tilt, "measured KL cost per " + " + ".join(sources)
    return {l.name: -beta * l.grad_z for l in profile.layers}, f"gradient z-scores (beta={beta})"


ETAS = (0.05, 0.1, 0.15, 0.2)  # tilt strengths the refine phase tries at the target (a line search)


class SensitivityStrategist:
    """Tilt the allocation away from layers whose measured cost is high, then line-search the tilt's strength.

    Layer i gets level + eta * t_i, t_i = -(log cost of its group - mean) - (log cost of its block - mean),
    clipped to level +/- spread; the projector recentres it on the level exactly. On the ramp the tilt is
    scaled down with the level (eta = ramp_eta). At the target, eta runs through ETAS and then bisects towards
    the measured neighbours of the best one so far (read from ctx.history: no hidden state); when every
    candidate has been measured the strategist answers None and the loop stops refining."""

    name = "sensitivity"
    kinds = ("sparsify",)

    def __init__(self, beta: float = 0.3, spread: float = 0.25, ramp_eta: float = 0.05,
                 etas: tuple[float, ...] = ETAS) -> None:
        self.beta, self.spread, self.ramp_eta, self.etas = beta, spread, ramp_eta, etas

    def ratios(self, ctx: Context, eta: float, tilt: dict[str, float]) -> dict[str, float]:
        level, target = ctx.step["level"], ctx.step["target"]
        scale = level / target if target else 1.0
        lo, hi = max(level - self.spread, 0.0), min(level + self.spread, MAX_RATIO)
        return {l.name: min(max(level + eta * scale * tilt.get(l.name, 0.0), lo), hi) for l in ctx.profile.layers}

    def next_eta(self, history: list[Attempt], target: float) -> float | None:
        measured: dict[float, float] = {}  # eta -> probe KL of every candidate already measured at the target
        for a in history:
            if abs(a.step.get("level", -1) - target) > 1e-9 or "probe_kl" not in a.metrics or a.verdict == "repeat":
                continue
            if a.phase == "reference":
                measured[0.0] = a.metrics["probe_kl"]
            elif "eta" in a.plan_params:
                measured[round(a.plan_params["eta"], 4)] = a.metrics["probe_kl"]
        for eta in self.etas:
            if round(eta, 4) not in measured:
                return eta
        best = min(measured, key=measured.get)  # type: ignore[arg-type]
        # bisect towards each measured neighbour of the best, the more promising (lower KL) side first
        below = [e for e in measured if e < best]
        above = [e for e in measured if e > best]
        sides = [e for e in (max(below, default=None), min(above, default=None)) if e is not None]
        for nb in sorted(sides, key=lambda e: measured[e]):
            cand = round((best + nb) / 2, 4)
            if abs(cand - best) >= 0.01 and cand not in measured:
                return cand
        return None

    def propose(self, ctx: Context) -> Plan | None:
        tilt, src = sensitivity_tilt(ctx.profile, self.beta)
        if ctx.phase == "refine":
            eta = self.next_eta(ctx.history, ctx.step["target"])
            if eta is None:
                return None
        else:
            eta = self.ramp_eta
        why = f"tilt from {src}, strength eta={eta:g}" + (" (line search at the target)" if ctx.phase == "refine" else "")
        return Plan(ratios=self.ratios(ctx, eta, tilt), default_ratio=ctx.step["level"], rationale=why, params={"eta": eta})
