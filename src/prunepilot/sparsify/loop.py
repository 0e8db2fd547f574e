"""The iterative loop: ramp up to the target with rollback, then refine the allocation at the target.

Trial allocations are applied from the Wanda mask bank (dense activation statistics), so an attempt
costs one forward pass over a small probe slice of held-out calibration text (never the evaluation
text). Each attempt is scored by probe perplexity and by KL divergence from the dense model's
next-token distributions on the same tokens (KL ranks allocations far more reliably than perplexity on
a thousand tokens: every vocabulary entry counts, not only the observed token).

Ramp: the strategist proposes the next level's allocation; a step whose probe perplexity rises more
than `threshold` over the last checkpoint is rolled back with a reflection, and after `patience`
rollbacks in a row the step halves; below `min_step` the least-bad candidate is kept (forced), so the
ramp always ends exactly at the target. Refine: the strategist re-allocates at the target level, the
loop keeps the candidate with the lowest probe KL and rolls back every other one. Uniform allocation at
the target is always measured as a reference candidate, so the loop never ends worse than uniform on
the probe.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import LinearInfo
from .plan import MAX_RATIO, SparsityPlan, counts_to_ratios, global_sparsity, project, resolve
from .profile import SensitivityProfile, WandaBank
from .strategies import StepContext, Strategist


@dataclass
class LoopConfig:
    target: float
    step: float = 0.1
    min_step: float = 0.02
    threshold: float = 0.15  # allowed probe-perplexity rise per ramp checkpoint (ratio - 1)
    patience: int = 2  # rollbacks in a row before the step halves
    max_iters: int = 24  # ramp iterations at most
    refine_iters: int = 8  # re-allocations tried at the target
    batch_size: int = 4


@dataclass(frozen=True)
class ProbeScore:
    nll: float
    kl: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


class Probe:
    """Probe tokens plus the dense model's next-token log-probabilities (float16: half the memory, KL error ~1e-5)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> None:
        self.ids, self.batch_size = ids, batch_size
        with torch.no_grad():
            self.dense_logp = [F.log_softmax(self._logits(model, b), -1).half() for b in self._batches()]
        self.dense = self.measure(model)

    def _batches(self) -> list[torch.Tensor]:
        return [self.ids[i : i + self.batch_size] for i in range(0, self.ids.shape[0], self.batch_size)]

    @staticmethod
    def _logits(model: nn.Module, b: torch.Tensor) -> torch.Tensor:
        return model(input_ids=b, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]

    @torch.no_grad()
    def measure(self, model: nn.Module) -> ProbeScore:
        nll = kl = 0.0
        count = 0
        for b, p in zip(self._batches(), self.dense_logp):
            q = F.log_softmax(self._logits(model, b), -1)
            nll += float(F.nll_loss(q.reshape(-1, q.shape[-1]), b[:, 1:].reshape(-1), reduction="sum"))
            pf = p.float()
            kl += float((pf.exp() * (pf - q)).sum())
            count += b[:, 1:].numel()
        return ProbeScore(nll / max(count, 1), max(kl, 0.0) / max(count, 1))


@dataclass
class LoopResult:
    counts: dict[str, int]
    history: list[dict[str, Any]] = field(default_factory=list)
    rollbacks: int = 0
    probe_dense: ProbeScore | None = None
    probe_final: ProbeScore | None = None
    probe_uniform: ProbeScore | None = None  # the reference candidate (uniform at the target)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"iterations": len(self.history), "rollbacks": self.rollbacks}
        for key, s in (("dense", self.probe_dense), ("final", self.probe_final), ("uniform", self.probe_uniform)):
            if s is not None:
                out[f"probe_ppl_{key}"], out[f"probe_kl_{key}"] = s.ppl, s.kl
        return out


def _groups_pushed(profile: SensitivityProfile, before: dict[str, float], after: dict[str, float], k: int = 3) -> list[str]:
    """Groups that took most of a step's new pruned weights."""
    moved: dict[str, float] = {}
    for l in profile.layers:
        moved[l.group] = moved.get(l.group, 0.0) + (after[l.name] - before.get(l.name, 0.0)) * l.params
    return [g for g, v in sorted(moved.items(), key=lambda kv: -kv[1])[:k] if v > 0]


class _Attempts:
    """Builds, records and reports attempt rows (one per measured or skipped proposal)."""

    def __init__(self, profile: SensitivityProfile, infos: list[LinearInfo], cfg: LoopConfig,
                 record: Callable[[dict[str, Any]], None] | None) -> None:
        self.profile, self.infos, self.cfg, self.record = profile, infos, cfg, record
        self.total = sum(i.params for i in infos)
        self.rows: list[dict[str, Any]] = []

    def row(self, phase: str, used: str, plan: SparsityPlan | None, now: float, level: float,
            counts: dict[str, int], score: ProbeScore, ref: ProbeScore, t0: float) -> dict[str, Any]:
        ratios = counts_to_ratios(counts, self.infos)
        return {
            "iteration": len(self.rows) + 1, "phase": phase, "strategist": used,
            "from_level": round(now, 6), "level": round(level, 6), "achieved": sum(counts.values()) / self.total,
            "probe_ppl": score.ppl, "probe_kl": score.kl, "checkpoint_ppl": ref.ppl, "checkpoint_kl": ref.kl,
            "rise": math.exp(score.nll - ref.nll) - 1, "threshold": self.cfg.threshold,
            "rationale": plan.rationale if plan else "", "llm_reflection": plan.reflection if plan else "",
            "params": dict(plan.params) if plan else {},
            "group_sparsity": {r["group"]: r["sparsity"] for r in self.profile.group_table(ratios)},
            "seconds": time.perf_counter() - t0,
        }

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.record:
            self.record(row)


def _propose(strategist: Strategist, fallback: Strategist | None, ctx: StepContext, infos: list[LinearInfo],
             profile: SensitivityProfile, current: dict[str, float]) -> tuple[SparsityPlan | None, str, dict[str, float]]:
    plan, used = strategist.propose(ctx), strategist.name
    try:
        return plan, used, resolve(plan, infos, profile.groups, fallback=current) if plan else {}
    except Exception as exc:  # a plan that slipped past validation: the fallback decides, and we say so
        if fallback is None:
            raise
        plan, used = fallback.propose(ctx), f"{fallback.name} (fallback: {exc})"
        return plan, used, resolve(plan, infos, profile.groups, fallback=current) if plan else {}


def run_loop(
    model: nn.Module,
    bank: WandaBank,
    infos: list[LinearInfo],
    profile: SensitivityProfile,
    strategist: Strategist,
    probe: Probe | torch.Tensor,
    cfg: LoopConfig,
    fallback: Strategist | None = None,
    record: Callable[[dict[str, Any]], None] | None = None,
) -> LoopResult:
    bank.restore()
    if not isinstance(probe, Probe):
        probe = Probe(model, probe, cfg.batch_size)
    log = _Attempts(profile, infos, cfg, record)
    seen: dict[tuple[int, ...], ProbeScore] = {}  # a repeated allocation (deterministic strategists) is not re-probed

    def measure(counts: dict[str, int]) -> ProbeScore:
        key = tuple(counts[i.name] for i in infos)
        if key not in seen:
            bank.apply(counts)
            seen[key] = probe.measure(model)
        return seen[key]

    current: dict[str, float] = {i.name: 0.0 for i in infos}
    current_counts: dict[str, int] = {i.name: 0 for i in infos}
    ckpt = probe.dense
    step, in_a_row, rollbacks = cfg.step, 0, 0
    best_rejected: tuple[ProbeScore, dict[str, int]] | None = None
    target_count = int(round(cfg.target * log.total))

    # ramp: climb to the target in accepted steps
    ramp_iters = 0
    while sum(current_counts.values()) < target_count:
        ramp_iters += 1
        now = global_sparsity(current, infos)
        last_call = ramp_iters >= cfg.max_iters
        level = cfg.target if last_call else min(now + step, cfg.target)
        ctx = StepContext(profile, infos, cfg.target, level, dict(current), list(log.rows), phase="ramp")
        t0 = time.perf_counter()
        plan, used, desired = _propose(strategist, fallback, ctx, infos, profile, current)
        if plan is None:  # a strategist with no opinion on the ramp: climb uniformly
            desired = {i.name: level for i in infos}
        counts = project(desired, infos, level, floor=current, ceiling=MAX_RATIO)
        score = measure(counts)
        row = log.row("ramp", used, plan, now, level, counts, score, ckpt, t0)
        row["groups_pushed"] = pushed = _groups_pushed(profile, current, counts_to_ratios(counts, infos))
        if row["rise"] <= cfg.threshold or last_call:
            verdict = "accept" if row["rise"] <= cfg.threshold else "forced"
            current, current_counts, ckpt, in_a_row, best_rejected = counts_to_ratios(counts, infos), counts, score, 0, None
        else:
            rollbacks += 1
            in_a_row += 1
            row["reflection"] = (
                f"rolled back: probe perplexity rose {row['rise']:.1%} (> {cfg.threshold:.0%}) going "
                f"{now:.1%} -> {level:.1%}; groups pushed hardest: {', '.join(pushed) or 'none'}"
            )
            if best_rejected is None or score.nll < best_rejected[0].nll:
                best_rejected = (score, counts)
            verdict = "rollback"
            if in_a_row >= cfg.patience:
                step /= 2
                in_a_row = 0
                row["reflection"] += f"; step halved to {step:.3f}"
                if step < cfg.min_step and best_rejected is not None:
                    # cannot make smaller progress usefully: keep the least-bad candidate
                    ckpt, current_counts = best_rejected
                    current = counts_to_ratios(current_counts, infos)
                    verdict, best_rejected = "rollback; best candidate forced", None
                    step = cfg.min_step
            bank.apply(current_counts)
        row["verdict"] = verdict
        log.add(row)

    best_counts, best = current_counts, ckpt
    uniform_score: ProbeScore | None = None
    if cfg.refine_iters > 0:
        # reference: uniform at the target, so the result is never worse than uniform on the probe
        t0 = time.perf_counter()
        uniform = project({}, infos, cfg.target)
        if uniform != best_counts:
            uniform_score = measure(uniform)
            row = log.row("reference", "uniform", None, cfg.target, cfg.target, uniform, uniform_score, best, t0)
            row["rationale"] = "reference candidate: every layer at the target"
            row["verdict"] = "accept" if uniform_score.kl < best.kl else "rollback"
            if uniform_score.kl < best.kl:
                best_counts, best = uniform, uniform_score
            log.add(row)
        else:
            uniform_score = best

    # refine: re-allocate at the target, keep the best by probe KL
    for _ in range(cfg.refine_iters):
        best_ratios = counts_to_ratios(best_counts, infos)
        ctx = StepContext(profile, infos, cfg.target, cfg.target, best_ratios, list(log.rows), phase="refine")
        t0 = time.perf_counter()
        plan, used, desired = _propose(strategist, fallback, ctx, infos, profile, best_ratios)
        if plan is None:
            break  # the strategist has nothing more to try
        counts = project(desired, infos, cfg.target, ceiling=MAX_RATIO)
        if counts == best_counts:
            row = log.row("refine", used, plan, cfg.target, cfg.target, counts, best, best, t0)
            row["verdict"], row["reflection"] = "repeat", "same allocation as the best so far; not measured again"
            log.add(row)
            continue
        score = measure(counts)
        row = log.row("refine", used, plan, cfg.target, cfg.target, counts, score, best, t0)
        if score.kl < best.kl:
            row["verdict"] = "accept"
            best_counts, best = counts, score
        else:
            rollbacks += 1
            row["verdict"] = "rollback"
            row["reflection"] = (f"rolled back: probe KL {score.kl:.4f} is not below the best so far ({best.kl:.4f}); "
                                 f"perplexity {score.ppl:.2f} vs {best.ppl:.2f}")
        log.add(row)

    bank.apply(best_counts)
    return LoopResult(best_counts, log.rows, rollbacks, probe.dense, best, uniform_score)


def probe_costs(
    model: nn.Module,
    bank: WandaBank,
    infos: list[LinearInfo],
    profile: SensitivityProfile,
    probe: Probe,
    target: float,
    delta: float = 0.1,
    blocks: bool = True,
) -> None:
    """Measure marginal costs at the uniform target: probe-KL rise per 1% of global sparsity moved into one
    group (and, with `blocks`, one decoder block), raised from target to target+delta with every other
    layer at the target. Fills profile.group_probe / block_probe / probe_base_kl / probe_delta."""
    total = sum(i.params for i in infos)
    uniform = {i.name: int(round(target * i.params)) for i in infos}
    bank.apply(uniform)
    base = probe.measure(model).kl
    hi = min(target + delta, MAX_RATIO)

    def cost(members: set[str]) -> float:
        trial = {i.name: (int(round(hi * i.params)) if i.name in members else uniform[i.name]) for i in infos}
        bank.apply(trial)
        rise = probe.measure(model).kl - base
        moved = sum(i.params for i in infos if i.name in members) * (hi - target) / total * 100
        return rise / moved if moved else 0.0

    profile.group_probe = {g: cost(set(names)) for g, names in profile.groups.items()}
    if blocks:
        by_block: dict[int, set[str]] = {}
        for i in infos:
            by_block.setdefault(i.block, set()).add(i.name)
        profile.block_probe = {b: cost(names) for b, names in sorted(by_block.items())}
    bank.restore()
    profile.probe_base_kl, profile.probe_delta = base, hi - target
