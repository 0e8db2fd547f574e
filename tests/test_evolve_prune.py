"""evolve for the prune job (agents/evolve_prune.py): cost-neutral level switches, every child projected into
the budget band, generations of independent offspring of the best earlier attempt (elitism), determinism
with a seed, an LLM's proposals entering and competing, and a whole prunepilot.prune run with agent="evolve"."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from test_master import QUIET, new_run, prune_job, run_master  # the tiny-model fixtures of the one loop
from test_master import bundle, evaluator, pruner, rb  # noqa: F401  (module-scoped fixtures)
from torch.utils.data import DataLoader, TensorDataset

import prunepilot
from prunepilot.agents.evolve import LLM, MUTATION, SEED
from prunepilot.agents.evolve_prune import (
    PruneEvolveStrategist,
    cost_key,
    genome,
    level_units,
    mutate,
    search_report,
)
from prunepilot.agents.llm.scripted import ScriptedClient
from prunepilot.agents.registry import make_builtin, make_strategist
from prunepilot.plan import MAX_RATIO


def test_a_level_switch_keeps_the_first_order_cost():
    shares = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    parent = {"a": 0.4, "b": 0.5, "c": 0.3, "d": 0.0}
    moved = 0
    for seed in range(200):
        child, moves = mutate(parent, shares, random.Random(seed))
        cost = lambda g: sum(shares[f] * g[f] for f in g)  # noqa: E731
        assert abs(cost(child) - cost(parent)) < 1e-3  # a switch gives away what it takes (4-decimal rounding)
        assert all(0.0 <= v <= MAX_RATIO for v in child.values())
        moved += bool(moves) and child != parent
    assert moved > 150  # nearly every draw moves something


def test_a_level_is_one_rounding_unit_of_the_narrowest_group():
    profile = {"families": [{"family": "stem", "width": [16]}, {"family": "wide", "width": [64, 128]},
                            {"family": "huge", "width": [2048]}]}
    assert level_units(profile, 8) == {"stem": 0.5, "wide": 0.125, "huge": 0.05}
    shares = {"stem": 0.2, "wide": 0.5, "huge": 0.3}
    child, moves = mutate({"stem": 0.0, "wide": 0.3, "huge": 0.3}, shares, random.Random(4), level_units(profile, 8))
    assert moves and any(abs(child[f] - v) >= 0.05 for f, v in {"stem": 0.0, "wide": 0.3, "huge": 0.3}.items())


def test_cost_key_follows_the_budget():
    assert cost_key({"targets": {"macs": {}}}) == "macs_share"
    assert cost_key({"targets": {"params": {}}}) == "params_share"
    assert cost_key({"targets": {"latency_ms": {}, "macs": {}}}) == "latency_share"


@pytest.fixture(scope="module")
def search(pruner, rb, evaluator, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("evo")
    job = prune_job(pruner, rb, evaluator, tmp / "out", rounds=11, patience=99, repeats_use_rounds=False)
    journal, run_id = new_run(tmp)
    run_master(job, make_builtin("evolve", "prune"), journal, run_id)
    return journal.attempts(run_id)


def test_seeds_then_generations_of_offspring_of_the_best(search, pruner):  # noqa: F811
    measured = sum(1 for a in search if a.verdict != "repeat")
    assert measured == 11 or len(search) == 33  # a repeated allocation uses no round (3 attempts per round at most)
    assert len(search) > measured  # this tiny model's coarse channel grid makes repeats
    origin = [a.plan_params.get("origin") for a in search]
    assert origin[:3] == [SEED] * 3 and set(origin[3:]) == {MUTATION}
    gens = [int(a.plan_params["gen"]) for a in search[3:]]
    assert gens == sorted(gens) and gens[0] == 0 and len(set(gens)) >= 2
    assert all(gens.count(g) == 4 for g in set(gens) - {max(gens)})  # lambda = 4 offspring per generation
    for a in search[3:]:  # every child mutates the best feasible attempt recorded before its generation began
        first_of_gen = next(b.index for b in search if b.plan_params.get("gen") == a.plan_params["gen"])
        pool = [b for b in search[:first_of_gen] if b.feasible and b.score is not None]
        best = max(pool, key=lambda b: (b.score, -b.index))
        assert int(a.plan_params["parent"]) == best.index
    assert all(a.within_band for a in search if a.verdict != "failed")  # the projector lands every child in band
    fams = list(pruner.structure.families)
    first_gen = [tuple(sorted(genome(a, fams, scaled=False).items())) for a in search[3:7]]
    assert len(set(first_gen)) == 4  # no child proposed twice (a two-family model runs out of new ones later)


def test_same_seed_same_plans_other_seed_other_plans(search, pruner, rb, evaluator, tmp_path):  # noqa: F811
    def run(seed: int, name: str) -> list:
        job = prune_job(pruner, rb, evaluator, tmp_path / name, rounds=8, patience=99, seed=seed, repeats_use_rounds=False)
        journal, run_id = new_run(tmp_path, name)
        from prunepilot.loop import Master

        Master(job, make_builtin("evolve", "prune"), journal, run_id, seed=seed, log=QUIET).run()
        return [a.plan for a in journal.attempts(run_id)]

    again = run(0, "again")
    assert again[:8] == [a.plan for a in search[:8]]
    assert run(1, "other")[3:] != again[3:]


def test_search_report_counts_origins_and_generations(search):
    rep = search_report(search)
    assert rep["seed"]["proposed"] == 3 and rep["mutation"]["proposed"] == len(search) - 3
    assert rep["seed"]["measured"] + rep["mutation"]["measured"] == sum(1 for a in search if a.verdict != "repeat")
    assert rep["generations"] >= 2
    assert rep["seed"]["became_best"] >= 1
    assert sum(r["became_best"] for k, r in rep.items() if k != "generations") >= 1


def _llm_reply(messages, schema) -> str:
    text = messages[-1].content
    assert "evolutionary search: the best so far is attempt" in text  # the analyst reads the search state
    return json.dumps({"ratios": {"b1.*": 0.2, "b2.*": 0.6}, "default_ratio": 0.4, "importance": "l2", "round_to": 8,
                       "rationale": "steer: prune the second stage harder"})


def test_scripted_analyst_proposals_enter_and_compete(pruner, rb, evaluator, tmp_path):  # noqa: F811
    strategist, name = make_strategist("evolve+x", "prune", client=ScriptedClient(_llm_reply))
    assert isinstance(strategist, PruneEvolveStrategist) and name.startswith("evolve+llm:")
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=8, patience=8)
    journal, run_id = new_run(tmp_path)
    run_master(job, strategist, journal, run_id)
    attempts = journal.attempts(run_id)
    llm = [a for a in attempts if a.plan_params.get("origin") == LLM]
    assert len(llm) == 1 and llm[0].index == 6 and llm[0].llm_calls >= 1  # every 4th offspring slot
    assert llm[0].within_band and llm[0].score is not None and not llm[0].fallback_reason
    assert len(journal.llm_calls(run_id)) >= 1  # journaled, replayable


def test_a_useless_analyst_falls_back_to_a_mutation(pruner, rb, evaluator, tmp_path):  # noqa: F811
    strategist, _ = make_strategist("evolve+x", "prune", client=ScriptedClient(lambda m, s: "no JSON here"))
    job = prune_job(pruner, rb, evaluator, tmp_path / "out", rounds=7, patience=7)
    journal, run_id = new_run(tmp_path)
    run_master(job, strategist, journal, run_id)
    slot = journal.attempts(run_id)[6]
    assert slot.fallback_reason and slot.plan_params.get("origin") == MUTATION and slot.within_band


def test_prune_api_with_evolve_spends_every_round(tmp_path):
    from tiny_models import make

    model, x = make("residual")
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(192, 3, 32, 32, generator=g), torch.randint(0, 10, (192,), generator=g)
    train = DataLoader(TensorDataset(xs, ys), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(xs[:64], ys[:64]), batch_size=64)
    res = prunepilot.prune(model, x[:1], target_macs=0.5, train=train, val=val, agent="evolve", rounds=6,
                           finetune_steps=1, finetune_epochs=0.0, history=False, out=tmp_path / "run", log=None)
    assert res.within_band
    raw = res.raw
    # patience (4 rounds without a new best) does not end a search; a repeated allocation uses no round
    assert raw["evals"] == 6 or raw["rounds"] == 18
    assert raw["search"]["seed"]["proposed"] == 3 and raw["search"]["mutation"]["proposed"] == raw["rounds"] - 3
    assert Path(tmp_path / "run" / "result.json").exists()
