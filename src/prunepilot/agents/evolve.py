"""evolve: an elitist (1+lambda) evolutionary search over per-layer sparsity at the target (after EvoPress,
arXiv 2410.14649), for the sparsify job, optionally steered by an LLM analyst.

Genome: the exact prune count of every linear (an Attempt's allocation). Genes: each decoder block's attention
and MLP halves, plus the profile's groups (layer kind @ depth band). A mutation makes 1-3 level switches: a
quantum of pruned weights (a level step times the smaller gene's size) moves from one gene into another,
spread over each gene's layers by their room inside [target - spread, target + spread]. Every mutation keeps
the count sum, so the global parameter-weighted sparsity stays exact by construction (the job's projector
guarantees it again).

Selection, multi-fidelity: each generation screens lambda offspring of the best on the first quarter of the
probe, re-scores the best few on half of it, and the best of those on the whole probe, where it competes
with the parent (elitism: the best full-probe KL so far is the parent; a worse child changes nothing).
The population is seeded with uniform (the job's reference) and the sensitivity strategist's line search.

No hidden state: generation, stage, parent and survivors are all read back from ctx.history (each plan
carries gen / stage / of / origin in plan.params), and the RNG is seeded from (ctx.seed, len(history)), so a
resumed or replayed run proposes the same plans. With an LLM (`evolve+SPEC`), every `every`-th offspring slot
asks the analyst instead: it sees the best allocation per group, the measured group costs and the recent
offspring with their moves and fitness; its per-group answer is applied as a change to the best allocation
and then competes like any offspring, so a useless analyst only spends its share of the evaluations."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..attempt import Attempt
from ..jobs.sparsify import WARM
from ..plan import Plan
from ..sparsify.plan import MAX_RATIO, project
from ..sparsify.strategies import SensitivityStrategist
from .context import Context

SEED, MUTATION, LLM = 1.0, 2.0, 3.0  # plan.params["origin"]
ORIGINS = {SEED: "seed", MUTATION: "mutation", LLM: "llm"}
STEPS = (0.02, 0.04, 0.08)  # level step: the share of the smaller gene's weights one switch moves
SWITCHES = (1, 2, 3)


@dataclass(frozen=True)
class Genes:
    """The search space: layer sizes (profile order), gene -> layer indices, per-layer count bounds."""

    names: list[str]
    sizes: list[int]
    genes: list[tuple[str, list[int]]]
    lo: list[int]
    hi: list[int]
    target: float


def genes_of(profile: Any, target: float, spread: float) -> Genes:
    layers = profile.layers
    halves: dict[str, list[int]] = {}
    for j, l in enumerate(layers):
        halves.setdefault(f"block{l.block}.{l.kind.split('.')[0]}", []).append(j)
    index = {l.name: j for j, l in enumerate(layers)}
    genes = list(halves.items()) + [(g, [index[n] for n in names]) for g, names in profile.groups.items()]
    lo_r, hi_r = max(target - spread, 0.0), min(target + spread, MAX_RATIO)
    sizes = [int(l.params) for l in layers]
    return Genes([l.name for l in layers], sizes, genes, [int(lo_r * s) + 1 if lo_r > 0 else 0 for s in sizes],
                 [int(hi_r * s) for s in sizes], target)


def _spread(amount: int, room: list[int]) -> list[int]:
    """Integers summing to `amount` (<= sum(room)), proportional to room, none above its room."""
    total = sum(room)
    raw = [amount * r / total for r in room]
    out = [int(x) for x in raw]
    short = amount - sum(out)
    for j in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True):
        if short <= 0:
            break
        if out[j] < room[j]:
            out[j] += 1
            short -= 1
    return out


def mutate(counts: Sequence[int], g: Genes, rng: random.Random, steps: Sequence[float] = STEPS,
           switches: Sequence[int] = SWITCHES) -> tuple[list[int], list[tuple[str, str, int]]]:
    """1-3 level switches; returns the child's counts (same sum as `counts`) and the moves (into, from, weights)."""
    child = list(counts)
    moves: list[tuple[str, str, int]] = []
    for _ in range(rng.choice(list(switches))):
        a = rng.randrange(len(g.genes))
        up_name, up = g.genes[a]
        disjoint = [k for k, (_, idx) in enumerate(g.genes) if k != a and not set(idx) & set(up)]
        if not disjoint:
            continue
        down_name, down = g.genes[rng.choice(disjoint)]
        step = rng.choice(list(steps))
        quantum = int(step * min(sum(g.sizes[j] for j in up), sum(g.sizes[j] for j in down)))
        room_up = [max(0, g.hi[j] - child[j]) for j in up]
        room_down = [max(0, child[j] - g.lo[j]) for j in down]
        amount = min(quantum, sum(room_up), sum(room_down))
        if amount <= 0:
            continue
        for j, d in zip(up, _spread(amount, room_up)):
            child[j] += d
        for j, d in zip(down, _spread(amount, room_down)):
            child[j] -= d
        moves.append((up_name, down_name, amount))
    return child, moves


def fidelities(full: int) -> list[int]:
    """Probe sequences per selection stage: a quarter, a half, all (deduplicated)."""
    return sorted({max(1, full // 4), max(1, full // 2), full})


# --------------------------------------------------------------------------------------------- search state
def _counts(a: Attempt) -> tuple[int, ...] | None:
    c = a.allocation.get("counts")
    return tuple(c) if c else None


def _seqs(a: Attempt, full: int) -> int:
    return int(a.metrics.get("probe_seqs", full))


def at_target(history: list[Attempt], target: float) -> list[Attempt]:
    return [a for a in history if _counts(a) and "probe_kl" in a.metrics
            and abs(float(a.step.get("level", -1.0)) - target) < 1e-9]


def _seeded(history: list[Attempt]) -> int:
    """Seeds measured so far: the line search's, and an earlier run's best (the job's warm start) as one more."""
    return sum(1 for a in history if _p(a, "origin") == SEED or (a.phase == "refine" and a.strategist == WARM))


def best_full(history: list[Attempt], target: float, full: int) -> Attempt | None:
    """The parent: the lowest KL on the whole probe at the target (elitism; ties: the earliest)."""
    scored = [a for a in at_target(history, target) if _seqs(a, full) >= full]
    return min(scored, key=lambda a: (a.metrics["probe_kl"], a.index), default=None)


def _p(a: Attempt, key: str, default: float = -1.0) -> float:
    return float(a.plan_params.get(key, default))


def evolve_report(history: list[Attempt]) -> dict[str, Any]:
    """Per origin (seed / mutation / llm): proposed, screened, promoted past the first screen, became the best.
    This is the journal's account of which proposals survived (a record cannot be edited once written)."""
    roots = {a.index: a for a in history if _p(a, "stage") == 0 or (_p(a, "origin") == SEED)}
    promoted = {int(_p(a, "of")) for a in history if _p(a, "stage") > 0 and "probe_kl" in a.metrics}
    best_roots = {int(_p(a, "of", a.index)) for a in history if a.verdict == "accept" and a.phase == "refine"}
    out: dict[str, Any] = {}
    for origin, label in ORIGINS.items():
        rs = [a for a in roots.values() if _p(a, "origin") == origin]
        if not rs:
            continue
        out[label] = {"proposed": len(rs), "measured": sum(1 for a in rs if "probe_kl" in a.metrics),
                      "failed": sum(1 for a in rs if a.verdict == "failed"),
                      "fallbacks": sum(1 for a in rs if a.fallback_reason),
                      "promoted": sum(1 for a in rs if a.index in promoted),
                      "became_best": sum(1 for a in rs if a.index in best_roots)}
    gens = [int(_p(a, "gen")) for a in history if _p(a, "gen") >= 0]
    out["generations"] = (max(gens) + 1) if gens else 0
    return out


# ------------------------------------------------------------------------------------------------- strategist
class EvolveStrategist:
    """(1+lambda) elitist, multi-fidelity search at the target; see the module docstring."""

    kinds = ("sparsify",)
    needs_ramp = False  # the job should start at the target (uniform reference), not ramp to it

    def __init__(self, lam: int = 6, survivors: int = 2, seeds: int = 5, spread: float = 0.3,
                 client: Any = None, every: int = 4) -> None:
        self.lam, self.survivors, self.seeds, self.spread = lam, survivors, seeds, spread
        self.client, self.every = client, max(1, every)
        self.name = "evolve" if client is None else f"evolve+llm:{getattr(client, 'name', type(client).__name__)}"
        self.sensitivity = SensitivityStrategist()

    # -- helpers
    def _plan(self, g: Genes, counts: Sequence[int], target: float, rationale: str, **params: float) -> Plan:
        ratios = {n: c / s for n, c, s in zip(g.names, counts, g.sizes)}
        return Plan(ratios=ratios, default_ratio=target, rationale=rationale, params=params)

    def propose(self, ctx: Context) -> Plan | None:
        if ctx.phase != "refine":
            return self.sensitivity.propose(ctx)  # a ramp (if the job runs one): climb with a mild tilt
        target = float(ctx.step["target"])
        full = int(ctx.step.get("probe_seqs", 1))
        hist = ctx.history
        g = genes_of(ctx.profile, target, self.spread)
        # 1. seeds: the sensitivity strategist's line search, on the whole probe
        if _seeded(hist) < self.seeds:
            plan = self.sensitivity.propose(ctx)
            if plan is not None:
                return plan.model_copy(update={"params": {**plan.params, "origin": SEED, "probe_seqs": float(full)}})
        parent = best_full(hist, target, full)
        if parent is None or len(parent.allocation["counts"]) != len(g.sizes):
            return self.sensitivity.propose(ctx)  # nothing measured at the target yet (a foreign history)
        fids = fidelities(full)
        evo = [a for a in hist if _p(a, "gen") >= 0 and _p(a, "stage") >= 0]
        gen = int(max((_p(a, "gen") for a in evo), default=0))
        mine = [a for a in evo if int(_p(a, "gen")) == gen]
        stage0 = [a for a in mine if _p(a, "stage") == 0]
        if len(stage0) >= self.lam:
            nxt = self._rescore(g, mine, fids, gen, target)
            if nxt is not None:
                return nxt
            gen, stage0 = gen + 1, []  # the generation is complete
        rng = random.Random(f"evolve:{ctx.seed}:{len(hist)}")
        slot = sum(1 for a in evo if _p(a, "stage") == 0)
        params = {"gen": float(gen), "stage": 0.0, "probe_seqs": float(fids[0])}
        if self.client is not None and slot % self.every == self.every - 1:
            return self._steered(ctx, g, parent, rng, params)
        return self._mutation(hist, g, parent, rng, params)

    def independent(self, ctx: Context) -> int:
        """How many of the next proposals, this one first, the Master may propose before any of them is measured
        (loop/executor.py): the rest of a generation's screened offspring, or the survivors a stage re-scores.
        1 for seeds (a line search), for the final full-probe stage (it may become the parent), when the first
        screen is the whole probe, and for an LLM slot; a batch stops before an LLM slot, so the analyst sees
        every earlier offspring measured, as it would one proposal at a time. Capped by the evaluations left."""
        if ctx.phase != "refine":
            return 1
        target = float(ctx.step["target"])
        full = int(ctx.step.get("probe_seqs", 1))
        hist = ctx.history
        if _seeded(hist) < self.seeds:
            return 1
        parent = best_full(hist, target, full)
        fids = fidelities(full)
        if parent is None or fids[0] >= full:
            return 1
        evo = [a for a in hist if _p(a, "gen") >= 0 and _p(a, "stage") >= 0]
        gen = int(max((_p(a, "gen") for a in evo), default=0))
        mine = [a for a in evo if int(_p(a, "gen")) == gen]
        n_stage0 = sum(1 for a in mine if _p(a, "stage") == 0)
        if n_stage0 >= self.lam:
            for s in range(1, len(fids)):
                prev = [a for a in mine if _p(a, "stage") == s - 1 and "probe_kl" in a.metrics]
                keep = sorted(prev, key=lambda a: (a.metrics["probe_kl"], a.index))[: (1 if s == len(fids) - 1 else self.survivors)]
                done = {int(_p(a, "of")) for a in mine if _p(a, "stage") == s}
                left = sum(1 for a in keep if int(_p(a, "of", a.index)) not in done)
                if left:
                    return 1 if s == len(fids) - 1 else self._cap(ctx, left)
            n_stage0 = 0  # the generation is complete: the next one starts
        k = self.lam - n_stage0
        if self.client is not None:
            slot = sum(1 for a in evo if _p(a, "stage") == 0)
            for j in range(k):
                if (slot + j) % self.every == self.every - 1:
                    k = max(1, j)  # up to the LLM slot; the slot itself alone
                    break
        return self._cap(ctx, k)

    @staticmethod
    def _cap(ctx: Context, k: int) -> int:
        left = ctx.step.get("evals_left")
        return max(1, min(k, int(left))) if left is not None else k

    def _mutation(self, hist: list[Attempt], g: Genes, parent: Attempt, rng: random.Random,
                  params: dict[str, float]) -> Plan:
        seen = {_counts(a) for a in hist}
        base = parent.allocation["counts"]
        child, moves = list(base), []
        for _ in range(20):  # a child already measured teaches nothing: draw again
            child, moves = mutate(base, g, rng)
            if moves and tuple(child) not in seen:
                break
        what = "; ".join(f"{n:,} weights {src} -> {dst}" for dst, src, n in moves) or "no room to move"
        return self._plan(g, child, g.target, f"mutation of #{parent.index} ({len(moves)} switch{'es' if len(moves) != 1 else ''}): {what}",
                          **params, origin=MUTATION, parent=float(parent.index))

    def _rescore(self, g: Genes, mine: list[Attempt], fids: list[int], gen: int, target: float) -> Plan | None:
        """The next survivor of this generation to score on more of the probe, or None when the generation is done."""
        for s in range(1, len(fids)):
            prev = sorted((a for a in mine if _p(a, "stage") == s - 1 and "probe_kl" in a.metrics),
                          key=lambda a: (a.metrics["probe_kl"], a.index))
            keep = prev[: (1 if s == len(fids) - 1 else self.survivors)]
            done = {int(_p(a, "of")) for a in mine if _p(a, "stage") == s}
            for a in keep:
                root = int(_p(a, "of", a.index))
                if root not in done:
                    return self._plan(g, a.allocation["counts"], target,
                                      f"survivor #{root} of generation {gen} re-scored on {fids[s]} probe sequences",
                                      gen=float(gen), stage=float(s), probe_seqs=float(fids[s]), of=float(root),
                                      origin=_p(a, "origin", MUTATION))
        return None

    def _steered(self, ctx: Context, g: Genes, parent: Attempt, rng: random.Random, params: dict[str, float]) -> Plan:
        """One offspring slot answered by the LLM analyst; its per-group answer becomes a change to the parent."""
        from .analyst import LLMAnalyst

        target = float(ctx.step["target"])
        base = parent.allocation["counts"]
        current = {n: c / s for n, c, s in zip(g.names, base, g.sizes)}
        sub = dataclasses.replace(ctx, phase="evolve", step={**ctx.step, "current": current,
                                                             "search": search_view(ctx.history, parent, ctx.profile,
                                                                                   int(ctx.step.get("probe_seqs", 1)))})
        fallback = MutationFallback(lambda: self._mutation(ctx.history, g, parent, rng, params))
        plan = LLMAnalyst(self.client, fallback).propose(sub)
        ctx.fallback_reason = sub.fallback_reason
        assert plan is not None  # the fallback always answers
        if sub.fallback_reason:
            return plan
        by_group = group_ratios(ctx.profile, current)
        lo, hi = max(target - self.spread, 0.0), min(target + self.spread, MAX_RATIO)
        desired = {}
        for l in ctx.profile.layers:
            delta = plan.ratios.get(l.group, by_group[l.group]) - by_group[l.group]
            desired[l.name] = min(max(current[l.name] + delta, lo), hi)
        counts = project(desired, ctx.profile.layers, target)
        child = [counts[n] for n in g.names]
        return self._plan(g, child, target, f"LLM proposal applied to #{parent.index}: {plan.rationale}"[:2000],
                          **params, origin=LLM, parent=float(parent.index)).model_copy(update={"source": plan.source})


class MutationFallback:
    """The mutation an LLM slot falls back to when the analyst's answer is unusable (either evolve)."""

    name = "evolve"
    kinds = ("prune", "sparsify")

    def __init__(self, make: Any) -> None:
        self.make = make

    def propose(self, ctx: Context) -> Plan:
        return self.make()


def group_ratios(profile: Any, ratios: dict[str, float]) -> dict[str, float]:
    by = {l.name: l for l in profile.layers}
    out = {}
    for grp, names in profile.groups.items():
        p = sum(by[n].params for n in names)
        out[grp] = sum(ratios[n] * by[n].params for n in names) / p
    return out


def search_view(history: list[Attempt], parent: Attempt, profile: Any, full: int, k: int = 8) -> dict[str, Any]:
    """What the steering analyst reads: the best candidate and the last k offspring, as group-level moves."""
    by_index = {a.index: a for a in history}
    rows = []
    for a in [a for a in history if _p(a, "stage") == 0][-k:]:
        base = by_index.get(int(_p(a, "parent")))
        moves = {}
        if base is not None and a.projected and base.projected:
            d = {grp: a.projected.get(grp, 0.0) - base.projected.get(grp, 0.0) for grp in a.projected}
            moves = {grp: round(v, 3) for grp, v in sorted(d.items(), key=lambda kv: -abs(kv[1]))[:3] if abs(v) >= 5e-4}
        promoted = any(_p(b, "of") == a.index and _p(b, "stage") > 0 for b in history)
        rows.append({"attempt": a.index, "origin": ORIGINS.get(_p(a, "origin"), "?"), "moves": moves,
                     "probe_kl": round(a.metrics["probe_kl"], 5) if "probe_kl" in a.metrics else None,
                     "probe_seqs": int(a.metrics.get("probe_seqs", full)) if "probe_kl" in a.metrics else None,
                     "promoted": promoted})
    uniform = next((a for a in history if a.phase == "reference" and "probe_kl" in a.metrics), None)
    return {"best": {"attempt": parent.index, "probe_kl": round(parent.metrics["probe_kl"], 5)},
            "uniform_probe_kl": round(uniform.metrics["probe_kl"], 5) if uniform else None,
            "recent_offspring": rows, "probe_seqs_full": full}
