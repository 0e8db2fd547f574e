"""The evolve strategist (agents/evolve.py) on a tiny random Llama: every mutation keeps the global sparsity
exact, the search is a pure function of the journal (same seed -> same plans; resume == uninterrupted),
multi-fidelity selection and the evaluation budget, LLM-steered slots (scripted analyst: its proposals enter,
compete and are accounted for; garbage falls back to a mutation), and an end-to-end `run_sparsify`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from prunepilot.agents.context import Context
from prunepilot.agents.evolve import (
    LLM,
    MUTATION,
    SEED,
    EvolveStrategist,
    evolve_report,
    fidelities,
    genes_of,
    mutate,
)
from prunepilot.agents.llm.base import Message
from prunepilot.agents.llm.scripted import ScriptedClient
from prunepilot.agents.registry import make_strategist
from prunepilot.attempt import Attempt
from prunepilot.budget import Budget
from prunepilot.errors import PrunepilotError
from prunepilot.jobs.sparsify import RampSettings, SparsifyJob
from prunepilot.journal import Journal
from prunepilot.loop import LoopLimits, Master
from prunepilot.plan import Plan
from prunepilot.sparsify.calibrate import activation_norms, gradient_importance, linear_layers
from prunepilot.sparsify.loop import Probe, probe_costs
from prunepilot.sparsify.plan import project
from prunepilot.sparsify.profile import WandaBank, build_profile
from test_sparsity_loop import VOCAB, _tokenizer, tiny_llama, tokens

TARGET = 0.5


@pytest.fixture(scope="module")
def env() -> dict[str, Any]:
    model = tiny_llama()
    calib, probe = tokens(8, 32, 1), tokens(4, 32, 2)  # 4 probe sequences: screens on 1, 2, then all 4
    infos = linear_layers(model)
    bank = WandaBank(model, infos, activation_norms(model, calib, 4))
    profile = build_profile("tiny", TARGET, infos, bank, gradient_importance(model, calib[:2], 1), n_bands=3)
    probe_costs(model, bank, infos, profile, Probe(model, probe), TARGET)
    bank.restore()
    return {"model": model, "probe": probe, "infos": infos, "bank": bank, "profile": profile}


def make_job(env: dict[str, Any], evals: int, target: float = TARGET) -> SparsifyJob:
    env["bank"].restore()
    cfg = RampSettings(target=target, refine_iters=evals, evals=evals, ramp=False)
    budget = Budget.parse(sparsity=f"{target * 100:.6g}%").resolve({}).to_json()
    return SparsifyJob(env["model"], env["bank"], env["infos"], env["profile"], Probe(env["model"], env["probe"]),
                       cfg, budget)


def run(env: dict[str, Any], strategist: Any, journal: Journal, evals: int = 24, *, seed: int = 0,
        run_id: str | None = None, limits: LoopLimits | None = None) -> tuple[SparsifyJob, str, list[Attempt]]:
    run_id = run_id or journal.start_run("sparsify", {}, journal.path.parent)
    job = make_job(env, evals)
    try:
        Master(job, strategist, journal, run_id, seed=seed, limits=limits, log=lambda s: None).run()
    finally:
        env["bank"].restore()
    return job, run_id, journal.attempts(run_id)


def same(history: list[Attempt]) -> list[dict[str, Any]]:
    return [a.model_dump(exclude={"seconds"}) for a in history]


@pytest.fixture(scope="module")
def reference_run(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> list[Attempt]:
    return run(env, EvolveStrategist(), Journal(tmp_path_factory.mktemp("ref") / "j.sqlite"))[2]


# ---------------------------------------------------------------------------------------------- mutations
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_every_mutation_keeps_the_global_sparsity_exact(env: dict[str, Any], target: float) -> None:
    infos, profile = env["infos"], env["profile"]
    g = genes_of(profile, target, 0.3)
    total = sum(i.params for i in infos)
    start = [project({}, infos, target)[i.name] for i in infos]
    rng = random.Random(0)
    job = make_job(env, 10, target)
    step = job.next_step([]).__class__("refine", {"level": target, "target": target,
                                                  "current": {i.name: target for i in infos}})
    counts, moved = start, 0
    for _ in range(300):  # a random walk: every child is a parent of the next
        child, moves = mutate(counts, g, rng)
        assert sum(child) == sum(start) == round(target * total)
        assert all(lo <= c <= hi for c, lo, hi in zip(child, g.lo, g.hi))
        assert 1 <= len(moves) <= 3 or child == counts
        moved += bool(moves)
        plan = EvolveStrategist()._plan(g, child, target, "t")
        assert list(job.project(plan, step)) == child  # the projector keeps the child exactly as it is
        counts = child
    assert moved > 250 and counts != start


def test_fidelity_ladder() -> None:
    assert fidelities(1) == [1] and fidelities(2) == [1, 2] and fidelities(4) == [1, 2, 4] and fidelities(8) == [2, 4, 8]


# ----------------------------------------------------------------------------------------- the search loop
def test_search_structure_budget_and_elitism(env: dict[str, Any], reference_run: list[Attempt]) -> None:
    h = reference_run
    job = make_job(env, 24)
    assert h[0].phase == "reference" and h[0].verdict == "accept" and h[0].strategist == "uniform"
    seeds = [a for a in h if a.plan_params.get("origin") == SEED]
    assert len(seeds) == 5 and all(a.metrics["probe_seqs"] == 4 for a in seeds)  # sensitivity line search, full probe
    assert [a.plan_params["eta"] for a in seeds[:4]] == [0.05, 0.1, 0.15, 0.2]
    gen0 = [a for a in h if a.plan_params.get("gen") == 0]
    assert [(a.plan_params["stage"], a.metrics["probe_seqs"]) for a in gen0] == [(0, 1)] * 6 + [(1, 2)] * 2 + [(2, 4)]
    screened = [a for a in h if a.metrics.get("probe_seqs", 4) < 4]
    assert screened and all(a.verdict == "worse" and "screened on" in a.reflection for a in screened)
    # the two promoted to stage 1 are the two best stage-0 screens; the finalist the better of those
    s0 = sorted((a for a in gen0 if a.plan_params["stage"] == 0), key=lambda a: a.metrics["probe_kl"])
    assert [a.plan_params["of"] for a in gen0 if a.plan_params["stage"] == 1] == [s0[0].index, s0[1].index]
    # the evaluation budget: 24 measured candidates, counted and reported
    s = job.summary(h)
    assert s["evals"] == 24 == s["evals_budget"] and s["evals_screened"] == len(screened)
    assert job.next_step(h) is None
    # elitism: the best is the lowest full-probe KL, never a screen, never worse than uniform
    best = job.best(h)
    full = [a for a in h if a.metrics.get("probe_seqs") == 4]
    assert best is not None and best.metrics["probe_kl"] == min(a.metrics["probe_kl"] for a in full)
    assert best.metrics["probe_kl"] <= h[0].metrics["probe_kl"]
    assert all(sum(a.allocation["counts"]) == job.target_count for a in h if a.allocation)
    rep = evolve_report(h)
    assert rep["seed"]["proposed"] == 5 and rep["mutation"]["proposed"] >= 6 and rep["generations"] >= 2
    assert rep["mutation"]["promoted"] >= 2


def test_same_seed_same_plans_other_seed_other_plans(env: dict[str, Any], reference_run: list[Attempt],
                                                      tmp_path: Path) -> None:
    again = run(env, EvolveStrategist(), Journal(tmp_path / "a.sqlite"))[2]
    assert same(again) == same(reference_run)
    other = run(env, EvolveStrategist(), Journal(tmp_path / "b.sqlite"), seed=1)[2]
    mutations = lambda h: [a.allocation for a in h if a.plan_params.get("origin") == MUTATION]  # noqa: E731
    assert mutations(other) != mutations(reference_run)


def test_resume_matches_the_uninterrupted_search(env: dict[str, Any], reference_run: list[Attempt],
                                                  tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    run_id = journal.start_run("sparsify", {}, tmp_path)
    for k in (3, 11, 17):  # stop mid-seeds, mid-generation (after a screen), after a re-score; fresh objects each time
        run(env, EvolveStrategist(), journal, run_id=run_id, limits=LoopLimits(max_attempts=k))
    history = run(env, EvolveStrategist(), journal, run_id=run_id)[2]
    assert same(history) == same(reference_run)


def test_stateless_for_one_context(env: dict[str, Any], reference_run: list[Attempt]) -> None:
    job = make_job(env, 24)
    h = reference_run[:14]
    step = job.next_step(h)
    assert step is not None

    def ctx() -> Context:
        return Context("sparsify", env["profile"], {}, list(h), phase=step.phase, step=dict(step.info), seed=0)

    s = EvolveStrategist()
    first = s.propose(ctx()).model_dump()  # type: ignore[union-attr]
    s.propose(Context("sparsify", env["profile"], {}, list(reference_run[:8]), phase="refine", step=dict(step.info)))
    assert s.propose(ctx()).model_dump() == first == EvolveStrategist().propose(ctx()).model_dump()  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------- LLM steering
def _mlp_first(messages: list[Message], schema: dict[str, Any]) -> dict[str, Any]:
    """A scripted analyst that reads the search state and moves 4 points from attention into the MLPs."""
    body = json.loads(messages[-1].content.split("\n", 1)[1])
    assert "recent_offspring" in body["search"] and body["search"]["best"]["attempt"] >= 0
    return {"ratios": {r["group"]: r["sparsity"] + (0.04 if "mlp" in r["group"] else -0.04) for r in body["best_groups"]},
            "rationale": "mlp is cheaper"}


def test_scripted_analyst_proposals_enter_and_compete(env: dict[str, Any], tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    strategist, name = make_strategist("evolve+scripted", "sparsify", client=ScriptedClient(_mlp_first))
    assert name == "evolve+llm:scripted" and isinstance(strategist, EvolveStrategist)
    job, run_id, h = run(env, strategist, journal, evals=30)
    llm = [a for a in h if a.plan_params.get("origin") == LLM and a.plan_params.get("stage") == 0]
    offspring = [a for a in h if a.plan_params.get("stage") == 0]
    assert len(llm) >= 2 and all(offspring.index(a) % 4 == 3 for a in llm)  # every 4th offspring slot
    assert all(a.strategist == "llm:scripted" and a.llm_calls == 1 and "mlp is cheaper" in a.rationale for a in llm)
    assert all(a.metrics["probe_seqs"] == 1 and sum(a.allocation["counts"]) == job.target_count for a in llm)
    for a in llm:  # the answer's direction survives as a change to the parent: MLPs sparser than before
        parent = next(b for b in h if b.index == a.plan_params["parent"])
        mlp = [g for g in a.projected if g.startswith("mlp")]
        assert sum(a.projected[g] - parent.projected[g] for g in mlp) > 0
    calls = journal.llm_calls(run_id)
    assert [c["round"] for c in calls] == [a.index for a in llm]
    rep = evolve_report(h)
    assert rep["llm"]["proposed"] == len(llm) and rep["llm"]["fallbacks"] == 0
    assert rep["llm"]["promoted"] + rep["mutation"]["promoted"] >= 2  # both kinds compete for the same slots
    assert job.summary(h)["evals"] == 30


def test_a_useless_analyst_costs_only_its_slots(env: dict[str, Any], tmp_path: Path) -> None:
    client = ScriptedClient(lambda messages, schema: "I cannot help with that.")
    job, _, h = run(env, EvolveStrategist(client=client), Journal(tmp_path / "j.sqlite"), evals=20)
    slots = [a for a in h if a.plan_params.get("stage") == 0]
    fell = [a for a in slots if a.fallback_reason]
    assert fell and all(a.strategist == "evolve (fallback from llm:scripted)" for a in fell)
    assert all(a.plan_params["origin"] == MUTATION and a.verdict != "failed" for a in fell)
    assert job.summary(h)["evals"] == 20 and not any(a.verdict == "failed" for a in h)


def test_registry_refuses_bad_steering_specs() -> None:
    with pytest.raises(PrunepilotError, match="needs an LLM"):
        make_strategist("evolve+", "sparsify")
    with pytest.raises(PrunepilotError, match="no compress job"):
        make_strategist("evolve+local", "compress")
    s, name = make_strategist("evolve", "sparsify")
    assert name == "evolve" and s.name == "evolve" and s.needs_ramp is False  # type: ignore[attr-defined]


def test_ramp_step_delegates_to_sensitivity(env: dict[str, Any]) -> None:
    ctx = Context("sparsify", env["profile"], {}, [], phase="ramp",
                  step={"level": 0.2, "target": 0.5, "current": {i.name: 0.0 for i in env["infos"]}})
    plan = EvolveStrategist().propose(ctx)
    assert isinstance(plan, Plan) and plan.params == {"eta": 0.05}


# ------------------------------------------------------------------------------------------- end to end
def test_run_sparsify_with_evolve(tmp_path: Path) -> None:
    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    words = " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (12000,), generator=g))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(words[i : i + 400] for i in range(0, len(words), 400)))
    cfg = SparsifyConfig(model=f"hf:{model_dir}", sparsity="50%", agent="evolve", evals=16, method="wanda",
                         calib=f"text:{corpus}", calib_seqs=8, calib_seqlen=32, eval_seqs=4, eval_seqlen=32,
                         probe_seqs=4, probe_seqlen=32, fidelity_seqs=1)
    out = tmp_path / "run"
    res = run_sparsify(cfg, out, say=lambda s: None)
    loop = res["loop"]
    assert res["within_band"] and abs(res["compressed"]["sparsity"] - 0.5) < 1e-3
    assert loop["evals"] == 16 == loop["evals_budget"] and loop["search"]["seed"]["proposed"] == 5
    assert loop["probe_kl_final"] <= loop["probe_kl_uniform"]
    j = Journal(out / "journal.sqlite")
    (r,) = j.runs()
    attempts = j.attempts(r["id"])
    assert attempts[0].phase == "reference" and {a.phase for a in attempts} == {"reference", "refine"}
    plan = json.loads((out / "plan.json").read_text())
    assert sum(plan["counts"].values()) == round(0.5 * sum(i.params for i in linear_layers(tiny_llama())))


# --------------------------------------------------------------------- the strategist conformance class
import test_master as tm  # noqa: E402  (module import: its own test classes are not collected twice)


@pytest.fixture(params=["sparsify-evolve", "sparsify-evolve-steered"], scope="module")
def case(request: pytest.FixtureRequest) -> Any:
    if request.param == "sparsify-evolve":
        return tm.Case("sparsify", lambda: make_strategist("evolve", "sparsify")[0])
    return tm.Case("sparsify", lambda: EvolveStrategist(client=ScriptedClient(tm._sparsify_reply)))


@pytest.fixture(scope="module")
def envs() -> dict[str, Any]:
    sj = tm.sparsify_job()

    def valid(plan: Plan, ctx: Context) -> None:
        counts = sj.project(plan, sj.next_step(ctx.history))
        assert sum(counts) == round(ctx.step["level"] * sj.total)

    return {"sparsify": tm.Env(sj, tm.sparsify_histories(sj), valid)}


class TestEvolveConformance(tm.TestStrategistConformance):
    """evolve (plain and LLM-steered) passes the same conformance class as every other strategist."""


def test_constrained_local_decoder_answers_the_sparsify_schema_on_a_grid(env: dict[str, Any]) -> None:
    """A constrained decoder gets a 0.05 grid per group: short, always-complete answers (free numbers let SmolLM2
    write '0.000000' per group and run out of tokens in the bench)."""
    from prunepilot.agents.llm.local import LocalClient
    from prunepilot.agents.sparsify_prompts import SparsifyPrompts
    from test_llm_local import tiny_loader

    ctx = Context("sparsify", env["profile"], {}, [], phase="evolve",
                  step={"level": TARGET, "target": TARGET, "current": {i.name: TARGET for i in env["infos"]}})
    kit = SparsifyPrompts()
    schema = kit.schema(ctx, True)
    assert all("enum" in v for v in schema["properties"]["ratios"]["properties"].values())
    assert "enum" not in json.dumps(kit.schema(ctx, False))
    schema["properties"]["rationale"]["maxLength"] = schema["properties"]["reflection"]["maxLength"] = 8
    client = LocalClient("tiny", loader=tiny_loader(), max_new_tokens=1600)  # one token per character
    reply = client.complete([Message("system", "JSON only."), Message("user", "sparsity?")], schema)
    import re

    # random weights may end the object badly after the ratios; every group's number is on the grid
    values = dict(re.findall(r'"([^"]+@[0-9-]+)"\s*:\s*([0-9.]+)', reply.text))
    assert set(values) == set(env["profile"].groups), reply.text
    grid = schema["properties"]["ratios"]["properties"][next(iter(values))]["enum"]
    assert all(float(v) in grid for v in values.values())
