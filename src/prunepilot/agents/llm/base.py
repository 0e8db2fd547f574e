"""LLMClient: the one interface every backend (Anthropic, OpenAI-compatible, local GGUF, replay) implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class LLMReply:
    """What came back: the parsed JSON object (or None when unparseable) and the raw text, for the journal."""

    text: str
    data: dict[str, Any] | None
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


class LLMError(RuntimeError):
    """A backend failed after its retries (network, auth, rate limit, timeout)."""


class LLMClient(Protocol):
    name: str

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        """Return a reply whose `data` should conform to `schema` (JSON Schema). Never raises on bad JSON:
        `data` is None then, and the caller repairs or falls back."""
        ...
