"""`prunepilot.prune`, `prunepilot.compress`, `prunepilot.quantize`: the user's model, inputs, DataLoaders and
metric in; a `Result` out. The same jobs the CLI runs (journaled, resumable, with a report) when `out` is set;
a temporary folder (deleted afterwards) when it is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..budget import Budget
from ..errors import PlanError, PrunepilotError
from ..inputs import ExampleInputs, tensors
from ..plan import Plan
from .result import Result, folder_log, option_text, run_folder

BudgetValue = str | float | int | None


def _target(name: str, value: BudgetValue) -> str | None:
    """"1.77G" / "50%" as on the CLI; a number in (0, 1] is a fraction of the dense model, above 1 absolute."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{name} is a number or a string like '50%' / '1.77G'", repr(value), f"e.g. {name}=0.5")
    if value <= 0:
        raise PlanError(f"{name} must be positive", value, f"e.g. {name}=0.5 (half the dense model)")
    return f"{value * 100:.10g}%" if value <= 1 else f"{value:.10g}"


def _budget(target_macs: BudgetValue, target_params: BudgetValue, target_latency: BudgetValue,
            tolerance: str | None, target_memory: BudgetValue = None, target_size: BudgetValue = None) -> Budget:
    lat = target_latency if not isinstance(target_latency, (int, float)) or target_latency <= 1 else f"{target_latency}ms"
    return Budget.parse(tolerance=tolerance or "+1%/-5%", macs=_target("target_macs", target_macs),
                        params=_target("target_params", target_params), latency_ms=_target("target_latency", lat),
                        memory_mb=_target("target_memory", target_memory), size_mb=_target("target_size", target_size))


def _has(budget: Budget, metric: str) -> bool:
    return any(t.metric == metric for t in budget.targets)


def _loaded(model: nn.Module, example_inputs: ExampleInputs):
    from ..sources.models import LoadedModel

    if not isinstance(model, nn.Module):
        raise PrunepilotError("the model must be a torch nn.Module", type(model).__name__,
                              "pass the module object (for a URI use the CLI or sources.models.load_model)")
    if not tensors(example_inputs):
        raise PrunepilotError("example inputs must hold at least one tensor (a batch the model accepts)",
                              type(example_inputs).__name__, "e.g. torch.randn(1, 3, 224, 224) or {'input_ids': ids}")
    model.eval()
    return LoadedModel(model, example_inputs, f"python:{type(model).__name__}",
                       f"{type(model).__name__} handed in from Python")


def _result(raw: dict[str, Any], model: nn.Module, out: Path, keep: bool) -> Result:
    plan: dict[str, Any] = {}
    if (out / "plan.json").exists():
        plan = json.loads((out / "plan.json").read_text())
    report = out / "report.html"
    return Result(model=model, plan=plan, metrics=raw.get("compressed", {}), dense=raw.get("dense", {}),
                  within_band=bool(raw.get("within_band")), run_id=raw.get("run_id"), out=out if keep else None,
                  report_path=report if keep and report.exists() else None, raw=raw)


def prune(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    target_macs: BudgetValue = None,
    target_params: BudgetValue = None,
    target_latency: BudgetValue = None,
    tolerance: str | None = None,
    train: Iterable | None = None,
    val: Iterable | None = None,
    test: Iterable | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    agent: str = "auto",
    rounds: int = 8,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    out: str | Path | None = None,
    protect: Sequence[str] = (),
    skip: Sequence[str] = (),
    plan: Plan | dict | None = None,
    importance: str | None = None,
    round_to: int | None = None,
    align: bool = False,
    finetune_steps: int = 60,
    finetune_epochs: float = 1.0,
    kd: bool = True,
    eval_limit: int = 2000,
    seed: int = 0,
    history: bool | str | Path = True,
    overwrite: bool = False,
    resume: bool = False,
    client: Any = None,
    log: Callable[[str], None] | None = print,
) -> Result:
    """Prune `model` so its MACs / params (or measured latency) land inside the budget band.

    Budgets: `target_macs=0.5` (a fraction of the dense model), `"1.77G"`, `"45%"`; `target_latency="50%"` or
    milliseconds (measured on `device`: per-op latency tables, cached, then a fresh measurement). Without data:
    one plan (uniform, or `plan`) projected exactly onto the budget. With `train`
    (and `val` or `evaluate`): the agent loop ranks candidates after an equal short recovery, then the winner
    is fine-tuned for `finetune_epochs` and tested on `test` (else `val`). Batches are the user's own:
    `(inputs, target)` pairs, `(x1, x2, target)`, or dicts (label keys `labels`/`label`/`y`/`target`).
    `evaluate(model) -> float` (higher is better) replaces top-1 as the ranking score; `loss(model, batch)`
    replaces the built-in objective (cross-entropy, MSE for float targets, distillation without labels).
    `device`/`dtype`: "auto" (CUDA when available, the model's own dtype), "cpu", "cuda:0", "bfloat16"...;
    the model is moved there in place. `skip`: residual blocks removed whole (replaced by the identity) in every
    candidate (`prunepilot profile MODEL` lists the skippable ones; `agent="blocks"` chooses them).
    `align=True`: channel multiples per family chosen by measured latency
    (always on for a latency budget unless `round_to` is given). `out`: the run folder (journal, report, model files); None = a
    temporary one. `resume=True` continues the run journaled in `out` (the same model, unchanged).
    """
    from ..jobs.prune import PruneRun, PruneSettings, UserConstraints, place_loaded, run_prune_search

    if rounds < 1:
        raise PlanError("rounds must be at least 1", rounds, "e.g. rounds=8")
    budget = _budget(target_macs, target_params, target_latency, tolerance)
    user_plan = _plan(plan)
    loaded = _loaded(model, example_inputs)
    logger = log or (lambda _msg: None)
    has_data = train is not None or val is not None or evaluate is not None
    if resume and out is None:
        raise PrunepilotError("resume needs the run folder", "resume=True without out=", "pass out=<the run's folder>")
    if has_data:
        from ..sources.user_data import UserData

        if train is None and (finetune_steps > 0 or finetune_epochs > 0):  # never fine-tune on the scoring data
            raise PrunepilotError("recovery needs training batches", "val/evaluate without train=",
                                  "pass train=, or finetune_steps=0 and finetune_epochs=0 to score without training")
        if val is None and evaluate is None:
            raise PrunepilotError("candidates need a score", "train= without val= or evaluate=",
                                  "pass val= (labelled batches) or evaluate=lambda model: ...")
        data = UserData(train if train is not None else val, val, test)  # without train: BN statistics from val
        settings = PruneSettings(rounds=rounds, finetune_steps=finetune_steps, eval_limit=eval_limit,
                                 finetune_epochs=finetune_epochs, kd=kd, seed=seed)
        constraints = UserConstraints(protected=tuple(protect), importance=importance, round_to=round_to,
                                      plan=user_plan, skip=tuple(skip))
        with run_folder(out) as (folder, keep):
            run = PruneRun(budget, data, folder, agent=agent, settings=settings, user=constraints,
                           history_path=Path(history) if isinstance(history, (str, Path)) else None,
                           use_history=history is not False, device=option_text(device), dtype=option_text(dtype),
                           evaluate=evaluate, loss_fn=loss, align=align)
            run_id = _resume_id(folder, loaded) if resume else None
            raw, pruned = run_prune_search(loaded, run, run_id=run_id, overwrite=overwrite, client=client,
                                           log=folder_log(logger, folder, keep), return_model=True)
            return _result(raw, pruned, folder, keep)
    if agent != "auto":
        raise PlanError("an agent needs data to score candidates with", f"agent={agent!r} without train/val/evaluate",
                        "pass train= and val= (or evaluate=), or drop agent= for one projected plan")
    from ..journal import prepare_out

    one = (user_plan or Plan()).model_copy(update={
        k: v for k, v in {"importance": importance, "protected": list(protect) or None,
                          "round_to": None if round_to == 1 else (round_to or 8)}.items() if v is not None})
    if round_to == 1:
        one = one.model_copy(update={"round_to": None})
    one = one.with_skip(skip)
    with run_folder(out) as (folder, keep):
        prepare_out(folder, overwrite=overwrite)
        place_loaded(loaded, option_text(device), option_text(dtype))
        if _has(budget, "latency_ms") or align:
            from ..latency.job import run_prune_to_latency

            raw, pruned = run_prune_to_latency(loaded, budget, one, folder, align=align or round_to is None,
                                               log=folder_log(logger, folder, keep), return_model=True)
        else:
            from ..pipeline import run_prune

            raw, pruned = run_prune(loaded, budget, one, folder, return_model=True)
        _render(folder, folder_log(logger, folder, keep), keep)
        return _result(raw, pruned, folder, keep)


def compress(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    target_macs: BudgetValue = None,
    target_params: BudgetValue = None,
    target_latency: BudgetValue = None,
    target_memory: BudgetValue = None,
    target_size: BudgetValue = None,
    tolerance: str | None = None,
    train: Iterable | None = None,
    val: Iterable | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    quantization: Sequence[str] = ("none", "int8_dynamic"),
    finetune_steps: int = 40,
    finetune_epochs: float = 1.0,
    kd: bool = True,
    eval_limit: int = 1000,
    seed: int = 0,
    device: str | torch.device | None = None,
    out: str | Path | None = None,
    plan: Plan | dict | None = None,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] | None = print,
) -> Result:
    """Joint pruning + int8 quantization under measured budgets (memory, latency, serialized size) and static ones (MACs, params):
    every quantization option is bracketed to its least pruning that meets the measured budget, and the best
    scoring point (top-1 on `val`, or `evaluate(model)`) wins; without data the least pruning wins. With `train`
    the winner then gets a final recovery: `finetune_epochs` of fine-tuning (distilled from the dense model with
    `kd`; 0: none), int8 applied again, measured again (`raw["recovery"]`: dense / before / after quality).
    Eager dynamic int8 is a CPU format: `device` other than CPU is refused for it. Every measurement is
    journaled in `out`; `resume=True` continues a killed run there with the measurements it had."""
    from ..jobs.compress import CompressRun, CompressSettings, run_compress_job
    from ..jobs.prune import place_loaded

    budget = _budget(target_macs, target_params, target_latency, tolerance, target_memory, target_size)
    loaded = _loaded(model, example_inputs)
    dev = option_text(device)
    if "int8_dynamic" in quantization and dev not in (None, "auto", "cpu"):
        raise PrunepilotError("eager dynamic int8 runs on the CPU only", f"device={dev!r}",
                              "pass device='cpu', or quantization=('none',) to prune only")
    if resume and out is None:
        raise PrunepilotError("resume needs the run folder", "resume=True without out=", "pass out=<the run's folder>")
    data = None
    if train is not None or val is not None or evaluate is not None:
        from ..sources.user_data import UserData

        data = UserData(train if train is not None else val, val)
    # never fine-tuned on the scoring data: without train= neither the short nor the final recovery runs
    if train is None and data is not None and (finetune_steps > 0 or finetune_epochs > 0) and log is not None:
        log("no train= batches: candidates are scored without recovery and the winner gets no final fine-tune "
            "(pass train= to recover; the scoring data is never trained on)")
    settings = CompressSettings(quant_options=tuple(quantization), finetune_steps=finetune_steps if train is not None else 0,
                                finetune_epochs=finetune_epochs if train is not None else 0.0, kd=kd,
                                eval_limit=eval_limit, seed=seed)
    with run_folder(out) as (folder, keep):
        run = CompressRun(budget, folder, data=data, plan=_plan(plan) or Plan(round_to=8), settings=settings,
                          evaluate=evaluate)
        run_id = _resume_id(folder, loaded) if resume else None
        place_loaded(loaded, dev if dev not in (None, "auto") or "int8_dynamic" not in quantization else "cpu", None)
        raw, best = run_compress_job(loaded, run, run_id=run_id, overwrite=overwrite,
                                     log=folder_log(log or (lambda _m: None), folder, keep), return_model=True)
        return _result(raw, best, folder, keep)


def quantize(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    layers: str = "auto",
    backend: str = "eager",
    scheme: str = "int8_dynamic",
    out: str | Path | None = None,
    **options: Any,
) -> Result:
    """Per-layer quantization chosen from measured latency shares (see `prunepilot quantize --help`)."""
    from ..jobs.quantize import quantize as run

    with run_folder(out) as (folder, keep):
        raw, compressed = run(model, example_input, out=folder, layers=layers, backend=backend, scheme=scheme,
                              return_model=True, **options)
        return _result(raw, compressed, folder, keep)


def _plan(plan: Plan | dict | None) -> Plan | None:
    if plan is None or isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_json_text(json.dumps(plan))
    raise PlanError("plan is a prunepilot.Plan or a dict", type(plan).__name__, "e.g. plan={'ratios': {...}}")


def _resume_id(folder: Path, loaded) -> str:
    from ..jobs.prune import _module_digest
    from ..journal import Journal

    path = folder / "journal.sqlite"
    if not path.exists():
        raise PrunepilotError("there is no run to resume in this folder", str(folder), "pass the folder of the run")
    journal = Journal(path)
    run_id = journal.latest_run()
    if run_id is None:
        raise PrunepilotError("there is no run to resume in this folder", str(folder), "pass the folder of the run")
    config = journal.run(run_id)["config"]
    if config.get("model_sha256") and config["model_sha256"] != _module_digest(loaded.module):
        raise PrunepilotError("this is not the model the run started with (its weights differ)", run_id,
                              "pass the same, unchanged model, or start a new run (overwrite=True)")
    return run_id


def _render(folder: Path, log: Callable[[str], None], keep: bool) -> None:
    if keep:
        from ..report.render import render_safely

        render_safely(folder, log)
