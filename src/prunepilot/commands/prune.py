"""`prunepilot prune`: structured pruning to a MAC/params/latency budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..budget import Budget
from ..errors import PlanError
from ..plan import Plan
from .common import (CropOpt, DeviceOpt, DtypeOpt, NormalizeOpt, ResizeOpt, ShapeOpt, StateDictOpt, TrustOpt,
                     WeightsOpt, console, load, result_table)


def load_plan(path: Path | None, **overrides) -> Plan:
    if path is None:
        return Plan(**{k: v for k, v in overrides.items() if v is not None})
    if not path.exists():
        raise PlanError("plan file not found", str(path), "check the path")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlanError("a plan file must be a readable JSON object", f"{path}: {exc}", "fix the file (see `prunepilot profile` for names)") from None
    if not isinstance(data, dict):
        raise PlanError("a plan file must hold a JSON object", f"{path}: {type(data).__name__}", "write {\"ratios\": {...}, ...}")
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
        target_latency: Optional[str] = typer.Option(None, "--target-latency", help="Latency target on this device (batch of --input-shape): absolute (20ms) or relative (50%); projected on per-op latency tables measured here (cached), verified by a fresh measurement."),
        tolerance: str = typer.Option("+1%/-5%", "--tolerance", help="Band around each target: +OVER%/-UNDER%."),
        out: Path = typer.Option(Path("runs/prune"), "--out", help="Output folder (model, plan.json, result.json, summary.md)."),
        plan_file: Optional[Path] = typer.Option(None, "--plan", help="A plan JSON (its ratios are a shape; the projector rescales them)."),
        importance: Optional[str] = typer.Option(None, "--importance", help="Channel importance: l1, l2, taylor (gradients on calibration batches; needs --data), random. Default: l2, or the strategist's choice in the agent loop."),
        round_to: Optional[int] = typer.Option(None, "--round-to", help="Keep widths multiples of this (CPU/GPU kernels prefer 8/16); 1 = no rounding. Default: 8, or the strategist's choice in the agent loop."),
        align: bool = typer.Option(False, "--align", help="Choose each family's channel multiple by measuring its ops over a sweep of kept widths on this device (the multiple whose widths run fastest against the trend; builds per-op latency tables, cached); on by default with --target-latency unless --round-to is given."),
        prune_heads: bool = typer.Option(False, "--prune-heads", help="For ViTs: remove whole attention heads instead of head dims."),
        protect: list[str] = typer.Option([], "--protect", help="Module name or re:regex never to prune (repeatable)."),
        skip: list[str] = typer.Option([], "--skip", help="Residual block to remove whole, replaced by the identity, in every candidate (repeatable; `prunepilot profile` lists the skippable blocks)."),
        data: Optional[str] = typer.Option(None, "--data", help="Labelled data for the agent loop: fashion-mnist[:DIR], imagefolder:DIR, hf:NAME. Without it: one projected plan, no accuracy."),
        agent: str = typer.Option("auto", "--agent", help="Strategist: auto, sensitivity, uniform, grid, optuna, blocks (skip whole residual blocks where measured cheap, channels for the rest), evolve (evolutionary search over per-family ratios; every round spent), evolve+LLM (e.g. evolve+local: an LLM answers every 4th offspring), local, anthropic[:MODEL], openai[:MODEL], openai-compatible:MODEL (auto = an API model when ANTHROPIC_API_KEY/OPENAI_API_KEY is set, else sensitivity)."),
        rounds: int = typer.Option(8, "--rounds", help="Agent rounds (each re-prunes the dense model with a new plan)."),
        finetune_steps: int = typer.Option(60, "--finetune-steps", help="In-loop recovery steps per candidate (equal for all)."),
        finetune_epochs: float = typer.Option(1.0, "--finetune-epochs", help="Final fine-tune of the winner, in epochs."),
        kd: bool = typer.Option(True, "--kd/--no-kd", help="Distil from the dense model in the final fine-tune."),
        eval_limit: int = typer.Option(2000, "--eval-limit", help="Validation images scored per candidate."),
        llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", help="OpenAI-compatible server (vLLM, Ollama, llama.cpp server)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out (otherwise a second run there is refused)."),
        history: Optional[Path] = typer.Option(None, "--history", help="Cross-run history store (default: the prunepilot cache, history.sqlite)."),
        no_history: bool = typer.Option(False, "--no-history", help="Neither read nor record cross-run history."),
        seed: int = typer.Option(0, "--seed", help="Seed for data order, recovery and strategists."),
        workers: int = typer.Option(1, "--workers", min=1, help="Recover and score the loop's candidates on N Ray workers, each holding the data and dense model once (with --data); 1 = in this process. Candidates a strategist declares independent are measured at once; same seed, same plans."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join a running Ray cluster (HOST:PORT from `ray start --head`, ray://HOST:PORT, or auto) instead of starting a local one (with --data)."),
        normalize: str = NormalizeOpt,
        resize: Optional[int] = ResizeOpt,
        crop: Optional[int] = CropOpt,
        device: str = DeviceOpt,
        dtype: str = DtypeOpt,
        weights: str = WeightsOpt,
        trust: bool = TrustOpt,
        input_shape: Optional[str] = ShapeOpt,
        state_dict: Optional[Path] = StateDictOpt,
    ) -> None:
        """Prune a model so its MACs/params land inside the tolerance band, with a real CPU speed-up.

        Without --data: one plan (uniform shape, or --plan), projected exactly onto the budget. With --data: the
        agent loop (analyst proposes, projector guarantees, short recovery ranks candidates, best kept on disk),
        then a final fine-tune, test accuracy, export and report. Every run is journaled in OUT/journal.sqlite.
        --target-latency is projected on latency tables measured on this device (cached), with channel multiples
        chosen per family by measurement unless --round-to is given, and verified by a fresh measurement.
        Exit code 3: the result was written but lies outside the band (result.json and summary.md say why)."""
        from ..journal import prepare_out
        from ..pipeline import run_prune

        if importance is not None and importance not in ("l1", "l2", "taylor", "random"):
            raise PlanError("--importance is one of l1, l2, taylor, random", importance, "e.g. --importance l2")
        if importance == "taylor" and data is None:
            raise PlanError("Taylor importance needs gradients from labelled data", "--importance taylor without --data",
                            "pass --data, or use --importance l2")
        if rounds < 1:
            raise PlanError("--rounds must be at least 1", rounds, "e.g. --rounds 8")
        if history is not None and no_history:
            raise PlanError("--history and --no-history contradict each other", f"--history {history} --no-history",
                            "keep one of them")
        if history is not None and data is None:
            raise PlanError("--history is read and written by the agent loop, which needs --data", f"--history {history}",
                            "pass --data, or drop --history (a run without data is one projection, nothing to learn)")
        if (workers > 1 or ray_address) and data is None:
            raise PlanError("--workers/--ray-address measure the agent loop's candidates, which needs --data",
                            "no --data given", "pass --data, or drop --workers/--ray-address")
        from ..loop import executor

        pool = executor.make(workers, ray_address, log=console.print)  # ray missing, an unreachable address: now
        budget = Budget.parse(tolerance=tolerance, macs=target_macs, params=target_params, latency_ms=target_latency)
        from ..device import resolve_device, resolve_dtype
        from ..sources.data import parse_normalize

        resolve_device(device), resolve_dtype(dtype)  # a bad --device/--dtype is refused before loading anything
        if data is None and (normalize != "auto" or resize is not None or crop is not None):
            raise PlanError("--normalize/--resize/--crop preprocess --data images", "no --data given",
                            "pass --data, or drop them")
        parse_normalize(normalize, resize=resize, crop=crop)
        loaded = load(model, weights, trust, input_shape, state_dict)
        if data is None and agent != "auto":
            raise PlanError("--agent needs --data: without data there is nothing to score candidates with",
                            f"--agent {agent}", "pass --data, or drop --agent for one projected plan")
        if data is not None:
            from ..jobs.prune import PruneRun, PruneSettings, UserConstraints, run_prune_search

            user = UserConstraints(protected=tuple(protect), importance=importance, round_to=round_to,
                                   prune_heads=True if prune_heads else None,
                                   plan=load_plan(plan_file) if plan_file else None, skip=tuple(skip))
            settings = PruneSettings(rounds=rounds, finetune_steps=finetune_steps, eval_limit=eval_limit,
                                     finetune_epochs=finetune_epochs, kd=kd, seed=seed)
            run = PruneRun(budget, data, out, agent=agent, settings=settings, user=user, history_path=history,
                           use_history=not no_history, base_url=llm_base_url, normalize=normalize, resize=resize,
                           crop=crop, device=device, dtype=dtype, align=align)
            with executor.scoped(pool):
                result = run_prune_search(loaded, run, overwrite=overwrite, log=console.print)
        else:
            plan = load_plan(plan_file, importance=importance, round_to=None if round_to == 1 else (round_to or 8),
                             prune_heads=prune_heads or None, protected=list(protect) or None)
            plan = plan.with_skip(skip)
            prepare_out(out, overwrite=overwrite)
            from ..jobs.prune import place_loaded

            place_loaded(loaded, device, dtype)
            if target_latency is not None or align:
                from ..latency.job import run_prune_to_latency

                # a measured target: the device's latency tables project it, a fresh measurement verifies it
                result = run_prune_to_latency(loaded, budget, plan, out, align=align or round_to is None,
                                              log=console.print)
            else:
                with console.status("profiling, projecting, pruning, measuring"):
                    result = run_prune(loaded, budget, plan, out)
            from ..report.render import render_safely

            render_safely(out, console.print)
        console.print(result_table(result))
        for w in result.get("warnings") or []:
            console.print(f"[bold red]WARNING[/]: {w}", markup=True, highlight=False)
        console.print(f"within band: {'[green]yes' if result['within_band'] else '[red]no'}[/]; "
                      f"errors {', '.join(f'{m} {e:+.3%}' for m, e in result['errors'].items())}")
        if result.get("speedup") and result.get("ideal_speedup"):
            console.print(f"CPU speed-up {result['speedup']:.2f}x (MAC ratio {result['ideal_speedup']:.2f}x)")
        console.print(f"written to {out}/ (result.json, plan.json, summary.md, model.safetensors + structure.json)")
        if not result["within_band"]:
            why = result.get("reason") or (result.get("projection") or {}).get("reason") or "see summary.md"
            console.print(f"[red]outside the budget band[/]: {why}", highlight=False)
            raise typer.Exit(3)
