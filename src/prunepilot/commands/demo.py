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
        agent: str = typer.Option("auto", "--agent", help="Strategist (auto: an API model when a key is set, else the built-in sensitivity strategist; `local` runs the embedded SmolLM2 analyst)."),
        rounds: int = typer.Option(4, "--rounds", help="Agent rounds."),
        overwrite: bool = typer.Option(True, "--overwrite/--keep", help="Replace an earlier demo run in --out (default) or refuse."),
        no_history: bool = typer.Option(False, "--no-history", help="Neither read nor record cross-run history."),
    ) -> None:
        """Prune a Fashion-MNIST ResNet-20 (trained once and cached) to 50% MACs with the agent loop, then
        fine-tune, test, export and write report.html. Minutes on a laptop CPU; no network, no API key.
        Killed half-way, `prunepilot runs resume RUN_ID --journal OUT/journal.sqlite` finishes it."""
        from ..budget import Budget
        from ..jobs.prune import PruneRun, PruneSettings, run_prune_search
        from ..models.baseline import cache_slot
        from ..sources.models import load_model

        cached, _ = cache_slot("resnet20", None)
        if not cached.is_file():  # the one long silent phase of a first run: say what it is and how long
            console.print(f"first use: training the Fashion-MNIST ResNet-20 baseline once (about 8 minutes on 2 "
                          f"cores), cached as {cached}")
        loaded = load_model("prunepilot:fmnist_resnet20")
        settings = PruneSettings(rounds=rounds, finetune_steps=40, eval_limit=1000, finetune_epochs=0.3, kd=True)
        run = PruneRun(Budget.parse(macs=target_macs), "fashion-mnist", out, agent=agent, settings=settings,
                       use_history=not no_history)
        result = run_prune_search(loaded, run, overwrite=overwrite, log=console.print)
        from .common import result_table

        console.print(result_table(result))
        console.print(f"report: {out}/report.html  (journal: {out}/journal.sqlite, run {result['run_id']})")
