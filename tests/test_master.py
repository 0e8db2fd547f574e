"""The one agent loop on a tiny model and synthetic data: one strategist conformance class for every
strategist of every job, the Master on the prune job (journal, resume after a crash, failures), user
constraints reaching the loop, divergence rules, the strategist registry, and one run per --out."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import make
from torch.utils.data import TensorDataset

from prunepilot.agents.analyst import LLMAnalyst
from prunepilot.agents.context import Context
from prunepilot.agents.llm.scripted import ScriptedClient
from prunepilot.agents.registry import (
    BUILTINS,
    builtin_names,
    make_builtin,
    make_strategist,
)
from prunepilot.allocation import Allocation
from prunepilot.attempt import Attempt
from prunepilot.budget import Budget
from prunepilot.errors import PlanError, PrunepilotError
from prunepilot.evaluate.scoring import Evaluator
from prunepilot.jobs.prune import (
    PruneJob,
    PruneSettings,
    UserConstraints,
    divergence_guidance,
)
from prunepilot.jobs.sparsify import RampSettings, SparsifyJob
from prunepilot.journal import RUN_MARK, Journal, prepare_out
from prunepilot.loop import LoopLimits, Master
from prunepilot.pipeline import Pruner
from prunepilot.plan import Plan
from prunepilot.sources.data import DataBundle, Normalization
from prunepilot.sources.models import LoadedModel
from prunepilot.sparsify.calibrate import LinearInfo
from prunepilot.sparsify.loop import ProbeScore
from prunepilot.sparsify.plan import project as sparsity_project
from prunepilot.sparsify.plan import resolve
from prunepilot.sparsify.profile import LayerProfile, SensitivityProfile, group_of


def QUIET(line: str) -> None:
    pass


SETTINGS: dict[str, Any] = {"finetune_steps": 2, "eval_limit": 64, "bn_batches": 2, "batch_size": 32, "patience": 10}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pruner() -> Pruner:
    model, x = make("residual")
    return Pruner(LoadedModel(model, x[:1], "py:tiny", "tiny"), latency_runs=0)


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    ds = TensorDataset(x, y)
    return DataBundle(ds, ds, ds, 10, (3, 32, 32), "synthetic", "random tensors", Normalization((0.0,), (1.0,)))


@pytest.fixture(scope="module")
def evaluator(pruner: Pruner, bundle: DataBundle) -> Evaluator:
    return Evaluator(bundle, pruner.dense, PruneSettings(**SETTINGS).scoring())


@pytest.fixture(scope="module")
def rb(pruner: Pruner):
    return Budget.parse(macs="50%").resolve(pruner.profile.dense)


def prune_job(pruner, rb, evaluator, out: Path, *, user: UserConstraints | None = None, **settings: Any) -> PruneJob:
    out.mkdir(parents=True, exist_ok=True)
    return PruneJob(pruner, rb, evaluator, PruneSettings(**{**SETTINGS, **settings}), out, user or UserConstraints())


def run_master(job: PruneJob, strategist, journal: Journal, run_id: str, **limits: Any) -> Attempt | None:
    return Master(job, strategist, journal, run_id, limits=LoopLimits(**limits), log=QUIET).run()


def new_run(tmp_path: Path, name: str = "j") -> tuple[Journal, str]:
    journal = Journal(tmp_path / f"{name}.sqlite")
    return journal, journal.start_run("prune", {"test": True}, tmp_path)


def context_for(job: Any, history: list[Attempt], seed: int = 0) -> Context | None:
    """The Context the Master builds for the job's next step (None: the job is done)."""
    step = job.next_step(history)
    if step is None:
        return None
    return Context(job.kind, job.context_profile(), job.budget_json(), list(history), phase=step.phase,
                   step=dict(step.info), seed=seed)


# ------------------------------------------------------------------------------- prune histories (Attempts)
def _prune_attempt(i: int, acc: float | None, *, plan: Plan | None = None, projected: dict | None = None,
                   verdict: str = "worse", within: bool = True, strategist: str = "sensitivity", **kw: Any) -> Attempt:
    plan = plan or Plan(default_ratio=0.3, round_to=8, rationale=f"alpha={0.3 * i}", params={"alpha": round(0.3 * i, 3)})
    return Attempt(index=i, job="prune", strategist=strategist, plan=plan.model_dump(), projected=projected or {"b1.0": 0.1 * i},
                   metrics={} if acc is None else {"accuracy": acc, "macs": 4.5e6}, errors={"macs": 0.001},
                   within_band=within, score=acc, verdict=verdict, **kw)


def _failed(i: int, job: str, *, phase: str = "search", plan: Plan | None = None, step: dict | None = None) -> Attempt:
    return Attempt(index=i, job=job, phase=phase, step=step or {}, strategist="llm:x", plan=plan.model_dump() if plan else None,
                   verdict="failed", error="PlanError: a plan names a group the model does not have",
                   traceback="Traceback (most recent call last):\n  ...\nPlanError")


def prune_histories() -> dict[str, list[Attempt]]:
    foreign = [
        _prune_attempt(0, 0.31, plan=Plan(ratios={"b1.0": 0.2}, default_ratio=0.4, source="user plan"), strategist="user plan",
                       verdict="best"),
        _prune_attempt(1, 0.29, plan=Plan(ratios={"b2.*": 0.5}, default_ratio=0.0, source="history"), strategist="history"),
        _prune_attempt(2, 0.35, plan=Plan(ratios={"re:b1": 0.3}, importance="taylor", round_to=16, params={"eta": 0.1},
                                          source="llm:claude"), strategist="llm:claude", within=False, verdict="infeasible"),
        Attempt(index=3, job="prune", strategist="grid", verdict="exhausted"),
        _prune_attempt(4, 0.33, plan=Plan(default_ratio=0.5, importance="random", source="sensitivity (fallback from llm:x)"),
                       fallback_reason="the LLM call failed", strategist="sensitivity (fallback from llm:x)"),
    ]
    accs = [0.30, 0.34, 0.32, 0.36, 0.31, 0.35, 0.33, 0.30, 0.36, 0.29, 0.37]
    long = [_prune_attempt(i, a, verdict="best" if a == max(accs[: i + 1]) else "worse") for i, a in enumerate(accs)]
    long[4] = _failed(4, "prune", plan=Plan(ratios={"nope": 0.5}))
    return {
        "empty": [],
        "failed": [_failed(0, "prune"), _failed(1, "prune", plan=Plan(ratios={"nope": 0.5}))],
        "foreign": foreign,
        "long": long,
    }


# --------------------------------------------------------------------- sparsify: a hand-built profile + job
KINDS = [("self_attn.q_proj", 32, 32), ("self_attn.v_proj", 16, 32), ("mlp.up_proj", 64, 32), ("mlp.down_proj", 32, 64)]


class _FakeProbe:
    dense = ProbeScore(2.0, 0.0)


def sparsify_job() -> SparsifyJob:
    n_blocks = 3
    infos = [LinearInfo(f"model.layers.{b}.{k}", b, k, o, i) for b in range(n_blocks) for k, o, i in KINDS]
    layers, groups = [], {}
    for j, info in enumerate(infos):
        g = group_of(info, n_blocks, 3)
        groups.setdefault(g, []).append(info.name)
        z = math.sin(1.7 * j)  # varied, fixed z-scores and outlier ratios
        layers.append(LayerProfile(info.name, info.block, info.kind, g, info.params, 0.01 + 0.001 * j, z, 1e-3, -z,
                                   0.002 * (1 + (j % 5))))
    owl = [sum(l.outlier_ratio * l.params for l in layers if l.block == b) / sum(l.params for l in layers if l.block == b)
           for b in range(n_blocks)]
    profile = SensitivityProfile("tiny-llama", 0.5, layers, groups, owl,
                                 group_probe={g: 0.001 * (1 + (k % 4)) for k, g in enumerate(groups)},
                                 block_probe={b: 0.002 * (b + 1) for b in range(n_blocks)})
    cfg = RampSettings(target=0.5, step=0.2, refine_iters=8)
    return SparsifyJob(None, None, infos, profile, _FakeProbe(), cfg, {"sparsity": {"target": 0.5}})  # type: ignore[arg-type]


def _sp_attempt(job: SparsifyJob, i: int, phase: str, level: float, verdict: str, kl: float, *, floor=None,
                plan: Plan | None = None, strategist: str = "sensitivity") -> Attempt:
    counts_d = sparsity_project({n.name: level for n in job.infos}, job.infos, level, floor=floor)
    counts = [counts_d[n.name] for n in job.infos]
    nll = 2.0 + kl
    return Attempt(index=i, job="sparsify", phase=phase, step={"level": level, "target": job.cfg.target},
                   strategist=strategist, plan=(plan or Plan(default_ratio=level, params={"eta": 0.05})).model_dump(),
                   allocation={"counts": counts}, metrics={"probe_nll": nll, "probe_kl": kl, "probe_ppl": math.exp(nll), "rise": kl},
                   errors={"sparsity": 0.0}, within_band=True, score=-kl, verdict=verdict, reflection="")


def sparsify_histories(job: SparsifyJob) -> dict[str, list[Attempt]]:
    t = job.cfg.target
    ramp = [_sp_attempt(job, 0, "ramp", 0.2, "accept", 0.01),
            _sp_attempt(job, 1, "ramp", 0.4, "rollback", 0.3, plan=Plan(ratios={"mlp.up_proj@0-0": 0.6}, default_ratio=0.4,
                                                                         source="llm:claude"), strategist="llm:claude")]
    at_target = _sp_attempt(job, 0, "ramp", t, "accept", 0.05)
    refine = [at_target,
              _sp_attempt(job, 1, "refine", t, "rollback", 0.09, plan=Plan(ratios={"re:mlp": 0.6}, default_ratio=t, source="owl"),
                          strategist="owl"),
              _failed(2, "sparsify", phase="refine", step={"level": t, "target": t}),
              _sp_attempt(job, 3, "refine", t, "accept", 0.04, plan=Plan(default_ratio=t, params={"eta": 0.1})),
              _sp_attempt(job, 4, "refine", t, "repeat", 0.04, plan=Plan(default_ratio=t, params={"alpha": 0.6}),
                          strategist="prune-like")]
    return {
        "empty": [],
        "failed": [_failed(0, "sparsify", phase="ramp", step={"level": 0.2, "target": t})],
        "foreign": ramp,
        "refine": refine,
    }


# ----------------------------------------------------------------------------------- scripted LLM clients
def _prune_reply(messages, schema) -> str:
    # a scripted "analyst" whose answer depends on what it reads (the history table's length)
    n = sum(m.content.count("| ") for m in messages if m.role == "user")
    return json.dumps({"ratios": {"b1.*": round(0.2 + (n % 5) * 0.1, 2), "b2.*": 0.5}, "default_ratio": 0.3,
                       "importance": "l2", "round_to": 4, "rationale": f"scripted ({n})"})


def _sparsify_reply(messages, schema) -> str:
    body = json.loads(messages[-1].content.split("\n", 1)[1])
    groups = [r["group"] for r in body["groups"]]
    n = len(body["history"])
    level = body["this_step_level"]
    return json.dumps({"ratios": {g: round(min(0.9, level + 0.05 * ((k + n) % 3 - 1)), 4) for k, g in enumerate(groups)},
                       "rationale": f"scripted ({n} rows)"})


def _garbage(messages, schema) -> str:
    return "I would rather not answer in JSON."


def _llm(kind: str, responder) -> Callable[[], LLMAnalyst]:
    return lambda: LLMAnalyst(ScriptedClient(responder), make_builtin("sensitivity", kind))


@dataclass
class Case:
    kind: str
    make: Callable[[], Any]
    uses_history: bool = True
    source: str = ""  # what the first plan's `source` says (built-ins leave it to the Master: their name)


CASES = {
    "prune-uniform": Case("prune", lambda: make_builtin("uniform", "prune"), uses_history=False),
    "prune-grid": Case("prune", lambda: make_builtin("grid", "prune")),
    "prune-sensitivity": Case("prune", lambda: make_builtin("sensitivity", "prune")),
    "prune-optuna": Case("prune", lambda: make_builtin("optuna", "prune")),
    "prune-evolve": Case("prune", lambda: make_builtin("evolve", "prune")),
    "prune-blocks": Case("prune", lambda: make_builtin("blocks", "prune")),
    "prune-evolve-llm": Case("prune", lambda: make_strategist("evolve+x", "prune", client=ScriptedClient(_prune_reply))[0]),
    "prune-llm": Case("prune", _llm("prune", _prune_reply), source="llm:scripted"),
    "prune-llm-fallback": Case("prune", _llm("prune", _garbage), source="sensitivity (fallback from llm:scripted)"),
    "sparsify-uniform": Case("sparsify", lambda: make_builtin("uniform", "sparsify"), uses_history=False),
    "sparsify-owl": Case("sparsify", lambda: make_builtin("owl", "sparsify"), uses_history=False),
    "sparsify-sensitivity": Case("sparsify", lambda: make_builtin("sensitivity", "sparsify")),
    "sparsify-llm": Case("sparsify", _llm("sparsify", _sparsify_reply), source="llm:scripted"),
    "sparsify-llm-fallback": Case("sparsify", _llm("sparsify", _garbage), source="sensitivity (fallback from llm:scripted)"),
}


@dataclass
class Env:
    """One job kind, as a conformance test sees it: contexts for named histories, and what 'valid' means."""

    job: Any
    histories: dict[str, list[Attempt]]
    validate: Callable[[Plan, Context], None]

    def ctx(self, history: str, seed: int = 0) -> Context:
        ctx = context_for(self.job, self.histories[history], seed)
        assert ctx is not None
        return ctx


@pytest.fixture(scope="module")
def envs(pruner, rb, evaluator, tmp_path_factory) -> dict[str, Env]:
    pj = prune_job(pruner, rb, evaluator, tmp_path_factory.mktemp("conf"), rounds=100, patience=100)
    groups, families = list(pruner.structure.groups), list(pruner.structure.families)

    def valid_prune(plan: Plan, ctx: Context) -> None:
        plan.check_names(groups, families, blocks=list(pruner.structure.blocks))
        assert pruner.projector.project(pj.user.apply(plan), rb).feasible  # the projector can scale it onto the budget

    sj = sparsify_job()

    def valid_sparsify(plan: Plan, ctx: Context) -> None:
        resolve(plan, sj.infos, sj.profile.groups, fallback=ctx.step["current"])
        step = sj.next_step(ctx.history)
        counts = sj.project(plan, step)  # the projection meets the step's level exactly
        assert sum(counts) == round(ctx.step["level"] * sj.total)

    return {"prune": Env(pj, prune_histories(), valid_prune), "sparsify": Env(sj, sparsify_histories(sj), valid_sparsify)}


def _dump(plan: Plan | None) -> str | None:
    return None if plan is None else json.dumps(plan.model_dump(), sort_keys=True)


HISTORIES = ["empty", "failed", "foreign", "long|refine"]


@pytest.fixture(params=list(CASES), scope="module")
def case(request) -> Case:
    return CASES[request.param]


class TestStrategistConformance:
    """Every strategist of every job: a valid plan (names the job knows), deterministic for one Context,
    tolerant of any history (empty, failed attempts, other strategists' attempts), no hidden state."""

    @staticmethod
    def _history(env: Env, name: str) -> str:
        return next(h for h in name.split("|") if h in env.histories)

    def test_declares_its_kind(self, case: Case):
        s = case.make()
        assert case.kind in s.kinds and isinstance(getattr(s, "name", ""), str) and s.name

    def test_first_step_is_a_valid_plan(self, case: Case, envs):
        env = envs[case.kind]
        ctx = env.ctx("empty")
        plan = case.make().propose(ctx)
        assert isinstance(plan, Plan)
        env.validate(plan, ctx)
        assert plan.rationale and plan.source == case.source
        assert (ctx.fallback_reason is not None) == ("fallback" in case.source)
        Plan.model_validate(plan.model_dump())  # round-trips as the journal stores it

    @pytest.mark.parametrize("history", HISTORIES)
    def test_tolerates_any_history(self, case: Case, envs, history: str):
        env = envs[case.kind]
        ctx = env.ctx(self._history(env, history))
        before = [a.model_dump() for a in ctx.history]
        plan = case.make().propose(ctx)
        assert plan is None or isinstance(plan, Plan)
        if plan is not None:
            env.validate(plan, ctx)
        assert [a.model_dump() for a in ctx.history] == before  # history is read, never changed

    @pytest.mark.parametrize("history", HISTORIES)
    def test_deterministic_and_stateless(self, case: Case, envs, history: str):
        env = envs[case.kind]
        name = self._history(env, history)
        s = case.make()
        first = _dump(s.propose(env.ctx(name, seed=3)))
        again = _dump(s.propose(env.ctx(name, seed=3)))  # same instance, same context
        fresh = _dump(case.make().propose(env.ctx(name, seed=3)))  # a fresh instance
        # an instance that has answered other questions in between answers this one the same way
        for other in env.histories:
            s.propose(env.ctx(other, seed=1))
        later = _dump(s.propose(env.ctx(name, seed=3)))
        assert first == again == fresh == later

    def test_uses_history(self, case: Case, envs):
        """A history-driven strategist moves as attempts accumulate (the history-free ones by design don't)."""
        if not case.uses_history:
            pytest.skip("this strategist is history-free by design")
        env = envs[case.kind]
        base = env.histories["long" if case.kind == "prune" else "refine"]
        plans = {_dump(case.make().propose(context_for(env.job, base[:k]))) for k in range(1, len(base) + 1)}
        assert len(plans - {None}) > 1


def test_builtins_table_complete():
    assert set(BUILTINS) == {"uniform", "grid", "sensitivity", "optuna", "owl", "evolve", "blocks"}
    assert builtin_names("prune") == ["uniform", "sensitivity", "grid", "optuna", "blocks", "evolve"]
    assert builtin_names("sparsify") == ["uniform", "sensitivity", "owl", "evolve"]
    covered = set(CASES) | {"sparsify-evolve"}  # evolve's conformance runs in tests/test_evolve.py (same class)
    for name in BUILTINS:
        for kind in BUILTINS[name]:
            assert f"{kind}-{name}" in covered  # every built-in is in the conformance class


# ------------------------------------------------------------------------------------- Master: prune job
class CrashAt:
    """Wraps a strategist and raises KeyboardInterrupt (a kill) when asked for attempt `at`."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at = inner, at
        self.name, self.kinds = inner.name, inner.kinds

    def propose(self, ctx: Context) -> Plan | None:
        if len(ctx.history) == self.at:
            raise KeyboardInterrupt("simulated kill mid-run")
        return self.inner.propose(ctx)


class Counting:
    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.name, self.kinds = inner.name, inner.kinds

    def propose(self, ctx: Context) -> Plan | None:
        self.calls += 1
        return self.inner.propose(ctx)


class DyingJournal(Journal):
    """Killed between keep() and the journal write of attempt `at` (the candidate file is on disk, its record not)."""

    def __init__(self, path: Path, at: int) -> None:
        super().__init__(path)
        self.at = at

    def record_attempt(self, run_id: str, attempt: Attempt) -> None:
        if attempt.index == self.at:
            raise KeyboardInterrupt("simulated kill before the record landed")
        super().record_attempt(run_id, attempt)


def _view(attempts: list[Attempt]) -> list[tuple]:
    return [(a.index, a.verdict, a.plan, a.allocation, a.score, a.within_band) for a in attempts]


@pytest.fixture(scope="module")
def uninterrupted(pruner, rb, evaluator, tmp_path_factory) -> tuple[list[Attempt], Attempt | None, PruneJob]:
    tmp = tmp_path_factory.mktemp("full")
    job = prune_job(pruner, rb, evaluator, tmp / "out", rounds=3)
    journal, run_id = new_run(tmp)
    best = run_master(job, make_builtin("grid", "prune"), journal, run_id)
    return journal.attempts(run_id), best, job


def test_master_runs_n_rounds_into_the_journal(uninterrupted, pruner):
    attempts, best, job = uninterrupted
    assert [a.index for a in attempts] == [0, 1, 2]
    assert all(a.job == "prune" and a.strategist == "grid" and a.verdict in ("best", "worse") for a in attempts)
    assert all(a.within_band and a.metrics["accuracy"] is not None for a in attempts)
    assert attempts[2].plan["importance"] == "taylor" and attempts[2].allocation["importance"] == "taylor"
    assert best is not None and best.feasible and best.score == max(a.score for a in attempts)
    # the best candidate is on disk (anytime) and rebuilds as the pruned, trained model
    model = job.rebuild(best)
    assert model(pruner.x).shape == pruner.out_shape
    kept = Allocation.from_json(best.allocation).kept
    assert any(k < pruner.structure.groups[g].units for g, k in kept.items())


def test_resume_after_a_kill_matches_the_uninterrupted_run(uninterrupted, pruner, rb, evaluator, tmp_path):
    ref, ref_best, _ = uninterrupted
    journal, run_id = new_run(tmp_path)
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=3)
    with pytest.raises(KeyboardInterrupt):
        run_master(job, CrashAt(make_builtin("grid", "prune"), 2), journal, run_id)
    assert len(journal.attempts(run_id)) == 2  # finished attempts survive the kill
    best_so_far = max(journal.attempts(run_id), key=lambda a: a.score)
    assert (tmp_path / "out" / "candidates" / f"attempt-{best_so_far.index}.pt").exists()  # anytime: best so far on disk
    fresh_job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=3)
    counting, said = Counting(make_builtin("grid", "prune")), []
    best = Master(fresh_job, counting, Journal(tmp_path / "j.sqlite"), run_id, log=said.append).run()
    assert counting.calls == 1 and said[0] == "resuming after 2 recorded attempts"  # continued, not restarted
    attempts = journal.attempts(run_id)
    assert _view(attempts) == _view(ref)  # same attempts, same order, no duplicates, same scores
    assert best is not None and ref_best is not None
    assert (best.index, best.score) == (ref_best.index, ref_best.score)
    assert best_so_far.score <= best.score


def test_resume_after_a_kill_between_keep_and_record(uninterrupted, pruner, rb, evaluator, tmp_path):
    ref, ref_best, _ = uninterrupted
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=3)
    dying = DyingJournal(tmp_path / "j.sqlite", at=1)
    run_id = dying.start_run("prune", {}, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_master(job, make_builtin("grid", "prune"), dying, run_id)
    journal = Journal(tmp_path / "j.sqlite")
    assert [a.index for a in journal.attempts(run_id)] == [0]
    counting = Counting(make_builtin("grid", "prune"))
    best = run_master(prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=3), counting, journal, run_id)
    assert counting.calls == 2  # attempts 1 and 2
    attempts = journal.attempts(run_id)
    assert _view(attempts) == _view(ref)  # attempt 1 redone once, not duplicated
    assert best is not None and best.index == ref_best.index
    fresh_job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=3)
    assert fresh_job.rebuild(best)(pruner.x).shape == pruner.out_shape


class UnknownNames:
    name, kinds = "broken", ("prune",)

    def propose(self, ctx: Context) -> Plan:
        return Plan(ratios={"layer_that_does_not_exist": 0.5}, rationale="names an unknown layer")


def test_systematic_failure_raises_with_tracebacks_journaled(pruner, rb, evaluator, tmp_path):
    journal, run_id = new_run(tmp_path)
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=8)
    limits = LoopLimits(systematic_failures=2)
    with pytest.raises(PrunepilotError, match="systematic") as err:
        run_master(job, UnknownNames(), journal, run_id, systematic_failures=limits.systematic_failures)
    assert "layer_that_does_not_exist" in str(err.value) and run_id in str(err.value)
    attempts = journal.attempts(run_id)
    assert len(attempts) == limits.systematic_failures
    for a in attempts:
        assert a.verdict == "failed" and a.strategist == "broken" and not a.feasible
        assert a.error and a.error.startswith("PlanError") and "layer_that_does_not_exist" in a.error
        assert a.traceback and "Traceback" in a.traceback and "check_names" in a.traceback
        assert a.plan and a.plan["ratios"] == {"layer_that_does_not_exist": 0.5}


class SometimesBad:
    """Grid, except attempt 1 names an unknown layer and attempt 2 hits a strategist bug."""

    name, kinds = "sometimes-bad", ("prune",)

    def propose(self, ctx: Context) -> Plan:
        k = len(ctx.history)
        if k == 1:
            return UnknownNames().propose(ctx)
        if k == 2:
            raise RuntimeError("strategist bug")
        return make_builtin("grid", "prune").propose(ctx)


def test_a_single_bad_plan_is_failed_and_the_loop_goes_on(pruner, rb, evaluator, tmp_path):
    journal, run_id = new_run(tmp_path)
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=4, finetune_steps=0)
    best = run_master(job, SometimesBad(), journal, run_id, systematic_failures=2)
    attempts = journal.attempts(run_id)
    assert [a.verdict for a in attempts][1:3] == ["failed", "failed"] and len(attempts) == 4
    assert "PlanError" in attempts[1].error and attempts[1].traceback
    assert "strategist bug" in attempts[2].error and attempts[2].plan is None and "RuntimeError" in attempts[2].traceback
    assert attempts[0].feasible and attempts[3].feasible and best is not None and best.index in (0, 3)


# --------------------------------------------------------------------------- user constraints in the loop
class Greedy:
    """Proposes to prune the group the user protected as hard as it can, with its own importance/rounding."""

    name, kinds = "greedy", ("prune",)

    def propose(self, ctx: Context) -> Plan:
        k = len(ctx.history)
        # round_to 12 does not divide the protected group's 16 channels: rounding must not take any either
        return Plan(ratios={"b1.0": 0.9, "b1.*": 0.9 - 0.2 * k}, default_ratio=0.5, importance="taylor",
                    round_to=(16, 12)[k % 2], protected=[], rationale=f"greedy {k}")


def test_protected_group_is_never_pruned(pruner, rb, evaluator, tmp_path):
    journal, run_id = new_run(tmp_path)
    user = UserConstraints(protected=("b1.0",))
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=2, finetune_steps=0, user=user)
    run_master(job, Greedy(), journal, run_id)
    attempts = journal.attempts(run_id)
    assert len(attempts) == 2 and all(a.verdict != "failed" for a in attempts)
    units = pruner.structure.groups["b1.0"].units
    for a in attempts:
        kept = Allocation.from_json(a.allocation).kept
        assert kept.get("b1.0", units) == units
        assert any(kept[g] < pruner.structure.groups[g].units for g in kept if g != "b1.0")  # the others were pruned
    assert job.project(Greedy().propose(context_for(job, [])), job.next_step([])).plan.protected == ["b1.0"]


def test_user_protection_as_run_prune_search_wires_it(tmp_path, rb, evaluator):
    """The CLI path: the Pruner leaves the protected layer out of the structure *and* every plan carries it."""
    model, x = make("residual")
    pruner = Pruner(LoadedModel(model, x[:1], "py:tiny", "tiny"), protected=["b1.0"], latency_runs=0)
    assert "b1.0" not in pruner.structure.groups
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=2, finetune_steps=0,
                    user=UserConstraints(protected=("b1.0",)))
    journal, run_id = new_run(tmp_path)
    best = run_master(job, make_builtin("sensitivity", "prune"), journal, run_id)
    attempts = journal.attempts(run_id)
    assert [a.verdict for a in attempts if a.verdict == "failed"] == [] and best is not None
    assert all(a.plan["protected"] == [] and a.step["user_constraints"]["protected"] == ["b1.0"] for a in attempts)
    rebuilt = job.rebuild(best)
    assert rebuilt.b1[0].out_channels == 16 and rebuilt.b2[0].out_channels < 32


def test_importance_and_round_to_overrides_reach_the_applied_plan(pruner, rb, evaluator, tmp_path):
    user = UserConstraints(importance="l1", round_to=4)
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=2, finetune_steps=0, user=user)
    cand = job.project(Greedy().propose(context_for(job, [])), job.next_step([]))
    assert cand.plan is not None and (cand.plan.importance, cand.plan.round_to) == ("l1", 4)
    journal, run_id = new_run(tmp_path)
    run_master(job, Greedy(), journal, run_id)
    attempts = journal.attempts(run_id)
    assert [a.allocation["importance"] for a in attempts] == ["l1", "l1"]
    assert all(a.plan["importance"] == "taylor" for a in attempts)  # the proposal as made is journaled too
    # round_to=1 means "no rounding"
    one = prune_job(pruner, rb, evaluator, tmp_path / "o1", user=UserConstraints(round_to=1))
    assert one.project(Plan(default_ratio=0.5, round_to=8), one.next_step([])).plan.round_to is None


def test_user_plan_is_the_first_attempt(pruner, rb, evaluator, tmp_path):
    mine = Plan(ratios={"b2.*": 0.6}, default_ratio=0.2, rationale="my own plan")
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=2, finetune_steps=0, user=UserConstraints(plan=mine))
    journal, run_id = new_run(tmp_path)
    run_master(job, make_builtin("uniform", "prune"), journal, run_id)
    a0, a1 = journal.attempts(run_id)
    assert a0.strategist == "user plan" and a0.plan["rationale"] == "my own plan" and a0.plan["ratios"] == {"b2.*": 0.6}
    assert a1.strategist == "uniform"
    assert a0.step["user_constraints"]["plan"]["rationale"] == "my own plan"


def test_taylor_importance_really_uses_gradients(pruner, rb, evaluator, tmp_path):
    from prunepilot.engines.structured import apply_allocation

    alloc = pruner.projector.project(Plan(default_ratio=0.5, round_to=8), rb).allocation

    def pruned(importance: str, calibration=None):
        return apply_allocation(copy.deepcopy(pruner.dense), pruner.x, pruner.structure, alloc, importance=importance,
                                calibration=calibration)

    l2, taylor = pruned("l2"), pruned("taylor", evaluator.taylor_batches())
    sd_l2, sd_t = l2.state_dict(), taylor.state_dict()
    assert {k: v.shape for k, v in sd_l2.items()} == {k: v.shape for k, v in sd_t.items()}  # same allocation
    assert any(not torch.equal(sd_l2[k], sd_t[k]) for k in sd_l2)  # different channels kept
    with pytest.raises(PlanError, match="[Tt]aylor"):
        pruned("taylor")
    # through the job: a taylor plan gets the evaluator's calibration batches, and keeps other channels than l2
    job = prune_job(pruner, rb, evaluator, tmp_path / "out")
    step = job.next_step([])
    by = {imp: job.project(Plan(default_ratio=0.5, round_to=8, importance=imp), step) for imp in ("l2", "taylor")}
    assert by["l2"].projection.allocation == by["taylor"].projection.allocation
    sd_l2, sd_t = by["l2"].model.state_dict(), by["taylor"].model.state_dict()
    assert any(not torch.equal(sd_l2[k], sd_t[k]) for k in sd_l2)


# -------------------------------------------------------------------------------------- divergence rules
def test_divergence_rules():
    h = [_prune_attempt(0, 0.8, projected={"a": 0.2}), _prune_attempt(1, 0.7, projected={"a": 0.3}),
         _prune_attempt(2, 0.3, projected={"a": 0.2})]
    notes = " ".join(divergence_guidance(h))
    assert "repeated plan" in notes and "accuracy collapse" in notes
    h = [_prune_attempt(i, a, projected={"a": float(i)}) for i, a in enumerate([0.9, 0.5, 0.6, 0.5, 0.6, 0.5])]
    notes = " ".join(divergence_guidance(h))
    assert "stagnation" in notes and "oscillation" in notes
    assert divergence_guidance(h[:1]) == [] and divergence_guidance([]) == []
    steady = [_prune_attempt(i, 0.5 + 0.01 * i, projected={"a": float(i)}) for i in range(5)]
    assert divergence_guidance(steady) == []


def test_divergence_rules_tolerate_failed_attempts():
    h = [_prune_attempt(0, 0.8, projected={"a": 0.2}), _failed(1, "prune"), _failed(2, "prune"), _failed(3, "prune")]
    notes = " ".join(divergence_guidance(h))
    assert "stagnation" in notes and "repeated plan" not in notes  # failures have no allocation to repeat
    assert "accuracy collapse" not in notes


# ------------------------------------------------------------------------------------------ LLM journaling
def test_llm_rounds_are_journaled_and_replayable(pruner, rb, evaluator, tmp_path):
    from prunepilot.agents.llm.replay import ReplayClient

    replies = [json.dumps({"default_ratio": r, "round_to": 4, "importance": "l1", "rationale": f"r{r}"}) for r in (0.2, 0.4)]
    j1, r1 = new_run(tmp_path, "a")
    job = prune_job(pruner, rb, evaluator, tmp_path / "a", rounds=2, finetune_steps=0)
    run_master(job, LLMAnalyst(ScriptedClient(replies), make_builtin("uniform", "prune")), j1, r1)
    calls = j1.llm_calls(r1)
    assert [c["round"] for c in calls] == [0, 1] and all(c["status"] == "ok" for c in calls)
    assert [a.llm_calls for a in j1.attempts(r1)] == [1, 1]
    assert all(a.strategist == "llm:scripted" for a in j1.attempts(r1))
    j2, r2 = new_run(tmp_path, "b")
    job2 = prune_job(pruner, rb, evaluator, tmp_path / "b", rounds=2, finetune_steps=0)
    run_master(job2, LLMAnalyst(ReplayClient(calls), make_builtin("uniform", "prune")), j2, r2)
    a1 = [a.plan for a in j1.attempts(r1)]
    a2 = [a.plan for a in j2.attempts(r2)]
    assert [p["rationale"] for p in a1] == ["r0.2", "r0.4"]
    assert [{k: v for k, v in p.items() if k != "source"} for p in a1] == [{k: v for k, v in p.items() if k != "source"} for p in a2]


@pytest.mark.slow
def test_real_local_analyst_drives_the_loop(pruner, rb, evaluator, tmp_path):
    """End to end with the real SmolLM2 analyst (schema-constrained, in-process): its plan is projected,
    applied and scored, and the call is journaled."""
    from prunepilot.agents.llm.factory import local_available

    if not local_available():
        pytest.skip("local LLM backend not installed")
    strategist, spec = make_strategist("local", "prune")
    assert spec == "local"
    journal, run_id = new_run(tmp_path)
    best = run_master(prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=1, finetune_steps=0), strategist, journal, run_id)
    (attempt,) = journal.attempts(run_id)
    calls = journal.llm_calls(run_id)
    assert calls and calls[0]["model"]
    assert attempt.within_band and best is not None
    if attempt.fallback_reason is None:
        assert calls[0]["status"] == "ok"


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("kind", ["prune", "sparsify"])
def test_auto_without_keys_is_sensitivity_never_local(kind, monkeypatch):
    from prunepilot.agents.llm import factory

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(factory, "local_available", lambda: True)  # even with the local model installed
    said: list[str] = []
    strategist, resolved = make_strategist("auto", kind, say=said.append)
    assert resolved == "sensitivity" and strategist.name == "sensitivity" and kind in strategist.kinds
    assert not isinstance(strategist, LLMAnalyst)
    assert said and "sensitivity" in said[0]


@pytest.mark.parametrize("kind", ["prune", "sparsify"])
def test_auto_with_a_key_is_the_llm_analyst(kind, monkeypatch):
    pytest.importorskip("anthropic")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-not-a-real-key")
    strategist, resolved = make_strategist("auto", kind)
    assert resolved.startswith("anthropic:") and isinstance(strategist, LLMAnalyst)
    assert strategist.fallback.name == "sensitivity" and kind in strategist.fallback.kinds


def test_a_client_makes_the_llm_analyst():
    strategist, resolved = make_strategist("anything", "sparsify", client=ScriptedClient([], name="fake"))
    assert isinstance(strategist, LLMAnalyst) and resolved == "fake"


@pytest.mark.parametrize("agent, kind", [("no-such-agent", "prune"), ("no-such-agent", "sparsify"), ("owl", "prune"),
                                         ("grid", "sparsify"), ("optuna", "sparsify")])
def test_unknown_or_wrong_kind_strategist_is_refused(agent, kind):
    with pytest.raises(PrunepilotError):
        make_strategist(agent, kind)


def test_owl_is_refused_for_prune_with_the_choices():
    with pytest.raises(PrunepilotError, match="prune") as err:
        make_builtin("owl", "prune")
    assert "sensitivity" in str(err.value)


# ---------------------------------------------------------------------------------------- one run per --out
def test_prepare_out_refuses_a_used_out_and_overwrite_clears_it(tmp_path):
    out = tmp_path / "run"
    prepare_out(out)
    assert out.is_dir()
    prepare_out(out)  # an empty folder is fine
    journal = Journal(out / "journal.sqlite")
    run_id = journal.start_run("prune", {}, out)
    (out / "candidates").mkdir()
    (out / "candidates" / "attempt-0.pt").write_bytes(b"x")
    with pytest.raises(PrunepilotError, match="already holds a run") as err:
        prepare_out(out)
    assert run_id in str(err.value)  # says how to resume it
    prepare_out(out, resume=True)  # resuming uses the folder as it is
    assert (out / "candidates" / "attempt-0.pt").exists()
    prepare_out(out, overwrite=True)
    assert out.is_dir() and [p.name for p in out.iterdir()] == [RUN_MARK]
    (out / "result.json").write_text("{}")  # a finished run without a journal is a run too
    with pytest.raises(PrunepilotError, match="already holds a run"):
        prepare_out(out)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder that holds no prunepilot run is never cleared
        with pytest.raises(PrunepilotError, match="not empty"):
            prepare_out(other, overwrite=overwrite)
    assert (other / "notes.txt").read_text() == "keep me"
    failed = tmp_path / "failed"  # a run that stopped before result.json (a refused budget) is still a run's folder
    prepare_out(failed)
    (failed / "profile.json").write_text("{}")
    with pytest.raises(PrunepilotError, match="already holds a run"):
        prepare_out(failed)
    prepare_out(failed, overwrite=True)


class _OneAtATime:
    """The same strategist without `independent`: the Master asks it once per measured attempt."""

    def __init__(self, inner) -> None:
        self.inner, self.name = inner, inner.name

    def propose(self, ctx):
        return self.inner.propose(ctx)


@pytest.mark.parametrize("name", ["grid", "sensitivity", "evolve"])
def test_prune_strategists_batches_read_like_one_at_a_time(name, pruner, rb, evaluator, tmp_path):
    from prunepilot.agents.registry import make_builtin

    runs = {}
    for arm in ("batched", "serial"):
        rounds = 9 if name == "evolve" else 3  # evolve: 3 seeds, then a generation of 4 measured as one batch
        job = prune_job(pruner, rb, evaluator, tmp_path / arm, rounds=rounds)
        journal, run_id = new_run(tmp_path, arm)
        strategist = make_builtin(name, "prune")
        assert hasattr(strategist, "independent")
        run_master(job, strategist if arm == "batched" else _OneAtATime(strategist), journal, run_id)
        runs[arm] = [(a.plan, a.verdict, a.allocation, a.score) for a in journal.attempts(run_id)]
    assert runs["batched"] == runs["serial"] and len(runs["batched"]) == rounds
