"""Agent arms on a trained Fashion-MNIST ResNet-20 at 50% and 30% MACs, equal recovery budget for every arm.

Arms: uniform, grid, tp_global (torch-pruning global isomorphic Taylor at a bisected ratio: the AgenticPruner
engine), sensitivity (built-in default), optuna (TPE), local (SmolLM2 analyst, schema-constrained), evolve
(elitist level-switch search over per-family ratios), evolve+local (evolve with every 4th offspring by SmolLM2).
Every arm gets the same number of rounds, the same in-loop recovery steps per candidate, and the same final
recovery (steps with distillation) for its best candidate; top-1 is measured on the official 10k test split.
Every arm but tp_global runs through the one loop: `Master(PruneJob(..., Evaluator), strategist, journal, run_id)`,
journaled under runs/bench_agent/<arm>_<target>_s<seed>/journal.sqlite; tp_global stays a separate baseline (it
bisects Torch-Pruning's own global ratio, nothing to propose). Each row records the attempts the loop made and
its wall time (`attempts`, `loop_seconds`).

    python bench/agent_fashion_mnist.py [--arms a,b] [--targets 50%,30%] [--seeds 0,1] [--rounds 4] [--runs-dir D]
        -> bench/results/agent_fashion_mnist.json
    # the allocation-search arms (issue 12) at equal measured evaluations:
    python bench/agent_fashion_mnist.py --arms tp_global,sensitivity,evolve,evolve+local --targets 30% \
        --rounds 12 --equal-evals --out bench/results/agent_fashion_mnist_evolve.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from prunepilot.agents.registry import make_strategist
from prunepilot.budget import Budget
from prunepilot.engines.recover import finetune
from prunepilot.errors import PrunepilotError
from prunepilot.evaluate.classification import evaluate_classifier
from prunepilot.evaluate.scoring import Evaluator, measure_sensitivity
from prunepilot.agents.evolve_prune import search_report
from prunepilot.jobs.prune import REPEAT_CAP, PruneJob, PruneSettings, UserConstraints, profile_blocks, search_settings
from prunepilot.journal import Journal, prepare_out
from prunepilot.loop import Master
from prunepilot.models.baseline import get_or_train_baseline
from prunepilot.pipeline import Pruner, count_real
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.data import load_data
from prunepilot.sources.models import LoadedModel


def tp_global_candidate(dense, x, goal_macs: float, calib, round_to: int = 8, steps: int = 12):
    """Torch-Pruning's own recipe: MetaPruner(global, isomorphic, Taylor), bisect the global ratio by
    prune-and-count until the MACs land at the goal."""
    import torch_pruning as tp

    def prune_at(ratio: float):
        m = copy.deepcopy(dense)
        imp = tp.importance.GroupTaylorImportance()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pr = tp.pruner.BasePruner(m, x, importance=imp, pruning_ratio=ratio, global_pruning=True,
                                      isomorphic=True, round_to=round_to, ignored_layers=[m.fc] if hasattr(m, "fc") else [])
            m.zero_grad()
            xb, yb = calib
            torch.nn.functional.cross_entropy(m(xb), yb).backward()
            pr.step()
        m.zero_grad(set_to_none=True)
        return m.eval(), count_real(m, x)["macs"]

    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        m, macs = prune_at(mid)
        err = (macs - goal_macs) / goal_macs
        if best is None or abs(err) < abs(best[2]):
            best = (m, macs, err, mid)
        if abs(err) < 0.002:
            break
        lo, hi = (mid, hi) if macs > goal_macs else (lo, mid)
    return best


def run_arm(arm: str, target: str, seed: int, args, dense, info, data, out_root: Path, metric: str = "macs",
            models: dict | None = None) -> dict:
    """One arm at one target of `metric` ("macs", or "latency_ms": projected on this device's latency tables and
    measured fresh, bench/latency_fashion_mnist.py); `models` receives the recovered best model by arm."""
    torch.manual_seed(seed)
    x = torch.randn(getattr(args, "batch", 1), *info["input_shape"])  # the example input latency is timed on
    loaded = LoadedModel(copy.deepcopy(dense), x, "prunepilot:fmnist_resnet20", "trained ResNet-20")
    settings = PruneSettings(rounds=args.rounds, patience=args.rounds, finetune_steps=args.loop_steps,
                             eval_limit=args.eval_limit, bn_batches=10, seed=seed)
    t0 = time.perf_counter()
    pruner = Pruner(loaded, latency_runs=0)
    latency = None
    if metric == "latency_ms":
        from prunepilot.latency.job import LatencyTargeting

        latency = LatencyTargeting.enable(pruner, log=print)
        latency.relative = target.endswith("%")
    rb = Budget.parse(**{metric: target}).resolve(pruner.profile.dense)
    ev = Evaluator(data, pruner.dense, settings.scoring())
    out = out_root / f"{arm}_{'lat' if latency else ''}{target.strip('%')}_s{seed}"
    prepare_out(out, overwrite=True)  # one run per folder: a re-run replaces the last one
    row = {"arm": arm, "target": target, "seed": seed}
    if arm == "tp_global":  # a separate baseline: Torch-Pruning's own global ratio, not a loop
        tl = time.perf_counter()
        calib = next(iter(data.loader("train", batch_size=256, seed=seed)))
        best_model, macs, best_err, ratio = tp_global_candidate(pruner.dense, x, rb.goals["macs"], calib)
        metrics = ev.score(best_model, settings.finetune_steps)
        row.update(rounds=1, attempts=1, loop_seconds=time.perf_counter() - tl,
                   within_band_rate=float(rb.within("macs", macs)), global_ratio=ratio)
    else:
        if arm in ("sensitivity", "local", "blocks") or arm.startswith("evolve"):
            pruner.profile.sensitivity = measure_sensitivity(pruner, ev, settings.sensitivity_ratio)
        if arm == "blocks":  # what skipping each residual block costs, as the prune job measures it
            profile_blocks(pruner, ev, latency, print)
        strategist, resolved = make_strategist(arm, "prune", say=print)
        settings = search_settings(strategist, settings, log=print)
        if getattr(args, "equal_evals", False):  # every arm measures --rounds candidates: repeats use no round
            settings = dataclasses.replace(settings, repeats_use_rounds=False, patience=REPEAT_CAP * args.rounds)
        journal = Journal(out / "journal.sqlite")
        run_id = journal.start_run("prune", {"bench": "agent_fashion_mnist", "arm": arm, "target": target, "seed": seed,
                                             "settings": vars(args)}, out)
        job = PruneJob(pruner, rb, ev, settings, out, UserConstraints(), latency=latency)
        tl = time.perf_counter()
        try:
            best = Master(job, strategist, journal, run_id, seed=seed,
                          log=lambda s: print(f"  {arm} {target} s{seed}: {s}", flush=True)).run()
        except PrunepilotError as exc:  # systematic failure: report it in the row, keep the other arms' numbers
            best, row["error"] = None, f"{exc}"[:500]
        loop_s = time.perf_counter() - tl
        hist = journal.attempts(run_id)
        job.prune_stale_candidates(hist)
        calls = journal.llm_calls(run_id)
        row.update(rounds=len(hist), attempts=len(hist), loop_seconds=loop_s,
                   evals=sum(1 for h in hist if h.score is not None and h.verdict not in ("repeat", "failed")),
                   repeats=sum(1 for h in hist if h.verdict == "repeat"),
                   **({"search": search_report(hist)} if arm.startswith("evolve") else {}),
                   within_band_rate=sum(1 for h in hist if h.within_band) / max(1, len(hist)),
                   resolved=resolved, llm_calls=len(calls), llm_fallbacks=sum(1 for h in hist if h.fallback_reason),
                   failed=sum(1 for h in hist if h.verdict == "failed"), best_round=best.index if best else None,
                   run_id=run_id)
        if best is None:
            row.setdefault("error", "no attempt in band")
            journal.finish_run(run_id, "failed", {"error": row["error"]})
            row.update(top1=None, wall_seconds=time.perf_counter() - t0)
            return row
        best_model = job.rebuild(best)
        row["blocks_removed"] = best.allocation.get("skip", [])
        best_err = best.errors[metric]
        metrics = best.metrics
    search_s = time.perf_counter() - t0
    ev.recalibrate(best_model)
    finetune(best_model, ev.train_loader(), steps=args.final_steps, lr=0.02, teacher=pruner.dense, seed=seed, progress=False)
    top1 = evaluate_classifier(best_model, data.loader("test", batch_size=512, shuffle=False))["top1"]
    err_key = f"{metric.removesuffix('_ms')}_error"  # macs_error, latency_error
    row.update(top1=top1, val_top1_in_loop=metrics.get("accuracy"), metric=metric, search_seconds=search_s,
               wall_seconds=time.perf_counter() - t0, **{err_key: best_err})
    if models is not None:
        models[arm] = best_model
    if arm != "tp_global":
        journal.finish_run(run_id, "done", {"top1": top1, err_key: best_err})
    print(f"{arm:12s} {target:>4s} seed {seed}: top-1 {top1:.4f}  in-band rate {row['within_band_rate']:.2f}  "
          f"err {best_err:+.3%}  {row['attempts']} attempts, loop {row['loop_seconds']:.0f}s, {row['wall_seconds']:.0f}s", flush=True)
    return row


def merge(paths: list[str], out: str) -> None:
    """Combine shards run in parallel (one process per seed) into one result with a joint summary."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    rows = [r for p in parts for r in p["rows"]]
    merged = {**parts[0], "rows": rows, "summary": summarise(rows), "shards": paths,
              "command": "python bench/agent_fashion_mnist.py --merge " + " ".join(paths)}
    write_json_atomic(Path(out), merged)
    print(json.dumps(merged["summary"], indent=1))


def main() -> None:
    if sys.argv[1:2] == ["--merge"]:
        merge(sys.argv[2:], "bench/results/agent_fashion_mnist.json")
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--arms", default="uniform,grid,tp_global,sensitivity,optuna,local")
    ap.add_argument("--targets", default="50%,30%")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--loop-steps", type=int, default=40)
    ap.add_argument("--final-steps", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1 is fastest for ResNet-20 on a shared machine)")
    ap.add_argument("--out", default="bench/results/agent_fashion_mnist.json")
    ap.add_argument("--runs-dir", default="runs/bench_agent", help="per-arm journals and kept candidates")
    ap.add_argument("--equal-evals", action="store_true",
                    help="every loop arm measures exactly --rounds candidates (repeats use no round, no early stop)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, info = get_or_train_baseline("resnet20")
    data = load_data("fashion-mnist", input_shape=tuple(info["input_shape"]), seed=0)
    dense_top1 = evaluate_classifier(dense, data.loader("test", batch_size=512, shuffle=False))["top1"]
    print(f"dense top-1 {dense_top1:.4f}", flush=True)
    rows = []
    out_root = Path(args.runs_dir)
    path = Path(args.out)
    for target in args.targets.split(","):
        for arm in args.arms.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                rows.append(run_arm(arm, target, seed, args, dense, info, data, out_root))
                summary = summarise(rows)
                write_json_atomic(path, {"environment": environment(), "dense_top1": dense_top1, "baseline": info.get("epochs"),
                                         "settings": vars(args), "rows": rows, "summary": summary,
                                         "command": "python " + " ".join(sys.argv)})
    print(json.dumps(summarise(rows), indent=1))


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    keys = sorted({(r["target"], r["arm"]) for r in rows})
    for target, arm in keys:
        rs = [r for r in rows if r["arm"] == arm and r["target"] == target and r.get("top1") is not None]
        if not rs:
            continue
        out.append({"target": target, "arm": arm, "seeds": len(rs), "top1_mean": statistics.mean(r["top1"] for r in rs),
                    "top1_min": min(r["top1"] for r in rs), "top1_max": max(r["top1"] for r in rs),
                    "within_band_rate": statistics.mean(r["within_band_rate"] for r in rs),
                    "rounds": statistics.mean(r["rounds"] for r in rs),
                    "attempts": statistics.mean(r.get("attempts", r["rounds"]) for r in rs),
                    "loop_seconds": statistics.mean(r["loop_seconds"] for r in rs) if all("loop_seconds" in r for r in rs) else None,
                    "wall_seconds": statistics.mean(r["wall_seconds"] for r in rs)})
    return out


if __name__ == "__main__":
    main()
