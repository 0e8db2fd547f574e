"""Structural analysis: prunable groups from torch-pruning's DependencyGraph, their families, and how every
module's input/output dimensions are composed of group channels (what the analytic cost model needs)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import PlanError

ROOT_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear)


@dataclass
class Group:
    """One prunable group: channels removed together across coupled layers."""

    name: str  # root module name
    family: str  # isomorphic family: root name with indices wildcarded ("layer*.*.conv1")
    kind: str  # conv_channels | linear_features | mlp_hidden | attention | residual_stream
    width: int  # channels of the root dimension
    ch_groups: int  # channel grouping (heads/groups): pruning removes `ch_groups` channels per unit
    num_heads: int = 0  # attention groups only
    members: list[tuple[str, str, int]] = field(default_factory=list)  # (module, "in"|"out", channels)

    @property
    def units(self) -> int:
        """Decision units: channels / ch_groups (a unit is pruned in every channel group at once)."""
        return self.width // self.ch_groups

    @property
    def head_units(self) -> int:
        return self.num_heads


@dataclass
class ModuleDims:
    """How a module's dims map onto groups: {group name: channels} per side, plus unpruned channels."""

    name: str
    kind: str  # conv | depthwise | linear | norm | attention | other
    in_groups: dict[str, int] = field(default_factory=dict)
    out_groups: dict[str, int] = field(default_factory=dict)
    in_dim: int = 0
    out_dim: int = 0


@dataclass
class Structure:
    groups: dict[str, Group]
    modules: dict[str, ModuleDims]
    ignored: dict[str, str]  # module name -> why it is not pruned
    attention: dict[str, tuple[str, str]]  # attention module -> (qkv module, proj module)
    param_groups: dict[str, dict[str, int]] = field(default_factory=dict)  # unwrapped param -> last-dim groups

    @property
    def families(self) -> dict[str, list[str]]:
        fam: dict[str, list[str]] = {}
        for g in self.groups.values():
            fam.setdefault(g.family, []).append(g.name)
        return fam


def family_of(name: str) -> str:
    """Wildcard the index segments of a module path: layer1.0.conv1 -> layer1.*.conv1 (one family per stage)."""
    return ".".join("*" if seg.isdigit() else seg for seg in name.split("."))


def _is_timm_attention(m: nn.Module) -> bool:
    return hasattr(m, "qkv") and hasattr(m, "num_heads") and isinstance(getattr(m, "qkv"), nn.Linear) and hasattr(m, "proj")


def output_layers(model: nn.Module, example_input: torch.Tensor) -> list[nn.Module]:
    """Layers whose output channels are the model's output (classifier heads): never pruned."""
    with torch.no_grad():
        out = model(example_input)
    out_dim = out.shape[-1] if isinstance(out, torch.Tensor) else None
    last = None
    for m in model.modules():
        if isinstance(m, ROOT_TYPES):
            last = m
    heads = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and out_dim is not None and m.out_features == out_dim and m is last:
            heads.append(m)
    if last is not None and not heads:
        heads.append(last)
    return heads


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor):
    import torch_pruning as tp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.DependencyGraph().build_dependency(model, example_input)


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """qkv Linear -> num_heads for timm-style attention, as torch-pruning's `num_heads` expects."""
    return {m.qkv: int(m.num_heads) for m in model.modules() if _is_timm_attention(m)}


def analyse(
    model: nn.Module,
    example_input: torch.Tensor,
    protected: list[str] | None = None,
    dg=None,
) -> tuple[Structure, object]:
    """Find every prunable group and how modules are composed of them. Returns (structure, dependency graph)."""
    name_of = {m: n for n, m in model.named_modules()}
    modules_by_name = dict(model.named_modules())
    ignored: dict[str, str] = {}
    ignored_modules: list[nn.Module] = []
    for head in output_layers(model, example_input):
        ignored[name_of[head]] = "output layer: its width is the model's output"
        ignored_modules.append(head)
    for p in protected or []:
        hits = [n for n in modules_by_name if n and (n == p or (p.startswith("re:") and re.search(p[3:], n)))]
        if not hits:
            raise PlanError("a protected layer must name a module of the model", p, "use a name from `prunepilot profile`")
        for n in hits:
            if isinstance(modules_by_name[n], ROOT_TYPES):
                ignored[n] = "protected by the plan"
                ignored_modules.append(modules_by_name[n])
    if dg is None:
        dg = build_dependency_graph(model, example_input)
    heads_of = attention_heads(model)
    attention: dict[str, tuple[str, str]] = {}
    for n, m in model.named_modules():
        if _is_timm_attention(m):
            attention[n] = (name_of[m.qkv], name_of[m.proj])
    qkv_to_attn = {v[0]: k for k, v in attention.items()}

    groups: dict[str, Group] = {}
    dims: dict[str, ModuleDims] = {}
    param_name = {id(p): n for n, p in model.named_parameters()}
    param_groups: dict[str, dict[str, int]] = {}
    for n, m in model.named_modules():
        kind = _module_kind(m)
        if kind is None:
            continue
        in_dim, out_dim = _dims(m)
        dims[n] = ModuleDims(n, kind, in_dim=in_dim, out_dim=out_dim)

    for g in dg.get_all_groups(ignored_layers=ignored_modules, root_module_types=list(ROOT_TYPES)):
        root = g[0].dep.target.module
        gname = name_of.get(root)
        if gname is None:
            continue
        width = len(g[0].idxs)
        members: list[tuple[str, str, int]] = []
        num_heads = 0
        ch_groups = 1
        for item in g:
            dep, idxs = item.dep, item.idxs
            mod = dep.target.module
            if isinstance(mod, nn.Parameter) and id(mod) in param_name:
                comp = param_groups.setdefault(param_name[id(mod)], {})
                comp[gname] = comp.get(gname, 0) + len(idxs)
                continue
            if not isinstance(mod, nn.Module) or mod not in name_of:
                continue
            side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
            mname = name_of[mod]
            members.append((mname, side, len(idxs)))
            if mname in dims:
                target = dims[mname].out_groups if side == "out" else dims[mname].in_groups
                target[gname] = target.get(gname, 0) + len(idxs)
            if side == "out" and mod in heads_of:
                num_heads = heads_of[mod]
            if isinstance(mod, nn.GroupNorm) and side == "out":
                ch_groups = max(ch_groups, mod.num_groups)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and 1 < mod.groups < mod.in_channels:
                ch_groups = max(ch_groups, mod.groups)
        if num_heads:
            kind = "attention"
            qkv_name = next(mn for mn, side, _ in members if side == "out" and modules_by_name[mn] in heads_of)
            # decisions are over head dims (one unit per position within a head, pruned in every head), or
            # whole heads when the plan asks; proj's input width is the root dimension (num_heads * head_dim)
            width = dims[attention[qkv_to_attn[qkv_name]][1]].in_dim
            ch_groups = num_heads
            gname_attn = qkv_name
            gname, old = gname_attn, gname
        else:
            kind = _group_kind(root, members, dims)
        groups[gname] = Group(gname, family_of(gname), kind, width, ch_groups, num_heads, members)
        if num_heads and old != gname:  # re-key module dims recorded under the old root name
            for d in dims.values():
                for side_map in (d.in_groups, d.out_groups):
                    if old in side_map:
                        side_map[gname] = side_map.pop(old)
    return Structure(groups, dims, ignored, attention, param_groups), dg


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return "depthwise" if m.groups > 1 and m.groups == m.in_channels else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if _is_timm_attention(m):
        return "attention"
    if type(m).__name__ == "LayerNorm2d" or (hasattr(m, "normalized_shape") and hasattr(m, "weight")):
        return "norm"
    return None


def _dims(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.in_channels, m.out_channels
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.num_features, m.num_features
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, m.num_channels
    if hasattr(m, "normalized_shape"):
        c = int(m.normalized_shape[-1])
        return c, c
    if _is_timm_attention(m):
        return m.qkv.in_features, m.proj.out_features
    return 0, 0


def _group_kind(root: nn.Module, members: list[tuple[str, str, int]], dims: dict[str, ModuleDims]) -> str:
    outs = [mn for mn, side, _ in members if side == "out" and dims.get(mn) and dims[mn].kind in ("conv", "linear", "depthwise")]
    if len(outs) > 1:
        return "residual_stream"
    if isinstance(root, nn.Linear):
        ins = [mn for mn, side, _ in members if side == "in" and dims.get(mn) and dims[mn].kind == "linear"]
        return "mlp_hidden" if ins and root.out_features > root.in_features else "linear_features"
    return "conv_channels"
