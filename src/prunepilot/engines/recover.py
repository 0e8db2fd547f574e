"""Recovery after compression: a short fine-tune, optionally distilling from the dense model.

In the search loop every candidate gets the same `steps` budget with the same seed (same batches in
the same order), so candidates are ranked on what pruning did, not on luck in recovery.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunepilotError
from ..evaluate.batches import LossFn, distillation_loss, logits_of, split_batch, supervised_loss
from ..evaluate.classification import ProgressBar


@dataclass
class RecoveryStats:
    """What a fine-tune did: budget spent, loss at the start and end, whether it diverged."""

    steps: int
    epochs: float
    lr: float
    seconds: float
    loss_first: float
    loss_last: float
    kd: bool
    seed: int
    optimizer: str
    diverged: bool = False
    losses: list[float] = field(default_factory=list)  # mean loss per logging window

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _cycle(loader: Iterable) -> Iterator:
    while True:  # re-iterating a DataLoader reshuffles with its (seeded) generator
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise PrunepilotError("the fine-tuning loader must yield at least one batch", "an empty loader",
                                  "check the data split and limit")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: T^2 * KL(softmax(teacher/T) || softmax(student/T)), batch mean."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                    reduction="batchmean") * (t * t)


def finetune(
    model: nn.Module,
    loader: Iterable,
    *,
    steps: int | None = None,
    epochs: float | None = None,
    lr: float = 0.01,
    teacher: nn.Module | None = None,
    kd_temperature: float = 4.0,
    kd_alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    optimizer: str = "sgd",
    warmup_steps: int = 0,
    max_grad_norm: float | None = None,
    log_every: int = 20,
    on_step: Callable[[int, float], None] | None = None,
    loss_fn: LossFn | None = None,
) -> RecoveryStats:
    """Fine-tune `model` in place; returns RecoveryStats and leaves the model in eval mode.

    Budget: `steps` optimiser steps, or `epochs` (a float; len(loader) batches each), or one epoch.
    Optimiser: SGD (Nesterov momentum) for CNNs, or "adamw"; LR cosine-decays to 0 after `warmup_steps`.
    Loss: cross-entropy; with a `teacher`, (1-kd_alpha)*CE + kd_alpha*KD(T=kd_temperature); a loader
    without labels needs a teacher (pure distillation, label-free).
    `on_step(step, loss)` is called after every optimiser step (1-based step). `loss_fn(model, batch)`
    replaces the built-in objective with the user's own (detectors, multi-task models, ...).
    Deterministic for a seed: the global RNG is forked and seeded, and a loader's own shuffle
    generator is reseeded, so every call with one seed sees the same batches in the same order.
    """
    total = _resolve_steps(loader, steps, epochs)
    if not 0.0 <= kd_alpha <= 1.0 or kd_temperature <= 0:
        raise PrunepilotError("kd_alpha must be in [0, 1] and kd_temperature > 0",
                              f"kd_alpha={kd_alpha}, kd_temperature={kd_temperature}", "e.g. kd_alpha=0.5, T=4")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PrunepilotError("fine-tuning needs trainable parameters", "none require grad",
                              "unfreeze the model (p.requires_grad_(True))")
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                                     nesterov=momentum > 0)
    elif optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise PrunepilotError("optimizer must be 'sgd' or 'adamw'", optimizer, "pass optimizer='sgd'")

    def lr_at(step: int) -> float:  # multiplier: linear warm-up, then cosine to 0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / span))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    if teacher is not None:
        teacher.eval()

    stats = RecoveryStats(steps=0, epochs=0.0, lr=lr, seconds=0.0, loss_first=float("nan"),
                          loss_last=float("nan"), kd=teacher is not None, seed=seed, optimizer=optimizer)
    t0 = time.perf_counter()
    window: list[float] = []
    with torch.random.fork_rng(devices=[]), ProgressBar(progress, total, "fine-tune") as bar:
        torch.manual_seed(seed)
        model.train()
        batches = _cycle(loader)
        for step in range(total):
            batch = next(batches)
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                x, y = split_batch(batch)
                loss = _loss(logits_of(model, x), y, teacher, x, kd_temperature, kd_alpha)
            if not torch.isfinite(loss):
                stats.diverged = True  # stop rather than write NaNs through the whole model
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            val = float(loss.detach())
            if step == 0:
                stats.loss_first = val
            window.append(val)
            if len(window) == log_every or step == total - 1:
                stats.losses.append(sum(window) / len(window))
                window = []
            stats.steps = step + 1
            bar(val)
            if on_step is not None:  # e.g. logging, or a wall-time guard that raises to stop
                on_step(stats.steps, val)
    model.eval()
    stats.loss_last = stats.losses[-1] if stats.losses else stats.loss_first
    stats.seconds = time.perf_counter() - t0
    n_batches = _len(loader)
    stats.epochs = stats.steps / n_batches if n_batches else 0.0
    return stats


def _loss(logits: torch.Tensor, y: torch.Tensor | None, teacher: nn.Module | None, x: Any,
          temperature: float, alpha: float) -> torch.Tensor:
    if teacher is None:
        if y is None:
            raise PrunepilotError("fine-tuning without labels needs a teacher", "batches carry no labels",
                                  "pass teacher=dense_model (distillation) or a labelled loader")
        return supervised_loss(logits, y)
    with torch.no_grad():
        t_logits = logits_of(teacher, x)
    kd = distillation_loss(logits, t_logits, temperature, y)
    if y is None:
        return kd
    return (1 - alpha) * supervised_loss(logits, y) + alpha * kd


def _len(loader: Iterable) -> int:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _resolve_steps(loader: Iterable, steps: int | None, epochs: float | None) -> int:
    if steps is not None and epochs is not None:
        raise PrunepilotError("give a fine-tuning budget as steps or epochs, not both",
                              f"steps={steps}, epochs={epochs}", "drop one of them")
    if steps is not None:
        if steps < 1:
            raise PrunepilotError("fine-tuning steps must be >= 1", steps, "pass steps=100, or skip fine-tuning")
        return int(steps)
    n = _len(loader)
    if n == 0:
        raise PrunepilotError("an epoch budget needs a loader with a length", type(loader).__name__,
                              "pass steps= instead")
    epochs = 1.0 if epochs is None else epochs
    if epochs <= 0:
        raise PrunepilotError("fine-tuning epochs must be > 0", epochs, "pass epochs=1, or skip fine-tuning")
    return max(1, math.ceil(epochs * n))
