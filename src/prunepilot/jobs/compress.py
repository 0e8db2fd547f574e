"""The compress job: joint structured pruning + int8 quantization under one budget (memory, latency, size,
MACs, params), run by the one Master and journaled like every job.

For each quantization option (none; int8 dynamic on the layers the profiling heuristic selects) the amount of
pruning is the knob: knob k removes a fraction k of the MACs (projected exactly), then the option is applied.
Measured targets are bracketed with real measurements (evaluate.measured_budget), one journaled attempt per
sample: the next knob is the bracketing algorithm replayed over the recorded samples, so a run killed at any
moment resumes with exactly the measurements it had. Then every feasible option's least-pruned point is scored
(accuracy after BN recalibration and a short fine-tune with data; least pruning without). With data the winner
then gets a final recovery, journaled as one more step ("final") so a run killed during it resumes into it: its
pruned float model is fine-tuned for `finetune_epochs` (distilled from the dense model), int8 is applied again and
accuracy and the budget are measured once more. The recovered model (else the winner) is exported without a
pickle: the pruned float weights (model.safetensors), the structure and the quantization recipe (structure.json;
dynamic int8 is a pure function of the float weights), and model.pt2 where it exports."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..allocation import Allocation
from ..attempt import Attempt
from ..budget import Budget, ResolvedBudget
from ..engines.quantize import layer_rows, quantize_, select_layers_auto
from ..errors import BudgetError, PrunepilotError
from ..evaluate.measured_budget import bracket_measured_target
from ..journal import open_run
from ..loop import Judgement, LoopLimits, Master, Outcome, Step
from ..plan import Plan
from ..results import write_json_atomic

KIND = "compress"
MAX_KNOB = 0.85
MEASURED = ("latency_ms", "memory_mb", "size_mb")
OPTIONS = ("none", "int8_dynamic")


@dataclass
class CompressSettings:
    quant_options: tuple[str, ...] = OPTIONS
    finetune_steps: int = 40
    eval_limit: int = 1000
    latency_runs: int = 5
    max_measurements: int = 12  # per option: the bracketing always terminates
    seed: int = 0
    finetune_epochs: float = 1.0  # final recovery of the winner (with data); 0: none
    kd: bool = True  # distil from the dense model in the final recovery


@dataclass
class CompressRun:
    """What a compress run needs, journaled so `runs resume` rebuilds it (except what came from Python)."""

    budget: Budget
    out: Path
    data: Any = None  # None, a data spec, or a sources.user_data.UserData
    plan: Plan = field(default_factory=lambda: Plan(round_to=8))
    settings: CompressSettings = field(default_factory=CompressSettings)
    normalize: str = "auto"
    resize: int | None = None
    crop: int | None = None
    evaluate: Callable[[nn.Module], float] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        bad = [o for o in self.settings.quant_options if o not in OPTIONS]
        if bad or not self.settings.quant_options:
            raise BudgetError("quantization options are none and int8_dynamic", bad or "nothing",
                              "pass quantization=('none', 'int8_dynamic') or one of them")
        e = self.settings.finetune_epochs
        if not isinstance(e, (int, float)) or isinstance(e, bool) or not math.isfinite(e) or e < 0:
            raise BudgetError("finetune_epochs (the final recovery) must be a number >= 0", repr(e),
                              "e.g. --finetune-epochs 1, or 0 to skip the final recovery")

    @property
    def data_from_python(self) -> bool:
        return self.data is not None and not isinstance(self.data, str)

    def config(self, loaded) -> dict[str, Any]:
        from ..sources.data import data_fingerprint
        from .prune import _callable_name, _module_digest

        data = self.data if self.data is None or isinstance(self.data, str) else f"python:{getattr(self.data, 'name', 'DataLoaders')}"
        s = asdict(self.settings)
        s["quant_options"] = list(self.settings.quant_options)
        return {"model": loaded.uri, "model_spec": loaded.spec.model_dump() if loaded.spec else None,
                "model_sha256": _module_digest(loaded.module) if loaded.spec is None else None,
                "budget": self.budget.model_dump(), "data": data, "data_from_python": self.data_from_python,
                "data_fingerprint": data_fingerprint(self.data) if isinstance(self.data, str) else None,
                "plan": self.plan.model_dump(), "settings": s, "out": str(self.out), "normalize": self.normalize,
                "resize": self.resize, "crop": self.crop, "evaluate": _callable_name(self.evaluate), "agent": "bracket"}

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "CompressRun":
        from ..errors import SourceError

        if c.get("data_from_python") or c.get("evaluate"):
            raise SourceError("this run's data or evaluate() came from Python, so the journal cannot rebuild it",
                              c.get("data"), "continue it from Python: prunepilot.compress(..., out=<the same folder>, resume=True)")
        s = dict(c["settings"])
        s["quant_options"] = tuple(s["quant_options"])
        return cls(Budget.model_validate(c["budget"]), Path(c["out"]), data=c.get("data"),
                   plan=Plan.model_validate(c["plan"]), settings=CompressSettings(**s),
                   normalize=c.get("normalize") or "auto", resize=c.get("resize"), crop=c.get("crop"))


class _NeedSample(Exception):
    def __init__(self, knob: float, index: int) -> None:
        super().__init__(knob)
        self.knob, self.index = knob, index


class _Abandoned(Exception):
    """A build or measurement at this knob failed: the option is given up (its reason is in the journal)."""


class _JobDictated:
    """The compress job dictates every step (bracketing and scoring are deterministic): nothing to propose."""

    name = "bracket"

    def propose(self, ctx: Any) -> Plan | None:  # never asked: every Step carries its plan
        return None


@dataclass
class _Point:
    option: str
    knob: float
    float_model: nn.Module
    model: nn.Module  # float_model, or a quantized copy of it
    allocation: Allocation  # empty: the dense structure


class CompressJob:
    kind = KIND

    def __init__(self, pruner, rb: ResolvedBudget, dense_m: dict[str, float], evaluator, settings: CompressSettings,
                 plan: Plan, out: Path) -> None:
        self.pruner, self.rb, self.dense_m, self.evaluator = pruner, rb, dense_m, evaluator
        self.settings, self.plan, self.out = settings, plan.model_copy(update={"source": "compress"}), out
        self.measured = [m for m in rb.goals if m in MEASURED]
        self.static = {m: g for m, g in rb.goals.items() if m in ("macs", "params")}
        # the least pruning that satisfies the static targets bounds the knob from below
        self.k_min = max([0.0] + [1 - g / dense_m[m] for m, g in self.static.items()])
        self.auto = select_layers_auto(layer_rows(pruner.dense, pruner.x))
        self.options = [o for o in settings.quant_options if o != "int8_dynamic" or self.auto.plan_map]
        self._last: tuple[tuple[str, float], _Point] | None = None  # repeated samples reuse one build
        self._winner: Attempt | None = None  # the attempt the final step recovers (named by next_step)

    # ---------------------------------------------------------------------------------------- the protocol
    def context_profile(self) -> dict[str, Any]:
        return self.pruner.profile.compact()

    def budget_json(self) -> dict[str, Any]:
        return self.rb.to_json()

    def next_step(self, history: list[Attempt]) -> Step | None:
        states = {o: self.bracket(o, history) for o in self.options} if self.measured else {}
        for option, state in states.items():
            if isinstance(state, _NeedSample):
                why = f"measure {option} with {state.knob:.1%} of the MACs pruned (bracketing sample {state.index})"
                return Step("bracket", {"option": option, "knob": state.knob, "sample": state.index},
                            plan=self.plan.model_copy(update={"rationale": why}))
        scored = {a.step.get("option") for a in history if a.phase == "select"}
        for option, knob in self.feasible_points(states):
            if option not in scored:
                why = (f"score {option} at its least pruning that meets the budget ({knob:.1%} of the MACs)"
                       + (" after a short recovery" if self.evaluator is not None else ""))
                return Step("select", {"option": option, "knob": knob}, plan=self.plan.model_copy(update={"rationale": why}))
        return self.final_step(history)

    def final_step(self, history: list[Attempt]) -> Step | None:
        """The winner's final recovery, asked once (a failed one is not retried: the winner is exported as it is)."""
        best = self.best(history)
        if best is None or self.recovery_skipped() or any(a.phase == "final" for a in history):
            return None
        self._winner = best
        s, option = self.settings, best.step["option"]
        why = (f"final recovery of attempt {best.index} ({option}, {float(best.step['knob']):.1%} of the MACs): "
               f"{s.finetune_epochs:g} epoch(s) of fine-tuning{' distilled from the dense model' if s.kd else ''}"
               + (", int8 applied again" if option == "int8_dynamic" else "") + ", then measured again")
        return Step("final", {"option": option, "knob": best.step["knob"], "of": best.index, "epochs": s.finetune_epochs},
                    plan=self.plan.model_copy(update={"rationale": why}))

    def recovery_skipped(self) -> str | None:
        """Why there is no final recovery (None: there is one)."""
        if self.evaluator is None:
            return "no data: nothing to recover (pass --data for a final recovery)"
        if self.settings.finetune_epochs <= 0:
            return "final recovery disabled (finetune_epochs 0)"
        return None

    def project(self, plan: Plan | None, step: Step) -> _Point:
        if step.phase == "final":  # the winner as scored: its kept recovered weights, the option applied again
            winner = self._winner
            if winner is None or winner.index != step.info["of"]:
                raise PrunepilotError("the final step names an attempt the job did not select", step.info.get("of"),
                                      "resume the run again (next_step names the winner)")
            float_model, model = self.rebuild(winner)
            return _Point(winner.step["option"], float(winner.step["knob"]), float_model, model,
                          Allocation.from_json(winner.allocation))
        return self.point(step.info["option"], float(step.info["knob"]))

    def evaluate(self, point: _Point, step: Step, history: list[Attempt]) -> Outcome:
        if step.phase == "bracket":
            m = self.measure(point.model, set(self.measured))
            value = max(m[t] / self.rb.goals[t] for t in self.measured)
            metrics = {"value": value, "knob": point.knob, **m}
            errors = {t: self.rb.error(t, m[t]) for t in self.measured}
            return Outcome(self.allocation_json(point), {}, metrics, errors, value <= 1 + self.rb.band.over,
                           extra={"phase": "bracket"})
        if step.phase == "final":
            return self.recover(point, step)
        metrics = {**self.counts(point), **self.measure(point.model, {"memory_mb"}), "knob": point.knob}
        if self.evaluator is not None:
            metrics.update(self.scored(point, self.settings.finetune_steps))
        else:
            metrics["score"] = -point.knob  # without data the least pruning is the most faithful
        goals = [g for g in self.static if g in metrics]
        errors = {g: self.rb.error(g, metrics[g]) for g in goals}
        return Outcome(self.allocation_json(point), {}, metrics, errors, all(self.static_ok(g, metrics[g]) for g in goals),
                       candidate=point, extra={"phase": "select"})

    def scored(self, point: _Point, steps: int) -> dict[str, float]:
        """The evaluator's score after `steps` of short recovery. Quantized modules do not train: the pruned float
        model is recovered, then quantized again with the same recipe (point.model is replaced)."""
        if point.option == "none":
            return self.evaluator.score(point.float_model, steps)
        self.evaluator.score(point.float_model, steps)
        point.model = self.quantized(point.float_model)
        return self.evaluator.score(point.model, 0)

    def recover(self, point: _Point, step: Step) -> Outcome:
        """The final recovery: fine-tune the float model for finetune_epochs, quantize again, measure quality and
        every budget metric again (shapes are unchanged, so the budget should still hold: recorded either way)."""
        from ..engines.recover import finetune

        ev, s = self.evaluator, self.settings
        stats = finetune(point.float_model, ev.train_loader(), epochs=s.finetune_epochs, lr=ev.cfg.lr * 2,
                         teacher=self.pruner.dense if (s.kd or not ev.labelled) else None, seed=s.seed, progress=True)
        quality = self.scored(point, 0)  # BN recalibrated as every in-loop score was
        metrics = {**self.counts(point), **self.measure(point.model, set(self.measured) | {"memory_mb"}), **quality,
                   "knob": point.knob, "final_loss": stats.loss_last}
        goals = [g for g in self.rb.goals if g in metrics]
        errors = {g: self.rb.error(g, metrics[g]) for g in goals}
        held = all(self.rb.meets_cap(g, metrics[g]) if g in self.measured else self.static_ok(g, metrics[g]) for g in goals)
        return Outcome(self.allocation_json(point), {}, metrics, errors, held, candidate=point,
                       extra={"phase": "final", "of": step.info["of"]})

    def static_ok(self, metric: str, value: float) -> bool:
        """MACs/params alone are met inside the band; beside a measured target they are caps (the measured
        target may need more pruning than they ask for)."""
        return self.rb.meets_cap(metric, value) if self.measured else self.rb.within(metric, value)

    def judge(self, step: Step, outcome: Outcome, history: list[Attempt]) -> Judgement:
        m = outcome.metrics
        if step.phase == "final":  # the recovered winner is exported whatever it scores (as prune does)
            before = next((a.score for a in history if a.index == step.info["of"]), None)
            text = f"final recovery: score {before:.4f} -> {m['score']:.4f}" if before is not None else "final recovery"
            if not outcome.within_band:
                text += "; the recovered model misses the budget: " + ", ".join(f"{g} {e:+.2%}" for g, e in outcome.errors.items())
            return Judgement("accept", m.get("score"), text)
        if step.phase == "bracket":
            cap = 1 + self.rb.band.over
            if m["value"] > cap:
                return Judgement("infeasible", None, f"{step.info['option']} at knob {m['knob']:.3f}: {m['value']:.3f}x the budget")
            return Judgement("accept", None, f"{step.info['option']} at knob {m['knob']:.3f} meets the budget ({m['value']:.3f}x)")
        score = m.get("score")
        if not outcome.within_band:
            return Judgement("infeasible", score, "outside the static budget band")
        prev = self.best(history)
        better = prev is None or (score or 0.0) > (prev.score or 0.0)
        return Judgement("best" if better else "worse", score,
                         f"{step.info['option']} with {m['knob']:.1%} MAC reduction: score {score:.4f}" if score is not None else "")

    def keep(self, index: int, outcome: Outcome) -> None:
        if outcome.extra.get("phase") not in ("select", "final"):
            return
        cand_dir = self.out / "candidates"
        cand_dir.mkdir(exist_ok=True)
        tmp = cand_dir / f"attempt-{index}.tmp"
        torch.save(outcome.candidate.float_model.state_dict(), tmp)  # tensors only: weights_only=True reloads it
        tmp.replace(cand_dir / f"attempt-{index}.pt")

    def best(self, history: list[Attempt]) -> Attempt | None:
        ok = [a for a in history if a.phase == "select" and a.feasible and a.score is not None]
        return max(ok, key=lambda a: (a.score, -a.index)) if ok else None

    # ---------------------------------------------------------------------------------------- bracketing
    def bracket(self, option: str, history: list[Attempt]):
        """The bracketing search replayed over this option's recorded samples: its result, or the next sample."""
        rows = [a for a in history if a.phase == "bracket" and a.step.get("option") == option]
        it = iter(rows)
        count = 0

        def measure(knob: float) -> float:
            nonlocal count
            a = next(it, None)
            if a is None:
                raise _NeedSample(knob, count)
            count += 1
            if a.verdict == "failed" or "value" not in a.metrics:
                raise _Abandoned(a.error or "the measurement failed")
            if abs(float(a.step["knob"]) - knob) > 1e-12:
                raise PrunepilotError("the journal's measurements do not match this run's bracketing", option,
                                      "start a new run (--overwrite)")
            return float(a.metrics["value"])

        try:
            # memory and size are deterministic: only latency needs repeated samples near the cap
            noise = 0.03 if "latency_ms" in self.measured else 0.0
            return bracket_measured_target(lambda k: k, measure, 1.0, band=self.rb.band, lo=self.k_min, hi=MAX_KNOB,
                                           noise=noise, max_measurements=self.settings.max_measurements)
        except (_NeedSample, _Abandoned) as state:
            return state

    def feasible_points(self, states: dict[str, Any]) -> list[tuple[str, float]]:
        """Each option's least pruning that meets the budget, from its replayed bracketing (`states`)."""
        if not self.measured:
            return [(o, self.k_min) for o in self.options]
        out = []
        for option in self.options:
            res = states[option]
            if not isinstance(res, Exception) and res.feasible:
                out.append((option, max(self.k_min, res.best.knob)))
        return out

    def bracket_results(self, history: list[Attempt]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for option in self.settings.quant_options:
            if option not in self.options:
                small = sorted(set(self.auto.reasons.values()))[:2]
                out[option] = {"feasible": False, "stop_reason": "skipped: no layer worth quantizing to int8 ("
                               + "; ".join(small) + "); it would equal the float option"}
                continue
            if not self.measured:
                out[option] = {"feasible": True, "stop_reason": "no measured target: the static budget fixes the pruning",
                               "knob": self.k_min, "measurements": 0}
                continue
            res = self.bracket(option, history)
            if isinstance(res, _Abandoned):
                out[option] = {"feasible": False, "stop_reason": f"abandoned: {res}"}
            elif not isinstance(res, Exception):
                out[option] = {"feasible": res.feasible, "stop_reason": res.stop_reason, "knob": res.best.knob if res.best else None,
                               "measurements": res.n_measurements}
        return out

    # ---------------------------------------------------------------------------------------- candidates
    def point(self, option: str, knob: float) -> _Point:
        key = (option, knob)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        float_model, alloc = self.float_candidate(knob)
        model = self.quantized(float_model) if option == "int8_dynamic" else float_model
        point = _Point(option, knob, float_model, model, alloc)
        self._last = (key, point)
        return point

    def float_candidate(self, knob: float) -> tuple[nn.Module, Allocation]:
        knob = max(self.k_min, knob)
        if knob < 0.005:
            return copy.deepcopy(self.pruner.dense), Allocation({}, {})
        goal = ResolvedBudget(goals={"macs": self.dense_m["macs"] * (1 - knob)}, band=self.rb.band)
        cand = self.pruner.candidate(self.plan, goal)
        return cand.model, cand.projection.allocation

    def quantized(self, float_model: nn.Module) -> nn.Module:
        model = copy.deepcopy(float_model).eval()
        quantize_(model, self.quant_layers(model), backend="eager", measure_size=False)
        return model

    def quant_layers(self, model: nn.Module) -> dict[str, str]:
        names = dict(model.named_modules())
        return {k: v for k, v in self.auto.plan_map.items() if k in names}

    @staticmethod
    def allocation_json(point: _Point) -> dict[str, Any]:
        return {**point.allocation.to_json(), "option": point.option, "knob": point.knob}

    def counts(self, point: _Point) -> dict[str, float]:
        from ..pipeline import count_real

        return count_real(point.float_model, self.pruner.x)  # the counter cannot see packed int8 weights

    def measure(self, model: nn.Module, need: set[str]) -> dict[str, float]:
        return measure_metrics(model, self.pruner.x, need, self.settings.latency_runs)

    def rebuild(self, attempt: Attempt) -> tuple[nn.Module, nn.Module]:
        """(float model, final model) of a scored or finally recovered attempt: the dense model pruned to its
        allocation, its kept recovered weights, and the option applied again."""
        from ..engines.structured import apply_allocation

        float_model = copy.deepcopy(self.pruner.dense)
        alloc = Allocation.from_json(attempt.allocation)
        if alloc.kept or alloc.heads:
            apply_allocation(float_model, self.pruner.x, self.pruner.structure, alloc)
        path = self.out / "candidates" / f"attempt-{attempt.index}.pt"
        float_model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        float_model.eval()
        final = self.quantized(float_model) if attempt.step.get("option") == "int8_dynamic" else float_model
        return float_model, final


def measure_metrics(model: nn.Module, x: Any, need: set[str], latency_runs: int) -> dict[str, float]:
    from ..evaluate.speed import measure_latency
    from ..profile import model_size_mb

    out: dict[str, float] = {"size_mb": model_size_mb(model)}
    if "memory_mb" in need:
        out["memory_mb"] = memory_mb(model, x)
    if "latency_ms" in need:
        out["latency_ms"] = measure_latency(model, x, warmup=2, runs=latency_runs).median_ms
    return out


def memory_mb(model: nn.Module, x: torch.Tensor) -> float:
    """Serialized weights + peak activation bytes (hook-based: quiet and deterministic), in MiB."""
    from ..evaluate.memory import peak_activation_bytes, state_dict_bytes

    return (state_dict_bytes(model) + peak_activation_bytes(model, x, method="hooks").peak_bytes) / 2**20


# ------------------------------------------------------------------------------------------------ the run
def run_compress_job(loaded, run: CompressRun, *, run_id: str | None = None, overwrite: bool = False,
                     log: Callable[[str], None] = print, return_model: bool = False) -> Any:
    """Start (or with `run_id`, continue) a compress run and finish it (export, result.json, report). Every
    measurement and score is in OUT/journal.sqlite as soon as it is taken."""
    from ..pipeline import Pruner

    out = Path(run.out)
    t0 = time.perf_counter()
    journal, run_id = open_run(out, KIND, run.config(loaded), run_id=run_id, overwrite=overwrite, log=log)
    try:
        s = run.settings
        pruner = Pruner(loaded, latency_runs=s.latency_runs)
        dense_m = {"macs": pruner.profile.dense["macs"], "params": pruner.profile.dense["params"],
                   **measure_metrics(pruner.dense, pruner.x, {"memory_mb", "latency_ms"}, s.latency_runs)}
        rb = run.budget.resolve(dense_m)
        write_json_atomic(out / "profile.json", pruner.profile.to_json())
        job = CompressJob(pruner, rb, dense_m, _evaluator(loaded, run), s, run.plan, out)
        best = Master(job, _JobDictated(), journal, run_id, seed=s.seed, limits=LoopLimits(), log=log).run()
        history = journal.attempts(run_id)
        if best is None:
            raise _infeasible(job, history, run_id)
        result, model = finish(job, best, history, loaded, run, run_id, t0, log)
    except BaseException as exc:
        journal.finish_run(run_id, "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                           {"error": f"{type(exc).__name__}: {exc}"[:2000]})
        raise
    journal.finish_run(run_id, "done", result)
    from ..report.render import render_safely

    render_safely(out, log)
    return (result, model) if return_model else result


def _evaluator(loaded, run: CompressRun):
    if run.data is None and run.evaluate is None:
        return None
    from ..evaluate.scoring import Evaluator, ScoringConfig

    data = run.data
    if isinstance(data, str):
        from ..inputs import tensors
        from ..sources.data import load_data, parse_normalize

        pre = parse_normalize(run.normalize, model=loaded.module, resize=run.resize, crop=run.crop)
        data = load_data(data, input_shape=tuple(tensors(loaded.example_input)[0].shape[1:]), preprocess=pre)
    if data is None:
        raise BudgetError("evaluate() needs batches to run on", "no data", "pass train= or val= DataLoaders")
    cfg = ScoringConfig(finetune_steps=run.settings.finetune_steps, eval_limit=run.settings.eval_limit, seed=run.settings.seed)
    return Evaluator(data, loaded.module, cfg, evaluate=run.evaluate)


def _infeasible(job: CompressJob, history: list[Attempt], run_id: str) -> PrunepilotError:
    reasons = [f"{o}: {r['stop_reason']}" for o, r in job.bracket_results(history).items()]
    failed = sorted({a.error for a in history if a.error})[:2]
    return PrunepilotError("no pruning + quantization combination meets the budget",
                           "; ".join(reasons + failed)[:600] or "nothing was measured",
                           f"relax the targets (the nearest reachable point is named above), or allow both options; "
                           f"`prunepilot runs show {run_id}` lists every measurement")


def finish(job: CompressJob, best: Attempt, history: list[Attempt], loaded, run: CompressRun, run_id: str, t0: float,
           log: Callable[[str], None]) -> tuple[dict[str, Any], nn.Module]:
    from ..evaluate.speed import compare_latency
    from ..pipeline import save_model, summary_markdown
    from ..profile import model_size_mb
    from ..results import build_result, files_on_disk_mb, write_text_atomic

    pruner, rb, out = job.pruner, job.rb, Path(run.out)
    final = next((a for a in history if a.phase == "final"), None)
    chosen = final if final is not None and final.verdict == "accept" else best  # the recovered winner when there is one
    float_model, model = job.rebuild(chosen)
    option, knob = best.step["option"], float(best.step["knob"])
    lat = compare_latency({"dense": pruner.dense, "compressed": model}, pruner.x, rounds=10)
    # without data the ranking "score" is only -knob (least pruning first): not a quality to report
    drop = {"knob", "final_loss"} | ({"score"} if job.evaluator is None else set())
    comp = {**{k: v for k, v in chosen.metrics.items() if k not in drop}, "latency_ms": lat["compressed"].median_ms,
            "size_mb": model_size_mb(model)}
    dense_block = {**job.dense_m, "latency_ms": lat["dense"].median_ms}
    if job.evaluator is not None:
        dense_q = job.evaluator.score(copy.deepcopy(pruner.dense), 0)
        dense_block.update({k: dense_q[k] for k in ("score", "accuracy", "mse", "evaluate") if k in dense_q})
    recovery = recovery_json(job, best, final, dense_block)
    if chosen is final:
        comp["before_recovery"] = {k: best.metrics[k] for k in QUALITY if k in best.metrics}
    if any(t.metric == "latency_ms" and t.relative for t in run.budget.targets):  # judged against the dense timed alongside
        rb = run.budget.resolve({**job.dense_m, "latency_ms": dense_block["latency_ms"]})
    errors = {m: rb.error(m, comp[m]) for m in rb.goals if m in comp}
    holds = {m: job.static_ok(m, comp[m]) if m not in job.measured else rb.meets_cap(m, comp[m]) for m in errors}
    within = all(holds.values())
    layers = job.quant_layers(float_model) if option == "int8_dynamic" else {}
    record = {"model": loaded.spec.model_dump() if loaded.spec else None, "allocation": Allocation.from_json(best.allocation).to_json(),
              "run_id": run_id, "quantization": {"backend": "eager", "layers": layers} if layers else None}
    export = save_model(float_model, pruner.x, out, record=record, program=model)
    comp["files_mb"] = files_on_disk_mb(out, export)
    tradeoff = [{"option": a.step.get("option"), "knob": a.step.get("knob"), "combined_ratio": a.metrics.get("value"),
                 **({"selected_point": True, **a.metrics} if a.phase == "select" else {})}
                for a in history if a.metrics and a.phase != "final"]  # the final step re-measures a selected point
    result = build_result(
        kind=KIND, model=loaded.uri, budget=rb.to_json(), dense=dense_block, compressed=comp, within_band=within,
        errors=errors, choice={"quantization": option, "mac_reduction": knob}, quantized_layers=sorted(layers),
        tradeoff=tradeoff, brackets=job.bracket_results(history), speedup=dense_block["latency_ms"] / comp["latency_ms"],
        export=export, skipped=pruner.profile.ignored, run_id=run_id, rounds=len(history), best_round=best.index,
        recovery=recovery, notes=[recovery_line(recovery)], seconds=time.perf_counter() - t0,
        **({"score_metric": job.evaluator.metric} if job.evaluator is not None else {}),
    )
    if not within:
        met = [f"{m} {errors[m]:+.2%}" for m, ok in holds.items() if ok]
        result["out_of_band_reason"] = ("the final side-by-side measurement misses the band the bracketing met: "
                                        + ", ".join(f"{m} {errors[m]:+.2%}" for m, ok in holds.items() if not ok)
                                        + (f" (met: {', '.join(met)})" if met else "")
                                        + " (measurement noise on a shared machine, or a target at the edge of the band)")
    log(recovery_line(recovery))
    write_json_atomic(out / "result.json", result)
    write_text_atomic(out / "summary.md", summary_markdown(result) + recovery_markdown(recovery))
    for f in (out / "candidates").glob("attempt-*.pt") if (out / "candidates").exists() else []:
        if f.name != f"attempt-{chosen.index}.pt":
            f.unlink(missing_ok=True)
    return result, model


QUALITY = ("score", "accuracy", "mse", "fidelity_agreement", "fidelity_kl", "evaluate")


def recovery_json(job: CompressJob, best: Attempt, final: Attempt | None, dense: dict[str, Any]) -> dict[str, Any]:
    """result.json's `recovery`: the settings, and dense / before / after quality with the budget re-measured."""
    s = job.settings
    base: dict[str, Any] = {"final_epochs": s.finetune_epochs, "kd": s.kd,
                            "in_loop_steps": s.finetune_steps if job.evaluator is not None else 0}
    skipped = job.recovery_skipped()
    if skipped:
        return {**base, "status": "skipped", "reason": skipped}
    if final is None or final.verdict != "accept":
        why = final.error if final is not None and final.error else "the final step did not run"
        return {**base, "status": "failed", "reason": why, "attempt": final.index if final is not None else None}
    metric = "accuracy" if "accuracy" in final.metrics else "score"
    return {**base, "status": "done", "attempt": final.index, "metric": metric, "dense": dense.get(metric),
            "before": best.metrics.get(metric), "after": final.metrics.get(metric), "final_loss": final.metrics.get("final_loss"),
            "budget_after": {m: final.metrics[m] for m in job.rb.goals if m in final.metrics},
            "budget_errors": dict(final.errors), "budget_holds": final.within_band, "seconds": round(final.seconds, 1)}


def recovery_line(rec: dict[str, Any]) -> str:
    if rec["status"] == "skipped":
        return f"no final recovery: {rec['reason']}"
    if rec["status"] == "failed":
        return f"the final recovery failed ({rec['reason']}): the winner is exported as the loop scored it"

    def f(v: Any) -> str:
        return "—" if v is None else f"{v:.4f}"

    kd = ", distilled from the dense model" if rec["kd"] else ""
    budget = ("the budget still holds" if rec["budget_holds"] else "the recovered model MISSES the budget: "
              + ", ".join(f"{m} {e:+.2%}" for m, e in rec["budget_errors"].items()))
    return (f"final recovery ({rec['final_epochs']:g} epoch(s){kd}): {rec['metric']} dense {f(rec['dense'])}, "
            f"before recovery {f(rec['before'])}, after {f(rec['after'])}; {budget}")


def recovery_markdown(rec: dict[str, Any]) -> str:
    text = f"\n## Final recovery\n\n{recovery_line(rec)}\n"
    if rec["status"] == "done":
        cells = " | ".join("—" if rec[k] is None else f"{rec[k]:.4f}" for k in ("dense", "before", "after"))
        text += f"\n| metric | dense | before recovery | after recovery |\n|---|---|---|---|\n| {rec['metric']} | {cells} |\n"
    return text
