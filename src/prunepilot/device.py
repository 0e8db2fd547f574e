"""`--device` and `--dtype`: where a model runs and in what precision, resolved once with a clear error."""

from __future__ import annotations

import torch
from torch import nn

from .errors import SourceError
from .inputs import to_device

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(text: str | torch.device | None) -> torch.device:
    """auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps."""
    if isinstance(text, torch.device):
        return text
    raw = (text or "auto").strip().lower()
    if raw == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(raw)
    except (RuntimeError, ValueError):
        raise SourceError("--device is auto, cpu, cuda or cuda:N", text, "e.g. --device cuda:0") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SourceError("CUDA was asked for but this machine has no usable CUDA device", text,
                              "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SourceError("no such CUDA device", text, f"this machine has {torch.cuda.device_count()}: cuda:0..")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SourceError("MPS was asked for but is not available here", text, "use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise SourceError("--device is auto, cpu, cuda or cuda:N", text, "e.g. --device cpu")
    return dev


def resolve_dtype(text: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """auto (the model's own dtype: `default`) | float32 | bfloat16 | float16."""
    if isinstance(text, torch.dtype):
        return text
    raw = (text or "auto").strip().lower()
    if raw == "auto":
        return default
    if raw not in DTYPES:
        raise SourceError("--dtype is auto, float32, bfloat16 or float16", text, "e.g. --dtype bfloat16")
    return DTYPES[raw]


def model_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def place(model: nn.Module, example_inputs, device: torch.device, dtype: torch.dtype):
    """Move a model (in place) and its example inputs to `device`/`dtype`; integer inputs stay integer."""
    if dtype == torch.float16 and device.type == "cpu":
        raise SourceError("float16 is a GPU format: most CPU kernels do not implement it", "--dtype float16 on cpu",
                          "use --dtype bfloat16 or float32 on the CPU")
    model.to(device=device, dtype=dtype)
    return model, to_device(example_inputs, device, dtype)


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)
