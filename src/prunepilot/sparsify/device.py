"""Where an LLM's work runs: the compute device, the dtype, and whether decoder blocks are onloaded one at a time.

On CPU the model simply stays where it is. On CUDA a model that fits (weights under 70% of the free device
memory) is moved there whole ("resident"); a larger one keeps its decoder blocks on the CPU and each block is
moved to the device only while it runs ("offload": forward hooks, as llm-compressor and accelerate do), the
embeddings, final norm and head staying on the device. Calibration then holds one block and its activations on
the device at a time.

On a CPU without native bf16/fp16 matmuls (no AVX512-BF16/AMX: bf16 runs ~100x slower than fp32 there) a bf16
model stays bf16 at rest and each block is upcast to float32 only while it runs ("upcast"); the embeddings and
head, a small share of the weights, are kept in float32. Weights a block's pruning changed are rounded back to
the checkpoint's dtype when it is cast back, exactly as saving them would.
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


def cpu_has_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies `dtype` natively (oneDNN's own check)."""
    if dtype == torch.float32:
        return True
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False
    return False


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
    compute_dtype: torch.dtype | None = None  # upcast: blocks run in this dtype, rest in `storage_dtype`
    storage_dtype: torch.dtype | None = None
    _handles: list[Any] = field(default_factory=list)
    _held: set[int] = field(default_factory=set)
    _quiet: bool = False
    _outside: list[tuple[torch.Tensor, torch.dtype]] = field(default_factory=list)

    @classmethod
    def here(cls, model: nn.Module) -> Placement:
        """The placement a model already has (no moves): where its input embeddings live."""
        return cls(model.get_input_embeddings().weight.device)

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device, offload: bool | None = None,
                  upcast: bool | None = None) -> Placement:
        """offload None: on CUDA when the weights exceed FIT_SHARE of free memory. upcast None: on a CPU without
        native matmuls for the model's dtype."""
        from .calibrate import decoder_layers

        dtype = next(model.parameters()).dtype
        if device.type != "cuda":
            offload = False
            if upcast is None:
                upcast = not cpu_has_fast(dtype)
        elif offload is None:
            free, _ = torch.cuda.mem_get_info(device)
            offload = weight_bytes(model) > FIT_SHARE * free
        upcast = bool(upcast) and dtype in (torch.bfloat16, torch.float16)
        if not offload and not upcast:
            model.to(device)
            return cls(device)
        prefix, layers = decoder_layers(model)
        outside = torch.float32 if upcast else None
        kept: list[tuple[torch.Tensor, torch.dtype]] = []
        for name, mod in model.named_modules():  # everything outside the blocks: on the device, in compute dtype
            if name == prefix or name.startswith(prefix + "."):
                continue
            for p in mod.parameters(recurse=False):
                kept.append((p, p.dtype))
                p.data = p.data.to(device, outside or p.dtype)  # .data keeps tied parameters tied
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(device, outside if outside and b.is_floating_point() else b.dtype)
        if not offload:
            for block in layers:
                block.to(device)
        pl = cls(device, bool(offload), list(layers), torch.float32 if upcast else None, dtype)
        pl._outside = kept
        for block in layers:
            pl._handles.append(block.register_forward_pre_hook(pl._onload_hook))
            pl._handles.append(block.register_forward_hook(pl._offload_hook))
        return pl

    @property
    def active(self) -> bool:
        return self.offload or self.compute_dtype is not None

    def _in(self, block: nn.Module) -> None:
        block.to(**({"device": self.device} if self.offload else {}),
                 **({"dtype": self.compute_dtype} if self.compute_dtype else {}))

    def _out(self, block: nn.Module) -> None:
        block.to(**({"device": "cpu"} if self.offload else {}),
                 **({"dtype": self.storage_dtype} if self.compute_dtype else {}))

    # blocks held by the calibration loop stay on the device across the several passes it makes over them
    def _onload_hook(self, block: nn.Module, args: tuple) -> None:
        if self.active and not self._quiet and id(block) not in self._held:
            self._in(block)

    def _offload_hook(self, block: nn.Module, args: tuple, out: Any) -> None:
        if self.active and not self._quiet and id(block) not in self._held:
            self._out(block)

    @contextlib.contextmanager
    def hold(self, block: nn.Module) -> Iterator[nn.Module]:
        if not self.active:
            yield block
            return
        self._in(block)
        self._held.add(id(block))
        try:
            yield block
        finally:
            self._held.discard(id(block))
            self._out(block)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Forward passes that replace the blocks by stubs (capture) must not move them."""
        self._quiet, old = True, self._quiet
        try:
            yield
        finally:
            self._quiet = old

    def detach(self) -> None:
        """Remove the hooks; an upcast model gets its embeddings and head back in the checkpoint's dtype (exact:
        they were never changed). An offloaded model stays split (blocks on the CPU, the rest on the device)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.compute_dtype is not None:
            for p, dtype in self._outside:
                p.data = p.data.to(dtype=dtype)
        self._outside = []

    @property
    def mode(self) -> str:
        how = "offload: one block at a time" if self.offload else "resident"
        if self.compute_dtype is not None:
            how += f"; blocks upcast to {str(self.compute_dtype).removeprefix('torch.')} one at a time"
        return f"{self.device} ({how})"
