"""Structural analysis: prunable groups from torch-pruning's DependencyGraph, their families, and how every
module's input/output dimensions are composed of group channels (what the analytic cost model needs)."""

from __future__ import annotations

import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import inside
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
    tables: list[str] = field(default_factory=list)  # parameters read by index (bias tables): never pruned
    paired: dict[str, int] = field(default_factory=dict)  # root -> k: channel j couples j + w/k, ... (concat of halves)
    blocks: dict[str, list[str]] = field(default_factory=dict)  # skippable residual block -> its conv/linear modules

    def inside_blocks(self, group: str, skip: tuple[str, ...] | list[str]) -> bool:
        """Every member of `group` lies within the skipped blocks: its width no longer matters."""
        g = self.groups[group]
        return bool(skip) and all(inside(m, skip) for m, _, _ in g.members)

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
    """timm-style attention with the standard layout: qkv packs q, k and v of proj's input width (heads x head dim)."""
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    return (hasattr(m, "num_heads") and isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)
            and qkv.out_features == 3 * proj.in_features)


def _is_attention_variant(m: nn.Module) -> bool:
    """qkv/proj/num_heads attention with another layout (GCViT's global-query kv = 2 x dim, EfficientFormer's
    key dims != value dims): its reshapes use fixed head sizes, so its qkv output is kept whole."""
    return (hasattr(m, "num_heads") and isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "proj")
            and not _is_timm_attention(m))


# ---------------------------------------------------------------- constructs torch-pruning needs help with

def _is_patch_merging(m: nn.Module) -> bool:
    """Swin-style 2x2 patch merging (timm v1/v2, torchvision v1/v2): four neighbours' C channels are laid out
    as [k * C + c] (k = 0..3), normed and reduced by a Linear. torch-pruning cannot follow the reshape/permute."""
    red = getattr(m, "reduction", None)
    return ("PatchMerging" in type(m).__name__ and isinstance(red, nn.Linear) and red.in_features % 4 == 0
            and isinstance(getattr(m, "norm", None), nn.LayerNorm))


def _prune_layernorm(norm: nn.LayerNorm, keep: torch.Tensor) -> None:
    if norm.elementwise_affine:
        norm.weight = nn.Parameter(norm.weight.data[keep].clone())
        if norm.bias is not None:
            norm.bias = nn.Parameter(norm.bias.data[keep].clone())
    norm.normalized_shape = (len(keep),)


_PATCH_MERGING_PRUNER = None


def patch_merging_pruner():
    """torch-pruning customized pruner for patch merging: a layer with C input and out_dim output channels
    (built on first use so importing this module does not import torch_pruning)."""
    global _PATCH_MERGING_PRUNER
    if _PATCH_MERGING_PRUNER is not None:
        return _PATCH_MERGING_PRUNER
    from torch_pruning.pruner.function import BasePruningFunc

    class PatchMergingPruner(BasePruningFunc):
        TARGET_MODULES = None

        def prune_in_channels(self, layer: nn.Module, idxs):
            red = layer.reduction
            c = red.in_features // 4
            drop = {k * c + i for k in range(4) for i in idxs}
            keep = torch.tensor(sorted(set(range(4 * c)) - drop))
            red.weight = self._prune_parameter_and_grad(red.weight, keep, 1)
            red.in_features = len(keep)
            if layer.norm.normalized_shape[-1] == 4 * c:  # pre-norm (v1): the norm is over the 4C concat
                _prune_layernorm(layer.norm, keep)
            if hasattr(layer, "dim"):
                layer.dim = len(keep) // 4
            return layer

        def prune_out_channels(self, layer: nn.Module, idxs):
            red = layer.reduction
            keep = torch.tensor(sorted(set(range(red.out_features)) - set(idxs)))
            if layer.norm.normalized_shape[-1] == red.out_features:  # post-norm (v2)
                _prune_layernorm(layer.norm, keep)
            red.weight = self._prune_parameter_and_grad(red.weight, keep, 0)
            if red.bias is not None:
                red.bias = self._prune_parameter_and_grad(red.bias, keep, 0)
            red.out_features = len(keep)
            if hasattr(layer, "out_dim"):
                layer.out_dim = len(keep)
            return layer

        def get_out_channels(self, layer):
            return layer.reduction.out_features

        def get_in_channels(self, layer):
            return layer.reduction.in_features // 4

    _PATCH_MERGING_PRUNER = PatchMergingPruner()
    return _PATCH_MERGING_PRUNER


def _is_functional_attention(m: nn.Module) -> bool:
    """torchvision Swin's ShiftedWindowAttention(V2): it reads qkv/proj weights in a functional call, so the
    Linears never run as modules and torch-pruning would see bare parameters. Pruned as one layer instead:
    input channels (qkv's in) and output channels (proj's out); heads and head dims stay whole."""
    return ("WindowAttention" in type(m).__name__ and isinstance(getattr(m, "qkv", None), nn.Linear)
            and isinstance(getattr(m, "proj", None), nn.Linear) and type(m).__module__.startswith("torchvision"))


_ATTENTION_LAYER_PRUNER = None


def attention_layer_pruner():
    global _ATTENTION_LAYER_PRUNER
    if _ATTENTION_LAYER_PRUNER is not None:
        return _ATTENTION_LAYER_PRUNER
    from torch_pruning.pruner.function import BasePruningFunc

    class AttentionLayerPruner(BasePruningFunc):
        TARGET_MODULES = None

        def prune_in_channels(self, layer: nn.Module, idxs):
            qkv = layer.qkv
            keep = torch.tensor(sorted(set(range(qkv.in_features)) - set(idxs)))
            qkv.weight = self._prune_parameter_and_grad(qkv.weight, keep, 1)
            qkv.in_features = len(keep)
            return layer

        def prune_out_channels(self, layer: nn.Module, idxs):
            proj = layer.proj
            keep = torch.tensor(sorted(set(range(proj.out_features)) - set(idxs)))
            proj.weight = self._prune_parameter_and_grad(proj.weight, keep, 0)
            if proj.bias is not None:
                proj.bias = self._prune_parameter_and_grad(proj.bias, keep, 0)
            proj.out_features = len(keep)
            return layer

        def get_out_channels(self, layer):
            return layer.proj.out_features

        def get_in_channels(self, layer):
            return layer.qkv.in_features

    _ATTENTION_LAYER_PRUNER = AttentionLayerPruner()
    return _ATTENTION_LAYER_PRUNER


def customized_children(m: nn.Module) -> dict[str, tuple[int, int]]:
    """How a customized layer's children are composed of its own channels: child -> (in multiple, out multiple),
    where a multiple of 0 means "the layer's other side" is not involved (the cost model's compositions)."""
    if _is_patch_merging(m):
        pre = m.norm.normalized_shape[-1] == m.reduction.in_features
        return {"reduction": (4, 1), "norm": (4, 0) if pre else (0, 1)}
    if isinstance(m, nn.MultiheadAttention):  # torch-pruning prunes its embed dim on both sides of out_proj
        return {"out_proj": (1, 1)}
    if _is_functional_attention(m):
        return {"qkv": (1, 0), "proj": (0, 1)}
    return {}


def tp_options(model: nn.Module) -> dict:
    """The customized pruners torch-pruning needs for this model. Analysis and the engine build their graphs
    with the same options, so both see the same groups."""
    custom = {type(m): patch_merging_pruner() for m in model.modules() if _is_patch_merging(m)}  # keyed by type, as tp expects
    custom.update({type(m): attention_layer_pruner() for m in model.modules() if _is_functional_attention(m)})
    return {"customized_pruners": custom or None}


class _ChannelRegrouping(torch.overrides.TorchFunctionMode):
    """Records views that split a feature map's channel dim into groups ([N, C, H, W] -> [N, g, C/g, H, W]):
    the first half of a channel shuffle. torch-pruning maps channels through it as if unpermuted, so a group
    whose channels pass it would be pruned wrong (silently, when the sizes still divide)."""

    VIEWS = {"view", "reshape", "unflatten"}

    def __init__(self) -> None:
        super().__init__()
        self.grad_fns: set = set()
        self.reshapes: dict = {}  # grad_fn of every view/reshape/flatten output -> (input shape, output shape)
        self.cats: dict = {}  # grad_fn of every torch.cat output -> the inputs' sizes along the cat dim
        self.fixed_splits: dict = {}  # grad_fn of torch.split(x, sizes) (sizes fixed in the forward) -> the sizes

    CATS = {"cat", "concat", "concatenate"}
    LINEAR = (nn.functional.linear, torch._C._nn.linear)

    def watch_linears(self, model: nn.Module) -> list:
        """Linears whose weight a forward may use functionally (BEiT/EVA/timm SwinV2: F.linear(x, qkv.weight,
        cat(q_bias, k_bias, v_bias))): such a call is run as the module (plus its bias) so torch-pruning sees a
        Linear, not an element-wise op that leaks the input's channels into the heads. Returns hook handles."""
        skip = {id(c) for m in model.modules() if _is_functional_attention(m) for c in m.modules()}
        self.linears = {id(lin.weight): lin for lin in model.modules() if isinstance(lin, nn.Linear) and id(lin) not in skip}
        self.active: set = set()
        self.redirected: set = set()
        self.assembled: set = set()  # called with a bias of their own making (cat(q_bias, k_bias, v_bias))
        hooks = []
        for lin in self.linears.values():
            hooks.append(lin.register_forward_pre_hook(lambda mod, inp: self.active.add(mod)))
            hooks.append(lin.register_forward_hook(lambda mod, inp, out: self.active.discard(mod)))
        return hooks

    def _functional_linear(self, args, kwargs):
        names = ("input", "weight", "bias")
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in (kwargs or {}).items() if k in names})
        lin = getattr(self, "linears", {}).get(id(bound.get("weight")))
        if lin is None or lin in self.active or bound.get("weight") is not lin.weight:
            return None
        bias = bound.get("bias")
        if lin.bias is not None and bias is not None and bias is not lin.bias:
            return None
        self.redirected.add(lin)
        if bias is not None and lin.bias is None:
            self.assembled.add(lin)
        out = lin(bound["input"])
        return out + bias if bias is not None and lin.bias is None else out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.LINEAR:
            out = self._functional_linear(args, kwargs)
            if out is not None:
                return out
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        src = args[0] if args else None
        if name in ("split", "split_with_sizes") and isinstance(out, (list, tuple)) and out and len(args) > 1:
            sizes = args[1] if len(args) > 1 else (kwargs or {}).get("split_size_or_sections")
            first = out[0]
            if isinstance(first, torch.Tensor) and first.grad_fn is not None and isinstance(sizes, (int, list, tuple)):
                self.fixed_splits[first.grad_fn] = sizes
        if name in self.CATS and isinstance(out, torch.Tensor) and out.grad_fn is not None and isinstance(src, (list, tuple)):
            dim = (kwargs or {}).get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(dim, int):
                self.cats[out.grad_fn] = [int(t.shape[dim]) for t in src if isinstance(t, torch.Tensor)]
        if name in self.VIEWS | {"flatten"} and isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            self.reshapes[out.grad_fn] = (tuple(src.shape), tuple(out.shape))
        if name in self.VIEWS and isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            split = (src.dim() == 4 and out.dim() == 5 and out.shape[1] > 1 and out.shape[1] * out.shape[2] == src.shape[1]
                     and out.shape[3:] == src.shape[2:])
            merge = (src.dim() == 5 and out.dim() == 4 and src.shape[1] > 1 and out.shape[1] == src.shape[1] * src.shape[2]
                     and out.shape[2:] == src.shape[3:])
            if (split or merge) and out.shape[0] == src.shape[0]:
                self.grad_fns.add(out.grad_fn)
        return out


def _is_channel_flatten(src: tuple[int, ...], out: tuple[int, ...]) -> bool:
    """[N, C, *S] -> [N, C * prod(S)] or back: the one reshape torch-pruning's flatten index mapping describes."""
    def folds(a, b):
        return len(a) >= 3 and len(b) == 2 and a[0] == b[0] and b[1] == math.prod(a[1:])
    return folds(src, out) or folds(out, src)


_TRACING: list = []  # regroupings seen by the graph being built right now (before it can carry them)


@contextmanager
def regroup_tracing():
    """(forward_fn, grad_fns): a torch-pruning forward_fn that records channel regroupings, active while a
    DependencyGraph (ours or a pruner's) is built; set `graph._prunepilot_regroup = recorder` afterwards."""
    from .inputs import call

    _patch_reshape_mapping()
    _patch_concat_mapping()
    _patch_slice_mapping()
    _patch_split_mapping()
    _patch_group_lookup()
    rg = _ChannelRegrouping()
    _TRACING.append(rg)

    def forward(m, x):
        hooks = rg.watch_linears(m)
        try:
            with rg:
                return call(m, x)
        finally:
            for h in hooks:
                h.remove()

    try:
        yield forward, rg
    finally:
        _TRACING.pop()


_BUILDING: list = [None]
# While analysis builds groups: a layer reached with more than this many different channel sets in one group
# means index mappings that multiply (the group would not close); a sound group reaches each layer once.
_RUNAWAY: list = [0]
RUNAWAY_REPEATS = 32


def _patch_group_lookup() -> None:
    """torch-pruning's Group.has_pruning_op scans the whole group and compares index lists on every step of
    the group search: quadratic in the group size (73 of torchvision swin_v2_t's 117 s of analysis). Keep a
    hash index of (target, handler, indices) beside the list; same answers, constant time."""
    from torch_pruning.dependency.group import Group

    if getattr(Group.has_pruning_op, "_prunepilot", False):
        return
    add_dep, setitem = Group.add_dep, Group.__setitem__

    def index(self) -> set:
        idx = self.__dict__.get("_pp_index")
        if idx is None or self.__dict__.get("_pp_len") != len(self._group):
            idx = {(id(d.target), d.handler, tuple(i)) for d, i in self._group}
            self._pp_index = idx
            self._pp_len = len(self._group)
        return idx

    def fast_add_dep(self, dep, idxs):
        _BUILDING[0] = self  # the group being built (what a timed-out build had reached)
        if _RUNAWAY[0]:
            seen = self.__dict__.setdefault("_pp_seen", {})
            key = (id(dep.target), dep.handler)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > _RUNAWAY[0]:
                raise _GroupRunaway(seen[key])
        add_dep(self, dep, idxs)
        idx = self.__dict__.get("_pp_index")
        if idx is not None and self.__dict__.get("_pp_len") == len(self._group) - 1:
            idx.add((id(dep.target), dep.handler, tuple(idxs)))
            self._pp_len = len(self._group)

    def fast_setitem(self, k, v):
        setitem(self, k, v)
        self.__dict__.pop("_pp_index", None)

    def has_pruning_op(self, dep, idxs):
        return (id(dep.target), dep.handler, tuple(idxs)) in index(self)

    has_pruning_op._prunepilot = True  # type: ignore[attr-defined]
    Group.add_dep, Group.__setitem__, Group.has_pruning_op = fast_add_dep, fast_setitem, has_pruning_op


@contextmanager
def _index_mapping_once(dg):
    """get_pruning_group recomputes every index mapping of the graph before each group; while groups are only
    read (analysis, nothing pruned in between) the mapping cannot change: compute it once."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_index_mapping
    original(dg)
    index_mapping.update_index_mapping = lambda graph: None if graph is dg else original(graph)
    try:
        yield
    finally:
        index_mapping.update_index_mapping = original


def _patch_split_mapping() -> None:
    """torch-pruning maps channels through a split/chunk only on dim 1; tokens keep channels last ([B, N, C]),
    and a GLU MLP chunks its hidden width there (timm GluMlp / SwiGLU-packed: fc1 -> chunk(2, -1) -> a * act(b)
    -> fc2). Map such a split when its dim is last and has the input's channel count, as tp does on dim 1."""
    from torch_pruning.dependency import index_mapping, shape_infer

    if getattr(index_mapping.update_split_index_mapping, "_prunepilot", False):
        return
    original = index_mapping.update_split_index_mapping

    def safe(graph, node):
        fn = getattr(node, "grad_fn", None)
        sizes, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
        if sizes is None or not isinstance(dim, int) or not node.inputs or len(sizes) < 3:
            return original(graph, node)
        nd = len(sizes)
        if dim >= 2 ** 63:  # a negative dim saved unsigned
            dim -= 2 ** 64
        if not -nd <= dim < nd or dim % nd != nd - 1:
            return original(graph, node)
        try:
            ch = shape_infer.infer_out_channels_recursively(graph, node.inputs[0], [0])
        except Exception:  # noqa: BLE001
            ch = None
        total = int(sizes[nd - 1])
        if ch is None or total != int(ch):
            return original(graph, node)
        if hasattr(fn, "_saved_split_sizes"):
            chs = [int(c) for c in fn._saved_split_sizes]
        else:
            step = int(fn._saved_split_size)
            chs = [min(step, total - k) for k in range(0, total, step)]
        if len(chs) != len(node.outputs):
            return original(graph, node)
        offsets = [0]
        for c in chs:
            offsets.append(offsets[-1] + c)
        node.module.split_sizes, node.module.offsets = chs, offsets
        for i, out_node in enumerate(node.outputs):
            for dep in node.dependencies:
                if dep.target == out_node:
                    dep.index_mapping[0] = index_mapping._SplitIndexMapping(offset=offsets[i: i + 2], reverse=False)
                    break
            for dep in out_node.dependencies:
                if dep.target == node:
                    dep.index_mapping[0] = index_mapping._SplitIndexMapping(offset=offsets[i: i + 2], reverse=True)
                    break
        return None

    safe._prunepilot = True  # type: ignore[attr-defined]
    index_mapping.update_split_index_mapping = safe


def glu_channel_groups(model: nn.Module) -> dict[nn.Module, int]:
    """GLU MLPs whose fc1 packs value and gate (fc1.out = 2 x fc2.in, chunked in halves): prune position j of
    both halves together (two channel groups), so the product keeps its pairs."""
    out = {}
    for m in model.modules():
        fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear) and fc1.out_features == 2 * fc2.in_features:
            out[fc1] = 2
    return out


def _patch_slice_mapping() -> None:
    """torch-pruning maps channels through a slice on dim 1 of a 4-d tensor as a channel slice; in a
    channels-last map ([B, H, W, C]: Swin's `x[:, :H, :W, :]` after padding) that dim is a position, and the
    mapping cuts the group's indices to positions (groups of 7/25/28 indices that multiply without end).
    A slice whose dim does not have the input's channel count is not a channel slice: leave it unmapped."""
    from torch_pruning.dependency import index_mapping, shape_infer

    if getattr(index_mapping.update_slice_index_mapping, "_prunepilot", False):
        return
    original = index_mapping.update_slice_index_mapping

    def safe(graph, node):
        fn = getattr(node, "grad_fn", None)
        sizes, dim = getattr(fn, "_saved_self_sym_sizes", None), getattr(fn, "_saved_dim", None)
        if sizes is not None and isinstance(dim, int) and -len(sizes) <= dim < len(sizes) and node.inputs:
            try:  # the channel count from upstream, else from the consumers
                ch = shape_infer.infer_out_channels_recursively(graph, node.inputs[0], [0])
                if ch is None:
                    ch = shape_infer.infer_in_channels_recursively(graph, node, [0])
            except Exception:  # noqa: BLE001
                ch = None
            if ch is not None and int(sizes[dim]) != abs(int(ch)):
                return None  # a slice over positions/tokens: channels pass it unchanged
        return original(graph, node)

    safe._prunepilot = True  # type: ignore[attr-defined]
    index_mapping.update_slice_index_mapping = safe


def _patch_concat_mapping() -> None:
    """torch-pruning maps channels through every concat as if it joined channels; a concat of tokens
    (ViT/PiT/CaiT cls tokens joined to patch tokens on dim 1 of [B, N, C]) joins positions: when the inputs'
    real sizes along the cat dim are not their channel counts, leave the channels unmapped (shared by all)."""
    from torch_pruning.dependency import index_mapping, shape_infer

    if getattr(index_mapping.update_concat_index_mapping, "_prunepilot", False):
        return
    original = index_mapping.update_concat_index_mapping

    def safe(graph, node):
        rg = getattr(graph, "_prunepilot_regroup", None)
        if rg is None and _TRACING:
            rg = _TRACING[-1]
        sizes = rg.cats.get(getattr(node, "grad_fn", None)) if rg is not None else None
        if sizes is not None and getattr(node.module, "concat_sizes", None) is None:
            try:
                chs = [shape_infer.infer_channels_between(graph, n, node) for n in node.inputs]
            except Exception:  # noqa: BLE001 - no channel count: torch-pruning would not map it either
                chs = None
            if chs is None or None in chs or len(chs) != len(sizes) or list(chs) != list(sizes):
                return None  # not a channel concat
        return original(graph, node)

    safe._prunepilot = True  # type: ignore[attr-defined]
    index_mapping.update_concat_index_mapping = safe


def _patch_reshape_mapping() -> None:
    """torch-pruning divides by an inferred channel count that is 0 behind some reshapes (ShuffleNet's channel
    shuffle): skip the index mapping there; the regrouping guard protects the groups that pass it."""
    from torch_pruning.dependency import index_mapping

    if getattr(index_mapping.update_reshape_index_mapping, "_prunepilot", False):
        return
    original = index_mapping.update_reshape_index_mapping

    def safe(graph, node):
        rg = getattr(graph, "_prunepilot_regroup", None)
        if rg is None and _TRACING:
            rg = _TRACING[-1]
        if rg is not None:
            fn = getattr(node, "grad_fn", None)
            if fn in rg.grad_fns:
                return None  # a channel regrouping: no flatten mapping (its groups are protected)
            shapes = rg.reshapes.get(fn)
            if shapes is not None and not _is_channel_flatten(*shapes):
                return None  # windows/tokens reshapes keep channels last: a flatten mapping there is wrong (and explodes)
        try:
            return original(graph, node)
        except ZeroDivisionError:
            return None

    safe._prunepilot = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = safe


def build_dependency_graph(model: nn.Module, example_input):
    import torch_pruning as tp

    from .inputs import traced_outputs

    with regroup_tracing() as (forward, regroup), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dg = tp.DependencyGraph().build_dependency(model, example_input, forward_fn=forward, output_transform=traced_outputs,
                                                   verbose=False, **tp_options(model))
        dg._prunepilot_regroup = regroup
    dg._prunepilot_regroup_nodes = {n for n in dg.module2node.values() if getattr(n, "grad_fn", None) in regroup.grad_fns}
    dg._prunepilot_tables = lookup_tables(dg)
    detach_caches(model)  # the traced forward may have cached graph tensors (LeViT attention biases)
    return dg


def lookup_tables(dg) -> list[nn.Parameter]:
    """Unwrapped parameters read by index (relative position bias tables, attention biases): their dims are
    positions or heads, not channels, and torch-pruning's default (prune the last dim) would cut rows."""
    out = []
    for p, node in dg.module2node.items():
        if isinstance(p, nn.Parameter) and any(
                type(getattr(o, "grad_fn", None)).__name__.startswith(("IndexBackward", "EmbeddingBackward", "GatherBackward"))
                for o in node.outputs):
            out.append(p)
    return out


def detach_caches(model: nn.Module) -> None:
    """Detach tensors a forward cached on modules (outside parameters/buffers): a cached graph tensor makes
    the model impossible to deepcopy ("Only Tensors created explicitly by the user ... deepcopy")."""
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if k.startswith("_"):
                continue
            if isinstance(v, torch.Tensor) and v.grad_fn is not None:
                setattr(m, k, v.detach())
            elif isinstance(v, dict):
                for kk, t in list(v.items()):
                    if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                        v[kk] = t.detach()


def clear_caches(model: nn.Module) -> None:
    """After pruning, tensors cached from the dense parameters (dicts of tensors on modules, e.g. timm's
    attention_bias_cache) have stale shapes: drop them so the next forward recomputes them."""
    for m in model.modules():
        for k, v in list(vars(m).items()):
            if not k.startswith("_") and isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                v.clear()


def _coupling_period(dg, g, root) -> int | None:
    """How a group's root channels pull each other in: 1 (each alone); k when pruning channel j also prunes
    j + w/k, j + 2w/k, ... (a concat of a layer's output with a per-channel function of it, GhostNet's primary
    and cheap halves, or the halves of a GLU); None for any other pattern. Probed only for groups with a
    concat or split, by building the group of root channel 0 (bounded like every group)."""
    import torch_pruning as tp

    kinds = (tp.ops.OPTYPE.CONCAT, tp.ops.OPTYPE.SPLIT)
    if not any(getattr(item.dep.target, "type", None) in kinds for item in g):
        return 1
    pruner = dg.get_pruner_of_module(root)
    try:
        with _time_limit(GROUP_SECONDS):
            probe = dg.get_pruning_group(root, pruner.prune_out_channels, [0])
    except Exception:  # noqa: BLE001 - the full group was built; the probe failing says nothing new
        return 1
    width = len(g[0].idxs)
    hit = sorted({i for item in probe if item.dep.target.module is root and dg.is_out_channel_pruning_fn(item.dep.handler)
                  for i in item.idxs})
    if hit in ([], [0]):
        return 1
    k = len(hit)
    return k if width % k == 0 and hit == [j * (width // k) for j in range(k)] else None


def _fixed_split(dg, g):
    """The sizes of a channel split in the group whose sizes are constants of the forward (torch.split(x, 32, 1),
    not chunk), else None."""
    import torch_pruning as tp

    fixed = getattr(getattr(dg, "_prunepilot_regroup", None), "fixed_splits", {})
    if not fixed:
        return None
    for item in g:
        node = item.dep.target
        if getattr(node, "type", None) == tp.ops.OPTYPE.SPLIT and getattr(node, "grad_fn", None) in fixed \
                and getattr(node.module, "split_sizes", None) is not None:
            return fixed[node.grad_fn]
    return None


def _torn_attention(dg, g, heads_of: dict, proj_of: dict):
    """(proj, mapped, expected) when a group holds a whole attention qkv output but only part of its output
    projection's input (torch-pruning lost channels in the head reshape/unbind), else None."""
    qkvs = {item.dep.target.module for item in g if item.dep.target.module in heads_of
            and dg.is_out_channel_pruning_fn(item.dep.handler)}
    for qkv in qkvs:
        proj = proj_of.get(qkv)
        if proj is None:
            continue
        n = sum(len(item.idxs) for item in g if item.dep.target.module is proj
                and dg.is_in_channel_pruning_fn(item.dep.handler))
        if n and n != proj.in_features:
            return proj, n, proj.in_features
    return None


def _out_of_range(dg, g):
    """(module, side, index, width) of the first member the group would cut past its width, else None: a group
    torch-pruning coupled through an operation it cannot follow (tokens transposed into channels in an MLP
    mixer, a slice of a concat) holds indices of another dimension, and pruning it fails or cuts wrong."""
    for item in g:
        mod = item.dep.target.module
        if not isinstance(mod, nn.Module) or not item.idxs:
            continue
        pruner = dg.get_pruner_of_module(mod)
        if pruner is None:
            continue
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        try:
            width = pruner.get_out_channels(mod) if out else pruner.get_in_channels(mod)
        except Exception:  # noqa: BLE001 - no width to check against
            continue
        if isinstance(width, int) and width > 0 and max(int(i) for i in item.idxs) >= width:
            return mod, "output" if out else "input", max(int(i) for i in item.idxs), width
    return None


def _protect_group_roots(g, dg, name_of: dict, ignored: dict[str, str], why: str) -> None:
    """A group left out: every layer whose output channels it holds is listed with the reason."""
    for item in g:
        mod = item.dep.target.module
        if isinstance(mod, ROOT_TYPES) and mod in name_of and dg.is_out_channel_pruning_fn(item.dep.handler):
            ignored.setdefault(name_of[mod], why)


def _is_channel_multiplier(m) -> bool:
    """A depthwise conv that widens (out = k * in, groups = in; PiT's pooling): cutting an input channel would
    cut k output channels of another group, which torch-pruning does not do (its importance even fails)."""
    return (isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and m.groups == m.in_channels
            and m.out_channels != m.in_channels)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def output_layers(model: nn.Module, example_input, dg=None) -> list[nn.Module]:
    """Layers whose output channels reach a model output without passing another channel-mixing layer
    (classifier, detection and segmentation heads, every output of a multi-output model): never pruned."""
    import torch_pruning as tp

    if dg is None:
        dg = build_dependency_graph(model, example_input)
    customized = tp.ops.OPTYPE.CUSTOMIZED

    def mixes(node) -> bool:
        mod = node.module
        if _is_depthwise(mod):
            return False  # keeps channels
        return isinstance(mod, (*ROOT_TYPES, nn.MultiheadAttention, nn.LSTM)) or node.type == customized

    def reaches_output(node) -> bool:
        stack, seen = [node], {id(node)}
        while stack:
            n = stack.pop()
            if not n.outputs:  # a sink of the traced graph is a model output
                return True
            for o in n.outputs:
                if id(o) not in seen and not mixes(o):
                    seen.add(id(o))
                    stack.append(o)
        return False

    heads = [mod for mod, node in dg.module2node.items()
             if isinstance(mod, nn.Module) and mixes(node) and reaches_output(node)]
    if not heads:  # a model whose output no layer reaches directly (e.g. pooled features): its last layer
        heads = [m for m in model.modules() if isinstance(m, ROOT_TYPES)][-1:]
    return heads


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """qkv Linear -> num_heads for timm-style attention, as torch-pruning's `num_heads` expects."""
    return {m.qkv: int(m.num_heads) for m in model.modules() if _is_timm_attention(m)}


HF_PROJECTIONS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def hf_projections(m: nn.Module) -> tuple[int, list[nn.Linear]] | None:
    """(heads, [q, k, v]) of a Hugging Face self-attention module (BERT-style query/key/value or the newer
    q_proj/k_proj/v_proj), else None."""
    heads = getattr(m, "num_attention_heads", None)
    if not isinstance(heads, int):
        return None
    for names in HF_PROJECTIONS:
        lins = [getattr(m, k, None) for k in names]
        if all(isinstance(x, nn.Linear) for x in lins):
            return heads, lins  # type: ignore[return-value]
    return None


def hf_attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """q/k/v Linears of Hugging Face self-attention (BERT, ViT, Swin) -> their head count."""
    out: dict[nn.Module, int] = {}
    for m in model.modules():
        found = hf_projections(m)
        if found:
            out.update({lin: found[0] for lin in found[1]})
    return out


def mha_channel_groups(model: nn.Module) -> dict[nn.Module, int]:
    """nn.MultiheadAttention's embed dim must stay a multiple of its heads: prune it in head-sized chunks."""
    return {m: int(m.num_heads) for m in model.modules() if isinstance(m, nn.MultiheadAttention) and m.num_heads > 1}


def analyse(
    model: nn.Module,
    example_input,
    protected: list[str] | None = None,
    dg=None,
) -> tuple[Structure, object]:
    """Find every prunable group and how modules are composed of them. Returns (structure, dependency graph)."""
    name_of = {m: n for n, m in model.named_modules()}
    modules_by_name = dict(model.named_modules())
    ignored: dict[str, str] = {}
    ignored_modules: list[nn.Module] = []
    if dg is None:
        dg = build_dependency_graph(model, example_input)
    for head in output_layers(model, example_input, dg):
        if head in name_of:
            ignored[name_of[head]] = "output layer: its channels reach the model output"
            ignored_modules.append(head)
    for p in protected or []:
        hits = [n for n in modules_by_name if n and (n == p or (p.startswith("re:") and re.search(p[3:], n)))]
        if not hits:
            raise PlanError("a protected layer must name a module of the model", p, "use a name from `prunepilot profile`")
        for n in hits:
            if isinstance(modules_by_name[n], ROOT_TYPES):
                ignored[n] = "protected by the plan"
                ignored_modules.append(modules_by_name[n])
    for lin in getattr(getattr(dg, "_prunepilot_regroup", None), "assembled", set()):
        if lin in name_of and name_of[lin] not in ignored:  # its output group is not even built (it would not end)
            ignored[name_of[lin]] = (f"protected: {name_of[lin]} is called as F.linear with a bias assembled from parts "
                                     "(cat(q_bias, k_bias, v_bias)) that torch-pruning cannot split; its input side "
                                     "follows the residual stream")
            ignored_modules.append(lin)
    for n, m in model.named_modules():
        if _is_attention_variant(m) and m.qkv in name_of and name_of[m.qkv] not in ignored:
            ignored[name_of[m.qkv]] = (f"protected: {n} is an attention whose qkv ({m.qkv.out_features}) is not 3 x its "
                                       "output projection's input (a layout with fixed head sizes): its heads stay whole")
            ignored_modules.append(m.qkv)
    regroup = getattr(dg, "_prunepilot_regroup_nodes", set())
    table_ids = {id(p) for p in getattr(dg, "_prunepilot_tables", [])}
    heads_of = attention_heads(model)
    hf_heads = hf_attention_heads(model)
    mha_groups = mha_channel_groups(model)
    glu_groups = glu_channel_groups(model)
    attention: dict[str, tuple[str, str]] = {}
    for n, m in model.named_modules():
        if _is_timm_attention(m):
            attention[n] = (name_of[m.qkv], name_of[m.proj])
    qkv_to_attn = {v[0]: k for k, v in attention.items()}
    proj_of = {m.qkv: m.proj for m in model.modules() if _is_timm_attention(m)}

    groups: dict[str, Group] = {}
    dims: dict[str, ModuleDims] = {}
    param_name = {id(p): n for n, p in model.named_parameters()}
    param_groups: dict[str, dict[str, int]] = {}
    paired: dict[str, int] = {}
    for n, m in model.named_modules():
        kind = _module_kind(m)
        if kind is None:
            continue
        in_dim, out_dim = _dims(m)
        dims[n] = ModuleDims(n, kind, in_dim=in_dim, out_dim=out_dim)

    for g in _all_groups(dg, ignored_modules, name_of, ignored):
        root = g[0].dep.target.module
        gname = name_of.get(root)
        if gname is None:
            continue
        if any(isinstance(item.dep.target.module, nn.Module) and _is_functional_attention(item.dep.target.module) for item in g):
            _protect_group_roots(g, dg, name_of, ignored, (
                "protected: these channels feed torchvision's functional window attention, whose head size "
                "follows its input width (pruning them needs head-dim pruning inside it)"))
            continue
        if regroup and any(item.dep.target in regroup or item.dep.source in regroup for item in g):
            _protect_group_roots(g, dg, name_of, ignored, "protected: its channels pass a channel shuffle (a view regrouping "
                                 "channels) that torch-pruning cannot follow")
            continue
        assembled = getattr(getattr(dg, "_prunepilot_regroup", None), "assembled", set())
        fused = next((item.dep.target.module for item in g if item.dep.target.module in assembled
                      and dg.is_out_channel_pruning_fn(item.dep.handler)), None)
        if fused is not None:
            _protect_group_roots(g, dg, name_of, ignored, (
                f"protected: {name_of.get(fused, 'a Linear')} is called as F.linear with a bias assembled from parts "
                "(cat(q_bias, k_bias, v_bias)) that torch-pruning cannot split; its input side follows the residual stream"))
            continue
        mult = next((item.dep.target.module for item in g if _is_channel_multiplier(item.dep.target.module)), None)
        if mult is not None:
            why = (f"protected: its channels pass {name_of.get(mult, 'a grouped conv')} (a depthwise conv with a channel "
                   f"multiplier, {mult.in_channels} -> {mult.out_channels} in {mult.groups} groups), which torch-pruning "
                   "cannot cut consistently (k outputs per input channel)")
            _protect_group_roots(g, dg, name_of, ignored, why)
            continue
        fixed = _fixed_split(dg, g)
        if fixed is not None:
            _protect_group_roots(g, dg, name_of, ignored, (
                f"protected: its channels pass torch.split(x, {fixed}) on the channel dim, with sizes fixed in the "
                "forward (pruned widths would no longer split into those parts)"))
            continue
        torn = _torn_attention(dg, g, heads_of, proj_of)
        if torn is not None:
            _protect_group_roots(g, dg, name_of, ignored, (
                f"protected: torch-pruning maps {torn[1]} of {name_of.get(torn[0], 'an attention')}'s {torn[2]} head "
                "channels to its output projection (the head reshape follows another width, e.g. channel attention "
                "over C // heads): its heads stay whole"))
            continue
        beyond = _out_of_range(dg, g)
        if beyond is not None:
            mod_b, side, top, width_of = beyond
            _protect_group_roots(g, dg, name_of, ignored, (
                f"protected: torch-pruning maps its channels to {side} index {top} of {name_of.get(mod_b, 'a layer')}, "
                f"which has {width_of} (a transpose/slice/concat it cannot follow couples another dimension)"))
            continue
        period = _coupling_period(dg, g, root)
        if period is None:
            _protect_group_roots(g, dg, name_of, ignored, (
                "protected: its channels are coupled to each other across a concat/split (one channel pulls others "
                "in a pattern that is not a whole number of equal parts), which cannot be pruned in units"))
            continue
        width = len(g[0].idxs)
        members: list[tuple[str, str, int]] = []
        num_heads = 0
        ch_groups = 1
        for item in g:
            dep, idxs = item.dep, item.idxs
            mod = dep.target.module
            if isinstance(mod, nn.Parameter) and id(mod) in table_ids:
                continue
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
            for child, (in_mult, out_mult) in customized_children(mod).items():
                cd = dims.get(f"{mname}.{child}")
                mult = in_mult if side == "in" else out_mult
                if cd is None or not mult:
                    continue
                # a Linear child's input follows the layer's input side; a norm's single dim follows its side;
                # MultiheadAttention has one embed dim (its pruning handler is the same for both sides)
                both = cd.kind == "norm" or isinstance(mod, nn.MultiheadAttention)
                sides = [cd.in_groups, cd.out_groups] if both else ([cd.in_groups] if side == "in" else [cd.out_groups])
                for target in sides:
                    target[gname] = target.get(gname, 0) + mult * len(idxs)
            if side == "out" and mod in heads_of:
                num_heads = heads_of[mod]
            if side == "out" and mod in hf_heads:  # head dims are pruned alike in every head
                ch_groups = max(ch_groups, hf_heads[mod])
            if mod in mha_groups:
                ch_groups = max(ch_groups, mha_groups[mod])
            if side == "out" and mod in glu_groups:
                ch_groups = max(ch_groups, glu_groups[mod])
            if isinstance(mod, nn.GroupNorm) and side == "out":
                ch_groups = max(ch_groups, mod.num_groups)
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and 1 < mod.groups < mod.in_channels:
                ch_groups = max(ch_groups, mod.groups)
        if period > 1:  # GhostNet's primary + cheap halves, GLU halves: prune position j of every part together
            ch_groups = max(ch_groups, period)
            paired[gname] = period
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
    # Hugging Face self-attention reshapes q, k and v with one head size: when torch-pruning gives them separate
    # groups (it does not couple them through the attention matmuls), widths could diverge, so keep them whole
    owner = {mn: gname for gname, g in groups.items() for mn, side, _ in g.members if side == "out"}
    for m in model.modules():
        found = hf_projections(m)
        if found:
            names = [name_of[lin] for lin in found[1]]
            if len({owner.get(n) for n in names}) > 1:
                for n in names:
                    gname = owner.get(n)
                    if gname in groups:
                        del groups[gname]
                    ignored[n] = "protected: query/key/value share one head size and torch-pruning prunes them apart"
    # every layer is accounted for: a root torch-pruning put in no group is listed, never silently skipped
    covered = {mn for g in groups.values() for mn, side, _ in g.members if side == "out"} | set(groups)
    custom_types = tuple((tp_options(model)["customized_pruners"] or {}).keys())
    covered |= {f"{n}.{c}" for n, m in model.named_modules() if custom_types and isinstance(m, custom_types)
                for c, _ in m.named_modules() if c}
    for n, m in model.named_modules():
        if isinstance(m, ROOT_TYPES) and n not in covered and n not in ignored:
            traced = m in dg.module2node
            ignored[n] = ("not prunable: torch-pruning found no channel group it can cut for it" if traced else
                          "not traced: the example forward does not reach it through autograd (unused, or detached)")
        elif isinstance(m, nn.RNNBase) and n not in covered and n not in ignored:
            ignored[n] = (f"kept whole: recurrent layers ({type(m).__name__}) are not structurally pruned here (their "
                          "gates tie the hidden width across time steps)")
    tables = [n for n, p in model.named_parameters() if id(p) in table_ids]
    for n in tables:
        ignored[n] = "lookup table (read by index: positions/heads, not channels): kept whole"
    return Structure(groups, dims, ignored, attention, param_groups, tables,
                     {n: k for n, k in paired.items() if n in groups}), dg


GROUP_SECONDS = 10.0  # bound on building one dependency group (analysis stays bounded on any model)
TIMEOUT_BUDGET = 30.0  # after this many seconds of builds that timed out, each further build gets:
SHORT_GROUP_SECONDS = 2.0


class _GroupTimeout(Exception):
    pass


class _GroupRunaway(_GroupTimeout):
    """A group build stopped early: one layer reached with too many different channel sets."""


@contextmanager
def _time_limit(seconds: float):
    """SIGALRM-based bound (main thread on Unix; elsewhere unbounded)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise _GroupTimeout()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _all_groups(dg, ignored_modules: list[nn.Module], name_of: dict, ignored: dict[str, str]):
    """torch-pruning's get_all_groups, except that a root whose group cannot be built (an index mapping it
    cannot follow) is protected with the reason instead of ending the analysis."""
    with _index_mapping_once(dg):
        yield from _all_groups_unmapped(dg, ignored_modules, name_of, ignored)


def _all_groups_unmapped(dg, ignored_modules: list[nn.Module], name_of: dict, ignored: dict[str, str]):
    ignored_set = set(ignored_modules) | set(dg.IGNORED_LAYERS_IN_TRACING)
    visited: set = set()
    spent = 0.0  # seconds lost to group builds that timed out
    for m in list(dg.module2node.keys()):
        if m in ignored_set or not isinstance(m, ROOT_TYPES) or m in visited:
            continue
        pruner = dg.get_pruner_of_module(m)
        if pruner is None or pruner.get_out_channels(m) is None:
            continue
        # once TIMEOUT_BUDGET seconds went to builds that never ended, the rest get a short bound
        limit = GROUP_SECONDS if spent < TIMEOUT_BUDGET else SHORT_GROUP_SECONDS
        try:
            _RUNAWAY[0] = RUNAWAY_REPEATS
            with _time_limit(limit):
                group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(pruner.get_out_channels(m))))
        except _GroupRunaway as exc:
            why = (f"protected: its dependency group does not close (torch-pruning reaches one layer with {exc.args[0]} "
                   f"different channel sets: index mappings that multiply; group of {name_of.get(m, 'a layer')})")
            _protect_partial(dg, m, name_of, ignored, visited, why)
            continue
        except _GroupTimeout:
            spent += limit
            why = (f"protected: its dependency group took over {limit:.0f} s to build (index mappings that "
                   f"multiply; group of {name_of.get(m, 'a layer')})")
            _protect_partial(dg, m, name_of, ignored, visited, why)
            continue
        except Exception as exc:  # noqa: BLE001
            if m in name_of:
                ignored[name_of[m]] = f"protected: torch-pruning cannot follow its channels ({type(exc).__name__} in its group)"
            continue
        finally:
            _RUNAWAY[0] = 0
        prunable = True
        for dep, _ in group:
            if dg.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                if dep.target.module in ignored_set:
                    prunable = False
        if prunable:
            yield group


def _protect_partial(dg, m, name_of: dict, ignored: dict[str, str], visited: set, why: str) -> None:
    """A root whose group build was stopped, and the layers the unfinished group had already reached: they
    share its fate (one stopped build, not one per layer)."""
    if m in name_of:
        ignored[name_of[m]] = why
    partial = _BUILDING[0]
    for dep, _ in (partial._group if partial is not None else []):
        mod = dep.target.module
        if isinstance(mod, ROOT_TYPES) and dg.is_out_channel_pruning_fn(dep.handler):
            visited.add(mod)
            if mod in name_of:
                ignored.setdefault(name_of[mod], why)


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return "depthwise" if m.groups > 1 and m.groups == m.in_channels else "conv"
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
        return "norm"
    if _is_timm_attention(m):
        return "attention"
    if isinstance(m, nn.MultiheadAttention):
        return "mha"
    if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        return "rnn"
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
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim, m.embed_dim
    if isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)):
        return m.input_size, m.hidden_size * (2 if m.bidirectional else 1)
    return 0, 0


def _group_kind(root: nn.Module, members: list[tuple[str, str, int]], dims: dict[str, ModuleDims]) -> str:
    outs = [mn for mn, side, _ in members if side == "out" and dims.get(mn) and dims[mn].kind in ("conv", "linear", "depthwise")]
    if len(outs) > 1:
        return "residual_stream"
    if isinstance(root, nn.Linear):
        ins = [mn for mn, side, _ in members if side == "in" and dims.get(mn) and dims[mn].kind == "linear"]
        return "mlp_hidden" if ins and root.out_features > root.in_features else "linear_features"
    return "conv_channels"
