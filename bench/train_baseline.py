"""Train the Fashion-MNIST baseline (CIFAR-style ResNet) once, cache it, and record how it went.

    python bench/train_baseline.py --arch resnet20 --epochs 1          # -> ~/.cache/prunepilot/baselines/
    python bench/train_baseline.py --epochs 3 --tag e3                 # -> .../fmnist_resnet20_e3.pt
    python bench/train_baseline.py --measure-bn --recovery-steps 100   # + BN recal / short recovery at 50% MACs

Writes bench/results/train_baseline.json (accuracy, timing, MACs; never the weights).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from prunepilot.engines.recover import finetune
from prunepilot.evaluate.classification import evaluate_classifier, fidelity, recalibrate_batchnorm
from prunepilot.models.baseline import get_or_train_baseline
from prunepilot.results import environment, write_json_atomic
from prunepilot.sources.data import load_data

RESULTS = Path(__file__).resolve().parent / "results" / "train_baseline.json"


def bn_recalibration_probe(model: torch.nn.Module, seed: int = 0, ratio: float = 0.5,
                           recovery_steps: int = 0) -> dict:
    """Prune channels with torch-pruning to ~`ratio` of the dense MACs (bisected global L1 ratio), then
    score the test set before and after BN recalibration (no gradient step)."""
    import torch_pruning as tp

    bundle = load_data("fashion-mnist", seed=seed)
    ex = torch.zeros(1, *bundle.input_shape)
    dense_macs, _ = tp.utils.count_ops_and_params(model, ex)

    def prune(r: float) -> torch.nn.Module:
        m = copy.deepcopy(model).eval()
        pruner = tp.pruner.MetaPruner(m, ex, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=r, ignored_layers=[m.fc], global_pruning=False)
        pruner.step()
        return m

    lo, hi = 0.0, 0.9  # channel ratio -> MACs is monotone: bisect until within 1% of the target
    for _ in range(12):
        mid = (lo + hi) / 2
        macs, _ = tp.utils.count_ops_and_params(prune(mid), ex)
        if macs > ratio * dense_macs:
            lo = mid
        else:
            hi = mid
        if abs(macs / dense_macs - ratio) < 0.01:
            break
    pruned = prune(mid)
    macs, params = tp.utils.count_ops_and_params(pruned, ex)
    test = bundle.loader("test", batch_size=512)
    before = evaluate_classifier(pruned, test)["top1"]
    t = time.perf_counter()
    recalibrate_batchnorm(pruned, bundle.loader("train", batch_size=128, seed=seed), num_batches=50)
    recal_s = time.perf_counter() - t
    after = evaluate_classifier(pruned, test)["top1"]
    out = {"channel_ratio": mid, "macs": macs, "macs_fraction": macs / dense_macs, "params": params,
           "importance": "L1 magnitude, uniform per layer", "test_top1_pruned": before,
           "test_top1_after_bn_recal": after, "bn_batches": 50, "bn_recal_seconds": recal_s,
           "fidelity_after_bn_recal": fidelity(pruned, model, bundle.loader("val", batch_size=512, limit=2000))}
    if recovery_steps:
        # the in-loop recovery budget: a short fine-tune after BN recalibration, CE alone vs with KD
        train = bundle.loader("train", batch_size=128, seed=seed)
        for name, teacher in (("ce", None), ("kd", model)):
            m = copy.deepcopy(pruned)
            st = finetune(m, train, steps=recovery_steps, lr=0.01, teacher=teacher, seed=seed, progress=False)
            out[f"test_top1_after_{recovery_steps}_steps_{name}"] = evaluate_classifier(m, test)["top1"]
            out[f"finetune_seconds_{name}"] = st.seconds
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet20")
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true", help="train even when a cached model exists")
    ap.add_argument("--measure-bn", action="store_true", help="also measure BN recalibration at 50%% MACs")
    ap.add_argument("--recovery-steps", type=int, default=0,
                    help="with --measure-bn: also fine-tune the pruned model this many steps (CE and KD)")
    ap.add_argument("--tag", default="", help="results file bench/results/train_baseline[_TAG].json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core box 2 threads ran 4-6x slower)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, info = get_or_train_baseline(args.arch, args.epochs, seed=args.seed, retrain=args.retrain,
                                        progress=not args.quiet, log=lambda msg: print(msg, flush=True))
    result = {"bench": "train_baseline", **{k: v for k, v in info.items() if k not in ("loss_curve", "weights", "path")},
              "loss_curve": info.get("loss_curve", [])[::5]}
    if args.measure_bn:
        result["bn_recalibration_50pct_macs"] = bn_recalibration_probe(model, args.seed,
                                                                       recovery_steps=args.recovery_steps)
    result["environment"] = environment()
    write_json_atomic(RESULTS.with_name(f"train_baseline{'_' + args.tag if args.tag else ''}.json"), result)
    print({k: result[k] for k in ("arch", "epochs", "val_top1", "test_top1", "train_seconds", "macs", "params")})
    if "bn_recalibration_50pct_macs" in result:
        print(result["bn_recalibration_50pct_macs"])


if __name__ == "__main__":
    main()
