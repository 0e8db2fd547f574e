"""Joint pruning + quantization under one budget (memory, latency, MACs, params, size).

For each quantization option (none; int8 dynamic on the layers the profiling heuristic selects) the amount of
pruning is the knob: knob k removes a fraction k of the MACs (projected exactly), then the option is applied.
Measured targets (latency, memory) are bracketed with real measurements, keeping the least-compressed feasible
point; every probe is kept as a point of the accuracy-latency-memory trade-off. With data, the feasible
candidates are ranked by accuracy after BN recalibration and a short fine-tune; without, by fidelity-free
compression order (least pruning wins)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .budget import Budget, ResolvedBudget
from .engines.quantize import layer_rows, quantize_, select_layers_auto
from .evaluate.measured_budget import bracket_measured_target
from .evaluate.memory import peak_activation_bytes, state_dict_bytes
from .evaluate.speed import compare_latency, measure_latency
from .pipeline import Pruner, count_real, summary_markdown
from .plan import Plan
from .profile import model_size_mb
from .results import build_result, write_json_atomic, write_text_atomic
from .sources.models import LoadedModel

MAX_KNOB = 0.85


def memory_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Serialized weights + peak activation bytes (hook-based: quiet and deterministic), in MiB."""
    return (state_dict_bytes(model) + peak_activation_bytes(model, x, method="hooks").peak_bytes) / 2**20


def _metrics(model: nn.Module, x: torch.Tensor, need: set[str], latency_runs: int) -> dict[str, float]:
    out: dict[str, float] = {"size_mb": model_size_mb(model)}
    if "memory_mb" in need:
        out["memory_mb"] = memory_mb(model, x)
    if "latency_ms" in need:
        out["latency_ms"] = measure_latency(model, x, warmup=2, runs=latency_runs).median_ms
    return out


def run_compress(
    loaded: LoadedModel,
    budget: Budget,
    out: Path,
    *,
    data_spec: str | None = None,
    plan: Plan | None = None,
    quant_options: tuple[str, ...] = ("none", "int8_dynamic"),
    finetune_steps: int = 40,
    latency_runs: int = 5,
    log: Callable[[str], None] = print,
    evaluate: Callable[[nn.Module], float] | None = None,
    return_model: bool = False,
    preprocess: Any = None,
) -> Any:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plan = plan or Plan(round_to=8)
    pruner = Pruner(loaded, latency_runs=latency_runs)
    x = pruner.x
    dense = pruner.dense
    dense_m = {"macs": pruner.profile.dense["macs"], "params": pruner.profile.dense["params"],
               **_metrics(dense, x, {"memory_mb", "latency_ms"}, latency_runs)}
    rb = budget.resolve(dense_m)
    measured = [m for m in rb.goals if m in ("latency_ms", "memory_mb", "size_mb")]
    static = {m: g for m, g in rb.goals.items() if m in ("macs", "params")}
    write_json_atomic(out / "profile.json", pruner.profile.to_json())

    rows = layer_rows(dense, x)
    auto = select_layers_auto(rows)
    evaluator = None
    if data_spec is not None:  # a data spec, or the user's DataLoaders (sources.user_data.UserData)
        from .evaluate.scoring import Evaluator, ScoringConfig
        from .inputs import tensors
        from .sources.data import load_data

        data = load_data(data_spec, input_shape=tuple(tensors(x)[0].shape[1:]), preprocess=preprocess) if isinstance(data_spec, str) else data_spec
        evaluator = Evaluator(data, dense, ScoringConfig(finetune_steps=finetune_steps, eval_limit=1000),
                              evaluate=evaluate)

    # the least pruning that satisfies the static targets bounds the knob from below
    k_min = 0.0
    if static:
        k_min = max(1 - g / dense_m[m] for m, g in static.items())
        k_min = max(0.0, k_min)

    def build(option: str) -> Callable[[float], nn.Module]:
        def make(knob: float) -> nn.Module:
            knob = max(k_min, knob)
            if knob < 0.005:
                model = copy.deepcopy(dense)
            else:
                goal = ResolvedBudget(goals={"macs": dense_m["macs"] * (1 - knob)}, band=rb.band)
                model = pruner.candidate(plan, goal).model
            if option == "int8_dynamic":
                quantize_(model, {k: v for k, v in auto.plan_map.items() if k in dict(model.named_modules())}, backend="eager", measure_size=False)
            return model

        return make

    def combined(model: nn.Module) -> float:
        m = _metrics(model, x, set(measured), latency_runs)
        return max(m[t] / rb.goals[t] for t in measured) if measured else 0.0

    candidates: list[dict[str, Any]] = []
    tradeoff: list[dict[str, Any]] = []
    for option in quant_options:
        log(f"searching: pruning + {option}")
        make = build(option)
        if measured:
            res = bracket_measured_target(make, combined, 1.0, band=rb.band, lo=k_min, hi=MAX_KNOB, max_measurements=12)
            for p in res.probes:
                tradeoff.append({"option": option, "knob": p.knob, "combined_ratio": p.value})
            if not res.feasible:
                log(f"  {option}: infeasible even at {MAX_KNOB:.0%} MAC reduction")
                continue
            knob, model = res.best.knob, res.best_candidate
        else:
            knob, model = k_min, make(k_min)
        candidates.append({"option": option, "knob": max(k_min, knob), "model": model})

    if not candidates:
        raise RuntimeError("no pruning + quantization combination meets the measured budget; relax the targets")

    scored = []
    for c in candidates:
        model = c["model"]
        # MACs/params describe the float structure (the counter cannot see packed int8 weights)
        m = {**count_real(build("none")(c["knob"]), x), **_metrics(model, x, {"memory_mb"}, latency_runs)}
        if evaluator is not None:
            if c["option"] == "none":
                m.update(evaluator.score(model, finetune_steps))
            else:  # quantized modules do not train: recover the pruned float model, then quantize it again
                float_model = build("none")(c["knob"])
                evaluator.score(float_model, finetune_steps)
                quantize_(float_model, {k: v for k, v in auto.plan_map.items() if k in dict(float_model.named_modules())}, backend="eager", measure_size=False)
                c["model"] = model = float_model
                m.update(evaluator.score(model, 0))
        c["metrics"] = m
        tradeoff.append({"option": c["option"], "knob": c["knob"], "selected_point": True, **m})
        scored.append(c)
        log(f"  {c['option']}: MAC reduction {c['knob']:.1%}, memory {m['memory_mb']:.1f} MB"
            + (f", score {m['score']:.4f}" if "score" in m else ""))
    key = (lambda c: c["metrics"].get("score", 0.0)) if evaluator is not None else (lambda c: -c["knob"])
    best = max(scored, key=key)
    model = best["model"]
    lat = compare_latency({"dense": dense, "compressed": model}, x, rounds=10)
    comp = {**best["metrics"], "latency_ms": lat["compressed"].median_ms, "size_mb": model_size_mb(model)}
    dense_block = {**dense_m, "latency_ms": lat["dense"].median_ms}
    if evaluator is not None:
        dense_q = evaluator.score(copy.deepcopy(dense), 0)
        dense_block.update({k: dense_q[k] for k in ("score", "accuracy", "evaluate") if k in dense_q})
    errors = {m: rb.error(m, comp[m]) for m in rb.goals if m in comp}
    within = all(rb.within(m, comp[m]) if m not in measured else rb.meets_cap(m, comp[m]) for m in errors)
    export = {"module": "model.pt"}
    torch.save(model, out / "model.pt")
    result = build_result(
        kind="compress", model=loaded.uri, budget=rb.to_json(), dense=dense_block, compressed=comp,
        within_band=within, errors=errors, choice={"quantization": best["option"], "mac_reduction": best["knob"]},
        quantized_layers=sorted(auto.plan_map) if best["option"] != "none" else [], tradeoff=tradeoff,
        speedup=dense_block["latency_ms"] / comp["latency_ms"], export=export, skipped=pruner.profile.ignored,
        seconds=time.perf_counter() - t0,
    )
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result))
    from .report.render import render_safely as render

    render(out, log)
    return (result, model) if return_model else result
