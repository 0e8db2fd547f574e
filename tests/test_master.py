"""The agent loop on a tiny model and synthetic data: strategist conformance, divergence rules, journal,
resume after a crash, replay from transcripts."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import TensorDataset

from prunepilot.agents.master import Evaluator, Master, SearchConfig, divergence_guidance
from prunepilot.agents.strategists import BUILTINS, make_builtin
from prunepilot.budget import Budget
from prunepilot.journal import Journal
from prunepilot.pipeline import Pruner
from prunepilot.plan import Plan
from prunepilot.sources.data import DataBundle, Normalization
from prunepilot.sources.models import LoadedModel

from tiny_models import make


@pytest.fixture(scope="module")
def pruner():
    model, x = make("residual")
    return Pruner(LoadedModel(model, x[:1], "py:tiny", "tiny"), latency_runs=0)


@pytest.fixture(scope="module")
def bundle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    ds = TensorDataset(x, y)
    return DataBundle(ds, ds, ds, 10, (3, 32, 32), "synthetic", "random tensors", Normalization((0.0,), (1.0,)))


def _budget(pruner):
    return Budget.parse(macs="50%").resolve(pruner.profile.dense)


def _history_entry(rnd, acc, ratios=None, within=True):
    return {"round": rnd, "plan": Plan(default_ratio=0.3, rationale=f"alpha={0.3 * rnd}").model_dump(),
            "projected_ratios": ratios or {"a": 0.1 * rnd}, "metrics": {"accuracy": acc}, "within_band": within,
            "verdict": "worse"}


class StrategistConformance:
    """Every strategist: valid plans whose names exist, deterministic for a seed, tolerant of any history."""

    def make(self):
        raise NotImplementedError

    uses_history = True

    def test_valid_plan_with_known_names(self, pruner):
        plan = self.make().propose(pruner.profile.compact(), _budget(pruner).to_json(), [], seed=0)
        plan = getattr(plan, "plan", plan)
        assert isinstance(plan, Plan)
        plan.check_names(list(pruner.structure.groups), list(pruner.structure.families))
        assert plan.rationale

    def test_deterministic_with_seed(self, pruner):
        prof, bud = pruner.profile.compact(), _budget(pruner).to_json()
        hist = [_history_entry(0, 0.5), _history_entry(1, 0.6)]
        a = getattr(self.make().propose(prof, bud, hist, seed=3), "plan", None) or self.make().propose(prof, bud, hist, seed=3)
        b = getattr(self.make().propose(prof, bud, hist, seed=3), "plan", None) or self.make().propose(prof, bud, hist, seed=3)
        assert a.model_dump() == b.model_dump()

    def test_uses_history(self, pruner):
        if not self.uses_history:
            pytest.skip("this strategist is history-free by design")
        prof, bud = pruner.profile.compact(), _budget(pruner).to_json()
        plans = set()
        hist: list[dict] = []
        for r in range(4):
            p = self.make().propose(prof, bud, hist, seed=0)
            p = getattr(p, "plan", p)
            plans.add(json.dumps(p.model_dump(), sort_keys=True))
            hist.append(_history_entry(r, 0.5 + 0.01 * r, ratios=p.ratios))
        assert len(plans) > 1


class TestUniform(StrategistConformance):
    uses_history = False

    def make(self):
        return make_builtin("uniform")


class TestGrid(StrategistConformance):
    def make(self):
        return make_builtin("grid")


class TestSensitivity(StrategistConformance):
    def make(self):
        return make_builtin("sensitivity")


class TestOptuna(StrategistConformance):
    def make(self):
        return make_builtin("optuna")


class TestScriptedLLMAnalyst(StrategistConformance):
    def make(self):
        from prunepilot.agents.analyst import LLMAnalyst
        from prunepilot.agents.llm.scripted import ScriptedClient

        def reply(messages, schema):
            # a scripted "analyst" that reads the history table length from the prompt
            n = sum(m.content.count("| ") for m in messages if m.role == "user")
            return json.dumps({"default_ratio": round(0.2 + (n % 5) * 0.1, 2), "importance": "l2", "round_to": 4,
                               "rationale": "scripted"})

        return LLMAnalyst(ScriptedClient(reply), make_builtin("sensitivity"))


def test_builtins_table_complete():
    assert set(BUILTINS) == {"uniform", "grid", "sensitivity", "optuna"}


def test_divergence_rules():
    h = [_history_entry(0, 0.8, {"a": 0.2}), _history_entry(1, 0.7, {"a": 0.3}), _history_entry(2, 0.3, {"a": 0.2})]
    notes = " ".join(divergence_guidance(h))
    assert "repeated plan" in notes and "accuracy collapse" in notes
    h = [_history_entry(i, a, {"a": i}) for i, a in enumerate([0.9, 0.5, 0.6, 0.5, 0.6, 0.5])]
    notes = " ".join(divergence_guidance(h))
    assert "stagnation" in notes and "oscillation" in notes
    assert divergence_guidance(h[:1]) == []


class _Crash(RuntimeError):
    pass


class CrashingStrategist:
    name = "crashing"

    def __init__(self, crash_at: int) -> None:
        self.inner = make_builtin("grid")
        self.crash_at = crash_at

    def propose(self, profile, budget, history, *, seed=0):
        if len(history) == self.crash_at:
            raise _Crash("simulated crash mid-search")
        return self.inner.propose(profile, budget, history, seed=seed)


def test_master_loop_journal_and_resume(tmp_path, pruner, bundle):
    cfg = SearchConfig(rounds=3, finetune_steps=2, eval_limit=64, bn_batches=2, batch_size=32, patience=10)
    journal = Journal(tmp_path / "j.sqlite")
    run_id = journal.start_run("prune", {"test": True}, tmp_path)
    ev = Evaluator(bundle, pruner.dense, cfg)
    rb = _budget(pruner)
    with pytest.raises(_Crash):
        Master(pruner, rb, CrashingStrategist(2), ev, journal, run_id, tmp_path, cfg, log=lambda s: None).run()
    assert len(journal.attempts(run_id)) == 2  # finished attempts survive the crash
    assert (tmp_path / "best_model.pt").exists()  # anytime: the best so far is on disk
    best = Master(pruner, rb, CrashingStrategist(99), ev, journal, run_id, tmp_path, cfg, log=lambda s: None).run()
    attempts = journal.attempts(run_id)
    assert [a["round"] for a in attempts] == [0, 1, 2]
    assert best is not None and best["within_band"]
    assert all(a["within_band"] for a in attempts)
    assert attempts[2]["plan"]["importance"] == "taylor"  # grid continued where it stopped
    lines = (tmp_path / "attempts.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["metrics"]["accuracy"] is not None


def test_llm_rounds_are_journaled_and_replayable(tmp_path, pruner, bundle):
    from prunepilot.agents.analyst import LLMAnalyst
    from prunepilot.agents.llm.replay import ReplayClient
    from prunepilot.agents.llm.scripted import ScriptedClient

    replies = [json.dumps({"default_ratio": r, "round_to": 4, "importance": "l1", "rationale": f"r{r}"}) for r in (0.2, 0.4)]
    cfg = SearchConfig(rounds=2, finetune_steps=0, eval_limit=64, bn_batches=1, batch_size=32, patience=10)
    ev = Evaluator(bundle, pruner.dense, cfg)
    rb = _budget(pruner)
    j1 = Journal(tmp_path / "a.sqlite")
    r1 = j1.start_run("prune", {}, tmp_path / "a")
    (tmp_path / "a").mkdir()
    Master(pruner, rb, LLMAnalyst(ScriptedClient(replies), make_builtin("uniform")), ev, j1, r1, tmp_path / "a", cfg, log=lambda s: None).run()
    calls = j1.llm_calls(r1)
    assert len(calls) == 2 and all(c["status"] == "ok" for c in calls)
    j2 = Journal(tmp_path / "b.sqlite")
    r2 = j2.start_run("prune", {}, tmp_path / "b")
    (tmp_path / "b").mkdir()
    Master(pruner, rb, LLMAnalyst(ReplayClient(calls), make_builtin("uniform")), ev, j2, r2, tmp_path / "b", cfg, log=lambda s: None).run()
    a1 = [a["plan"] for a in j1.attempts(r1)]
    a2 = [a["plan"] for a in j2.attempts(r2)]
    assert a1 == a2 and a1[0]["rationale"] == "r0.2"


@pytest.mark.slow
def test_real_local_analyst_drives_the_loop(tmp_path, pruner, bundle):
    """End to end with the real SmolLM2 analyst (schema-constrained, in-process): its plan is projected,
    applied and scored, and the call is journaled."""
    from prunepilot.agents.llm.factory import local_available
    from prunepilot.search import make_strategist

    if not local_available():
        pytest.skip("local LLM backend not installed")
    strategist, spec = make_strategist("local")
    cfg = SearchConfig(rounds=1, finetune_steps=0, eval_limit=64, bn_batches=1, batch_size=32)
    journal = Journal(tmp_path / "j.sqlite")
    run_id = journal.start_run("prune", {}, tmp_path)
    best = Master(pruner, _budget(pruner), strategist, Evaluator(bundle, pruner.dense, cfg), journal, run_id, tmp_path, cfg,
                  log=lambda s: None).run()
    (attempt,) = journal.attempts(run_id)
    calls = journal.llm_calls(run_id)
    assert calls and calls[0]["model"]
    assert attempt["within_band"] and best is not None
    if attempt["fallback_reason"] is None:
        assert calls[0]["status"] == "ok"
