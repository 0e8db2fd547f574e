"""Trained reference baselines: a CIFAR-style ResNet trained on Fashion-MNIST, cached on disk.

The benchmarks and the demo need a *trained* model to compress; training one takes minutes on a
laptop CPU, so it is trained once and cached (state_dict, loaded with weights_only=True) next to a
JSON file with its accuracy and training time.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import SourceError
from ..results import environment, write_json_atomic
from .cifar_resnet import ARCHS, build

DEFAULT_EPOCHS = 1
DATASET = "fmnist"


def default_cache_dir() -> Path:
    """$PRUNEPILOT_CACHE/baselines, else $XDG_CACHE_HOME/prunepilot/baselines, else ~/.cache/prunepilot/baselines."""
    if os.environ.get("PRUNEPILOT_CACHE"):
        return Path(os.environ["PRUNEPILOT_CACHE"]).expanduser() / "baselines"
    base = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
    return base / "prunepilot" / "baselines"


def baseline_paths(arch: str, cache_dir: Path | str | None = None, epochs: float | None = None) -> tuple[Path, Path]:
    """(weights .pt, info .json) in the cache: `fmnist_<arch>` is the default baseline (DEFAULT_EPOCHS);
    `fmnist_<arch>_e<epochs>` holds one trained for another number of epochs."""
    d = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stem = f"{DATASET}_{arch}" + (f"_e{epochs:g}" if epochs is not None else "")
    return d / f"{stem}.pt", d / f"{stem}.json"


def load_baseline(arch: str = "resnet20", cache_dir: Path | str | None = None,
                  epochs: float | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load a cached baseline (eval mode) and its info; SourceError naming the train command when absent."""
    import json

    pt, js = baseline_paths(arch, cache_dir, epochs)
    if not pt.is_file():
        raise SourceError("the trained baseline is not cached yet", str(pt),
                          f"run `prunepilot train-baseline --arch {arch}"
                          + (f" --epochs {epochs:g}`" if epochs is not None else "`")
                          + " (or python bench/train_baseline.py)")
    info = json.loads(js.read_text()) if js.is_file() else {"arch": arch}
    model = build(arch, num_classes=int(info.get("num_classes", 10)), in_channels=int(info.get("in_channels", 1)))
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    model.eval()
    info["path"] = str(pt)
    return model, info


def train_baseline(
    arch: str = "resnet20",
    epochs: float = DEFAULT_EPOCHS,
    *,
    out: Path | str | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    data: str = "fashion-mnist",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train `arch` from scratch on Fashion-MNIST (SGD+Nesterov, cosine LR), save weights + info JSON.

    `out` is the weights path (the info JSON sits beside it, same stem); default: the baseline cache.
    Returns the trained model (eval mode) and the info dict (val/test top-1, timings, MACs, params).
    """
    import torch_pruning as tp

    from ..engines.recover import finetune
    from ..evaluate.classification import evaluate_classifier
    from ..sources.data import load_data

    if arch not in ARCHS:
        build(arch)  # raises the SourceError naming the choices
    bundle = load_data(data, seed=seed)
    torch.manual_seed(seed)
    model = build(arch, num_classes=bundle.num_classes, in_channels=bundle.input_shape[0])
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, *bundle.input_shape))
    loader = bundle.loader("train", batch_size=batch_size, seed=seed)
    t0 = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if log is not None and step % 50 == 0:
            log(f"step {step}/{math.ceil(epochs * len(loader))} loss {loss:.3f} {time.perf_counter() - t0:.0f}s")

    stats = finetune(model, loader, epochs=epochs, lr=lr, weight_decay=weight_decay, seed=seed,
                     progress=progress, warmup_steps=min(200, len(loader) // 2), on_step=on_step)
    if stats.diverged:
        raise SourceError("baseline training must not diverge", f"non-finite loss after {stats.steps} steps",
                          "lower --lr")
    t = time.perf_counter()
    val = evaluate_classifier(model, bundle.loader("val", batch_size=512), progress=progress)
    test = evaluate_classifier(model, bundle.loader("test", batch_size=512), progress=progress)
    eval_s = time.perf_counter() - t
    pt, js = (Path(out).expanduser(), Path(out).expanduser().with_suffix(".json")) if out else baseline_paths(arch)
    info: dict[str, Any] = {
        "arch": arch,
        "dataset": bundle.name,
        "num_classes": bundle.num_classes,
        "in_channels": bundle.input_shape[0],
        "input_shape": list(bundle.input_shape),
        "normalization": bundle.normalization.to_json(),
        "splits": bundle.sizes(),
        "epochs": float(epochs),  # as asked: the cache key (epochs_done may round up to whole batches)
        "epochs_done": stats.epochs,
        "steps": stats.steps,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "seed": seed,
        "macs": macs,
        "params": params,
        "val_top1": val["top1"],
        "test_top1": test["top1"],
        "test_loss": test["loss"],
        "train_seconds": stats.seconds,
        "seconds_per_epoch": stats.seconds / max(stats.epochs, 1e-9),
        "eval_seconds": eval_s,
        "loss_curve": stats.losses,
        "trained_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "weights": str(pt),
    }
    pt.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=pt.parent, prefix=pt.name, suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is meant to be shared
    os.replace(tmp, pt)  # atomic: a crash never leaves half a checkpoint in the cache
    write_json_atomic(js, info)
    return model, info


def get_or_train_baseline(
    arch: str = "resnet20",
    epochs: float | None = None,
    cache_dir: Path | str | None = None,
    *,
    seed: int = 0,
    data: str = "fashion-mnist",
    retrain: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The cached Fashion-MNIST baseline for `arch`, training (and caching) it first when absent.

    epochs=None: the default baseline (`fmnist_<arch>.pt`, trained for DEFAULT_EPOCHS when absent).
    An explicit `epochs` returns the default baseline when it was trained that long, else the
    `fmnist_<arch>_e<epochs>.pt` one, training it when absent. `retrain` always trains.
    """
    pt, key = cache_slot(arch, epochs, cache_dir)
    if pt.is_file() and not retrain:
        return load_baseline(arch, cache_dir, key)
    return train_baseline(arch, DEFAULT_EPOCHS if epochs is None else epochs, out=pt, seed=seed, data=data,
                          progress=progress, log=log)


def cache_slot(arch: str, epochs: float | None, cache_dir: Path | str | None = None) -> tuple[Path, float | None]:
    """(weights path, epochs key for load_baseline) where a baseline of `epochs` epochs lives or will live."""
    default_pt, _ = baseline_paths(arch, cache_dir)
    default_epochs = _cached_epochs(arch, cache_dir) if default_pt.is_file() else float(DEFAULT_EPOCHS)
    if epochs is None or abs(default_epochs - float(epochs)) < 1e-6:
        return default_pt, None
    return baseline_paths(arch, cache_dir, epochs)[0], epochs


def _cached_epochs(arch: str, cache_dir: Path | str | None) -> float:
    import json

    js = baseline_paths(arch, cache_dir)[1]
    try:
        return float(json.loads(js.read_text()).get("epochs", -1))
    except (OSError, ValueError):
        return -1.0
