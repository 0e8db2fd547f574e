"""The sparsify job: an LLM's global sparsity allocated per layer, as phases of the one loop.

Ramp: the strategist proposes the next level's allocation; a step whose probe perplexity rises more than
`threshold` over the last checkpoint is rolled back, after `patience` rollbacks in a row the step halves,
below `min_step` the least-bad candidate is forced, so the ramp always ends exactly at the target.
Reference: uniform at the target is measured, so the result is never worse than uniform on the probe.
Refine: re-allocations at the target; the lowest probe KL to the dense model is kept. A search strategist
(evolve) may skip the ramp (`ramp=False`: uniform at the target is then the first, accepted candidate) and may
screen a candidate on the first few probe sequences (plan.params["probe_seqs"]): a screened attempt is
recorded as 'worse' and never becomes the best; only full-probe scores compete. `evals` bounds the measured
evaluations of the run (any probe size; a repeated allocation is not measured again and costs none); the
ramp and the uniform reference always run, the refine phase stops when the budget is spent.

Trial allocations come from the Wanda mask bank, or with search_masks="sparsegpt" from a database of SparseGPT-pruned
levels (sparsify/sgpt_bank.py): one forward pass over the probe per attempt either way. Every bit of
loop state (checkpoint, step size, best so far) is folded from the recorded attempts, so a killed run
continues exactly where it stopped."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..attempt import Attempt
from ..loop import Judgement, Outcome, Step
from ..errors import PlanError
from ..plan import Plan
from ..sparsify.calibrate import LinearInfo
from ..sparsify.loop import Probe, ProbeScore, groups_pushed
from ..sparsify.plan import MAX_RATIO, counts_to_ratios, global_sparsity, project, resolve
from ..sparsify.profile import LayerBank, SensitivityProfile, WandaBank

KIND = "sparsify"
WARM = "history"  # the source (and so the attempt's strategist) of the warm start from an earlier run


@dataclass
class RampSettings:
    target: float
    step: float = 0.1
    min_step: float = 0.02
    threshold: float = 0.15  # allowed probe-perplexity rise per ramp checkpoint (ratio - 1)
    patience: int = 2  # rollbacks in a row before the step halves
    max_iters: int = 24  # ramp iterations at most
    refine_iters: int = 8  # re-allocations tried at the target
    ramp: bool = True  # False: start at the target (a search strategist needs no ramp)
    evals: int | None = None  # measured evaluations at most (None: refine_iters decides)


@dataclass
class LoopState:
    """Everything the loop knows, folded from the attempts."""

    phase: str
    current: list[int]  # ramp checkpoint counts (infos order)
    ckpt: ProbeScore
    step: float
    in_a_row: int = 0
    ramp_iters: int = 0
    best_rejected: tuple[ProbeScore, list[int]] | None = None
    best: tuple[ProbeScore, list[int]] | None = None  # at the target
    best_index: int | None = None
    refine_done: int = 0
    rollbacks: int = 0
    uniform: ProbeScore | None = None
    evals: int = 0  # measured evaluations (any probe size), cached repeats excluded
    screened: int = 0  # of which on part of the probe
    extra: dict[str, Any] = field(default_factory=dict)


def _score(a: Attempt) -> ProbeScore:
    return ProbeScore(a.metrics["probe_nll"], a.metrics["probe_kl"])


def measured(a: Attempt) -> bool:
    """The attempt ran the probe (a repeated allocation reuses the earlier score and costs no evaluation)."""
    return "probe_kl" in a.metrics and not a.extra.get("cached", False)


class Counts(list):
    """A projected allocation (prune counts per layer, infos order) and the probe sequences to score it on
    (None: the whole probe). A list, so callers that only need the counts read it as one."""

    probe_seqs: int | None = None
    measured: ProbeScore | None = None  # scored by a worker already (loop/executor.py)


class SparsifyJob:
    kind = KIND

    def __init__(self, model: nn.Module, bank: LayerBank, infos: list[LinearInfo], profile: SensitivityProfile,
                 probe: Probe, cfg: RampSettings, budget: dict[str, Any], warm_start: Plan | None = None) -> None:
        self.model, self.bank, self.infos, self.profile, self.probe = model, bank, infos, profile, probe
        self.cfg, self.budget, self.warm_start = cfg, budget, warm_start
        self.total = sum(i.params for i in infos)
        self.target_count = int(round(cfg.target * self.total))
        self.uniform_counts = [project({}, infos, cfg.target)[i.name] for i in infos]
        self.full_seqs = int(getattr(probe, "n_seqs", 1))

    # ------------------------------------------------------------------------------------------- state
    def fold(self, history: list[Attempt]) -> LoopState:
        c = self.cfg
        st = LoopState("ramp", [0] * len(self.infos), self.probe.dense, c.step)
        if not c.ramp:
            st.current = list(self.uniform_counts)
        for a in history:
            counts = a.allocation.get("counts")
            if measured(a):
                st.evals += 1
                st.screened += int(a.metrics.get("probe_seqs", self.full_seqs) < self.full_seqs)
            if a.phase == "ramp":
                st.ramp_iters += 1
                if counts is None:
                    continue  # a failed attempt moves nothing
                if a.verdict in ("accept", "forced"):
                    st.current, st.ckpt, st.in_a_row, st.best_rejected = counts, _score(a), 0, None
                else:
                    st.rollbacks += 1
                    st.in_a_row += 1
                    if st.best_rejected is None or a.metrics["probe_nll"] < st.best_rejected[0].nll:
                        st.best_rejected = (_score(a), counts)
                    if st.in_a_row >= c.patience:
                        st.step /= 2
                        st.in_a_row = 0
                        if st.step < c.min_step and st.best_rejected is not None:
                            st.ckpt, st.current = st.best_rejected  # keep the least-bad candidate
                            st.best_rejected, st.step = None, c.min_step
            elif a.phase == "reference" and counts is not None:
                st.uniform = _score(a)
                if not c.ramp:
                    st.ckpt = _score(a)
                if a.verdict == "accept":
                    st.best, st.best_index = (_score(a), counts), a.index
            elif a.phase == "refine":
                st.refine_done += 1
                if a.verdict == "exhausted":
                    st.refine_done = c.refine_iters
                elif a.verdict == "accept" and counts is not None:
                    st.best, st.best_index = (_score(a), counts), a.index
                elif a.verdict == "rollback":
                    st.rollbacks += 1
            if a.phase == "ramp" and sum(st.current) >= self.target_count and st.best is None:
                st.best, st.best_index = (st.ckpt, st.current), _index_of(history, st.current)
        if sum(st.current) < self.target_count:
            return st
        has_reference = any(a.phase == "reference" and a.allocation.get("counts") for a in history)
        if not c.ramp and not has_reference:
            st.phase = "reference"  # the search starts from uniform at the target, measured first
            return st
        if st.best is None:
            st.best = (st.ckpt, st.current)
        reference_needed = c.refine_iters > 0 and self.uniform_counts != st.current
        budget_left = c.evals is None or st.evals < c.evals
        if reference_needed and not has_reference:
            st.phase = "reference"
        elif c.refine_iters > 0 and st.refine_done < c.refine_iters and budget_left:
            st.phase = "refine"
        else:
            st.phase = "done"
        if c.refine_iters > 0 and not reference_needed and st.uniform is None:
            st.uniform = st.best[0]
        return st

    def ratios(self, counts: list[int]) -> dict[str, float]:
        return counts_to_ratios(self.as_dict(counts), self.infos)

    def as_dict(self, counts: list[int]) -> dict[str, int]:
        return {i.name: n for i, n in zip(self.infos, counts)}

    # --------------------------------------------------------------------------------------- Job protocol
    def context_profile(self) -> SensitivityProfile:
        return self.profile

    def budget_json(self) -> dict[str, Any]:
        return self.budget

    def next_step(self, history: list[Attempt]) -> Step | None:
        st = self.fold(history)
        t = self.cfg.target
        if st.phase == "ramp":
            now = global_sparsity(self.ratios(st.current), self.infos)
            last_call = st.ramp_iters + 1 >= self.cfg.max_iters
            level = t if last_call else min(now + st.step, t)
            info = {"level": level, "target": t, "from_level": now, "last_call": last_call, "step_size": st.step,
                    "current": self.ratios(st.current)}
            return Step("ramp", info, none_ends_phase=False)  # no opinion on the ramp: climb uniformly
        if st.phase == "reference":
            plan = Plan(default_ratio=t, source="uniform", rationale="reference candidate: every layer at the target")
            start = st.best[1] if st.best else st.current
            return Step("reference", {"level": t, "target": t, "from_level": t, "current": self.ratios(start)}, plan=plan)
        if st.phase == "refine":
            assert st.best is not None
            info = {"level": t, "target": t, "from_level": t, "current": self.ratios(st.best[1]),
                    "probe_seqs": self.full_seqs, "evals": st.evals}
            if self.cfg.evals is not None:
                info["evals_left"] = self.cfg.evals - st.evals
            if self.warm_start is not None and not any(a.phase == "refine" and a.strategist == WARM for a in history):
                return Step("refine", info, plan=self.warm_start)  # an earlier run's best shape, tried once, first
            return Step("refine", info)
        return None

    def project(self, plan: Plan | None, step: Step) -> list[int]:
        level, current = step.info["level"], step.info["current"]
        desired = resolve(plan, self.infos, self.profile.groups, fallback=current) if plan else {i.name: level for i in self.infos}
        floor = current if step.phase == "ramp" else None
        counts = project(desired, self.infos, level, floor=floor, ceiling=MAX_RATIO)
        out = Counts(counts[i.name] for i in self.infos)
        seqs = plan.params.get("probe_seqs") if plan is not None and step.phase == "refine" else None
        if seqs is not None:
            if not (math.isfinite(seqs) and 1 <= seqs):
                raise PlanError("plan.params['probe_seqs'] must be a whole number of probe sequences >= 1", seqs,
                                f"ask for 1..{self.full_seqs}, or leave it out for the whole probe")
            out.probe_seqs = min(int(seqs), self.full_seqs)
        return out

    def evaluate(self, counts: list[int], step: Step, history: list[Attempt]) -> Outcome:
        st = self.fold(history)
        seqs = getattr(counts, "probe_seqs", None) or self.full_seqs
        measured_elsewhere = getattr(counts, "measured", None)  # by a worker (loop/executor.py)
        counts = list(counts)
        score = self._cached(counts, seqs, history)
        cached = score is not None  # a repeated allocation is not re-probed
        if score is None:
            score = measured_elsewhere
        if score is None:
            self.bank.apply(self.as_dict(counts))
            score = self.probe.measure(self.model, seqs)
        ref = st.ckpt if step.phase == "ramp" else (st.best[0] if st.best else st.ckpt)
        ratios = self.ratios(counts)
        achieved = sum(counts) / self.total
        metrics = {"probe_nll": score.nll, "probe_ppl": score.ppl, "probe_kl": score.kl, "sparsity": achieved,
                   "checkpoint_ppl": ref.ppl, "checkpoint_kl": ref.kl, "rise": math.exp(score.nll - ref.nll) - 1,
                   "probe_seqs": float(seqs)}
        extra: dict[str, Any] = {"cached": True} if cached else {}
        if step.phase == "ramp":
            extra["groups_pushed"] = groups_pushed(self.profile, step.info["current"], ratios)
        level = step.info["level"]
        err = (achieved - level) / level if level else achieved
        return Outcome(
            allocation={"counts": counts}, metrics=metrics,
            projected={r["group"]: r["sparsity"] for r in self.profile.group_table(ratios)},
            errors={"sparsity": err}, within_band=abs(sum(counts) - round(level * self.total)) <= len(self.infos),
            extra=extra,
        )

    def judge(self, step: Step, outcome: Outcome, history: list[Attempt]) -> Judgement:
        m = outcome.metrics
        st = self.fold(history)
        if step.phase == "ramp":
            thr = self.cfg.threshold
            if m["rise"] <= thr:
                return Judgement("accept", -m["probe_kl"])
            if step.info.get("last_call"):
                return Judgement("forced", -m["probe_kl"], f"forced: the ramp's last iteration (rise {m['rise']:.1%})")
            pushed = outcome.extra.get("groups_pushed") or []
            why = (f"rolled back: probe perplexity rose {m['rise']:.1%} (> {thr:.0%}) going "
                   f"{step.info['from_level']:.1%} -> {step.info['level']:.1%}; groups pushed hardest: {', '.join(pushed) or 'none'}")
            if st.in_a_row + 1 >= self.cfg.patience:
                why += f"; step halved to {st.step / 2:.3f}"
                if st.step / 2 < self.cfg.min_step:
                    why += "; the least-bad candidate so far is forced"
            return Judgement("rollback", -m["probe_kl"], why)
        if step.phase == "reference" and not self.cfg.ramp:
            return Judgement("accept", -m["probe_kl"], "uniform at the target: the search's starting point")
        best = st.best[0] if st.best else st.ckpt
        if step.phase == "refine" and st.best and outcome.allocation["counts"] == st.best[1]:
            return Judgement("repeat", -m["probe_kl"], "same allocation as the best so far; not measured again")
        seqs = int(m.get("probe_seqs", self.full_seqs))
        if seqs < self.full_seqs:
            return Judgement("worse", -m["probe_kl"], f"screened on {seqs} of {self.full_seqs} probe sequences (KL "
                                                      f"{m['probe_kl']:.4f}); only full-probe scores compete for the best")
        if m["probe_kl"] < best.kl:
            return Judgement("accept", -m["probe_kl"])
        return Judgement("rollback", -m["probe_kl"], f"rolled back: probe KL {m['probe_kl']:.4f} is not below the best so "
                                                     f"far ({best.kl:.4f}); perplexity {m['probe_ppl']:.2f} vs {best.ppl:.2f}")

    def _cached(self, counts: list[int], seqs: int, history: list[Attempt]) -> ProbeScore | None:
        return next((_score(a) for a in history if a.allocation.get("counts") == counts and "probe_kl" in a.metrics
                     and a.metrics.get("probe_seqs", self.full_seqs) == seqs), None)

    # ------------------------------------------- batches and Ray workers (loop/executor.py; Master._batch)
    @property
    def device_type(self) -> str:
        return next(self.model.parameters()).device.type

    def projects_alike(self, a: Step, b: Step) -> bool:
        """Whether project() maps any plan alike under both steps (it reads the phase, level and current)."""
        return a.phase == b.phase and all(a.info.get(k) == b.info.get(k) for k in ("level", "current"))

    def allocation_of(self, counts: list[int]) -> dict[str, Any]:
        return {"counts": list(counts)}

    def remote_task(self, counts: list[int], step: Step, history: list[Attempt]) -> tuple[list[int], int] | None:
        """(counts, probe sequences) for a worker to score; None when the history already holds that score."""
        seqs = getattr(counts, "probe_seqs", None) or self.full_seqs
        return None if self._cached(list(counts), seqs, history) is not None else (list(counts), seqs)

    def with_measurement(self, counts: "Counts", score: ProbeScore) -> "Counts":
        counts.measured = score
        return counts

    def worker_spec(self) -> "SparsifyWorker":
        if not isinstance(self.bank, WandaBank):  # run_sparsify refuses this before any work; a backstop
            raise PlanError("Ray workers score allocations from Wanda masks only", type(self.bank).__name__,
                            "measure in this process (workers=1), or use search_masks='wanda'")
        return SparsifyWorker(self.model, self.infos, self.probe, self.bank)

    def keep(self, index: int, outcome: Outcome) -> None:
        """Nothing to write: the allocation in the journal is the whole candidate (the final masks and weights are
        computed once, from the best allocation, by sequential calibration)."""

    def best(self, history: list[Attempt]) -> Attempt | None:
        st = self.fold(history)
        if st.best_index is None:
            return None
        return next((a for a in history if a.index == st.best_index), None)

    def best_counts(self, history: list[Attempt]) -> dict[str, int]:
        st = self.fold(history)
        return self.as_dict(st.best[1] if st.best else st.current)

    def summary(self, history: list[Attempt]) -> dict[str, Any]:
        st = self.fold(history)
        out: dict[str, Any] = {"iterations": len(history), "rollbacks": st.rollbacks, "evals": st.evals,
                               "evals_screened": st.screened, "evals_budget": self.cfg.evals}
        final = st.best[0] if st.best else st.ckpt
        for key, s in (("dense", self.probe.dense), ("final", final), ("uniform", st.uniform)):
            if s is not None:
                out[f"probe_ppl_{key}"], out[f"probe_kl_{key}"] = s.ppl, s.kl
        return out


def _index_of(history: list[Attempt], counts: list[int]) -> int | None:
    for a in reversed(history):
        if a.allocation.get("counts") == counts and a.verdict in ("accept", "forced"):
            return a.index
    for a in reversed(history):  # a forced least-bad candidate: the rollback attempt that measured it
        if a.allocation.get("counts") == counts:
            return a.index
    return None


class SparsifyWorker:
    """What a Ray worker needs to score allocations exactly as the job does here: the model (its placement hooks
    included), the probe with its dense log-probabilities, and the Wanda bank's dense weights and orders. Pickled
    once into Ray's object store; `build()` runs once per worker."""

    def __init__(self, model: nn.Module, infos: list[LinearInfo], probe: Probe, bank: WandaBank) -> None:
        self.model, self.infos, self.probe = model, infos, probe
        self.dense = {i.name: bank.dense[i.name] for i in infos}
        self.order = {i.name: bank.order[i.name] for i in infos}

    def build(self) -> "SparsifyWorker":
        from ..sparsify.calibrate import modules_by_name

        self.mods = modules_by_name(self.model, self.infos)
        self.applied: dict[str, int] = {}
        return self

    def measure(self, task: tuple[list[int], int]) -> ProbeScore:
        """Apply the allocation as WandaBank.apply does (lowest-Wanda weights of each row), score the probe."""
        import torch

        from ..engines import sparsity as sp

        counts, seqs = task
        with torch.no_grad():
            for info, k in zip(self.infos, counts):
                if self.applied.get(info.name) == k:
                    continue
                w = self.mods[info.name].weight
                dense = self.dense[info.name].to(w.device, copy=True)
                if k:
                    dense.mul_(sp.mask_from_order(self.order[info.name].to(w.device), k))
                w.copy_(dense)
                self.applied[info.name] = k
        return self.probe.measure(self.model, seqs)
