"""Latency-true pruning: measured per-op latency tables on the user's device, and what the projector reads."""

from .model import LatencyModel, build_latency_model, device_fingerprint

__all__ = ["LatencyModel", "build_latency_model", "device_fingerprint"]
