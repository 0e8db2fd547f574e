"""Built-in strategists of the prune job. Each is stateless: `propose(ctx) -> Plan`, reading everything it needs
from the Context (history comes from the journal), like an optuna sampler over storage."""

from __future__ import annotations

import math
from typing import Any

from ..attempt import Attempt
from ..plan import MAX_RATIO, Plan
from .context import Context


def _families(profile: dict) -> list[dict[str, Any]]:
    return list(profile.get("families", []))


def _accuracy(a: Attempt) -> float | None:
    return a.quality if a.within_band else None


class UniformStrategist:
    """Every group loses the same fraction (L2 importance); the projector finds the fraction."""

    name = "uniform"
    kinds = ("prune",)

    def propose(self, ctx: Context) -> Plan:
        return Plan(default_ratio=0.5, round_to=8, importance="l2",
                    rationale="uniform shape: every group loses the same fraction of channels")


class GridStrategist:
    """AgenticPruner's grid-search baseline: walk a fixed grid of (importance, rounding) for a uniform shape."""

    name = "grid"
    kinds = ("prune",)
    GRID = [("l2", 8), ("l1", 8), ("taylor", 8), ("l2", 16), ("l1", 16), ("taylor", 16), ("l2", 4), ("random", 8)]

    def independent(self, ctx: Context) -> int:
        """Every grid point depends on its position only: the rest of the rounds can be measured at once."""
        return max(1, int(ctx.step.get("rounds", len(ctx.history) + 1)) - len(ctx.history))

    def propose(self, ctx: Context) -> Plan:
        k = len(ctx.history)
        imp, rt = self.GRID[k % len(self.GRID)]
        return Plan(default_ratio=0.5, importance=imp, round_to=rt, rationale=f"grid point {k}: {imp}, round_to={rt}")


class SensitivityStrategist:
    """Prune where it is cheap: families whose measured sensitivity is low and whose cost share is high lose more.

    shape_f = exp(-alpha * z_sens_f) * (share_f / mean share)^beta, with (alpha, beta) walked from history, where
    the share is of MACs, or of measured latency (the device's latency tables) when the budget targets latency:
    round 0 uses a moderate setting; later rounds move alpha towards the setting of the best attempt so far
    and probe around it (a deterministic 1-D line search on how strongly to trust the sensitivity profile).
    """

    name = "sensitivity"
    kinds = ("prune",)
    ALPHAS = [0.6, 1.2, 0.3, 1.8, 0.9, 2.4, 0.0, 1.5]

    def independent(self, ctx: Context) -> int:
        """The first two rounds are fixed settings (the line search starts from their results)."""
        return max(1, 2 - len(ctx.history))

    def propose(self, ctx: Context) -> Plan:
        fams = _families(ctx.profile)
        alpha, beta, importance = self._setting(ctx.history)
        if not fams:
            return Plan(default_ratio=0.5, round_to=8, importance=importance, rationale="no family profile: uniform")
        by = "latency_share" if "latency_ms" in (ctx.budget.get("targets") or {}) else "macs_share"
        ratios = sensitivity_ratios(fams, alpha, beta, by)
        return Plan(
            ratios=ratios,
            default_ratio=0.0,
            round_to=8,
            importance=importance,
            rationale=f"sensitivity-weighted shape (alpha={alpha}, beta={beta}): insensitive families heavy in "
                      f"{'measured latency' if by == 'latency_share' else 'MACs'} lose more",
            params={"alpha": alpha, "beta": beta},
        )

    def _setting(self, history: list[Attempt]) -> tuple[float, float, str]:
        k = len(history)
        scored = [a for a in history if _accuracy(a) is not None]
        beta = 0.5
        if k < 2 or not scored:
            return self.ALPHAS[k % len(self.ALPHAS)], beta, "l2"
        best = max(scored, key=lambda a: _accuracy(a) or 0.0)
        a_best = _alpha_of(best)
        step = 0.3 * (1 + (k % 3))
        alpha = max(0.0, a_best + (step if k % 2 else -step))
        tried = {round(_alpha_of(a), 3) for a in history}
        if round(alpha, 3) in tried:
            alpha = self.ALPHAS[k % len(self.ALPHAS)]
        return round(alpha, 3), beta, "l2" if k % 4 != 3 else "l1"


def sensitivity_ratios(fams: list[dict[str, Any]], alpha: float, beta: float, by: str) -> dict[str, float]:
    """The sensitivity shape: exp(-alpha z) x (share / mean share)^beta per family, its largest ratio 0.6."""
    shares = [max(1e-6, f.get(by, 0.0)) for f in fams]
    mean_share = sum(shares) / len(shares)
    raw = {f["family"]: math.exp(-alpha * float(f.get("sensitivity_z", 0.0))) * (share / mean_share) ** beta
           for f, share in zip(fams, shares)}
    top = max(raw.values())
    return {k: round(min(MAX_RATIO, 0.6 * v / top), 4) for k, v in raw.items()}


def _cost_metric(ctx: Context) -> tuple[str, float]:
    """(the profile's share column of the binding metric, the fraction of dense the budget removes in it)."""
    targets = ctx.budget.get("targets") or {}
    dense = ctx.profile.get("dense", {}) if isinstance(ctx.profile, dict) else {}
    for metric, col in (("latency_ms", "latency_share"), ("macs", "macs_share"), ("params", "params_share")):
        if metric in targets and dense.get(metric):
            return col, max(0.0, 1.0 - float(targets[metric]["goal"]) / float(dense[metric]))
    return "macs_share", 0.0


class BlockStrategist:
    """Skip whole residual blocks where that is cheap, narrow channels for the rest (HALP's value per cost, with
    MDP's block removal). Blocks are ranked by the score measured lost when each alone is skipped, per share of
    the budget's metric it removes (measured latency for a latency budget: skipping a block also removes its
    per-op overhead, which no channel cut does); the cheapest are skipped until they cover `block_share` of the
    reduction the budget needs, and the sensitivity shape narrows channels for the remainder.

    The search is over distinct sets of skipped blocks first (`block_share` 1/2, 1/4, 3/4, then outwards from the
    best attempt's share; a share that yields a set already measured is passed over), then over the channel
    shape's alpha for the best set, so no round is spent on an allocation measured before."""

    name = "blocks"
    kinds = ("prune",)
    reads_blocks = True  # jobs.prune.profile_blocks measures what skipping each block costs before round 0
    FIRST = (0.5, 0.25, 0.75)
    GRID = tuple(i / 16 for i in range(17))
    ALPHA = 0.6

    def independent(self, ctx: Context) -> int:
        return max(1, 3 - len(ctx.history))

    def propose(self, ctx: Context) -> Plan:
        col, need = _cost_metric(ctx)
        blocks = [b for b in (ctx.profile.get("blocks") or []) if "score_drop" in b and b.get(col, 0) > 0]
        if not blocks:  # nothing to skip (or no measured cost of skipping): the channel search alone
            plan = SensitivityStrategist().propose(ctx)
            return plan.model_copy(update={"rationale": "no skippable residual block with a measured score drop: "
                                                        + plan.rationale})
        ranked = sorted(blocks, key=lambda b: max(0.0, float(b["score_drop"])) / float(b[col]))
        tried = {(tuple(sorted((a.plan or {}).get("skip") or [])), round(float(a.plan_params.get("alpha", -1)), 3))
                 for a in ctx.history}
        best = self._best_share(ctx.history)
        shares = list(self.FIRST) + sorted(self.GRID, key=lambda s: (abs(s - (best if best is not None else 0.5)), s))
        for share in shares:
            chosen, covered = self._choose(ranked, col, share * need)
            if (tuple(sorted(chosen)), self.ALPHA) not in tried:
                return self._plan(ctx, chosen, covered, share, need, col, self.ALPHA)
        share = best if best is not None else self.FIRST[0]
        chosen, covered = self._choose(ranked, col, share * need)
        for alpha in SensitivityStrategist.ALPHAS:  # every distinct set measured: the channel shape for the best
            if (tuple(sorted(chosen)), round(alpha, 3)) not in tried:
                return self._plan(ctx, chosen, covered, share, need, col, alpha)
        return self._plan(ctx, chosen, covered, share, need, col, self.ALPHA)

    @staticmethod
    def _choose(ranked: list[dict[str, Any]], col: str, room: float) -> tuple[list[str], float]:
        chosen, covered = [], 0.0
        for b in ranked:  # greedy knapsack by value per cost: a block that does not fit is passed over
            if covered + b[col] <= room + 1e-9:
                chosen.append(b["block"])
                covered += b[col]
        return chosen, covered

    @staticmethod
    def _best_share(history: list[Attempt]) -> float | None:
        """The block_share of the best in-band attempt of this strategist."""
        scored = [a for a in history if _accuracy(a) is not None and "block_share" in a.plan_params]
        return float(max(scored, key=lambda a: _accuracy(a) or 0.0).plan_params["block_share"]) if scored else None

    @staticmethod
    def _plan(ctx: Context, chosen: list[str], covered: float, share: float, need: float, col: str, alpha: float) -> Plan:
        fams = _families(ctx.profile)
        by = "latency_share" if col == "latency_share" else "macs_share"
        ratios = sensitivity_ratios(fams, alpha, 0.5, by) if fams else {}
        why = (f"skip {len(chosen)} residual block(s) covering {covered:.1%} of dense {col.split('_')[0]} "
               f"({share:.0%} of the {need:.1%} to remove; least score lost per share), channels for the rest "
               f"(sensitivity shape, alpha={alpha})")
        return Plan(ratios=ratios, default_ratio=0.0 if ratios else 0.5, round_to=8, skip=chosen, rationale=why,
                    params={"block_share": share, "alpha": alpha, "beta": 0.5})


def _alpha_of(attempt: Attempt) -> float:
    """The alpha an attempt used (-1 when it was not this strategist's: a user plan, a warm start)."""
    return float(attempt.plan_params.get("alpha", -1.0))


class OptunaStrategist:
    """TPE over per-family ratios through optuna's ask/tell; the study is rebuilt from history each call."""

    name = "optuna"
    kinds = ("prune",)

    def propose(self, ctx: Context) -> Plan:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        history = ctx.history
        fams = [f["family"] for f in _families(ctx.profile)]
        dist = {f: optuna.distributions.FloatDistribution(0.05, MAX_RATIO) for f in fams}
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=ctx.seed + len(history), n_startup_trials=3))
        for a in history:
            ratios = (a.plan or {}).get("ratios", {})
            params = {f: min(MAX_RATIO, max(0.05, float(ratios.get(f, 0.5)))) for f in fams}
            score = _accuracy(a)
            if score is None:  # failed or outside the band: a failed trial, not a zero score that skews TPE
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dist,
                                                          state=optuna.trial.TrialState.FAIL))
            else:
                study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=float(score)))
        trial = study.ask(dist)
        ratios = {f: round(trial.params[f], 4) for f in fams}
        return Plan(ratios=ratios, default_ratio=0.0, round_to=8, importance="l2",
                    rationale=f"TPE sample #{len(history)} over per-family ratios")
