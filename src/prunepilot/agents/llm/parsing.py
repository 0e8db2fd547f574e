"""Turn an LLM's text into a JSON object without ever evaluating it."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .base import Message

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_json(text: str | None) -> dict[str, Any] | None:
    """The first JSON object in `text` (bare, inside ``` fences, or after prose); None when there is none."""
    if not text:
        return None
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for c in candidates:
        try:
            obj = json.loads(c)
        except (ValueError, RecursionError):  # deeply nested junk must not crash a client
            continue
        if isinstance(obj, dict):
            return obj
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):  # prose around the object: decode from each '{' in turn
        if ch != "{":
            continue
        try:
            obj, _ = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):  # deeply nested junk must not crash a client
            continue
        if isinstance(obj, dict):
            return obj
    return None


def messages_to_dicts(messages: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def messages_hash(messages: list[Message]) -> str:
    """A stable fingerprint of a conversation (roles + contents), used to check that a replay matches."""
    canon = json.dumps(messages_to_dicts(messages), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]
