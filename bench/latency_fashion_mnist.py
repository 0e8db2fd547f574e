"""On a trained model: is a latency-targeted prune at least as accurate as a MAC-targeted one at equal latency?

Trained Fashion-MNIST ResNet-20 (bench/train_baseline.py's cached baseline), the sensitivity strategist, per seed:
  1. `macs` arm: MACs target (default 50%), the one loop, equal recovery budget (bench/agent_fashion_mnist.run_arm);
     its latency measured against the dense model (single forwards interleaved, median of 61 pair ratios).
  2. `latency` arm: a latency target equal to the macs arm's measured latency ratio: this device's latency tables
     in the projector, each group's latency from the tables in the profile (the sensitivity strategist trades
     sensitivity against measured latency saved, not MACs), measured fresh and corrected once.
  3. Both winners (after the same final recovery) timed side by side against dense in one measurement.
Rows: top-1 on the 10k test split, MACs kept, measured latency ratio of each, the accuracy difference.

    python bench/latency_fashion_mnist.py [--seeds 0,1] [--target 50%] [--arm sensitivity] [--latency-arm blocks]
        [--batch 32]
        -> bench/results/latency_fashion_mnist.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from agent_fashion_mnist import run_arm  # noqa: E402  (the one-loop arm runner, shared)

from prunepilot.evaluate.classification import evaluate_classifier  # noqa: E402
from prunepilot.latency.model import paired_ms  # noqa: E402
from prunepilot.models.baseline import get_or_train_baseline  # noqa: E402
from prunepilot.pipeline import count_real  # noqa: E402
from prunepilot.results import environment, write_json_atomic  # noqa: E402
from prunepilot.sources.data import load_data  # noqa: E402


def latency_ratios(dense: torch.nn.Module, models: dict[str, torch.nn.Module], x, pairs: int = 61) -> dict[str, float]:
    """model ms / dense ms for each model: single forwards interleaved with dense, median of the pairs."""
    return {k: paired_ms(dense, m, x, torch.device("cpu"), pairs=pairs)[2] for k, m in models.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--target", default="50%", help="the macs arm's MAC target")
    ap.add_argument("--arm", default="sensitivity")
    ap.add_argument("--latency-arm", default=None, help="strategist of the latency-targeted run (default: --arm); "
                                                        "e.g. blocks: skip residual blocks where measured cheap")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--loop-steps", type=int, default=40)
    ap.add_argument("--final-steps", type=int, default=300)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1, help="batch of the example input latency is timed on (a 28x28 "
                                                         "ResNet-20 at batch 1 runs ~4 ms: framework overhead)")
    ap.add_argument("--runs-dir", default="runs/bench_latency")
    ap.add_argument("--out", type=Path, default=Path("bench/results/latency_fashion_mnist.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dense, info = get_or_train_baseline("resnet20")
    data = load_data("fashion-mnist", input_shape=tuple(info["input_shape"]), seed=0)
    dense_top1 = evaluate_classifier(dense, data.loader("test", batch_size=512, shuffle=False))["top1"]
    x = torch.randn(args.batch, *info["input_shape"])
    dense_macs = count_real(dense, x)["macs"]
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        models: dict[str, torch.nn.Module] = {}
        macs_row = run_arm(args.arm, args.target, seed, args, dense, info, data, Path(args.runs_dir), models=models)
        models["macs"] = models.pop(args.arm)
        goal = latency_ratios(dense, {"macs": models["macs"]}, x)["macs"]
        lat_arm = args.latency_arm or args.arm
        lat_row = run_arm(lat_arm, f"{goal * 100:.2f}%", seed, args, dense, info, data, Path(args.runs_dir),
                          metric="latency_ms", models=models)
        if lat_arm in models:
            models["latency"] = models.pop(lat_arm)
        # else: no attempt met the measured latency band (lat_row says why); the macs arm is still measured
        ratios = latency_ratios(dense, models, x)
        row = {"seed": seed, "arm": args.arm, "latency_arm": lat_arm, "macs_target": args.target, "latency_goal_ratio": goal,
               "top1": {"macs": macs_row.get("top1"), "latency": lat_row.get("top1")},
               "macs_kept": {k: count_real(m, x)["macs"] / dense_macs for k, m in models.items()},
               "latency_ratio": ratios, "rows": [macs_row, lat_row]}
        if None not in row["top1"].values() and "latency" in models:
            row["top1_latency_minus_macs"] = row["top1"]["latency"] - row["top1"]["macs"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "rows"}), flush=True)
        write_json_atomic(args.out, {"environment": environment(), "dense_top1": dense_top1, "settings": {
            k: str(v) for k, v in vars(args).items()}, "rows": rows, "command": "python " + " ".join(sys.argv)})


if __name__ == "__main__":
    main()
