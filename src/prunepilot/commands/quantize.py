"""`prunepilot quantize`: per-layer dynamic int8 post-training quantization, measured side by side.

The job itself lives in `prunepilot.jobs.quantize`; this module maps the CLI options onto it and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..jobs.quantize import OrtModule, run_quantize, summary_markdown  # noqa: F401  (re-exported for callers)
from .common import CropOpt, NormalizeOpt, ResizeOpt, ShapeOpt, StateDictOpt, TrustOpt, WeightsOpt, console, load


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: str = typer.Argument(..., help="Model URI: torchvision:NAME, timm:NAME, file:PATH, py:module:function."),
        layers: Optional[str] = typer.Option(None, "--layers", help="auto (measured latency share and size), all (every Linear), or a regex over layer names. Default: auto; all for --backend onnx (ONNX Runtime packs every MatMul/Gemm)."),
        backend: str = typer.Option("eager", "--backend", help="eager (torch.ao dynamic int8: fastest plain-PyTorch CPU path), torchao (fast only with --compile), onnx (ONNX Runtime int8 artefact)."),
        scheme: str = typer.Option("int8_dynamic", "--scheme", help="int8_dynamic (int8 weights and activations) or int8_weight_only (torchao only)."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan JSON whose 'quantize' map (name / re:pattern / * -> scheme) selects the layers."),
        out: Path = typer.Option(Path("runs/quantize"), "--out", help="Output folder (result.json, quantization.json, summary.md; model.safetensors + structure.json + model.pt2, or model.int8.onnx)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out (otherwise a second run there is refused)."),
        pickle_module: bool = typer.Option(False, "--pickle", help="Also write the quantized module as a pickle (model.pt; loading it runs code: only for your own use)."),
        data: Optional[str] = typer.Option(None, "--data", help="Labelled data for accuracy and fidelity: fashion-mnist[:DIR], imagefolder:DIR, hf:NAME."),
        data_limit: int = typer.Option(2000, "--data-limit", help="Test samples to score (0 = all)."),
        rounds: int = typer.Option(10, "--rounds", help="Interleaved timing rounds (dense and quantized alternate)."),
        compile_: bool = typer.Option(False, "--compile", help="torchao: time both models under torch.compile (slow to compile)."),
        device: str = typer.Option("cpu", "--device", help="cpu (dynamic int8 is a CPU format), or cuda[:N] for --backend torchao --scheme int8_weight_only / --backend onnx (CUDA provider when installed)."),
        normalize: str = NormalizeOpt,
        resize: Optional[int] = ResizeOpt,
        crop: Optional[int] = CropOpt,
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
    ) -> None:
        """Dynamic int8 post-training quantization of selected layers; dense and quantized are timed side by
        side in this process. Every weight layer is reported as quantized or skipped with its reason."""
        from ..jobs.quantize import _check_device
        from ..sources.data import parse_normalize

        _check_device(device, backend, scheme)  # refused before loading anything
        loaded = load(model, weights, trust, input_shape, state_dict)
        pre = parse_normalize(normalize, model=loaded.module, resize=resize, crop=crop)
        result = run_quantize(loaded, out=out, layers=layers, backend=backend, scheme=scheme, plan_file=plan_file,
                              data=data, data_limit=data_limit, rounds=rounds, compile_=compile_,
                              status=console.status, device=device, preprocess=pre, pickle_module=pickle_module,
                              overwrite=overwrite)
        d, c = result["dense"], result["compressed"]
        console.print(f"[bold]{model}[/] {backend}: size {d['size_mb']:.1f} -> {c['size_mb']:.1f} MB "
                      f"(−{result['size_reduction']:.1%}), latency {d['latency_ms']:.1f} -> {c['latency_ms']:.1f} ms "
                      f"({result['speedup']:.2f}x)")
        q = result["quantization"]
        if "n_quantized" in q:
            console.print(f"{q['n_quantized']} layers quantized, {q['n_skipped']} skipped (reasons in {out}/quantization.json)")
        if "accuracy_delta_pt" in result:
            console.print(f"accuracy {d['accuracy']:.4f} -> {c['accuracy']:.4f} ({result['accuracy_delta_pt']:+.2f} pt)")
        for note in result.get("notes") or []:
            console.print(f"[yellow]note:[/] {note}")
        console.print(f"written to {out}/")
