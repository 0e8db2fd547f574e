"""The iterative loop: propose the next level's allocation, project it exactly, apply, probe, keep or roll back.

Trial allocations are applied from the Wanda mask bank (dense activation statistics), so an attempt
costs one perplexity probe on a small held-out slice of the calibration text (never the evaluation
text). A step whose probe perplexity rises more than `threshold` over the last checkpoint is rolled
back; the reflection names the groups it pushed hardest, those groups get a cost penalty, and after
`patience` rollbacks in a row the step halves. Below `min_step` the best rolled-back candidate is kept
(forced), so the loop always ends exactly at the target.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..evaluate.language import mean_nll
from .calibrate import LinearInfo
from .plan import MAX_RATIO, counts_to_ratios, global_sparsity, project, resolve
from .profile import SensitivityProfile, WandaBank
from .strategies import StepContext, Strategist


@dataclass
class LoopConfig:
    target: float
    step: float = 0.1
    min_step: float = 0.02
    threshold: float = 0.15  # allowed probe-perplexity rise per checkpoint (ratio - 1)
    patience: int = 2  # rollbacks in a row before the step halves
    max_iters: int = 24
    penalty: float = 1.5
    batch_size: int = 4


@dataclass
class LoopResult:
    counts: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: int = 0
    probe_nll_dense: float = 0.0
    probe_nll_final: float = 0.0


def _groups_pushed(profile: SensitivityProfile, before: dict[str, float], after: dict[str, float], k: int = 3) -> list[str]:
    """Groups that took most of a step's new pruned weights."""
    moved: dict[str, float] = {}
    for l in profile.layers:
        moved[l.group] = moved.get(l.group, 0.0) + (after[l.name] - before.get(l.name, 0.0)) * l.params
    return [g for g, v in sorted(moved.items(), key=lambda kv: -kv[1])[:k] if v > 0]


def run_loop(
    model: nn.Module,
    bank: WandaBank,
    infos: list[LinearInfo],
    profile: SensitivityProfile,
    strategist: Strategist,
    probe: torch.Tensor,
    cfg: LoopConfig,
    fallback: Strategist | None = None,
    record: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    bank.restore()
    dense_nll = mean_nll(model, probe, cfg.batch_size)
    current: dict[str, float] = {i.name: 0.0 for i in infos}
    current_counts: dict[str, int] = {i.name: 0 for i in infos}
    ckpt_nll = dense_nll
    penalties: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    step, in_a_row, rollbacks = cfg.step, 0, 0
    best_rejected: tuple[float, dict[str, int], dict[str, Any]] | None = None
    total = sum(i.params for i in infos)
    target_count = int(round(cfg.target * total))
    it = 0
    while sum(current_counts.values()) < target_count:
        it += 1
        now = global_sparsity(current, infos)
        last_call = it >= cfg.max_iters
        level = cfg.target if last_call else min(now + step, cfg.target)
        ctx = StepContext(profile, infos, bank.curve, cfg.target, level, dict(current), list(history), dict(penalties))
        t0 = time.perf_counter()
        plan, used = strategist.propose(ctx), strategist.name
        try:
            desired = resolve(plan, infos, profile.groups, fallback=current)
        except Exception as exc:  # a plan that slipped past validation: the fallback decides, and we say so
            if fallback is None:
                raise
            plan, used = fallback.propose(ctx), f"{fallback.name} (fallback: {exc})"
            desired = resolve(plan, infos, profile.groups, fallback=current)
        counts = project(desired, infos, level, floor=current, ceiling=MAX_RATIO)
        bank.apply(counts)
        nll = mean_nll(model, probe, cfg.batch_size)
        rise = math.exp(nll - ckpt_nll) - 1
        ratios = counts_to_ratios(counts, infos)
        pushed = _groups_pushed(profile, current, ratios)
        attempt: dict[str, Any] = {
            "iteration": it, "strategist": used, "from_level": round(now, 6), "level": round(level, 6),
            "achieved": sum(counts.values()) / total, "probe_ppl": math.exp(nll),
            "checkpoint_ppl": math.exp(ckpt_nll), "rise": rise, "threshold": cfg.threshold,
            "groups_pushed": pushed, "rationale": plan.rationale, "llm_reflection": plan.reflection,
            "group_sparsity": {r["group"]: r["sparsity"] for r in profile.group_table(ratios)},
        }
        if rise <= cfg.threshold or last_call:
            verdict = "accept" if rise <= cfg.threshold else "forced"
            current, current_counts, ckpt_nll, in_a_row, best_rejected = ratios, counts, nll, 0, None
        else:
            rollbacks += 1
            in_a_row += 1
            for g in pushed:
                penalties[g] = penalties.get(g, 1.0) * cfg.penalty
            attempt["reflection"] = (
                f"rolled back: probe perplexity rose {rise:.1%} (> {cfg.threshold:.0%}) going "
                f"{now:.1%} -> {level:.1%}; groups pushed hardest: {', '.join(pushed) or 'none'}; "
                f"their cost x{cfg.penalty} from now on"
            )
            if best_rejected is None or nll < best_rejected[0]:
                best_rejected = (nll, counts, attempt)
            verdict = "rollback"
            if in_a_row >= cfg.patience:
                step /= 2
                in_a_row = 0
                attempt["reflection"] += f"; step halved to {step:.3f}"
                if step < cfg.min_step and best_rejected is not None:
                    # cannot make smaller progress usefully: keep the least-bad candidate
                    nll_b, counts_b, _ = best_rejected
                    current_counts, ckpt_nll = counts_b, nll_b
                    current = counts_to_ratios(counts_b, infos)
                    verdict, best_rejected = "rollback; best candidate forced", None
                    step = cfg.min_step
            bank.apply(current_counts)
        attempt["verdict"] = verdict
        attempt["seconds"] = time.perf_counter() - t0
        history.append(attempt)
        if record:
            record(attempt)
    bank.apply(current_counts)
    return LoopResult(current_counts, history, rollbacks, dense_nll, ckpt_nll)


def probe_groups(
    model: nn.Module,
    bank: WandaBank,
    infos: list[LinearInfo],
    profile: SensitivityProfile,
    probe: torch.Tensor,
    target: float,
    delta: float = 0.1,
    batch_size: int = 4,
) -> None:
    """Measure each group's marginal cost at the uniform target: NLL rise per 1% of global sparsity moved
    into that group (raised from target to target+delta, every other layer at the target).
    Fills profile.group_probe / probe_base_nll / probe_delta."""
    total = sum(i.params for i in infos)
    uniform = {i.name: int(round(target * i.params)) for i in infos}
    bank.apply(uniform)
    base = mean_nll(model, probe, batch_size)
    hi = min(target + delta, MAX_RATIO)
    out: dict[str, float] = {}
    for g, names in profile.groups.items():
        members = set(names)
        trial = {i.name: (int(round(hi * i.params)) if i.name in members else uniform[i.name]) for i in infos}
        bank.apply(trial)
        rise = mean_nll(model, probe, batch_size) - base
        moved = sum(i.params for i in infos if i.name in members) * (hi - target) / total * 100
        out[g] = rise / moved if moved else 0.0
    bank.restore()
    profile.group_probe, profile.probe_base_nll, profile.probe_delta = out, base, hi - target
