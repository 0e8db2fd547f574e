"""Does a paired latency measurement read the same a minute later? glibc's adaptive thresholds vs pinned ones.

For each model and batch: the dense model and a channel-pruned copy (torch-pruning, 30% of each prunable
layer's channels, round_to 8), then `--repeats` paired measurements (prunepilot's own `paired_ms`: single
forwards interleaved, the median of the pair ratios), each followed by the allocation churn a latency-table
build causes between two of a run's measurements (depthwise and dense convs over many widths and sizes).
Run once per allocator setting, each in its own process (pinning is for the life of a process):
`PRUNEPILOT_MALLOC=system` (glibc's adaptive thresholds) and the default (thresholds pinned). Reported: the
ratio's spread over the repeats (max/min - 1), dense ms, minor page faults per forward.

    python bench/allocator_repro.py            # both settings, writes bench/results/allocator_repro.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def churn(batch: int) -> None:
    import torch

    with torch.no_grad():
        for c in (16, 48, 96, 160, 320, 640, 960):
            for groups in (1, c):
                conv = torch.nn.Conv2d(c, c, 3, padding=1, groups=groups)
                for s in (56, 28, 14, 7):
                    conv(torch.randn(batch, c, s, s))


def one_setting(models: list[str], batches: list[int], repeats: int, pairs: int) -> list[dict]:
    import torch
    import torch_pruning as tp
    import torchvision

    from prunepilot.evaluate.allocator import steady_allocator
    from prunepilot.latency.model import paired_ms

    torch.set_num_threads(1)
    state = steady_allocator()
    rows = []
    for name in models:
        for batch in batches:
            torch.manual_seed(0)
            dense = getattr(torchvision.models, name)().eval()
            small = getattr(torchvision.models, name)().eval()
            x = torch.randn(batch, 3, 224, 224)
            last = [m for m in small.modules() if isinstance(m, torch.nn.Linear)][-1]
            tp.pruner.MagnitudePruner(small, x, importance=tp.importance.MagnitudeImportance(), pruning_ratio=0.3,
                                      ignored_layers=[last], round_to=8).step()
            reads = []
            for _ in range(repeats):
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                d, _, ratio = paired_ms(dense, small, x, torch.device("cpu"), pairs=pairs)
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / (2 * (pairs + 2))
                reads.append({"ratio": round(ratio, 4), "dense_ms": round(d, 2), "faults_per_forward": round(faults)})
                churn(batch)
            ratios = [r["ratio"] for r in reads]
            rows.append({"model": name, "batch": batch, "allocator": state, "reads": reads,
                         "ratio_median": statistics.median(ratios), "ratio_spread": max(ratios) / min(ratios) - 1,
                         "dense_ms_median": statistics.median(r["dense_ms"] for r in reads),
                         "faults_per_forward_median": statistics.median(r["faults_per_forward"] for r in reads)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("reads", "allocator")}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v3_large,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=21)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS / "allocator_repro.json")
    args = ap.parse_args()
    models, batches = args.models.split(","), [int(b) for b in args.batches.split(",")]
    if args.child:
        print("ROWS " + json.dumps(one_setting(models, batches, args.repeats, args.pairs)))
        return
    out: dict[str, list[dict]] = {}
    for setting in ("system", "steady"):
        env = {**os.environ, "PRUNEPILOT_MALLOC": setting, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "--child", "--models", args.models, "--batches", args.batches,
               "--repeats", str(args.repeats), "--pairs", str(args.pairs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        print(proc.stdout.split("ROWS ")[0], end="")
        out[setting] = json.loads(proc.stdout.split("ROWS ", 1)[1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/allocator_repro.py " + " ".join(sys.argv[1:]),
                                    "protocol": {"threads": 1, "repeats": args.repeats, "pairs": args.pairs,
                                                 "pruned": "torch-pruning magnitude, 30% of channels, round_to 8"},
                                    "settings": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
