"""Example inputs of any form a user's model takes, and the one place that calls a model with them.

A model's forward may take one tensor, several positional tensors, or keyword tensors (a Hugging Face
model's `input_ids` / `pixel_values` / `attention_mask`); it may return a tensor, a tuple/list, a dict or a
`transformers` ModelOutput. Everything that runs a model on example inputs (structure analysis, cost model,
verification, timing, export) goes through `call` and reads outputs through `primary_output`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

ExampleInputs = Union[torch.Tensor, tuple, list, dict]


def call(model: nn.Module, inputs: ExampleInputs) -> Any:
    """model(inputs) for a tensor, model(*inputs) for a tuple/list, model(**inputs) for a dict."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Sequence):
        return model(*inputs)
    raise TypeError(f"example inputs must be a tensor, a tuple/list of tensors or a dict; got {type(inputs).__name__}")


def as_args_kwargs(inputs: ExampleInputs) -> tuple[tuple, dict]:
    """The (args, kwargs) torch.export / ONNX export expect."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside a nested output/input structure (ModelOutput, dict, tuple, list), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, Mapping) or hasattr(obj, "to_tuple"):
        values = obj.to_tuple() if hasattr(obj, "to_tuple") else obj.values()
        return [t for v in values for t in tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in tensors(v)]
    return []


def primary_output(out: Any) -> torch.Tensor:
    """The tensor a metric reads: the tensor itself, `.logits` of a ModelOutput / dict, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    found = tensors(out)
    if not found:
        raise TypeError(f"the model returned no tensor (got {type(out).__name__})")
    return found[0]


def output_shapes(out: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors(out)]


def map_tensors(inputs: Any, fn) -> Any:
    """Apply fn to every tensor, keeping the structure (dicts, tuples, lists; other values unchanged)."""
    if isinstance(inputs, torch.Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: map_tensors(v, fn) for k, v in inputs.items()}) if type(inputs) is not dict else {
            k: map_tensors(v, fn) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(map_tensors(v, fn) for v in inputs)
    if isinstance(inputs, list):
        return [map_tensors(v, fn) for v in inputs]
    return inputs


def to_device(inputs: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Move tensors to a device; floating tensors also to `dtype` when given (token ids stay integer)."""
    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)
    return map_tensors(inputs, move)


def batch_size(inputs: ExampleInputs) -> int:
    found = tensors(inputs)
    return int(found[0].shape[0]) if found and found[0].dim() else 1


def traced_outputs(out: Any) -> list[torch.Tensor]:
    """The output tensors autograd can trace back (torch-pruning's graph starts from them); integer outputs such
    as detection labels have no grad_fn and would stop its trace."""
    return [t for t in tensors(out) if t.grad_fn is not None]


def output_signature(out: Any) -> list[tuple[int, ...]]:
    """Output shapes with data-dependent dims as -1: in a list of per-image dicts (torchvision detection:
    boxes/scores/labels/masks) the first dim counts detections, which depends on the weights, not the width."""
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, Mapping) for o in out):
        return [tuple([-1, *t.shape[1:]]) if t.dim() else () for o in out for t in tensors(o)]
    return output_shapes(out)


def signature_mismatch(expected: list[tuple[int, ...]], got: list[tuple[int, ...]]) -> str | None:
    """Why two output signatures differ (None when they match; -1 matches any size)."""
    if len(expected) != len(got):
        return f"{len(got)} output tensors, the dense model gives {len(expected)}"
    for i, (e, g) in enumerate(zip(expected, got)):
        if len(e) != len(g) or any(a != b and a != -1 and b != -1 for a, b in zip(e, g)):
            return f"output {i} has shape {list(g)}, the dense model's is {list(e)}"
    return None
