"""At equal MACs, does removing whole residual blocks run faster than narrowing channels? (speed only)

Per model (random weights: latency does not depend on them), at one MAC target:
  * `channels`: the uniform plan (every group loses the same fraction, round_to=8), projected onto the MACs;
  * `blocks`: the same plan with the skippable residual blocks that remove the most measured latency per MAC
    skipped (greedy, covering `--block-share` of the MACs the target removes), channels narrowed for the rest.
Both built once; `--repeats` separate paired measurements against dense (single forwards interleaved, median
of the pair ratios), in rotated order; the median of the repeats is reported. Which blocks a trained model can
afford to lose is an accuracy question (the `blocks` strategist measures it on data); this bench asks only what
the latency side of that trade is worth on this CPU.

    python bench/block_speed.py [--models resnet50,convnext_tiny,deit_small,mobilenet_v3_large] [--macs 50%]
        [--block-share 0.5] [--batch 1] [--threads 1] [--repeats 3] -> bench/results/block_speed.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from prunepilot.blocks import block_rows
from prunepilot.budget import Budget
from prunepilot.latency.job import block_skip_probe
from prunepilot.latency.model import build_latency_model, paired_ms
from prunepilot.pipeline import Pruner, count_real
from prunepilot.plan import Plan
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.models import load_model

URIS = {"resnet50": "torchvision:resnet50", "mobilenet_v3_large": "torchvision:mobilenet_v3_large",
        "convnext_tiny": "torchvision:convnext_tiny", "deit_small": "timm:deit_small_patch16_224",
        "resnet18": "torchvision:resnet18"}


def pick_blocks(rows: list[dict], need: float) -> list[str]:
    """Greedy: the most measured latency removed per MAC share first, while the MAC shares fit `need`."""
    ranked = sorted(rows, key=lambda r: -r["latency_share"] / max(1e-6, r["macs_share"]))
    chosen, covered = [], 0.0
    for r in ranked:
        if r["latency_share"] > 0 and covered + r["macs_share"] <= need + 1e-9:
            chosen.append(r["block"])
            covered += r["macs_share"]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,convnext_tiny,deit_small,mobilenet_v3_large")
    ap.add_argument("--macs", default="50%")
    ap.add_argument("--block-share", type=float, default=0.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=224, help="input resolution (smaller only to smoke-test the script)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/block_speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        loaded = load_model(URIS[name], weights="random", input_shape=(args.batch, 3, args.size, args.size))
        pruner = Pruner(loaded)
        st = pruner.structure
        lm = build_latency_model(pruner.dense, pruner.x, st, runs=3, align=False)
        lm.skip_probe = block_skip_probe(pruner, lm)  # block_rows below times every block's skip
        info = block_rows(st, pruner.cost, lm)
        rb = Budget.parse(macs=args.macs).resolve(pruner.profile.dense)
        need = 1 - rb.goals["macs"] / pruner.profile.dense["macs"]
        skip = pick_blocks(info, args.block_share * need)
        arms = {"channels": pruner.candidate(Plan(round_to=8), rb), "blocks": pruner.candidate(Plan(round_to=8, skip=skip), rb)}
        models = {k: c.model for k, c in arms.items()}
        ratios: dict[str, list[float]] = {k: [] for k in models}
        order = list(models)
        for r in range(args.repeats):
            for k in order[r % 2:] + order[: r % 2]:
                ratios[k].append(paired_ms(pruner.dense, models[k], pruner.x, torch.device("cpu"), pairs=41)[2])
        med = {k: statistics.median(v) for k, v in ratios.items()}
        macs = {k: count_real(m, pruner.x)["macs"] / pruner.profile.dense["macs"] for k, m in models.items()}
        row = {"model": name, "batch": args.batch, "macs_target": args.macs, "blocks_available": len(st.blocks),
               "blocks_skipped": skip, "blocks_macs_share": round(sum(r["macs_share"] for r in info if r["block"] in skip), 4),
               "blocks_latency_share_predicted": round(sum(r["latency_share"] for r in info if r["block"] in skip), 4),
               "macs_kept": macs, "latency_ratio": med, "latency_ratios": ratios,
               "speedup": {k: 1 / v for k, v in med.items()}, "ideal_speedup": {k: 1 / v for k, v in macs.items()},
               "blocks_vs_channels": med["channels"] / med["blocks"], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{name}: skip {len(skip)}/{len(st.blocks)} blocks ({row['blocks_macs_share']:.1%} of MACs): latency "
              f"channels {med['channels']:.3f}, blocks {med['blocks']:.3f} of dense -> blocks {row['blocks_vs_channels']:.3f}x "
              f"faster at MACs {macs['channels']:.3f} / {macs['blocks']:.3f}", flush=True)
        write_json_atomic(args.out, {"environment": environment(), "command": "python " + " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
