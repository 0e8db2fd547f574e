"""`prunepilot quantize`: per-layer dynamic int8 post-training quantization, measured side by side."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, Optional

import torch
import typer
from torch import nn

from ..errors import PlanError
from ..results import build_result, write_json_atomic, write_text_atomic
from .common import ShapeOpt, StateDictOpt, TrustOpt, WeightsOpt, console, load

MB = 1024 * 1024


class OrtModule(nn.Module):
    """An ONNX Runtime session behind nn.Module's call, so evaluation code can score it like a model."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        from ..engines.onnx_export import ort_session

        self.sess = ort_session(path, threads=threads)
        self.input_name = self.sess.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.sess.run(None, {self.input_name: x.detach().cpu().numpy()})[0])


def _plan_map(layers: str, plan_file: Optional[Path], scheme: str, model: nn.Module, x: torch.Tensor):
    from ..engines.quantize import plan_map_from_layers_option

    if plan_file is not None:
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
        return dict(plan.quantize), None
    return plan_map_from_layers_option(layers, model, x, scheme=scheme)  # type: ignore[arg-type]


def _accuracy_blocks(data: str, limit: int, batch_size: int, models: dict[str, nn.Module],
                     dense: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Top-1 accuracy (and fidelity to the dense model) of each model on the data's test split."""
    from ..evaluate.classification import evaluate_classifier, fidelity
    from ..sources.data import load_data

    bundle = load_data(data, input_shape=tuple(x.shape[1:]))
    loader = bundle.loader("test", batch_size=batch_size, limit=limit or None, shuffle=False)
    out: dict[str, dict[str, float]] = {}
    for name, m in models.items():
        with console.status(f"evaluating {name} on {data}"):
            acc = evaluate_classifier(m, loader)
            block = {"accuracy": acc["top1"], "top5": acc["top5"], "eval_samples": acc["n"]}
            if m is not dense:
                fid = fidelity(m, dense, loader)
                block["agreement"], block["kl"] = fid["agreement"], fid["kl"]
            out[name] = block
    return out


def run_quantize(
    loaded: Any,
    *,
    out: Path,
    layers: str = "auto",
    backend: str = "eager",
    scheme: str = "int8_dynamic",
    plan_file: Optional[Path] = None,
    data: Optional[str] = None,
    data_limit: int = 2000,
    batch_size: int = 100,
    rounds: int = 10,
    compile_: bool = False,
) -> dict[str, Any]:
    """The `prunepilot quantize` job: select layers, quantize a copy, time dense vs quantized side by side,
    score on data if given, save the artefact, write result.json / quantization.json / summary.md."""
    from ..engines.quantize import quantize_
    from ..evaluate.memory import memory_report, state_dict_bytes
    from ..evaluate.speed import compare_latency

    if backend not in ("eager", "torchao", "onnx"):
        raise PlanError("--backend is eager, torchao or onnx", backend, "use --backend eager (fastest CPU path)")
    if compile_ and backend != "torchao":
        raise PlanError("--compile applies to the torchao backend only", backend, "drop --compile or use --backend torchao")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    dense, x = loaded.module.eval(), loaded.example_input
    notes: list[str] = []
    selection = None
    artefacts: dict[str, Any] = {}
    report_json: dict[str, Any]

    if backend == "onnx":
        from ..engines.onnx_export import export_onnx, quantize_onnx_int8, verify_onnx

        if layers != "all" or plan_file is not None:
            notes.append(f"ONNX Runtime dynamic quantization packs every MatMul/Gemm weight; --layers {layers} "
                         "selects nothing on this backend (use --backend eager for per-layer choices)")
            console.print(f"[yellow]note:[/] {notes[-1]}")
        with console.status("exporting to ONNX and quantizing with ONNX Runtime"):
            exp = export_onnx(dense, x, out / "model.onnx")
            int8_path = out / "model.int8.onnx"
            int8_bytes = quantize_onnx_int8(exp.path, int8_path)
            ver = verify_onnx(int8_path, dense, x, min_cosine=0.98, min_top1=0.0)
        qmodel: nn.Module = OrtModule(int8_path)
        fp32_onnx = OrtModule(exp.path)
        timed = {"dense": dense, "compressed": qmodel, "onnx_fp32": fp32_onnx}
        size_dense, size_q = state_dict_bytes(dense), int8_bytes
        report_json = {"backend": "onnx", "exporter": exp.exporter, "fallback_reason": exp.fallback_reason,
                       "onnx_fp32_mb": exp.size_bytes / MB, "onnx_int8_mb": int8_bytes / MB,
                       "verify_vs_dense": ver.to_json(), "op_types": ["MatMul", "Gemm"]}
        artefacts = {"onnx_fp32": "model.onnx", "onnx_int8": "model.int8.onnx"}
        mem_dense, mem_q = memory_report(dense, x).to_json(), {"weights_mb": round(int8_bytes / MB, 3)}
    else:
        plan_map, selection = _plan_map(layers, plan_file, scheme, dense, x)
        qmodel = copy.deepcopy(dense)
        with console.status(f"quantizing ({backend})"):
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
        size_dense, size_q = report.size_before_bytes, report.size_after_bytes
        timed = {"dense": dense, "compressed": qmodel}
        if compile_:
            with console.status("torch.compile (dense and quantized; about a minute each for a ViT-B)"):
                cd, cq = torch.compile(copy.deepcopy(dense)), torch.compile(qmodel)
                with torch.inference_mode():
                    cd(x), cq(x)
            timed = {"dense": dense, "compressed": cq, "dense_compiled": cd, "quantized_eager": qmodel}
        mem_dense, mem_q = memory_report(dense, x).to_json(), memory_report(qmodel, x).to_json()
        torch.save(qmodel, out / "model.pt")
        artefacts = {"module": "model.pt", "format": f"full module ({backend} int8), torch.save"}

    with console.status(f"timing {', '.join(timed)} side by side"):
        lat = compare_latency(timed, x, rounds=rounds)
    dense_block: dict[str, Any] = {"size_mb": size_dense / MB, "latency_ms": lat["dense"].median_ms,
                                   "memory_mb": mem_dense["memory_mb"], "memory": mem_dense}
    comp_block: dict[str, Any] = {"size_mb": size_q / MB, "latency_ms": lat["compressed"].median_ms,
                                  "memory": mem_q}
    if "memory_mb" in mem_q:
        comp_block["memory_mb"] = mem_q["memory_mb"]
    if data:
        acc = _accuracy_blocks(data, data_limit, batch_size, {"dense": dense, "compressed": qmodel}, dense, x)
        dense_block.update(acc["dense"])
        comp_block.update(acc["compressed"])
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
        speedup=lat["dense"].median_ms / lat["compressed"].median_ms,
        size_reduction=1 - size_q / size_dense,
        latency={k: v.to_json() for k, v in lat.items()},
        quantization={k: v for k, v in report_json.items() if k not in ("quantized", "skipped")},
        export=artefacts,
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
    if data:
        result["accuracy_delta_pt"] = 100 * (comp_block["accuracy"] - dense_block["accuracy"])
    write_json_atomic(out / "quantization.json", report_json)
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result, report_json))
    return result


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


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: str = typer.Argument(..., help="Model URI: torchvision:NAME, timm:NAME, file:PATH, py:module:function."),
        layers: str = typer.Option("auto", "--layers", help="auto (measured latency share and size), all (every Linear), or a regex over layer names."),
        backend: str = typer.Option("eager", "--backend", help="eager (torch.ao dynamic int8: fastest plain-PyTorch CPU path), torchao (fast only with --compile), onnx (ONNX Runtime int8 artefact)."),
        scheme: str = typer.Option("int8_dynamic", "--scheme", help="int8_dynamic (int8 weights and activations) or int8_weight_only (torchao only)."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan JSON whose 'quantize' map (name / re:pattern / * -> scheme) selects the layers."),
        out: Path = typer.Option(Path("runs/quantize"), "--out", help="Output folder (result.json, quantization.json, summary.md, model.pt or model.int8.onnx)."),
        data: Optional[str] = typer.Option(None, "--data", help="Labelled data for accuracy and fidelity: fashion-mnist[:DIR], imagefolder:DIR, hf:NAME."),
        data_limit: int = typer.Option(2000, "--data-limit", help="Test samples to score (0 = all)."),
        rounds: int = typer.Option(10, "--rounds", help="Interleaved timing rounds (dense and quantized alternate)."),
        compile_: bool = typer.Option(False, "--compile", help="torchao: time both models under torch.compile (slow to compile)."),
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
    ) -> None:
        """Dynamic int8 post-training quantization of selected layers; dense and quantized are timed side by
        side in this process. Every weight layer is reported as quantized or skipped with its reason."""
        loaded = load(model, weights, trust, input_shape, state_dict)
        result = run_quantize(loaded, out=out, layers=layers, backend=backend, scheme=scheme, plan_file=plan_file,
                              data=data, data_limit=data_limit, rounds=rounds, compile_=compile_)
        d, c = result["dense"], result["compressed"]
        console.print(f"[bold]{model}[/] {backend}: size {d['size_mb']:.1f} -> {c['size_mb']:.1f} MB "
                      f"(−{result['size_reduction']:.1%}), latency {d['latency_ms']:.1f} -> {c['latency_ms']:.1f} ms "
                      f"({result['speedup']:.2f}x)")
        q = result["quantization"]
        if "n_quantized" in q:
            console.print(f"{q['n_quantized']} layers quantized, {q['n_skipped']} skipped (reasons in {out}/quantization.json)")
        if "accuracy_delta_pt" in result:
            console.print(f"accuracy {d['accuracy']:.4f} -> {c['accuracy']:.4f} ({result['accuracy_delta_pt']:+.2f} pt)")
        console.print(f"written to {out}/")
