"""Single-shot structured pruning to a budget: profile -> project -> apply -> verify -> measure -> save."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .allocation import Allocation
from .budget import Budget, ResolvedBudget, format_metric
from .engines.artifact import export_program, save_pruned, write_atomic
from .engines.structured import VerificationError, apply_allocation, verify_runs
from .errors import BudgetError, PlanError, PrunepilotError
from .inputs import call, output_signature
from .evaluate.speed import compare_latency
from .plan import Plan
from .profile import build_profile, model_size_mb
from .projector import STATIC_METRICS, Projection, Projector
from .results import build_result, files_on_disk_mb, write_json_atomic, write_text_atomic
from .sources.models import LoadedModel
from .structure import detach_caches, family_of

MAX_ISOLATION_TRIALS = 24  # prune-and-run trials spent finding groups that break the model (bounded work)


def count_real(model: nn.Module, example_input) -> dict[str, float]:
    import torch_pruning as tp

    detach_caches(model)  # the counter deep-copies the model
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    return {"macs": float(macs), "params": float(params)}


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy that works on models holding cached graph tensors (LeViT, EfficientFormer)."""
    detach_caches(model)
    return copy.deepcopy(model)


class UnappliedGroups(Exception):
    def __init__(self, groups: list[str]) -> None:
        super().__init__(f"torch-pruning left {len(groups)} groups whole: {', '.join(groups[:5])}")
        self.groups = groups


def unapplied_groups(model: nn.Module, structure, alloc: Allocation) -> list[str]:
    """Groups the allocation narrows whose root layer kept its dense width (torch-pruning skipped the group)."""
    modules = dict(model.named_modules())
    out = []
    for name, kept in alloc.kept.items():
        g = structure.groups.get(name)
        m = modules.get(name)
        if g is None or m is None or g.num_heads or kept >= g.units:
            continue
        width = getattr(m, "out_channels", getattr(m, "out_features", None))
        if width == g.width:
            out.append(name)
    return out


def inconsistent_groups(model: nn.Module, example_input, structure, cost, alloc: Allocation, tol: float = 0.05) -> list[str]:
    """Groups touching a conv/linear whose realised MACs differ from what the allocation predicts for it."""
    from torch_pruning.utils.op_counter import count_ops_and_params, is_supported_instance

    from .costmodel import _phi

    detach_caches(model)
    total, _, layer, _ = count_ops_and_params(model, example_input, layer_wise=True)
    real = {n: float(layer.get(m) or 0.0) for n, m in model.named_modules()}
    frac = alloc.fractions(structure)
    # the counter's layer flops are summed over the batch, its total is per sample: the same normalisation
    # as the cost model's (a ratio of dense to pruned totals here would flag every pruned group)
    raw = sum(float(layer.get(m) or 0.0) for m in model.modules() if is_supported_instance(m))
    per_sample = float(total) / raw if raw else 1.0
    bad: set[str] = set()
    for n, dense in cost.module_macs.items():
        d = structure.modules[n]
        if d.kind == "depthwise":  # one kernel per output channel: its cost follows the output width
            want = dense * (_phi(d.out_groups, d.out_dim, frac) if d.out_groups else _phi(d.in_groups, d.in_dim, frac))
        else:
            want = dense * _phi(d.in_groups, d.in_dim, frac) * _phi(d.out_groups, d.out_dim, frac)
        got = real.get(n, 0.0) * per_sample
        if dense and abs(got - want) > tol * max(want, got) and abs(got - want) > 1e-4 * cost.dense_macs:
            bad |= {g for g in (*d.in_groups, *d.out_groups) if g in structure.groups and (alloc.kept.get(g, 0) < structure.groups[g].units)}
    return sorted(bad)


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


@dataclass
class Candidate:
    model: nn.Module
    projection: Projection
    metrics: dict[str, float]  # real counts
    corrections: int
    plan: Plan | None = None  # the plan as applied (user constraints merged)


class Pruner:
    """Holds the dense model's analysis once; builds verified candidates for any plan. A family of groups whose
    pruning breaks the model (a construct torch-pruning cannot follow) is found by bisection, protected with the
    reason in `structure.ignored`, and the plan re-projected without it."""

    def __init__(self, loaded: LoadedModel, *, protected: list[str] | None = None, latency_runs: int = 5) -> None:
        self.loaded = loaded
        self.dense = loaded.module
        self.x = loaded.example_input
        try:
            self.profile, self.structure, self.cost = build_profile(
                self.dense, self.x, uri=loaded.uri, protected=protected, latency_runs=latency_runs
            )
        except PrunepilotError:
            raise
        except Exception as exc:  # noqa: BLE001 - a model torch-pruning cannot trace: one line, not a traceback
            raise PlanError(f"structural analysis of {loaded.uri or type(self.dense).__name__} failed (torch-pruning "
                            "could not trace it on the example input)", _one_line(exc),
                            "check --input-shape / the example input, or protect the layer the error names") from None
        self.projector = Projector(self.structure, self.cost)
        with torch.no_grad():
            out = call(self.dense, self.x)
        self.out_signature = output_signature(out)
        self.out_shape = out.shape if isinstance(out, torch.Tensor) else self.out_signature
        self.isolation_trials = 0

    def protect_group(self, name: str, reason: str) -> None:
        if name in self.structure.groups:
            del self.structure.groups[name]
            self.structure.ignored[name] = reason
            self.profile.groups = [g for g in self.profile.groups if g.name != name]

    def protect_family(self, family: str, reason: str) -> list[str]:
        """Leave a family's groups out of every later projection, with the reason the report shows."""
        names = [n for n, g in self.structure.groups.items() if g.family == family]
        for n in names:
            del self.structure.groups[n]
            self.structure.ignored[n] = reason
        self.profile.groups = [g for g in self.profile.groups if g.name not in names]
        return names

    def _build(self, alloc: Allocation, plan: Plan, calibration) -> nn.Module:
        model = copy_model(self.dense)
        apply_allocation(model, self.x, self.structure, alloc, importance=plan.importance, calibration=calibration)
        model.eval()
        skipped = unapplied_groups(model, self.structure, alloc)
        if skipped:
            raise UnappliedGroups(skipped)
        verify_runs(model, self.x, self.out_signature)
        return model

    def _trial(self, alloc: Allocation, families: list[str], plan: Plan, calibration) -> str | None:
        """Prune only `families` (others kept whole) and run: the failure text, or None when it works."""
        keep = set(families)
        st = self.structure
        sub = Allocation({g: (k if st.groups[g].family in keep else st.groups[g].units) for g, k in alloc.kept.items()},
                         {g: h for g, h in alloc.heads.items() if st.groups[g].family in keep}, alloc.skip)
        self.isolation_trials += 1
        try:
            self._build(sub, plan, calibration if plan.importance == "taylor" else None)
        except Exception as exc:  # noqa: BLE001
            return _one_line(exc)
        return None

    def _isolate(self, alloc: Allocation, plan: Plan, calibration, error: str) -> tuple[str, str]:
        """Bisect the pruned families down to one whose pruning alone breaks the model."""
        st = self.structure
        if alloc.skip:  # the blocks alone first: a family must not be blamed for what the skip broke
            self.isolation_trials += 1
            try:
                self._build(Allocation({}, {}, alloc.skip), plan, None)
            except Exception as exc:  # noqa: BLE001
                raise VerificationError(f"skipping {', '.join(alloc.skip)} breaks the model: {_one_line(exc)}. Fix: "
                                        "leave these blocks out of the plan's skip") from None
        pruned = sorted({st.groups[g].family for g, k in alloc.kept.items() if k < st.groups[g].units}
                        | {st.groups[g].family for g, h in alloc.heads.items() if h < st.groups[g].num_heads})
        cands, why = pruned, error
        while len(cands) > 1 and self.isolation_trials < MAX_ISOLATION_TRIALS:
            half = cands[: len(cands) // 2]
            err = self._trial(alloc, half, plan, calibration)
            if err is not None:
                cands, why = half, err
            else:  # the other half holds it (or the failure needs both halves: narrowed further anyway)
                cands = cands[len(cands) // 2:]
        if len(cands) > 1:
            raise VerificationError(f"pruning breaks the model and the {len(cands)} families left could not be told "
                                    f"apart within {MAX_ISOLATION_TRIALS} trials ({', '.join(cands[:5])}...): {error}")
        return cands[0], why

    def candidate(
        self,
        plan: Plan,
        budget: ResolvedBudget,
        *,
        calibration: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        max_corrections: int = 3,
    ) -> Candidate:
        """Project `plan` onto the budget, prune a fresh copy, and verify the real counts (correcting the
        analytic goal by the measured ratio when the two disagree). A group family that breaks the model is
        protected (named in `structure.ignored`) and the plan re-projected."""
        # a protected name the structure already left out (Pruner(protected=...)) is known, not a typo
        plan = self._known_names(plan)
        goals = dict(budget.goals)
        corrections = 0
        while True:
            rb = ResolvedBudget(goals=goals, band=budget.band, texts=budget.texts)
            proj = self.projector.project(plan, rb)
            try:
                model = self._build(proj.allocation, plan, calibration)
            except UnappliedGroups as exc:  # torch-pruning silently left them whole: protect them, re-project
                for g in exc.groups:
                    self.protect_group(g, "protected: torch-pruning leaves this group unpruned (its channels are coupled "
                                          "through an operation it cannot split, e.g. an in-place write into a slice)")
                plan = self._known_names(plan)
                continue
            except Exception as exc:  # noqa: BLE001 - find the family that broke it, protect it, re-project
                if not self.structure.groups or self.isolation_trials >= MAX_ISOLATION_TRIALS:
                    raise VerificationError(f"the pruned model fails verification: {_one_line(exc)}") from None
                family, why = self._isolate(proj.allocation, plan, calibration, _one_line(exc))
                self.protect_family(family, f"protected: pruning it breaks the model ({why[:160]})")
                plan = self._known_names(plan)
                continue
            real = count_real(model, self.x)
            if "macs" in budget.goals and abs(real["macs"] - proj.predicted["macs"]) > 0.02 * real["macs"]:
                bad = inconsistent_groups(model, self.x, self.structure, self.cost.without(proj.allocation.skip),
                                          proj.allocation)
                if bad:  # torch-pruning cut these groups differently from the plan: protect them, re-project
                    for g in bad:
                        self.protect_group(g, "protected: torch-pruning prunes this group inconsistently (realised "
                                              "layer widths differ from the plan; coupled through ops it cannot split)")
                    plan = self._known_names(plan)
                    continue
            static = [m for m in STATIC_METRICS if m in budget.goals]
            off = [m for m in static if abs(budget.error(m, real[m])) > 0.004 and abs(real[m] - proj.predicted[m]) / real[m] > 1e-4]
            if not off or corrections >= max_corrections or not proj.feasible:
                if not proj.feasible and corrections:  # the reason's percentages are against the rescaled goal
                    scaled = ", ".join(f"{m} x{goals[m] / budget.goals[m]:.3f}" for m in goals if goals[m] != budget.goals[m])
                    proj.reason += (f" (after {corrections} correction(s) the goal was rescaled by the ratio of the analytic "
                                    f"to the real count, {scaled}: the cost model does not follow some operations of "
                                    "this model, so the percentages above are of that rescaled goal)")
                return Candidate(model, proj, real, corrections, plan)
            for m in off:  # analytic and real counts differ slightly (uncounted ops): retarget by the ratio
                goals[m] = goals[m] * proj.predicted[m] / real[m]
            corrections += 1

    def _known_names(self, plan: Plan) -> Plan:
        """Drop plan entries for layers the structure left out (protected by the user or after a failed
        verification): they are known names, not typos; then check the rest."""
        def known(p: str) -> bool:
            return p in self.structure.ignored or (p.startswith("re:") and any(re.search(p[3:], n) for n in self.structure.ignored))
        fams = set(self.structure.families)
        gone = {n for n in self.structure.ignored} | {family_of(n) for n in self.structure.ignored}
        ratios = {k: v for k, v in plan.ratios.items() if not (k in gone and k not in self.structure.groups and k not in fams)}
        if ratios != plan.ratios:
            plan = plan.model_copy(update={"ratios": ratios})
        plan.model_copy(update={"protected": [p for p in plan.protected if not known(p)]}).check_names(
            list(self.structure.groups), list(self.structure.families), blocks=list(self.structure.blocks))
        return plan


def check_reachable(pruner: Pruner, plan: Plan, rb: ResolvedBudget) -> None:
    """An unreachable budget stops before anything is pruned, with the nearest reachable point."""
    proj = pruner.projector.project(plan, rb)
    if not proj.feasible and "unreachable" in proj.reason:
        raise BudgetError(proj.reason.rstrip("."))


def out_of_band_reason(cand: Candidate, rb: ResolvedBudget, comp: dict[str, Any]) -> str:
    """Why a finished result is outside the band (result.json, summary and the exit code say so)."""
    parts = [f"{m} {rb.error(m, comp[m]):+.2%} vs the target" for m in rb.goals if comp.get(m) is not None and not rb.within(m, comp[m])]
    why = cand.projection.reason or (
        f"the real count differs from the analytic prediction after {cand.corrections} corrections (operations the "
        "cost model does not follow)")
    return f"outside the band: {', '.join(parts)}; {why}. Fix: widen --tolerance, protect the layers listed, or give a --plan"


def save_model(model: nn.Module, example_input: torch.Tensor, out: Path, *, record: dict[str, Any] | None = None,
               pickle_module: bool = False, program: nn.Module | None = None) -> dict[str, Any]:
    """With a `record` (see engines.artifact.save_pruned): model.safetensors + structure.json + model.pt2, no
    pickle unless `pickle_module`. Without one (a caller that cannot describe the structure yet): the pickled
    full module model.pt (reload with prunepilot or weights_only=False) and model.pt2 where torch.export works."""
    if record is not None:
        return save_pruned(model, example_input, out, record=record, pickle_module=pickle_module, program=program)
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
    check_reachable(pruner, plan, rb)
    cand = pruner.candidate(plan, rb)
    if not cand.projection.feasible and "unreachable" in cand.projection.reason:
        # groups protected on the way (they broke the model) left too little to prune
        raise BudgetError(cand.projection.reason.rstrip("."))
    lat = compare_latency({"dense": pruner.dense, "compressed": cand.model}, pruner.x, rounds=latency_rounds)
    result = write_candidate(loaded, pruner, plan, cand, rb, out, lat["dense"].median_ms, lat["compressed"].median_ms,
                             cand.metrics, t0)
    return (result, cand.model) if return_model else result


def write_candidate(loaded: LoadedModel, pruner: Pruner, plan: Plan, cand: Candidate, rb: ResolvedBudget, out: Path,
                    dense_ms: float, comp_ms: float, counts: dict[str, float], t0: float, *,
                    reason: str | None = None, summary_extra: Callable[[dict[str, Any]], str] | None = None,
                    **extra: Any) -> dict[str, Any]:
    """Judge one measured candidate against the budget, save it (safetensors + structure.json + pt2), and write
    plan.json, result.json and summary.md. `reason` replaces the default out-of-band explanation (the errors are
    appended to it)."""
    profile = pruner.profile
    dense_block = measure_block(pruner.dense, pruner.x, {"macs": profile.dense["macs"], "params": profile.dense["params"]}, dense_ms)
    comp_block = measure_block(cand.model, pruner.x, counts, comp_ms)
    if "latency_predicted_ms" in cand.metrics:  # a latency-targeted candidate: what its tables predicted
        comp_block["latency_predicted_ms"] = cand.metrics["latency_predicted_ms"]
    errors = {m: rb.error(m, comp_block[m]) for m in rb.goals if comp_block.get(m) is not None}
    within = all(rb.within(m, comp_block[m]) for m in errors)
    alloc = cand.projection.allocation
    # a module handed in from Python has no spec: weights + pt2 are still written, pickle-free
    record = {"model": loaded.spec.model_dump() if loaded.spec else None,
              "allocation": alloc.to_json(), "protected": plan.protected}
    export = save_model(cand.model, pruner.x, out, record=record)
    comp_block["files_mb"] = files_on_disk_mb(out, export)
    projected = plan.model_copy(update={"ratios": cand.projection.ratios(pruner.structure), "default_ratio": 0.0})
    write_json_atomic(out / "plan.json", {"requested": plan.model_dump(), "projected": projected.model_dump()})
    if not within:  # commands/prune exits 3 with it
        extra["reason"] = (f"{reason} ({', '.join(f'{m} {e:+.2%}' for m, e in errors.items())})" if reason
                           else out_of_band_reason(cand, rb, comp_block))
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
        widths={g: list(w) for g, w in alloc.widths(pruner.structure).items()},
        blocks_removed=list(alloc.skip),
        skipped=profile.ignored,
        export=export,
        seconds=time.perf_counter() - t0,
        **extra,
    )
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result) + (summary_extra(result) if summary_extra else ""))
    return result


def summary_markdown(r: dict[str, Any]) -> str:
    lines = [f"# prunepilot {r['kind']}: {r['model']}", ""]
    targets = r["budget"]["targets"]
    band = r["budget"]["band"]
    parts = [f"{m} {t['text']} (= {format_metric(m, t['goal'])})" for m, t in targets.items()]
    lines.append(f"Budget: {', '.join(parts)}, band +{band['over']:.1%}/-{band['under']:.1%}")
    lines.append(f"Within band: **{'yes' if r['within_band'] else 'no'}**")
    if not r["within_band"] and r.get("reason"):
        lines.append(f"Why: {r['reason']}")
    lines.append("")
    lines.append("| metric | dense | compressed | ratio |")
    lines.append("|---|---|---|---|")
    for m in ("macs", "params", "latency_ms", "size_mb", "memory_mb", "accuracy", "mse", "perplexity"):
        d, c = r["dense"].get(m), r["compressed"].get(m)
        if d is None or c is None:
            continue
        ratio = f"{c / d:.3f}" if d else "–"  # a dense accuracy of 0 has no ratio
        lines.append(f"| {m} | {format_metric(m, d)} | {format_metric(m, c)} | {ratio} |")
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
    if r.get("blocks_removed"):
        lines.append("")
        lines.append(f"Residual blocks removed (replaced by the identity, {len(r['blocks_removed'])}): "
                     + ", ".join(f"`{b}`" for b in r["blocks_removed"]))
    if r.get("skipped"):
        lines.append("")
        lines.append("Layers not pruned:")
        lines += [f"- `{k}`: {v}" for k, v in r["skipped"].items()]
    if r.get("export"):
        e = r["export"]
        lines.append("")
        lines.append(f"Saved: `{e.get('module')}` (full module)" + (f", `{e['exported_program']}` (torch.export)" if e.get("exported_program") else f"; torch.export failed: {e.get('export_error')}"))
    return "\n".join(lines) + "\n"
