"""Learning across runs: does a second run at a neighbouring budget reach a quality level sooner when it may
read the history store?

    python bench/history_warm_start.py --job prune --out bench/results/history_warm_start.json
    python bench/history_warm_start.py --job sparsify --first 55% --second 50% --evals 40 \
        --out bench/results/history_warm_start_sparsify.json

1. run A at --first into a fresh history store;
2. run B at --second with that store (warm start from A's best shape);
3. run C at --second with no history (cold).
prune: Fashion-MNIST ResNet-20, in-loop accuracy per attempt (after a short fine-tune: noisy, ~±1 pt), level =
A's best - margin. sparsify: SmolLM2-135M, the evolve search (or --agent), probe KL to the dense model of every
attempt measured on the whole probe (deterministic), level = the cold run's final best KL: how many measured
evaluations the warm run needs to reach what the cold run ends with.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = str(Path(sys.executable).parent / "prunepilot")


def _attempts(out: Path) -> list[dict]:
    with sqlite3.connect(out / "journal.sqlite") as c:
        return [json.loads(x[0]) for x in c.execute("SELECT data FROM attempts ORDER BY round")]


def _run(cmd: list[str], out: Path, history: Path | None) -> tuple[list[dict], dict, float]:
    cmd = cmd + ["--out", str(out)] + (["--history", str(history)] if history else ["--no-history"])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return _attempts(out), json.loads((out / "result.json").read_text()), round(time.perf_counter() - t0, 1)


def run_prune(target: str, out: Path, args: argparse.Namespace, history: Path | None) -> dict:
    cmd = [BIN, "prune", "prunepilot:fmnist_resnet20", "--data", "fashion-mnist", "--target-macs", target,
           "--rounds", str(args.rounds), "--finetune-steps", str(args.finetune_steps), "--eval-limit", str(args.eval_limit),
           "--finetune-epochs", "0", "--agent", args.agent or "sensitivity"]
    rows, _, secs = _run(cmd, out, history)
    accs = [a["score"] if a["within_band"] and a["verdict"] not in ("failed",) else None for a in rows]
    return {"target": target, "history": bool(history), "accuracies": accs,
            "strategists": [a["strategist"] for a in rows], "best": max((a for a in accs if a is not None), default=None),
            "seconds": secs}


def run_sparsify(target: str, out: Path, args: argparse.Namespace, history: Path | None) -> dict:
    cmd = [BIN, "sparsify", args.model, "--sparsity", target, "--agent", args.agent or "evolve", "--evals", str(args.evals),
           "--method", "wanda", "--no-export", "--calib-seqs", "8", "--seqlen", "256", "--eval-seqs", "4",
           "--eval-seqlen", "512", "--probe-seqs", str(args.probe_seqs), "--probe-seqlen", "128", "--seed", str(args.seed)]
    rows, result, secs = _run(cmd, out, history)
    full = float(args.probe_seqs)
    evals, curve, best = 0, [], None  # best full-probe KL after each measured evaluation
    for a in rows:
        m = a["metrics"]
        if "probe_kl" not in m or a["extra"].get("cached"):
            continue
        evals += 1
        if m.get("probe_seqs", full) >= full:
            best = m["probe_kl"] if best is None else min(best, m["probe_kl"])
        curve.append(best)
    warm = next((a for a in rows if a["strategist"] == "history"), None)
    return {"target": target, "history": bool(history), "best_kl_after_eval": curve, "best": best,
            "warm_start_kl": warm["metrics"].get("probe_kl") if warm else None,
            "uniform_kl": result["loop"].get("probe_kl_uniform"), "perplexity": result["compressed"]["perplexity"],
            "dense_perplexity": result["dense"]["perplexity"], "warm_start_from": result["loop"].get("warm_start_from"),
            "strategists": [a["strategist"] for a in rows], "seconds": secs}


def evals_to(curve: list[float | None], level: float) -> int | None:
    return next((i + 1 for i, b in enumerate(curve) if b is not None and b <= level + 1e-12), None)


def rounds_to(accs: list[float | None], level: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accs) if a is not None and a >= level), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", choices=("prune", "sparsify"), default="prune")
    ap.add_argument("--first", default=None, help="A's budget (prune: 50%%, sparsify: 55%%)")
    ap.add_argument("--second", default=None, help="B's and C's budget (prune: 45%%, sparsify: 50%%)")
    ap.add_argument("--agent", default=None, help="prune: sensitivity; sparsify: evolve")
    ap.add_argument("--rounds", type=int, default=4, help="prune")
    ap.add_argument("--finetune-steps", type=int, default=20, help="prune")
    ap.add_argument("--eval-limit", type=int, default=1000, help="prune")
    ap.add_argument("--margin", type=float, default=0.005, help="prune: quality level = first run's best - margin")
    ap.add_argument("--model", default="smollm2", help="sparsify")
    ap.add_argument("--evals", type=int, default=40, help="sparsify: evaluation budget of each run")
    ap.add_argument("--probe-seqs", type=int, default=4, help="sparsify")
    ap.add_argument("--seed", type=int, default=0, help="sparsify")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    sp = args.job == "sparsify"
    args.first = args.first or ("55%" if sp else "50%")
    args.second = args.second or ("50%" if sp else "45%")
    args.out = args.out or Path(__file__).parent / "results" / f"history_warm_start{'_sparsify' if sp else ''}.json"
    run = run_sparsify if sp else run_prune
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store = tmp / "history.sqlite"
        a = run(args.first, tmp / "a", args, store)
        b = run(args.second, tmp / "b", args, store)
        c = run(args.second, tmp / "c", args, None)
    res = {"settings": vars(args) | {"out": str(args.out)}, "first": a, "warm": b, "cold": c,
           "command": " ".join(["python", "bench/history_warm_start.py", *sys.argv[1:]])}
    if sp:
        level = c["best"]
        res["level"] = level
        res["evals_to_level"] = {"warm": evals_to(b["best_kl_after_eval"], level), "cold": evals_to(c["best_kl_after_eval"], level)}
        print(json.dumps(res["evals_to_level"]), "level (cold's final KL)", round(level, 5))
        print("warm", b["best"], b["perplexity"], "cold", c["best"], c["perplexity"], "warm start KL", b["warm_start_kl"])
    else:
        level = a["best"] - args.margin
        res["level"] = level
        res["rounds_to_level"] = {"warm": rounds_to(b["accuracies"], level), "cold": rounds_to(c["accuracies"], level)}
        print(json.dumps(res["rounds_to_level"]), "level", round(level, 4))
        print("warm", b["accuracies"], "\ncold", c["accuracies"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
