"""Probes for the sparsify job: probe tokens with the dense model's next-token distributions, and the
one-off marginal cost of moving sparsity into each layer group and decoder block.

Each attempt is scored by probe perplexity and by KL divergence from the dense model on held-out calibration
text (never the evaluation text). KL ranks allocations far more reliably than perplexity on a thousand
tokens: every vocabulary entry counts, not only the observed token. The loop itself is jobs/sparsify.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import LinearInfo
from .plan import MAX_RATIO
from .profile import LayerBank, SensitivityProfile, TensorStore


@dataclass(frozen=True)
class ProbeScore:
    nll: float
    kl: float

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


class Probe:
    """Probe tokens plus the dense model's next-token log-probabilities (float16: half the memory, KL error ~1e-5).

    Memory: logits are computed a chunk of positions at a time (evaluate.language.logit_chunks), and the dense
    log-probabilities ([T-1, V] per sequence, 100 MB for SmolLM2 at 4 x 256) live in a scratch file, read back
    a chunk at a time (sparsify.profile.TensorStore). Pickled (a Ray worker), they travel as tensors."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> None:
        from ..evaluate.language import logit_chunks

        self.ids, self.batch_size = ids, batch_size
        self.store = TensorStore()
        with torch.no_grad():
            for s, b in enumerate(self._batches()):
                parts = [F.log_softmax(lg, -1).half().cpu() for lg in logit_chunks(model, b)]  # [b, c, V]
                for j in range(b.shape[0]):
                    row = torch.cat([p[j] for p in parts])[: b.shape[1] - 1]  # the last position has no target
                    self.store.put(f"logp:{s * self.batch_size + j}", row)
                del parts
        self.dense = self.measure(model)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "store"}
        state["logp"] = [self.store.get(f"logp:{i}") for i in range(self.n_seqs)]
        return state

    def __setstate__(self, state: dict) -> None:
        logp = state.pop("logp")
        self.__dict__.update(state)
        self.store = TensorStore()
        for i, t in enumerate(logp):
            self.store.put(f"logp:{i}", t)

    @property
    def dense_logp(self) -> list[torch.Tensor]:
        """Every probe sequence's dense log-probabilities [T-1, V], read back whole (tests)."""
        return [self.store.get(f"logp:{i}") for i in range(self.n_seqs)]

    def _batches(self) -> list[torch.Tensor]:
        return [self.ids[i : i + self.batch_size] for i in range(0, self.ids.shape[0], self.batch_size)]

    @property
    def n_seqs(self) -> int:
        return int(self.ids.shape[0])

    @torch.no_grad()
    def measure(self, model: nn.Module, n_seqs: int | None = None) -> ProbeScore:
        """Scores on the first `n_seqs` probe sequences (all by default): the low-fidelity screens of a search
        are the same text as its full scores, only less of it."""
        from ..evaluate.language import logit_chunks

        left = self.n_seqs if n_seqs is None else max(1, min(n_seqs, self.n_seqs))
        nll = kl = 0.0
        count = 0
        for s, b in enumerate(self._batches()):
            if left <= 0:
                break
            b = b[:left]
            left -= b.shape[0]
            first, T = s * self.batch_size, b.shape[1] - 1
            pos = 0
            for lg in logit_chunks(model, b):  # [b, c, V]
                c = min(lg.shape[1], T - pos)
                if c <= 0:
                    break
                q = F.log_softmax(lg[:, :c], -1)
                tgt = b[:, pos + 1 : pos + 1 + c].to(q.device)
                nll += float(F.nll_loss(q.reshape(-1, q.shape[-1]), tgt.reshape(-1), reduction="sum"))
                pf = torch.stack([self.store.get_rows(f"logp:{first + j}", pos, pos + c)
                                  for j in range(b.shape[0])]).to(q.device).float()
                kl += float(F.kl_div(q, pf, reduction="sum", log_target=True))  # sum exp(p) (p - q)
                pos += c
            count += b[:, 1:].numel()
        return ProbeScore(nll / max(count, 1), max(kl, 0.0) / max(count, 1))


def groups_pushed(profile: SensitivityProfile, before: dict[str, float], after: dict[str, float], k: int = 3) -> list[str]:
    """Groups that took most of a step's new pruned weights."""
    moved: dict[str, float] = {}
    for l in profile.layers:
        moved[l.group] = moved.get(l.group, 0.0) + (after[l.name] - before.get(l.name, 0.0)) * l.params
    return [g for g, v in sorted(moved.items(), key=lambda kv: -kv[1])[:k] if v > 0]


def probe_costs(
    model: nn.Module,
    bank: LayerBank,
    infos: list[LinearInfo],
    profile: SensitivityProfile,
    probe: Probe,
    target: float,
    delta: float = 0.1,
    blocks: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """Measure marginal costs at the uniform target: probe-KL rise per 1% of global sparsity moved into one
    group (and, with `blocks`, one decoder block), raised from target to target+delta with every other
    layer at the target. Fills profile.group_probe / block_probe / probe_base_kl / probe_delta. `progress`:
    called as (probes done, probes in all) after each probe (the base one included)."""
    total = sum(i.params for i in infos)
    n_blocks = len({i.block for i in infos}) if blocks else 0
    done, todo = 0, 1 + len(profile.groups) + n_blocks

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, todo)

    uniform = {i.name: int(round(target * i.params)) for i in infos}
    bank.apply(uniform)
    base = probe.measure(model).kl
    tick()
    hi = min(target + delta, MAX_RATIO)

    def cost(members: set[str]) -> float:
        trial = {i.name: (int(round(hi * i.params)) if i.name in members else uniform[i.name]) for i in infos}
        bank.apply(trial)
        rise = probe.measure(model).kl - base
        moved = sum(i.params for i in infos if i.name in members) * (hi - target) / total * 100
        tick()
        return rise / moved if moved else 0.0

    profile.group_probe = {g: cost(set(names)) for g, names in profile.groups.items()}
    if blocks:
        by_block: dict[int, set[str]] = {}
        for i in infos:
            by_block.setdefault(i.block, set()).add(i.name)
        profile.block_probe = {b: cost(names) for b, names in sorted(by_block.items())}
    bank.restore()
    profile.probe_base_kl, profile.probe_delta = base, hi - target
