"""Projector: rescale any plan's shape so every MAC/param target lands inside its band, exactly.

MACs(scale) is a monotone step function (channels are integers, rounding makes the steps coarse). Bisection on
the scale finds the crossing; a greedy pass then moves single rounding units between groups (finer allocation
than any global ratio can express) until the error is as small as the steps allow. All of it runs on the
analytic cost model, so a projection costs milliseconds per evaluation; callers verify with a real count.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .budget import ResolvedBudget
from .costmodel import CostModel
from .allocation import Allocation
from .plan import MAX_RATIO, Plan
from .structure import Structure

STATIC_METRICS = ("macs", "params")
INNER_TOLERANCE = 0.001  # stop refining once every static target is within 0.1%
REFINE_SECONDS = 10.0  # bound on the greedy rounding pass (a note says when it stopped early)


@dataclass
class Projection:
    allocation: Allocation
    scale: float
    predicted: dict[str, float]
    errors: dict[str, float]
    feasible: bool
    iterations: int
    seconds: float
    shape: dict[str, float]
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def ratios(self, structure: Structure) -> dict[str, float]:
        """Achieved pruning ratio per group (fraction of channels removed)."""
        return {g: round(1 - w / d, 4) for g, (d, w) in self.allocation.widths(structure).items()}

    def to_json(self, structure: Structure) -> dict:
        return {
            "scale": self.scale,
            "predicted": self.predicted,
            "errors": self.errors,
            "feasible": self.feasible,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 4),
            "reason": self.reason,
            "notes": self.notes,
            "ratios": self.ratios(structure),
            **({"skip": list(self.allocation.skip)} if self.allocation.skip else {}),
        }


def _rounding_unit(units: int, ch_groups: int, round_to: int | None) -> int:
    if not round_to or round_to <= 1:
        return 1
    q = round_to // math.gcd(round_to, ch_groups)
    return q if q < units else 1


def plan_shape(plan: Plan, structure: Structure) -> tuple[dict[str, float], list[str]]:
    """Per-group ratio the plan asks for (before scaling); protected groups get 0."""
    notes: list[str] = []
    shape: dict[str, float] = {}
    for name, g in structure.groups.items():
        if plan.is_protected(name, g.family):
            shape[name] = 0.0
            continue
        shape[name] = plan.ratio_for(name, g.family)
    if not any(v > 0 for v in shape.values()):
        notes.append("the plan removes nothing anywhere; projected with a uniform shape instead")
        shape = {n: (0.0 if plan.is_protected(n, structure.groups[n].family) else 1.0) for n in structure.groups}
    return shape, notes


class Projector:
    def __init__(self, structure: Structure, cost: CostModel, *, latency=None,
                 align: dict[str, int] | None = None) -> None:
        """`latency`: a latency.LatencyModel, so `latency_ms` goals are projected like MACs; `align`: per-family
        channel multiples chosen by measurement (they replace the plan's one global `round_to`)."""
        self.structure = structure
        self.cost = cost
        self.latency = latency
        self.align = dict(align or {})
        self.metric_names = STATIC_METRICS + (("latency_ms",) if latency is not None else ())
        self.last_notes: list[str] = []
        self.skip: tuple[str, ...] = ()  # a view's skipped blocks (see `view`)
        self.fixed: set[str] = set()  # groups wholly inside them: their width no longer matters, so it stays
        self._views: dict[tuple[str, ...], Projector] = {}
        self._base = self

    def view(self, skip: tuple[str, ...] | list[str]) -> "Projector":
        """The projector of the model with the residual blocks `skip` replaced by the identity: costs without
        their modules' terms, and the groups inside them left whole (they are removed with the block)."""
        key = tuple(sorted(set(skip)))
        if not key or key == self.skip:
            return self
        base = self._base
        if key not in base._views:
            v = Projector(base.structure, base.cost.without(key),
                          latency=base.latency.without(key) if base.latency is not None else None, align=base.align)
            v.skip, v._base = key, base
            v.fixed = {n for n in base.structure.groups if base.structure.inside_blocks(n, key)}
            base._views[key] = v
        return base._views[key]

    def metrics(self, alloc: Allocation) -> dict[str, float]:
        if tuple(sorted(alloc.skip)) != self.skip:
            return self.view(alloc.skip).metrics(alloc)
        f = alloc.fractions(self.structure)
        h = alloc.head_fractions(self.structure)
        out = {"macs": self.cost.macs(f, h), "params": self.cost.params(f, h)}
        if self.latency is not None:
            out["latency_ms"] = self.latency.predict(f, h)
        return out

    def _round_to(self, g, plan: Plan) -> int | None:
        return self.align.get(g.family, plan.round_to)

    def _delta(self, metric: str, frac: dict[str, float], hfrac: dict[str, float], group: str, nf: float) -> float:
        if metric == "latency_ms":
            return self.latency.group_delta(frac, group, nf)
        return self.cost.group_delta(metric, frac, hfrac, group, nf)

    def allocation_at(self, shape: dict[str, float], scale: float, plan: Plan) -> Allocation:
        kept: dict[str, int] = {}
        heads: dict[str, int] = {}
        for name, g in self.structure.groups.items():
            r = min(MAX_RATIO, scale * shape[name])
            if plan.prune_heads and g.num_heads:
                heads[name] = max(1, g.num_heads - int(round(r * g.num_heads)))
                kept[name] = g.units
                continue
            if r <= 0:  # protected (or asked to keep): rounding must not take channels from it
                kept[name] = g.units
                continue
            q = _rounding_unit(g.units, g.ch_groups, self._round_to(g, plan))
            k = g.units - r * g.units
            k = int(round(k / q)) * q
            kept[name] = int(min(g.units, max(q, k)))
        return Allocation(kept, heads, self.skip)

    def project(self, plan: Plan, budget: ResolvedBudget, max_refine_steps: int = 400) -> Projection:
        """The allocation of `plan`'s shape that lands every target inside its band. The channel multiple
        (`round_to`, or the measured per-family alignment) is a preference and the budget is not: where the
        multiple is too coarse for any allocation to land in the band (narrow layers: 16 channels at multiples of
        8 keep 8 or 16), it is halved until one does, and a note says so."""
        if tuple(sorted(set(plan.skip))) != self.skip:
            view = self.view(plan.skip)
            proj = view.project(plan, budget, max_refine_steps)
            self.last_notes = view.last_notes
            return proj
        proj = self._project(plan, budget, max_refine_steps)
        coarsest = max([plan.round_to or 1, *self.align.values()])
        if proj.feasible or coarsest <= 1 or "unreachable" in proj.reason:  # finer steps cannot pass the cap
            return proj
        preferred, step = self.align, coarsest
        try:
            while step > 1:
                step //= 2
                self.align = {f: min(q, step) for f, q in preferred.items()}
                finer = self._project(plan.model_copy(update={"round_to": step if step > 1 else None}), budget,
                                      max_refine_steps)
                if finer.feasible:
                    finer.notes.append(f"channel multiples of {coarsest} cannot land the budget in its band on "
                                       f"this model; multiples of {step} do, so they were used")
                    finer.iterations += proj.iterations
                    self.last_notes = finer.notes
                    return finer
        finally:
            self.align = preferred
        return proj

    def _project(self, plan: Plan, budget: ResolvedBudget, max_refine_steps: int) -> Projection:
        t0 = time.perf_counter()
        goals = {m: budget.goals[m] for m in self.metric_names if m in budget.goals}
        shape, notes = plan_shape(plan, self.structure)
        for n in self.fixed:  # inside a skipped block: removed whole, so no channel of it is cut
            shape[n] = 0.0
        self.last_notes = notes
        if not goals:
            alloc = self.allocation_at(shape, 1.0, plan)
            pred = self.metrics(alloc)
            return Projection(alloc, 1.0, pred, {}, True, 0, time.perf_counter() - t0, shape, "no static target: plan applied as given", notes)

        def errs(pred: dict[str, float]) -> dict[str, float]:
            return {m: (pred[m] - g) / g for m, g in goals.items()}

        def worst(e: dict[str, float]) -> float:
            return max(e.values())

        def loss(e: dict[str, float]) -> float:
            # squared error, with going over the cap weighted more than staying under it
            return sum((v * 4 if v > 0 else v) ** 2 for v in e.values())

        if not any(v > 0 for v in shape.values()):  # nothing left to prune: every layer is output/protected
            alloc = self.allocation_at(shape, 0.0, plan)
            pred = self.metrics(alloc)
            e = errs(pred)
            feasible = all(budget.within(m, pred[m]) for m in goals)
            kept = self.structure.ignored
            shown = "; ".join(f"{n}: {r}" for n, r in list(kept.items())[:4]) + ("; ..." if len(kept) > 4 else "")
            by_user = any(r.startswith("protected by") for r in kept.values())
            why = "" if feasible else (
                f"the budget is unreachable: no prunable group is left ({shown or 'no weight layer'}), so the model "
                f"stays at {', '.join(f'{m} {e[m]:+.1%} vs the target' for m in goals)}. Fix: "
                + ("protect fewer layers, or relax the target." if by_user else
                   "this model has no conv/linear channel group structured pruning can cut (`prunepilot profile` "
                   "lists its layers and why each is kept); relax the target."))
            return Projection(alloc, 0.0, pred, e, feasible, 1, time.perf_counter() - t0, shape, why, notes)
        max_shape = max(shape.values())
        s_hi = MAX_RATIO / max_shape
        iterations = 0
        best: tuple[float, float, Allocation] | None = None
        cache: dict[float, tuple[Allocation, dict[str, float]]] = {}

        def at(s: float) -> tuple[Allocation, dict[str, float]]:
            nonlocal iterations, best
            if s not in cache:
                iterations += 1
                a = self.allocation_at(shape, s, plan)
                e = errs(self.metrics(a))
                cache[s] = (a, e)
                if best is None or loss(e) < best[0]:
                    best = (loss(e), s, a)
            return cache[s]

        lo = 0.0
        a_max, e_max = at(s_hi)
        s_sat = MAX_RATIO / min(v for v in shape.values() if v > 0)
        if worst(e_max) > budget.band.over and s_sat > s_hi:
            # the shape, scaled until its largest ratio hits the cap, cannot reach the budget: keep scaling
            # with each group capped at MAX_RATIO, until every group the plan prunes is at the cap
            lo, s_hi = s_hi, s_sat
            a_max, e_max = at(s_hi)
        hi = s_hi
        # Unreachable: even the maximal scale stays above the cap.
        if worst(e_max) > budget.band.over:
            pred = self.metrics(a_max)
            fixed = {m: self._floor(m) for m in goals}
            reason = "; ".join(
                f"{m}: at most {MAX_RATIO:.0%} of every group the plan prunes can go, which reaches "
                f"{pred[m] / self._dense(m):.1%} of dense ({e_max[m]:+.1%} vs the target); protected/unprunable "
                f"layers alone hold {fixed[m] / self._dense(m):.1%}"
                for m in goals if e_max[m] > budget.band.over
            )
            return Projection(a_max, s_hi, pred, e_max, False, iterations, time.perf_counter() - t0, shape,
                              "the budget is unreachable: " + reason + ". Fix: protect fewer layers or relax the target.", notes)

        for _ in range(40):  # bisection on the binding target: worst error is non-increasing in the scale
            mid = (lo + hi) / 2
            _, e = at(mid)
            if worst(e) > 0:
                lo = mid
            else:
                hi = mid
            if hi - lo < 1e-6:
                break
        assert best is not None
        _, scale, alloc = best
        alloc, steps = self._refine(alloc, goals, loss, errs, plan, max_refine_steps)
        iterations += steps
        pred = self.metrics(alloc)
        e = errs(pred)
        feasible = all(budget.within(m, pred[m]) for m in goals)
        reason = "" if feasible else (
            "no allocation puts every target inside the band with this plan's shape; nearest point returned "
            f"(errors {', '.join(f'{m} {v:+.2%}' for m, v in e.items())}). Fix: widen the band, or drop a target."
        )
        return Projection(alloc, scale, pred, e, feasible, iterations, time.perf_counter() - t0, shape, reason, notes)

    def _refine(self, alloc, goals, loss, errs, plan, max_steps, max_seconds: float = REFINE_SECONDS) -> tuple[Allocation, int]:
        """Greedy single-unit moves between groups to close the gap left by step-function rounding. A move is
        scored from the terms of the one group it touches (exact, and O(group) instead of O(model))."""
        kept = dict(alloc.kept)
        heads = dict(alloc.heads)
        st = self.structure
        frac = Allocation(kept, heads).fractions(st)
        hfrac = Allocation(kept, heads).head_fractions(st)
        cur_vals = self.metrics(Allocation(kept, heads, self.skip))
        cur = errs(cur_vals)
        steps = 0
        t0 = time.perf_counter()
        groups = [g for g in st.groups.values() if not (plan.prune_heads and g.num_heads)]
        groups = [g for g in groups if not plan.is_protected(g.name, g.family) and g.name not in self.fixed]
        metrics = list(goals)
        while steps < max_steps and max(abs(v) for v in cur.values()) > INNER_TOLERANCE:
            if time.perf_counter() - t0 > max_seconds:
                self.last_notes.append(f"rounding refinement stopped after {max_seconds:.0f} s ({steps} moves)")
                break
            best_move = None
            best_loss = loss(cur)
            for g in groups:
                q = _rounding_unit(g.units, g.ch_groups, self._round_to(g, plan))
                floor = max(q, int(math.ceil(g.units * (1 - MAX_RATIO))))
                hf = heads.get(g.name, g.num_heads) / g.num_heads if g.name in heads and g.num_heads else 1.0
                for delta in (-q, q):
                    k = kept[g.name] + delta
                    if k < floor or k > g.units:
                        continue
                    nf = k / g.units * hf
                    vals = {m: cur_vals[m] + self._delta(m, frac, hfrac, g.name, nf) for m in metrics}
                    e = errs(vals)
                    lv = loss(e)
                    if lv < best_loss - 1e-15:
                        best_loss, best_move = lv, (g.name, k, nf, vals, e)
            steps += 1
            if best_move is None:
                break
            name, k, nf, cur_vals, cur = best_move
            kept[name] = k
            frac[name] = nf
        return Allocation(kept, heads, self.skip), steps

    def _dense(self, metric: str) -> float:
        if metric == "latency_ms":
            return self._base.latency.predict({})  # the whole model's, not this view's
        return self.cost.dense_macs if metric == "macs" else self.cost.dense_params

    def _floor(self, metric: str) -> float:
        zero = {g: 1.0 / max(1, self.structure.groups[g].units) for g in self.structure.groups}
        if metric == "latency_ms":
            return self.latency.predict(zero)
        return self.cost.macs(zero) if metric == "macs" else self.cost.params(zero)
