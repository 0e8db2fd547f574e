"""`prunepilot train-baseline`: train and cache the Fashion-MNIST reference ResNet."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train-baseline")
    def train_baseline_cmd(
        arch: str = typer.Option("resnet20", help="resnet20, resnet32 or resnet56 (CIFAR-style, 1x28x28 input)."),
        epochs: float = typer.Option(1.0, help="Training epochs (ResNet-20: 15-60 min each on a shared 2-core CPU)."),
        out: Optional[Path] = typer.Option(None, help="Weights path (.pt; info .json beside it). Default: the "
                                           "cache, ~/.cache/prunepilot/baselines/fmnist_<arch>[_e<epochs>].pt"),
        data: str = typer.Option("fashion-mnist", help="fashion-mnist or fashion-mnist:DIR (IDX files)."),
        seed: int = typer.Option(0, help="Seed for initialisation, splits and batch order."),
        lr: float = typer.Option(0.1, help="Peak SGD learning rate (cosine decay)."),
        batch_size: int = typer.Option(128, help="Training batch size."),
        force: bool = typer.Option(False, "--force", help="Retrain even when a cached model exists."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        threads: Optional[int] = typer.Option(None, help="torch threads (1 is often fastest on a busy machine)."),
    ) -> None:
        """Train a CIFAR-style ResNet on Fashion-MNIST and cache it as a trained baseline to compress."""
        from rich.console import Console

        from ..models.baseline import cache_slot, load_baseline, train_baseline

        console = Console()
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        target, key = (out, None) if out is not None else cache_slot(arch, epochs)
        if target.is_file() and not force and out is None:
            _, info = load_baseline(arch, epochs=key)
            console.print(f"cached: {target} (epochs {info.get('epochs')}, test top-1 "
                          f"{info.get('test_top1', float('nan')):.4f}); pass --force to retrain")
            return
        _, info = train_baseline(arch, epochs, out=target, seed=seed, batch_size=batch_size, lr=lr, data=data,
                                 progress=not quiet)
        console.print(f"[green]trained[/] {arch} for {info['epochs']:.2f} epochs in {info['train_seconds']:.0f}s: "
                      f"val top-1 {info['val_top1']:.4f}, test top-1 {info['test_top1']:.4f} -> {info['weights']}")
