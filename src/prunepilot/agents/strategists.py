"""Built-in strategists. Each is stateless: `propose(profile, budget, history, seed=)` -> Plan, reading
everything it needs from its arguments (history comes from the journal), like an optuna sampler over storage."""

from __future__ import annotations

import math
from typing import Any

from ..plan import MAX_RATIO, Plan


def _families(profile: dict) -> list[dict[str, Any]]:
    return list(profile.get("families", []))


class UniformStrategist:
    """Every group loses the same fraction; the projector finds the fraction. Importance varies by round."""

    name = "uniform"

    def propose(self, profile: dict, budget: dict, history: list[dict], *, seed: int = 0) -> Plan:
        return Plan(default_ratio=0.5, round_to=8, importance="l2",
                    rationale="uniform shape: every group loses the same fraction of channels")


class GridStrategist:
    """AgenticPruner's grid-search baseline: walk a fixed grid of (importance, rounding) for a uniform shape."""

    name = "grid"
    GRID = [("l2", 8), ("l1", 8), ("taylor", 8), ("l2", 16), ("l1", 16), ("taylor", 16), ("l2", 4), ("random", 8)]

    def propose(self, profile: dict, budget: dict, history: list[dict], *, seed: int = 0) -> Plan:
        imp, rt = self.GRID[len(history) % len(self.GRID)]
        return Plan(default_ratio=0.5, importance=imp, round_to=rt, rationale=f"grid point {len(history)}: {imp}, round_to={rt}")


class SensitivityStrategist:
    """Prune where it is cheap: families whose measured sensitivity is low and whose MAC share is high lose more.

    shape_f = exp(-alpha * z_sens_f) * (macs_share_f / mean share)^beta, with (alpha, beta) walked from history:
    round 0 uses a moderate setting; later rounds move alpha towards the setting of the best attempt so far
    and probe around it (a deterministic 1-D line search on how strongly to trust the sensitivity profile).
    """

    name = "sensitivity"
    ALPHAS = [0.6, 1.2, 0.3, 1.8, 0.9, 2.4, 0.0, 1.5]

    def propose(self, profile: dict, budget: dict, history: list[dict], *, seed: int = 0) -> Plan:
        fams = _families(profile)
        alpha, beta, importance = self._setting(history)
        if not fams:
            return Plan(default_ratio=0.5, round_to=8, importance=importance, rationale="no family profile: uniform")
        shares = [max(1e-6, f.get("macs_share", 0.0)) for f in fams]
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
            rationale=f"sensitivity-weighted shape (alpha={alpha}, beta={beta}): insensitive, MAC-heavy families lose more",
        )

    def _setting(self, history: list[dict]) -> tuple[float, float, str]:
        k = len(history)
        scored = [h for h in history if h.get("within_band") and h.get("metrics", {}).get("accuracy") is not None]
        beta = 0.5
        if k < 2 or not scored:
            return self.ALPHAS[k % len(self.ALPHAS)], beta, "l2"
        best = max(scored, key=lambda h: h["metrics"]["accuracy"])
        a_best = _alpha_of(best)
        step = 0.3 * (1 + (k % 3))
        alpha = max(0.0, a_best + (step if k % 2 else -step))
        tried = {round(_alpha_of(h), 3) for h in history}
        if round(alpha, 3) in tried:
            alpha = self.ALPHAS[k % len(self.ALPHAS)]
        return round(alpha, 3), beta, "l2" if k % 4 != 3 else "l1"


def _alpha_of(attempt: dict) -> float:
    import re

    m = re.search(r"alpha=([0-9.]+)", attempt.get("plan", {}).get("rationale", ""))
    return float(m.group(1)) if m else -1.0


class OptunaStrategist:
    """TPE over per-family ratios through optuna's ask/tell; the study is rebuilt from history each call."""

    name = "optuna"

    def propose(self, profile: dict, budget: dict, history: list[dict], *, seed: int = 0) -> Plan:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        fams = [f["family"] for f in _families(profile)]
        dist = {f: optuna.distributions.FloatDistribution(0.05, MAX_RATIO) for f in fams}
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed + len(history), n_startup_trials=3))
        for h in history:
            ratios = h.get("plan", {}).get("ratios", {})
            params = {f: min(MAX_RATIO, max(0.05, float(ratios.get(f, 0.5)))) for f in fams}
            acc = h.get("metrics", {}).get("accuracy")
            if acc is None or not h.get("within_band"):
                acc = 0.0
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dist, value=float(acc)))
        trial = study.ask(dist)
        ratios = {f: round(trial.params[f], 4) for f in fams}
        return Plan(ratios=ratios, default_ratio=0.0, round_to=8, importance="l2",
                    rationale=f"TPE sample #{len(history)} over per-family ratios")


BUILTINS = {
    "uniform": UniformStrategist,
    "grid": GridStrategist,
    "sensitivity": SensitivityStrategist,
    "optuna": OptunaStrategist,
}


def make_builtin(name: str):
    from ..errors import PrunepilotError

    if name not in BUILTINS:
        raise PrunepilotError("unknown built-in strategist", name, f"use one of {', '.join(BUILTINS)} or an LLM spec")
    return BUILTINS[name]()
