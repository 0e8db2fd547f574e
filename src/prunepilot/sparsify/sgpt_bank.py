"""A level database of SparseGPT-pruned layers (after EvoPress, arXiv 2410.14649), so that a trial allocation is
scored as SparseGPT would leave it, not as Wanda masks would.

Why: with `--method sparsegpt` the search otherwise ranks allocations by Wanda-masked probes and SparseGPT applies
the winner. SparseGPT's reconstruction repairs much of what a bad allocation costs, so the two rank allocations
differently, most at high sparsity (SmolLM2 at 70%: the Wanda-ranked search gains 29% over uniform with
SparseGPT, 49% with Wanda).

Built once from the dense model: one calibration pass, block by block over the dense activations (so any level
of one layer can sit beside any level of another), each linear's Gram matrix, and one SparseGPT sweep per linear
for all of its levels (engines.sparsity.sparsegpt_levels). A count between two levels takes the level below and
prunes the rest of the way by Wanda score |w|*||x|| among that level's survivors (no further reconstruction), so
every exact count the projector asks for is served. Levels live in a scratch file (profile.TensorStore); memory
holds one block's Gram matrices while building, one layer's weights while applying."""

from __future__ import annotations

import bisect
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..engines import sparsity as sp
from ..errors import PlanError
from .calibrate import Calibration, LinearInfo, Progress, _block_out, _gram, _hooks, modules_by_name
from .device import Placement
from .plan import MAX_RATIO
from .profile import LayerBank, TensorStore

LEVEL_STEP = 0.05


def level_grid(target: float, below: float, above: float, step: float = LEVEL_STEP) -> list[float]:
    """Sparsity levels on a `step` grid around the target covering [target - below, target + above] (within
    (0, MAX_RATIO]), the target itself included: where the loop can move each layer to."""
    lo, hi = max(target - below, step), min(target + above, MAX_RATIO)
    n_lo, n_hi = int(round((target - lo) / step)), int(round((hi - target) / step))
    levels = {round(target + k * step, 6) for k in range(-n_lo, n_hi + 1)} | {round(target, 6)}
    return sorted(l for l in levels if 0 < l <= MAX_RATIO)


def levels_for(strategist: object, target: float) -> list[float]:
    """The levels a strategist's loop can reach: a search's spread around the target (evolve's `spread`), or from
    the first ramp step up for a strategist that ramps to the target."""
    spread = getattr(strategist, "spread", 0.3)
    return level_grid(target, target if getattr(strategist, "needs_ramp", True) else spread, spread)


def _check_disk(mods: dict[str, nn.Linear], copies: int, folder: str | Path | None) -> None:
    """Refuse before any work when the scratch folder cannot hold every layer at every level."""
    need = copies * sum(m.weight.numel() * m.weight.element_size() for m in mods.values())
    where = Path(folder or tempfile.gettempdir())
    free = shutil.disk_usage(where).free
    if need > 0.95 * free:
        raise PlanError("the SparseGPT level database does not fit in the scratch folder",
                        f"{need / 2**30:.1f} GB needed ({copies} copies of the linears), {free / 2**30:.1f} GB free "
                        f"in {where}", "point TMPDIR at a larger disk, or use --search-masks wanda")


class SparseGPTBank(LayerBank):
    """SparseGPT-pruned copies of every linear at each level; `apply(counts)` sets any exact per-layer count.

    A LayerBank like WandaBank, for the sparsify job and its cost probes."""

    def __init__(self, model: nn.Module, infos: list[LinearInfo], ids: torch.Tensor, levels: Sequence[float],
                 batch_size: int = 4, placement: Placement | None = None, progress: Progress | None = None,
                 folder: str | Path | None = None) -> None:
        self.infos = infos
        self.mods = modules_by_name(model, infos)
        self.levels = sorted({float(l) for l in levels if 0 < l < 1})
        _check_disk(self.mods, len(self.levels) + 1, folder)
        self.store = TensorStore(folder)
        self.norms: dict[str, torch.Tensor] = {}  # sqrt(sum x^2) per input column: the top-up's Wanda score
        self.level_counts: dict[str, list[int]] = {}
        self.applied: dict[str, int] = {}
        try:
            self._build(model, ids, batch_size, placement, progress)
        except BaseException:
            self.store.close()
            raise

    @torch.no_grad()
    def _build(self, model: nn.Module, ids: torch.Tensor, batch_size: int, placement: Placement | None,
               progress: Progress | None) -> None:
        cal = Calibration(model, ids, batch_size, placement)
        for b, block in cal.blocks(progress):
            names = [i.name for i in self.infos if i.block == b]
            grams: dict[str, torch.Tensor] = {}
            handles, shared = _hooks(self.mods, names, _gram, grams)
            try:
                for j in range(len(cal.inputs)):
                    shared.clear()
                    cal.inputs[j] = _block_out(block(cal.inputs[j], **cal.kwargs[b]))  # dense outputs feed the next
            finally:
                for h in handles:
                    h.remove()
            for name in names:
                w = self.mods[name].weight.detach()
                self.store.put(f"dense:{name}", w)
                self.level_counts[name] = [sp.count_pruned(w.numel(), l) for l in self.levels]
                if name in grams:
                    h = grams[name]
                    self.norms[name] = torch.diagonal(h).clamp_min(0).sqrt().cpu()
                    pruned = sp.sparsegpt_levels(w, h, self.levels)
                else:  # never reached by the data: magnitude, as sequential_sparsify does
                    self.norms[name] = torch.ones(w.shape[1])
                    pruned = [w * sp.magnitude_mask(w, l) for l in self.levels]
                for l, p in zip(self.levels, pruned):
                    self.store.put(f"{l}:{name}", p)
                del pruned
                self.applied[name] = 0
            del grams

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    def weights_for(self, name: str, k: int, device: torch.device | None = None) -> torch.Tensor:
        """Layer `name` with exactly `k` weights pruned: the nearest level at or below k, topped up by Wanda score."""
        j = bisect.bisect_right(self.level_counts[name], k) - 1
        if j < 0:
            w, have = self.store.get(f"dense:{name}"), 0
        else:
            w, have = self.store.get(f"{self.levels[j]}:{name}"), self.level_counts[name][j]
        extra = k - have
        if extra > 0:
            score = w.abs().float() * self.norms[name].to(w.device).unsqueeze(0)
            score[w == 0] = float("inf")  # already pruned by the level
            drop = torch.topk(score.flatten(), min(extra, score.numel()), largest=False).indices
            w.view(-1)[drop] = 0
        return w if device is None else w.to(device)
