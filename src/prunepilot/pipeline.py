"""Single-shot structured pruning to a budget: profile -> project -> apply -> verify -> measure -> save."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .budget import Budget, ResolvedBudget, format_metric
from .engines.artifact import export_program, save_pruned, write_atomic
from .engines.structured import apply_allocation, verify_runs
from .evaluate.speed import compare_latency
from .plan import Plan
from .profile import build_profile, model_size_mb
from .projector import STATIC_METRICS, Projection, Projector
from .results import build_result, write_json_atomic, write_text_atomic
from .sources.models import LoadedModel


def count_real(model: nn.Module, example_input: torch.Tensor) -> dict[str, float]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs": float(macs), "params": float(params)}


@dataclass
class Candidate:
    model: nn.Module
    projection: Projection
    metrics: dict[str, float]  # real counts
    corrections: int
    plan: Plan | None = None  # the plan as applied (user constraints merged)


class Pruner:
    """Holds the dense model's analysis once; builds verified candidates for any plan."""

    def __init__(self, loaded: LoadedModel, *, protected: list[str] | None = None, latency_runs: int = 5) -> None:
        self.loaded = loaded
        self.dense = loaded.module
        self.x = loaded.example_input
        self.profile, self.structure, self.cost = build_profile(
            self.dense, self.x, uri=loaded.uri, protected=protected, latency_runs=latency_runs
        )
        self.projector = Projector(self.structure, self.cost)
        with torch.no_grad():
            self.out_shape = self.dense(self.x).shape

    def candidate(
        self,
        plan: Plan,
        budget: ResolvedBudget,
        *,
        calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        max_corrections: int = 3,
    ) -> Candidate:
        """Project `plan` onto the budget, prune a fresh copy, and verify the real counts (correcting the
        analytic goal by the measured ratio when the two disagree)."""
        # a protected name the structure already left out (Pruner(protected=...)) is known, not a typo
        structural = [p for p in plan.protected if p in self.structure.ignored or (
            p.startswith("re:") and any(re.search(p[3:], n) for n in self.structure.ignored))]
        plan.model_copy(update={"protected": [p for p in plan.protected if p not in structural]}).check_names(
            list(self.structure.groups), list(self.structure.families))
        goals = dict(budget.goals)
        corrections = 0
        while True:
            rb = ResolvedBudget(goals=goals, band=budget.band, texts=budget.texts)
            proj = self.projector.project(plan, rb)
            model = copy.deepcopy(self.dense)
            apply_allocation(model, self.x, self.structure, proj.allocation, importance=plan.importance, calibration=calibration)
            model.eval()
            verify_runs(model, self.x, self.out_shape)
            real = count_real(model, self.x)
            static = [m for m in STATIC_METRICS if m in budget.goals]
            off = [m for m in static if abs(budget.error(m, real[m])) > 0.004 and abs(real[m] - proj.predicted[m]) / real[m] > 1e-4]
            if not off or corrections >= max_corrections or not proj.feasible:
                return Candidate(model, proj, real, corrections, plan)
            for m in off:  # analytic and real counts differ slightly (uncounted ops): retarget by the ratio
                goals[m] = goals[m] * proj.predicted[m] / real[m]
            corrections += 1


def save_model(model: nn.Module, example_input: torch.Tensor, out: Path, *, record: dict[str, Any] | None = None,
               pickle_module: bool = False) -> dict[str, Any]:
    """With a `record` (see engines.artifact.save_pruned): model.safetensors + structure.json + model.pt2, no
    pickle unless `pickle_module`. Without one (a caller that cannot describe the structure yet): the pickled
    full module model.pt (reload with prunepilot or weights_only=False) and model.pt2 where torch.export works."""
    if record is not None:
        return save_pruned(model, example_input, out, record=record, pickle_module=pickle_module)
    write_atomic(out / "model.pt", lambda p: torch.save(model, p))
    return {"module": "model.pt", **export_program(model, example_input, out)}


def measure_block(model: nn.Module, x: torch.Tensor, counts: dict[str, float], latency_ms: float | None) -> dict[str, Any]:
    return {
        "macs": counts["macs"],
        "params": counts["params"],
        "latency_ms": latency_ms,
        "size_mb": model_size_mb(model),
    }


def run_prune(
    loaded: LoadedModel,
    budget: Budget,
    plan: Plan,
    out: Path,
    *,
    latency_rounds: int = 10,
    return_model: bool = False,
) -> Any:
    """The `prunepilot prune` job without an agent loop: one plan, projected exactly, applied and saved.
    Returns result.json's content, or (result, pruned model) with `return_model`."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pruner = Pruner(loaded, protected=plan.protected)
    profile = pruner.profile
    rb = budget.resolve(profile.dense)
    write_json_atomic(out / "profile.json", profile.to_json())
    cand = pruner.candidate(plan, rb)
    lat = compare_latency({"dense": pruner.dense, "compressed": cand.model}, pruner.x, rounds=latency_rounds)
    dense_block = measure_block(pruner.dense, pruner.x, {"macs": profile.dense["macs"], "params": profile.dense["params"]}, lat["dense"].median_ms)
    comp_block = measure_block(cand.model, pruner.x, cand.metrics, lat["compressed"].median_ms)
    errors = {m: rb.error(m, comp_block[m]) for m in rb.goals if comp_block.get(m) is not None}
    within = all(rb.within(m, comp_block[m]) for m in errors)
    alloc = cand.projection.allocation
    # a module handed in from Python has no spec: weights + pt2 are still written, pickle-free
    record = {"model": loaded.spec.model_dump() if loaded.spec else None,
              "allocation": {"kept": alloc.kept, "heads": alloc.heads}, "protected": plan.protected}
    export = save_model(cand.model, pruner.x, out, record=record)
    projected = plan.model_copy(update={"ratios": cand.projection.ratios(pruner.structure), "default_ratio": 0.0})
    write_json_atomic(out / "plan.json", {"requested": plan.model_dump(), "projected": projected.model_dump()})
    result = build_result(
        kind="prune",
        model=loaded.uri,
        budget=rb.to_json(),
        dense=dense_block,
        compressed=comp_block,
        within_band=within,
        errors=errors,
        projection={**cand.projection.to_json(pruner.structure), "corrections": cand.corrections},
        speedup=dense_block["latency_ms"] / comp_block["latency_ms"] if comp_block["latency_ms"] else None,
        ideal_speedup=dense_block["macs"] / comp_block["macs"],
        widths={g: list(w) for g, w in cand.projection.allocation.widths(pruner.structure).items()},
        skipped=profile.ignored,
        export=export,
        seconds=time.perf_counter() - t0,
    )
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result))
    return (result, cand.model) if return_model else result


def summary_markdown(r: dict[str, Any]) -> str:
    lines = [f"# prunepilot {r['kind']}: {r['model']}", ""]
    targets = r["budget"]["targets"]
    band = r["budget"]["band"]
    parts = [f"{m} {t['text']} (= {format_metric(m, t['goal'])})" for m, t in targets.items()]
    lines.append(f"Budget: {', '.join(parts)}, band +{band['over']:.1%}/-{band['under']:.1%}")
    lines.append(f"Within band: **{'yes' if r['within_band'] else 'no'}**")
    lines.append("")
    lines.append("| metric | dense | compressed | ratio |")
    lines.append("|---|---|---|---|")
    for m in ("macs", "params", "latency_ms", "size_mb", "memory_mb", "accuracy", "perplexity"):
        d, c = r["dense"].get(m), r["compressed"].get(m)
        if d is None or c is None:
            continue
        lines.append(f"| {m} | {format_metric(m, d)} | {format_metric(m, c)} | {c / d:.3f} |")
    if r.get("errors"):
        lines.append("")
        lines.append("Budget errors: " + ", ".join(f"{m} {e:+.3%}" for m, e in r["errors"].items()))
    if r.get("speedup"):
        ideal = f"; MAC ratio {r['ideal_speedup']:.2f}x" if r.get("ideal_speedup") else ""
        lines.append(f"CPU speed-up (side by side, {r['environment']['threads']} threads): {r['speedup']:.2f}x{ideal}")
    if r.get("projection"):
        p = r["projection"]
        if p.get("seconds") is not None:
            lines.append(f"Projection: {p['iterations']} evaluations in {p['seconds']:.2f} s, {p.get('corrections', 0)} real-count corrections. {p.get('reason', '')}")
    if r.get("skipped"):
        lines.append("")
        lines.append("Layers not pruned:")
        lines += [f"- `{k}`: {v}" for k, v in r["skipped"].items()]
    if r.get("export"):
        e = r["export"]
        lines.append("")
        lines.append(f"Saved: `{e.get('module')}` (full module)" + (f", `{e['exported_program']}` (torch.export)" if e.get("exported_program") else f"; torch.export failed: {e.get('export_error')}"))
    return "\n".join(lines) + "\n"
