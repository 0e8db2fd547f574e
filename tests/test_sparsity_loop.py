"""Sparsify orchestration on a tiny random Llama: sequential engines, the one Master loop over SparsifyJob
(ramp with rollback, reference, refine), resume from the journal, the LLM analyst (scripted client: valid,
repaired, malformed -> fallback), export reload, and end-to-end runs (one interrupted and resumed)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from prunepilot.agents.analyst import LLMAnalyst
from prunepilot.agents.context import Context
from prunepilot.agents.llm.base import LLMError, LLMReply, Message
from prunepilot.agents.llm.scripted import ScriptedClient
from prunepilot.attempt import Attempt
from prunepilot.budget import Budget
from prunepilot.engines import sparsity as sp
from prunepilot.errors import BudgetError, PlanError, PrunepilotError
from prunepilot.jobs.sparsify import RampSettings, SparsifyJob
from prunepilot.journal import Journal
from prunepilot.loop import LoopLimits, Master
from prunepilot.plan import Plan
from prunepilot.sparsify.calibrate import (
    activation_norms,
    gradient_importance,
    linear_layers,
    sequential_sparsify,
)
from prunepilot.sparsify.export import save_and_verify
from prunepilot.sparsify.loop import Probe, probe_costs
from prunepilot.sparsify.plan import MAX_RATIO, project, resolve
from prunepilot.sparsify.profile import WandaBank, build_profile
from prunepilot.sparsify.strategies import (
    OWLStrategist,
    SensitivityStrategist,
    UniformStrategist,
)

VOCAB = 96


def tiny_llama(seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    model = tiny_llama()
    calib, probe = tokens(8, 32, 1), tokens(2, 32, 2)
    infos = linear_layers(model)
    norms = activation_norms(model, calib, 4)
    grads = gradient_importance(model, calib[:2], 1)
    bank = WandaBank(model, infos, norms)
    profile = build_profile("tiny", 0.5, infos, bank, grads, n_bands=3)
    return {"model": model, "calib": calib, "probe": probe, "infos": infos, "bank": bank, "profile": profile}


@pytest.fixture(scope="module")
def measured(setup: dict[str, Any]) -> Any:
    """A copy of the profile with measured group/block costs (the shared one keeps gradient signals only)."""
    profile = copy.deepcopy(setup["profile"])
    setup["bank"].restore()
    probe_costs(setup["model"], setup["bank"], setup["infos"], profile, Probe(setup["model"], setup["probe"]), 0.5)
    setup["bank"].restore()
    return profile


# ------------------------------------------------------------------------------------------------- helpers
def make_job(setup: dict[str, Any], cfg: RampSettings, profile: Any = None) -> SparsifyJob:
    """A fresh job, as a fresh process would build it: dense weights back, dense probe measured again."""
    setup["bank"].restore()
    budget = Budget.parse(sparsity=f"{cfg.target * 100:.6g}%").resolve({}).to_json()
    return SparsifyJob(setup["model"], setup["bank"], setup["infos"], profile or setup["profile"],
                       Probe(setup["model"], setup["probe"]), cfg, budget)


def run_loop(setup: dict[str, Any], strategist: Any, cfg: RampSettings, journal: Journal, run_id: str | None = None,
             *, profile: Any = None, limits: LoopLimits | None = None) -> tuple[SparsifyJob, str, list[Attempt]]:
    run_id = run_id or journal.start_run("sparsify", {}, journal.path.parent)
    job = make_job(setup, cfg, profile)
    try:
        Master(job, strategist, journal, run_id, limits=limits, log=lambda s: None).run()
    finally:
        setup["bank"].restore()
    return job, run_id, journal.attempts(run_id)


def assert_exact(job: SparsifyJob, history: list[Attempt]) -> None:
    """Every measured allocation hits its level to the weight; the result hits the target to the weight."""
    for a in history:
        if "counts" in a.allocation:
            assert sum(a.allocation["counts"]) == round(a.step["level"] * job.total), a.index
            assert a.within_band, a.index
    assert sum(job.best_counts(history).values()) == job.target_count == round(job.cfg.target * job.total)


def comparable(history: list[Attempt]) -> list[dict[str, Any]]:
    return [a.model_dump(exclude={"seconds"}) for a in history]


def _ctx(setup: dict[str, Any], level: float = 0.5, phase: str = "ramp", history: list[Attempt] | None = None,
         profile: Any = None) -> Context:
    return Context("sparsify", profile or setup["profile"], {}, list(history or []), phase=phase,
                   step={"level": level, "target": 0.5, "current": {i.name: 0.0 for i in setup["infos"]}})


# --------------------------------------------------------------------------------------- engines and bank
def test_discovers_every_block_linear(setup: dict[str, Any]) -> None:
    infos = setup["infos"]
    assert len(infos) == 3 * 7 and infos[0].name == "model.layers.0.self_attn.q_proj"
    assert {i.kind for i in infos} >= {"mlp.down_proj", "self_attn.k_proj"}
    assert len(setup["profile"].groups) == 7 * 3


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sequential_methods_hit_exact_global_sparsity(setup: dict[str, Any], method: str) -> None:
    model = tiny_llama()
    infos = linear_layers(model)
    desired = {i.name: (0.7 if "mlp" in i.kind else 0.3) for i in infos}
    counts = project(desired, infos, 0.5)
    achieved = sequential_sparsify(model, setup["calib"], counts, method)
    total = sum(i.params for i in infos)
    assert sum(round(achieved[i.name] * i.params) for i in infos) == round(0.5 * total)


def test_sequential_nm(setup: dict[str, Any]) -> None:
    model = tiny_llama()
    infos = linear_layers(model)
    nm = sp.NM(2, 4)
    sequential_sparsify(model, setup["calib"], {i.name: 0 for i in infos}, "sparsegpt", nm)
    mods = dict(model.named_modules())
    assert all(sp.is_nm(mods[i.name].weight, nm) for i in infos)


def test_bank_applies_and_restores(setup: dict[str, Any]) -> None:
    bank, infos = setup["bank"], setup["infos"]
    counts = project({}, infos, 0.4)
    bank.apply(counts)
    mods = dict(setup["model"].named_modules())
    got = sum(int((mods[i.name].weight == 0).sum()) for i in infos)
    assert got == sum(counts.values())
    bank.restore()
    assert all(torch.equal(mods[i.name].weight, bank.dense[i.name]) for i in infos)


def test_sequential_wanda_block0_matches_dense_statistics(setup: dict[str, Any]) -> None:
    """Block 0 sees unpruned inputs, so its masks must equal Wanda on the full-model activation norms
    (this also catches statistics shared between linears that do not share their input)."""
    model = tiny_llama()
    infos = linear_layers(model)
    norms = activation_norms(model, setup["calib"], 4)
    mods = dict(model.named_modules())
    expect = {i.name: sp.wanda_mask(mods[i.name].weight, norms[i.name], 0.5) for i in infos if i.block == 0}
    sequential_sparsify(model, setup["calib"], project({}, infos, 0.5), "wanda")
    for name, mask in expect.items():
        assert torch.equal(mods[name].weight != 0, mask), name


# -------------------------------------------------------------------------------------------- strategists
@pytest.mark.parametrize("strategist", [UniformStrategist(), OWLStrategist(), SensitivityStrategist()],
                         ids=["uniform", "owl", "sensitivity"])
def test_builtin_strategists_project_to_target(setup: dict[str, Any], strategist: Any) -> None:
    plan = strategist.propose(_ctx(setup))
    assert isinstance(plan, Plan) and "sparsify" in strategist.kinds
    counts = project(resolve(plan, setup["infos"], setup["profile"].groups, {}), setup["infos"], 0.5)
    total = sum(i.params for i in setup["infos"])
    assert sum(counts.values()) == round(0.5 * total)


def test_one_shot_strategists_have_nothing_to_refine(setup: dict[str, Any]) -> None:
    assert UniformStrategist().propose(_ctx(setup, phase="refine")) is None
    assert OWLStrategist().propose(_ctx(setup, phase="refine")) is None
    plan = SensitivityStrategist().propose(_ctx(setup, phase="refine"))
    assert plan is not None and plan.params == {"eta": 0.05}  # the line search starts at the first eta


def _att(i: int, phase: str, kl: float, verdict: str, eta: float | None = None, level: float = 0.5) -> Attempt:
    plan = Plan(params={"eta": eta}).model_dump() if eta is not None else None
    return Attempt(index=i, job="sparsify", phase=phase, step={"level": level}, plan=plan,
                   metrics={"probe_kl": kl}, verdict=verdict)  # type: ignore[arg-type]


def test_sensitivity_line_search_is_read_from_history(setup: dict[str, Any]) -> None:
    s = SensitivityStrategist(etas=(0.1, 0.2))
    assert s.next_eta([], 0.5) == 0.1
    hist = [_att(0, "reference", 1.0, "accept"), _att(1, "refine", 0.8, "accept", 0.1),
            _att(2, "refine", 0.9, "rollback", 0.2)]
    assert s.next_eta(hist, 0.5) == 0.15  # bisect towards the better neighbour of the best (0.2 beats 0.0)
    # attempts at another level, and repeats (not measured again), are not line-search points
    noise = [_att(3, "ramp", 0.01, "accept", 0.15, level=0.4), _att(4, "refine", 0.01, "repeat", 0.15)]
    assert s.next_eta(hist + noise, 0.5) == 0.15
    hist += [_att(3, "refine", 0.85, "rollback", 0.15)]
    assert s.next_eta(hist, 0.5) == 0.125
    hist += [_att(4, "refine", 0.81, "rollback", 0.125), _att(5, "refine", 0.82, "rollback", 0.05)]
    eta: float | None = None
    for _ in range(10):  # bisection ends once both gaps around the best are under 0.01
        eta = s.next_eta(hist, 0.5)
        if eta is None:
            break
        hist.append(_att(len(hist), "refine", 0.8 + abs(eta - 0.1), "rollback", eta))
    assert eta is None
    assert s.propose(_ctx(setup, phase="refine", history=hist)) is None  # every candidate measured: nothing more to propose


def test_probe_costs_fill_profile(setup: dict[str, Any]) -> None:
    profile = copy.deepcopy(setup["profile"])
    probe = Probe(setup["model"], setup["probe"])
    assert probe.dense.kl < 1e-4  # the dense model against itself (float16 reference)
    probe_costs(setup["model"], setup["bank"], setup["infos"], profile, probe, 0.5, 0.1)
    assert set(profile.group_probe) == set(profile.groups)
    assert set(profile.block_probe) == {0, 1, 2}
    rows = profile.group_table()
    assert all("kl_rise_per_1pct" in r for r in rows) and len(profile.block_table()) == 3
    mods = dict(setup["model"].named_modules())
    assert all(torch.equal(mods[i.name].weight, setup["bank"].dense[i.name]) for i in setup["infos"])


# ---------------------------------------------------------------------------------------- the one loop
def test_loop_rolls_back_and_still_ends_exactly_at_target(setup: dict[str, Any], tmp_path: Path) -> None:
    cfg = RampSettings(target=0.5, step=0.2, min_step=0.05, threshold=-1.0, patience=1, max_iters=30)
    job, _, history = run_loop(setup, SensitivityStrategist(), cfg, Journal(tmp_path / "j.sqlite"))
    assert_exact(job, history)
    summary = job.summary(history)
    assert summary["rollbacks"] >= 1 and summary["iterations"] == len(history)
    assert any(a.verdict == "rollback" for a in history)
    assert any("rolled back" in a.reflection for a in history)
    assert any("step halved" in a.reflection for a in history)
    ramp = [a for a in history if a.phase == "ramp"]
    assert all(a.verdict == "rollback" for a in ramp)  # nothing is within a threshold of -100%
    assert "least-bad candidate so far is forced" in ramp[-1].reflection  # so the ramp still reaches the target
    assert ramp[-1].step["level"] == 0.5
    # the ramp only adds sparsity: each measured ramp allocation is at or above the checkpoint it started from
    assert [a.phase for a in history][len(ramp)] == "reference"
    best = job.best(history)
    assert best is not None and best.allocation["counts"] == list(job.best_counts(history).values())


def test_loop_accepts_with_generous_threshold(setup: dict[str, Any], tmp_path: Path) -> None:
    cfg = RampSettings(target=0.3, step=0.1, threshold=10.0)
    job, _, history = run_loop(setup, UniformStrategist(), cfg, Journal(tmp_path / "j.sqlite"))
    assert [(a.phase, a.verdict) for a in history] == [("ramp", "accept")] * 3 + [("refine", "exhausted")]
    assert [a.step["level"] for a in history[:3]] == pytest.approx([0.1, 0.2, 0.3], abs=1e-3)
    assert job.summary(history)["rollbacks"] == 0
    assert_exact(job, history)
    # a uniform ramp ends on the uniform allocation, so no reference is measured and uniform == final
    assert job.best_counts(history) == project({}, setup["infos"], 0.3)
    s = job.summary(history)
    assert s["probe_kl_uniform"] == s["probe_kl_final"]


class _WorseThenNothing:
    """Refine proposals: one allocation that piles sparsity on block 0, then nothing more."""

    name = "worse"
    kinds = ("sparsify",)

    def propose(self, ctx: Context) -> Plan | None:
        if ctx.phase == "ramp":
            return Plan(default_ratio=ctx.step["level"])
        if any(a.phase == "refine" for a in ctx.history):
            return None
        return Plan(ratios={"re:layers\\.0\\.": 0.9}, default_ratio=0.3, params={"eta": 1.0})


def test_refine_keeps_the_best_candidate_and_rolls_back_worse_ones(setup: dict[str, Any], tmp_path: Path) -> None:
    cfg = RampSettings(target=0.5, step=0.25, threshold=10.0, refine_iters=3)
    job, _, history = run_loop(setup, _WorseThenNothing(), cfg, Journal(tmp_path / "j.sqlite"))
    # uniform ramp == reference: not re-measured; the strategist's None ends the refine phase
    assert [(a.phase, a.verdict) for a in history] == [("ramp", "accept"), ("ramp", "accept"), ("refine", "rollback"),
                                                       ("refine", "exhausted")]
    worse = history[2]
    assert "not below the best" in worse.reflection and worse.strategist == "worse"
    assert job.best_counts(history) == project({}, setup["infos"], 0.5)
    assert job.summary(history)["probe_kl_final"] <= worse.metrics["probe_kl"]
    assert job.best(history).index == 1  # type: ignore[union-attr]
    assert_exact(job, history)


class _StructuredFirst:
    """Answers the first ramp step with a prune-style plan (importance), then climbs uniformly."""

    name = "structured-first"
    kinds = ("sparsify",)

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def propose(self, ctx: Context) -> Plan | None:
        if ctx.phase != "ramp":
            return None
        if self.always or not ctx.history:
            return Plan(default_ratio=ctx.step["level"], importance="taylor")
        return Plan(default_ratio=ctx.step["level"])


def test_a_structured_plan_fails_one_attempt_not_the_run(setup: dict[str, Any], tmp_path: Path) -> None:
    cfg = RampSettings(target=0.4, step=0.2, threshold=10.0, refine_iters=1)
    job, _, history = run_loop(setup, _StructuredFirst(), cfg, Journal(tmp_path / "j.sqlite"))
    first = history[0]
    assert first.verdict == "failed" and first.phase == "ramp" and not first.allocation
    assert "PlanError" in (first.error or "") and "importance" in (first.error or "")
    assert first.traceback and first.plan is not None and first.plan["importance"] == "taylor"
    assert [a.verdict for a in history[1:]] == ["accept", "accept", "exhausted"]
    assert_exact(job, history)


def test_structured_plans_every_time_stop_as_systematic(setup: dict[str, Any], tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.sqlite")
    with pytest.raises(PrunepilotError, match="systematic"):
        run_loop(setup, _StructuredFirst(always=True), RampSettings(target=0.4, step=0.2), j)
    (run,) = j.runs()
    assert [a.verdict for a in j.attempts(run["id"])] == ["failed"] * 3


# ----------------------------------------------------------------------------------------------- resume
RESUME_CFG: dict[str, Any] = {"target": 0.5, "step": 0.2, "min_step": 0.05, "threshold": 0.0, "patience": 2,
                              "max_iters": 6, "refine_iters": 4}


@pytest.fixture(scope="module")
def uninterrupted(setup: dict[str, Any], measured: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    journal = Journal(tmp_path_factory.mktemp("uninterrupted") / "j.sqlite")
    job, _, history = run_loop(setup, SensitivityStrategist(), RampSettings(**RESUME_CFG), journal, profile=measured)
    return {"history": history, "best": job.best_counts(history), "summary": job.summary(history)}


def test_resume_reference_run_covers_every_kind_of_step(uninterrupted: dict[str, Any]) -> None:
    """The run the resume tests compare against folds every piece of state: accepts, rollbacks, a halved step,
    a forced last ramp step, the uniform reference and refine accepts/rollbacks."""
    seen = {(a.phase, a.verdict) for a in uninterrupted["history"]}
    assert {("ramp", "accept"), ("ramp", "rollback"), ("ramp", "forced"), ("refine", "accept"),
            ("refine", "rollback")} <= seen
    assert any(a.phase == "reference" for a in uninterrupted["history"])
    assert any("step halved" in a.reflection for a in uninterrupted["history"])


class _InterruptOn:
    """Passes proposals through to `inner`; its k-th call raises KeyboardInterrupt (Ctrl-C mid-proposal)."""

    def __init__(self, inner: Any, k: int) -> None:
        self.inner, self.k, self.calls = inner, k, 0
        self.name, self.kinds = inner.name, inner.kinds

    def propose(self, ctx: Context) -> Plan | None:
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt
        return self.inner.propose(ctx)


@pytest.mark.parametrize("how,stops", [("interrupt", (1,)), ("interrupt", (4,)), ("interrupt", (7,)),
                                       ("interrupt", (10,)), ("limit", (6,)), ("limit", (7,)), ("limit", (3, 9)),
                                       ("interrupt", (2, 3, 5))])
def test_resume_after_an_interruption_matches_the_uninterrupted_run(
        setup: dict[str, Any], measured: Any, uninterrupted: dict[str, Any], tmp_path: Path, how: str,
        stops: tuple[int, ...]) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    run_id = journal.start_run("sparsify", {}, tmp_path)
    cfg = RampSettings(**RESUME_CFG)
    for k in stops:  # each stop is a new process: fresh job, fresh strategist, same journal and run id
        before = len(journal.attempts(run_id))
        if how == "interrupt":
            with pytest.raises(KeyboardInterrupt):
                run_loop(setup, _InterruptOn(SensitivityStrategist(), k), cfg, journal, run_id, profile=measured)
            assert len(journal.attempts(run_id)) >= before + k - 1  # every answered proposal was journaled
        else:
            _, _, h = run_loop(setup, SensitivityStrategist(), cfg, journal, run_id, profile=measured,
                               limits=LoopLimits(max_attempts=k))
            assert len(h) == k
        partial = journal.attempts(run_id)
        assert comparable(partial) == comparable(uninterrupted["history"][: len(partial)])
    job, _, history = run_loop(setup, SensitivityStrategist(), cfg, journal, run_id, profile=measured)
    assert len(history) == len(uninterrupted["history"])
    assert [a.verdict for a in history] == [a.verdict for a in uninterrupted["history"]]
    assert comparable(history) == comparable(uninterrupted["history"])
    assert job.best_counts(history) == uninterrupted["best"]
    assert job.summary(history) == uninterrupted["summary"]
    assert_exact(job, history)
    # a finished run resumed once more adds nothing
    _, _, again = run_loop(setup, SensitivityStrategist(), cfg, journal, run_id, profile=measured)
    assert comparable(again) == comparable(history)


# ------------------------------------------------------------------------------------------- LLM analyst
def test_llm_analyst_valid_reply_is_used_and_clamped(setup: dict[str, Any]) -> None:
    groups = list(setup["profile"].groups)
    client = ScriptedClient([{"ratios": {groups[0]: 1.7, groups[1]: 0.2}, "rationale": "cheap group first"}],
                            model="fake-1")
    ctx = _ctx(setup)
    plan = LLMAnalyst(client, SensitivityStrategist()).propose(ctx)
    assert plan is not None and plan.ratios[groups[0]] == MAX_RATIO and plan.ratios[groups[1]] == 0.2
    assert plan.source == "llm:scripted" and plan.rationale == "cheap group first" and ctx.fallback_reason is None
    (call,) = ctx.llm_calls
    assert call["model"] == "fake-1" and call["status"] == "ok" and "target_sparsity" in call["messages"][1]["content"]
    assert any("clamped" in n for n in call["clamped"])


def test_llm_analyst_repairs_unknown_names_once(setup: dict[str, Any]) -> None:
    groups = list(setup["profile"].groups)
    client = ScriptedClient([{"ratios": {"layer.999": 0.5}, "rationale": "x"},
                             {"ratios": {groups[2]: 0.6}, "rationale": "fixed"}])
    ctx = _ctx(setup)
    plan = LLMAnalyst(client, SensitivityStrategist()).propose(ctx)
    assert plan is not None and plan.ratios == {groups[2]: 0.6} and ctx.fallback_reason is None
    assert "unknown group 'layer.999'" in client.calls[1][0][-1].content
    assert [c["status"] for c in ctx.llm_calls] == ["invalid", "ok"]
    assert [c["kind"] for c in ctx.llm_calls] == ["propose", "repair"]


def test_llm_analyst_falls_back_and_says_why(setup: dict[str, Any]) -> None:
    client = ScriptedClient(["no json here", {"ratios": {"bogus": 0.1}, "rationale": "?"}])
    ctx = _ctx(setup)
    plan = LLMAnalyst(client, SensitivityStrategist()).propose(ctx)
    assert plan is not None and plan.source.startswith("sensitivity (fallback")
    assert "unusable" in plan.rationale
    assert ctx.fallback_reason is not None and "bogus" in ctx.fallback_reason
    assert plan.ratios == SensitivityStrategist().propose(_ctx(setup)).ratios  # type: ignore[union-attr]


def test_llm_analyst_on_the_sparsify_loop_uses_a_valid_reply(setup: dict[str, Any], tmp_path: Path) -> None:
    def reply(messages: list[Message], schema: dict[str, Any]) -> dict[str, Any]:
        groups = schema["properties"]["ratios"]["required"]
        return {"ratios": {g: 0.6 if "mlp" in g else 0.4 for g in groups}, "rationale": "mlp first"}

    journal = Journal(tmp_path / "j.sqlite")
    cfg = RampSettings(target=0.5, step=0.25, threshold=10.0, refine_iters=2)
    job, run_id, history = run_loop(setup, LLMAnalyst(ScriptedClient(reply), SensitivityStrategist()), cfg, journal)
    assert [a.phase for a in history] == ["ramp", "ramp", "reference", "refine", "refine"]
    asked = [a for a in history if a.phase != "reference"]
    assert all(a.strategist == "llm:scripted" and a.fallback_reason is None and a.llm_calls == 1 for a in asked)
    assert all(a.rationale == "mlp first" for a in asked)
    assert history[2].strategist == "uniform"  # the job's own reference candidate asks no strategist
    calls = journal.llm_calls(run_id)
    assert [c["round"] for c in calls] == [a.index for a in asked] and {c["status"] for c in calls} == {"ok"}
    # the reply's shape survives the exact projection: MLP layers end sparser than attention layers
    best = job.best_counts(history)
    ratio = {i.name: best[i.name] / i.params for i in setup["infos"]}
    mlp = [r for n, r in ratio.items() if ".mlp." in n]
    attn = [r for n, r in ratio.items() if ".self_attn." in n]
    assert min(mlp) > max(attn)
    assert_exact(job, history)


def _groups(setup: dict[str, Any]) -> list[str]:
    return list(setup["profile"].groups)


# each: (id, reply given the group ids, what the fallback reason must mention)
MALFORMED: list[tuple[str, Any, str]] = [
    ("unknown-group", lambda g: {"ratios": {"model.layers.9.mlp@9-9": 0.5, g[0]: 0.4}, "rationale": "x"},
     "unknown group 'model.layers.9.mlp@9-9'"),
    ("nan", lambda g: {"ratios": {g[0]: float("nan"), g[1]: 0.5}, "rationale": "x"}, "finite number"),
    ("nan-text", lambda g: '{"ratios": {"' + g[0] + '": NaN}, "rationale": "x"}', "finite number"),
    ("infinity", lambda g: {"ratios": {g[0]: float("inf")}, "rationale": "x"}, "finite number"),
    ("prose", lambda g: "I would prune the MLP layers a little more than attention.", "not a JSON object"),
    ("string-value", lambda g: {"ratios": {g[0]: "0.5"}, "rationale": "x"}, "finite number"),
    ("bool-value", lambda g: {"ratios": {g[0]: True}, "rationale": "x"}, "finite number"),
    ("truncated", lambda g: '{"ratios": {"' + g[0] + '": 0.5, "' + g[1] + '": 0.', "not a JSON object"),
    ("list", lambda g: "[0.5, 0.4]", "not a JSON object"),
    ("empty-ratios", lambda g: {"ratios": {}, "rationale": "x"}, "non-empty object"),
    ("prune-style-plan", lambda g: {"ratios": {g[0]: 0.5}, "default_ratio": 0.3, "importance": "taylor",
                                    "protected": [g[1]], "round_to": 8, "rationale": "structured habits"},
     "unexpected keys"),
    ("llm-error", lambda g: LLMError("rate limited; fix: wait"), "the LLM call failed"),
]


@pytest.fixture(scope="module")
def sensitivity_run(setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[Attempt]:
    journal = Journal(tmp_path_factory.mktemp("sens") / "j.sqlite")
    return run_loop(setup, SensitivityStrategist(), FALLBACK_CFG, journal)[2]


FALLBACK_CFG = RampSettings(target=0.5, step=0.25, threshold=10.0, refine_iters=8)  # long enough to exhaust refine


@pytest.mark.parametrize("reply,mentions", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_llm_replies_fall_back_to_sensitivity_and_keep_exact_sparsity(
        setup: dict[str, Any], sensitivity_run: list[Attempt], tmp_path: Path, reply: Any, mentions: str) -> None:
    bad = reply(_groups(setup))
    client = ScriptedClient(lambda messages, schema: bad)
    journal = Journal(tmp_path / "j.sqlite")
    job, run_id, history = run_loop(setup, LLMAnalyst(client, SensitivityStrategist()), FALLBACK_CFG, journal)
    asked = [a for a in history if a.phase != "reference"]
    assert asked and asked[-1].verdict == "exhausted"  # the fallback's line search ran out: the refine phase ended
    for a in asked:
        assert a.fallback_reason and mentions in a.fallback_reason, (a.index, a.fallback_reason)
        assert a.verdict != "failed"
        if a.verdict != "exhausted":
            assert a.strategist == "sensitivity (fallback from llm:scripted)" and "unusable" in a.rationale
    # the fallback decided exactly what the sensitivity strategist alone decides
    assert [(a.phase, a.verdict, a.allocation, a.plan_params) for a in history] == \
        [(a.phase, a.verdict, a.allocation, a.plan_params) for a in sensitivity_run]
    tries = 1 if mentions == "the LLM call failed" else 2  # one repair request, unless the call itself failed
    assert len(journal.llm_calls(run_id)) == tries * len(asked) == sum(a.llm_calls for a in history)
    assert_exact(job, history)


# ------------------------------------------------------------------------------------ export, end to end
def test_export_reload_is_identical(tmp_path: Path, setup: dict[str, Any]) -> None:
    from transformers import PreTrainedTokenizerFast

    model = tiny_llama()
    infos = linear_layers(model)
    sequential_sparsify(model, setup["calib"], project({}, infos, 0.5), "wanda")
    info = save_and_verify(model, _tokenizer(), tmp_path / "m", setup["probe"])
    assert info["identical"] and info["size_mb"] > 0
    assert isinstance(_tokenizer(), PreTrainedTokenizerFast)


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 2)} | {"<unk>": VOCAB - 2, "<s>": VOCAB - 1}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    model_dir = root / "tiny"
    tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    words = " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (12000,), generator=g))
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(words[i : i + 400] for i in range(0, len(words), 400)))
    return {"model": model_dir, "corpus": corpus}


def _e2e_client(interrupt_on: int | None = None) -> ScriptedClient:
    def reply(messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        if interrupt_on is not None and len(client.calls) == interrupt_on + 1:  # 0-based index of the call
            raise KeyboardInterrupt
        groups = list(schema["properties"]["ratios"]["properties"])
        data = {"ratios": {g: 0.6 if "mlp" in g else 0.4 for g in groups}, "rationale": "mlp first"}
        return LLMReply(text=json.dumps(data), data=data, model="fake-1")

    client = ScriptedClient(reply, name="fake")
    return client


def _e2e_cfg(files: dict[str, Path], client: ScriptedClient) -> Any:
    from prunepilot.sparsify.run import SparsifyConfig

    return SparsifyConfig(model=f"hf:{files['model']}", sparsity="50%", agent="scripted", client=client,
                          calib=f"text:{files['corpus']}", calib_seqs=8, calib_seqlen=32, eval_seqs=4, eval_seqlen=32,
                          probe_seqs=2, probe_seqlen=32, fidelity_seqs=1, step=0.25, rollback_threshold=10.0,
                          refine_iters=2)


@pytest.fixture(scope="module")
def e2e(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from prunepilot.sparsify.run import run_sparsify

    out = tmp_path_factory.mktemp("e2e-run") / "run"
    res = run_sparsify(_e2e_cfg(tiny_files, _e2e_client()), out, say=lambda s: None)
    return {"out": out, "result": res}


def test_end_to_end_run_writes_results(e2e: dict[str, Any]) -> None:
    res, out = e2e["result"], e2e["out"]
    assert res["kind"] == "sparsify" and res["within_band"] and abs(res["compressed"]["sparsity"] - 0.5) < 1e-3
    assert res["loop"]["iterations"] == 5 and res["loop"]["llm_fallbacks"] == 0
    assert math.isfinite(res["compressed"]["perplexity"])
    assert 0 <= res["compressed"]["fidelity"]["top1_agreement"] <= 1
    for f in ("result.json", "plan.json", "profile.json", "summary.md", "journal.sqlite", "report.html", "run_id"):
        assert (out / f).is_file(), f
    j = Journal(out / "journal.sqlite")
    (run,) = j.runs()
    assert run["kind"] == "sparsify" and run["status"] == "done" and (out / "run_id").read_text() == run["id"]
    attempts = j.attempts(run["id"])
    assert [a.phase for a in attempts] == ["ramp", "ramp", "reference", "refine", "refine"]
    assert all(a.fallback_reason is None for a in attempts)
    calls = j.llm_calls(run["id"])
    assert len(calls) == 4 and calls[0]["model"] == "fake-1"
    plan = json.loads((out / "plan.json").read_text())
    total = sum(i.params for i in linear_layers(tiny_llama()))
    assert sum(plan["counts"].values()) == round(0.5 * total)  # the chosen allocation is exact to the weight
    from typer.testing import CliRunner

    from prunepilot.cli import app

    shown = CliRunner().invoke(app, ["runs", "show", run["id"], "--journal", str(out / "journal.sqlite")],
                               env={"COLUMNS": "240"})
    assert shown.exit_code == 0, shown.output
    assert "reference" in shown.output and "4 LLM calls journaled" in shown.output
    assert res["export"]["identical"]


def test_end_to_end_interrupted_run_resumes_by_run_id(tiny_files: dict[str, Path], e2e: dict[str, Any],
                                                      tmp_path: Path) -> None:
    from prunepilot.sparsify.run import run_sparsify

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sparsify(_e2e_cfg(tiny_files, _e2e_client(interrupt_on=2)), out, say=lambda s: None)  # first refine call
    j = Journal(out / "journal.sqlite")
    run_id = (out / "run_id").read_text()
    assert j.run(run_id)["status"] == "interrupted"
    assert [a.phase for a in j.attempts(run_id)] == ["ramp", "ramp", "reference"]
    res = run_sparsify(_e2e_cfg(tiny_files, _e2e_client()), out, say=lambda s: None, run_id=run_id)
    assert j.run(run_id)["status"] == "done"
    done = Journal(e2e["out"] / "journal.sqlite")
    (ref,) = done.runs()
    assert comparable(j.attempts(run_id)) == comparable(done.attempts(ref["id"]))
    assert len(j.llm_calls(run_id)) == 4
    assert res["loop"] == e2e["result"]["loop"]
    assert res["compressed"]["sparsity"] == e2e["result"]["compressed"]["sparsity"]
    assert json.loads((out / "plan.json").read_text())["counts"] == json.loads((e2e["out"] / "plan.json").read_text())["counts"]


# ------------------------------------------------------------------------------------- learning across runs
def test_history_warm_starts_the_next_run_and_a_resume_keeps_its_seed(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    """A finished run is recorded; the next run on the same model tries its best allocation first at the target
    (no LLM call for it), the analyst sees the earlier run, and a resumed run takes the journaled seed even when
    the store is gone meanwhile."""
    import dataclasses

    from prunepilot.history import HistoryStore
    from prunepilot.history import SEED_KEY
    from prunepilot.sparsify.run import run_sparsify

    store = tmp_path / "history.sqlite"
    cfg = lambda client, **kw: dataclasses.replace(_e2e_cfg(tiny_files, client), history=str(store), **kw)  # noqa: E731
    first = run_sparsify(cfg(_e2e_client()), tmp_path / "a", say=lambda s: None)
    from prunepilot.sparsify.prior import fingerprint

    model = tiny_llama()
    (prior,) = HistoryStore(store).matching(fingerprint(model, linear_layers(model)))
    assert prior.run_id == first["run_id"] and prior.budget == {"sparsity": 0.5}
    assert prior.score == -first["loop"]["probe_kl_final"] and len(prior.layers) == len(linear_layers(tiny_llama()))

    out = tmp_path / "b"
    client = _e2e_client(interrupt_on=2)  # the first LLM call of the refine phase, after the warm start
    with pytest.raises(KeyboardInterrupt):
        run_sparsify(cfg(client, sparsity="45%"), out, say=lambda s: None)
    j = Journal(out / "journal.sqlite")
    run_id = (out / "run_id").read_text()
    seed = j.run(run_id)["config"][SEED_KEY]
    assert seed["from_run"] == first["run_id"] and seed["priors"][0]["budget"] == {"sparsity": 0.5}
    done = j.attempts(run_id)
    assert [(a.phase, a.strategist) for a in done][-2:] == [("reference", "uniform"), ("refine", "history")]
    warm = done[-1]
    assert warm.plan["ratios"] == prior.layers and warm.llm_calls == 0 and warm.within_band
    assert "earlier_runs_on_a_matching_model" in client.calls[-1][0][-1].content

    store.unlink()  # a fresh look-up would find nothing now: the resumed run must still take its journaled seed
    res = run_sparsify(cfg(_e2e_client(), sparsity="45%"), out, say=lambda s: None, run_id=run_id)
    again = j.attempts(run_id)
    assert [a.strategist for a in again].count("history") == 1 and again[len(done) - 1] == warm
    assert res["loop"]["warm_start_from"] == first["run_id"]
    assert j.run(run_id)["config"][SEED_KEY] == seed

    cold = run_sparsify(cfg(_e2e_client(), use_history=False), tmp_path / "c", say=lambda s: None)
    assert "warm_start_from" not in cold["loop"]
    assert SEED_KEY in Journal(tmp_path / "c" / "journal.sqlite").runs()[0]["config"]


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_block_by_block_calibration_reproduces_the_models_own_hidden_states(arch: str) -> None:
    """Blocks run on captured inputs and keyword arguments give the hidden states of the model's own forward,
    at every batch size the calibration uses (BLOOM's ALiBi is [batch*heads, 1, T]: batch 1's does not serve 3)."""
    import transformers as T

    from prunepilot.sparsify.calibrate import Calibration

    torch.manual_seed(0)
    cfg = (T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         vocab_size=97) if arch == "llama"
           else T.BloomConfig(hidden_size=32, n_layer=3, n_head=4, vocab_size=97))
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 97, (7, 12))  # batches of 3, 3 and 1
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    cal = Calibration(model, ids, batch_size=3)
    for b, block in cal.blocks():
        if b == 2:  # the last hidden state is after the final norm
            break
        cal.forward(block, advance=True)
        torch.testing.assert_close(torch.cat(cal.inputs), ref[b + 1], rtol=1e-5, atol=1e-5)


def test_nm_under_a_budget_prunes_the_cheapest_layers_to_the_pattern_and_keeps_the_rest_dense(
        tiny_files: dict[str, Path], tmp_path: Path) -> None:
    """--sparsity 2:4@30%: chosen layers are exactly 2:4, the others untouched, the budget met as a floor (by at
    most one layer's share), the choice in result.json; refused for strategists that would not make it."""
    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    cfg = SparsifyConfig(model=f"hf:{tiny_files['model']}", sparsity="2:4@30%", method="sparsegpt",
                         calib=f"text:{tiny_files['corpus']}", calib_seqs=8, calib_seqlen=32, eval_seqs=2,
                         eval_seqlen=32, probe_seqs=2, probe_seqlen=32, fidelity_seqs=1,
                         export_format="compressed-tensors")
    res = run_sparsify(cfg, tmp_path / "run", say=lambda s: None)
    choice = res["nm_choice"]
    infos = linear_layers(tiny_llama())
    total = sum(i.params for i in infos)
    step = max(0.5 * i.params for i in infos) / total
    assert res["within_band"] and 0.30 <= res["compressed"]["sparsity"] <= 0.30 + step + 1e-9
    assert 0 < choice["nm_layers"] < len(infos) and len(choice["dense_layers"]) == len(infos) - choice["nm_layers"]
    # the cheapest per weight removed took the pattern
    cost = {i.name: choice["cost"][i.name] / i.params for i in infos}
    taken = [i.name for i in infos if i.name not in choice["dense_layers"]]
    assert max(cost[n] for n in taken) <= min(cost[n] for n in choice["dense_layers"])
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert all(plan["layers"][n] == 0.0 for n in choice["dense_layers"])
    assert all(plan["layers"][n] == 0.5 for n in taken)
    from prunepilot.sparsify.export import load_compressed

    reloaded = load_compressed(tmp_path / "run" / "model")
    mods = dict(reloaded.named_modules())
    assert all(sp.is_nm(mods[n].weight, sp.NM(2, 4)) for n in taken)
    assert all(float((mods[n].weight == 0).float().mean()) < 0.05 for n in choice["dense_layers"])
    with pytest.raises(PlanError, match="--agent auto or sensitivity"):
        run_sparsify(SparsifyConfig(**{**cfg.__dict__, "agent": "evolve"}), tmp_path / "r2", say=lambda s: None)
    for bad in ("2:4@60%", "50%@40%"):
        with pytest.raises(BudgetError):
            run_sparsify(SparsifyConfig(**{**cfg.__dict__, "sparsity": bad}), tmp_path / "r3", say=lambda s: None)
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists()  # refused before anything is written
