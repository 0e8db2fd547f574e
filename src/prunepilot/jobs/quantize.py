"""The quantize job: per-layer dynamic int8 post-training quantization, measured side by side.

`run_quantize(loaded, out=...)` is what `prunepilot quantize` runs; `quantize(model, example_input)` is the
same job for a plain `nn.Module` from Python. Both write result.json, quantization.json, summary.md and
the quantized artefact (float weights + int8 recipe, see `save_quantized`; model.onnx + model.int8.onnx on the
onnx backend) into `out`.
An option the job cannot honour raises a `PrunepilotError` (rule, value, fix); nothing is silently ignored.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Optional

import torch
from torch import nn

from ..errors import PlanError, PrunepilotError
from ..results import build_result, write_json_atomic, write_text_atomic
from ..sources.models import LoadedModel
from ..journal import prepare_out

MB = 1024 * 1024
BACKENDS: tuple[str, ...] = ("eager", "torchao", "onnx")
SCHEMES: tuple[str, ...] = ("int8_dynamic", "int8_weight_only")

Status = Callable[[str], ContextManager[Any]]


def _no_status(_message: str) -> ContextManager[Any]:
    return contextlib.nullcontext()


class OrtModule(nn.Module):
    """An ONNX Runtime session behind nn.Module's call, so evaluation code can score it like a model."""

    def __init__(self, path: Path, threads: int | None = None, device: str | None = "cpu") -> None:
        super().__init__()
        from ..engines.onnx_export import ort_session

        self.sess = ort_session(path, threads=threads, device=device)
        self.input_name = self.sess.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


@dataclass
class _Quantized:
    """What one backend produced: the model to time and score, sizes, the report and the artefacts."""

    qmodel: nn.Module
    timed: dict[str, nn.Module]
    size_dense: int
    size_q: int
    report_json: dict[str, Any]
    artefacts: dict[str, Any]
    mem_dense: dict[str, Any]
    mem_q: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ options


def default_layers(backend: str) -> str:
    """ONNX Runtime packs every MatMul/Gemm (`all`); the torch backends choose by measured latency (`auto`)."""
    return "all" if backend == "onnx" else "auto"


def _check_device(device: str | None, backend: str, scheme: str) -> str:
    from ..device import resolve_device

    cpu_only = backend == "eager" or (backend == "torchao" and scheme == "int8_dynamic")
    raw = (device or "auto").strip().lower()
    if cpu_only and raw == "auto":
        raw = "cpu"
    if cpu_only and raw != "cpu":  # said before any device is looked for: the format decides, not the machine
        raise PlanError("dynamic int8 (int8 weights and activations) is a CPU format: its kernels run on the CPU only",
                        f"--device {device} with --backend {backend} --scheme {scheme}",
                        "use --device cpu, or --backend torchao --scheme int8_weight_only on the GPU, or --backend onnx")
    return str(resolve_device(raw))


def _check_options(loaded: Any, *, layers: str, backend: str, scheme: str, plan_file: Optional[Path],
                   data_limit: int, batch_size: int, rounds: int, compile_: bool) -> None:
    """Refuse every option combination the job cannot honour, before any work is done."""
    if isinstance(loaded, nn.Module):
        raise PrunepilotError("run_quantize takes a LoadedModel (module, example input, uri)", type(loaded).__name__,
                              "call prunepilot.jobs.quantize.quantize(model, example_input, ...) for a plain nn.Module")
    if not isinstance(getattr(loaded, "module", None), nn.Module) or not isinstance(
            getattr(loaded, "example_input", None), torch.Tensor):
        raise PrunepilotError("run_quantize needs a model with a tensor example input", type(loaded).__name__,
                              "pass a prunepilot.sources.models.LoadedModel")
    if backend not in BACKENDS:
        raise PlanError("--backend is eager, torchao or onnx", backend, "use --backend eager (fastest CPU path)")
    if scheme not in SCHEMES:
        raise PlanError("--scheme is int8_dynamic or int8_weight_only", scheme, "use --scheme int8_dynamic")
    if compile_ and backend != "torchao":
        raise PlanError("--compile applies to the torchao backend only", backend, "drop --compile or use --backend torchao")
    if backend == "onnx":
        _check_onnx_options(layers, scheme, plan_file)
    if plan_file is not None and layers != "auto":
        raise PlanError("--plan and --layers both choose the layers; give one of them", f"--layers {layers}",
                        "drop --layers (the plan's 'quantize' map selects the layers) or drop --plan")
    for name, value, least in (("--rounds", rounds, 1), ("--data-limit", data_limit, 0), ("batch_size", batch_size, 1)):
        if value < least:
            raise PlanError(f"{name} must be at least {least}", value, f"use {name} {max(least, 1)} or more")


def _check_onnx_options(layers: str, scheme: str, plan_file: Optional[Path]) -> None:
    """ONNX Runtime dynamic quantization packs every MatMul/Gemm weight with int8 activations: no choices."""
    if plan_file is not None or layers != "all":
        raise PlanError("--backend onnx packs every MatMul/Gemm weight and cannot select layers",
                        f"--plan {plan_file}" if plan_file is not None else f"--layers {layers}",
                        "use --layers all with --backend onnx, or --backend eager for per-layer choices")
    if scheme != "int8_dynamic":
        raise PlanError("--backend onnx quantizes int8_dynamic only", scheme,
                        "use --scheme int8_dynamic, or --backend torchao for int8_weight_only")


def _read_plan_map(plan_file: Path, scheme: str) -> dict[str, str]:
    from ..plan import Plan

    if not plan_file.exists():
        raise PlanError("plan file not found", str(plan_file), "check the path")
    data = json.loads(plan_file.read_text())
    if "requested" in data and "version" not in data:  # a plan.json written by a previous run
        data = data.get("projected") or data["requested"]
    plan = Plan.from_json_text(json.dumps(data))
    if not plan.quantize:
        raise PlanError("the plan has an empty 'quantize' map", str(plan_file),
                        "add e.g. \"quantize\": {\"re:blocks\": \"int8_dynamic\"} or use --layers")
    used = sorted({s for s in plan.quantize.values() if s != "none"})
    if used and scheme not in used:
        raise PlanError("with --plan, each layer's scheme comes from the plan, and --scheme must be one of them",
                        {"--scheme": scheme, "plan schemes": used}, f"pass --scheme {used[0]}")
    return dict(plan.quantize)


def _plan_map(layers: str, plan_file: Optional[Path], scheme: str, model: nn.Module, x: torch.Tensor):
    from ..engines.quantize import plan_map_from_layers_option

    if plan_file is not None:
        return _read_plan_map(plan_file, scheme), None
    return plan_map_from_layers_option(layers, model, x, scheme=scheme)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- backends


def _quantize_onnx(dense: nn.Module, x: torch.Tensor, out: Path, status: Status, device: str = "cpu") -> _Quantized:
    from ..engines.onnx_export import export_onnx, quantize_onnx_int8, verify_onnx
    from ..evaluate.memory import memory_report, state_dict_bytes

    with status("exporting to ONNX and quantizing with ONNX Runtime"):
        exp = export_onnx(dense, x, out / "model.onnx")
        int8_path = out / "model.int8.onnx"
        int8_bytes = quantize_onnx_int8(exp.path, int8_path)
        ver = verify_onnx(int8_path, dense, x, min_cosine=0.98, min_top1=0.0)
    qmodel = OrtModule(int8_path, device=device)
    report_json = {"backend": "onnx", "exporter": exp.exporter, "fallback_reason": exp.fallback_reason,
                   "onnx_fp32_mb": exp.size_bytes / MB, "onnx_int8_mb": int8_bytes / MB,
                   "verify_vs_dense": ver.to_json(), "op_types": ["MatMul", "Gemm"]}
    return _Quantized(
        qmodel=qmodel,
        timed={"dense": dense, "compressed": qmodel, "onnx_fp32": OrtModule(exp.path, device=device)},
        size_dense=state_dict_bytes(dense),
        size_q=int8_bytes,
        report_json=report_json,
        artefacts={"onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx"},
        mem_dense=memory_report(dense, x).to_json(),
        mem_q={"weights_mb": round(int8_bytes / MB, 3)},
    )


def _quantize_torch(dense: nn.Module, x: torch.Tensor, out: Path, *, layers: str, backend: str, scheme: str,
                    plan_file: Optional[Path], compile_: bool, status: Status, spec: Any = None,
                    pickle_module: bool = False) -> _Quantized:
    from ..engines.quantize import quantize_
    from ..evaluate.memory import memory_report

    plan_map, selection = _plan_map(layers, plan_file, scheme, dense, x)
    qmodel = copy.deepcopy(dense)
    with status(f"quantizing ({backend})"):
        report = quantize_(qmodel, plan_map, backend=backend,  # type: ignore[arg-type]
                           why_not=selection.reasons if selection is not None else None)
    if not report.quantized:
        raise PlanError("no layer was quantized", {d.name: d.reason for d in report.skipped[:5]},
                        "choose layers with --layers all or a regex that matches Linear layers")
    report_json = report.to_json()
    report_json["plan_map"] = plan_map
    if selection is not None:
        report_json["auto_selection"] = {"reasons": selection.reasons,
                                         "covered_latency_share": selection.covered_latency_share,
                                         "covered_params_share": selection.covered_params_share}
    timed: dict[str, nn.Module] = {"dense": dense, "compressed": qmodel}
    if compile_:
        with status("torch.compile (dense and quantized; about a minute each for a ViT-B)"):
            cd, cq = torch.compile(copy.deepcopy(dense)), torch.compile(qmodel)
            with torch.inference_mode():
                cd(x), cq(x)
        timed = {"dense": dense, "compressed": cq, "dense_compiled": cd, "quantized_eager": qmodel}
    mem_dense, mem_q = memory_report(dense, x).to_json(), memory_report(qmodel, x).to_json()
    artefacts = save_quantized(dense, qmodel, x, out, spec=spec, backend=backend,
                               layers=[d.name for d in report.quantized], scheme=scheme, pickle_module=pickle_module)
    return _Quantized(
        qmodel=qmodel, timed=timed, size_dense=report.size_before_bytes, size_q=report.size_after_bytes,
        report_json=report_json, artefacts=artefacts, mem_dense=mem_dense, mem_q=mem_q,
    )


def save_quantized(dense: nn.Module, qmodel: nn.Module, x: torch.Tensor, out: Path, *, spec: Any, backend: str,
                   layers: list[str], scheme: str, pickle_module: bool = False) -> dict[str, Any]:
    """No pickle by default: the float weights (model.safetensors) and the recipe (structure.json: the model's
    source, no pruning, the quantized layers), which `load_pruned` rebuilds by quantizing again (dynamic int8 is
    a pure function of the float weights); model.pt2 where torch.export takes the quantized model; the pickled
    module (model.pt) only with `pickle_module`."""
    from ..engines.artifact import save_pruned

    record = {"model": spec.model_dump() if spec is not None else None, "allocation": {"kept": {}, "heads": {}},
              "quantization": {"backend": backend, "layers": {n: scheme for n in layers}}}
    info = save_pruned(dense, x, out, record=record, pickle_module=pickle_module, program=qmodel)
    return {**info, "format": f"float weights + {backend} {scheme} recipe (structure.json); "
                              + ("pickled module model.pt" if pickle_module else "no pickle")}


# ---------------------------------------------------------------------------------------- measuring


def _accuracy_blocks(data: str, limit: int, batch_size: int, models: dict[str, nn.Module],
                     dense: nn.Module, x: torch.Tensor, status: Status = _no_status,
                     preprocess: Any = None) -> dict[str, dict[str, float]]:
    """Top-1 accuracy (and fidelity to the dense model) of each model on the data's test split."""
    from ..evaluate.classification import evaluate_classifier, fidelity
    from ..sources.data import load_data

    bundle = load_data(data, input_shape=tuple(x.shape[1:]), preprocess=preprocess)
    loader = bundle.loader("test", batch_size=batch_size, limit=limit or None, shuffle=False)
    out: dict[str, dict[str, float]] = {}
    for name, m in models.items():
        with status(f"evaluating {name} on {data}"):
            acc = evaluate_classifier(m, loader)
            block = {"accuracy": acc["top1"], "top5": acc["top5"], "eval_samples": acc["n"]}
            if m is not dense:
                fid = fidelity(m, dense, loader)
                block["agreement"], block["kl"] = fid["agreement"], fid["kl"]
            out[name] = block
    return out


def _measure(q: _Quantized, dense: nn.Module, x: torch.Tensor, *, rounds: int, data: Optional[str],
             data_limit: int, batch_size: int, status: Status, preprocess: Any = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Dense and quantized blocks (size, latency timed side by side, memory, accuracy) and the raw latencies."""
    from ..evaluate.speed import compare_latency

    with status(f"timing {', '.join(q.timed)} side by side"):
        lat = compare_latency(q.timed, x, rounds=rounds)
    dense_block: dict[str, Any] = {"size_mb": q.size_dense / MB, "latency_ms": lat["dense"].median_ms,
                                   "memory_mb": q.mem_dense["memory_mb"], "memory": q.mem_dense}
    comp_block: dict[str, Any] = {"size_mb": q.size_q / MB, "latency_ms": lat["compressed"].median_ms,
                                  "memory": q.mem_q}
    if "memory_mb" in q.mem_q:
        comp_block["memory_mb"] = q.mem_q["memory_mb"]
    if data:
        acc = _accuracy_blocks(data, data_limit, batch_size, {"dense": dense, "compressed": q.qmodel}, dense, x,
                               status, preprocess)
        dense_block.update(acc["dense"])
        comp_block.update(acc["compressed"])
    return dense_block, comp_block, lat


# ---------------------------------------------------------------------------------------------- job


def run_quantize(
    loaded: LoadedModel,
    *,
    out: Path,
    layers: str | None = None,
    backend: str = "eager",
    scheme: str = "int8_dynamic",
    plan_file: Optional[Path] = None,
    data: Optional[str] = None,
    data_limit: int = 2000,
    batch_size: int = 100,
    rounds: int = 10,
    compile_: bool = False,
    status: Status = _no_status,
    device: str | None = None,
    preprocess: Any = None,
    pickle_module: bool = False,
    return_model: bool = False,
    overwrite: bool = False,
) -> Any:
    """The `prunepilot quantize` job: select layers, quantize a copy, time dense vs quantized side by side,
    score on data if given, save the artefact, write result.json / quantization.json / summary.md.

    `status(message)` returns a context manager wrapped around each slow step (the CLI passes rich's
    `console.status`); by default the job is silent. Returns the result dict written to result.json.
    `layers=None` is the backend's default (`default_layers`); `device` must be the CPU for dynamic int8
    (refused otherwise, with what to use instead); `preprocess` (sources.data.parse_normalize) for `data`.
    The artefact is not a pickle unless `pickle_module` (see `save_quantized`); `return_model` also returns
    the quantized module: (result, model). One run per folder: an `out` that holds another run is refused
    unless `overwrite` (journal.prepare_out)."""
    layers = layers or default_layers(backend)
    dev = _check_device(device, backend, scheme)
    _check_options(loaded, layers=layers, backend=backend, scheme=scheme, plan_file=plan_file,
                   data_limit=data_limit, batch_size=batch_size, rounds=rounds, compile_=compile_)
    t0 = time.perf_counter()
    out = Path(out)
    prepare_out(out, overwrite=overwrite)
    dense, x = loaded.module.eval().to(dev), loaded.example_input.to(dev)
    if backend == "onnx":
        q = _quantize_onnx(dense, x, out, status, device=dev)
    else:
        q = _quantize_torch(dense, x, out, layers=layers, backend=backend, scheme=scheme, plan_file=plan_file,
                            compile_=compile_, status=status, spec=loaded.spec, pickle_module=pickle_module)
    dense_block, comp_block, lat = _measure(q, dense, x, rounds=rounds, data=data, data_limit=data_limit,
                                            batch_size=batch_size, status=status, preprocess=preprocess)
    speedup = lat["dense"].median_ms / lat["compressed"].median_ms
    slower = slowdown_note(speedup, [lat["dense"], lat["compressed"]], q.size_q / q.size_dense)
    result = build_result(
        kind="quantize",
        model=loaded.uri,
        budget={"targets": {}, "band": None},
        dense=dense_block,
        compressed=comp_block,
        within_band=True,  # quantize has no budget of its own; `compress` puts it under one
        errors={},
        backend=backend,
        scheme=scheme,
        layers=layers,
        input_shape=list(x.shape),
        speedup=speedup,
        size_reduction=1 - q.size_q / q.size_dense,
        latency={k: v.to_json() for k, v in lat.items()},
        quantization={k: v for k, v in q.report_json.items() if k not in ("quantized", "skipped")},
        export=q.artefacts,
        notes=q.notes + ([slower] if slower else []),
        seconds=time.perf_counter() - t0,
    )
    if data:
        result["accuracy_delta_pt"] = 100 * (comp_block["accuracy"] - dense_block["accuracy"])
    write_json_atomic(out / "quantization.json", q.report_json)
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result, q.report_json))
    return (result, q.qmodel) if return_model else result


def slowdown_note(speedup: float, timings: list[Any], size_ratio: float) -> str | None:
    """A quantized model that ran slower than dense is said so, with the likely reason, instead of passing as a
    result: dynamic int8 quantizes activations on every call, which small layers and batch 1 do not repay. When the
    timings themselves scatter (p90 far above the median), the host's noise is named as the other suspect."""
    if speedup >= 0.97:
        return None
    noisy = any(t.p90_ms > 1.5 * t.median_ms for t in timings)
    return (f"the quantized model ran {speedup:.2f}x the dense speed here, i.e. slower; dynamic int8 quantizes "
            f"activations on every call, which small layers and small batches do not repay (the weights still "
            f"shrink to {size_ratio:.0%}). For speed, select fewer, larger layers (--layers REGEX or a --plan) or try "
            "--backend onnx" + ("; the timings also scattered (p90 > 1.5x the median): another process may have "
                                "shared the CPU, so re-measure on a quiet machine" if noisy else ""))


_RUN_OPTIONS = ("plan_file", "data_limit", "batch_size", "rounds", "compile_", "status", "device", "preprocess",
                "pickle_module", "return_model")


def fresh_run_dir(root: Path | None = None, prefix: str = "quantize") -> Path:
    """A new, empty `runs/<prefix>-<timestamp>` folder under `root` (default: the current directory).
    An existing folder is never reused: a clash gets a `-2`, `-3`... suffix."""
    base = (Path.cwd() if root is None else Path(root)) / "runs"
    base.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1, 1000):
        path = base / (f"{prefix}-{stamp}" if i == 1 else f"{prefix}-{stamp}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise PrunepilotError("could not create a fresh run folder", str(base), "pass out=... explicitly")


def quantize(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    out: Path | str | None = None,
    layers: str | None = None,
    backend: str = "eager",
    scheme: str = "int8_dynamic",
    data: Optional[str] = None,
    **kw: Any,
) -> dict[str, Any]:
    """Quantize a plain `nn.Module` from Python: the `prunepilot quantize` job on (model, example_input).

    `out=None` writes into a fresh `runs/quantize-<timestamp>` folder under the current directory.
    Further keywords (plan_file, data_limit, batch_size, rounds, compile_, status) go to `run_quantize`.
    Returns the result dict (as in result.json) plus `out`, the folder the files were written to.
    The model is switched to eval mode and otherwise left unchanged (a copy is quantized and saved)."""
    if not isinstance(model, nn.Module):
        raise PrunepilotError("quantize takes an nn.Module", type(model).__name__,
                              "pass the model object (or use run_quantize with a LoadedModel)")
    if not isinstance(example_input, torch.Tensor):
        raise PrunepilotError("quantize needs one example input tensor (the batch to time and trace)",
                              type(example_input).__name__, "pass e.g. torch.randn(1, 3, 224, 224)")
    unknown = sorted(set(kw) - set(_RUN_OPTIONS))
    if unknown:
        raise PrunepilotError("unknown quantize option", unknown, f"the options are: out, layers, backend, scheme, "
                              f"data, {', '.join(_RUN_OPTIONS)}")
    loaded = LoadedModel(model, example_input, f"python:{type(model).__name__}",
                         f"{type(model).__name__} handed in from Python")
    if "plan_file" in kw and kw["plan_file"] is not None:
        kw["plan_file"] = Path(kw["plan_file"])
    _check_options(loaded, layers=layers or default_layers(backend), backend=backend, scheme=scheme,
                   plan_file=kw.get("plan_file"), data_limit=kw.get("data_limit", 2000),
                   batch_size=kw.get("batch_size", 100), rounds=kw.get("rounds", 10), compile_=kw.get("compile_", False))
    _check_device(kw.get("device"), backend, scheme)
    run_dir = fresh_run_dir() if out is None else Path(out)
    got = run_quantize(loaded, out=run_dir, layers=layers, backend=backend, scheme=scheme, data=data, **kw)
    if kw.get("return_model"):
        return {**got[0], "out": str(run_dir)}, got[1]
    return {**got, "out": str(run_dir)}


def summary_markdown(r: dict[str, Any], rep: dict[str, Any]) -> str:
    d, c = r["dense"], r["compressed"]
    lines = [f"# prunepilot quantize: {r['model']}", "",
             f"Backend: {r['backend']} ({r['scheme']}), layers: {r['layers']}", "",
             "| metric | dense | quantized | ratio |", "|---|---|---|---|"]
    for m in ("size_mb", "latency_ms", "memory_mb", "accuracy"):
        if d.get(m) is not None and c.get(m) is not None:
            lines.append(f"| {m} | {d[m]:.4g} | {c[m]:.4g} | {c[m] / d[m]:.3f} |")
    lines.append("")
    lines.append(f"CPU speed-up (side by side, {r['environment']['threads']} threads): {r['speedup']:.2f}x; "
                 f"size −{r['size_reduction']:.1%}")
    if "accuracy_delta_pt" in r:
        lines.append(f"Accuracy change: {r['accuracy_delta_pt']:+.2f} pt; top-1 agreement with dense "
                     f"{c.get('agreement', float('nan')):.4f}")
    if rep.get("skipped"):
        lines += ["", f"Layers not quantized ({len(rep['skipped'])}):"]
        lines += [f"- `{s['name']}` ({s['kind']}): {s['reason']}" for s in rep["skipped"][:50]]
        if len(rep["skipped"]) > 50:
            lines.append(f"- … {len(rep['skipped']) - 50} more in quantization.json")
    for n in r.get("notes", []):
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"
