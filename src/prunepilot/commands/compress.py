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
        out: Path = typer.Option(Path("runs/compress"), "--out", help="Output folder (one run per folder)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out (otherwise a second run there is refused)."),
        round_to: int = typer.Option(8, "--round-to", help="Channel multiple for pruned widths (1: none)."),
        quantization: str = typer.Option("none,int8_dynamic", "--quantization", help="Comma list of the options searched: none, int8_dynamic."),
        finetune_steps: int = typer.Option(40, "--finetune-steps", help="Fine-tune steps before scoring each feasible point (with --data)."),
        finetune_epochs: float = typer.Option(1.0, "--finetune-epochs", help="Final recovery of the winner, in epochs of the training data (with --data; 0: none)."),
        kd: bool = typer.Option(True, "--kd/--no-kd", help="Distil from the dense model in the final recovery."),
        eval_limit: int = typer.Option(1000, "--eval-limit", help="Validation images per score (with --data)."),
        seed: int = typer.Option(0, "--seed"),
        normalize: str = NormalizeOpt,
        resize: Optional[int] = ResizeOpt,
        crop: Optional[int] = CropOpt,
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
    ) -> None:
        """Search pruning and int8 quantization together: for each quantization option the pruning amount is
        bracketed against the measured targets; the best feasible combination (by accuracy with --data) wins,
        and with --data it is then fine-tuned for --finetune-epochs (distilled from the dense model; int8 applied again
        afterwards) and measured again: result.json's `recovery` holds dense / before / after accuracy.
        The report shows the accuracy-latency-memory trade-off of every point measured. Runs on the CPU: the
        latency and memory budgets are measured here, and dynamic int8 is a CPU format. Every measurement is
        journaled (OUT/journal.sqlite): `prunepilot runs resume ID --journal OUT/journal.sqlite` continues a killed
        run with the measurements it had. Writes model.safetensors + structure.json (the int8 layers are applied
        again on load), model.pt2 where torch.export works.

        Exit code 3: the result was written but its final measurement lies outside the band (result.json says why)."""
        from ..jobs.compress import CompressRun, CompressSettings, run_compress_job

        budget = Budget.parse(tolerance=tolerance, memory_mb=target_memory, latency_ms=target_latency,
                              size_mb=target_size, macs=target_macs)
        options = tuple(o.strip() for o in quantization.split(",") if o.strip())
        settings = CompressSettings(quant_options=options, finetune_steps=finetune_steps, eval_limit=eval_limit, seed=seed,
                                    finetune_epochs=finetune_epochs, kd=kd)
        run = CompressRun(budget, out, data=data, plan=Plan(round_to=None if round_to == 1 else round_to),
                          settings=settings, normalize=normalize, resize=resize, crop=crop)
        loaded = load(model, weights, trust, input_shape, state_dict)
        result = run_compress_job(loaded, run, overwrite=overwrite, log=console.print)
        console.print(result_table(result))
        ch = result["choice"]
        console.print(f"chosen: quantization {ch['quantization']}, MAC reduction {ch['mac_reduction']:.1%}; "
                      f"within budget: {'[green]yes' if result['within_band'] else '[red]no'}[/]; written to {out}/")
        if not result["within_band"]:
            console.print(f"[red]outside the budget band[/]: {result.get('out_of_band_reason', 'see summary.md')}", highlight=False)
            raise typer.Exit(3)
