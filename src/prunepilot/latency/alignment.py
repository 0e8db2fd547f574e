"""Channel alignment chosen by measurement: per family, the width multiple with the best latency per kept channel.

oneDNN keeps CPU activations in channel blocks of 8 (AVX2) or 16 (AVX-512); GPU kernels tile by 32/64. Pruning
inside a block saves nothing, so one global `round_to` is a guess. Here each family's heaviest op is timed at
widths across the pruning range, rounded to each candidate multiple, and the multiple whose widths cost the
least per kept channel wins (the smaller multiple on a near tie: finer steps fit a budget better).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..structure import Structure
from .model import LatencyModel, Op, time_call

CANDIDATES = (1, 8, 16, 32, 64)
TARGETS = (0.35, 0.5, 0.65, 0.8)  # kept fractions sampled per family
TIE = 0.03  # a larger multiple must be this much cheaper per channel to win


@dataclass(frozen=True)
class AlignmentChoice:
    family: str
    op: str
    multiple: int
    ms_per_channel: dict[int, float]

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "op": self.op, "multiple": self.multiple,
                "ms_per_channel": {str(k): round(v, 6) for k, v in self.ms_per_channel.items()}}


def _dominant_op(lm: LatencyModel, groups: list[str]) -> Op | None:
    ops = [o for o in lm.ops if o.dims is not None and o.kind != "attn" and not o.signature.get("depthwise")
           and any(g in o.dims.out_groups for g in groups)]
    return max(ops, key=lambda o: o.predict({}), default=None)


def choose_alignment(lm: LatencyModel, structure: Structure, *, candidates: tuple[int, ...] = CANDIDATES,
                     runs: int = 3) -> dict[str, AlignmentChoice]:
    """family -> the measured best multiple for its groups' widths (families whose op cannot be timed: none)."""
    if not lm.ops:
        return {}
    device, dtype = torch.device(lm.device), _dtype(lm.dtype)
    out: dict[str, AlignmentChoice] = {}
    for fam, names in structure.families.items():
        op = _dominant_op(lm, names)
        if op is None:
            continue
        mult = op.signature.get("groups", 1) if op.kind == "conv" else 1
        dense = op.dense_out
        scores: dict[int, float] = {}
        for m in candidates:
            q = max(m, mult) if m % mult == 0 else m * mult
            if q >= dense:
                continue
            widths = sorted({max(q, int(round(t * dense / q)) * q) for t in TARGETS})
            per = [time_call(op.build(op.dense_in, w, device, dtype), device, warmup=1, runs=runs) / w for w in widths]
            scores[m] = sum(per) / len(per)
        if not scores:
            continue
        best = min(scores.values())
        chosen = min(m for m, v in scores.items() if v <= best * (1 + TIE))
        out[fam] = AlignmentChoice(fam, op.name, chosen, scores)
    return out


def _dtype(text: str) -> torch.dtype:
    return getattr(torch, text, torch.float32)
