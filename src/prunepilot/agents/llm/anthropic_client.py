"""Anthropic backend (official `anthropic` SDK). Structured output through a forced tool call whose input
schema is the requested JSON schema; the SDK is imported only when the client is built."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Any

from ...errors import require
from .base import LLMError, LLMReply, Message
from .parsing import extract_json
from .retry import KEY_ENV, RetryPolicy, call_with_retry, read_api_key

DEFAULT_MODEL = "claude-sonnet-4-5"
_TOOL = "submit_plan"


class AnthropicClient:
    """`complete(messages, schema)` via Messages API + tool use (temperature 0, as AgenticPruner)."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        api_key: str | None = None,
        max_tokens: int = 2048,
        temperature: float = 0.0,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Any] = time.sleep,
        sdk_client: Any | None = None,
    ) -> None:
        self.name = f"anthropic:{model}"
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry = retry
        self._sleep = sleep
        self._rng = random.Random(0)
        if sdk_client is None:
            key = read_api_key("anthropic", api_key)
            if not key:
                raise LLMError(
                    "the Anthropic backend needs an API key and none was found; "
                    f"fix: export {KEY_ENV['anthropic']}=... or pass --llm-api-key"
                )
            anthropic = require("anthropic", "anthropic", "the Anthropic analyst backend")
            # Our own retry loop (max_retries=0) so backoff and messages are the same for every backend.
            sdk_client = anthropic.Anthropic(api_key=key, max_retries=0, timeout=retry.timeout_s)
        self._sdk = sdk_client

    def __repr__(self) -> str:  # never show the key
        return f"AnthropicClient(model={self.model!r})"

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        system = "\n\n".join(m.content for m in messages if m.role == "system")
        turns = [{"role": m.role, "content": m.content} for m in messages if m.role != "system"]
        tool = {
            "name": _TOOL,
            "description": "Submit the compression plan as a JSON object matching the input schema.",
            "input_schema": _as_object_schema(schema),
        }
        kwargs: dict[str, Any] = dict(
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            messages=turns,
            tools=[tool],
            tool_choice={"type": "tool", "name": _TOOL},
        )
        if system:
            kwargs["system"] = system
        t0 = time.perf_counter()
        resp, attempts = call_with_retry(
            lambda: self._sdk.messages.create(**kwargs),
            what=f"the Anthropic request ({self.model})",
            policy=self.retry,
            sleep=self._sleep,
            rng=self._rng,
            key_env=KEY_ENV["anthropic"],
        )
        latency = time.perf_counter() - t0
        data: dict[str, Any] | None = None
        texts: list[str] = []
        for block in getattr(resp, "content", []) or []:
            btype = getattr(block, "type", None)
            if btype == "tool_use" and isinstance(getattr(block, "input", None), dict):
                data = dict(block.input)
            elif btype == "text":
                texts.append(getattr(block, "text", ""))
        text = json.dumps(data) if data is not None else "\n".join(texts)
        if data is None:
            data = extract_json(text)
        usage = getattr(resp, "usage", None)
        return LLMReply(
            text=text,
            data=data,
            model=str(getattr(resp, "model", self.model)),
            input_tokens=int(getattr(usage, "input_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            latency_s=latency,
            meta={"attempts": attempts, "stop_reason": getattr(resp, "stop_reason", None), "mode": "tool_use"},
        )


def _as_object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Tool input schemas must be objects; wrap anything else (never the case for a Plan)."""
    if schema.get("type") == "object":
        return schema
    return {"type": "object", "properties": {"value": schema}, "required": ["value"]}
