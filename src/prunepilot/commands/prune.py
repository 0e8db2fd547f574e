"""`prunepilot prune`: structured pruning to a MAC/params/latency budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..budget import Budget
from ..errors import PlanError
from ..plan import Plan
from .common import ShapeOpt, StateDictOpt, TrustOpt, WeightsOpt, console, load, result_table


def load_plan(path: Path | None, **overrides) -> Plan:
    if path is None:
        return Plan(**{k: v for k, v in overrides.items() if v is not None})
    if not path.exists():
        raise PlanError("plan file not found", str(path), "check the path")
    data = json.loads(path.read_text())
    if "requested" in data and "version" not in data:  # a plan.json written by a previous run
        data = data["requested"]
    plan = Plan.from_json_text(json.dumps(data))
    upd = {k: v for k, v in overrides.items() if v is not None}
    return plan.model_copy(update=upd) if upd else plan


def register(app: typer.Typer) -> None:
    @app.command()
    def prune(
        model: str = typer.Argument(..., help="Model URI: torchvision:NAME, timm:NAME, file:PATH, py:module:function."),
        target_macs: Optional[str] = typer.Option(None, "--target-macs", help="MACs target: absolute (1.77G) or relative (45%)."),
        target_params: Optional[str] = typer.Option(None, "--target-params", help="Parameter target: absolute (10M) or relative (60%)."),
        tolerance: str = typer.Option("+1%/-5%", "--tolerance", help="Band around each target: +OVER%/-UNDER%."),
        out: Path = typer.Option(Path("runs/prune"), "--out", help="Output folder (model, plan.json, result.json, summary.md)."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan JSON (its ratios are a shape; the projector rescales them)."),
        importance: Optional[str] = typer.Option(None, "--importance", help="Channel importance: l1, l2, taylor, random (default l2)."),
        round_to: Optional[int] = typer.Option(8, "--round-to", help="Keep widths multiples of this (CPU/GPU kernels prefer 8/16). 1 = no rounding."),
        prune_heads: bool = typer.Option(False, "--prune-heads", help="For ViTs: remove whole attention heads instead of head dims."),
        protect: list[str] = typer.Option([], "--protect", help="Module name or re:regex never to prune (repeatable)."),
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
    ) -> None:
        """Prune a model so its MACs/params land inside the tolerance band, with a real CPU speed-up.

        Without --plan the default shape is uniform (every group loses the same fraction); the projector finds
        the exact scale and moves single channel units between groups to land inside the band."""
        from ..pipeline import run_prune

        budget = Budget.parse(tolerance=tolerance, macs=target_macs, params=target_params)
        plan = load_plan(plan_file, importance=importance, round_to=None if round_to == 1 else round_to,
                         prune_heads=prune_heads or None, protected=list(protect) or None)
        loaded = load(model, weights, trust, input_shape, state_dict)
        with console.status("profiling, projecting, pruning, measuring"):
            result = run_prune(loaded, budget, plan, out)
        console.print(result_table(result))
        p = result["projection"]
        console.print(f"within band: {'[green]yes' if result['within_band'] else '[red]no'}[/]; "
                      f"errors {', '.join(f'{m} {e:+.3%}' for m, e in result['errors'].items())}; "
                      f"projection {p['iterations']} evals, {p['seconds']:.2f} s")
        if result.get("speedup"):
            console.print(f"CPU speed-up {result['speedup']:.2f}x (MAC ratio {result['ideal_speedup']:.2f}x)")
        console.print(f"written to {out}/ (result.json, plan.json, summary.md, model.pt)")
