"""Classification quality: top-1 accuracy, label-free fidelity to the dense model, BatchNorm recalibration.

BN recalibration matters: after structured pruning the surviving channels feed BatchNorms whose running
statistics describe the *dense* network's activations; re-estimating them (no gradient step) lifts a
freshly 50%-pruned ResNet-20 on Fashion-MNIST from chance to most of its accuracy (see bench).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunepilotError
from .batches import device_of, forward, logits_of, split_batch  # noqa: F401  (split_batch: re-exported)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class ProgressBar:
    """A transient rich progress bar (or nothing when quiet); calling it advances one step."""

    def __init__(self, enabled: bool, total: int | None, label: str) -> None:
        self.enabled, self.total, self.label = enabled, total, label
        self._p: Any = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=True)
            self._p.start()
            self._task = self._p.add_task(self.label, total=self.total, info="")
        return self

    def __call__(self, loss: float | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=1, info="" if loss is None else f"loss {loss:.3f}")

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


def _n_batches(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


_device = device_of


class _eval_mode:
    """Put a model in eval mode and restore its previous mode afterwards."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models

    def __enter__(self) -> None:
        self.modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in zip(self.models, self.modes):
            m.train(mode)


def _labelled(loader: Iterable, max_batches: int | None, what: str, fix: str) -> Iterator[tuple[Any, torch.Tensor]]:
    """(inputs, labels) of the first `max_batches` batches; a batch without labels is an error naming `what`."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split_batch(batch)
        if y is None:
            raise PrunepilotError(f"{what} needs labelled batches", "batches carry no labels", fix)
        yield x, y


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: Iterable, max_batches: int | None = None, *, progress: bool = False
) -> dict[str, float]:
    """Top-1, top-5 accuracy and mean cross-entropy over labelled batches: {"top1", "top5", "loss", "n"}."""
    correct1 = correct5 = 0
    loss_sum, n = 0.0, 0
    with _eval_mode(model), ProgressBar(progress, _n_batches(loader, max_batches), "evaluate") as bar:
        for x, y in _labelled(loader, max_batches, "accuracy",
                              "use fidelity(model, dense_model, loader) for label-free scoring"):
            if y.is_floating_point():
                raise PrunepilotError("top-1 accuracy needs integer class labels", f"float targets ({y.dtype})",
                                      "regression targets are scored by evaluate_regression (mean squared error)")
            logits = logits_of(model, x)
            logits = logits.reshape(-1, logits.shape[-1])  # (B or B*T, classes)
            y = y.to(logits.device).reshape(-1)
            top = logits.topk(min(5, logits.shape[-1]), -1).indices  # (B, k)
            correct1 += int((top[:, 0] == y).sum())
            correct5 += int((top == y[:, None]).any(-1).sum())
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
            bar()
    if n == 0:
        raise PrunepilotError("evaluation needs at least one sample", "an empty loader",
                              "check the data split and limit")
    return {"top1": correct1 / n, "top5": correct5 / n, "loss": loss_sum / n, "n": float(n)}


@torch.no_grad()
def evaluate_regression(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> dict[str, float]:
    """Mean squared and absolute error against float targets: {"mse", "mae", "target_var", "n"} (per element;
    `target_var` is the targets' variance, the MSE of always predicting their mean)."""
    se = ae = s1 = s2 = 0.0
    n = 0
    with _eval_mode(model):
        for x, y in _labelled(loader, max_batches, "regression scoring", "yield (x, y) from the DataLoader"):
            y = y.float()
            pred = logits_of(model, x).to(y.device)
            if pred.numel() != y.numel():
                raise PrunepilotError("the model's output and the targets differ in size",
                                      f"output {tuple(pred.shape)} vs targets {tuple(y.shape)}",
                                      "return one prediction per target, or pass evaluate= / loss=")
            d = pred.reshape(y.shape) - y
            se, ae = se + float((d * d).sum()), ae + float(d.abs().sum())
            s1, s2, n = s1 + float(y.sum()), s2 + float((y * y).sum()), n + y.numel()
    if n == 0:
        raise PrunepilotError("evaluation needs at least one sample", "an empty loader",
                              "check the data split and limit")
    mean = s1 / n
    return {"mse": se / n, "mae": ae / n, "target_var": max(0.0, s2 / n - mean * mean), "n": float(n)}


def has_float_targets(batch: Any) -> bool:
    """True when a batch's targets are floating point: a regression, scored by error instead of top-1."""
    y = split_batch(batch)[1]
    return isinstance(y, torch.Tensor) and y.is_floating_point()


def top1_accuracy(model: nn.Module, loader: Iterable, max_batches: int | None = None, *,
                  progress: bool = False) -> float:
    """Fraction of samples whose arg-max logit equals the label (model left in its previous mode)."""
    return evaluate_classifier(model, loader, max_batches, progress=progress)["top1"]


@torch.no_grad()
def dense_logits(dense_model: nn.Module, loader: Iterable, max_batches: int | None = None) -> list[torch.Tensor]:
    """The dense model's logits per batch, to reuse across candidates (loader must not shuffle)."""
    out = []
    with _eval_mode(dense_model):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            out.append(logits_of(dense_model, split_batch(batch)[0]).cpu())
    return out


@torch.no_grad()
def fidelity(
    model: nn.Module,
    dense_model: nn.Module | Sequence[torch.Tensor],
    loader: Iterable,
    max_batches: int | None = None,
    *,
    progress: bool = False,
) -> dict[str, float]:
    """Label-free closeness to the dense model: {"agreement": top-1 agreement, "kl": mean KL(dense || model)}.

    `dense_model` may be the module or its cached per-batch logits from `dense_logits` (same loader,
    no shuffling), which saves one dense forward per candidate in a search.
    """
    device = _device(model)
    cached = not isinstance(dense_model, nn.Module)
    agree, kl_sum, n = 0, 0.0, 0
    models = (model,) if cached else (model, dense_model)
    with _eval_mode(*models), ProgressBar(progress, _n_batches(loader, max_batches), "fidelity") as bar:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = split_batch(batch)[0]
            if cached:
                if i >= len(dense_model):  # type: ignore[arg-type]
                    raise PrunepilotError("cached dense logits must cover every evaluated batch",
                                          f"{len(dense_model)} cached, batch {i} requested",  # type: ignore[arg-type]
                                          "recompute dense_logits with the same loader and max_batches")
                d = dense_model[i].to(device)  # type: ignore[index]
            else:
                d = logits_of(dense_model, x)  # type: ignore[arg-type]
            p = logits_of(model, x)  # (B, classes)
            if d.shape != p.shape:
                raise PrunepilotError("fidelity compares outputs of the same shape", f"{tuple(d.shape)} vs "
                                      f"{tuple(p.shape)}", "compare a compressed model with its own dense model")
            d, p = d.reshape(-1, d.shape[-1]), p.reshape(-1, p.shape[-1])  # per-token outputs count per token
            agree += int((d.argmax(-1) == p.argmax(-1)).sum())
            # KL(dense || pruned) summed over the batch
            kl_sum += float(F.kl_div(F.log_softmax(p, -1), F.log_softmax(d, -1), log_target=True, reduction="sum"))
            n += len(p)
            bar()
    if n == 0:
        raise PrunepilotError("fidelity needs at least one sample", "an empty loader", "check the data split")
    return {"agreement": agree / n, "kl": kl_sum / n, "n": float(n)}


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: Iterable, num_batches: int = 50, *,
                          progress: bool = False) -> int:
    """Re-estimate every BatchNorm's running mean/var from `num_batches` batches; returns how many BNs.

    Running stats are reset and accumulated with momentum=None (a cumulative average, so every batch
    counts equally); the forward runs in train mode for BN only, without gradients, so no weight changes
    and dropout stays off. The model is left in eval mode. Models without BatchNorm are untouched (0).
    """
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not bns:
        return 0
    if num_batches < 1:
        raise PrunepilotError("BN recalibration needs at least one batch", num_batches, "pass num_batches >= 1")
    momenta = [m.momentum for m in bns]
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
    model.eval()  # everything else (dropout, ...) in eval mode
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    seen = 0
    try:
        with ProgressBar(progress, _n_batches(loader, num_batches), "BN recalibration") as bar:
            for i, batch in enumerate(loader):
                if i >= num_batches:
                    break
                forward(model, split_batch(batch)[0])
                seen += 1
                bar()
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    if seen == 0:  # nothing seen: put the old statistics back rather than leave them reset
        for m, (mean, var, nbt) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(nbt)
        raise PrunepilotError("BN recalibration needs a non-empty loader", "no batches", "check the data split")
    return len(bns)


class ClassificationEvaluator:
    """What the search loop calls per candidate: BN recalibration, then accuracy and fidelity on val.

    The dense model's logits are computed once (fixed, unshuffled loader) and reused for every
    candidate; BN recalibration updates the candidate in place (that is the point: it is kept).
    `labels=False` scores label-free (fidelity only), for data without labels.
    """

    def __init__(
        self,
        loader: Iterable,
        dense_model: nn.Module | None = None,
        *,
        calibration_loader: Iterable | None = None,
        bn_batches: int = 20,
        max_batches: int | None = None,
        labels: bool = True,
        progress: bool = False,
    ) -> None:
        self.loader, self.calibration_loader = loader, calibration_loader
        self.bn_batches, self.max_batches, self.labels, self.progress = bn_batches, max_batches, labels, progress
        self._dense = dense_logits(dense_model, loader, max_batches) if dense_model is not None else None
        if not labels and self._dense is None:
            raise PrunepilotError("label-free evaluation needs the dense model", "labels=False, no dense model",
                                  "pass dense_model=")

    def measure(self, model: nn.Module, *, recalibrate: bool = True) -> dict[str, float]:
        """{"top1", "top5", "loss"} (with labels), {"agreement", "kl"} (with a dense model), "bn_layers"."""
        out: dict[str, float] = {"bn_layers": 0.0}
        if recalibrate and self.calibration_loader is not None and self.bn_batches > 0:
            out["bn_layers"] = float(recalibrate_batchnorm(model, self.calibration_loader, self.bn_batches,
                                                           progress=self.progress))
        if self.labels:
            out.update(evaluate_classifier(model, self.loader, self.max_batches, progress=self.progress))
        if self._dense is not None:
            fid = fidelity(model, self._dense, self.loader, self.max_batches, progress=self.progress)
            out.update(agreement=fid["agreement"], kl=fid["kl"], n=fid["n"])
        return out

    @classmethod
    def for_bundle(
        cls,
        bundle: Any,
        dense_model: nn.Module | None = None,
        *,
        split: str = "val",
        limit: int | None = 2000,
        batch_size: int = 256,
        bn_batches: int = 20,
        seed: int = 0,
        progress: bool = False,
    ) -> "ClassificationEvaluator":
        """Evaluator over a `DataBundle` split (fixed seed-chosen subset of `limit` samples); BN
        statistics come from the training split, never from the split being scored."""
        return cls(
            bundle.loader(split, batch_size=batch_size, limit=limit, shuffle=False, seed=seed),
            dense_model,
            calibration_loader=bundle.loader("train", batch_size=128, shuffle=True, seed=seed),
            bn_batches=bn_batches,
            progress=progress,
        )
