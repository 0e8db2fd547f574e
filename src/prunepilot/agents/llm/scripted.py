"""ScriptedClient: a deterministic LLMClient for tests and demos, fed a list of replies or a callable."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Union

from .base import LLMError, LLMReply, Message
from .parsing import extract_json

# A scripted reply: raw text, a JSON object (sent as its JSON text), a full LLMReply, or an exception to raise.
Scripted = Union[str, dict, LLMReply, BaseException]
Responder = Callable[[list[Message], dict[str, Any]], Scripted]


class ScriptedClient:
    """Answers call i with `replies[i]` (or `responder(messages, schema)`); records every call in `calls`.

    Text replies are parsed like a real backend would (`data` is None when there is no JSON object), so the
    analyst's repair and fallback paths can be exercised without a model.
    """

    def __init__(self, replies: Sequence[Scripted] | Responder, *, name: str = "scripted", model: str = "scripted") -> None:
        self.name = name
        self.model = model
        self._responder: Responder | None = replies if callable(replies) else None
        self._replies: list[Scripted] = [] if callable(replies) else list(replies)
        self.calls: list[tuple[list[Message], dict[str, Any]]] = []

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        index = len(self.calls)
        self.calls.append((list(messages), schema))
        if self._responder is not None:
            item = self._responder(list(messages), schema)
        elif index < len(self._replies):
            item = self._replies[index]
        else:
            raise LLMError(
                f"the scripted client has {len(self._replies)} replies but call {index + 1} was made; "
                "fix: give the ScriptedClient one reply per expected call"
            )
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, LLMReply):
            return item
        text = json.dumps(item) if isinstance(item, dict) else str(item)
        return LLMReply(
            text=text,
            data=extract_json(text),
            model=self.model,
            input_tokens=sum(len(m.content.split()) for m in messages),
            output_tokens=len(text.split()),
            latency_s=0.0,
            meta={"call_index": index},
        )
