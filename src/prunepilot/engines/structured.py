"""Apply an allocation (kept channel units per group) with torch-pruning, then repair timm attention metadata."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..structure import ROOT_TYPES, Structure, attention_heads


@dataclass(frozen=True)
class Allocation:
    """Kept decision units per group (channel units; head-dim positions for attention groups) and, when pruning
    whole heads, kept heads per attention group."""

    kept: dict[str, int]
    heads: dict[str, int]

    def fractions(self, structure: Structure) -> dict[str, float]:
        """Kept fraction of each group's channels (removing heads removes their channels too)."""
        f = {g: k / structure.groups[g].units for g, k in self.kept.items()}
        for g, h in self.heads.items():
            f[g] = f.get(g, 1.0) * h / structure.groups[g].num_heads
        return f

    def head_fractions(self, structure: Structure) -> dict[str, float]:
        return {g: h / structure.groups[g].num_heads for g, h in self.heads.items()}

    def widths(self, structure: Structure) -> dict[str, tuple[int, int]]:
        """group -> (dense width, pruned width) in channels of the root dimension."""
        out = {}
        for name, g in structure.groups.items():
            f = self.kept.get(name, g.units) / g.units
            h = self.heads.get(name, g.num_heads) / g.num_heads if g.num_heads else 1.0
            out[name] = (g.width, int(round(g.width * f * h)))
        return out


def _importance(name: str):
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "random":
        return tp.importance.RandomImportance()
    raise ValueError(name)


def _exact_ratio(kept: int, units: int) -> float:
    # torch-pruning keeps int(units * (1 - ratio)); aim half a unit above so float error can't drop one.
    return 1.0 - (kept + 0.5) / units


def fix_timm_attention(model: nn.Module) -> None:
    """After pruning qkv, timm's forward reshapes with num_heads/head_dim/attn_dim: keep them consistent."""
    for m in model.modules():
        if hasattr(m, "qkv") and hasattr(m, "num_heads") and isinstance(m.qkv, nn.Linear):
            qkv_out = m.qkv.out_features
            heads = int(m.num_heads)
            if qkv_out % (3 * heads):
                raise RuntimeError(f"attention qkv width {qkv_out} is not divisible by 3 x {heads} heads")
            m.head_dim = qkv_out // (3 * heads)
            if hasattr(m, "attn_dim"):
                m.attn_dim = heads * m.head_dim
            if hasattr(m, "scale"):
                m.scale = m.head_dim ** -0.5


def apply_allocation(
    model: nn.Module,
    example_input: torch.Tensor,
    structure: Structure,
    allocation: Allocation,
    *,
    importance: str = "l2",
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> nn.Module:
    """Prune `model` in place so every group keeps exactly `allocation.kept[group]` units."""
    import torch_pruning as tp

    modules = dict(model.named_modules())
    ratio_dict: dict[nn.Module, float] = {}
    head_ratio: dict[nn.Module, float] = {}
    for gname, kept in allocation.kept.items():
        g = structure.groups[gname]
        if kept < g.units:
            ratio_dict[modules[gname]] = _exact_ratio(kept, g.units)
    for gname, kept_heads in allocation.heads.items():
        g = structure.groups[gname]
        removed = g.num_heads - kept_heads
        if removed > 0:
            head_ratio[modules[gname]] = (removed - 0.5) / g.num_heads  # torch-pruning removes ceil(r * heads)
            # torch-pruning only visits a scope with a positive width ratio; with head-dim pruning off this
            # ratio selects the group without removing any head dims
            ratio_dict.setdefault(modules[gname], 0.5 / g.units)
    ignored = [modules[n] for n, why in structure.ignored.items() if n in modules and isinstance(modules[n], ROOT_TYPES)]
    imp_name = importance
    if importance == "taylor" and calibration is None:
        imp_name = "l2"  # Taylor needs gradients from real data; magnitude is the honest fallback
    heads = attention_heads(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.BasePruner(
            model,
            example_input,
            importance=_importance(imp_name),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratio_dict,
            ignored_layers=ignored,
            round_to=None,
            num_heads=heads,
            prune_num_heads=bool(head_ratio),
            prune_head_dims=not head_ratio,
            head_pruning_ratio_dict=head_ratio or None,
            global_pruning=False,
        )
        if imp_name == "taylor" and calibration is not None:
            x, y = calibration
            model.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
        pruner.step()
    if heads:
        for qkv, h in pruner.num_heads.items():
            for m in model.modules():
                if getattr(m, "qkv", None) is qkv:
                    m.num_heads = h
        fix_timm_attention(model)
    model.zero_grad(set_to_none=True)
    return model


def verify_runs(model: nn.Module, example_input: torch.Tensor, expected_shape: torch.Size) -> torch.Tensor:
    """A pruned model must run and give finite outputs of the dense model's shape."""
    with torch.no_grad():
        out = model(example_input)
    if out.shape != expected_shape:
        raise RuntimeError(f"pruned model output shape {tuple(out.shape)} != dense {tuple(expected_shape)}")
    if not torch.isfinite(out).all():
        raise RuntimeError("pruned model produced non-finite outputs")
    return out
