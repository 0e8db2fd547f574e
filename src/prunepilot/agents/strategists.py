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
        shares = [max(1e-6, f.get(by, 0.0)) for f in fams]
        mean_share = sum(shares) / len(shares)
        raw = {}
        for f, share in zip(fams, shares):
            z = float(f.get("sensitivity_z", 0.0))
            raw[f["family"]] = math.exp(-alpha * z) * (share / mean_share) ** beta
        top = max(raw.values())
        ratios = {k: round(min(MAX_RATIO, 0.6 * v / top), 4) for k, v in raw.items()}
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
