"""The Python API as a notebook user drives it: their own model, their own training, their DataLoaders and metric.

A user trains a small CNN on real Fashion-MNIST with their own loop and transforms (pixels in [0, 1], no
normalisation: exactly the case a wrong default would break), then calls `prunepilot.prune(model, x,
target_macs=..., train=..., val=..., evaluate=...)`. Written: dense/pruned accuracy on the official test split
(by the user's own evaluation code, on the returned model), MACs, the budget error, the side-by-side CPU
speed-up and wall time. JSON under bench/results/api_end_to_end.json.

    python bench/api_end_to_end.py [--epochs 2] [--target 0.5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunepilot
from prunepilot.sources.data import FASHION_MNIST_DIR, read_idx, _find_idx


def fashion_mnist() -> tuple[TensorDataset, TensorDataset]:
    """The user's own loading: raw IDX files to [0, 1] tensors (no normalisation)."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    xtr, ytr, xte, yte = (read_idx(_find_idx(FASHION_MNIST_DIR, s)) for s in stems)
    to_x = lambda a: torch.from_numpy(a.copy()).float().div(255).unsqueeze(1)  # noqa: E731
    return (TensorDataset(to_x(xtr), torch.from_numpy(ytr.astype("int64"))),
            TensorDataset(to_x(xte), torch.from_numpy(yte.astype("int64"))))


class UserCNN(nn.Module):
    def __init__(self, c: int = 48) -> None:
        super().__init__()
        def block(i: int, o: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.features = nn.Sequential(block(1, c, 1), block(c, c, 1), block(c, 2 * c, 2), block(2 * c, 2 * c, 1),
                                      block(2 * c, 4 * c, 2), block(4 * c, 4 * c, 1))
        self.head = nn.Linear(4 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    hits = n = 0
    for x, y in loader:
        hits += int((model(x).argmax(-1) == y).sum())
        n += len(y)
    return hits / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agent", default="sensitivity")
    ap.add_argument("--train-size", type=int, default=50000, help="training images (of the 60k; the rest: val)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/api_end_to_end.json"))
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench-api"))
    args = ap.parse_args()
    torch.manual_seed(0)
    train_ds, test_ds = fashion_mnist()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train_ds), generator=g)
    train = DataLoader(torch.utils.data.Subset(train_ds, perm[:args.train_size].tolist()), batch_size=128, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(torch.utils.data.Subset(train_ds, perm[50000:52000].tolist()), batch_size=256)
    test = DataLoader(test_ds, batch_size=512)

    model = UserCNN()
    t0 = time.perf_counter()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = int(args.epochs * len(train))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    model.train()
    done = 0
    while done < steps:
        for x, y in train:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if done >= steps:
                break
    train_s = time.perf_counter() - t0
    dense_acc = accuracy(model, test)
    print(f"user training: {args.epochs} epochs in {train_s:.0f} s, test top-1 {dense_acc:.4f}")

    x = torch.zeros(1, 1, 28, 28)
    t0 = time.perf_counter()
    res = prunepilot.prune(model, x, target_macs=args.target, train=train, val=val, agent=args.agent,
                           rounds=args.rounds, finetune_epochs=1.0, history=False, out=args.runs_dir,
                           overwrite=True, evaluate=lambda m: accuracy(m, val))
    prune_s = time.perf_counter() - t0
    pruned_acc = accuracy(res.model, test)
    row = {
        "model": "UserCNN (6 conv blocks, 48-192 channels), trained by the user's own loop",
        "train_images": args.train_size,
        "data": "Fashion-MNIST, user DataLoaders, pixels in [0, 1] (no normalisation)",
        "train_epochs": args.epochs, "train_seconds": round(train_s, 1),
        "target_macs": args.target, "agent": args.agent, "rounds": args.rounds,
        "dense_test_top1": dense_acc, "pruned_test_top1": pruned_acc,
        "delta_pt": round(100 * (pruned_acc - dense_acc), 2),
        "macs_dense": res.dense["macs"], "macs_pruned": res.metrics["macs"], "macs_error": res.raw["errors"]["macs"],
        "within_band": res.within_band, "cpu_speedup": res.raw.get("speedup"), "ideal_speedup": res.raw.get("ideal_speedup"),
        "score_metric": res.raw["score_metric"], "warnings": res.raw["warnings"], "prune_seconds": round(prune_s, 1),
        "run_id": res.run_id, "command": "python bench/api_end_to_end.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "runs_dir")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
