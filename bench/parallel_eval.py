"""evolve in-process vs on Ray workers: the same search (same seed, same --evals) measured in this process and
on N local Ray workers (loop/executor.py), on one model, one profile, one probe.

    nice -n 10 python bench/parallel_eval.py --model smollm2 --evals 40 --workers 2 \
        --out bench/results/parallel_eval.json

Writes the loop's wall time for each arm (the Ray arm's includes starting Ray and its workers, each building
the evaluation state once: reported apart as `startup_s`), the evaluations, the best attempt (index, probe KL,
per-group sparsity, a digest of its exact counts) and whether the two journals hold the same attempts; then the
best allocation's held-out perplexity with Wanda masks (once per distinct best). Timings are wall-clock on
whatever machine runs it (this one: 2 cores shared with other work): compare the arms as a ratio of one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunepilot.agents.evolve import EvolveStrategist, evolve_report
from prunepilot.budget import Budget
from prunepilot.evaluate.language import mean_nll
from prunepilot.jobs.sparsify import RampSettings, SparsifyJob
from prunepilot.journal import Journal
from prunepilot.loop import LoopLimits, Master
from prunepilot.loop import executor as executors
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.llm import load_causal_lm
from prunepilot.sparsify.calibrate import activation_norms, gradient_importance, linear_layers
from prunepilot.sparsify.device import Placement
from prunepilot.sparsify.loop import Probe, probe_costs
from prunepilot.sparsify.profile import WandaBank, build_profile

from llm_sparsity import pydocs_blocks  # bench/ is on sys.path when a bench script runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--probe-seqs", type=int, default=4)
    ap.add_argument("--probe-seqlen", type=int, default=128)
    ap.add_argument("--eval-seqs", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--arms", default="inprocess,inprocess1t,ray",
                    help="comma list of inprocess (torch's default threads), inprocess1t (1 thread), ray")
    ap.add_argument("--runs-dir", default="runs/bench_parallel")
    ap.add_argument("--out", default="bench/results/parallel_eval.json")
    args = ap.parse_args()
    t_all = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)

    lm = load_causal_lm(args.model)
    model, tok = lm.model, lm.tokenizer
    placement = Placement.for_model(model, torch.device("cpu"))  # as `prunepilot sparsify` runs it
    infos = linear_layers(model)
    _, calib, probe_ids, evalb = pydocs_blocks(tok, args)  # the same protocol as llm_sparsity.py
    report: dict[str, Any] = {
        "model": args.model, "environment": environment(), "cpu_count": os.cpu_count(),
        "load_avg_start": os.getloadavg(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "protocol": {"sparsity": args.sparsity, "method": "wanda masks (the loop's mask bank)", "evals": args.evals,
                     "seed": args.seed, "calib": f"{args.calib_seqs}x{args.seqlen}",
                     "probe": f"{args.probe_seqs}x{args.probe_seqlen}", "eval": f"{args.eval_seqs}x{args.eval_seqlen}",
                     "placement": placement.mode, "driver_threads": torch.get_num_threads()},
        "arms": {},
    }
    out = Path(args.out)
    t0 = time.perf_counter()
    norms = activation_norms(model, calib, 4, placement)
    grads = {} if placement.active else gradient_importance(model, calib[:2, :256], 1)
    bank = WandaBank(model, infos, norms)
    profile = build_profile(lm.name, args.sparsity, infos, bank, grads, 3)
    probe = Probe(model, probe_ids)
    probe_costs(model, bank, infos, profile, probe, args.sparsity)
    bank.restore()
    report["profile_s"] = round(time.perf_counter() - t0, 1)
    log(f"profile and group probes {report['profile_s']}s ({placement.mode})")
    budget = Budget.parse(sparsity=f"{args.sparsity * 100:.6g}%").resolve({}).to_json()
    histories: dict[str, list[Any]] = {}
    jobs: dict[str, SparsifyJob] = {}

    for arm in [a for a in args.arms.split(",") if a]:
        folder = Path(args.runs_dir) / arm
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "journal.sqlite").unlink(missing_ok=True)
        journal = Journal(folder / "journal.sqlite")
        run_id = journal.start_run("sparsify", {"bench": "parallel_eval", "arm": arm}, folder)
        rs = RampSettings(target=args.sparsity, refine_iters=args.evals, evals=args.evals, ramp=False)
        job = SparsifyJob(model, bank, infos, profile, probe, rs, budget)
        ex = executors.RayExecutor(args.workers, log=log) if arm == "ray" else executors.InProcess()
        startup = 0.0
        threads = torch.get_num_threads()
        if arm == "inprocess1t":
            torch.set_num_threads(1)
        t0 = time.perf_counter()
        try:
            if arm == "ray":  # start Ray and the workers first, timed apart from the search
                ex._start(job)
                startup = time.perf_counter() - t0
            Master(job, EvolveStrategist(), journal, run_id, seed=args.seed, executor=ex, log=log,
                   limits=LoopLimits(max_attempts=2 * args.evals + 40)).run()
            wall = time.perf_counter() - t0
            described = ex.describe()
        finally:
            if arm == "ray":
                ex.close()
            torch.set_num_threads(threads)
            bank.restore()
        history = journal.attempts(run_id)
        histories[arm], jobs[arm] = history, job
        best = job.best(history)
        assert best is not None
        counts = best.allocation["counts"]
        report["arms"][arm] = {
            **described, "driver_threads": 1 if arm == "inprocess1t" else threads, "loop_wall_s": round(wall, 1), "startup_s": round(startup, 1),
            "search_wall_s": round(wall - startup, 1), "attempts": len(history),
            "evals": job.summary(history)["evals"], "evals_screened": job.summary(history)["evals_screened"],
            "measure_s_sum": round(sum(a.seconds for a in history), 1),
            "best": {"index": best.index, "probe_kl": best.metrics["probe_kl"], "probe_ppl": best.metrics["probe_ppl"],
                     "counts_sha256": hashlib.sha256(json.dumps(counts).encode()).hexdigest()[:16],
                     "groups": {g: round(v, 4) for g, v in best.projected.items()}},
            "uniform_probe_kl": history[0].metrics.get("probe_kl"), "search": evolve_report(history),
            "journal": str(folder / "journal.sqlite"),
        }
        log(f"{arm}: loop {wall:.1f}s (startup {startup:.1f}s), best #{best.index} KL {best.metrics['probe_kl']:.5f}")
        write_json_atomic(out, report)

    if "inprocess" in histories and "ray" in histories:
        a, b = histories["inprocess"], histories["ray"]
        strip = lambda h: [x.model_dump(exclude={"seconds", "metrics", "score", "reflection"}) for x in h]  # noqa: E731
        kl_diff = max((abs(x.metrics.get("probe_kl", 0) - y.metrics.get("probe_kl", 0)) for x, y in zip(a, b)), default=0.0)
        ia, ir = report["arms"]["inprocess"], report["arms"]["ray"]
        report["comparison"] = {
            "same_attempts": strip(a) == strip(b), "same_best": ia["best"]["counts_sha256"] == ir["best"]["counts_sha256"],
            "max_probe_kl_abs_diff": kl_diff,
            "speedup_search": round(ia["search_wall_s"] / ir["search_wall_s"], 3) if ir["search_wall_s"] else None,
            "speedup_with_startup": round(ia["loop_wall_s"] / ir["loop_wall_s"], 3) if ir["loop_wall_s"] else None,
        }
        if "inprocess1t" in report["arms"]:
            i1 = report["arms"]["inprocess1t"]
            report["comparison"]["speedup_search_vs_1_thread"] = round(i1["search_wall_s"] / ir["search_wall_s"], 3)
            report["comparison"]["same_best_1_thread"] = i1["best"]["counts_sha256"] == ir["best"]["counts_sha256"]
        log(f"comparison: {report['comparison']}")
    # held-out perplexity of each distinct best allocation (Wanda masks, as the loop scores them)
    seen: dict[str, float] = {}
    for arm, info in report["arms"].items():
        key = info["best"]["counts_sha256"]
        if key not in seen:
            job = jobs[arm]
            bank.apply(job.as_dict(job.best(histories[arm]).allocation["counts"]))
            seen[key] = math.exp(mean_nll(model, evalb))
            bank.restore()
        info["best"]["eval_ppl_wanda"] = seen[key]
    if "inprocess" in jobs:
        bank.apply(jobs["inprocess"].as_dict(jobs["inprocess"].uniform_counts))
        report["uniform_eval_ppl_wanda"] = math.exp(mean_nll(model, evalb))
        bank.restore()
    report["dense_eval_ppl"] = math.exp(mean_nll(model, evalb))
    report["total_s"] = round(time.perf_counter() - t_all, 1)
    report["load_avg_end"] = os.getloadavg()
    write_json_atomic(out, report)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
