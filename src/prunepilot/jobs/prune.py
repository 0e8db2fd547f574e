"""The prune job: structured pruning of a vision model to a MAC/param budget, ranked by accuracy after an
equal short recovery. The Master runs it; `run_prune_search` wires profile, strategist, journal, history
and the final recovery / export / report."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..allocation import Allocation
from ..attempt import Attempt, quality_of, score_name
from ..budget import Budget, ResolvedBudget
from ..evaluate.scoring import Evaluator, ScoringConfig, measure_block_sensitivity, measure_sensitivity
from ..journal import open_run
from ..loop import Judgement, LoopLimits, Master, Outcome, Step
from ..pipeline import Candidate, Pruner
from ..plan import Plan
from ..results import write_json_atomic

KIND = "prune"
REPEAT_CAP = 3  # attempts per round at most when repeats do not use rounds (a strategist stuck on one shape)


@dataclass
class PruneSettings:
    rounds: int = 8
    patience: int = 4  # stop after this many rounds without a new best
    finetune_steps: int = 60
    eval_limit: int = 2000
    bn_batches: int = 20
    lr: float = 0.01
    batch_size: int = 128
    seed: int = 0
    sensitivity_ratio: float = 0.4
    finetune_epochs: float = 1.0  # final recovery of the winner
    kd: bool = True
    wall_time_s: float | None = None
    repeats_use_rounds: bool = True  # False: a round is a measured candidate (a repeat costs none; searches)

    def scoring(self) -> ScoringConfig:
        return ScoringConfig(finetune_steps=self.finetune_steps, eval_limit=self.eval_limit, bn_batches=self.bn_batches,
                             lr=self.lr, batch_size=self.batch_size, seed=self.seed)


@dataclass(frozen=True)
class UserConstraints:
    """What the user fixed on the command line or in Python: it overrides every strategist's choice."""

    protected: tuple[str, ...] = ()
    importance: str | None = None
    round_to: int | None = None
    prune_heads: bool | None = None
    plan: Plan | None = None  # the user's plan: the first candidate of the loop
    skip: tuple[str, ...] = ()  # residual blocks removed in every candidate

    def apply(self, plan: Plan) -> Plan:
        upd: dict[str, Any] = {"protected": sorted(set(plan.protected) | set(self.protected))}
        for key in ("importance", "round_to", "prune_heads"):
            if getattr(self, key) is not None:
                upd[key] = getattr(self, key)
        if self.round_to == 1:
            upd["round_to"] = None
        return plan.model_copy(update=upd).with_skip(self.skip)

    def to_json(self) -> dict[str, Any]:
        return {"protected": list(self.protected), "importance": self.importance, "round_to": self.round_to,
                "prune_heads": self.prune_heads, "plan": self.plan.model_dump() if self.plan else None,
                **({"skip": list(self.skip)} if self.skip else {})}


def divergence_guidance(history: list[Attempt]) -> list[str]:
    """Plain-code rules (as in AgenticPruner) whose findings the analyst reads as explicit guidance."""
    notes: list[str] = []
    if len(history) < 2:
        return notes
    accs = [a.quality for a in history]
    scored = [x for x in accs if x is not None]
    last = history[-1]
    for a in history[:-1]:
        if a.projected and a.projected == last.projected:
            notes.append(f"repeated plan: attempt {last.index} produced the same allocation as attempt {a.index}; try a different shape")
            break
    if scored and accs[-1] is not None and accs[-1] < 0.5 * max(scored):
        notes.append(f"accuracy collapse in attempt {last.index} ({accs[-1]:.3f} vs best {max(scored):.3f}): move back towards the best plan")
    best_i = max(range(len(accs)), key=lambda i: accs[i] if accs[i] is not None else -1)
    if scored and len(history) - 1 - best_i >= 3:  # stagnation needs something scored to stagnate from
        notes.append(f"stagnation: no improvement for {len(history) - 1 - best_i} attempts since attempt {history[best_i].index}")
    if len(scored) >= 4:
        d = [b - a for a, b in zip(scored, scored[1:])]
        flips = sum(1 for a, b in zip(d, d[1:]) if a * b < 0)
        if flips >= 0.4 * max(1, len(d) - 1) and flips >= 2:
            notes.append("oscillation: accuracy alternates up and down; make smaller changes around the best plan")
    return notes


def best_feasible(history: list[Attempt]) -> Attempt | None:
    ok = [a for a in history if a.feasible and a.score is not None]
    return max(ok, key=lambda a: (a.score, -a.index)) if ok else None


class PruneJob:
    kind = KIND

    def __init__(self, pruner: Pruner, budget: ResolvedBudget, evaluator: Evaluator, settings: PruneSettings,
                 out: Path, user: UserConstraints, warm_start: Plan | None = None, latency: Any = None) -> None:
        self.pruner, self.budget, self.evaluator, self.settings = pruner, budget, evaluator, settings
        self.out, self.user, self.warm_start = out, user, warm_start
        self.latency = latency  # a latency.job.LatencyTargeting when the budget has a latency goal
        self._profile = pruner.profile.compact()

    def context_profile(self) -> dict[str, Any]:
        return self._profile

    def budget_json(self) -> dict[str, Any]:
        return self.budget.to_json()

    def next_step(self, history: list[Attempt]) -> Step | None:
        s = self.settings
        done = len(history) if s.repeats_use_rounds else sum(1 for a in history if a.verdict != "repeat")
        if done >= s.rounds or len(history) >= REPEAT_CAP * s.rounds:
            return None
        best = best_feasible(history)
        if best is not None and len(history) - 1 - best.index >= s.patience:
            return None
        info = {"round": done, "rounds": s.rounds, "guidance": divergence_guidance(history),
                "user_constraints": self.user.to_json()}
        if not history and self.user.plan is not None:
            return Step("search", info, plan=self.user.plan.model_copy(update={"source": "user plan"}))
        if not history and self.warm_start is not None:
            return Step("search", info, plan=self.warm_start)
        return Step("search", info)

    def project(self, plan: Plan | None, step: Step) -> Candidate:
        plan = self.user.apply(plan or Plan(default_ratio=0.5, round_to=8))
        calibration = self.evaluator.taylor_batches() if plan.importance == "taylor" else None
        if self.latency is not None:  # projected on the latency tables, measured fresh, corrected once
            return self.latency.candidate(self.pruner, plan, self.budget, calibration=calibration)
        return self.pruner.candidate(plan, self.budget, calibration=calibration)

    def evaluate(self, cand: Candidate, step: Step, history: list[Attempt]) -> Outcome:
        allocation = {**cand.projection.allocation.to_json(), "importance": cand.plan.importance if cand.plan else None}
        same = next((a for a in history if a.allocation == allocation and a.metrics and a.verdict != "failed"), None)
        metrics = dict(cand.metrics)
        if same is not None:  # the same model again: its measurement stands, no second recovery is paid for
            metrics.update({k: v for k, v in same.metrics.items() if k not in metrics})
        elif getattr(cand, "measured", None) is not None:  # recovered and scored by a worker (loop/executor.py)
            metrics.update(cand.measured)
        else:
            metrics.update(self.evaluator.score(cand.model, self.settings.finetune_steps))
        goals = [m for m in self.budget.goals if m in metrics]
        return Outcome(
            allocation=allocation,
            projected=cand.projection.ratios(self.pruner.structure),
            metrics=metrics,
            errors={m: self.budget.error(m, metrics[m]) for m in goals},
            within_band=all(self.budget.within(m, metrics[m]) for m in goals),
            candidate=cand,
            extra={"predicted": cand.projection.predicted, "projection_reason": cand.projection.reason,
                   "scale": cand.projection.scale,
                   "corrections": cand.corrections, **({"repeat_of": same.index} if same is not None else {})},
        )

    # ------------------------------------------- batches and Ray workers (loop/executor.py; Master._batch)
    @property
    def device_type(self) -> str:
        return next(self.pruner.dense.parameters()).device.type

    def projects_alike(self, a: Step, b: Step) -> bool:
        return True  # project() reads the plan and the budget, never the step

    def allocation_of(self, cand: Candidate) -> dict[str, Any]:
        return {**cand.projection.allocation.to_json(), "importance": cand.plan.importance if cand.plan else None}

    def remote_task(self, cand: Candidate, step: Step, history: list[Attempt]) -> "PruneTask | None":
        allocation = self.allocation_of(cand)
        if any(a.allocation == allocation and a.metrics and a.verdict != "failed" for a in history):
            return None  # measured before: evaluate() reuses that measurement
        return PruneTask(allocation, cand.model)

    def with_measurement(self, cand: Candidate, result: tuple[dict[str, float], dict[str, Any]]) -> Candidate:
        metrics, state = result
        cand.model.load_state_dict(state)  # the worker's recovered weights: the candidate keep() writes
        cand.measured = metrics  # type: ignore[attr-defined]
        return cand

    def worker_spec(self) -> "PruneWorker":
        return PruneWorker(self.evaluator, self.settings.finetune_steps)

    def judge(self, step: Step, outcome: Outcome, history: list[Attempt]) -> Judgement:
        acc = quality_of(outcome.metrics)
        prev = best_feasible(history)
        if "repeat_of" in outcome.extra:
            return Judgement("repeat", acc, f"the same allocation as attempt {outcome.extra['repeat_of']}: not measured "
                             "again; propose a different shape (or importance) to learn something new")
        if not outcome.within_band:
            return Judgement("infeasible", acc, "outside the budget band: " + ", ".join(f"{m} {e:+.2%}" for m, e in outcome.errors.items()))
        better = prev is None or (acc or 0.0) > (prev.score or 0.0)
        return Judgement("best" if better else "worse", acc, _reflection(outcome, prev))

    def keep(self, index: int, outcome: Outcome) -> None:
        cand_dir = self.out / "candidates"
        cand_dir.mkdir(exist_ok=True)
        tmp = cand_dir / f"attempt-{index}.tmp"
        torch.save(outcome.candidate.model.state_dict(), tmp)  # tensors only: reloads with weights_only=True
        tmp.replace(cand_dir / f"attempt-{index}.pt")

    def best(self, history: list[Attempt]) -> Attempt | None:
        return best_feasible(history)

    def rebuild(self, attempt: Attempt) -> torch.nn.Module:
        """The kept candidate of `attempt`: the dense model pruned to its allocation, with its trained weights."""
        from ..engines.structured import apply_allocation

        path = self.out / "candidates" / f"attempt-{attempt.index}.pt"
        model = apply_allocation(copy.deepcopy(self.pruner.dense), self.pruner.x, self.pruner.structure,
                                 Allocation.from_json(attempt.allocation))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    def prune_stale_candidates(self, history: list[Attempt]) -> None:
        """Only the best candidate's weights are kept (others were written before a later best)."""
        best = best_feasible(history)
        for f in (self.out / "candidates").glob("attempt-*.pt") if (self.out / "candidates").exists() else []:
            if best is None or f.name != f"attempt-{best.index}.pt":
                f.unlink(missing_ok=True)


class PruneTask:
    """A pruned candidate for a worker to recover and score; equal to another of the same allocation."""

    def __init__(self, allocation: dict[str, Any], model: torch.nn.Module) -> None:
        self.allocation, self.model = allocation, model

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruneTask) and other.allocation == self.allocation


class PruneWorker:
    """What a Ray worker needs to recover and score candidates exactly as the job does here: the Evaluator (its
    data, the dense model, the dense outputs). Pickled once into Ray's object store."""

    def __init__(self, evaluator: Evaluator, steps: int) -> None:
        self.evaluator, self.steps = evaluator, steps

    def build(self) -> "PruneWorker":
        return self

    def measure(self, task: PruneTask) -> tuple[dict[str, float], dict[str, Any]]:
        metrics = self.evaluator.score(task.model, self.steps)
        return metrics, task.model.state_dict()


def _reflection(outcome: Outcome, prev: Attempt | None) -> str:
    acc = quality_of(outcome.metrics)
    if acc is None:
        return "no score measured"
    if prev is None:
        return f"first feasible point: {score_name(outcome.metrics)} {acc:.4f}"
    pacc = prev.score or 0.0
    moved = sorted((outcome.projected.get(k, 0) - prev.projected.get(k, 0), k) for k in outcome.projected)
    more = [k for d, k in moved[-2:] if d > 0.02]
    less = [k for d, k in moved[:2] if d < -0.02]
    return (f"{score_name(outcome.metrics)} {acc:.4f} vs best {pacc:.4f} (attempt {prev.index}, {acc - pacc:+.4f}); "
            f"pruned more in {more or 'none'}, less in {less or 'none'}")


# ------------------------------------------------------------------------------------------------ the run
def fingerprint(pruner: Pruner):
    from ..history import Fingerprint

    st = pruner.structure
    return Fingerprint.of(KIND, type(pruner.dense).__name__, {n: g.width for n, g in st.groups.items()},
                          float(pruner.profile.dense["macs"]))


def budget_fractions(rb: ResolvedBudget, dense: dict[str, float]) -> dict[str, float]:
    return {m: g / dense[m] for m, g in rb.goals.items() if dense.get(m)}


def family_shape(attempt: Attempt, pruner: Pruner) -> dict[str, float]:
    """Per-family mean of the projected ratios: a shape that transfers to a neighbouring budget."""
    out: dict[str, list[float]] = {}
    for fam, names in pruner.structure.families.items():
        out[fam] = [attempt.projected[n] for n in names if n in attempt.projected]
    return {f: round(sum(v) / len(v), 4) for f, v in out.items() if v}


def warm_start_plan(prior, families: list[str]) -> Plan | None:
    ratios = {f: r for f, r in prior.plan_shape.items() if f in families and 0 <= r <= 1}
    if not ratios or not any(ratios.values()):
        return None
    return Plan(ratios=ratios, default_ratio=0.0, round_to=8, source="history",
                rationale=f"warm start: the best shape of run {prior.run_id} at budget {prior.budget} "
                          f"(score {prior.score:.4f}), rescaled onto this budget")


@dataclass
class PruneRun:
    """What a prune run needs, all of it journaled so `runs resume` rebuilds the same run (except what came
    from Python: the user's DataLoaders, evaluate() and loss(), which only the same Python call can give again)."""

    budget: Budget
    data: Any  # a data spec (fashion-mnist, imagefolder:DIR, hf:NAME) or a sources.user_data.UserData
    out: Path
    agent: str = "auto"
    settings: PruneSettings = field(default_factory=PruneSettings)
    user: UserConstraints = field(default_factory=UserConstraints)
    history_path: Path | None = None  # None: the default store; use_history=False: none
    use_history: bool = True
    base_url: str | None = None
    normalize: str = "auto"  # imagenet | none | MEAN,STD | auto (a data spec's preprocessing)
    resize: int | None = None
    crop: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    align: bool = False  # channel multiples per family by measurement (always on for a latency budget)
    evaluate: Callable[[torch.nn.Module], float] | None = field(default=None, repr=False)
    loss_fn: Callable[..., torch.Tensor] | None = field(default=None, repr=False)

    @property
    def data_from_python(self) -> bool:
        return not isinstance(self.data, str)

    def config(self, loaded) -> dict[str, Any]:
        data = self.data if isinstance(self.data, str) else f"python:{getattr(self.data, 'name', 'DataLoaders')}"
        return {"model": loaded.uri, "model_spec": loaded.spec.model_dump() if loaded.spec else None,
                "model_sha256": _module_digest(loaded.module) if loaded.spec is None else None,
                "budget": self.budget.model_dump(), "data": data,
                "data_fingerprint": None if self.data_from_python else _data_fingerprint(self.data),
                "data_from_python": self.data_from_python, "agent": self.agent, "settings": asdict(self.settings),
                "user": self.user.to_json(), "out": str(self.out),
                "history": str(self.history_path) if self.history_path else None, "use_history": self.use_history,
                "normalize": self.normalize, "resize": self.resize, "crop": self.crop, "device": self.device,
                "dtype": self.dtype, "align": self.align, "evaluate": _callable_name(self.evaluate), "loss": _callable_name(self.loss_fn)}

    @classmethod
    def from_config(cls, c: dict[str, Any], *, agent: str | None = None) -> "PruneRun":
        """The run a journal's config describes (data given as a spec; see `config`)."""
        from ..errors import SourceError

        if c.get("data_from_python") or c.get("evaluate") or c.get("loss"):
            raise SourceError("this run's data, evaluate() or loss() came from Python, so the journal cannot rebuild it",
                              c.get("data"), "continue it from Python: prunepilot.prune(..., out=<the same folder>, resume=True)")
        u = c.get("user") or {}
        user = UserConstraints(protected=tuple(u.get("protected") or ()), importance=u.get("importance"),
                               round_to=u.get("round_to"), prune_heads=u.get("prune_heads"),
                               plan=Plan.model_validate(u["plan"]) if u.get("plan") else None,
                               skip=tuple(u.get("skip") or ()))
        return cls(Budget.model_validate(c["budget"]), c["data"], Path(c["out"]), agent=agent or c["agent"],
                   settings=PruneSettings(**c["settings"]), user=user,
                   history_path=Path(c["history"]) if c.get("history") else None,
                   use_history=c.get("use_history", True), normalize=c.get("normalize") or "auto",
                   resize=c.get("resize"), crop=c.get("crop"), device=c.get("device") or "auto",
                   dtype=c.get("dtype") or "auto", align=bool(c.get("align")))


def _callable_name(fn: Any) -> str | None:
    if fn is None:
        return None
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _module_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, shapes, bytes): a Python-handed model resumes only unchanged."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-d buffers (num_batches_tracked) as 1-d
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _data_fingerprint(spec: str) -> str | None:
    from ..sources.data import data_fingerprint

    return data_fingerprint(spec)


def run_prune_search(loaded, run: PruneRun, *, run_id: str | None = None, overwrite: bool = False,
                     transcripts: list | None = None, api_key: str | None = None, client: Any = None,
                     log: Callable[[str], None] = print, return_model: bool = False) -> Any:
    """Start (or with `run_id`, continue) an agent-loop prune run and finish it: final recovery, test, export,
    report. Every attempt is in OUT/journal.sqlite as soon as it is measured. Returns result.json's content,
    or (result, compressed model) with `return_model`."""
    from ..agents.registry import make_strategist
    from ..history import HistoryStore, NullHistory, journaled_seed, seed_plan
    from ..sources.data import load_data

    out, s = run.out, run.settings
    t0 = time.perf_counter()
    journal, run_id = open_run(out, KIND, run.config(loaded), run_id=run_id, overwrite=overwrite, log=log)
    try:
        place_loaded(loaded, run.device, run.dtype)
        if isinstance(run.data, str):
            from ..inputs import tensors
            from ..sources.data import parse_normalize

            pre = parse_normalize(run.normalize, model=loaded.module, resize=run.resize, crop=run.crop)
            data = load_data(run.data, input_shape=tuple(tensors(loaded.example_input)[0].shape[1:]), seed=s.seed,
                             preprocess=pre)
        else:
            data = run.data
        pruner = Pruner(loaded, protected=list(run.user.protected))
        latency = None
        if run.align or any(t.metric == "latency_ms" for t in run.budget.targets):
            from ..latency.job import LatencyTargeting

            log("measuring the latency model of this device (cached per device)")
            latency = LatencyTargeting.enable(pruner, align=run.align or run.user.round_to is None, log=log)
            latency.relative = any(t.metric == "latency_ms" and t.relative for t in run.budget.targets)
        rb = run.budget.resolve(pruner.profile.dense)
        evaluator = Evaluator(data, pruner.dense, s.scoring(), evaluate=run.evaluate, loss_fn=run.loss_fn)
        warnings = [w for w in [dense_sanity(evaluator)] if w]
        for w in warnings:
            log(f"WARNING: {w}")
        log("measuring per-family sensitivity")
        pruner.profile.sensitivity = measure_sensitivity(pruner, evaluator, s.sensitivity_ratio)
        write_json_atomic(out / "profile.json", pruner.profile.to_json())
        store = HistoryStore(run.history_path) if run.use_history else NullHistory()
        fp = fingerprint(pruner)

        def lookup():
            priors = store.nearest(fp, budget_fractions(rb, pruner.profile.dense))
            return priors, warm_start_plan(priors[0], list(pruner.structure.families)) if priors else None

        learned = journaled_seed(journal, run_id, lookup)
        warm = seed_plan(learned)
        if warm is not None:
            log(f"history: {len(learned['priors'])} earlier run(s) on this architecture; the first proposal starts "
                f"from run {learned['from_run']}")
        strategist, resolved = make_strategist(run.agent, KIND, base_url=run.base_url, api_key=api_key,
                                               transcripts=transcripts, client=client, say=log)
        log(f"strategist: {resolved}")
        if pruner.profile.blocks and getattr(strategist, "reads_blocks", False):
            profile_blocks(pruner, evaluator, latency, log)
            write_json_atomic(out / "profile.json", pruner.profile.to_json())
        s = search_settings(strategist, s, log)
        job = PruneJob(pruner, rb, evaluator, s, out, run.user, warm_start=warm, latency=latency)
        master = Master(job, strategist, journal, run_id, seed=s.seed, priors=learned.get("priors") or [],
                        limits=LoopLimits(wall_time_s=s.wall_time_s), log=log)
        best = master.run()
        history = journal.attempts(run_id)
        job.prune_stale_candidates(history)
        if best is None:
            raise _no_feasible_error(history, run_id)
        result, model = finish(job, best, history, loaded, run, rb, data, resolved, run_id, t0, log, warnings)
    except BaseException as exc:
        journal.finish_run(run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    journal.finish_run(run_id, "done", result)
    _record_history(store, fp, run_id, rb, pruner, best, history, resolved, log)
    from ..report.render import render_safely

    render_safely(out, log)
    return (result, model) if return_model else result


def profile_blocks(pruner: Pruner, evaluator: Evaluator, latency: Any = None, log: Callable[[str], None] = print) -> None:
    """For a strategist that ranks residual blocks: the score lost when each alone is skipped, and with a latency
    model the latency each skip saves (one paired measurement per block)."""
    log(f"measuring what skipping each of {len(pruner.profile.blocks)} residual blocks costs")
    pruner.profile.blocks = measure_block_sensitivity(pruner, evaluator, pruner.profile.blocks)
    if latency is not None:
        latency.profile_blocks(pruner, log)


def search_settings(strategist: Any, s: PruneSettings, log: Callable[[str], None] = print) -> PruneSettings:
    """A search (a strategist with `explores`) spends its rounds on offspring that mostly lose, and on coarse
    channel grids some children project onto an allocation measured before: every round is a measured candidate
    and no early stop after `patience` rounds without a new best."""
    if not getattr(strategist, "explores", False):
        return s
    log(f"{getattr(strategist, 'name', 'the strategist')} searches: {s.rounds} measured candidates (a repeated "
        "allocation uses no round; no early stop without a new best)")
    return dataclasses.replace(s, patience=max(s.patience, REPEAT_CAP * s.rounds), repeats_use_rounds=False)


def place_loaded(loaded, device: str | None, dtype: str | None) -> None:
    """Move a loaded model and its example inputs to the run's device/dtype (auto: CUDA when available, the
    model's own dtype)."""
    from ..device import model_dtype, place, resolve_device, resolve_dtype

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, model_dtype(loaded.module))
    loaded.module, loaded.example_input = place(loaded.module, loaded.example_input, dev, dt)


def dense_sanity(evaluator: Evaluator) -> str | None:
    """A loud warning when the dense model itself is near chance on the given data: pruning on would rank
    candidates by noise, and the cause is nearly always preprocessing (normalisation, input size) or labels."""
    from ..evaluate.batches import split_batch
    from ..evaluate.classification import evaluate_classifier, evaluate_regression

    if evaluator.regression:  # the analogue of chance: no better than predicting the targets' mean
        reg = evaluate_regression(evaluator.dense, evaluator.val)
        if reg["target_var"] <= 0 or reg["mse"] < 0.9 * reg["target_var"]:
            return None
        return (f"the dense model's mean squared error on this data ({reg['mse']:.4g}) is no better than always "
                f"predicting the targets' mean ({reg['target_var']:.4g}): its preprocessing or targets do not match "
                "what it was trained on (or its weights are random); check the data and inputs before trusting any result")
    if not evaluator.labelled or not evaluator.dense_logits:
        return None
    classes = int(evaluator.dense_logits[0].shape[-1])
    top = max(int(split_batch(b)[1].max()) for b in evaluator.val)
    if top >= classes:  # cross-entropy would fail deep in the first candidate's recovery instead
        from ..errors import PrunepilotError

        raise PrunepilotError("the data's labels exceed the model's outputs", f"label {top} with {classes} outputs",
                              "the model needs one output per class: replace its head for this data, or map the labels")
    if classes < 2:
        return None
    acc = evaluate_classifier(evaluator.dense, evaluator.val)["top1"]
    chance = 1.0 / classes
    if acc >= min(2 * chance, chance + 0.1):
        return None
    return (f"the dense model scores {acc:.1%} top-1 on this data, near chance ({chance:.1%} for {classes} classes): "
            "its preprocessing or labels do not match what it was trained on (or its weights are random); "
            "check --normalize / --resize / --input-shape / --data before trusting any result")


def _no_feasible_error(history: list[Attempt], run_id: str):
    from ..errors import PrunepilotError

    reasons = sorted({(a.reflection or a.error or a.verdict)[:160] for a in history})[:3]
    return PrunepilotError("no attempt landed inside the budget band", "; ".join(reasons),
                           f"`prunepilot runs show {run_id}` lists every attempt; widen --tolerance or change the target")


def _record_history(store, fp, run_id, rb, pruner, best, history, strategist, log) -> None:
    from .. import __version__
    from ..errors import PrunepilotError
    from ..history import PriorRun

    prior = PriorRun(run_id=run_id, created=time.time(), fingerprint=fp, budget=budget_fractions(rb, pruner.profile.dense),
                     plan_shape=family_shape(best, pruner), outcome={"accuracy": best.score or 0.0},
                     score=best.score or 0.0, attempts=len(history), rounds_to_best=best.index + 1,
                     strategist=strategist, prunepilot_version=__version__)
    try:
        store.record(prior)
    except PrunepilotError as exc:  # learning is a bonus: never fail a finished run over it
        log(f"history not recorded: {exc}")


def finish(job: PruneJob, best: Attempt, history: list[Attempt], loaded, run: PruneRun, rb: ResolvedBudget, data,
           strategist: str, run_id: str, t0: float, log: Callable[[str], None],
           warnings: list[str] | None = None) -> tuple[dict[str, Any], torch.nn.Module]:
    """Final recovery of the winner (rebuilt from its kept weights), test accuracy, latency, export, result."""
    from ..engines.recover import finetune
    from ..evaluate.speed import compare_latency
    from ..pipeline import count_real, measure_block, save_model, summary_markdown
    from ..agents.evolve_prune import search_report
    from ..results import build_result, files_on_disk_mb, write_text_atomic

    s, pruner, out = run.settings, job.pruner, run.out
    model = job.rebuild(best)
    if s.finetune_epochs > 0:
        log(f"final fine-tune: {s.finetune_epochs} epoch(s){' with distillation' if s.kd else ''}")
        ev = job.evaluator
        finetune(model, ev.train_loader(), epochs=s.finetune_epochs, lr=s.lr * 2,
                 teacher=pruner.dense if (s.kd or not ev.labelled) else None, seed=s.seed, progress=True,
                 loss_fn=ev.loss_fn)
    test = data.loader("test", batch_size=256, shuffle=False)
    dense_q = final_quality(job.evaluator, pruner.dense, test)
    comp_q = final_quality(job.evaluator, model, test)
    if job.latency is not None:  # judged on the latency tables' statistic, dense and pruned alternated fresh
        dense_ms, comp_ms = job.latency.measure_against(pruner.dense, model, pruner.x)
        if job.latency.relative:  # a relative target is judged against the dense model timed alongside
            rb = run.budget.resolve({**pruner.profile.dense, "latency_ms": dense_ms})
    else:
        lat = compare_latency({"dense": pruner.dense, "compressed": model}, pruner.x, rounds=10)
        dense_ms, comp_ms = lat["dense"].median_ms, lat["compressed"].median_ms
    dense_block = measure_block(pruner.dense, pruner.x, {"macs": pruner.profile.dense["macs"], "params": pruner.profile.dense["params"]}, dense_ms)
    dense_block.update(dense_q)
    comp_block = measure_block(model, pruner.x, count_real(model, pruner.x), comp_ms)
    comp_block.update(comp_q)
    errors = {m: rb.error(m, comp_block[m]) for m in rb.goals}
    from ..latency.explain import explain_speedup, time_breakdown

    shares = time_breakdown(pruner.dense, pruner.x, pruner.structure, dense_ms)
    speed_story = explain_speedup(dense_ms / comp_ms if comp_ms else None,
                                  dense_block["macs"] / comp_block["macs"], shares)
    record = {"model": loaded.spec.model_dump() if loaded.spec else None, "allocation": best.allocation,
              "protected": list(run.user.protected), "run_id": run_id}
    export = save_model(model, pruner.x, out, record=record)
    comp_block["files_mb"] = files_on_disk_mb(out, export)
    plan = best.plan or {}
    write_json_atomic(out / "plan.json", {"requested": plan, "projected": {**plan, "ratios": best.projected, "default_ratio": 0.0}})
    result = build_result(
        kind=KIND, model=loaded.uri, budget=rb.to_json(), dense=dense_block, compressed=comp_block,
        within_band=all(rb.within(m, comp_block[m]) for m in rb.goals), errors=errors,
        agent=strategist, data=data.to_json(), rounds=len(history), best_round=best.index,
        evals=sum(1 for a in history if a.score is not None and a.verdict not in ("repeat", "failed")),
        **({"search": search_report(history)} if strategist.startswith("evolve") else {}),
        within_band_rate=sum(a.within_band for a in history) / max(1, len(history)),
        speedup=dense_block["latency_ms"] / comp_block["latency_ms"], ideal_speedup=dense_block["macs"] / comp_block["macs"],
        widths={g: list(w) for g, w in Allocation.from_json(best.allocation).widths(pruner.structure).items()},
        blocks_removed=list(Allocation.from_json(best.allocation).skip),
        skipped=pruner.profile.ignored, export=export,
        recovery={"final_epochs": s.finetune_epochs, "kd": s.kd, "in_loop_steps": s.finetune_steps},
        run_id=run_id, seconds=time.perf_counter() - t0, score_metric=job.evaluator.metric,
        latency_targeting=job.latency.to_json() if job.latency is not None else None,
        time_shares=shares, speed_explanation=speed_story,
        warnings=list(warnings or []), device=str(next(model.parameters()).device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    write_json_atomic(out / "result.json", result)
    summary = summary_markdown(result) + (f"\n{speed_story}\n" if speed_story else "")
    if job.latency is not None:
        from ..latency.job import latency_summary

        summary += latency_summary(result)
    if warnings:
        summary += "\n## Warnings\n\n" + "".join(f"- {w}\n" for w in warnings)
    write_text_atomic(out / "summary.md", summary)
    return result, model


def final_quality(evaluator: Evaluator, model: torch.nn.Module, test) -> dict[str, float]:
    """The final score on the test split: top-1 with labels, agreement with the dense model without, and the
    user's evaluate(model) when given (it is the score then)."""
    from ..evaluate.batches import split_batch
    from ..evaluate.classification import evaluate_classifier, evaluate_regression, fidelity, has_float_targets

    first = next(iter(test), None)  # the loader is re-iterable: peek for labels, then score it all
    out: dict[str, float] = {}
    if first is not None and has_float_targets(first):
        reg = evaluate_regression(model, test)
        out["mse"], out["mae"] = reg["mse"], reg["mae"]
        out["score"] = -reg["mse"]
    elif first is not None and split_batch(first)[1] is not None:
        out["accuracy"] = evaluate_classifier(model, test)["top1"]
        out["score"] = out["accuracy"]
    elif first is not None:
        out["fidelity_agreement"] = fidelity(model, evaluator.dense, test)["agreement"]
        out["score"] = out["fidelity_agreement"]
    if evaluator.user_evaluate is not None:
        model.eval()
        out["evaluate"] = float(evaluator.user_evaluate(model))
        out["score"] = out["evaluate"]
    return out
