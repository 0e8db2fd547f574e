"""The sensitivity profile the analyst reads, and the Wanda mask bank that makes trial allocations cheap.

Per prunable linear: Wanda score statistics from dense calibration activations (10th percentile of the
non-zero |W|*||X||), gradient importance (mean |dL/dW|), both as z-scores across layers; the OWL outlier
ratio; the current sparsity. Measured probes (optional, filled by loop.probe_costs): how much the probe's
KL divergence from the dense model rises per 1% of global sparsity moved into one group (layer kind x
depth band) or one decoder block, every other layer at the uniform target.
"""

from __future__ import annotations

import math
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engines import sparsity as sp
from .calibrate import LinearInfo, modules_by_name

OWL_M = 5.0  # outlier threshold (x mean score), as in the OWL paper for LLaMA


def group_of(info: LinearInfo, n_blocks: int, n_bands: int) -> str:
    """Group id: layer kind @ depth band, e.g. 'mlp.down_proj@10-19'."""
    n_bands = max(1, min(n_bands, n_blocks))
    size = math.ceil(n_blocks / n_bands)
    lo = (info.block // size) * size
    hi = min(lo + size, n_blocks) - 1
    return f"{info.kind}@{lo}-{hi}"


class TensorStore:
    """Tensors written once to an unlinked scratch file and read back on demand, one at a time.

    Reads go through the page cache into a fresh tensor (no mmap), so what is stored never counts towards the
    process's resident memory: the bank's dense weights and orders cost disk, not RAM."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=folder, prefix="prunepilot-bank-")
        self._index: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self._end = 0
        self.nbytes = 0

    def put(self, key: str, t: torch.Tensor) -> None:
        raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self._end)
        self._file.write(memoryview(raw))
        self._index[key] = (self._end, t.dtype, tuple(t.shape))
        self._end += raw.nbytes
        self.nbytes += raw.nbytes

    def get(self, key: str) -> torch.Tensor:
        offset, dtype, shape = self._index[key]
        n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = torch.empty(n, dtype=torch.uint8)
        self._file.seek(offset)
        got = self._file.readinto(memoryview(buf.numpy()))
        if got != n:
            raise OSError(f"the Wanda bank's scratch file is short: {got} of {n} bytes for {key}")
        return buf.view(dtype).reshape(shape)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a stored tensor (first dimension), read without the rest."""
        offset, dtype, shape = self._index[key]
        start, stop = max(0, start), min(stop, shape[0])
        row = math.prod(shape[1:]) * torch.empty((), dtype=dtype).element_size()
        n = max(0, stop - start) * row
        buf = torch.empty(n, dtype=torch.uint8)
        self._file.seek(offset + start * row)
        got = self._file.readinto(memoryview(buf.numpy())) if n else 0
        if got != n:
            raise OSError(f"the scratch file is short: {got} of {n} bytes for {key}")
        return buf.view(dtype).reshape(max(0, stop - start), *shape[1:])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key][2]

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def close(self) -> None:
        self._file.close()


class _Stored(Mapping[str, torch.Tensor]):
    """A read-only name -> tensor view of one kind of entry in a TensorStore."""

    def __init__(self, store: TensorStore, kind: str, names: list[str]) -> None:
        self._store, self._kind, self._names = store, kind, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._store.get(f"{self._kind}:{name}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LayerBank(ABC):
    """Trial allocations for the loop: `apply(counts)` sets each named linear to its weights with exactly `count`
    weights pruned (`weights_for`), rewriting only the layers whose count changed (`applied`). What a bank stores
    lives in its scratch file (`store`)."""

    mods: dict[str, nn.Linear]
    applied: dict[str, int]
    store: TensorStore

    @abstractmethod
    def weights_for(self, name: str, k: int, device: torch.device) -> torch.Tensor:
        """Layer `name`'s weight with exactly `k` weights pruned, on `device`."""

    @torch.no_grad()
    def apply(self, counts: dict[str, int]) -> None:
        for name, k in counts.items():
            if self.applied.get(name) == k:
                continue
            w = self.mods[name].weight
            w.copy_(self.weights_for(name, k, w.device))
            self.applied[name] = k

    def restore(self) -> None:
        self.apply({name: 0 for name in self.applied})

    def close(self) -> None:
        """Free the scratch file (the model keeps whatever allocation was applied last)."""
        self.store.close()


class WandaBank(LayerBank):
    """Dense weights and per-row Wanda orders: apply any per-layer sparsity in one pass.

    Memory: the dense weights (in the model's dtype) and the orders (int16/int32) live in a scratch file
    (TensorStore), never beside the model in RAM; `dense[name]` / `order[name]` read one layer back. A layer is
    rewritten only when its count changes (`applied`)."""

    def __init__(self, model: nn.Module, infos: list[LinearInfo], norms: dict[str, torch.Tensor],
                 folder: str | Path | None = None) -> None:
        self.infos = infos
        self.mods = modules_by_name(model, infos)
        names = [i.name for i in infos]
        self.store = TensorStore(folder)
        self.dense: Mapping[str, torch.Tensor] = _Stored(self.store, "dense", names)
        self.order: Mapping[str, torch.Tensor] = _Stored(self.store, "order", names)
        self.p10: dict[str, float] = {}
        self.outliers: dict[str, int] = {}
        self.applied: dict[str, int] = {}
        # first pass (cheap): each block's mean Wanda score, the OWL outlier threshold
        block_sum: dict[int, float] = {}
        block_n: dict[int, int] = {}
        for info in infos:
            w = self.mods[info.name].weight.detach()
            col = norms[info.name].to(w.device).float().clamp_min(0).sqrt()  # [in]
            block_sum[info.block] = block_sum.get(info.block, 0.0) + float(w.abs().float().sum(0) @ col)
            block_n[info.block] = block_n.get(info.block, 0) + w.numel()
        for info in infos:
            w = self.mods[info.name].weight.detach()
            self.store.put(f"dense:{info.name}", w)
            score = sp.wanda_score(w, norms[info.name].to(w.device))  # [out, in]
            self.outliers[info.name] = int((score > OWL_M * block_sum[info.block] / block_n[info.block]).sum())
            sorted_s, order = torch.sort(score, dim=1)  # ascending per row
            del score
            self.store.put(f"order:{info.name}", order.to(torch.int16 if info.in_features < 32768 else torch.int32))
            del order
            flat = sorted_s.flatten()
            nz = flat[flat > 0]
            sample = nz[:: max(1, nz.numel() // 200_000)]
            self.p10[info.name] = float(torch.quantile(sample.float(), 0.10)) if sample.numel() else 0.0
            del sorted_s, flat, nz
            self.applied[info.name] = 0

    def weights_for(self, name: str, k: int, device: torch.device) -> torch.Tensor:
        """The dense weight minus its `k` lowest-Wanda weights (row-balanced)."""
        dense = self.dense[name].to(device)
        if k:
            dense.mul_(sp.mask_from_order(self.order[name].to(device), k))
        return dense



@dataclass
class LayerProfile:
    name: str
    block: int
    kind: str
    group: str
    params: int
    wanda_p10: float
    wanda_z: float
    grad: float
    grad_z: float
    outlier_ratio: float
    sparsity: float = 0.0


@dataclass
class SensitivityProfile:
    model: str
    target: float
    layers: list[LayerProfile]
    groups: dict[str, list[str]]
    owl_block_outliers: list[float]
    probe_delta: float = 0.0
    probe_base_kl: float | None = None  # KL(dense || uniform target) on the probe
    group_probe: dict[str, float] = field(default_factory=dict)  # group -> KL rise per 1% global sparsity
    block_probe: dict[int, float] = field(default_factory=dict)  # decoder block -> KL rise per 1%

    def group_table(self, current: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """One row per group: what an analyst reads (compact)."""
        total = sum(l.params for l in self.layers)
        by = {l.name: l for l in self.layers}
        rows = []
        for g, names in self.groups.items():
            ls = [by[n] for n in names]
            p = sum(l.params for l in ls)
            row = {
                "group": g,
                "params_share": round(p / total, 4),
                "wanda_z": round(sum(l.wanda_z * l.params for l in ls) / p, 3),
                "grad_z": round(sum(l.grad_z * l.params for l in ls) / p, 3),
                "outlier_ratio": round(sum(l.outlier_ratio * l.params for l in ls) / p, 5),
                "sparsity": round(sum((current or {}).get(l.name, l.sparsity) * l.params for l in ls) / p, 4),
            }
            if g in self.group_probe:
                row["kl_rise_per_1pct"] = round(self.group_probe[g], 5)
            rows.append(row)
        return rows

    def block_table(self) -> list[dict[str, Any]]:
        """Measured cost per decoder block (empty without probes): where depth matters most."""
        return [{"block": b, "kl_rise_per_1pct": round(c, 5)} for b, c in sorted(self.block_probe.items())]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "owl_block_outliers": self.owl_block_outliers,
                "probe_delta": self.probe_delta, "probe_base_kl": self.probe_base_kl,
                "group_probe": self.group_probe, "block_probe": {str(b): c for b, c in self.block_probe.items()},
                "groups": self.group_table(),
                "layers": [asdict(l) for l in self.layers]}


def _z(values: list[float]) -> list[float]:
    mu = sum(values) / len(values)
    sd = math.sqrt(sum((v - mu) ** 2 for v in values) / len(values))
    return [(v - mu) / (sd + 1e-8) for v in values]


def build_profile(
    name: str, target: float, infos: list[LinearInfo], bank: WandaBank, grads: dict[str, float], n_bands: int = 3
) -> SensitivityProfile:
    """Assemble the static profile (z-scores of log statistics: both are heavy-tailed across layers)."""
    n_blocks = max(i.block for i in infos) + 1
    wz = _z([math.log(bank.p10[i.name] + 1e-12) for i in infos])
    gz = _z([math.log(grads.get(i.name, 0.0) + 1e-12) for i in infos])
    layers, groups = [], {}
    for i, info in enumerate(infos):
        g = group_of(info, n_blocks, n_bands)
        groups.setdefault(g, []).append(info.name)
        layers.append(LayerProfile(info.name, info.block, info.kind, g, info.params, bank.p10[info.name], wz[i],
                                   grads.get(info.name, 0.0), gz[i], bank.outliers[info.name] / info.params))
    owl = []
    for b in range(n_blocks):
        ls = [l for l in layers if l.block == b]
        owl.append(sum(l.outlier_ratio * l.params for l in ls) / sum(l.params for l in ls))
    return SensitivityProfile(name, target, layers, groups, owl)
