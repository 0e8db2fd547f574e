"""`prunepilot profile`: prunable groups, families, MACs/params/latency shares."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..profile import build_profile
from ..results import write_json_atomic
from .common import ShapeOpt, StateDictOpt, TrustOpt, WeightsOpt, console, load


def register(app: typer.Typer) -> None:
    @app.command()
    def profile(
        model: str = typer.Argument(..., help="Model URI: torchvision:NAME, timm:NAME, file:PATH, py:module:function."),
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
        out: Optional[Path] = typer.Option(None, "--out", help="Write the full profile JSON here (default: print only)."),
        groups: bool = typer.Option(False, "--groups", help="Also list every prunable group, not only families."),
        latency_runs: int = typer.Option(5, help="Forward passes timed per module (median)."),
    ) -> None:
        """Profile a model: prunable groups (torch-pruning dependency graph), isomorphic families, MACs and params
        attributable to each, measured CPU time per module, end-to-end latency and size."""
        loaded = load(model, weights, trust, input_shape, state_dict)
        with console.status("profiling"):
            prof, _, _ = build_profile(loaded.module, loaded.example_input, uri=model, latency_runs=latency_runs)
        d = prof.dense
        console.print(
            f"[bold]{model}[/]: {d['macs'] / 1e9:.3f} GMACs, {d['params'] / 1e6:.2f} M params, "
            f"{d['size_mb']:.1f} MB, {d.get('latency_ms', float('nan')):.1f} ms/forward on {prof.threads} threads"
        )
        t = Table(title="families (plan keys)")
        for col in ("family", "kind", "groups", "width", "MACs %", "params %", "time %"):
            t.add_column(col)
        for row in prof.family_table():
            t.add_row(row["family"], row["kind"], str(row["groups"]), ",".join(map(str, row["width"])),
                      f"{row['macs_share']:.1%}", f"{row['params_share']:.1%}", f"{row['latency_share']:.1%}")
        console.print(t)
        if groups:
            gt = Table(title="groups")
            for col in ("group", "family", "width", "MACs %", "ms"):
                gt.add_column(col)
            for g in prof.groups:
                gt.add_row(g.name, g.family, str(g.width), f"{g.macs / d['macs']:.2%}", f"{g.latency_ms:.2f}")
            console.print(gt)
        if prof.blocks:
            bt = Table(title="skippable residual blocks (plan key \"skip\")")
            for col in ("block", "MACs %", "params %"):
                bt.add_column(col)
            for b in prof.blocks:
                bt.add_row(b["block"], f"{b['macs_share']:.1%}", f"{b['params_share']:.1%}")
            console.print(bt)
        for name, why in prof.ignored.items():
            console.print(f"[dim]not pruned: {name}: {why}[/]")
        if out:
            write_json_atomic(out, prof.to_json())
            console.print(f"profile written to {out}")
