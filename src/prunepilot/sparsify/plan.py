"""Resolving a Plan into per-layer sparsity for the sparsify job, and its exact projection.

A plan is data, never code. Its ratio keys are group ids from the profile ('mlp.down_proj@0-9'), exact
layer names, or 're:REGEX' patterns over layer names; unknown keys are rejected; values are clamped to
[0, MAX_RATIO]; fields that only structured pruning understands are rejected, not ignored. `project` then
shifts the plan until the parameter-weighted sparsity equals the level exactly (to the weight), never
below each layer's floor (its current sparsity: the ramp only adds).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from ..engines import sparsity as sp
from ..engines.sparsity import exact_counts
from ..errors import BudgetError, PlanError
from ..plan import Plan
from .calibrate import LinearInfo

MAX_RATIO = 0.95  # weights removed per layer at most: keeps every layer alive
STRUCTURED_ONLY = ("importance", "round_to", "protected", "prune_heads", "quantize", "skip")


def validate_keys(plan: Plan, infos: list[LinearInfo], groups: dict[str, list[str]]) -> list[str]:
    """Names of keys that match neither a group, a layer, nor (as re:) any layer."""
    layer_names = {i.name for i in infos}
    bad = []
    for key in plan.ratios:
        if key in groups or key in layer_names:
            continue
        if key.startswith("re:"):
            try:
                rx = re.compile(key[3:])
            except re.error:
                bad.append(key)
                continue
            if any(rx.search(n) for n in layer_names):
                continue
        bad.append(key)
    return bad


def resolve(
    plan: Plan, infos: list[LinearInfo], groups: dict[str, list[str]], fallback: dict[str, float]
) -> dict[str, float]:
    """Per-layer desired sparsity. Precedence: exact name > re: pattern > group > default > fallback."""
    foreign = sorted(f for f in STRUCTURED_ONLY if f in plan.model_fields_set)
    if foreign:
        raise PlanError("a sparsity plan sets fields only structured pruning understands", foreign,
                        "give per-group sparsity in 'ratios' (and 'default_ratio'); nothing else")
    bad = validate_keys(plan, infos, groups)
    if bad:
        raise PlanError("a sparsity plan may only name the profile's groups, layers or re: patterns",
                        bad[:5], f"use group ids such as {next(iter(groups), '?')}")
    clamp = lambda v: min(max(float(v), 0.0), MAX_RATIO)  # noqa: E731
    # the structured default (0.3) is no opinion here: only an explicit default_ratio counts
    default = plan.default_ratio if "default_ratio" in plan.model_fields_set else None
    layer_of_group = {n: g for g, names in groups.items() for n in names}
    patterns = [(re.compile(k[3:]), v) for k, v in plan.ratios.items() if k.startswith("re:")]
    out: dict[str, float] = {}
    for info in infos:
        n = info.name
        if n in plan.ratios:
            out[n] = clamp(plan.ratios[n])
            continue
        hit = next((v for rx, v in patterns if rx.search(n)), None)
        if hit is not None:
            out[n] = clamp(hit)
        elif layer_of_group.get(n) in plan.ratios:
            out[n] = clamp(plan.ratios[layer_of_group[n]])
        elif default is not None:
            out[n] = clamp(default)
        else:
            out[n] = clamp(fallback.get(n, 0.0))
    return out


def global_sparsity(ratios: dict[str, float], infos: list[LinearInfo]) -> float:
    total = sum(i.params for i in infos)
    return sum(ratios.get(i.name, 0.0) * i.params for i in infos) / total


def project(
    desired: dict[str, float],
    infos: list[LinearInfo],
    level: float,
    floor: dict[str, float] | None = None,
    ceiling: float = MAX_RATIO,
) -> dict[str, int]:
    """Exact prune counts per layer: shift `desired` by one common offset (bisection), clip each layer to
    [floor, ceiling], and round so sum(counts) == round(level * total params)."""
    floor = floor or {}
    sizes = [i.params for i in infos]
    lo_r = [min(floor.get(i.name, 0.0), ceiling) for i in infos]
    want = [desired.get(i.name, level) for i in infos]
    total = sum(sizes)
    reach_lo = sum(l * s for l, s in zip(lo_r, sizes)) / total
    reach_hi = sum(max(ceiling, l) * s for l, s in zip(lo_r, sizes)) / total
    if not (reach_lo - 1e-9 <= level <= reach_hi + 1e-9):
        raise BudgetError(
            f"the sparsity level must lie between the layers' floors ({reach_lo:.4f}) and ceilings ({reach_hi:.4f})",
            round(level, 4), f"ask for at most {reach_hi:.1%} (every layer keeps at least {1 - ceiling:.0%} of its "
            "weights, so none is cut off)" if level > reach_hi else "lower the floors (protected layers) or raise the target",
        )

    def achieved(delta: float) -> float:
        return sum(min(max(w + delta, l), max(ceiling, l)) * s for w, l, s in zip(want, lo_r, sizes)) / total

    a, b = -1.0, 1.0
    for _ in range(60):  # monotone in delta
        mid = (a + b) / 2
        if achieved(mid) < level:
            a = mid
        else:
            b = mid
    ratios = [min(max(w + b, l), max(ceiling, l)) for w, l in zip(want, lo_r)]
    counts = exact_counts(sizes, ratios, level)
    # rounding may dip a layer a weight below its floor; floors win (the loop never un-prunes)
    floors = [int(round(l * s)) for l, s in zip(lo_r, sizes)]
    counts = _respect_floors(counts, floors, sizes)
    return {i.name: c for i, c in zip(infos, counts)}


def _respect_floors(counts: list[int], floors: list[int], sizes: list[int]) -> list[int]:
    deficit = 0
    for j, (c, f) in enumerate(zip(counts, floors)):
        if c < f:
            deficit += f - c
            counts[j] = f
    j = 0
    order = sorted(range(len(counts)), key=lambda i: counts[i] - floors[i], reverse=True)
    while deficit > 0 and j < len(order) * 4:
        i = order[j % len(order)]
        if counts[i] > floors[i]:
            counts[i] -= 1
            deficit -= 1
        j += 1
    return counts


def counts_to_ratios(counts: dict[str, int], infos: list[LinearInfo]) -> dict[str, float]:
    return {i.name: counts.get(i.name, 0) / i.params for i in infos}


def nm_layer_choice(infos: list[LinearInfo], weights: dict[str, torch.Tensor], norms: dict[str, torch.Tensor],
                    nm: sp.NM, target: float, measure: Callable[[str, torch.Tensor], float] | None = None,
                    progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, int], dict[str, float]]:
    """N:M under a sparsity budget below the pattern's own: which linears take the pattern and which stay dense.

    Each layer's cost is `measure(name, keep_mask)` when given (the run passes the probe's KL to the dense model
    with only that layer under its Wanda N:M mask: measured, as every other choice here), else the relative Wanda
    error of the mask (sum of (|W| ||x||)^2 over the pruned weights over the sum over all). Layers enter cheapest
    per pruned weight first until the pruned weights reach `target` of all weights (a floor: the last layer in may
    overshoot by its own share). Returns (prune counts of the chosen layers, cost per layer)."""
    if not 0 < target <= nm.sparsity + 1e-9:
        raise BudgetError(f"a {nm} budget lies in (0, {nm.sparsity:.0%}]: a layer is either {nm} or dense", target,
                          f"e.g. --sparsity {nm}@{nm.sparsity * 0.8:.0%}")
    cost: dict[str, float] = {}
    for k, i in enumerate(infos):
        w = weights[i.name]
        score = (w.detach().float().abs() * norms[i.name].to(torch.float32).sqrt().to(w.device)) ** 2
        keep = sp.nm_mask(score, nm)
        cost[i.name] = (measure(i.name, keep) if measure is not None
                        else float(score[~keep].sum() / score.sum().clamp_min(1e-30)))
        if progress:
            progress(k + 1, len(infos))
    need = target * sum(i.params for i in infos)
    counts: dict[str, int] = {}
    pruned = 0
    for i in sorted(infos, key=lambda i: cost[i.name] / i.params):  # cost per weight removed
        if pruned >= need - 0.5:
            break
        counts[i.name] = int(round(nm.sparsity * i.params))
        pruned += counts[i.name]
    return counts, cost
