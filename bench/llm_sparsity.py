"""LLM sparsity on SmolLM2-135M: dense vs magnitude, uniform Wanda, uniform SparseGPT, OWL and the agent loop,
at 50% unstructured and 2:4, on the same calibration / evaluation text (Python docs prose, disjoint by page).

    python bench/llm_sparsity.py                      # all variants, writes bench/results/llm_sparsity.json
    python bench/llm_sparsity.py --variants u50,owl50,agent50 --eval-seqs 8
    # the allocation-search table (issue 12): one evaluation budget for every loop arm
    python bench/llm_sparsity.py --variants u50,owl50,agent50,evo50,evollm50,u70,owl70,agent70,evo70 \
        --evals 100 --out bench/results/llm_sparsity_evolve.json

Search arms (agent*, evo*, evollm*) share one evaluation budget (--evals: candidates measured on the probe,
any probe size; evolve's screens on 1 or 2 of the 4 probe sequences count as full evaluations, so the
comparison is conservative for evolve; `probe_cost` reports the cost in whole-probe equivalents). The
sensitivity loop ramps to the target and stops when its line search converges, usually well under budget.
`*_sgptdb` arms score trial allocations from a SparseGPT level database (`--search-masks sparsegpt`,
sparsify/sgpt_bank.py) instead of Wanda masks; its build time is reported as `sgpt_bank_s`.

Shares one model load, one dense evaluation and one sensitivity profile across variants; every variant
restores the dense weights first. Allocations are made as `prunepilot sparsify` makes them (sparsify/run.py):
uniform, N:M and OWL are one-shot; the agent arms (built-in `sensitivity`, or an LLM for `llm:SPEC`) run the
one loop, `Master(SparsifyJob(...), strategist, journal, run_id)`, journaled in --runs-dir/<variant>/. Every
variant records its loop's attempts and wall time (`attempts`, `loop_s`; 0 for one-shot allocations).
The JSON is rewritten after each variant, so a partial run still reports.
Timings are wall-clock on a shared 2-core machine: compare them as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prunepilot.agents.context import Context
from prunepilot.agents.registry import make_builtin, make_strategist
from prunepilot.budget import Budget
from prunepilot.engines import sparsity as sp
from prunepilot.evaluate.language import fidelity, knowledge_retention, knowledge_targets, mean_nll
from prunepilot.agents.evolve import evolve_report
from prunepilot.jobs.sparsify import RampSettings, SparsifyJob, measured
from prunepilot.journal import Journal, prepare_out
from prunepilot.loop import LoopLimits, Master
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.llm import load_causal_lm
from prunepilot.sources.text import load_split, token_blocks
from prunepilot.sparsify.calibrate import activation_norms, gradient_importance, linear_layers, sequential_sparsify
from prunepilot.sparsify.loop import Probe, probe_costs
from prunepilot.sparsify.plan import project, resolve
from prunepilot.sparsify.profile import WandaBank, build_profile
from prunepilot.sparsify.sgpt_bank import SparseGPTBank, levels_for

# name -> (sparsity, method, allocation)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "u50": ("50%", "wanda", "uniform"),
    "owl50": ("50%", "wanda", "owl"),
    "agent50": ("50%", "wanda", "agent"),
    "mag50": ("50%", "magnitude", "uniform"),
    "sgpt50": ("50%", "sparsegpt", "uniform"),
    "agent50_sgpt": ("50%", "sparsegpt", "agent"),
    "w24": ("2:4", "wanda", "uniform"),
    "sgpt24": ("2:4", "sparsegpt", "uniform"),
    "mag24": ("2:4", "magnitude", "uniform"),
    "llm50": ("50%", "wanda", "llm:local"),
    "evo50": ("50%", "wanda", "evolve"),
    "evollm50": ("50%", "wanda", "evolve+local"),
    "evo50_sgpt": ("50%", "sparsegpt", "evolve"),
}
for _lvl in ("60", "70"):
    VARIANTS |= {f"u{_lvl}": (f"{_lvl}%", "wanda", "uniform"), f"owl{_lvl}": (f"{_lvl}%", "wanda", "owl"),
                 f"agent{_lvl}": (f"{_lvl}%", "wanda", "agent"), f"evo{_lvl}": (f"{_lvl}%", "wanda", "evolve"),
                 f"evollm{_lvl}": (f"{_lvl}%", "wanda", "evolve+local"),
                 f"sgpt{_lvl}": (f"{_lvl}%", "sparsegpt", "uniform"), f"agent{_lvl}_sgpt": (f"{_lvl}%", "sparsegpt", "agent"),
                 f"evo{_lvl}_sgpt": (f"{_lvl}%", "sparsegpt", "evolve")}
for _lvl in ("50", "60", "70"):  # allocations scored from a SparseGPT level database (--search-masks sparsegpt)
    VARIANTS |= {f"evo{_lvl}_sgptdb": (f"{_lvl}%", "sparsegpt", "evolve"),
                 f"agent{_lvl}_sgptdb": (f"{_lvl}%", "sparsegpt", "agent")}
LOOP = ("agent", "evolve", "evolve+local")  # allocations searched by the one loop (the rest are one-shot)


def pydocs_blocks(tok: Any, args: argparse.Namespace) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The benches' protocol: Python-docs prose, calibration from the first 90% of the calibration pages, the
    probe from the last 10% (held out), evaluation from disjoint pages."""
    text = load_split("pydocs")
    cut = int(len(text.calib) * 0.9)
    calib = token_blocks(tok, text.calib[:cut], args.seqlen, args.calib_seqs, seed=0)
    probe = token_blocks(tok, text.calib[cut:], args.probe_seqlen, args.probe_seqs)
    return text, calib, probe, token_blocks(tok, text.eval, args.eval_seqlen, args.eval_seqs)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--probe-seqs", type=int, default=4)
    ap.add_argument("--probe-seqlen", type=int, default=256)
    ap.add_argument("--threshold", type=float, default=0.15)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--refine-iters", type=int, default=8)
    ap.add_argument("--llm-iters", type=int, default=6, help="ramp iterations at most for the LLM arm")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared machine)")
    ap.add_argument("--evals", type=int, default=None,
                    help="one evaluation budget for every search arm (default: the arms' own limits, as before)")
    ap.add_argument("--out", default="bench/results/llm_sparsity.json")
    ap.add_argument("--runs-dir", default="runs/bench_llm", help="one journal per loop variant (<dir>/<variant>/journal.sqlite)")
    ap.add_argument("--no-dense-eval", action="store_true", help="skip the dense perplexity (another process measures it)")
    ap.add_argument("--merge", nargs="+", help="fold these result files (same protocol) into --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    if args.merge:
        return merge([Path(p) for p in args.merge], out)
    t_all = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_all:7.1f}s] {msg}", flush=True)

    lm = load_causal_lm(args.model)
    model, tok = lm.model, lm.tokenizer
    infos = linear_layers(model)
    mods = dict(model.named_modules())
    dense_w = {i.name: mods[i.name].weight.detach().clone() for i in infos}
    text, calib, probe, evalb = pydocs_blocks(tok, args)
    report: dict[str, Any] = {
        "model": args.model, "environment": environment(),
        "protocol": {**text.protocol, "calib": f"{args.calib_seqs}x{args.seqlen}", "eval": f"{args.eval_seqs}x{args.eval_seqlen}",
                     "eval_tokens": int(evalb.numel()), "probe": f"{args.probe_seqs}x{args.probe_seqlen} (held-out calibration text)",
                     "fidelity": f"1x{args.eval_seqlen}", "rollback_threshold": args.threshold, "step": args.step,
                     "evals": args.evals, "threads": torch.get_num_threads()},
        "variants": {},
    }

    t0 = time.perf_counter()
    facts = knowledge_targets(model, tok)
    if not args.no_dense_eval:
        dense_nll = mean_nll(model, evalb)
        report["dense"] = {"perplexity": math.exp(dense_nll), "knowledge": knowledge_retention(model, tok, facts),
                           "eval_s": time.perf_counter() - t0}
        log(f"dense ppl {report['dense']['perplexity']:.2f} ({report['dense']['eval_s']:.0f}s)")
    dense_copy = __import__("copy").deepcopy(model)
    write_json_atomic(out, report)
    bank: Any = None
    profile: Any = None
    probe_set: Any = None

    grads: dict[str, float] = {}
    profiles: dict[Any, Any] = {}  # (target, masks) -> profile (its measured group costs are taken at that target)
    sgpt_banks: dict[float, Any] = {}  # target -> SparseGPT level database (the `_sgptdb` arms)

    def need_sgpt_bank(target: float, strategist: Any) -> Any:
        if target not in sgpt_banks:
            for other in list(sgpt_banks):  # one database on disk at a time
                sgpt_banks.pop(other).close()
            tb = time.perf_counter()
            levels = levels_for(strategist, target)
            sgpt_banks[target] = SparseGPTBank(model, infos, calib, levels)
            report.setdefault("sgpt_bank_s", {})[f"{target:g}"] = time.perf_counter() - tb
            log(f"SparseGPT level database at {target:.0%}: {len(levels)} levels, "
                f"{sgpt_banks[target].nbytes / 2**30:.2f} GB, {time.perf_counter() - tb:.0f}s")
        return sgpt_banks[target]

    def need_profile(target: float = 0.5, masks: str = "wanda") -> None:
        nonlocal bank, profile, probe_set, grads
        if bank is None:
            t0 = time.perf_counter()
            probe_set = Probe(model, probe)
            norms = activation_norms(model, calib)
            grads = gradient_importance(model, calib[:2, :256], 1)
            bank = WandaBank(model, infos, norms)
            report["profile_s"] = time.perf_counter() - t0
            log(f"profile {report['profile_s']:.0f}s")
        if (target, masks) not in profiles:
            profiles[(target, masks)] = build_profile(lm.name, target, infos, bank, grads, 3)
        profile = profiles[(target, masks)]
    agent_counts: dict[str, int] | None = None
    agent_info: dict[str, Any] = {}

    def restore() -> None:
        with torch.no_grad():
            for i in infos:
                mods[i.name].weight.copy_(dense_w[i.name])
        for b in [bank, *sgpt_banks.values()]:
            if b is not None:
                b.applied = {n: 0 for n in b.applied}

    for name in [v for v in args.variants.split(",") if v]:
        sparsity, method, alloc = VARIANTS[name]
        nm = sp.parse_nm(sparsity)
        target = nm.sparsity if nm is not None else float(sparsity.rstrip("%")) / 100
        restore()
        t0 = time.perf_counter()
        info: dict[str, Any] = {"sparsity": sparsity, "method": method, "allocation": alloc}
        try:
            if nm is not None or alloc == "uniform":
                counts = project({}, infos, target)
                info.update(attempts=0, loop_s=0.0)
            elif alloc == "owl":  # one-shot, as `prunepilot sparsify --agent owl`
                need_profile(target)
                ctx = Context("sparsify", profile, {}, [], phase="ramp",
                              step={"level": target, "target": target, "current": {i.name: 0.0 for i in infos}})
                plan = make_builtin("owl", "sparsify").propose(ctx)
                assert plan is not None  # one-shot strategists always answer on the ramp
                counts = project(resolve(plan, infos, profile.groups, {}), infos, target)
                info.update(attempts=0, loop_s=0.0)
            elif alloc == "agent" and target == 0.5 and agent_counts is not None:
                counts = agent_counts
                info.update(agent_info, reused_allocation_from="agent50")
            else:
                masks = "sparsegpt" if name.endswith("_sgptdb") else "wanda"
                need_profile(target, masks)
                agent, max_iters = "sensitivity", 24
                if alloc.startswith("llm:"):
                    agent, max_iters = alloc[4:], args.llm_iters
                elif alloc != "agent":
                    agent = alloc
                strategist, resolved = make_strategist(agent, "sparsify", say=log)
                loop_bank = need_sgpt_bank(target, strategist) if masks == "sparsegpt" else bank
                info["search_masks"] = masks
                tp = time.perf_counter()
                if not profile.group_probe:
                    probe_costs(model, loop_bank, infos, profile, probe_set, target)
                probe_s = time.perf_counter() - tp
                # the loop exactly as sparsify/run.py::_loop wires it (the probe and its costs are shared)
                rs = RampSettings(target=target, step=args.step, threshold=args.threshold, max_iters=max_iters,
                                  refine_iters=args.evals or args.refine_iters, evals=args.evals,
                                  ramp=getattr(strategist, "needs_ramp", True))
                budget = Budget.parse(sparsity=f"{target * 100:.6g}%").resolve({}).to_json()
                job = SparsifyJob(model, loop_bank, infos, profile, probe_set, rs, budget)
                jdir = Path(args.runs_dir) / name
                prepare_out(jdir, overwrite=True)
                journal = Journal(jdir / "journal.sqlite")
                run_id = journal.start_run("sparsify", {"bench": "llm_sparsity", "variant": name, "model": args.model,
                                                        "sparsity": sparsity, "agent": agent, "ramp": vars(rs)}, jdir)
                tl = time.perf_counter()
                limits = LoopLimits(max_attempts=max(200, 2 * (args.evals or 0) + max_iters + 10))
                Master(job, strategist, journal, run_id, seed=0, limits=limits,
                       log=lambda m, n=name: log(f"  {n} {m}")).run()
                loop_s = time.perf_counter() - tl
                history = journal.attempts(run_id)
                counts = job.best_counts(history)
                restore()
                journal.finish_run(run_id, "done", {"counts": counts})
                full = probe_set.n_seqs
                loop_info = {"group_probe_s": probe_s, **job.summary(history), "attempts": len(history), "loop_s": loop_s,
                             "probe_cost": sum(a.metrics.get("probe_seqs", full) / full for a in history if measured(a)),
                             "strategist": resolved, "run_id": run_id,
                             "failed": sum(1 for a in history if a.verdict == "failed"),
                             "trajectory": [{"iteration": a.index + 1, "phase": a.phase,
                                             "from_level": a.step.get("from_level"), "level": a.step.get("level"),
                                             "probe_ppl": a.metrics.get("probe_ppl"), "probe_kl": a.metrics.get("probe_kl"),
                                             "rise": a.metrics.get("rise"), "verdict": a.verdict, "strategist": a.strategist,
                                             "params": a.plan_params} for a in history]}
                if getattr(strategist, "needs_ramp", True) is False:
                    loop_info["search"] = evolve_report(history)
                calls = journal.llm_calls(run_id)
                if calls:
                    loop_info["llm_calls"] = len(calls)
                    loop_info["llm_fallbacks"] = sum(1 for a in history if a.fallback_reason)
                    loop_info["llm_latency_s"] = sum(c.get("latency_s", 0.0) for c in calls)
                info.update(loop_info)
                if alloc == "agent" and target == 0.5:
                    agent_counts, agent_info = counts, loop_info
            achieved = sequential_sparsify(model, calib, counts, method, nm)
            info["compress_s"] = time.perf_counter() - t0
            total = sum(i.params for i in infos)
            info["achieved_sparsity"] = sum(achieved[i.name] * i.params for i in infos) / total
            if nm is not None:
                info["nm_ok"] = all(sp.is_nm(mods[i.name].weight, nm) for i in infos)
            te = time.perf_counter()
            info["perplexity"] = math.exp(mean_nll(model, evalb))
            info["knowledge"] = knowledge_retention(model, tok, facts)
            info["fidelity"] = fidelity(model, dense_copy, evalb[:1], 1)
            info["eval_s"] = time.perf_counter() - te
            info["kind_sparsity"] = _by_kind(achieved)
        except Exception as exc:  # keep the other variants' numbers
            info["error"] = f"{type(exc).__name__}: {exc}"
        info["peak_rss_mb_so_far"] = rss_mb()
        report["variants"][name] = info
        report["wall_s"] = time.perf_counter() - t_all
        write_json_atomic(out, report)
        report["table"] = table(report)
        write_json_atomic(out, report)
        log(f"{name}: ppl {info.get('perplexity', float('nan')):.2f} sparsity {info.get('achieved_sparsity', 0):.4f} "
            f"compress {info.get('compress_s', 0):.0f}s {info.get('error', '')}")
    log("done")


def table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant: perplexity, its degradation over dense as a share of uniform's at the same level and method
    (the issue's yardstick), the change vs uniform, KL, evaluations and wall time."""
    dense = (report.get("dense") or {}).get("perplexity")
    vs = report["variants"]
    rows = []
    for name, v in vs.items():
        if "perplexity" not in v:
            continue
        uni = next((u for u in vs.values() if u.get("allocation") == "uniform" and u.get("sparsity") == v["sparsity"]
                    and u.get("method") == v["method"] and "perplexity" in u), None)
        row = {"variant": name, "sparsity": v["sparsity"], "method": v["method"], "allocation": v["allocation"],
               "perplexity": round(v["perplexity"], 3), "kl": round(v["fidelity"]["kl"], 4) if "fidelity" in v else None,
               "evals": v.get("evals", 0), "probe_cost": round(v.get("probe_cost", 0.0), 2),
               "loop_s": round(v.get("loop_s", 0.0), 1), "compress_s": round(v.get("compress_s", 0.0), 1)}
        if uni is not None:
            row["ppl_vs_uniform"] = round(v["perplexity"] / uni["perplexity"] - 1, 4)
            if dense:
                row["degradation_share_of_uniform"] = round((v["perplexity"] - dense) / (uni["perplexity"] - dense), 4)
        rows.append(row)
    return rows


def merge(paths: list[Path], out: Path) -> None:
    """Combine runs made in parallel processes with the same protocol (dense numbers from whichever has them)."""
    runs = [json.loads(p.read_text()) for p in paths if p.is_file()]
    merged = dict(runs[0])
    merged["variants"], merged["merged_from"] = {}, [str(p) for p in paths if p.is_file()]
    for r in runs:
        if r["protocol"]["eval_tokens"] != runs[0]["protocol"]["eval_tokens"]:
            raise SystemExit(f"protocol mismatch in {r}")
        merged.setdefault("dense", r.get("dense"))
        if "dense" in r:
            merged["dense"] = r["dense"]
        merged["variants"].update(r["variants"])
    d = merged.get("dense", {}).get("perplexity")
    if d:
        merged["degradation"] = {k: v["perplexity"] / d - 1 for k, v in merged["variants"].items() if "perplexity" in v}
    merged["table"] = table(merged)
    write_json_atomic(out, merged)


def _by_kind(achieved: dict[str, float]) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for n, v in achieved.items():
        by.setdefault(".".join(n.split(".")[-2:]), []).append(v)
    return {k: round(sum(v) / len(v), 4) for k, v in by.items()}


if __name__ == "__main__":
    sys.exit(main())
