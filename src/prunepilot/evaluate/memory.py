"""Memory of a model: weight bytes (fp32 vs packed int8), peak activation memory, file size.

Sizes are measured, not estimated: the weight size is the length of the serialized state_dict (which holds
the real packed int8 params of quantized layers), and the peak activation memory is read from the CPU
allocator events that torch.profiler records during one forward pass.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MB = 1024 * 1024


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`: the real on-disk weight size, packed int8 included."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the plain (unquantized) parameters and buffers as held in memory."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:  # tied weights count once
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def file_size_bytes(path: str | os.PathLike[str]) -> int:
    """Size of a saved artefact; for an ONNX model with external data, includes the data files."""
    p = Path(path)
    total = p.stat().st_size
    if p.suffix == ".onnx":
        for extra in p.parent.glob(p.name + ".data"):
            total += extra.stat().st_size
    return total


@dataclass(frozen=True)
class ActivationMemory:
    """Peak bytes allocated during one forward pass, on top of the weights already resident."""

    peak_bytes: int
    method: str  # "profiler" (allocator events) or "hooks" (sum of live layer outputs, a lower bound)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / MB


def peak_activation_bytes(model: nn.Module, example_input: Any, *, method: str = "profiler") -> ActivationMemory:
    """Peak activation memory of `model(example_input)` under inference mode.

    `profiler`: replays the CPU allocator's malloc/free events recorded by torch.profiler in time order and
    takes the maximum running total (includes temporaries, e.g. attention scores). `hooks`: the largest
    input+output size of any leaf module, a cheap lower bound used when the profiler is unavailable.
    """
    if method == "profiler":
        try:
            return ActivationMemory(_peak_from_profiler(model, example_input), "profiler")
        except Exception:  # pragma: no cover - profiler builds without kineto
            method = "hooks"
    return ActivationMemory(_peak_from_hooks(model, example_input), "hooks")


def _peak_from_profiler(model: nn.Module, example_input: Any) -> int:
    from torch.profiler import ProfilerActivity, profile

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.inference_mode():
        model(*args)  # warm-up: lazy packing and one-time allocations do not count as activations
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(*args)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        if str(e.device_type()).endswith("CPU"):
            running += e.nbytes()
            peak = max(peak, running)
    return peak


def _peak_from_hooks(model: nn.Module, example_input: Any) -> int:
    peak = 0

    def size(x: Any) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, (tuple, list)):
            return sum(size(v) for v in x)
        return 0

    def hook(_m: nn.Module, inp: Any, out: Any) -> None:
        nonlocal peak
        peak = max(peak, size(inp) + size(out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in handles:
            h.remove()
    return peak


@dataclass(frozen=True)
class MemoryReport:
    weights_bytes: int  # serialized state_dict (packed int8 where quantized)
    fp32_param_bytes: int  # plain parameters + buffers still in float
    activation_peak_bytes: int
    activation_method: str

    @property
    def total_mb(self) -> float:
        """Weights + peak activations: what `memory_mb` budgets refer to."""
        return (self.weights_bytes + self.activation_peak_bytes) / MB

    def to_json(self) -> dict[str, Any]:
        return {
            "weights_mb": round(self.weights_bytes / MB, 3),
            "fp32_param_mb": round(self.fp32_param_bytes / MB, 3),
            "activation_peak_mb": round(self.activation_peak_bytes / MB, 3),
            "activation_method": self.activation_method,
            "memory_mb": round(self.total_mb, 3),
        }


def memory_report(model: nn.Module, example_input: Any | None = None) -> MemoryReport:
    """Weights bytes and (when an input is given) peak activation bytes of one forward pass."""
    act = peak_activation_bytes(model, example_input) if example_input is not None else ActivationMemory(0, "none")
    return MemoryReport(state_dict_bytes(model), parameter_bytes(model), act.peak_bytes, act.method)


def memory_mb(model: nn.Module, example_input: Any | None = None) -> float:
    """The `memory_mb` budget metric: serialized weights plus peak activations, in MiB."""
    return memory_report(model, example_input).total_mb
