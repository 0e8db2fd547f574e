"""`prunepilot export RUN_DIR --format onnx [--verify] [--int8]`: deployable artefacts from a run folder.
The job itself is prunepilot.jobs.export.run_export."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PrunepilotError
from ..jobs.export import run_export
from .common import console


def register(app: typer.Typer) -> None:
    @app.command()
    def export(
        run_dir: Path = typer.Argument(..., help="A run folder written by prunepilot prune / quantize / compress."),
        fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
        verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime outputs with the PyTorch model: max abs diff, cosine, top-1 agreement; time the ORT session."),
        int8: bool = typer.Option(False, "--int8", help="Also write model.int8.onnx (ONNX Runtime dynamic int8 of MatMul/Gemm weights)."),
        exporter: str = typer.Option("auto", "--exporter", help="auto (dynamo, then the legacy TorchScript exporter), dynamo, or torchscript."),
        data: Optional[str] = typer.Option(None, "--data", help="Verify on real inputs: fashion-mnist[:DIR], imagefolder:DIR, hf:NAME (default: random inputs)."),
        samples: int = typer.Option(64, "--samples", help="Inputs used for verification."),
        input_shape: Optional[str] = typer.Option(None, "--input-shape", help="Example input shape if the run does not record it, e.g. 1,3,224,224."),
        trust: bool = typer.Option(False, "--trust", help="Allow loading model.pt (a pickled module that can run code) from a folder prunepilot did not write. Folders holding a prunepilot result.json load without it (that file can be copied, so only export run folders you created); model.pt2 (torch.export) never needs it."),
    ) -> None:
        """Export the model of a run folder to ONNX (dynamo exporter, legacy fallback), optionally with an
        ONNX Runtime int8 copy, and verify both against the PyTorch model. Loads structure.json + model.safetensors
        when present, else model.pt2; model.pt (a pickled full module) only from a folder prunepilot wrote or with --trust."""
        from ..sources.models import parse_shape

        if fmt != "onnx":
            raise PrunepilotError("only --format onnx is supported", fmt, "use --format onnx")
        out = run_export(run_dir, verify=verify, int8=int8, trust=trust, exporter=exporter, data=data,
                         samples=samples, input_shape=parse_shape(input_shape))
        fp = out["fp32"]
        console.print(f"exported {out['source']} with the {fp['exporter']} exporter -> {fp['path']} ({fp['size_mb']:.1f} MB)"
                      + (f" [dim](dynamo failed: {fp['fallback_reason']})[/]" if fp.get("fallback_reason") else ""))
        for key, label in (("verify_fp32", "fp32"), ("verify_int8", "int8")):
            v = out.get(key)
            if v:
                ok = "[green]passed[/]" if v["passed"] else "[red]FAILED[/]"
                top1 = f"{v['top1_agreement']:.4f}" if v["top1_agreement"] is not None else "-"
                console.print(f"verify {label}: {ok} max|diff| {v['max_abs_diff']:.3g}, cosine {v['cosine']:.5f}, "
                              f"top-1 agreement {top1} on {out['verify_inputs']}")
        for key, label in (("latency_fp32", "fp32"), ("latency_int8", "int8")):
            if out.get(key):
                console.print(f"ORT {label}: {out[key]['median_ms']:.2f} ms median ({out[key]['threads']} threads)")
        if out.get("int8_size_mb"):
            console.print(f"int8 model: {out['int8_path']} ({out['int8_size_mb']:.1f} MB)")
        for n in out["notes"]:
            console.print(f"[dim]note: {n}[/]")
        failed = [k for k in ("verify_fp32", "verify_int8") if out.get(k) and not out[k]["passed"]]
        if failed:
            raise PrunepilotError("ONNX verification failed", ", ".join(failed),
                                  f"inspect {run_dir}/export.json; try --exporter torchscript")
