"""Report figures as PNG bytes (matplotlib's object API on the Agg canvas: no pyplot, no global backend).

Every function takes the plain JSON a run leaves on disk and returns `None` when there is nothing to draw,
so the report renders whatever a run produced. Figures are drawn at a fixed DPI so the HTML stays small.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from typing import Any

DPI = 110
# verdict -> (marker, colour, label); unknown verdicts fall back to a grey dot
VERDICT_STYLE: dict[str, tuple[str, str, str]] = {
    "best": ("*", "#d4a017", "best"),
    "kept": ("o", "#2e8b57", "kept"),
    "worse": ("o", "#9e9e9e", "worse"),
    "infeasible": ("x", "#c0392b", "infeasible"),
    "rolled_back": ("v", "#c0392b", "rolled back"),
    "failed": ("X", "#333333", "failed"),
}
PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd"]
QUALITY_KEYS = ("accuracy", "perplexity", "probe_perplexity", "mse", "fidelity_agreement")


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # lazy: keeps `import prunepilot` light

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # Figure without pyplot -> Agg canvas for png
    return buf.getvalue()


def _num(v: Any) -> float | None:
    """A finite float, or None (JSON may hold null, strings, NaN)."""
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def attempt_x(attempts: Sequence[dict[str, Any]]) -> tuple[list[float], str]:
    """x position per attempt: its round when rounds are unique numbers, else its 1-based order."""
    rounds = [_num(a.get("round")) for a in attempts]
    if all(r is not None for r in rounds) and len(set(rounds)) == len(rounds):
        return [float(r) for r in rounds], "round"  # type: ignore[arg-type]
    return [float(i + 1) for i in range(len(attempts))], "attempt"


def attempt_errors(attempt: dict[str, Any], goals: dict[str, float]) -> dict[str, float]:
    """Budget errors of one attempt: as recorded, else computed from its metrics and the goals."""
    errs = {m: e for m, e in (attempt.get("errors") or {}).items() if _num(e) is not None}
    metrics = attempt.get("metrics") or {}
    for m, goal in goals.items():
        if m not in errs and _num(metrics.get(m)) is not None and goal:
            errs[m] = (float(metrics[m]) - goal) / goal
    return {m: float(e) for m, e in errs.items()}


def quality_key(attempts: Sequence[dict[str, Any]]) -> str | None:
    """The quality metric the trajectory shows: the first of accuracy/perplexity/fidelity any attempt has."""
    for k in QUALITY_KEYS:
        if any(_num((a.get("metrics") or {}).get(k)) is not None for a in attempts):
            return k
    return None


def trajectory_png(
    attempts: Sequence[dict[str, Any]],
    goals: dict[str, float],
    band: dict[str, float] | None,
) -> bytes | None:
    """Budget error per round (left axis, band shaded) and quality per round (right axis), verdict markers."""
    if not attempts:
        return None
    xs, xlabel = attempt_x(attempts)
    errs = [attempt_errors(a, goals) for a in attempts]
    metrics = sorted({m for e in errs for m in e}, key=lambda m: (m not in goals, m))
    qkey = quality_key(attempts)
    if not metrics and qkey is None:
        return None
    fig = _figure(9.0, 4.2)
    ax = fig.add_subplot()
    lo_hi = None
    if metrics and metrics[0] == "sparsity" and goals.get("sparsity"):
        tol = 0.005 / goals["sparsity"]  # sparsity is held to ±0.5 pt absolute (Budget.within), not the band
        lo_hi = (-tol, tol)
    elif band and _num(band.get("over")) is not None and _num(band.get("under")) is not None:
        lo_hi = (-float(band["under"]), float(band["over"]))
    if lo_hi is not None:
        ax.axhspan(100 * lo_hi[0], 100 * lo_hi[1], color="#2e8b57", alpha=0.10, label="budget band")
    ax.axhline(0, color="#555555", lw=0.8)
    for x, a in zip(xs, attempts):  # rollbacks: a light red column behind the round
        if a.get("verdict") == "rolled_back":
            ax.axvspan(x - 0.4, x + 0.4, color="#c0392b", alpha=0.08, lw=0)
    for i, m in enumerate(metrics):
        pts = [(x, 100 * e[m]) for x, e in zip(xs, errs) if m in e]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=PALETTE[i % len(PALETTE)], lw=1.5,
                label=f"{m} error (%)", zorder=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("budget error (%)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if qkey is not None:
        ax2 = ax.twinx()
        scale = 100.0 if qkey in ("accuracy", "fidelity_agreement") else 1.0
        pts = [(x, scale * float(a["metrics"][qkey])) for x, a in zip(xs, attempts)
               if _num((a.get("metrics") or {}).get(qkey)) is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "--", marker=".", ms=5, color="#444444", lw=1.2, label=qkey.replace("_", " "), zorder=1)
        ax2.set_ylabel(f"{qkey} (%)" if scale == 100.0 else qkey.replace("_", " "))
        if pts:  # a tiny spread must not look like a collapse: show at least 2 pt / 2% of the value
            lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
            span = 2.0 if scale == 100.0 else 0.02 * abs((lo + hi) / 2)
            if 0 < span and hi - lo < span:
                mid = (lo + hi) / 2
                ax2.set_ylim(mid - span, mid + span)
        if "perplexity" in qkey and pts and max(p[1] for p in pts) / max(min(p[1] for p in pts), 1e-9) > 20:
            ax2.set_yscale("log")  # a collapsed attempt would flatten every other point
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # verdict markers sit on the primary error line (or the quality line when there is no error)
    seen: set[str] = set()
    for x, a, e in zip(xs, attempts, errs):
        verdict = str(a.get("verdict") or "")
        marker, colour, label = VERDICT_STYLE.get(verdict, ("o", "#bbbbbb", verdict or "unknown"))
        if metrics and metrics[0] in e:
            target_ax, y = ax, 100 * e[metrics[0]]
        elif qkey is not None and _num((a.get("metrics") or {}).get(qkey)) is not None:
            target_ax = fig.axes[-1]
            y = float(a["metrics"][qkey]) * (1.0 if "perplexity" in qkey else 100.0)
        else:  # nothing measured (a failed attempt): mark it on the bottom edge so it is not lost
            h = ax.scatter([x], [0.03], marker=marker, s=55, color=colour, zorder=5, transform=ax.get_xaxis_transform(),
                           clip_on=False)
            if label not in seen:
                seen.add(label)
                handles.append(h)
                labels.append(label)
            continue
        h = target_ax.scatter([x], [y], marker=marker, s=110 if marker == "*" else 55, color=colour, zorder=5,
                              edgecolors="white" if marker not in ("x",) else None, linewidths=0.6)
        if label not in seen:
            seen.add(label)
            handles.append(h)
            labels.append(label)
    if len(set(xs)) <= 30:
        ax.set_xticks(sorted(set(xs)))
    ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.08 if qkey else 1.0, 1.0), fontsize=8, frameon=False)
    ax.set_title("Trajectory: budget error and quality per attempt", fontsize=10)
    return _png(fig)


def _ordered_by_family(names: Sequence[str], family_of: dict[str, str]) -> list[tuple[str, list[str]]]:
    """Groups bucketed by family, families in first-seen order, groups in their given order."""
    buckets: dict[str, list[str]] = {}
    for n in names:
        buckets.setdefault(family_of.get(n, "(no family)"), []).append(n)
    return list(buckets.items())


def widths_png(widths: dict[str, Sequence[float]], family_of: dict[str, str], order: Sequence[str] = ()) -> bytes | None:
    """Per-group width, dense (outline) vs pruned (filled, coloured by family), grouped by family."""
    clean = {g: (float(w[0]), float(w[1])) for g, w in widths.items()
             if isinstance(w, (list, tuple)) and len(w) >= 2 and _num(w[0]) is not None and _num(w[1]) is not None}
    if not clean:
        return None
    names = [n for n in order if n in clean] + [n for n in clean if n not in set(order)]
    fams = _ordered_by_family(names, family_of)
    seq = [(fam, g) for fam, gs in fams for g in gs]
    n = len(seq)
    fig = _figure(min(14.0, max(7.0, 0.28 * n + 2.5)), 4.6)
    ax = fig.add_subplot()
    colour = {fam: PALETTE[i % len(PALETTE)] for i, (fam, _) in enumerate(fams)}
    xs = list(range(n))
    ax.bar(xs, [clean[g][0] for _, g in seq], width=0.8, color="none", edgecolor="#888888", lw=0.8, label="dense width")
    ax.bar(xs, [clean[g][1] for _, g in seq], width=0.8, color=[colour[f] for f, _ in seq], label="pruned width")
    if n <= 48:
        ax.set_xticks(xs, [g for _, g in seq], rotation=90, fontsize=7)
    else:  # too many groups to name: label family spans instead
        centres, start = [], 0
        for fam, gs in fams:
            centres.append(start + (len(gs) - 1) / 2)
            start += len(gs)
        ax.set_xticks(centres, [f for f, _ in fams], rotation=0 if len(fams) <= 6 else 90, fontsize=7)
    ax.set_ylabel("channels / units")
    ax.set_xlim(-0.7, n - 0.3)
    ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="none", edgecolor="#888888", label="dense width")]
    shown = fams if len(fams) <= 12 else fams[:12]
    handles += [Patch(color=colour[f], label=f) for f, _ in shown]
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              title="pruned width, by family" if len(fams) <= 12 else "family (first 12)", title_fontsize=7)
    ax.set_title("Per-group width before / after", fontsize=10)
    return _png(fig)


_BLOCK = re.compile(r"\.(\d+)\.")


def layer_kind(name: str) -> str:
    """'model.layers.3.mlp.down_proj' -> 'mlp.down_proj' (the part after the last block index)."""
    parts = _BLOCK.split(name)
    return parts[-1] if len(parts) > 1 else name


def sparsity_png(per_layer: dict[str, Any], target: float | None = None) -> bytes | None:
    """Sparsity per layer in model order, coloured by layer kind, with the global target as a line."""
    vals = [(k, float(v)) for k, v in per_layer.items() if _num(v) is not None]
    if not vals:
        return None
    kinds = list(dict.fromkeys(layer_kind(k) for k, _ in vals))
    colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(kinds)}
    n = len(vals)
    fig = _figure(min(14.0, max(7.0, 0.05 * n + 6.0)), 4.2)
    ax = fig.add_subplot()
    ax.bar(range(n), [100 * v for _, v in vals], width=0.85, color=[colour[layer_kind(k)] for k, _ in vals])
    if target is not None:
        ax.axhline(100 * target, color="#333333", ls="--", lw=1, label=f"global {100 * target:.1f}%")
    if n <= 40:
        ax.set_xticks(range(n), [k for k, _ in vals], rotation=90, fontsize=7)
    else:
        ax.set_xlabel(f"layer (model order, {n} layers)")
    ax.set_ylabel("sparsity (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[k], label=k) for k in kinds[:12]]
    handles += [h for h in ax.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Sparsity per layer", fontsize=10)
    return _png(fig)


def family_distribution(
    profile: dict[str, Any] | None, widths: dict[str, Sequence[float]] | None
) -> list[dict[str, Any]]:
    """Per family: MACs and measured latency its groups touch, as a share of the dense model, before and after.

    Shares overlap (a conv between two groups counts in both, so they sum past 100%). The after-share is an
    estimate: each group's profiled MACs scaled by the kept fraction of its width; a layer between two
    pruned groups really shrinks by both fractions, so the estimate is an upper bound.
    """
    if not profile:
        return []
    fam_rows = {f.get("family"): f for f in profile.get("families") or [] if isinstance(f, dict)}
    groups = [g for g in profile.get("groups") or [] if isinstance(g, dict) and g.get("name")]
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for g in groups:
        macs = _num(g.get("macs"))
        if macs is None:
            continue
        fam = str(g.get("family") or g["name"])
        before[fam] = before.get(fam, 0.0) + macs
        w = (widths or {}).get(g["name"])
        kept = 1.0
        if isinstance(w, (list, tuple)) and len(w) >= 2 and _num(w[0]) and _num(w[1]) is not None:
            kept = float(w[1]) / float(w[0])
        after[fam] = after.get(fam, 0.0) + macs * kept
    total = _num((profile.get("dense") or {}).get("macs")) or sum(before.values())
    rows = []
    for fam in dict.fromkeys([*fam_rows, *before]):
        fr = fam_rows.get(fam) or {}
        share = _num(fr.get("macs_share"))
        if share is None and total and fam in before:
            share = before[fam] / total
        kept = after[fam] / before[fam] if (widths and before.get(fam)) else None
        rows.append({
            "family": fam,
            "kind": fr.get("kind", ""),
            "groups": fr.get("groups"),
            "macs_share": share,
            "macs_share_after": share * kept if (share is not None and kept is not None) else None,
            "latency_share": _num(fr.get("latency_share")),
            "macs_kept": kept,
        })
    return rows


def distribution_png(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Grouped horizontal bars per family: dense MACs share, MACs share after (estimated), dense latency share."""
    series = [("macs_share", "MACs share, dense", "#4c72b0"),
              ("macs_share_after", "MACs share, after (estimated)", "#dd8452"),
              ("latency_share", "latency share, dense (measured)", "#55a868")]
    series = [s for s in series if any(_num(r.get(s[0])) is not None for r in rows)]
    if not rows or not series:
        return None
    rows = sorted(rows, key=lambda r: -(_num(r.get("macs_share")) or 0.0))[:30]
    n, k = len(rows), len(series)
    fig = _figure(9.0, max(2.6, 0.13 * n * k + 1.3))
    ax = fig.add_subplot()
    h = 0.8 / k
    for j, (key, label, colour) in enumerate(series):
        ys = [i + (j - (k - 1) / 2) * h for i in range(n)]
        ax.barh(ys, [100 * (_num(r.get(key)) or 0.0) for r in rows], height=h, color=colour, label=label)
    ax.set_yticks(range(n), [str(r["family"]) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MACs / latency its groups touch, % of the dense model (overlapping)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    ax.set_title("MACs / latency distribution per family", fontsize=10)
    return _png(fig)
