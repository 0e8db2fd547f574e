"""`prunepilot compress`: joint structured pruning + int8 quantization under one memory/latency budget."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..budget import Budget
from ..plan import Plan
from .common import CropOpt, NormalizeOpt, ResizeOpt, ShapeOpt, StateDictOpt, TrustOpt, WeightsOpt, console, load, result_table


def register(app: typer.Typer) -> None:
    @app.command()
    def compress(
        model: str = typer.Argument(..., help="Model URI: torchvision:NAME, timm:NAME, file:PATH, py:module:function."),
        target_memory: Optional[str] = typer.Option(None, "--target-memory", help="Weights + peak activations: absolute (100MB) or relative (25%)."),
        target_latency: Optional[str] = typer.Option(None, "--target-latency", help="CPU latency measured here: absolute (20ms) or relative (40%)."),
        target_size: Optional[str] = typer.Option(None, "--target-size", help="Serialized weights: absolute (50MB) or relative (30%)."),
        target_macs: Optional[str] = typer.Option(None, "--target-macs", help="MACs cap alongside the measured targets."),
        tolerance: str = typer.Option("+1%/-5%", "--tolerance", help="Band around each target."),
        data: Optional[str] = typer.Option(None, "--data", help="Labelled data to rank candidates by accuracy (fashion-mnist, imagefolder:DIR)."),
        out: Path = typer.Option(Path("runs/compress"), "--out", help="Output folder."),
        round_to: int = typer.Option(8, "--round-to", help="Channel multiple for pruned widths."),
        normalize: str = NormalizeOpt,
        resize: Optional[int] = ResizeOpt,
        crop: Optional[int] = CropOpt,
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
    ) -> None:
        """Search pruning and int8 quantization together: for each quantization option the pruning amount is
        bracketed against the measured targets; the best feasible combination (by accuracy with --data) wins.
        The report shows the accuracy-latency-memory trade-off of every point measured. Runs on the CPU: the
        latency and memory budgets are measured here, and dynamic int8 is a CPU format."""
        from ..joint import run_compress

        budget = Budget.parse(tolerance=tolerance, memory_mb=target_memory, latency_ms=target_latency,
                              size_mb=target_size, macs=target_macs)
        from ..sources.data import parse_normalize

        loaded = load(model, weights, trust, input_shape, state_dict)
        pre = parse_normalize(normalize, model=loaded.module, resize=resize, crop=crop)
        result = run_compress(loaded, budget, out, data_spec=data, plan=Plan(round_to=None if round_to == 1 else round_to),
                              log=console.print, preprocess=pre)
        console.print(result_table(result))
        ch = result["choice"]
        console.print(f"chosen: quantization {ch['quantization']}, MAC reduction {ch['mac_reduction']:.1%}; "
                      f"within budget: {'[green]yes' if result['within_band'] else '[red]no'}[/]; written to {out}/")
