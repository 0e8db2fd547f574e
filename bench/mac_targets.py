"""Budget-exact structured pruning on the published MAC targets (random weights: MACs and latency only).

For each model: analyse once, project the uniform plan onto the target (timed), prune, count real MACs with
torch-pruning's counter, and time dense vs pruned side by side in one process (interleaved rounds).
ResNet-50 is also pruned with round_to 1/8/16 to show what channel alignment does to the CPU speed-up.

    python bench/mac_targets.py [--quick] [--rounds 5]   ->  bench/results/mac_targets.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from prunepilot.budget import Budget
from prunepilot.costmodel import build_cost_model
from prunepilot.engines.structured import apply_allocation
from prunepilot.evaluate.speed import compare_latency
from prunepilot.pipeline import count_real
from prunepilot.plan import Plan
from prunepilot.projector import Projector
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.models import load_model
from prunepilot.structure import analyse

CASES = [
    # (uri, target, source of the target)
    ("torchvision:resnet50", "1.77G", "AgenticPruner / Torch-Pruning"),
    ("torchvision:resnet101", "4.22G", "AgenticPruner"),
    ("timm:convnext_small", "8.17G", "AgenticPruner"),
    ("timm:deit_tiny_patch16_224", "0.61G", "AgenticPruner / Isomorphic"),
    ("timm:deit_small_patch16_224", "50%", "issue"),
    ("timm:vit_base_patch16_224", "4.6G", "Isomorphic (DeiT-B 4.16G class)"),
]


def run_case(uri: str, target: str, round_to: int | None, rounds: int, prune_heads: bool = False, threads: int | None = None) -> dict:
    warnings.simplefilter("ignore")
    loaded = load_model(uri)
    model, x = loaded.module, loaded.example_input
    t0 = time.perf_counter()
    structure, _ = analyse(model, x)
    cost = build_cost_model(model, x, structure)
    analyse_s = time.perf_counter() - t0
    rb = Budget.parse(macs=target).resolve({"macs": cost.dense_macs, "params": cost.dense_params})
    plan = Plan(round_to=round_to, prune_heads=prune_heads)
    proj = Projector(structure, cost).project(plan, rb)
    pruned = apply_allocation(copy.deepcopy(model), x, structure, proj.allocation)
    real = count_real(pruned, x)
    err = rb.error("macs", real["macs"])
    lat = compare_latency({"dense": model, "pruned": pruned}, x, rounds=rounds, warmup=2, threads=threads)
    speedup = lat["dense"].median_ms / lat["pruned"].median_ms
    ideal = cost.dense_macs / real["macs"]
    return {
        "model": uri,
        "target": target,
        "round_to": round_to,
        "prune_heads": prune_heads,
        "dense_macs": cost.dense_macs,
        "goal_macs": rb.goals["macs"],
        "achieved_macs": real["macs"],
        "error": err,
        "within_band": rb.within("macs", real["macs"]),
        "within_half_percent": abs(err) <= 0.005,
        "predicted_error": proj.errors["macs"],
        "projection_seconds": proj.seconds,
        "projection_evaluations": proj.iterations,
        "analysis_seconds": analyse_s,
        "params_ratio": real["params"] / cost.dense_params,
        "latency_dense_ms": lat["dense"].median_ms,
        "latency_pruned_ms": lat["pruned"].median_ms,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "speedup_over_ideal": speedup / ideal,
        "threads": lat["dense"].threads,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="ResNet-50 and DeiT-Tiny only")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for latency (default: torch's)")
    ap.add_argument("--rounding-only", action="store_true", help="only the ResNet-50 channel-rounding latency study")
    ap.add_argument("--out", default="bench/results/mac_targets.json")
    args = ap.parse_args()
    rows = []
    cases = [] if args.rounding_only else (CASES[:1] + CASES[3:4] if args.quick else CASES)
    for uri, target, source in cases:
        row = run_case(uri, target, 8, args.rounds, threads=args.threads)
        row["target_source"] = source
        rows.append(row)
        print(f"{uri:32s} {target:>6s} err {row['error']:+.3%} band {row['within_band']} "
              f"proj {row['projection_seconds']:.2f}s speed-up {row['speedup']:.2f}x / ideal {row['ideal_speedup']:.2f}x", flush=True)
    rounding = []
    for rt in (None, 8, 16):
        row = run_case("torchvision:resnet50", "1.77G", rt, args.rounds, threads=args.threads)
        rounding.append(row)
        print(f"resnet50 round_to={rt}: err {row['error']:+.3%} speed-up {row['speedup']:.2f}x / ideal {row['ideal_speedup']:.2f}x", flush=True)
    out = {"environment": environment(), "rounds": args.rounds, "targets": rows, "resnet50_rounding": rounding,
           "command": "python " + " ".join(sys.argv)}
    write_json_atomic(Path(args.out), out)
    print(json.dumps({"all_within_half_percent": all(r["within_half_percent"] for r in rows)}))



if __name__ == "__main__":
    torch.manual_seed(0)
    main()
