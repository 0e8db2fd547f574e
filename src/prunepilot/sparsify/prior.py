"""Learning across runs for the sparsify job: what a finished run records in the history store, and the warm
start a new run takes from the nearest earlier run on a matching model.

The warm start is the earlier run's best allocation as a shape (per layer when the model is the same one, per
group otherwise), proposed once as the first re-allocation at the target; the projector shifts it onto this
run's sparsity exactly. It then competes like any candidate: an earlier run that does not transfer costs one
evaluation. Which warm start a run took is written into its journaled config, so a resumed run takes the same
one even when the store changed in between.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

from ..attempt import Attempt
from ..history import Fingerprint, History, PriorRun
from ..plan import Plan
from .calibrate import LinearInfo

KIND = "sparsify"


def fingerprint(model: Any, infos: list[LinearInfo]) -> Fingerprint:
    """Architecture family (config.model_type, else the class) and the linears' names and sizes."""
    family = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return Fingerprint.of(KIND, str(family), {i.name: i.params for i in infos}, float(sum(i.params for i in infos)))


def _valid(r: float) -> bool:
    return math.isfinite(r) and 0.0 <= r <= 1.0


def warm_plan(prior: PriorRun, fp: Fingerprint, infos: list[LinearInfo], groups: dict[str, list[str]]) -> Plan | None:
    """The prior's shape in this model's names, or None when nothing of it applies here."""
    names = {i.name for i in infos}
    ratios: dict[str, float] = {}
    if prior.fingerprint.structure == fp.structure:  # the same linears: the exact per-layer shape
        ratios = {n: r for n, r in prior.layers.items() if n in names and _valid(r)}
    if not ratios:
        ratios = {g: r for g, r in prior.plan_shape.items() if g in groups and _valid(r)}
    if not ratios:
        return None
    at = ", ".join(f"{k} {v:.0%}" for k, v in prior.budget.items())
    return Plan(ratios=ratios, source="history",
                rationale=f"warm start: the best allocation of run {prior.run_id} ({at}, probe KL {-prior.score:.4f}), "
                          f"shifted onto this run's target")


def lookup(store: History, fp: Fingerprint, target: float, infos: list[LinearInfo],
           groups: dict[str, list[str]]) -> tuple[list[PriorRun], Plan | None]:
    """The comparable earlier runs nearest this target, and the warm start taken from the first of them."""
    priors = store.nearest(fp, {"sparsity": target})
    return priors, warm_plan(priors[0], fp, infos, groups) if priors else None


def record(store: History, fp: Fingerprint, run_id: str, target: float, best: Attempt | None, history: list[Attempt],
           infos: list[LinearInfo], counts: dict[str, int], perplexity: float, strategist: str,
           log: Callable[[str], None]) -> None:
    """One finished run into the store; a store that cannot be written is said, never fatal."""
    from .. import __version__
    from ..errors import PrunepilotError

    if best is None or "probe_kl" not in best.metrics:
        return
    kl = float(best.metrics["probe_kl"])
    prior = PriorRun(run_id=run_id, created=time.time(), fingerprint=fp, budget={"sparsity": target},
                     plan_shape={g: round(float(r), 6) for g, r in best.projected.items()},
                     layers={i.name: round(counts.get(i.name, 0) / i.params, 6) for i in infos},
                     outcome={"probe_kl": kl, "perplexity": perplexity}, score=-kl, attempts=len(history),
                     rounds_to_best=best.index + 1, strategist=strategist, prunepilot_version=__version__)
    try:
        store.record(prior)
    except PrunepilotError as exc:  # learning is a bonus: a finished run never fails over it
        log(f"history not recorded: {exc}")
