"""Where an LLM's work runs: the compute device, the dtype, and whether decoder blocks are onloaded one at a time.

On CPU the model simply stays where it is. On CUDA a model that fits (weights under 70% of the free device
memory) is moved there whole ("resident"); a larger one keeps its decoder blocks on the CPU and each block is
moved to the device only while it runs ("offload": forward hooks, as llm-compressor and accelerate do), the
embeddings, final norm and head staying on the device. Calibration then holds one block and its activations on
the device at a time.
"""

from __future__ import annotations

import contextlib
import re
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SourceError

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
FIT_SHARE = 0.7  # a model is made resident on the GPU when its weights take at most this share of free memory


def resolve_device(spec: str | None) -> torch.device:
    """'auto' (CUDA when torch sees one, else CPU) | 'cpu' | 'cuda' | 'cuda:N'."""
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", s):
        if not torch.cuda.is_available():
            raise SourceError("--device cuda needs a CUDA GPU that torch can see", spec, "use --device cpu or --device auto")
        idx = int(s.split(":")[1]) if ":" in s else 0
        if idx >= torch.cuda.device_count():
            raise SourceError(f"this machine has {torch.cuda.device_count()} CUDA device(s)", spec, "use cuda:0")
        return torch.device(s)
    raise SourceError("a device is auto, cpu, cuda or cuda:N", spec, "e.g. --device cuda:0")


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    """'auto' -> None (the checkpoint's own dtype) | float32 | bfloat16 | float16 (short names accepted)."""
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    s = spec.strip().lower().removeprefix("torch.")
    if s == "auto":
        return None
    if s not in DTYPES:
        raise SourceError("a dtype is auto, float32, bfloat16 or float16", spec, "e.g. --dtype bfloat16")
    return DTYPES[s]


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued kernels, so a wall-clock timer measures the work and not its launch."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device | str | None) -> float:
    synchronize(device)
    return time.perf_counter()


def weight_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def peak_memory_mb(device: torch.device | str | None) -> dict[str, float]:
    """Peak resident memory of this process (CPU, MiB) and, on CUDA, the device's peak allocation since reset."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and torch.device(device).type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass
class Placement:
    """The compute device and, on CUDA, whether blocks are onloaded one at a time (see module doc)."""

    device: torch.device
    offload: bool = False
    blocks: list[nn.Module] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _held: set[int] = field(default_factory=set)
    _quiet: bool = False

    @classmethod
    def here(cls, model: nn.Module) -> Placement:
        """The placement a model already has (no moves): where its input embeddings live."""
        return cls(model.get_input_embeddings().weight.device)

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device, offload: bool | None = None) -> Placement:
        from .calibrate import decoder_layers

        if device.type != "cuda":
            model.to(device)
            return cls(device)
        if offload is None:
            free, _ = torch.cuda.mem_get_info(device)
            offload = weight_bytes(model) > FIT_SHARE * free
        if not offload:
            model.to(device)
            return cls(device)
        prefix, layers = decoder_layers(model)
        for name, mod in model.named_modules():  # everything outside the blocks goes to the device
            if name == prefix or name.startswith(prefix + "."):
                continue
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(device)  # .data keeps tied parameters tied
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(device)
        pl = cls(device, True, list(layers))
        for block in layers:
            pl._handles.append(block.register_forward_pre_hook(pl._onload_hook))
            pl._handles.append(block.register_forward_hook(pl._offload_hook))
        return pl

    # blocks held by the calibration loop stay on the device across the several passes it makes over them
    def _onload_hook(self, block: nn.Module, args: tuple) -> None:
        if self.offload and not self._quiet and id(block) not in self._held:
            block.to(self.device)

    def _offload_hook(self, block: nn.Module, args: tuple, out: Any) -> None:
        if self.offload and not self._quiet and id(block) not in self._held:
            block.to("cpu")

    @contextlib.contextmanager
    def hold(self, block: nn.Module) -> Iterator[nn.Module]:
        if not self.offload:
            yield block
            return
        block.to(self.device)
        self._held.add(id(block))
        try:
            yield block
        finally:
            self._held.discard(id(block))
            block.to("cpu")

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Forward passes that replace the blocks by stubs (capture) must not move them."""
        self._quiet, old = True, self._quiet
        try:
            yield
        finally:
            self._quiet = old

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def mode(self) -> str:
        return f"{self.device} ({'offload: one block at a time' if self.offload else 'resident'})"
