"""A user's batches, whatever their shape: split into (inputs, labels), run through the model, scored.

Batches may be a tensor (no labels), an `(inputs, labels)` pair, `(x1, x2, ..., labels)` (the last element is
the label), or a dict: label keys (`labels`, `label`, `y`, `target`, `targets`) are split off, the remaining
tensors are the inputs — one tensor is passed positionally, several as keyword arguments (a Hugging Face
model's `input_ids` + `attention_mask`). Outputs may be tensors, tuples, dicts or ModelOutputs; metrics read
`inputs.primary_output` (the logits).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PrunepilotError
from ..inputs import call, primary_output, to_device

LABEL_KEYS = ("labels", "label", "y", "target", "targets")

# loss(model, batch) -> scalar tensor: the user's own training objective (detectors, regressors, ...)
LossFn = Callable[[nn.Module, Any], torch.Tensor]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor | None]:
    """(inputs, labels or None) from a batch (see module doc)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        y = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        rest = {k: v for k, v in batch.items() if k not in LABEL_KEYS and isinstance(v, torch.Tensor)}
        if not rest:
            raise PrunepilotError("a dict batch needs at least one input tensor besides its labels", sorted(batch),
                                  "yield {'pixel_values': x, 'labels': y} or (x, y) from the DataLoader")
        return (next(iter(rest.values())) if len(rest) == 1 else rest), y
    if isinstance(batch, (list, tuple)) and batch:
        if len(batch) == 1:
            return batch[0], None
        if len(batch) == 2:
            return batch[0], batch[1]
        return tuple(batch[:-1]), batch[-1]
    raise PrunepilotError("a batch must be a tensor, an (inputs, labels) pair or a dict", type(batch).__name__,
                          "yield (x, y) from the DataLoader")


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def dtype_of(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def forward(model: nn.Module, inputs: Any) -> Any:
    """Run `model` on `inputs` moved to its device (and floating inputs to its dtype)."""
    return call(model, to_device(inputs, device_of(model), dtype_of(model)))


def logits_of(model: nn.Module, inputs: Any) -> torch.Tensor:
    return primary_output(forward(model, inputs)).float()


def supervised_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer labels (classification, per-token too), MSE for float targets."""
    y = y.to(logits.device)
    if not y.is_floating_point():
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.mse_loss(logits.reshape(y.shape) if logits.numel() == y.numel() else logits, y.float())


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                      y: torch.Tensor | None) -> torch.Tensor:
    """Hinton KD (T^2 * KL) for logits; MSE to the teacher's outputs for regression (float targets)."""
    if y is not None and y.is_floating_point():
        return F.mse_loss(student, teacher)
    t = temperature
    s = F.log_softmax(student.reshape(-1, student.shape[-1]) / t, -1)
    q = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]) / t, -1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * (t * t)
