"""OpenAI and OpenAI-compatible backends (official `openai` SDK; vLLM, Ollama, llama.cpp server through
`base_url`). Structured output by `response_format` json_schema where the server supports it, falling back to
json_object, then to plain text with JSON instructions (already in the prompt)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from ...errors import require
from .base import LLMError, LLMReply, Message
from .parsing import extract_json
from .retry import KEY_ENV, LLMRequestError, RetryPolicy, call_with_retry, read_api_key

DEFAULT_MODEL = "gpt-4o"
MODES = ("json_schema", "json_object", "plain")


class OpenAIClient:
    """`complete(messages, schema)` via Chat Completions. The first mode the server accepts is remembered."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        max_tokens: int = 2048,
        temperature: float | None = 0.0,
        mode: str = "json_schema",
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Any] = time.sleep,
        sdk_client: Any | None = None,
    ) -> None:
        if mode not in MODES:
            raise LLMError(f"unknown response mode {mode!r}; fix: use one of {', '.join(MODES)}")
        self.name = f"openai:{model}" if base_url is None else f"openai-compatible:{model}@{base_url}"
        self.model = model
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.mode = mode
        self._use_completion_tokens = False
        self.retry = retry
        self._sleep = sleep
        self._rng = random.Random(0)
        if sdk_client is None:
            key = read_api_key("openai", api_key)
            if not key and base_url is None:
                raise LLMError(
                    "the OpenAI backend needs an API key and none was found; "
                    f"fix: export {KEY_ENV['openai']}=... or pass --llm-api-key "
                    "(local OpenAI-compatible servers need --llm-base-url instead)"
                )
            openai = require("openai", "openai", "the OpenAI / OpenAI-compatible analyst backend")
            # Local servers (vLLM, Ollama, llama.cpp) ignore the key but the SDK insists on one.
            sdk_client = openai.OpenAI(
                api_key=key or "not-needed", base_url=base_url, max_retries=0, timeout=retry.timeout_s
            )
        self._sdk = sdk_client

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIClient(model={self.model!r}, base_url={self.base_url!r}, mode={self.mode!r})"

    def _response_format(self, mode: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        if mode == "json_schema":
            # strict=False: OpenAI's strict mode forbids optional fields, and the Plan has defaults.
            return {"type": "json_schema", "json_schema": {"name": "plan", "schema": schema, "strict": False}}
        if mode == "json_object":
            return {"type": "json_object"}
        return None

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        msgs = [{"role": m.role, "content": m.content} for m in messages]
        t0 = time.perf_counter()
        downgrades: list[str] = []
        while True:
            kwargs: dict[str, Any] = dict(model=self.model, messages=msgs)
            kwargs["max_completion_tokens" if self._use_completion_tokens else "max_tokens"] = self.max_tokens
            if self.temperature is not None:
                kwargs["temperature"] = self.temperature
            fmt = self._response_format(self.mode, schema)
            if fmt is not None:
                kwargs["response_format"] = fmt
            try:
                resp, attempts = call_with_retry(
                    lambda: self._sdk.chat.completions.create(**kwargs),
                    what=f"the {self.name} request",
                    policy=self.retry,
                    sleep=self._sleep,
                    rng=self._rng,
                    key_env=None if self.base_url else KEY_ENV["openai"],
                )
                break
            except LLMRequestError as exc:
                text = str(exc).lower()
                # Reasoning models refuse `max_tokens` (want max_completion_tokens) and a temperature of 0.
                if exc.status in (400, 422) and "max_tokens" in text and not self._use_completion_tokens:
                    self._use_completion_tokens = True
                    downgrades.append("max_tokens -> max_completion_tokens")
                    continue
                if exc.status in (400, 422) and "temperature" in text and self.temperature is not None:
                    self.temperature = None
                    downgrades.append("temperature dropped")
                    continue
                # 400/422 with a response_format: the server does not support it; try the next weaker mode.
                if exc.status in (400, 422) and self.mode != "plain":
                    downgrades.append(f"{self.mode}: {str(exc)[:120]}")
                    self.mode = MODES[MODES.index(self.mode) + 1]
                    continue
                raise
        latency = time.perf_counter() - t0
        choice = resp.choices[0]
        text = getattr(choice.message, "content", None) or ""
        usage = getattr(resp, "usage", None)
        return LLMReply(
            text=text,
            data=extract_json(text),
            model=str(getattr(resp, "model", None) or self.model),
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            latency_s=latency,
            meta={"attempts": attempts, "mode": self.mode, "downgrades": downgrades,
                  "finish_reason": getattr(choice, "finish_reason", None)},
        )
