"""Steady allocations for timing: glibc's malloc thresholds pinned before anything is timed.

glibc adapts its mmap and trim thresholds to the process's history of frees, so the same forward pass can
page-fault thousands of times per call in one phase of a run and not at all in another: MobileNetV3-L at
batch 8 on this CPU took ~18k minor faults per forward (every large activation freshly mapped and zeroed), and
paired measurements of the same two models read 15-20% apart a minute later. With the thresholds pinned, large
blocks stay in the heap and are reused: no faults after the warm-up, and a model reads the same later in the
run. This is how a server with jemalloc or tcmalloc (or a long-lived, warmed glibc process) runs; the report
says which allocator the timings were taken under. `PRUNEPILOT_MALLOC=system` keeps glibc's own behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

ENV = "PRUNEPILOT_MALLOC"
PIN_BYTES = 1 << 30  # blocks below this come from the heap; the heap top is kept below this much free
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_state: dict[str, Any] | None = None


def steady_allocator() -> dict[str, Any]:
    """Pin glibc's thresholds (once per process; later calls return the same state). Returns what the timings
    run under: {"allocator": ..., "pinned": bool, "why": ...}, recorded with every latency measurement."""
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "steady").strip().lower()
    if choice not in ("steady", "system"):
        from ..errors import PrunepilotError

        raise PrunepilotError(f"{ENV} must be 'steady' or 'system'", choice,
                              f"unset {ENV}, or set it to 'system' to time under glibc's adaptive thresholds")
    if choice == "system":
        _state = {"allocator": "system", "pinned": False, "why": f"{ENV}=system"}
        return _state
    libc = glibc()
    if libc is None:
        _state = {"allocator": "system", "pinned": False, "why": "not glibc: left as it is"}
        return _state
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, PIN_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, PIN_BYTES))
    _state = {"allocator": "glibc", "pinned": ok,
              "why": (f"mmap and trim thresholds pinned at {PIN_BYTES >> 20} MB (no page faults per forward)" if ok
                      else "mallopt refused the thresholds: glibc's adaptive behaviour")}
    return _state


_LIBC: Any = None


def glibc() -> Any:
    """The process's glibc (ctypes, mallopt and malloc_trim typed), or None where the C library is another one."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            if libc is not None and hasattr(libc, "gnu_get_libc_version"):
                libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                _LIBC = libc
        except (OSError, AttributeError):
            pass
    return _LIBC or None
