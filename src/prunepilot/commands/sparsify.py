"""`prunepilot sparsify`: LLM unstructured / N:M sparsity with agent-chosen per-layer allocation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _fraction(text: str) -> float:
    from ..errors import BudgetError

    raw = text.strip().rstrip("%")
    try:
        v = float(raw) / (100 if text.strip().endswith("%") else 1)
    except ValueError:
        raise BudgetError("a rollback threshold is a percentage like 15%", text, "e.g. --rollback-threshold 15%") from None
    if not 0 < v < 10:
        raise BudgetError("a rollback threshold must be a positive rise in perplexity", text, "e.g. 15%")
    return v


def register(app: typer.Typer) -> None:
    @app.command()
    def sparsify(
        model: str = typer.Argument(..., help="smollm2 | gemma3-270m | gguf:PATH.gguf | hf:DIR_OR_HUB_ID | DIR"),
        sparsity: str = typer.Option("50%", "--sparsity", help="Global parameter-weighted sparsity (50%), an N:M pattern on every layer (2:4), or N:M under a budget (2:4@40%: the layers whose 2:4 mask costs least take it, the rest stay dense)."),
        method: str = typer.Option("sparsegpt", "--method", help="Final masks/weights: sparsegpt (default; reconstructs the kept weights), wanda (masks only, about half the time) or magnitude."),
        agent: str = typer.Option("auto", "--agent", help="auto | uniform | owl | sensitivity | evolve | evolve+LLM (e.g. evolve+local: every 4th offspring from the LLM) | local | anthropic[:MODEL] | openai[:MODEL] | openai-compatible:MODEL."),
        calib: str = typer.Option("pydocs", "--calib", help="Calibration text: pydocs | text:PATH | wikitext2 | hf:DATASET[:CONFIG]."),
        eval_text: Optional[str] = typer.Option(None, "--eval", help="Evaluation text (default: the held-out part of --calib's source)."),
        rollback_threshold: str = typer.Option("15%", "--rollback-threshold", help="Roll back a step whose probe perplexity rises more than this."),
        step: float = typer.Option(0.1, "--step", help="Initial global sparsity increment per iteration."),
        refine_iters: int = typer.Option(8, "--refine-iters", help="Re-allocations tried at the target; the one with the lowest probe KL to the dense model is kept (0: stop when the ramp reaches the target)."),
        search_masks: str = typer.Option("wanda", "--search-masks", help="How the loop scores trial allocations: wanda (masks from a Wanda bank; cheap) or sparsegpt (a database of SparseGPT-pruned levels per layer, after EvoPress: the search ranks allocations as the final SparseGPT will prune them; costs a few minutes and several GB of scratch disk per 100M weights; needs --method sparsegpt)."),
        evals: Optional[int] = typer.Option(None, "--evals", min=1, help="Evaluation budget of the loop: candidates measured on the probe (any probe size; the ramp and the uniform reference always run). Overrides --refine-iters; evolve defaults to 100."),
        calib_seqs: int = typer.Option(32, "--calib-seqs", help="Calibration sequences."),
        seqlen: int = typer.Option(512, "--seqlen", help="Calibration sequence length."),
        eval_seqs: int = typer.Option(16, "--eval-seqs", help="Evaluation sequences."),
        eval_seqlen: int = typer.Option(1024, "--eval-seqlen", help="Evaluation sequence length."),
        probe_seqs: int = typer.Option(4, "--probe-seqs", help="Probe sequences (held-out calibration text) measured each iteration."),
        probe_seqlen: int = typer.Option(256, "--probe-seqlen", help="Probe sequence length."),
        bands: int = typer.Option(3, "--bands", help="Depth bands per layer kind (groups the analyst allocates)."),
        llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", help="Base URL of an OpenAI-compatible server."),
        out: Path = typer.Option(Path("runs/sparsify"), "--out", help="Output folder."),
        no_export: bool = typer.Option(False, "--no-export", help="Skip save_pretrained of the sparse model."),
        export_format: str = typer.Option("safetensors", "--format", help="Export: safetensors (dense, in the checkpoint's dtype) or compressed-tensors (sparse-bitmask; 2:4 as sparse-24-bitmask)."),
        device: str = typer.Option("auto", "--device", help="auto (CUDA when available) | cpu | cuda | cuda:N. On CUDA a model too large for the GPU keeps its blocks on the CPU, one on the GPU at a time."),
        dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's dtype: bf16 stays bf16) | float32 | bfloat16 | float16. Exports keep the checkpoint's dtype."),
        grad_seqs: int = typer.Option(2, "--grad-seqs", min=0, help="Sequences for gradient importance in the profile (0: skip the backward pass)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run already in --out (otherwise a second run there is refused)."),
        seed: int = typer.Option(0, "--seed", help="Seed for calibration sampling."),
        history: Optional[Path] = typer.Option(None, "--history", help="Cross-run history store (default: the prunepilot cache, history.sqlite): a finished loop run is recorded there; a new run on the same model starts its re-allocations from the nearest earlier run's best."),
        no_history: bool = typer.Option(False, "--no-history", help="Neither read nor record cross-run history."),
        workers: int = typer.Option(1, "--workers", min=1, help="Measure a batch of independent candidates (evolve's offspring of one generation) on N Ray workers, each holding the model once; 1 = in this process. Same seed, same plans."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join a running Ray cluster (HOST:PORT from `ray start --head`, ray://HOST:PORT, or auto) instead of starting a local one."),
    ) -> None:
        """Sparsify a causal LM to an exact global sparsity. An analyst allocates it per layer group: a ramp to the
        target rolls back steps that raise held-out probe perplexity too much, then re-allocations at the target
        keep the one closest to the dense model (probe KL; uniform is always measured as a reference). Writes
        result.json, plan.json, profile.json, journal.sqlite (every attempt and LLM call), summary.md,
        report.html and model/ (save_pretrained)."""
        from rich.console import Console

        from ..errors import PlanError
        from ..loop import executor
        from ..sparsify.run import SparsifyConfig, has_loop, run_sparsify

        console = Console(stderr=True)
        if (workers > 1 or ray_address) and not has_loop(agent, sparsity):
            raise PlanError("--workers/--ray-address measure the loop's candidates, and this run has no loop",
                            f"--agent {agent} --sparsity {sparsity}", "drop --workers/--ray-address, or use a loop "
                            "strategist (evolve batches its offspring)")
        if history is not None and no_history:
            raise PlanError("--history and --no-history contradict each other", f"--history {history} --no-history",
                            "keep one of them")
        if history is not None and not has_loop(agent, sparsity):
            raise PlanError("--history is read and written by the allocation loop, and this run has no loop",
                            f"--agent {agent} --sparsity {sparsity}", "drop --history, or use a loop strategist "
                            "(sensitivity, evolve, an LLM)")
        pool = executor.make(workers, ray_address, log=lambda s: console.print(s))  # ray missing / unreachable: now
        cfg = SparsifyConfig(model=model, sparsity=sparsity, method=method, agent=agent, calib=calib, search_masks=search_masks,
                             eval=eval_text, rollback_threshold=_fraction(rollback_threshold), step=step, refine_iters=refine_iters, evals=evals,
                             calib_seqs=calib_seqs, calib_seqlen=seqlen, eval_seqs=eval_seqs,
                             eval_seqlen=eval_seqlen, probe_seqs=probe_seqs, probe_seqlen=probe_seqlen, bands=bands, llm_base_url=llm_base_url, export=not no_export, seed=seed,
                             export_format=export_format, device=device, dtype=dtype, grad_seqs=grad_seqs,
                             history=str(history) if history else None, use_history=not no_history,
                             extra={"executor": {"workers": workers, "ray_address": ray_address}} if pool.remote else {})
        with executor.scoped(pool):
            result = run_sparsify(cfg, out, say=lambda s: console.print(s), overwrite=overwrite)
        d, c = result["dense"], result["compressed"]
        console.print(f"[bold]perplexity[/] {d['perplexity']:.2f} -> {c['perplexity']:.2f}; sparsity "
                      f"{c['sparsity']:.4f} ({result['pattern']}, {result['method']}, agent {result['agent']}); "
                      f"within band: {result['within_band']}; wrote {out}")
