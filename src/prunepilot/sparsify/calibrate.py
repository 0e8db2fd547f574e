"""Find a decoder LM's prunable linears, collect calibration statistics, and prune block by block.

Bounded memory: every calibration pass (dense activation norms, the final Wanda/SparseGPT application) is
sequential. The inputs of block 0 are captured once ([n, T, d] per batch, on the compute device); then one
decoder block at a time runs over them, its statistics are collected and used, and its outputs replace its
inputs. Only one block's activations and statistics exist at once, and with an offloaded placement only one
block's weights are on the accelerator (device.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engines import sparsity as sp
from ..errors import PlanError, SourceError
from .device import Placement, release_memory

Progress = Callable[[int, int], None]  # (blocks done, blocks in all)


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


class _StopForward(Exception):
    pass


_CACHE_KEYS = ("past_key_values", "past_key_value", "hidden_states")


def _broadcasts(small: Any, big: Any) -> bool:
    """Whether a keyword argument captured at batch 1 serves a larger batch as it is (tensors broadcast)."""
    if isinstance(small, torch.Tensor) and isinstance(big, torch.Tensor):
        try:
            return torch.broadcast_shapes(small.shape, big.shape) == big.shape
        except RuntimeError:
            return False
    if isinstance(small, (tuple, list)) and isinstance(big, (tuple, list)) and len(small) == len(big):
        return all(_broadcasts(a, b) for a, b in zip(small, big))
    return True


def _capture(model: nn.Module, ids: torch.Tensor, batch_size: int, placement: Placement
             ) -> tuple[list[torch.Tensor], list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
    """Inputs of block 0 per batch (on the compute device), each block's keyword arguments (masks, rotary
    embeddings: they differ per block in sliding/global models such as Gemma 3), and per larger batch size the
    arguments that do not broadcast from batch 1 (BLOOM's ALiBi folds the batch into the heads: [batch*heads, 1, T]).

    Every block is replaced by a stub for this pass (identity; the last one stops the forward), so the capture
    costs the embeddings only and no block is moved. Keyword arguments are captured with batch size 1, and once
    more at each batch size the calibration uses; only those that would not broadcast are kept from the latter."""
    _, layers = decoder_layers(model)
    per_layer: list[dict[str, Any]] = [{} for _ in layers]
    at_size: dict[int, list[dict[str, Any]]] = {}
    inputs: list[torch.Tensor] = []
    phase: dict[str, Any] = {"kwargs": True, "size": 1}

    def stub_for(i: int) -> Callable[..., Any]:
        def stub(*args: Any, **kwargs: Any) -> Any:
            hs = args[0] if args else kwargs["hidden_states"]
            if phase["kwargs"]:
                kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS}
                kw["use_cache"] = False
                if phase["size"] == 1:
                    per_layer[i] = kw
                else:
                    odd = {k: v for k, v in kw.items() if not _broadcasts(per_layer[i].get(k), v)}
                    if odd:
                        at_size.setdefault(phase["size"], [{} for _ in layers])[i] = odd
            elif i == 0:
                inputs.append(hs.detach())
                raise _StopForward
            if i == len(layers) - 1:
                raise _StopForward
            return hs
        return stub

    for i, layer in enumerate(layers):
        layer.forward = stub_for(i)  # instance attribute shadows the class's forward
    dev = placement.device
    try:
        with torch.no_grad(), placement.quiet():
            sizes = sorted({b.shape[0] for b in batches(ids, batch_size)} - {1})
            for chunk, kw in ([(ids[:1], True)] + [(ids[:n], True) for n in sizes]
                              + [(b, False) for b in batches(ids, batch_size)]):
                phase["kwargs"], phase["size"] = kw, chunk.shape[0]
                try:
                    model(input_ids=chunk.to(dev), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return inputs, per_layer, at_size


def _block_out(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class Calibration:
    """Calibration activations flowing through the decoder, one block at a time (see module doc)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 4,
                 placement: Placement | None = None) -> None:
        self.placement = placement or Placement.here(model)
        _, self.layers = decoder_layers(model)
        self.inputs, self.kwargs, self._at_size = _capture(model, ids, batch_size, self.placement)
        self.b = -1

    def kw(self, b: int, x: torch.Tensor) -> dict[str, Any]:
        """Block b's keyword arguments for the batch x (those captured at its size where batch 1's do not serve)."""
        odd = self._at_size.get(x.shape[0])
        return {**self.kwargs[b], **odd[b]} if odd else self.kwargs[b]

    def blocks(self, progress: Progress | None = None) -> Iterator[tuple[int, nn.Module]]:
        """Each block in order, on the compute device while the caller works on it."""
        for b, block in enumerate(self.layers):
            with self.placement.hold(block):
                self.b = b
                yield b, block
            release_memory()  # this block's compute copy and statistics, freed: back to the OS
            if progress:
                progress(b + 1, len(self.layers))

    @torch.no_grad()
    def forward(self, block: nn.Module, *, advance: bool = False) -> None:
        """Run the current block over every calibration batch; `advance` replaces its inputs by its outputs
        (batch by batch, so the old and new activations never coexist in full)."""
        for j, x in enumerate(self.inputs):
            y = _block_out(block(x, **self.kw(self.b, x)))
            if advance:
                self.inputs[j] = y


def _hooks(mods: dict[str, nn.Linear], names: list[str], stat_of: Callable[[torch.Tensor], torch.Tensor],
           stats: dict[str, torch.Tensor]) -> tuple[list[Any], dict[int, tuple[torch.Tensor, str]]]:
    """Forward pre-hooks that add stat_of(inputs [tokens, in]) into stats[name] (on the inputs' device).

    q/k/v (and gate/up) share one input tensor: it is reduced once and aliased. The shared map holds the tensor
    itself, so its id is not reused by a later input within the same forward."""
    shared: dict[int, tuple[torch.Tensor, str]] = {}
    handles = []
    for name in names:
        def hook(m: nn.Module, args: tuple, name: str = name) -> None:
            key = id(args[0])
            seen = shared.get(key)
            if seen is not None and seen[0] is args[0] and seen[1] != name:
                if name not in stats:
                    stats[name] = stats[seen[1]]  # alias: same inputs, same statistics
                return
            shared[key] = (args[0], name)
            stat = stat_of(args[0].detach().reshape(-1, args[0].shape[-1]))
            if name in stats:
                stats[name] += stat
            else:
                stats[name] = stat
        handles.append(mods[name].register_forward_pre_hook(hook))
    return handles, shared


def _sq_sum(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).sum(0).double()  # [in]; the float64 sum keeps long calibrations exact enough


def _gram(x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return xf.T @ xf  # [in, in] float32 (as the SparseGPT reference accumulates it)


@torch.no_grad()
def activation_norms(model: nn.Module, ids: torch.Tensor, batch_size: int = 4, placement: Placement | None = None,
                     progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Dense-model input statistics: name -> sum over tokens of x_j^2 ([in] float64, on the CPU).

    Sequential: block b sees the dense outputs of blocks < b, exactly as in one full forward pass."""
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    acc: dict[str, torch.Tensor] = {}
    cal = Calibration(model, ids, batch_size, placement)
    for b, block in cal.blocks(progress):
        names = [i.name for i in infos if i.block == b]
        stats: dict[str, torch.Tensor] = {}
        handles, shared = _hooks(mods, names, _sq_sum, stats)
        try:
            for j in range(len(cal.inputs)):
                shared.clear()
                cal.inputs[j] = _block_out(block(cal.inputs[j], **cal.kw(b, cal.inputs[j])))
        finally:
            for h in handles:
                h.remove()
        for name in names:
            acc[name] = stats[name].cpu() if name in stats else torch.zeros(mods[name].in_features, dtype=torch.float64)
    return acc


def gradient_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 2) -> dict[str, float]:
    """Mean |dL/dW| per prunable linear over a few sequences (next-token loss).

    Memory: each weight's gradient is reduced to its mean |.| as soon as it is accumulated and freed at once
    (post-accumulate-grad hooks), so at most one layer's gradient exists at a time, never a full copy."""
    infos = linear_layers(model)
    mods = modules_by_name(model, infos)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    acc = {n: 0.0 for n in mods}
    handles = []
    for n, m in mods.items():
        m.weight.requires_grad_(True)
        m.weight.grad = None

        def reduce(p: torch.Tensor, n: str = n) -> None:
            acc[n] += float(p.grad.abs().float().mean())  # type: ignore[union-attr]
            p.grad = None
        handles.append(m.weight.register_post_accumulate_grad_hook(reduce))
    dev = model.get_input_embeddings().weight.device
    try:
        with torch.enable_grad():
            for b in batches(ids, batch_size):
                b = b.to(dev)
                loss = model(input_ids=b, labels=b, use_cache=False).loss
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
    steps = max(1, -(-ids.shape[0] // batch_size))
    return {n: v / steps for n, v in acc.items()}


@torch.no_grad()
def sequential_sparsify(
    model: nn.Module,
    ids: torch.Tensor,
    counts: dict[str, int],
    method: str = "wanda",
    nm: sp.NM | None = None,
    batch_size: int = 4,
    progress: Progress | None = None,
    placement: Placement | None = None,
) -> dict[str, float]:
    """Prune every linear in `counts` (name -> weights to drop; ignored for N:M) in place, block by block.

    method: magnitude | wanda | sparsegpt. Each block is pruned on the outputs of the already-pruned blocks
    before it (as Wanda/SparseGPT do). Returns name -> achieved sparsity.
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
        n_blocks = len(decoder_layers(model)[1])
        for b in range(n_blocks):
            for info in (i for i in infos if i.block == b and i.name in counts):
                w = mods[info.name].weight
                w.mul_(sp.magnitude_mask(w, counts[info.name] / w.numel(), nm))
                achieved[info.name] = sp.sparsity_of(w)
            if progress:
                progress(b + 1, n_blocks)
        return achieved

    cal = Calibration(model, ids, batch_size, placement)
    for b, block in cal.blocks(progress):
        names = [i.name for i in infos if i.block == b and i.name in counts]
        stats: dict[str, torch.Tensor] = {}
        handles, shared = _hooks(mods, names, _sq_sum if method == "wanda" else _gram, stats)
        try:
            for x in cal.inputs:
                shared.clear()
                block(x, **cal.kw(b, x))
        finally:
            for h in handles:
                h.remove()
        for name in names:
            w = mods[name].weight
            ratio = counts[name] / w.numel()
            if name not in stats:  # never reached by the data (e.g. an unused expert)
                w.mul_(sp.magnitude_mask(w, ratio, nm))
            elif method == "wanda":
                w.mul_(sp.wanda_mask(w, stats[name], ratio, nm))
            else:
                new, _ = sp.sparsegpt_prune(w, stats[name], ratio, nm)
                w.copy_(new)
                del new
            achieved[name] = sp.sparsity_of(w)
            stats.pop(name, None)  # aliased statistics are freed after their last user
        del stats
        cal.forward(block, advance=True)  # the pruned block feeds the next
    return achieved
