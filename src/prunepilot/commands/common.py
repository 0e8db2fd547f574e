"""Options and helpers shared by commands."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..budget import format_metric
from ..sources.models import LoadedModel, load_model, parse_shape

console = Console()

WeightsOpt = typer.Option("random", "--weights", help="'random' (no download) or 'default' (the library's pretrained weights; needs a cache or network).")
TrustOpt = typer.Option(False, "--trust", help="Allow loading a pickled full module (runs code from the file). Only for files you trust.")
ShapeOpt = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224 (default: the model's own or 1,3,224,224).")
StateDictOpt = typer.Option(None, "--state-dict", help="A state_dict to load into the model (loaded with weights_only=True).")
DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")
DtypeOpt = typer.Option("auto", "--dtype", help="auto (the model's own), float32, bfloat16, float16 (GPU only).")
NormalizeOpt = typer.Option("auto", "--normalize", help="Input normalisation for --data images: auto (a timm model's own data config, else the data source's default: Fashion-MNIST statistics, ImageNet mean/std for RGB folders), imagenet, none (pixels in [0, 1]), or MEAN,STD (one value, or slash-separated per channel: 0.5/0.5/0.5,0.25/0.25/0.25).")
ResizeOpt = typer.Option(None, "--resize", help="Resize the shorter image side to this many pixels, then centre-crop (ImageNet-style eval; auto from a timm data config).")
CropOpt = typer.Option(None, "--crop", help="Centre-crop size in pixels before the final resize to the model input (default: the input size when --resize is given).")


def load(model: str, weights: str, trust: bool, input_shape: Optional[str], state_dict: Optional[Path]) -> LoadedModel:
    with console.status(f"loading {model}"):
        return load_model(model, weights=weights, trust=trust, input_shape=parse_shape(input_shape), state_dict=state_dict)


def result_table(result: dict) -> Table:
    t = Table(title=f"{result['kind']}: {result['model']}")
    t.add_column("metric")
    t.add_column("dense", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("goal", justify="right")
    goals = result["budget"]["targets"]
    for m in ("macs", "params", "latency_ms", "size_mb", "memory_mb", "accuracy", "perplexity", "sparsity"):
        d, c = result["dense"].get(m), result["compressed"].get(m)
        if c is None:
            continue
        goal = goals.get(m, {}).get("goal")
        t.add_row(
            m,
            format_metric(m, d) if d is not None else "-",
            format_metric(m, c),
            f"{c / d:.3f}" if d else "-",
            format_metric(m, goal) if goal is not None else "",
        )
    return t
