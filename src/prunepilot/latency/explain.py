"""Why fewer MACs did not become the same speed-up: where the dense model's time goes, measured per module."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..structure import ROOT_TYPES, Structure


def time_breakdown(model: nn.Module, example_inputs: Any, structure: Structure, whole_ms: float,
                   runs: int = 3) -> dict[str, float]:
    """Shares of a dense forward: prunable convs/linears (they shrink with MACs), layers kept whole (output or
    protected), other modules (norms, activations, pools: memory-bound, per-call overhead) and time outside
    any module (framework dispatch, tensor glue)."""
    from ..profile import module_times

    times = module_times(model, example_inputs, runs=runs)
    mods = dict(model.named_modules())
    shares = {"prunable_ops": 0.0, "kept_whole": 0.0, "other_modules": 0.0}
    for name, t in times.items():
        m = mods.get(name)
        if name in structure.ignored:
            shares["kept_whole"] += t
        elif isinstance(m, ROOT_TYPES) or name in structure.attention:
            shares["prunable_ops"] += t
        else:
            shares["other_modules"] += t
    covered = sum(shares.values())
    total = max(whole_ms, covered, 1e-9)
    out = {k: v / total for k, v in shares.items()}
    out["outside_modules"] = max(0.0, 1 - covered / total)
    return out


def explain_speedup(speedup: float | None, ideal: float | None, shares: dict[str, float]) -> str:
    if not speedup or not ideal:
        return ""
    realised = speedup / ideal
    fixed = 1 - shares.get("prunable_ops", 0.0)
    text = (f"{realised:.0%} of the MAC ratio became real speed-up ({speedup:.2f}x of {ideal:.2f}x). In the dense "
            f"model {shares.get('prunable_ops', 0):.0%} of the time is in prunable convolutions/linears, which shrink "
            f"with MACs; {shares.get('other_modules', 0):.0%} is in norms, activations, pools and other memory-bound "
            f"modules, {shares.get('kept_whole', 0):.0%} in layers kept whole (output/protected) and "
            f"{shares.get('outside_modules', 0):.0%} outside any module (dispatch, tensor glue).")
    if realised < 0.85 and fixed > 0.25:
        text += (f" With {fixed:.0%} of the time not scaling with pruned channels, even a perfect kernel speed-up "
                 f"would give at most {1 / (fixed + (1 - fixed) / ideal):.2f}x; a latency budget (--target-latency) "
                 "prunes where the measured time is.")
    elif realised < 0.85:
        text += " The pruned widths run below their MAC share on this device (kernel efficiency at small or "\
                "unaligned widths); a latency budget chooses channel multiples by measurement."
    return text
