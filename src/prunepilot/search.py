"""The agent-driven prune job: profile + sensitivity -> Master loop -> final recovery -> test -> save -> report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from .agents.master import Evaluator, Master, SearchConfig, measure_sensitivity
from .agents.strategists import BUILTINS, SensitivityStrategist, make_builtin
from .budget import Budget
from .evaluate.speed import compare_latency
from .journal import Journal
from .pipeline import Pruner, measure_block, save_model, summary_markdown
from .results import build_result, write_json_atomic, write_text_atomic
from .sources.models import LoadedModel


def make_strategist(agent: str, *, base_url: str | None = None, api_key: str | None = None, transcripts: list | None = None):
    """'auto' picks Anthropic/OpenAI when a key is set, else the local model if installed, else `sensitivity`."""
    if agent in BUILTINS:
        return make_builtin(agent), agent
    from .agents.analyst import LLMAnalyst
    from .agents.llm.factory import make_client, resolve_auto

    spec = agent
    if agent == "auto":
        spec = resolve_auto()
        if spec is None:
            return SensitivityStrategist(), "sensitivity"
    client = make_client(spec, base_url=base_url, api_key=api_key, transcripts=transcripts)
    return LLMAnalyst(client, SensitivityStrategist()), spec


def run_search(
    loaded: LoadedModel,
    budget: Budget,
    data_spec: str,
    out: Path,
    *,
    agent: str = "auto",
    cfg: SearchConfig | None = None,
    finetune_epochs: float = 1.0,
    kd: bool = True,
    journal_path: Path | None = None,
    run_id: str | None = None,
    base_url: str | None = None,
    api_key: str | None = None,
    transcripts: list | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from .engines.recover import finetune
    from .evaluate.classification import evaluate_classifier
    from .sources.data import load_data

    cfg = cfg or SearchConfig()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    journal = Journal(journal_path or out / "journal.sqlite")
    config = {"model": loaded.uri, "budget": budget.model_dump(), "data": data_spec, "agent": agent,
              "search": cfg.__dict__, "finetune_epochs": finetune_epochs, "kd": kd, "out": str(out)}
    if run_id is None:
        run_id = journal.start_run("prune", config, out)
    (out / "run_id").write_text(run_id)
    data = load_data(data_spec, input_shape=tuple(loaded.example_input.shape[1:]), seed=cfg.seed)
    pruner = Pruner(loaded)
    rb = budget.resolve(pruner.profile.dense)
    evaluator = Evaluator(data, pruner.dense, cfg)
    log("measuring per-family sensitivity")
    pruner.profile.sensitivity = measure_sensitivity(pruner, evaluator, cfg.sensitivity_ratio)
    write_json_atomic(out / "profile.json", pruner.profile.to_json())
    strategist, resolved = make_strategist(agent, base_url=base_url, api_key=api_key, transcripts=transcripts)
    log(f"strategist: {resolved}")
    master = Master(pruner, rb, strategist, evaluator, journal, run_id, out, cfg, log)
    best = master.run()
    history = journal.attempts(run_id)
    if best is None:
        journal.finish_run(run_id, "infeasible")
        raise RuntimeError("no attempt landed inside the budget band; see attempts.jsonl for the reasons")

    # Final recovery of the winner, from the saved best model (anytime result), with optional distillation.
    model = torch.load(out / "best_model.pt", weights_only=False)  # written by this run itself
    if finetune_epochs > 0:
        log(f"final fine-tune: {finetune_epochs} epoch(s){' with distillation' if kd else ''}")
        finetune(model, evaluator.train, epochs=finetune_epochs, lr=cfg.lr * 2, teacher=pruner.dense if kd else None,
                 seed=cfg.seed, progress=True)
    test = data.loader("test", batch_size=256, shuffle=False)
    dense_acc = evaluate_classifier(pruner.dense, test)["top1"]
    comp_acc = evaluate_classifier(model, test)["top1"]
    lat = compare_latency({"dense": pruner.dense, "compressed": model}, pruner.x, rounds=10)
    from .pipeline import count_real

    counts = count_real(model, pruner.x)
    dense_block = measure_block(pruner.dense, pruner.x, {"macs": pruner.profile.dense["macs"], "params": pruner.profile.dense["params"]}, lat["dense"].median_ms)
    dense_block["accuracy"] = dense_acc
    comp_block = measure_block(model, pruner.x, counts, lat["compressed"].median_ms)
    comp_block["accuracy"] = comp_acc
    errors = {m: rb.error(m, comp_block[m]) for m in rb.goals}
    export = save_model(model, pruner.x, out)
    best_plan = best["plan"]
    write_json_atomic(out / "plan.json", {"requested": best_plan, "projected": {**best_plan, "ratios": best["projected_ratios"], "default_ratio": 0.0}})
    within = [h for h in history if h.get("within_band")]
    result = build_result(
        kind="prune", model=loaded.uri, budget=rb.to_json(), dense=dense_block, compressed=comp_block,
        within_band=all(rb.within(m, comp_block[m]) for m in rb.goals), errors=errors,
        agent=resolved, data=data.to_json(), rounds=len(history), best_round=best["round"],
        within_band_rate=len(within) / max(1, len(history)),
        speedup=dense_block["latency_ms"] / comp_block["latency_ms"], ideal_speedup=dense_block["macs"] / comp_block["macs"],
        widths=_widths(model, pruner),
        skipped=pruner.profile.ignored, export=export, recovery={"final_epochs": finetune_epochs, "kd": kd, "in_loop_steps": cfg.finetune_steps},
        run_id=run_id, seconds=time.perf_counter() - t0,
    )
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result))
    journal.finish_run(run_id, "done", result)
    render(out, log)
    return result


def _widths(model: torch.nn.Module, pruner: Pruner) -> dict[str, list[int]]:
    """Dense vs final width per group, read off the pruned modules themselves."""
    mods = dict(model.named_modules())
    out = {}
    for name, g in pruner.structure.groups.items():
        m = mods.get(name)
        if m is None:
            continue
        w = getattr(m, "out_channels", None) or getattr(m, "out_features", None)
        if g.num_heads:
            w = w // 3
        out[name] = [g.width, int(w)]
    return out


def render(out: Path, log: Callable[[str], None] = print) -> None:
    try:
        from .report.render import render_report
    except ImportError:
        return
    try:
        html, md = render_report(out)
        log(f"report: {html}")
    except Exception as exc:  # a report failure must never lose the run's results
        log(f"report rendering failed ({type(exc).__name__}: {exc}); results are in {out}")
