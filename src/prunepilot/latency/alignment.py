"""Channel alignment chosen by measurement: per family, the width multiple its kernels run fastest at.

oneDNN keeps CPU activations in channel blocks of 8 (AVX2) or 16 (AVX-512), and its 3x3 kernels tile wider
still; GPU kernels tile by 32/64. A width inside a block costs about as much as the block's end, so one global
`round_to` is a guess. Here every op a family's width enters is timed at one sweep of kept widths (steps of 4
over the pruning range), a straight line is fitted to latency vs width, and each candidate multiple is scored by
how far below that line its own widths sit (latency / trend, averaged over the sweep's multiples of it). Judging
every multiple against the same trend over the same widths removes the bias a per-channel ratio at different
widths has (fixed overheads make wider ops look cheaper per channel). A larger multiple must beat the smaller
choice by `TIE` to win; 8 (AVX2's block) is the choice unless the sweep says otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..costmodel import _phi
from ..structure import Structure
from .model import Op, time_call

CANDIDATES = (1, 8, 16, 32, 64)
TIE = 0.02  # another multiple's widths must sit this much further below the trend to win
BASE = 8  # the choice unless measured otherwise: AVX2's channel block, the historic round_to
STEP = 4  # sweep step: blocks of 8 and up are visible
MAX_POINTS = 64  # widths per sweep (a window around 60% kept when the range is wider)


@dataclass(frozen=True)
class AlignmentChoice:
    family: str
    op: str  # the ops timed, comma-separated (the group's producers and consumers)
    multiple: int
    vs_trend: dict[int, float]  # multiple -> mean latency / trend at its widths (1.0 = on the trend)

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "op": self.op, "multiple": self.multiple,
                "vs_trend": {str(k): round(v, 4) for k, v in self.vs_trend.items()}}


def sweep_widths(units: int, step: int = STEP, max_points: int = MAX_POINTS) -> list[int]:
    """Kept widths to time: multiples of `step` from 25% to 100% kept, or a window around 60% when that is
    more than `max_points` widths."""
    lo, hi = max(step, int(math.ceil(0.25 * units / step)) * step), (units // step) * step
    if (hi - lo) // step + 1 > max_points:
        mid = int(round(0.6 * units / step)) * step
        lo = max(lo, mid - step * (max_points // 2))
        hi = min(hi, lo + step * (max_points - 1))
    return list(range(lo, hi + 1, step))


def _kept(op: Op, frac: dict[str, float]) -> tuple[int, int] | None:
    """(cin, cout) of `op` at the kept fractions in `frac`; None where a grouped conv can't run it."""
    d = op.dims
    cin = op.dense_in if not d else max(1, int(round(_phi(d.in_groups, d.in_dim, frac) * op.dense_in)))
    cout = op.dense_out if not d else max(1, int(round(_phi(d.out_groups, d.out_dim, frac) * op.dense_out)))
    groups = op.signature.get("groups", 1) if op.kind == "conv" and not op.signature.get("depthwise") else 1
    if cin % groups or cout % groups:
        return None
    return cin, cout


def _score(widths: list[int], ms: list[float], candidates: tuple[int, ...]) -> dict[int, float]:
    """multiple -> mean of measured / fitted-line latency over the sweep's widths that are multiples of it."""
    n = len(widths)
    mw, mt = sum(widths) / n, sum(ms) / n
    var = sum((w - mw) ** 2 for w in widths)
    slope = sum((w - mw) * (t - mt) for w, t in zip(widths, ms)) / var if var else 0.0
    trend = [mt + slope * (w - mw) for w in widths]
    out: dict[int, float] = {}
    for m in candidates:
        ratios = [t / f for w, t, f in zip(widths, ms, trend) if w % m == 0 and f > 0]
        if len(ratios) >= 2:  # one point is noise, not a pattern
            out[m] = sum(ratios) / len(ratios)
    return out


def _choose(scores: dict[int, float], base: int = BASE) -> int:
    """`base` (the usual SIMD block) unless the sweep shows another multiple clearly faster: a larger one wins by
    beating the current choice by `TIE`; no alignment only when it beats `base` by `TIE`. Unaligned widths cost
    real speed in whole models even where one op alone hides it, so the default leans to alignment."""
    chosen = base if base in scores else min(scores)
    for m in sorted(scores):
        if m > chosen and scores[m] < scores[chosen] - TIE:
            chosen = m
    if 1 in scores and chosen == base and scores[1] < scores[base] - TIE:
        chosen = 1
    return chosen


def choose_alignment(ops: list[Op], structure: Structure, *, device: torch.device, dtype: torch.dtype,
                     candidates: tuple[int, ...] = CANDIDATES, runs: int = 3,
                     timed: Callable[[Op, int, int], float] | None = None) -> dict[str, AlignmentChoice]:
    """family -> the measured best multiple for its width (families with no timeable op, or too few units to
    sweep: absent, i.e. no alignment). `timed(op, cin, cout)` times one op (the latency model's cached timer)."""
    timed = timed or (lambda op, cin, cout: time_call(op.build(cin, cout, device, dtype), device, runs=runs))
    out: dict[str, AlignmentChoice] = {}
    for fam, names in structure.families.items():
        g = names[0]
        units = structure.groups[g].units
        mine = [o for o in ops if o.dims is not None and o.kind in ("conv", "linear")
                and (g in o.dims.in_groups or g in o.dims.out_groups)]
        if not mine or units < 4 * min((c for c in candidates if c > 1), default=8):
            continue
        widths, ms = [], []
        for w in sweep_widths(units):
            frac = {g: w / units}
            shapes = [_kept(o, frac) for o in mine]
            if any(s is None for s in shapes):
                continue
            widths.append(w)
            ms.append(sum(timed(o, *s) for o, s in zip(mine, shapes)))
        scores = _score(widths, ms, tuple(c for c in candidates if c <= units // 4 or c == 1)) if len(widths) >= 4 else {}
        if not scores:
            continue
        chosen = _choose(scores)
        out[fam] = AlignmentChoice(fam, ",".join(o.name for o in mine[:4]), chosen, scores)
    return out


WHOLE = (16, 32)  # one multiple for every family, tried against the per-family choice in the whole network
# the check's uniform pruning ratio: kept widths off every candidate multiple (half of a power-of-two width is a
# multiple of all of them, so at 0.5 every option builds the same network)
CHECK_RATIO = 0.37
CHECK_ROUNDS = 2


@dataclass(frozen=True)
class WholeModelCheck:
    """The per-family choice against one global multiple, each as the uniform copy timed in pairs with dense."""

    chosen: str  # the option kept: "per family" or "all N"
    options: dict[str, dict[str, float]]  # option -> latency ratio, MAC ratio, latency per MAC kept

    def to_json(self) -> dict[str, Any]:
        return {"chosen": self.chosen,
                "options": {k: {m: round(v, 4) for m, v in o.items()} for k, o in self.options.items()}}


def _shapes(model: Any) -> tuple[tuple[str, tuple[int, ...]], ...] | None:
    """What a pruned copy is, as far as its speed goes: every parameter's and buffer's shape (None: not a module)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return tuple((n, tuple(t.shape)) for n, t in model.state_dict().items())


def confirm_alignment(alignment: dict[str, AlignmentChoice], structure: Structure,
                      build: Callable[[dict[str, int]], torch.nn.Module], macs: Callable[[torch.nn.Module], float],
                      latency_ratio: Callable[[torch.nn.Module], float], dense_macs: float,
                      multiples: tuple[int, ...] = WHOLE) -> tuple[dict[str, AlignmentChoice], WholeModelCheck]:
    """Check the per-family choice in the whole network, where one op alone can hide what a width costs (layout
    reorders, the next op's blocking): the uniform copy built on the per-family multiples and on one multiple
    for every family that has room for it, each timed as a ratio to dense (`latency_ratio`), ranked by latency
    per MAC kept, `CHECK_ROUNDS` times. A global multiple replaces the per-family choice only when it is `TIE`
    better in every round."""
    per_family = {f: c.multiple for f, c in alignment.items()}
    options: dict[str, dict[str, int]] = {"per family": per_family}
    for m in multiples:
        fams = {f: (m if structure.groups[structure.families[f][0]].units >= 4 * m else c) for f, c in per_family.items()}
        if fams != per_family and fams not in options.values():
            options[f"all {m}"] = fams
    if len(options) == 1:  # no family has room for a coarser multiple: nothing to compare
        return alignment, WholeModelCheck("per family", {})
    names = list(options)
    rounds: dict[str, list[float]] = {n: [] for n in names}
    lats: dict[str, list[float]] = {n: [] for n in names}
    q_of: dict[str, float] = {}
    seen: set[Any] = set()
    for r in range(CHECK_ROUNDS):  # options in a rotated order each round: the host's drift spreads over all
        for name in names[r % len(names):] + names[:r % len(names)]:
            fams = options[name]
            model = build({g: fams[f] for f, members in structure.families.items() if f in fams for g in members})
            if r == 0:  # different multiples can still round to the same widths: that network is timed once
                shapes = _shapes(model)
                if shapes is not None and shapes in seen:
                    names.remove(name)
                    continue
                seen.add(shapes)
            lat, q = latency_ratio(model), macs(model) / dense_macs
            del model
            lats[name].append(lat)
            q_of[name] = q
            rounds[name].append(lat / q if q > 0 else math.inf)
    if len(names) == 1:  # every global multiple built the per-family network
        return alignment, WholeModelCheck("per family", {})
    scored = {n: {"latency_ratio": sum(lats[n]) / len(lats[n]), "macs_ratio": q_of[n],
                  "per_mac": sum(rounds[n]) / len(rounds[n])} for n in names}
    best = min(scored, key=lambda k: scored[k]["per_mac"])
    # one round's ranking is noise on a shared host (+-3%): a global multiple must win by TIE in every round
    if best == "per family" or any(b > p * (1 - TIE) for b, p in zip(rounds[best], rounds["per family"])):
        return alignment, WholeModelCheck("per family", scored)
    won = options[best]
    return ({f: (c if c.multiple == won[f] else AlignmentChoice(c.family, c.op, won[f], c.vs_trend))
             for f, c in alignment.items()}, WholeModelCheck(best, scored))
