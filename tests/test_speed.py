"""Latency timers (evaluate/speed.py): models interleaved with the order reversed every round, medians."""

from __future__ import annotations

import torch

from prunepilot.evaluate.speed import compare_latency, measure_latency


def test_compare_latency_interleaves_and_alternates_the_order():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in ("a", "b", "c")}
    stats = compare_latency(fns, warmup=0, rounds=4)
    assert calls == list("abc" "cba" "abc" "cba")  # who runs first (after whom) alternates
    assert all(s.runs == 4 and s.median_ms >= 0 for s in stats.values())


def test_measure_latency_of_a_module_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    s = measure_latency(model, torch.randn(2, 8), warmup=1, runs=3, threads=1)
    assert s.runs == 3 and s.threads == 1 and 0 < s.median_ms <= s.p90_ms
