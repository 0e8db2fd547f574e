"""evolve for the prune job: an elitist (1+lambda) evolutionary search over per-family pruning ratios (after
EvoPress, arXiv 2410.14649), optionally steered by an LLM analyst.

Genome: each family's effective ratio at the budget (the plan's ratio times the projector's scale, so parents
and children live on the budget, not on an arbitrary plan scale). A mutation makes 1-2 level switches: one
family prunes a level more (one or two rounding units of its narrowest group: a smaller move would project back
onto the parent's channel counts), another a matching amount less, weighted by their
shares of the budget's cost (MACs, params or measured latency), so the total stays at the budget to first
order; the job's projector then lands it exactly. Fitness is the job's score (accuracy after the equal short
recovery). The population is seeded with uniform and the sensitivity strategist's first settings.

Elitism per generation: every offspring of generation g is a mutation of the best feasible attempt recorded
before generation g began, so a generation's offspring are independent of each other (the Master may measure
them at once on Ray workers) and a resumed run proposes the same plans. No hidden state: generation, origin
and parent ride in plan.params and are read back from ctx.history; the RNG is seeded from (seed, history
length). With an LLM (`evolve+SPEC`) every `every`-th offspring slot asks the analyst, which reads the search
state as guidance; its plan competes like any child, so a useless analyst only spends its share of the rounds.

Vision evaluations are deterministic (fixed recovery seed, fixed evaluation images), so there is no re-scoring
stage here; multi-fidelity screening is the sparsify evolve's (agents/evolve.py)."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from ..attempt import Attempt
from ..plan import MAX_RATIO, Plan
from .context import Context
from .evolve import LLM, MUTATION, ORIGINS, SEED, MutationFallback, _p
from .strategists import SensitivityStrategist, _families

LEVELS = (0.05, 0.1, 0.15)  # level sizes without a channel grid (a share of the family's channels)
ROUND_TO = 8  # the channel multiple the plans ask for (a user's --round-to replaces it)
SWITCHES = (1, 2)


def cost_key(budget: dict[str, Any]) -> str:
    """Which family share the budget spends: measured latency, params (a params-only budget), else MACs."""
    targets = budget.get("targets") or {}
    if "latency_ms" in targets:
        return "latency_share"
    if "params" in targets and "macs" not in targets:
        return "params_share"
    return "macs_share"


def genome(a: Attempt, fams: list[str], *, scaled: bool = True) -> dict[str, float]:
    """The effective per-family ratio an attempt pruned at: its plan's ratio times the projector's scale
    (`scaled=False`: the plan's own ratios, as proposed)."""
    plan = Plan.model_validate(a.plan) if a.plan else Plan()
    scale = float(a.extra.get("scale", 1.0) or 1.0) if scaled else 1.0
    return {f: round(min(MAX_RATIO, max(0.0, scale * plan.ratio_for(f, f))), 4) for f in fams}


def level_units(profile: dict[str, Any], round_to: int | None) -> dict[str, float]:
    """Each family's level: one rounding unit of its narrowest group as a ratio (a smaller move projects back onto
    the parent's allocation), at least the smallest of LEVELS."""
    out = {}
    for f in _families(profile):
        widths = [int(w) for w in (f.get("width") or []) if int(w) > 0]
        unit = (round_to or 1) / min(widths) if widths else 0.0
        out[f["family"]] = max(LEVELS[0], min(unit, 0.5))
    return out


def mutate(parent: dict[str, float], shares: dict[str, float], rng: random.Random,
           units: dict[str, float] | None = None) -> tuple[dict[str, float], list[str]]:
    """1-2 level switches between families; returns the child and the moves, in words. A level is `units[f]`
    (one rounding unit of the family), or one of LEVELS when no units are given."""
    child = dict(parent)
    moves: list[str] = []
    fams = list(child)
    for _ in range(rng.choice(SWITCHES)):
        up = rng.choice(fams)
        downs = [f for f in fams if f != up and child[f] > 0.0]
        if not downs or child[up] >= MAX_RATIO:
            continue
        down = rng.choice(downs)
        level = units[up] * rng.choice((1, 1, 2)) if units else rng.choice(LEVELS)
        step = min(level, MAX_RATIO - child[up])
        # the cost the up-family gives away, taken back from the down-family at its own share
        back = min(child[down], step * shares[up] / max(shares[down], 1e-6))
        step = back * shares[down] / max(shares[up], 1e-6)  # the down-family may have had less to give
        if step <= 1e-4:
            continue
        child[up] = round(child[up] + step, 4)
        child[down] = round(child[down] - back, 4)
        moves.append(f"{up} +{step:.3f}, {down} -{back:.3f}")
    return child, moves


def _key(g: dict[str, float]) -> tuple[float, ...]:
    return tuple(round(v, 3) for _, v in sorted(g.items()))


def search_report(history: list[Attempt]) -> dict[str, Any]:
    """Per origin (seed / mutation / llm): proposed, measured, failed, fell back, became the best (the
    journal's account of which proposals survived), and the generations run."""
    best_so_far, became = None, set()
    for a in history:
        if a.feasible and a.score is not None and (best_so_far is None or a.score > best_so_far):
            best_so_far = a.score
            became.add(a.index)
    out: dict[str, Any] = {}
    for origin, label in ORIGINS.items():
        rs = [a for a in history if _p(a, "origin") == origin]
        if rs:
            out[label] = {"proposed": len(rs), "measured": sum(1 for a in rs if a.score is not None and a.verdict != "repeat"),
                          "failed": sum(1 for a in rs if a.verdict == "failed"),
                          "repeats": sum(1 for a in rs if a.verdict == "repeat"),
                          "fallbacks": sum(1 for a in rs if a.fallback_reason),
                          "became_best": sum(1 for a in rs if a.index in became)}
    gens = [int(_p(a, "gen")) for a in history if _p(a, "gen") >= 0]
    out["generations"] = (max(gens) + 1) if gens else 0
    return out


class PruneEvolveStrategist:
    """(1+lambda) elitist search over per-family ratios; see the module docstring."""

    kinds = ("prune",)
    explores = True  # jobs.prune.search_settings: every round a measured candidate, no early stop

    def __init__(self, lam: int = 4, seeds: int = 3, client: Any = None, every: int = 4) -> None:
        self.lam, self.seeds = max(1, lam), max(1, seeds)
        self.client, self.every = client, max(1, every)
        self.name = "evolve" if client is None else f"evolve+llm:{getattr(client, 'name', type(client).__name__)}"
        self.sensitivity = SensitivityStrategist()

    # -- search state, all of it read from the history
    def _generation(self, hist: list[Attempt]) -> tuple[int, int]:
        """(current generation, offspring it already has)."""
        evo = [int(_p(a, "gen")) for a in hist if _p(a, "gen") >= 0]
        if not evo:
            return 0, 0
        gen = max(evo)
        n = evo.count(gen)
        return (gen + 1, 0) if n >= self.lam else (gen, n)

    @staticmethod
    def _parent(hist: list[Attempt], gen: int) -> Attempt | None:
        """The best feasible attempt recorded before generation `gen` began (ties: the earliest)."""
        pool = [a for a in hist if a.feasible and a.score is not None and _p(a, "gen") < gen]
        return max(pool, key=lambda a: (a.score, -a.index), default=None)

    @staticmethod
    def _seeded(hist: list[Attempt]) -> int:
        """Attempts that are not offspring: the seeds, and whatever came before (a user plan, a warm start,
        another strategist's attempts on a resumed run) all form the starting population."""
        return sum(1 for a in hist if _p(a, "gen") < 0)

    # -- proposals
    def propose(self, ctx: Context) -> Plan | None:
        fams = [f["family"] for f in _families(ctx.profile)]
        hist = ctx.history
        if not fams:
            return Plan(default_ratio=0.5, round_to=8, rationale="no family profile: uniform",
                        params={"origin": SEED})
        if self._seeded(hist) < self.seeds:
            return self._seed(ctx)
        gen, n = self._generation(hist)
        parent = self._parent(hist, gen)
        if parent is None:  # nothing feasible yet: keep seeding with the sensitivity line search
            return self._seed(ctx)
        rng = random.Random(f"evolve-prune:{ctx.seed}:{len(hist)}")
        params = {"gen": float(gen), "parent": float(parent.index)}
        slot = sum(1 for a in hist if _p(a, "gen") >= 0)
        if self.client is not None and slot % self.every == self.every - 1:
            return self._steered(ctx, fams, parent, rng, params)
        return self._mutation(ctx, fams, parent, rng, params)

    def independent(self, ctx: Context) -> int:
        """The rest of a generation's offspring (each is a mutation of the same parent), up to an LLM slot, capped
        by the rounds left; 1 while seeding (the sensitivity seeds after the first read earlier results)."""
        hist = ctx.history
        if self._seeded(hist) < self.seeds:
            return 1
        gen, n = self._generation(hist)
        if self._parent(hist, gen) is None:
            return 1
        k = self.lam - n
        if self.client is not None:
            slot = sum(1 for a in hist if _p(a, "gen") >= 0)
            for j in range(k):
                if (slot + j) % self.every == self.every - 1:
                    k = max(1, j)
                    break
        rounds, done = ctx.step.get("rounds"), ctx.step.get("round", len(hist))
        return max(1, min(k, int(rounds) - int(done))) if rounds is not None else max(1, k)

    def _seed(self, ctx: Context) -> Plan:
        if not ctx.history:
            return Plan(default_ratio=0.5, round_to=8, importance="l2", params={"origin": SEED},
                        rationale="evolve seed: uniform shape (every family loses the same fraction)")
        plan = self.sensitivity.propose(ctx)
        return plan.model_copy(update={"params": {**plan.params, "origin": SEED},
                                       "rationale": f"evolve seed: {plan.rationale}"})

    def _plan(self, child: dict[str, float], parent: Attempt, rationale: str, params: dict[str, float],
              origin: float) -> Plan:
        imp = (parent.plan or {}).get("importance", "l2")
        return Plan(ratios=child, default_ratio=0.0, round_to=ROUND_TO, importance=imp if imp != "random" else "l2",
                    rationale=rationale, params={**params, "origin": origin})

    def _mutation(self, ctx: Context, fams: list[str], parent: Attempt, rng: random.Random,
                  params: dict[str, float]) -> Plan:
        key = cost_key(ctx.budget)
        shares = {f["family"]: max(1e-6, float(f.get(key, 0.0))) for f in _families(ctx.profile)}
        base = genome(parent, fams)
        units = level_units(ctx.profile, (ctx.step.get("user_constraints") or {}).get("round_to") or ROUND_TO)
        seen = {_key(genome(a, fams, scaled=sc)) for a in ctx.history if a.plan for sc in (True, False)}
        child, moves = base, []
        for _ in range(20):  # a child already tried teaches nothing: draw again
            child, moves = mutate(base, shares, rng, units)
            if moves and _key(child) not in seen:
                break
        what = "; ".join(moves) or "no room to move"
        return self._plan(child, parent, f"mutation of #{parent.index} (score {parent.score:.4f}): {what}", params,
                          MUTATION)

    def _steered(self, ctx: Context, fams: list[str], parent: Attempt, rng: random.Random,
                 params: dict[str, float]) -> Plan:
        """One offspring slot answered by the LLM analyst, which reads the search state as the monitor's guidance."""
        from .analyst import LLMAnalyst

        view = search_view(ctx.history, parent, fams)
        sub = dataclasses.replace(ctx, step={**ctx.step, "guidance": list(ctx.step.get("guidance") or []) + view})
        fallback = MutationFallback(lambda: self._mutation(ctx, fams, parent, rng, params))
        plan = LLMAnalyst(self.client, fallback).propose(sub)
        ctx.fallback_reason = sub.fallback_reason
        assert plan is not None  # the fallback always answers
        if sub.fallback_reason:
            return plan
        child = {f: round(min(MAX_RATIO, max(0.0, plan.ratio_for(f, f))), 4) for f in fams}
        out = self._plan(child, parent, f"LLM proposal for #{parent.index}: {plan.rationale}"[:2000], params, LLM)
        return out.model_copy(update={"source": plan.source, "importance": plan.importance,
                                      "protected": plan.protected})


def search_view(history: list[Attempt], parent: Attempt, fams: list[str], k: int = 6) -> list[str]:
    """The search state in a few lines the analyst reads as guidance: the best so far and the last offspring."""
    best = genome(parent, fams)
    lines = [f"evolutionary search: the best so far is attempt {parent.index} (score {parent.score:.4f}) with "
             f"effective ratios {best}; propose per-family ratios that change it where you expect accuracy to "
             "improve at the same budget (the projector rescales to the budget); your plan competes with random "
             "mutations on the same score"]
    for a in [a for a in history if _p(a, "gen") >= 0][-k:]:
        lines.append(f"offspring {a.index} ({ORIGINS.get(_p(a, 'origin'), '?')}): "
                     f"{'score %.4f' % a.score if a.score is not None else a.verdict}; {a.rationale[:160]}")
    return lines
