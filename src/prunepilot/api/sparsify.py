"""`prunepilot.sparsify`: a transformers causal LM (or a model spec) and its tokenizer in, the same model object
sparsified in place and a `Result` out. The job is the CLI's (`prunepilot sparsify`): journaled, with a report,
in `out` when it is given, in a temporary folder (deleted afterwards, nothing exported) when it is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..errors import PlanError, PrunepilotError, SourceError
from .result import Result, folder_log, option_text, run_folder

# SparsifyConfig fields the API sets itself (the rest may be passed as **options)
_OWN = {"model", "sparsity", "method", "agent", "calib", "device", "dtype", "seed", "client", "progress", "history", "use_history"}


def _sparsity(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise PlanError("sparsity is a fraction in (0, 1), a percentage string or an N:M pattern", repr(value),
                        "e.g. sparsity=0.5, '50%', '2:4' or '2:4@40%'")
    return f"{value * 100:.10g}%"


def _calib(calib: Any) -> tuple[str | None, Any]:
    """(a text spec, or None with a CalibInput) from what the user passed."""
    from ..sparsify.run import CalibInput

    if calib is None:
        return "pydocs", None  # the offline default: Python documentation prose
    if isinstance(calib, str):
        return calib, None  # a spec, as on the CLI: pydocs | text:PATH | wikitext2 | hf:DATASET[:CONFIG]
    if isinstance(calib, torch.Tensor):
        return None, CalibInput(ids=calib)
    if hasattr(calib, "column_names") and hasattr(calib, "__getitem__"):  # a datasets.Dataset
        if "text" not in calib.column_names:
            raise SourceError("a calibration dataset needs a 'text' column", list(calib.column_names)[:5],
                              "ds.rename_column('content', 'text'), or pass a list of strings")
        return None, CalibInput(texts=[t for t in calib["text"] if isinstance(t, str)])
    if isinstance(calib, (list, tuple)) and calib and all(isinstance(t, str) for t in calib):
        return None, CalibInput(texts=list(calib))
    raise SourceError("calib is a list of strings, a token-id tensor [n, T], a datasets Dataset with a 'text' "
                      "column, a text spec string, or None", type(calib).__name__,
                      "e.g. calib=['first document ...', 'second ...']")


def sparsify(
    model: Any,
    tokenizer: Any = None,
    *,
    sparsity: float | str = 0.5,
    calib: Any = None,
    method: str = "sparsegpt",
    agent: str = "auto",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    out: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    progress: Callable[[str, int, int], None] | bool | None = None,
    log: Callable[[str], None] | None = print,
    workers: int = 1,
    ray_address: str | None = None,
    history: bool | str | Path = True,
    **options: Any,
) -> Result:
    """Sparsify a causal LM to an exact global sparsity (unstructured `0.5` / `"50%"`, `"2:4"` on every
    linear, or `"2:4@40%"`: 2:4 on the linears whose mask costs least on the probe, the rest dense, for 40%).

    `model`: a transformers causal LM object (sparsified in place, returned as `Result.model`) with its
    `tokenizer`, or a spec string as on the CLI ("smollm2", "hf:./dir", "gguf:file.gguf"; tokenizer ignored).
    `calib`: a list of strings, a token-id tensor [n, T] (the last rows become probe and evaluation rows), a
    `datasets` Dataset with a "text" column, a text spec ("pydocs", "text:PATH"), or None (offline Python docs).
    `method`: sparsegpt | wanda | magnitude. `agent`: auto | uniform | owl | sensitivity | an LLM spec.
    `device`/`dtype`: None/"auto" = CUDA when available / the model's own dtype; "cpu", "cuda:0", "bfloat16"...
    `out`: the run folder (journal, report, exported model); None = a temporary one, nothing exported.
    `resume=True` continues the run journaled in `out`; it needs the same model object, still dense.
    `progress`: fn(phase, done, total) for the block-by-block phases (None: a bar on a terminal; False: none).
    `workers`/`ray_address`: measure the loop's independent candidates (evolve's offspring) on Ray workers, each
    holding the model once (`pip install 'prunepilot[ray]'`); same seed, same plans as in-process.
    `history`: True = the cross-run history store in the prunepilot cache (a finished loop run is recorded; a
    new run on the same model starts its re-allocations from the nearest earlier run's best), a path = that
    store, False = neither read nor record.
    `**options`: any other SparsifyConfig field (calib_seqs, calib_seqlen, eval_seqs, eval_seqlen, probe_seqs,
    fidelity_seqs, grad_seqs, refine_iters, evals, bands, export_format, offload, search_masks="sparsegpt" to
    score the loop's trial allocations from a SparseGPT level database instead of Wanda masks, ...).
    """
    from ..loop import executor
    from ..sources.llm import LoadedLM, load_causal_lm
    from ..sparsify.run import SparsifyConfig, has_loop, run_sparsify

    valid = {f.name for f in fields(SparsifyConfig)} - _OWN
    unknown = sorted(set(options) - valid)
    if unknown:
        raise PlanError("unknown sparsify options", unknown, f"use any of: {', '.join(sorted(valid))}")
    if resume and out is None:
        raise PrunepilotError("resume needs the run folder", "resume=True without out=", "pass out=<the run's folder>")
    spec, calib_input = _calib(calib)
    if (workers > 1 or ray_address) and not has_loop(agent, str(sparsity)):
        raise PlanError("workers/ray_address measure the loop's candidates, and this run has no loop",
                        f"agent={agent!r}, sparsity={sparsity!r}", "drop workers/ray_address, or use a loop "
                        "strategist (evolve batches its offspring)")
    pool = executor.make(workers, ray_address, log=log)  # ray missing, an unreachable address: refused now
    if pool.remote:
        options["extra"] = {**options.get("extra", {}), "executor": {"workers": workers, "ray_address": ray_address}}
    if isinstance(model, str):
        loaded = load_causal_lm(model, dtype=option_text(dtype))
    else:
        loaded = LoadedLM.from_objects(model, tokenizer)
    options.setdefault("export", out is not None)
    cfg = SparsifyConfig(model=loaded.spec, sparsity=_sparsity(sparsity), method=method, agent=agent,
                         calib=spec or "pydocs", device=option_text(device), dtype=option_text(dtype), seed=seed, client=client,
                         progress=progress, history=str(history) if isinstance(history, (str, Path)) else None,
                         use_history=history is not False, **options)
    say = log or (lambda _msg: None)
    with executor.scoped(pool), run_folder(out, "prunepilot-sparsify-") as (folder, keep):
        run_id = _resume_id(folder) if resume else None
        raw = run_sparsify(cfg, folder, folder_log(say, folder, keep), run_id=run_id, overwrite=overwrite, loaded=loaded,
                           calib_input=calib_input)
        plan = json.loads((folder / "plan.json").read_text()) if (folder / "plan.json").exists() else {}
        report = folder / "report.html"
        return Result(model=loaded.model, plan=plan, metrics=raw.get("compressed", {}), dense=raw.get("dense", {}),
                      within_band=bool(raw.get("within_band")), run_id=raw.get("run_id"),
                      out=folder if keep else None, report_path=report if keep and report.exists() else None, raw=raw)


def _resume_id(folder: Path) -> str:
    from ..journal import Journal

    path = folder / "journal.sqlite"
    run_id = Journal(path).latest_run() if path.exists() else None
    if run_id is None:
        raise PrunepilotError("there is no run to resume in this folder", str(folder), "pass the folder of the run")
    return run_id
