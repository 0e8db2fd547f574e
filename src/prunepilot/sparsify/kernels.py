"""2:4 sparse linears as torch semi-structured sparse kernels, timed against dense (CUDA only).

torch.sparse.to_sparse_semi_structured packs a 2:4 weight (fp16/bf16, on an Ampere+ GPU) for cuSPARSELt /
CUTLASS matmuls. On a CPU there is no such kernel: the measurement says so and is skipped."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def semi_structured_speedup(linears: list[nn.Linear], device: torch.device, tokens: int = 2048,
                            max_layers: int = 8, reps: int = 20) -> dict[str, Any]:
    """Median time of F.linear on `tokens` inputs for the largest 2:4 linears, dense vs semi-structured."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {"skipped": "semi-structured 2:4 kernels need a CUDA GPU (measured on --device cuda only)"}
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:  # pragma: no cover - old torch
        return {"skipped": "this torch has no torch.sparse.to_sparse_semi_structured"}
    picked = sorted(linears, key=lambda m: -m.weight.numel())[:max_layers]
    dense_ms = sparse_ms = 0.0
    rows = []
    for m in picked:
        w = m.weight.detach().to(device, torch.float16 if m.weight.dtype == torch.float32 else m.weight.dtype)
        x = torch.randn(tokens, w.shape[1], device=device, dtype=w.dtype)
        try:
            ws = to_sparse_semi_structured(w)
        except (RuntimeError, ValueError) as exc:  # shape/dtype/GPU not supported by the kernels
            return {"skipped": f"to_sparse_semi_structured refused: {str(exc)[:200]}"}
        d = _median_ms(lambda: F.linear(x, w), reps)
        s = _median_ms(lambda: F.linear(x, ws), reps)
        err = float((F.linear(x, w) - F.linear(x, ws)).abs().max())
        rows.append({"shape": list(w.shape), "dense_ms": round(d, 4), "sparse_ms": round(s, 4), "max_abs_diff": err})
        dense_ms, sparse_ms = dense_ms + d, sparse_ms + s
    return {"device": torch.cuda.get_device_name(device), "tokens": tokens, "layers": rows,
            "dense_ms": round(dense_ms, 4), "sparse_ms": round(sparse_ms, 4),
            "speedup": round(dense_ms / sparse_ms, 3) if sparse_ms else None}


def _median_ms(fn: Any, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]
