"""`prunepilot demo`: the main job on an embedded default, offline and with no API key."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import console


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("runs/demo"), "--out", help="Output folder."),
        target_macs: str = typer.Option("50%", "--target-macs", help="MACs budget for the demo."),
        agent: str = typer.Option("auto", "--agent", help="Strategist (auto: API key > local SmolLM2 > sensitivity)."),
        rounds: int = typer.Option(4, "--rounds", help="Agent rounds."),
    ) -> None:
        """Prune a Fashion-MNIST ResNet-20 (trained once and cached) to 50% MACs with the agent loop, then
        fine-tune, test, export and write report.html. Minutes on a laptop CPU; no network, no API key."""
        import torch

        from ..agents.master import SearchConfig
        from ..budget import Budget
        from ..models.baseline import get_or_train_baseline
        from ..search import run_search
        from ..sources.models import LoadedModel

        model, info = get_or_train_baseline("resnet20", log=console.print)
        loaded = LoadedModel(model.eval(), torch.randn(1, *info["input_shape"]), "prunepilot:fmnist_resnet20", "trained ResNet-20 (Fashion-MNIST)")
        cfg = SearchConfig(rounds=rounds, finetune_steps=40, eval_limit=1000)
        result = run_search(loaded, Budget.parse(macs=target_macs), "fashion-mnist", out, agent=agent, cfg=cfg,
                            finetune_epochs=0.3, kd=True, log=console.print)
        from .common import result_table

        console.print(result_table(result))
        console.print(f"report: {out}/report.html  (journal: {out}/journal.sqlite, run {result['run_id']})")
