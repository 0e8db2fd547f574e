"""Find a decoder LM's prunable linears, collect calibration statistics, and prune block by block.

Memory-frugal: `sequential_sparsify` holds only one decoder block's inputs ([n, T, d]) and statistics at a
time, feeding each block the outputs of the already-pruned blocks before it (as Wanda/SparseGPT do).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engines import sparsity as sp
from ..errors import PlanError, SourceError


@dataclass(frozen=True)
class LinearInfo:
    name: str  # full module name, e.g. model.layers.3.mlp.down_proj
    block: int  # decoder block index
    kind: str  # name inside the block, e.g. mlp.down_proj
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks (the longest ModuleList whose name ends in 'layers' or 'h')."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks") and len(mod):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise SourceError("LLM sparsity needs a decoder with a list of blocks (model.layers)",
                          type(model).__name__, "use a Llama/Gemma/Qwen/Mistral-style causal LM")
    return best


def linear_layers(model: nn.Module) -> list[LinearInfo]:
    """Every nn.Linear inside the decoder blocks, in forward order (embeddings and lm_head stay dense)."""
    prefix, layers = decoder_layers(model)
    out: list[LinearInfo] = []
    for b, block in enumerate(layers):
        for kind, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                out.append(LinearInfo(f"{prefix}.{b}.{kind}", b, kind, mod.out_features, mod.in_features))
    return out


def modules_by_name(model: nn.Module, infos: list[LinearInfo]) -> dict[str, nn.Linear]:
    mods = dict(model.named_modules())
    return {i.name: mods[i.name] for i in infos}  # type: ignore[misc]


def batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i : i + batch_size]


@torch.no_grad()
def activation_norms(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Dense-model input statistics: name -> sum over tokens of x_j^2 ([in] float64), one forward pass."""
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    acc: dict[str, torch.Tensor] = {i.name: torch.zeros(i.in_features, dtype=torch.float64) for i in infos}
    hooks = []
    for name, mod in mods.items():
        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
            acc[name] += x.pow(2).sum(0)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for b in batches(ids, batch_size):
            model(input_ids=b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return acc


def gradient_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 2) -> dict[str, float]:
    """Mean |dL/dW| per prunable linear over a few sequences (next-token loss)."""
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in mods.values():
        m.weight.requires_grad_(True)
        m.weight.grad = None
    acc = {n: 0.0 for n in mods}
    try:
        with torch.enable_grad():
            for b in batches(ids, batch_size):
                loss = model(input_ids=b, labels=b, use_cache=False).loss
                loss.backward()
                for n, m in mods.items():
                    acc[n] += float(m.weight.grad.abs().mean())  # type: ignore[union-attr]
                    m.weight.grad = None
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    steps = max(1, -(-ids.shape[0] // batch_size))
    return {n: v / steps for n, v in acc.items()}


class _StopForward(Exception):
    pass


@torch.no_grad()
def _capture(model: nn.Module, ids: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Inputs of block 0 per batch, and each block's keyword arguments (masks, rotary embeddings).

    Keyword arguments are captured once with batch size 1; they broadcast over any batch size."""
    _, layers = decoder_layers(model)
    per_layer: list[dict[str, Any]] = [{} for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        def pre(m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            kw = dict(kwargs)
            kw.pop("hidden_states", None)
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            per_layer[i] = kw
        hooks.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        model(input_ids=ids[:1], use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    inputs: list[torch.Tensor] = []

    def stop(m: nn.Module, args: tuple, kwargs: dict) -> None:
        hs = args[0] if args else kwargs["hidden_states"]
        inputs.append(hs.detach())
        raise _StopForward

    h = layers[0].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for b in batches(ids, batch_size):
            try:
                model(input_ids=b, use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    return inputs, per_layer


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def sequential_sparsify(
    model: nn.Module,
    ids: torch.Tensor,
    counts: dict[str, int],
    method: str = "wanda",
    nm: sp.NM | None = None,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Prune every linear in `counts` (name -> weights to drop; ignored for N:M) in place, block by block.

    method: magnitude | wanda | sparsegpt. Returns name -> achieved sparsity.
    """
    if method not in sp.METHODS:
        raise PlanError(f"the sparsity method must be one of {', '.join(sp.METHODS)}", method,
                        "pass --method wanda, sparsegpt or magnitude")
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    unknown = set(counts) - set(mods)
    if unknown:
        raise PlanError("a sparsity plan names layers the model does not have", sorted(unknown)[:5],
                        "use names from the sensitivity profile")
    achieved: dict[str, float] = {}
    if method == "magnitude":  # needs no data
        for name, k in counts.items():
            w = mods[name].weight
            mask = sp.magnitude_mask(w, k / w.numel(), nm)
            w.mul_(mask)
            achieved[name] = sp.sparsity_of(w)
        return achieved

    _, layers = decoder_layers(model)
    inputs, kwargs = _capture(model, ids, batch_size)
    for b, block in enumerate(layers):
        names = [i.name for i in infos if i.block == b and i.name in counts]
        stats: dict[str, torch.Tensor] = {}
        # input tensor id -> (the tensor, first linear that saw it): q/k/v (and gate/up) share one input.
        # Holding the tensor keeps its id from being reused by a later input within the same forward.
        shared: dict[int, tuple[torch.Tensor, str]] = {}
        hooks = []
        for name in names:
            def hook(m: nn.Module, args: tuple, name: str = name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1])  # [tokens, in]
                key = id(args[0])
                seen = shared.get(key)
                if seen is not None and seen[0] is args[0] and seen[1] != name:
                    if name not in stats:
                        stats[name] = stats[seen[1]]  # alias: same inputs, same statistics
                    return
                shared[key] = (args[0], name)
                if method == "wanda":
                    stat = x.double().pow(2).sum(0)  # [in]
                else:
                    xf = x.float()
                    stat = (xf.T @ xf).double()  # [in, in]
                if name in stats:
                    stats[name] += stat
                else:
                    stats[name] = stat
            hooks.append(mods[name].register_forward_pre_hook(hook))
        try:
            for x in inputs:
                shared.clear()
                block(x, **kwargs[b])
        finally:
            for h in hooks:
                h.remove()
        for name in names:
            w = mods[name].weight
            ratio = counts[name] / w.numel()
            if name not in stats:  # never reached by the data (e.g. an unused expert)
                mask = sp.magnitude_mask(w, ratio, nm)
                w.mul_(mask)
            elif method == "wanda":
                w.mul_(sp.wanda_mask(w, stats[name], ratio, nm))
            else:
                new, _ = sp.sparsegpt_prune(w, stats[name], ratio, nm)
                w.copy_(new)
            achieved[name] = sp.sparsity_of(w)
        del stats
        inputs = [_block_out(block(x, **kwargs[b])) for x in inputs]  # pruned block feeds the next
        if progress:
            progress(b + 1, len(layers))
    return achieved
