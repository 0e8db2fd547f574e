"""ReplayClient: answers from recorded transcripts, in order, offline; refuses when the prompts diverge."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .base import LLMError, LLMReply, Message
from .parsing import extract_json, messages_hash


class ReplayDivergence(LLMError):
    """The run being replayed asked something the recorded run did not: its decisions would differ."""


class ReplayClient:
    """Replays `transcripts`: a list of {"text" | "reply": reply, optional "messages_hash" | "messages",
    "index", "model", "data", "status", "error", "input_tokens", "output_tokens", "latency_s"} in the order
    they were recorded (the analyst's `llm_calls` records, as the journal stores them, fit as they are).
    A recorded call with status "error" raises LLMError again, so the replayed analyst falls back as before.

    When an entry carries the hash (or the messages) of the prompt it answered, the new prompt must hash the
    same; otherwise the replay stops with ReplayDivergence naming the call, instead of silently answering a
    different question. `strict=False` skips that check (useful after a prompt-template change).
    """

    def __init__(self, transcripts: Sequence[Mapping[str, Any]], *, strict: bool = True, name: str = "replay") -> None:
        entries = list(transcripts)
        if entries and all("index" in e for e in entries):
            entries.sort(key=lambda e: int(e["index"]))
        for i, e in enumerate(entries):
            if "text" not in e and "reply" not in e and e.get("status") != "error":
                raise LLMError(
                    f"replay transcript entry {i} has no reply text (keys: {sorted(e)}); "
                    "fix: pass the transcripts the journal recorded (each has 'text' or 'reply')"
                )
        self.name = name
        self.strict = strict
        self._entries = entries
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._entries) - self._pos

    def complete(self, messages: list[Message], schema: dict[str, Any]) -> LLMReply:
        if self._pos >= len(self._entries):
            raise ReplayDivergence(
                f"the recorded run made {len(self._entries)} LLM calls but the replay asked for call "
                f"{self._pos + 1}; fix: replay with the same settings (rounds, agent, budget) as the recorded run"
            )
        entry = self._entries[self._pos]
        expected = entry.get("messages_hash")
        if expected is None and entry.get("messages"):
            expected = messages_hash([Message(m["role"], m["content"]) for m in entry["messages"]])
        got = messages_hash(messages)
        if self.strict and expected is not None and expected != got:
            raise ReplayDivergence(
                f"replay diverged at LLM call {self._pos + 1}: the prompt hashes to {got} but the recorded "
                f"prompt hashed to {expected}; the model, data, budget or history differ from the recorded run; "
                "fix: replay with the same inputs, or pass strict=False to answer in order regardless"
            )
        self._pos += 1
        if entry.get("status") == "error":  # the recorded call failed: fail the same way, so the run falls back
            raise LLMError(f"(replayed) {entry.get('error') or 'the recorded LLM call failed'}")
        text = entry.get("text", entry.get("reply"))
        text = "" if text is None else str(text)
        data = entry.get("data")
        return LLMReply(
            text=text,
            data=data if isinstance(data, dict) else extract_json(text),
            model=str(entry.get("model", "replay")),
            input_tokens=int(entry.get("input_tokens", 0) or 0),
            output_tokens=int(entry.get("output_tokens", 0) or 0),
            latency_s=0.0,
            meta={"replayed": True, "call_index": self._pos - 1, "messages_hash": got,
                  "recorded_latency_s": entry.get("latency_s")},
        )
