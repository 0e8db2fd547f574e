"""Whole-block removal: residual blocks whose output can be replaced by their input (y = x + f(x) -> y = x).

Channel pruning keeps every layer and its per-op overhead; at small batch on a CPU or GPU that overhead is much
of the latency, and only removing whole layers removes it (MDP, CVPR'25, drops blocks for this reason). A block
is skippable when its forward, traced with torch.fx, returns its input plus branches (optionally through a ReLU,
which is the identity on the previous block's non-negative output), and its output has its input's shape in the
example forward. Skipping replaces it with nn.Identity after channel pruning, so the structure analysed on the
dense model stays valid; the cost and latency models drop its modules' terms.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import nn

ADDS = {operator.add, operator.iadd, torch.add}
RELUS = {torch.relu, torch.nn.functional.relu, torch.relu_}
MAX_CANDIDATES = 400  # modules traced per model (a bound on analysis time for very deep models)


def inside(module: str, blocks: Iterable[str]) -> bool:
    """Whether `module` is one of `blocks` or lies within one."""
    return any(module == b or module.startswith(b + ".") for b in blocks)


def _identity_like(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return isinstance(m, (nn.Identity, nn.Dropout)) or (isinstance(m, nn.Sequential) and len(m) == 0)
    return False


def _strip_relu(gm: torch.fx.GraphModule, node: Any) -> Any:
    if not isinstance(node, torch.fx.Node):
        return node
    if node.op == "call_function" and node.target in RELUS:
        return node.args[0]
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return node.args[0]
    if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.ReLU):
        return node.args[0]
    return node


def _residual_of(gm: torch.fx.GraphModule, node: Any, x: torch.fx.Node) -> bool:
    """node == x + branch (+ branch ...), the trunk reaching x directly or through identity-like modules."""
    if not isinstance(node, torch.fx.Node):
        return False
    while _identity_like(gm, node) and node.args and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    if node is x:
        return True
    is_add = (node.op == "call_function" and node.target in ADDS) or (node.op == "call_method" and node.target in ("add", "add_"))
    if not is_add or len(node.args) < 2:
        return False
    # torch.add(a, b, alpha=s) is a + s b: the input passes through a always, through b only unscaled
    trunks = node.args[:2] if node.kwargs.get("alpha", 1) == 1 else node.args[:1]
    return any(_residual_of(gm, a, x) for a in trunks)


@contextmanager
def _untouched(module: nn.Module) -> Iterator[None]:
    """Tracing runs the real forward with proxies: a forward that caches something on its module (LeViT's
    attention-bias cache, a remembered shape) would keep a proxy. Every submodule's attributes, and the contents
    of dict-valued ones, are put back afterwards."""
    saved = [(m, dict(m.__dict__), {k: dict(v) for k, v in m.__dict__.items() if type(v) is dict})
             for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs, dicts in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, v in dicts.items():
                m.__dict__[k].clear()
                m.__dict__[k].update(v)


def is_residual(module: nn.Module) -> bool:
    """Traced with torch.fx, the forward returns (ReLU of) its first input plus branches."""
    import inspect

    try:
        params = list(inspect.signature(module.forward).parameters.values())
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            return False
        concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
        if len(concrete) != len(params) - 1:
            return False  # more required inputs than the one the identity can pass through
        with _untouched(module):
            gm = torch.fx.symbolic_trace(module, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - untraceable forward: not known to be residual, so not skippable
        return False
    xs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outs = [n for n in gm.graph.nodes if n.op == "output"]
    if not xs or len(outs) != 1:
        return False
    return _residual_of(gm, _strip_relu(gm, outs[0].args[0]), xs[0])


def find_blocks(model: nn.Module, example_input: Any, avoid: Iterable[str] = ()) -> dict[str, list[str]]:
    """Skippable residual blocks: name -> the conv/linear modules inside it. A block holding a module of `avoid`
    (protected or output layers) is not skippable; one that runs more than once per forward (shared) neither."""
    from .inputs import call

    avoid = list(avoid)
    names = {m: n for n, m in model.named_modules()}
    cands = [(n, m) for n, m in model.named_modules()
             if n and not isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Sequential, nn.ModuleList))
             and any(isinstance(c, (nn.Conv1d, nn.Conv2d, nn.Linear)) for c in m.modules())][:MAX_CANDIDATES]
    calls: dict[str, list[bool]] = {}

    def hook(mod: nn.Module, args: tuple, out: Any) -> None:
        x = args[0] if args else None
        same = isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor) and x.shape == out.shape and x.dtype == out.dtype
        calls.setdefault(names[mod], []).append(same)

    handles = [m.register_forward_hook(hook) for _, m in cands]
    was_training = model.training
    model.eval()  # a forward in train mode would move the user's BatchNorm statistics
    try:
        with torch.no_grad():
            call(model, example_input)
    except Exception:  # noqa: BLE001 - a model the example input cannot run has no blocks to find
        return {}
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    found: dict[str, list[str]] = {}
    for n, m in cands:
        if calls.get(n) != [True] or any(inside(a, [n]) for a in avoid):
            continue
        if is_residual(m):
            found[n] = [f"{n}.{c}" for c, sub in m.named_modules() if c and isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    return found


def skip_blocks(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace each named block with nn.Identity, in place (the outermost of nested names wins)."""
    names = sorted(set(names), key=len)
    done: list[str] = []
    for n in names:
        if inside(n, done):
            continue
        parent, _, leaf = n.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        setattr(holder, leaf, nn.Identity())  # a Sequential's "3" too: nn.Module registers it under that name
        done.append(n)
    return model


def block_rows(structure: Any, cost: Any, latency: Any = None) -> list[dict[str, Any]]:
    """Per skippable block: the share of MACs, params (and measured latency) that skipping it removes."""
    rows = []
    for b in structure.blocks:
        view = cost.without([b])
        row = {"block": b, "macs_share": round(1 - view.macs({}) / cost.dense_macs, 4),
               "params_share": round(1 - view.params({}) / cost.dense_params, 4)}
        if latency is not None:
            row["latency_share"] = round(1 - latency.without([b]).predict({}) / latency.predict({}), 4)
        rows.append(row)
    return rows
