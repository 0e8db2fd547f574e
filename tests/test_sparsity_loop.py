"""Sparsify orchestration on a tiny random Llama: sequential engines, loop with rollback, the LLM analyst
(scripted fake client: valid, repaired, fallback), export reload, and one end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from prunepilot.agents.llm.base import LLMReply, Message
from prunepilot.engines import sparsity as sp
from prunepilot.sparsify.analyst import LLMSparsityAnalyst
from prunepilot.sparsify.calibrate import (activation_norms, gradient_importance, linear_layers,
                                           sequential_sparsify)
from prunepilot.sparsify.export import save_and_verify
from prunepilot.sparsify.loop import LoopConfig, Probe, probe_costs, run_loop
from prunepilot.sparsify.plan import global_sparsity, project
from prunepilot.sparsify.profile import WandaBank, build_profile
from prunepilot.sparsify.strategies import (OWLStrategist, SensitivityStrategist, StepContext,
                                            UniformStrategist)

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


def _ctx(setup: dict[str, Any], level: float = 0.5) -> StepContext:
    return StepContext(setup["profile"], setup["infos"], 0.5, level,
                       {i.name: 0.0 for i in setup["infos"]})


@pytest.mark.parametrize("strategist", [UniformStrategist(), OWLStrategist(), SensitivityStrategist()])
def test_builtin_strategists_project_to_target(setup: dict[str, Any], strategist: Any) -> None:
    from prunepilot.sparsify.plan import resolve

    plan = strategist.propose(_ctx(setup))
    counts = project(resolve(plan, setup["infos"], setup["profile"].groups, {}), setup["infos"], 0.5)
    total = sum(i.params for i in setup["infos"])
    assert sum(counts.values()) == round(0.5 * total)


def test_loop_rolls_back_and_still_ends_exactly_at_target(setup: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = []
    cfg = LoopConfig(target=0.5, step=0.2, min_step=0.05, threshold=-1.0, patience=1, max_iters=30)
    res = run_loop(setup["model"], setup["bank"], setup["infos"], setup["profile"], SensitivityStrategist(),
                   setup["probe"], cfg, record=rows.append)
    total = sum(i.params for i in setup["infos"])
    assert sum(res.counts.values()) == round(0.5 * total)
    assert res.rollbacks >= 1 and any(r["verdict"] == "rollback" for r in rows)
    assert any("rolled back" in (r.get("reflection") or "") for r in rows)
    ramp = [r for r in rows if r["phase"] == "ramp"]
    assert ramp[-1]["verdict"] in ("forced", "rollback; best candidate forced", "accept")
    setup["bank"].restore()


def test_loop_accepts_with_generous_threshold(setup: dict[str, Any]) -> None:
    cfg = LoopConfig(target=0.3, step=0.1, threshold=10.0)
    res = run_loop(setup["model"], setup["bank"], setup["infos"], setup["profile"], UniformStrategist(),
                   setup["probe"], cfg)
    assert res.rollbacks == 0 and len(res.history) == 3
    assert abs(global_sparsity({k: v / i.params for i in setup["infos"] for k, v in res.counts.items()
                                if k == i.name}, setup["infos"]) - 0.3) < 1e-3
    setup["bank"].restore()


class _WorseThenNothing:
    """Refine proposals: one allocation that piles sparsity on block 0, then nothing more."""

    name = "worse"

    def propose(self, ctx: StepContext) -> Any:
        from prunepilot.sparsify.plan import SparsityPlan

        if ctx.phase == "ramp":
            return SparsityPlan(default=ctx.level)
        if any(a["phase"] == "refine" for a in ctx.history):
            return None
        return SparsityPlan(ratios={"re:layers\\.0\\.": 0.9}, default=0.3, params={"eta": 1.0})


def test_refine_keeps_the_best_candidate_and_rolls_back_worse_ones(setup: dict[str, Any]) -> None:
    rows: list[dict[str, Any]] = []
    cfg = LoopConfig(target=0.5, step=0.25, threshold=10.0, refine_iters=3)
    res = run_loop(setup["model"], setup["bank"], setup["infos"], setup["profile"], _WorseThenNothing(),
                   setup["probe"], cfg, record=rows.append)
    assert [r["phase"] for r in rows] == ["ramp", "ramp", "refine"]  # uniform ramp == reference: not re-measured
    assert rows[-1]["verdict"] == "rollback" and "not below the best" in rows[-1]["reflection"]
    uniform = project({}, setup["infos"], 0.5)
    assert res.counts == uniform and res.probe_final.kl <= rows[-1]["probe_kl"]
    setup["bank"].restore()


def test_sensitivity_line_search_is_read_from_history() -> None:
    s = SensitivityStrategist(etas=(0.1, 0.2))
    assert s.next_eta([], 0.5) == 0.1
    hist = [{"phase": "reference", "level": 0.5, "probe_kl": 1.0, "verdict": "accept"},
            {"phase": "refine", "level": 0.5, "probe_kl": 0.8, "verdict": "accept", "params": {"eta": 0.1}},
            {"phase": "refine", "level": 0.5, "probe_kl": 0.9, "verdict": "rollback", "params": {"eta": 0.2}}]
    assert s.next_eta(hist, 0.5) == 0.15  # bisect towards the better neighbour of the best (0.2 beats 0.0)
    hist += [{"phase": "refine", "level": 0.5, "probe_kl": 0.85, "verdict": "rollback", "params": {"eta": 0.15}}]
    assert s.next_eta(hist, 0.5) == 0.125
    hist += [{"phase": "refine", "level": 0.5, "probe_kl": 0.81, "verdict": "rollback", "params": {"eta": 0.125}},
             {"phase": "refine", "level": 0.5, "probe_kl": 0.82, "verdict": "rollback", "params": {"eta": 0.05}}]
    for _ in range(10):  # bisection ends once both gaps around the best are under 0.01
        eta = s.next_eta(hist, 0.5)
        if eta is None:
            break
        hist.append({"phase": "refine", "level": 0.5, "probe_kl": 0.8 + abs(eta - 0.1), "verdict": "rollback",
                     "params": {"eta": eta}})
    assert eta is None


def test_probe_costs_fill_profile(setup: dict[str, Any]) -> None:
    probe = Probe(setup["model"], setup["probe"])
    assert probe.dense.kl < 1e-4  # the dense model against itself (float16 reference)
    probe_costs(setup["model"], setup["bank"], setup["infos"], setup["profile"], probe, 0.5, 0.1)
    assert set(setup["profile"].group_probe) == set(setup["profile"].groups)
    assert set(setup["profile"].block_probe) == {0, 1, 2}
    rows = setup["profile"].group_table()
    assert all("kl_rise_per_1pct" in r for r in rows) and len(setup["profile"].block_table()) == 3


class FakeClient:
    """Scripted LLMClient for these tests: replies in order, records every call."""

    def __init__(self, replies: list[Any]) -> None:
        self.name, self.replies, self.calls = "fake", list(replies), []

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        self.calls.append(messages)
        item = self.replies.pop(0)
        data = item if isinstance(item, dict) else None
        return LLMReply(text=json.dumps(item) if data else str(item), data=data, model="fake-1",
                        input_tokens=10, output_tokens=5, latency_s=0.01)


def test_llm_analyst_valid_reply_is_used_and_clamped(setup: dict[str, Any]) -> None:
    groups = list(setup["profile"].groups)
    calls: list[dict[str, Any]] = []
    client = FakeClient([{"ratios": {groups[0]: 1.7, groups[1]: 0.2}, "rationale": "cheap group first"}])
    plan = LLMSparsityAnalyst(client, record=calls.append).propose(_ctx(setup))
    assert plan.ratios[groups[0]] == 0.95 and plan.source == "llm:fake"
    assert len(calls) == 1 and calls[0]["model"] == "fake-1" and "target_sparsity" in calls[0]["messages"][1]["content"]


def test_llm_analyst_repairs_unknown_names_once(setup: dict[str, Any]) -> None:
    groups = list(setup["profile"].groups)
    client = FakeClient([{"ratios": {"layer.999": 0.5}, "rationale": "x"},
                         {"ratios": {groups[2]: 0.6}, "rationale": "fixed"}])
    plan = LLMSparsityAnalyst(client).propose(_ctx(setup))
    assert plan.ratios == {groups[2]: 0.6}
    assert "unknown group 'layer.999'" in client.calls[1][-1].content


def test_llm_analyst_falls_back_and_says_why(setup: dict[str, Any]) -> None:
    client = FakeClient(["no json here", {"ratios": {"bogus": 0.1}, "rationale": "?"}])
    analyst = LLMSparsityAnalyst(client)
    plan = analyst.propose(_ctx(setup))
    assert analyst.fallbacks == 1 and plan.source.startswith("sensitivity (fallback")
    assert "unusable" in plan.rationale and "bogus" in plan.rationale


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


def test_end_to_end_run_writes_results(tmp_path: Path) -> None:
    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    g = torch.Generator().manual_seed(3)
    words = " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (12000,), generator=g))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(words[i : i + 400] for i in range(0, len(words), 400)))
    groups = None

    def reply(messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        nonlocal groups
        groups = list(schema["properties"]["ratios"]["properties"])
        data = {"ratios": {g: 0.6 if "mlp" in g else 0.4 for g in groups}, "rationale": "mlp first"}
        return LLMReply(text=json.dumps(data), data=data, model="fake-1")

    client = type("C", (), {"name": "fake", "complete": staticmethod(reply)})()
    cfg = SparsifyConfig(model=f"hf:{model_dir}", sparsity="50%", agent="scripted", client=client,
                         calib=f"text:{corpus}", calib_seqs=8, calib_seqlen=32, eval_seqs=4, eval_seqlen=32,
                         probe_seqs=2, probe_seqlen=32, fidelity_seqs=1, step=0.25, rollback_threshold=10.0, refine_iters=2)
    out = tmp_path / "run"
    res = run_sparsify(cfg, out, say=lambda s: None)
    assert res["kind"] == "sparsify" and res["within_band"] and abs(res["compressed"]["sparsity"] - 0.5) < 1e-3
    assert res["loop"]["iterations"] == 5 and math.isfinite(res["compressed"]["perplexity"])
    rows = [json.loads(l) for l in (out / "attempts.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["ramp", "ramp", "reference", "refine", "refine"]
    assert 0 <= res["compressed"]["fidelity"]["top1_agreement"] <= 1
    for f in ("result.json", "plan.json", "profile.json", "summary.md", "attempts.jsonl", "llm_calls.jsonl"):
        assert (out / f).is_file(), f
    calls = [json.loads(l) for l in (out / "llm_calls.jsonl").read_text().splitlines()]
    assert len(calls) == 4 and calls[0]["model"] == "fake-1"
    from prunepilot.journal import Journal

    j = Journal(out / "journal.sqlite")
    (run,) = j.runs()
    assert run["kind"] == "sparsify" and run["status"] == "done"
    assert len(j.attempts(run["id"])) == 5 and len(j.llm_calls(run["id"])) == 4
    assert (out / "report.html").is_file()
    from typer.testing import CliRunner

    from prunepilot.cli import app

    shown = CliRunner().invoke(app, ["runs", "show", run["id"], "--journal", str(out / "journal.sqlite")])
    assert shown.exit_code == 0 and "reference" in shown.output and "probe KL" in shown.output
    assert res["export"]["identical"]


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
