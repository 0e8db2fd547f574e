"""The allocator timings run under: glibc's thresholds pinned (no page faults per forward), the opt-out, and the
fingerprint that keeps tables timed under one allocator from being read under the other."""

from __future__ import annotations

import resource

import pytest
import torch

from prunepilot.errors import PrunepilotError
from prunepilot.evaluate import allocator
from prunepilot.latency.model import device_fingerprint


def _glibc() -> bool:
    return allocator.glibc() is not None


@pytest.mark.skipif(not _glibc(), reason="glibc only")
def test_pinned_thresholds_leave_no_page_faults_after_warm_up() -> None:
    state = allocator.steady_allocator()
    assert state == {"allocator": "glibc", "pinned": True, "why": state["why"]} and "pinned" in state["why"]
    assert allocator.steady_allocator() is state  # once per process
    conv = torch.nn.Conv2d(32, 32, 3, padding=1).eval()
    x = torch.randn(4, 32, 128, 128)  # 8 MB activations: above glibc's default mmap threshold
    with torch.no_grad():
        for _ in range(3):
            conv(x).relu()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            conv(x).relu()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 64  # unpinned, each forward maps and zeroes its activations afresh: thousands of faults
    assert device_fingerprint(torch.device("cpu"), torch.float32, 1).endswith("|malloc pinned")


def test_system_allocator_on_request_and_a_wrong_value_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ENV, "system")
    state = allocator.steady_allocator()
    assert state["pinned"] is False and "PRUNEPILOT_MALLOC=system" in state["why"]
    assert "malloc pinned" not in device_fingerprint(torch.device("cpu"), torch.float32, 1)
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ENV, "jemalloc")
    with pytest.raises(PrunepilotError, match="PRUNEPILOT_MALLOC must be 'steady' or 'system'"):
        allocator.steady_allocator()
