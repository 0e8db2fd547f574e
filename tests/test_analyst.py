"""LLMAnalyst with a scripted client: parsing, clamping, repair, fallback, prompts, no hidden state."""

from __future__ import annotations

import json

import pytest

from prunepilot.agents.analyst import (
    LLMAnalyst,
    Names,
    ProposeResult,
    build_messages,
    clamp_plan_data,
    history_table,
    narrow_schema,
    parse_plan,
    profile_names,
)
from prunepilot.agents.llm.base import LLMError, LLMReply
from prunepilot.agents.llm.parsing import messages_hash
from prunepilot.agents.llm.replay import ReplayClient
from prunepilot.agents.llm.scripted import ScriptedClient
from prunepilot.errors import PlanError
from prunepilot.plan import MAX_RATIO, Plan

PROFILE = {
    "model": "resnet20",
    "families": {
        "layer1.*.conv1": {"groups": ["layer1.0.conv1", "layer1.1.conv1"], "width": 16, "mac_share": 0.3,
                           "param_share": 0.05, "latency_share": 0.35, "sensitivity_z": 1.2},
        "layer2.*.conv1": {"groups": ["layer2.0.conv1", "layer2.1.conv1"], "width": 32, "mac_share": 0.3,
                           "param_share": 0.2, "latency_share": 0.3, "sensitivity_z": 0.1},
        "layer3.*.conv1": {"groups": ["layer3.0.conv1", "layer3.1.conv1"], "width": 64, "mac_share": 0.4,
                           "param_share": 0.75, "latency_share": 0.35, "sensitivity_z": -1.3},
    },
}
BUDGET = {"goals": {"macs": 20_000_000}, "band": {"lower": -0.05, "upper": 0.01}}
GOOD = {"ratios": {"layer1.*.conv1": 0.1, "layer2.*.conv1": 0.3, "layer3.*.conv1": 0.6},
        "importance": "taylor", "round_to": 8, "rationale": "prune the insensitive, costly stage 3 most"}


class Fallback:
    """A stand-in built-in strategist: uniform, records that it was asked."""

    def __init__(self, as_result: bool = False) -> None:
        self.calls: list[tuple] = []
        self.as_result = as_result

    def propose(self, profile, budget, history, *, seed=0):
        self.calls.append((profile, budget, history, seed))
        plan = Plan(default_ratio=0.4, rationale=f"uniform (seed {seed})")
        return ProposeResult(plan=plan) if self.as_result else plan


def analyst(replies, fallback=None, **kw) -> tuple[LLMAnalyst, ScriptedClient, Fallback]:
    client = ScriptedClient(replies)
    fb = fallback or Fallback()
    return LLMAnalyst(client, fb, **kw), client, fb


def test_valid_json_becomes_a_plan_in_one_call():
    a, client, fb = analyst([GOOD])
    res = a.propose(PROFILE, BUDGET, [])
    assert isinstance(res, ProposeResult) and res.fallback_reason is None and not res.used_fallback
    assert res.plan.ratios == GOOD["ratios"] and res.plan.importance == "taylor" and res.plan.round_to == 8
    assert len(res.llm_calls) == 1 and fb.calls == []
    call = res.llm_calls[0]
    assert call["status"] == "ok" and call["kind"] == "propose" and call["model"] == "scripted"
    assert call["messages"][0]["role"] == "system" and json.loads(call["reply"]) == GOOD
    assert call["messages_hash"] == messages_hash(client.calls[0][0])
    for key in ("input_tokens", "output_tokens", "latency_s", "data", "error", "clamped"):
        assert key in call


def test_json_inside_prose_and_fences_is_accepted():
    a, _, _ = analyst([f"Here is my plan:\n```json\n{json.dumps(GOOD)}\n```\nGood luck."])
    assert a.propose(PROFILE, BUDGET, []).plan.ratios["layer3.*.conv1"] == 0.6


def test_unknown_layer_name_is_repaired_once():
    bad = {**GOOD, "ratios": {"layer4.*.conv1": 0.5}}
    a, client, fb = analyst([bad, GOOD])
    res = a.propose(PROFILE, BUDGET, [])
    assert res.fallback_reason is None and res.plan.ratios == GOOD["ratios"]
    assert [c["status"] for c in res.llm_calls] == ["invalid", "ok"]
    assert [c["kind"] for c in res.llm_calls] == ["propose", "repair"]
    assert "layer4.*.conv1" in res.llm_calls[0]["error"]
    repair_msgs = client.calls[1][0]
    assert [m.role for m in repair_msgs] == ["system", "user", "assistant", "user"]
    assert "layer4.*.conv1" in repair_msgs[-1].content and "rejected" in repair_msgs[-1].content
    assert json.loads(repair_msgs[2].content) == bad  # the model sees what it said
    assert fb.calls == []


def test_double_failure_falls_back_with_reason():
    a, client, fb = analyst(["I think you should prune 50%.", {"ratios": {"layer1.*.conv1": "lots"}}])
    res = a.propose(PROFILE, BUDGET, [{"plan": GOOD}], seed=7)
    assert res.used_fallback and res.plan.rationale == "uniform (seed 7)"
    assert "2 tries" in res.fallback_reason and "ratios.layer1.*.conv1" in res.fallback_reason
    assert [c["status"] for c in res.llm_calls] == ["invalid", "invalid"]
    assert "not a JSON object" in res.llm_calls[0]["error"]
    assert len(fb.calls) == 1 and fb.calls[0][3] == 7 and fb.calls[0][2] == [{"plan": GOOD}]


def test_fallback_may_return_a_propose_result():
    a, _, _ = analyst(["x", "y"], fallback=Fallback(as_result=True))
    res = a.propose(PROFILE, BUDGET, [])
    assert res.used_fallback and res.plan.default_ratio == 0.4 and len(res.llm_calls) == 2


def test_backend_error_falls_back_without_repair():
    a, client, fb = analyst([LLMError("the Anthropic request failed after 4 attempts: 529")])
    res = a.propose(PROFILE, BUDGET, [])
    assert res.used_fallback and "LLM call failed" in res.fallback_reason and "529" in res.fallback_reason
    assert len(client.calls) == 1 and res.llm_calls[0]["status"] == "error"


def test_fallback_returning_garbage_is_an_error():
    class Bad:
        def propose(self, profile, budget, history, *, seed=0):
            return {"ratios": {}}

    a = LLMAnalyst(ScriptedClient(["x", "y"]), Bad())
    with pytest.raises(PlanError, match="fallback strategist"):
        a.propose(PROFILE, BUDGET, [])


def test_ratios_are_clamped_not_rejected():
    wild = {**GOOD, "ratios": {"layer1.*.conv1": -0.2, "layer2.*.conv1": 3.0, "layer3.*.conv1": 0.95}, "default_ratio": 1.5}
    a, _, _ = analyst([wild])
    res = a.propose(PROFILE, BUDGET, [])
    assert res.fallback_reason is None
    assert res.plan.ratios == {"layer1.*.conv1": 0.0, "layer2.*.conv1": MAX_RATIO, "layer3.*.conv1": MAX_RATIO}
    assert res.plan.default_ratio == MAX_RATIO
    assert len(res.llm_calls[0]["clamped"]) == 4


def test_clamp_leaves_non_numbers_for_validation():
    data, notes = clamp_plan_data({"ratios": {"a": "x", "b": True, "c": 0.5}})
    assert data["ratios"] == {"a": "x", "b": True, "c": 0.5} and notes == []


def test_extra_keys_and_bad_regex_are_invalid():
    names = profile_names(PROFILE)
    plan, err, _ = parse_plan(LLMReply(json.dumps({**GOOD, "code": "import os"}), None, "m"), names)
    assert plan is None and "code" in err
    plan, err, _ = parse_plan(LLMReply(json.dumps({"ratios": {"re:layer9": 0.5}}), None, "m"), names)
    assert plan is None and "regex" in err
    plan, err, _ = parse_plan(LLMReply(json.dumps({"ratios": {"re:layer[12]": 0.5}}), None, "m"), names)
    assert plan is not None and err is None


def test_all_zero_shape_is_rejected():
    zero = {"ratios": {f: 0.0 for f in PROFILE["families"]}, "default_ratio": 0.0}
    plan, err, _ = parse_plan(LLMReply(json.dumps(zero), None, "m"), profile_names(PROFILE))
    assert plan is None and "every ratio is 0" in err


def test_group_names_are_accepted_too():
    a, _, _ = analyst([{"ratios": {"layer2.1.conv1": 0.5}, "protected": ["layer1.*.conv1"]}])
    res = a.propose(PROFILE, BUDGET, [])
    assert res.fallback_reason is None and res.plan.protected == ["layer1.*.conv1"]


def test_profile_names_accepts_several_shapes():
    n = profile_names({"families": [{"name": "f1", "members": ["g1", {"name": "g2"}]}],
                       "groups": [{"name": "g3", "family": "f2"}, "g1"], "layers": [{"name": "fc"}, "conv"]})
    assert n.families == ["f1", "f2"] and n.groups == ["g1", "g2", "g3"] and n.layers == ["fc", "conv"]
    assert profile_names({}).families == []


def test_prompt_contains_schema_profile_budget_history_guidance():
    history = [
        {"round": 1, "plan": GOOD, "projected": {"scale": 0.8, "ratios": {"layer1.0.conv1": 0.08}},
         "achieved": {"macs": 19_500_000, "macs_error": -0.025}, "accuracy": 0.71, "verdict": "in_band",
         "rationale": "stage 3 is cheap to lose", "reflection": "accuracy fell 18 points; stage 1 suffered",
         "guidance": ["oscillation: ratios for layer2 flipped sign 3 times", "oscillation: ratios for layer2 flipped sign 3 times"]},
    ]
    msgs = build_messages(PROFILE, BUDGET, history, Plan.model_json_schema())
    system, user = msgs[0].content, msgs[1].content
    assert '"default_ratio"' in system and "SHAPE" in system and "0.9" in system
    assert "layer3.*.conv1" in user and "20000000" in user and "sensitivity_z" in user
    assert "| 1 |" in user and "in_band" in user and "0.71" in user and "scale=0.8" in user
    assert "accuracy fell 18 points" in user and "stage 3 is cheap to lose" in user
    assert user.count("oscillation: ratios for layer2") == 1  # guidance deduplicated
    assert "$" not in user.replace("$defs", "")  # every template placeholder filled


def test_history_table_keeps_the_last_rows_and_counts_the_rest():
    hist = [{"plan": {"ratios": {"a": i / 10}}, "verdict": "over"} for i in range(12)]
    table = history_table(hist, max_rows=3)
    assert "(9 earlier attempts not shown.)" in table and table.count("| over |") == 3
    assert history_table([]).startswith("No attempts yet")


def test_no_hidden_state_same_inputs_same_prompt():
    client = ScriptedClient([GOOD, GOOD])
    a = LLMAnalyst(client, Fallback())
    r1 = a.propose(PROFILE, BUDGET, [])
    r2 = a.propose(PROFILE, BUDGET, [])
    assert client.calls[0][0] == client.calls[1][0] and r1.plan == r2.plan


def test_replayed_run_gives_same_plans_and_divergence_is_caught():
    a, client, _ = analyst([{**GOOD, "ratios": {"bogus": 1}}, GOOD])
    recorded = a.propose(PROFILE, BUDGET, []).llm_calls
    transcripts = [{"messages_hash": c["messages_hash"], "text": c["reply"]} for c in recorded]
    replayed = LLMAnalyst(ReplayClient(transcripts), Fallback()).propose(PROFILE, BUDGET, [])
    assert replayed.plan.ratios == GOOD["ratios"] and [c["status"] for c in replayed.llm_calls] == ["invalid", "ok"]
    # a different budget means a different prompt: the replay refuses and the analyst falls back, saying why
    other = LLMAnalyst(ReplayClient(transcripts), Fallback()).propose(PROFILE, {"goals": {"macs": 1}}, [])
    assert other.used_fallback and "diverged" in other.fallback_reason


def test_schema_mode_narrow_for_constrained_clients():
    client = ScriptedClient([GOOD])
    client.constrained = True  # what LocalClient declares
    a = LLMAnalyst(client, Fallback())
    a.propose(PROFILE, BUDGET, [])
    schema = client.calls[0][1]
    assert set(schema["properties"]["ratios"]["properties"]) == set(PROFILE["families"])
    assert schema["required"][0] == "rationale"
    plain = ScriptedClient([GOOD])
    LLMAnalyst(plain, Fallback()).propose(PROFILE, BUDGET, [])
    assert plain.calls[0][1] == Plan.model_json_schema()


def test_narrow_schema_instances_are_valid_plans():
    names = Names(["f1", "f2"], ["g1"], None)
    s = narrow_schema(names)
    ratio = s["properties"]["ratios"]["properties"]["f1"]
    assert max(ratio["enum"]) == MAX_RATIO and min(ratio["enum"]) == 0.05
    sample = {"rationale": "x", "ratios": {"f1": 0.9, "f2": 0.05}, "importance": "l1", "round_to": 16}
    Plan.model_validate(sample).check_names(names.groups, names.families)
    many = narrow_schema(Names([f"f{i}" for i in range(20)], [], None))
    assert "required" not in many["properties"]["ratios"] and "default_ratio" in many["required"]


def test_keys_never_reach_the_call_records(monkeypatch):
    secret = "sk-ant-api03-SECRETSECRETSECRET-xyz"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    a, _, _ = analyst([f"my key is {secret}", LLMError(f"auth failed for {secret}")])
    res = a.propose(PROFILE, BUDGET, [])
    dumped = json.dumps(res.llm_calls) + str(res.fallback_reason)
    assert secret not in dumped and "[REDACTED]" in dumped


# The shapes prunepilot's own profile (Profile.compact) and master (history records) produce.
COMPACT = {
    "model": "file:resnet20.pt",
    "dense": {"macs": 40.8e6, "params": 2.7e5},
    "families": [
        {"family": "layer1.*.conv1", "kind": "conv_channels", "groups": 3, "width": [16], "macs_share": 0.3,
         "params_share": 0.05, "latency_share": 0.3, "sensitivity_z": 1.0},
        {"family": "layer2.*.conv1", "kind": "conv_channels", "groups": 3, "width": [32], "macs_share": 0.3,
         "params_share": 0.2, "latency_share": 0.3, "sensitivity_z": -1.0},
    ],
    "groups": ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.1.conv1", "layer2.2.conv1"],
    "ignored": {"fc": "output layer"},
}
MASTER_HISTORY = [
    {"round": 0, "strategist": "llm:scripted", "plan": {"ratios": {"layer1.*.conv1": 0.2, "layer2.*.conv1": 0.6},
     "rationale": "stage 2 is robust"}, "rationale": "stage 2 is robust", "fallback_reason": None, "guidance": [],
     "projected_ratios": {"layer1.0.conv1": 0.25, "layer1.1.conv1": 0.25, "layer1.2.conv1": 0.25,
                          "layer2.0.conv1": 0.5, "layer2.1.conv1": 0.5, "layer2.2.conv1": 0.75},
     "metrics": {"macs": 20.3e6, "accuracy": 0.81}, "errors": {"macs": -0.004}, "within_band": True, "verdict": "best"},
    {"round": 1, "strategist": "llm:scripted", "plan": {"ratios": {"layer1.*.conv1": 0.5}}, "rationale": "",
     "fallback_reason": "the LLM gave no valid plan", "guidance": ["stagnation: no improvement for 3 rounds"],
     "projected_ratios": {"layer1.0.conv1": 0.5}, "metrics": {"macs": 25e6, "accuracy": 0.7},
     "errors": {"macs": 0.23}, "within_band": False, "verdict": "infeasible"},
]


def test_prunepilot_profile_and_master_history_shapes():
    names = profile_names(COMPACT)
    assert names.families == ["layer1.*.conv1", "layer2.*.conv1"] and len(names.groups) == 6
    user = build_messages(COMPACT, BUDGET, MASTER_HISTORY, Plan.model_json_schema())[1].content
    assert "layer1.*.conv1=0.25" in user and "layer2.*.conv1=0.583" in user  # per-family mean of projection
    assert "macs -0.4%" in user and "in band" in user and "OUT of band" in user and "0.81" in user
    assert "(-0.11 vs previous)" in user and "built-in strategist answered" in user
    assert "stagnation: no improvement for 3 rounds" in user and "stage 2 is robust" in user
    a, _, _ = analyst([{"ratios": {"layer2.*.conv1": 0.7, "layer1.*.conv1": 0.1}}])
    assert a.propose(COMPACT, BUDGET, MASTER_HISTORY).fallback_reason is None
    a, _, _ = analyst([{"ratios": {"layer3.*.conv1": 0.7}}, {"ratios": {"layer9": 1}}])
    assert a.propose(COMPACT, BUDGET, MASTER_HISTORY).used_fallback
