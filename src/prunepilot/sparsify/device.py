"""Where an LLM's work runs: the compute device, the dtype, and whether decoder blocks are onloaded one at a time.

On CPU the model simply stays where it is. On CUDA a model that fits (weights under 70% of the free device
memory) is moved there whole ("resident"); a larger one keeps its decoder blocks on the CPU and each block is
moved to the device only while it runs ("offload": forward hooks, as llm-compressor and accelerate do), the
embeddings, final norm and head staying on the device. Calibration then holds one block and its activations on
the device at a time.

On a CPU without native bf16/fp16 matmuls (no AVX512-BF16/AMX: bf16 runs ~100x slower than fp32 there) a bf16
model stays bf16 at rest and each block is upcast to float32 only while it runs ("upcast"); the embedding table
stays bf16 (its lookups are upcast), lm_head is upcast a slice of rows at a time, norms are kept in float32.
Weights a block's pruning changed are rounded back to the checkpoint's dtype when it is put back, exactly as
saving them would; unchanged ones are not converted back at all (the resting tensors are kept, see Placement).
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


def release_memory() -> None:
    """Hand the allocator's free memory back to the OS (glibc malloc_trim; a no-op elsewhere). Between blocks and
    phases the CPU tensors of the last one are freed, but glibc keeps freed heap memory for reuse, and buffers of
    other sizes in the next phase fragment around it: the resident peak then grows phase by phase."""
    from ..evaluate.allocator import glibc

    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


def current_rss_mb() -> float | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory_mb(device: torch.device | str | None) -> dict[str, float]:
    """Peak resident memory of this process (CPU, MiB) and, on CUDA, the device's peak allocation since reset."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and torch.device(device).type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


@dataclass
class Placement:
    """The compute device and, on CUDA, whether blocks are onloaded one at a time (see module doc).

    Memory: a block's tensors at rest are kept as they are (for a safetensors checkpoint: pages of the file,
    mapped copy-on-write); onloading makes a compute copy (on the device and/or in float32), offloading drops it
    and puts the resting tensors back. Only tensors changed while onloaded (pruning: their version counter moved)
    are written back into the resting ones, rounded to their dtype exactly as a cast would. So the weights exist
    once, plus one block's compute copy, instead of a fresh copy per block left to the allocator."""

    device: torch.device
    offload: bool = False
    blocks: list[nn.Module] = field(default_factory=list)
    compute_dtype: torch.dtype | None = None  # upcast: blocks run in this dtype, rest in `storage_dtype`
    storage_dtype: torch.dtype | None = None
    _handles: list[Any] = field(default_factory=list)
    _held: set[int] = field(default_factory=set)
    _quiet: bool = False
    _outside: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (param, its resting data)
    _resting: dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor, int]], list[tuple[nn.Module, str, torch.Tensor]]]] = field(default_factory=dict)
    _heads: list[nn.Module] = field(default_factory=list)  # outside linears given a chunked upcast forward

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
        compute = torch.float32 if upcast else None
        pl = cls(device, bool(offload), list(layers), compute, dtype)
        for name, mod in model.named_modules():  # everything outside the blocks: on the device
            if name == prefix or name.startswith(prefix + "."):
                continue
            if compute is not None and isinstance(mod, nn.Embedding):
                # the table stays in its dtype (a lookup needs no float32 copy); its output is upcast
                for p in mod.parameters(recurse=False):
                    pl._outside.append((p, p.data))
                    p.data = p.data.to(device)
                pl._handles.append(mod.register_forward_hook(pl._upcast_output))
                continue
            if compute is not None and isinstance(mod, nn.Linear) and mod.weight.numel() >= HEAD_CHUNK_MIN:
                for p in mod.parameters(recurse=False):  # lm_head: upcast a slice of rows at a time
                    pl._outside.append((p, p.data))
                    p.data = p.data.to(device)
                mod.forward = _ChunkedUpcast(mod, compute)  # instance attribute shadows the class's forward
                pl._heads.append(mod)
                continue
            for p in mod.parameters(recurse=False):  # norms and the like: small, in the compute dtype
                pl._outside.append((p, p.data))
                p.data = p.data.to(device, compute if compute and p.is_floating_point() else p.dtype)  # .data keeps ties
            for k, b in mod._buffers.items():
                if b is not None:
                    mod._buffers[k] = b.to(device, compute if compute and b.is_floating_point() else b.dtype)
        if not offload:
            for block in layers:
                block.to(device)
        for block in layers:
            pl._handles.append(block.register_forward_pre_hook(pl._onload_hook))
            pl._handles.append(block.register_forward_hook(pl._offload_hook))
        return pl

    @property
    def active(self) -> bool:
        return self.offload or self.compute_dtype is not None

    def _target(self, t: torch.Tensor) -> dict[str, Any]:
        to: dict[str, Any] = {"device": self.device} if self.offload else {}
        if self.compute_dtype is not None and t.is_floating_point():
            to["dtype"] = self.compute_dtype
        return to

    def _in(self, block: nn.Module) -> None:
        if id(block) in self._resting:
            return
        params: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        bufs: list[tuple[nn.Module, str, torch.Tensor]] = []
        seen: set[int] = set()
        for mod in block.modules():
            for p in mod.parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                rest = p.data
                p.data = rest.to(**self._target(rest))
                params.append((p, rest, p._version))
            for k, b in mod._buffers.items():
                if b is not None:
                    bufs.append((mod, k, b))
                    mod._buffers[k] = b.to(**self._target(b))
        self._resting[id(block)] = (params, bufs)

    def _out(self, block: nn.Module) -> None:
        params, bufs = self._resting.pop(id(block), ([], []))
        for p, rest, version in params:
            if p._version != version:  # changed while onloaded (pruned): write back, rounded to the resting dtype
                rest.copy_(p.data)
            p.data = rest
        for mod, k, b in bufs:  # buffers are never written by calibration or evaluation
            mod._buffers[k] = b

    def _upcast_output(self, mod: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and out.is_floating_point() and self.compute_dtype is not None:
            return out.to(self.compute_dtype)
        return out

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
        """Remove the hooks; an upcast model gets its small outside parameters back as they were stored (exact:
        they were never changed). An offloaded model stays split (blocks on the CPU, the rest on the device)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod in self._heads:
            del mod.forward
        self._heads.clear()
        if self.compute_dtype is not None:
            for p, rest in self._outside:
                p.data = rest.to(p.device)
        self._outside = []

    @property
    def mode(self) -> str:
        how = "offload: one block at a time" if self.offload else "resident"
        if self.compute_dtype is not None:
            how += f"; blocks upcast to {str(self.compute_dtype).removeprefix('torch.')} one at a time"
        return f"{self.device} ({how})"


HEAD_CHUNK_MIN = 1 << 20  # an outside linear this large (lm_head) is upcast a slice of rows at a time
HEAD_CHUNK_BYTES = 32 << 20  # float32 bytes of one slice of the head's rows


class _ChunkedUpcast:
    """lm_head's forward on a CPU without bf16 matmuls: the weight stays in its dtype and is upcast a slice of
    output rows at a time (HEAD_CHUNK_BYTES), so no float32 copy of the whole head exists."""

    def __init__(self, mod: nn.Linear, dtype: torch.dtype) -> None:
        self.mod, self.dtype = mod, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.mod.weight, self.mod.bias
        x = x.to(self.dtype)
        rows = max(1, HEAD_CHUNK_BYTES // (w.shape[1] * torch.empty((), dtype=self.dtype).element_size()))
        out = x.new_empty(*x.shape[:-1], w.shape[0])
        for i in range(0, w.shape[0], rows):
            out[..., i : i + rows] = torch.nn.functional.linear(
                x, w[i : i + rows].to(self.dtype), None if b is None else b[i : i + rows].to(self.dtype))
        return out
