"""Latency measured honestly: fixed threads, warm-up, medians, models timed side by side, CUDA synchronized."""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .allocator import steady_allocator


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    runs: int
    threads: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def fixed_threads(threads: int | None) -> Iterator[int]:
    """Pin torch's intra-op threads for the measurement, then restore (and pin the allocator's thresholds once:
    see evaluate/allocator.py)."""
    steady_allocator()
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _runner(model: nn.Module | Callable[[], Any], example_input: Any) -> Callable[[], Any]:
    """A zero-argument forward that returns when the work is done: CUDA kernels run asynchronously, so a CUDA
    model's forward is followed by a synchronize (else the timer measures the launch)."""
    if isinstance(model, nn.Module):
        from ..device import synchronize
        from ..inputs import call

        model.eval()
        p = next(model.parameters(), None)
        if p is not None and p.device.type == "cuda":
            dev = p.device

            def forward() -> Any:
                out = call(model, example_input)
                synchronize(dev)
                return out
            return forward
        return lambda: call(model, example_input)  # a tensor, a tuple of positional inputs, or a dict of keywords
    return model  # already a zero-argument callable (e.g. an ONNX Runtime session wrapper)


def _stats(samples: list[float], threads: int) -> LatencyStats:
    samples = sorted(samples)
    p90 = samples[min(len(samples) - 1, int(round(0.9 * (len(samples) - 1))))]
    return LatencyStats(median_ms=statistics.median(samples), p90_ms=p90, runs=len(samples), threads=threads)


@torch.inference_mode()
def measure_latency(
    model: nn.Module | Callable[[], Any],
    example_input: Any = None,
    *,
    warmup: int = 3,
    runs: int = 10,
    threads: int | None = None,
) -> LatencyStats:
    """Median wall time of one forward pass in milliseconds."""
    fn = _runner(model, example_input)
    with fixed_threads(threads) as n:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _stats(samples, n)


@torch.inference_mode()
def compare_latency(
    models: dict[str, nn.Module | Callable[[], Any]],
    example_input: Any = None,
    *,
    warmup: int = 3,
    rounds: int = 10,
    threads: int | None = None,
) -> dict[str, LatencyStats]:
    """Time several models interleaved (A B C, then C B A, ...) so machine noise and cache warmth hit them alike."""
    fns = {k: _runner(m, example_input) for k, m in models.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with fixed_threads(threads) as n:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for r in range(rounds):
            for k, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
                t0 = time.perf_counter()
                fn()
                samples[k].append((time.perf_counter() - t0) * 1e3)
    return {k: _stats(v, n) for k, v in samples.items()}
