"""Profile: what the analyst reads. Per prunable group: kind, width, family, MACs/params attributable, measured
CPU time; per family: aggregates and sensitivity z-scores; plus end-to-end latency and size."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .costmodel import CostModel, build_cost_model
from .evaluate.speed import measure_latency
from .structure import Structure, analyse


@dataclass
class GroupProfile:
    name: str
    family: str
    kind: str
    width: int
    units: int
    heads: int
    macs: float  # MACs removed if the group were pruned away entirely (attributable)
    params: float
    latency_ms: float  # measured CPU time of the modules this group feeds/produces
    magnitude: float  # mean L2 norm of the root's output channels (a cheap saliency proxy)


@dataclass
class Profile:
    model: str
    groups: list[GroupProfile]
    ignored: dict[str, str]
    dense: dict[str, float]  # macs, params, latency_ms, size_mb
    threads: int
    sensitivity: dict[str, float] = field(default_factory=dict)  # family -> z-score (higher = more sensitive)
    # skippable residual blocks: {"block", "macs_share", "params_share", and when measured "latency_share", "score_drop"}
    blocks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def families(self) -> dict[str, list[GroupProfile]]:
        out: dict[str, list[GroupProfile]] = {}
        for g in self.groups:
            out.setdefault(g.family, []).append(g)
        return out

    def family_table(self) -> list[dict[str, Any]]:
        rows = []
        for fam, gs in self.families.items():
            rows.append({
                "family": fam,
                "kind": gs[0].kind,
                "groups": len(gs),
                "width": sorted({g.width for g in gs}),
                "macs_share": round(sum(g.macs for g in gs) / self.dense["macs"], 4),
                "params_share": round(sum(g.params for g in gs) / self.dense["params"], 4),
                "latency_share": round(sum(g.latency_ms for g in gs) / max(1e-9, self.dense.get("module_ms", 1.0)), 4),
                "sensitivity_z": round(self.sensitivity.get(fam, 0.0), 3),
            })
        return rows

    def compact(self) -> dict[str, Any]:
        """The compact JSON the analyst reads: families first, groups by name."""
        return {
            "model": self.model,
            "dense": self.dense,
            "families": self.family_table(),
            "groups": [g.name for g in self.groups],
            "ignored": self.ignored,
            **({"blocks": self.blocks} if self.blocks else {}),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "dense": self.dense,
            "threads": self.threads,
            "ignored": self.ignored,
            "families": self.family_table(),
            "groups": [asdict(g) for g in self.groups],
            "sensitivity": self.sensitivity,
            "blocks": self.blocks,
        }


def model_size_mb(model: nn.Module) -> float:
    """Serialized state_dict bytes (packed int8 weights of quantized layers included)."""
    from .evaluate.memory import state_dict_bytes

    return state_dict_bytes(model) / 2**20


@torch.inference_mode()
def module_times(model: nn.Module, example_input, runs: int = 5) -> dict[str, float]:
    """Median CPU time per leaf module (ms), from forward pre/post hooks around `record_function` scopes."""
    samples: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if not name or any(True for _ in m.children()) and not hasattr(m, "qkv"):
            continue

        def pre(mod, inp, name=name):
            starts[name] = time.perf_counter()

        def post(mod, inp, out, name=name):
            samples.setdefault(name, []).append((time.perf_counter() - starts[name]) * 1e3)

        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    from .inputs import call

    try:
        call(model, example_input)  # warm-up
        samples.clear()
        for _ in range(runs):
            with torch.profiler.record_function("prunepilot.profile"):
                call(model, example_input)
    finally:
        for h in hooks:
            h.remove()
    return {k: statistics.median(v) for k, v in samples.items()}


def build_profile(
    model: nn.Module,
    example_input,
    *,
    uri: str = "",
    structure: Structure | None = None,
    cost: CostModel | None = None,
    protected: list[str] | None = None,
    latency_runs: int = 5,
) -> tuple[Profile, Structure, CostModel]:
    from .blocks import block_rows, find_blocks

    if structure is None:
        structure, _ = analyse(model, example_input, protected)
    if cost is None:
        cost = build_cost_model(model, example_input, structure)
    if not structure.blocks:  # output and protected layers stay: a block holding one is never skipped
        avoid = [n for n, why in structure.ignored.items() if why.startswith(("output layer", "protected by the plan"))]
        structure.blocks = find_blocks(model, example_input, avoid)
    times = module_times(model, example_input, runs=latency_runs) if latency_runs else {}
    lat = measure_latency(model, example_input, warmup=2, runs=max(3, latency_runs)) if latency_runs else None
    modules = dict(model.named_modules())
    groups: list[GroupProfile] = []
    for name, g in structure.groups.items():
        zero = {name: 0.0}
        macs = cost.dense_macs - cost.macs(zero)
        params = cost.dense_params - cost.params(zero)
        t = 0.0
        for mname, side, n in g.members:
            d = structure.modules.get(mname)
            if d is None:
                continue
            dim = d.out_dim if side == "out" else d.in_dim
            t += 0.5 * times.get(mname, 0.0) * (n / dim if dim else 0.0)
        root = modules[name]
        w = root.weight.detach()
        mag = float(w.flatten(1).norm(dim=1).mean()) if w.dim() > 1 else float(w.abs().mean())
        groups.append(GroupProfile(name, g.family, g.kind, g.width, g.units, g.num_heads, macs, params, t, mag))
    dense = {
        "macs": cost.dense_macs,
        "params": cost.dense_params,
        "size_mb": model_size_mb(model),
        "module_ms": sum(times.values()),
    }
    if lat is not None:
        dense["latency_ms"] = lat.median_ms
    prof = Profile(uri, groups, structure.ignored, dense, torch.get_num_threads(), blocks=block_rows(structure, cost))
    return prof, structure, cost
