"""Latency budgets met by the projector: a latency model in the profile, per-family alignment, corrections.

`LatencyTargeting.enable(pruner)` builds the device's latency model for the pruner's dense model (tables
cached), chooses each family's channel multiple by measurement (unless the user fixed `round_to`), and gives
the pruner a projector that predicts `latency_ms` like MACs. `candidate` projects a plan onto the middle of a
latency band, builds it, measures it fresh (interleaved pairs with the dense model for a relative target) and,
while the measurement sits outside the band's inner half, corrects the aim (at most twice) and rebuilds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..allocation import Allocation
from ..budget import ResolvedBudget
from ..plan import Plan
from .alignment import AlignmentChoice
from .model import LatencyModel, aligned_width, build_latency_model, paired_ms, whole_model_ms

METRIC = "latency_ms"


@dataclass
class LatencyTargeting:
    model: LatencyModel
    alignment: dict[str, AlignmentChoice] = field(default_factory=dict)
    corrections: int = 0
    notes: list[str] = field(default_factory=list)
    # a relative target ("60%") is a ratio to the dense model: measured against dense timed alongside, so a
    # machine that got slower or faster since the tables were built does not count as a budget error
    relative: bool = False
    # the last candidate() call's tries: the lowest latency it aimed at and the fastest it measured, so an
    # out-of-band result can tell a target below the device's floor from noise
    lowest_aim_ms: float | None = None
    fastest_ms: float | None = None

    @classmethod
    def enable(cls, pruner: Any, *, align: bool = True, cache_dir: Path | None | bool = True, runs: int = 3,
               log: Callable[[str], None] | None = None) -> "LatencyTargeting":
        from ..engines.structured import apply_allocation
        from ..pipeline import copy_model
        from ..projector import Projector

        st = pruner.structure

        def uniform(ratio: float, multiple: dict[str, int]) -> torch.nn.Module:
            # kept widths on each group's chosen multiple, as the projector will pick them: an unaligned copy
            # runs slower than its tables (padded blocks) and would teach the rest model that pruning costs time
            kept = {n: aligned_width(g.units * (1 - ratio), multiple.get(n, 1), g.units) for n, g in st.groups.items()}
            model = copy_model(pruner.dense)  # detaches cached graph tensors a plain deepcopy chokes on
            return apply_allocation(model, pruner.x, st, Allocation(kept, {})).eval()

        from ..pipeline import count_real

        lm = build_latency_model(pruner.dense, pruner.x, st, prune_uniform=uniform if st.groups else None,
                                 cache_dir=cache_dir, runs=runs, align=align,
                                 count_macs=lambda m: count_real(m, pruner.x)["macs"], log=log)
        alignment: dict[str, AlignmentChoice] = lm.alignment
        pruner.projector = Projector(st, pruner.cost, latency=lm,
                                     align={f: c.multiple for f, c in alignment.items()})
        pruner.profile.dense[METRIC] = lm.dense_ms  # budgets resolve against the tables' own statistic
        # what strategists and the analyst read as each group's latency: the time the tables say it saves
        # (a 50% cut, doubled), so "value per latency" is measured on this device, not inferred from MACs
        for g in pruner.profile.groups:
            if g.name in st.groups:
                g.latency_ms = max(0.0, 2 * -lm.group_delta({}, g.name, 0.5))
        pruner.profile.dense["module_ms"] = lm.dense_ms
        if st.blocks:  # a block's skip is timed the first time a plan skips it (or `profile_blocks` asks)
            lm.skip_probe = block_skip_probe(pruner, lm)
        return cls(lm, alignment)

    def profile_blocks(self, pruner: Any, log: Callable[[str], None] | None = None) -> None:
        """Every skippable block's measured latency share in the profile (what a strategist that ranks blocks
        reads): one paired measurement per block."""
        from ..blocks import block_rows

        t0 = time.perf_counter()
        rows = {r["block"]: r for r in pruner.profile.blocks}
        for r in block_rows(pruner.structure, pruner.cost, self.model):
            rows[r["block"]] = {**rows.get(r["block"], {}), **r}
        pruner.profile.blocks = list(rows.values())
        if log is not None:
            log(f"skipping each of {len(rows)} residual blocks timed in {time.perf_counter() - t0:.1f} s")

    def measure(self, model: torch.nn.Module, x: Any) -> float:
        return whole_model_ms(model, x, torch.device(self.model.device))

    def measure_against(self, dense: torch.nn.Module, model: torch.nn.Module, x: Any, pairs: int = 41) -> tuple[float, float]:
        """(dense ms, model ms): single forwards of the two interleaved `pairs` times; the model's time is the
        median of its paired ratios to dense, times dense's best, so the host's drift (tens of percent between
        minutes on shared machines) moves both sides of every ratio together."""
        d, _, ratio = paired_ms(dense, model, x, torch.device(self.model.device), pairs=pairs)
        return d, d * ratio

    def _measured(self, pruner: Any, model: torch.nn.Module) -> float:
        """The candidate's latency in the frame the goal was resolved in (the tables' dense measurement)."""
        if not self.relative:
            return self.measure(model, pruner.x)
        d, m = self.measure_against(pruner.dense, model, pruner.x, pairs=21)
        return m * self.model.dense_ms / d

    def candidate(self, pruner: Any, plan: Plan, budget: ResolvedBudget, *, corrections: int = 2, **kw: Any):
        """A verified candidate whose *measured* latency is in the band when the tables allow it.

        The projection aims at the middle of the band, not its edge: a measured latency carries the host's
        noise, and the middle leaves it room on both sides. While the fresh measurement lands outside the inner
        half of the band, the aim is corrected (at most `corrections` times): first by the tables' bias on this
        candidate (predicted / measured), then by the secant through the two last (aim, measured) points; the
        candidate closest to the middle is kept."""
        aim = self._aim(budget, 1.0)
        cand = pruner.candidate(plan, aim, **kw)
        if METRIC not in budget.goals:
            return cand
        measured = self._measured(pruner, cand.model)
        tried = [(1.0, measured, cand)]
        centre = aim.goals[METRIC]
        for _ in range(corrections):
            best = min(tried, key=lambda t: self._off_centre(budget, t[1]))
            if self._off_centre(budget, best[1]) <= 0.5 or measured <= 0:
                break
            # only tables that cannot reach the budget at all end the corrections: a retry whose projection
            # missed its (rescaled) aim by the tables' reckoning may still measure closer, and the closest is kept
            if not cand.projection.feasible and "unreachable" in cand.projection.reason:
                break
            if len(tried) == 1:
                predicted = cand.projection.predicted.get(METRIC, measured)
                scale = predicted / measured  # the tables' bias on this candidate, taken out of the aim
            else:
                (s1, m1, _), (s2, m2, _) = tried[-2], tried[-1]
                scale = s2 + (centre - m2) * (s2 - s1) / (m2 - m1) if abs(m2 - m1) > 1e-9 else s2 * centre / m2
                scale = min(2 * s2, max(0.5 * s2, scale))
            retry = pruner.candidate(plan, self._aim(budget, scale), **kw)
            m2 = self._measured(pruner, retry.model)
            self.corrections += 1
            self.notes.append(f"latency correction: aimed at {centre * scale:.2f} ms (x{scale:.3f}), measured {m2:.2f} ms "
                              f"(the previous candidate: {measured:.2f} ms)")
            tried.append((scale, m2, retry))
            cand, measured = retry, m2
        self.fastest_ms = min(m for _, m, _ in tried)
        self.lowest_aim_ms = min(centre * s for s, _, _ in tried)
        _, measured, cand = min(tried, key=lambda t: self._off_centre(budget, t[1]))
        cand.metrics[METRIC] = measured
        cand.metrics["latency_predicted_ms"] = cand.projection.predicted.get(METRIC, float("nan"))
        return cand

    @staticmethod
    def _aim(budget: ResolvedBudget, scale: float) -> ResolvedBudget:
        """The budget with the latency goal moved to the band's middle (times `scale`): what the projector is
        asked to predict. The band and every other goal stay as the user set them."""
        if METRIC not in budget.goals:
            return budget
        goals = dict(budget.goals)
        goals[METRIC] = budget.goals[METRIC] * (1 + (budget.band.over - budget.band.under) / 2) * scale
        return ResolvedBudget(goals=goals, band=budget.band, texts=budget.texts)

    @staticmethod
    def _off_centre(budget: ResolvedBudget, measured: float) -> float:
        """How far a measurement sits from the band's middle, in half-widths of the band (1 = on its edge)."""
        over, under = budget.band.over, budget.band.under
        half = (over + under) / 2 or 1e-9
        return abs(budget.error(METRIC, measured) - (over - under) / 2) / half

    def out_of_band_reason(self, budget: ResolvedBudget) -> str:
        """Why the last candidate's fresh measurement missed the band: below the floor pruning reaches on this
        device (corrections aimed far lower and the measurement hardly moved), or noise / a latency step."""
        goal = budget.goals.get(METRIC)
        if (goal and self.corrections and self.fastest_ms and self.lowest_aim_ms is not None
                and self.fastest_ms > goal * (1 + budget.band.over) and self.lowest_aim_ms < 0.7 * self.fastest_ms):
            return (f"the target is below what pruning reaches on this device: corrections aimed as low as "
                    f"{self.lowest_aim_ms:.2f} ms and the fastest candidate still measured {self.fastest_ms:.2f} ms "
                    f"against the {goal:.2f} ms goal (what no channel cut removes: input layers, pools, the head, "
                    "framework overhead per op); relax --target-latency to about that, or add int8 (prunepilot compress)")
        return (f"the fresh measurement is outside the band after {self.corrections} correction(s); the device is noisy "
                "or the target sits on a latency step (retry, or widen --tolerance)")

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model.to_json(), "alignment": {f: c.to_json() for f, c in self.alignment.items()},
                "corrections": self.corrections, "notes": self.notes}


BLOCK_PAIRS = 15  # paired forwards per skippable block (dense vs the block skipped)


def block_skip_probe(pruner: Any, lm: LatencyModel) -> Callable[[str], float]:
    """Measures the model with one block skipped: its ratio to dense in interleaved pairs, in the tables' frame
    (times the tables' dense measurement), so the host's drift since the tables were built does not count."""
    from ..engines.structured import apply_allocation
    from ..pipeline import copy_model

    def probe(block: str) -> float:
        model = apply_allocation(copy_model(pruner.dense), pruner.x, pruner.structure, Allocation({}, {}, (block,))).eval()
        _, _, ratio = paired_ms(pruner.dense, model, pruner.x, torch.device(lm.device), pairs=BLOCK_PAIRS)
        return ratio * lm.dense_ms

    return probe


def run_prune_to_latency(loaded: Any, budget: Any, plan: Plan, out: Path, *, align: bool = True,
                         log: Callable[[str], None] = print, return_model: bool = False) -> Any:
    """`prunepilot prune MODEL --target-latency 60%` without data: one plan projected onto the measured
    latency budget (and any MAC/param targets), verified in a separate fresh measurement, saved, reported."""
    from ..pipeline import Pruner, count_real, write_candidate
    from ..results import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pruner = Pruner(loaded, protected=plan.protected)
    targeting = LatencyTargeting.enable(pruner, align=align, log=log)
    targeting.relative = any(t.metric == METRIC and t.relative for t in budget.targets)
    rb = budget.resolve(pruner.profile.dense)
    write_json_atomic(out / "profile.json", {**pruner.profile.to_json(), "latency_model": targeting.to_json()})
    cand = targeting.candidate(pruner, plan, rb)
    # the separate measurement the budget is judged on: dense and pruned alternated, fresh
    dense_ms, comp_ms = targeting.measure_against(pruner.dense, cand.model, pruner.x)
    if targeting.relative:  # judged as a ratio to the dense model timed alongside it
        rb = budget.resolve({**pruner.profile.dense, METRIC: dense_ms})
    reason = targeting.out_of_band_reason(rb)
    result = write_candidate(loaded, pruner, plan, cand, rb, out, dense_ms, comp_ms, count_real(cand.model, pruner.x),
                             t0, reason=reason, summary_extra=latency_summary, latency_targeting=targeting.to_json())
    return (result, cand.model) if return_model else result


def latency_summary(result: dict[str, Any]) -> str:
    lat = result.get("latency_targeting") or {}
    lm = lat.get("model") or {}
    if not lm:
        return ""
    lines = ["", "## Latency model", "",
             f"Device: `{lm['fingerprint']}`; {lm['ops']} ops timed in {lm['tables']} tables "
             f"({lm['measured_points']} points measured, {lm['cached_points']} from the cache) in {lm['seconds']} s.",
             f"Dense: measured {lm['dense_ms']:.2f} ms, table sum {lm['ops_dense_ms']:.2f} ms "
             f"(the other {lm['rest_ms']:.2f} ms: norms, activations, pools, adds; calibrated as "
             f"{lm['rest_model']['a']:.2f} + {lm['rest_model']['b']:.2f} x kept activations)."]
    if lm.get("allocator"):
        lines.append(f"Timed under the {lm['allocator']['allocator']} allocator: {lm['allocator']['why']}.")
    c = result["compressed"]
    if c.get("latency_predicted_ms") is not None and c.get("latency_ms"):
        lines.append(f"Pruned: predicted {c['latency_predicted_ms']:.2f} ms, measured {c['latency_ms']:.2f} ms "
                     f"({c['latency_ms'] / c['latency_predicted_ms'] - 1:+.1%}).")
    if result.get("speedup") and result.get("ideal_speedup"):
        lines.append(f"Speed-up {result['speedup']:.2f}x of an ideal (MAC ratio) {result['ideal_speedup']:.2f}x: "
                     f"{result['speedup'] / result['ideal_speedup']:.2f} of the MAC ratio became real speed.")
    al = lat.get("alignment") or {}
    if al:
        lines += ["", "Channel multiple per family, chosen by measurement (the family's ops timed over a sweep of "
                      "kept widths; each multiple's widths vs the fitted trend, lower is faster):", ""]
        for f, a in al.items():
            vs = ", ".join(f"{k}: {v:.3f}" for k, v in (a.get("vs_trend") or {}).items())
            lines.append(f"- `{f}`: **{a['multiple']}** ({vs}; ops `{a['op']}`)")
    check = lm.get("alignment_check") or {}
    if check.get("options"):
        opts = "; ".join(f"{k} {o['per_mac']:.3f}" for k, o in check["options"].items())
        lines.append(f"- whole-network check (uniform copies, latency ratio per MAC ratio: {opts}): "
                     f"**{check['chosen']}** kept")
    for n in lat.get("notes") or []:
        lines.append(f"- {n}")
    return "\n".join(lines) + "\n"
