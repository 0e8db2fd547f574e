"""Causal language models behind one spec: GGUF aliases/files, local Hugging Face folders, hub ids.

    smollm2 | gemma3-270m | gguf:PATH.gguf | hf:./local-dir | hf:org/name | ./local-dir
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SourceError, require
from .gguf import ALIASES, load_gguf_causal_lm


@dataclass
class LoadedLM:
    model: Any  # transformers PreTrainedModel (causal LM), eval mode, float
    tokenizer: Any
    name: str  # short name for reports
    spec: str  # what the user typed


def load_causal_lm(spec: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> LoadedLM:
    """Load a causal LM from a spec (see module doc). Hub ids need network access or a warm HF cache."""
    text = spec.strip()
    if text.lower() in ALIASES or text.startswith("gguf:") or text.lower().endswith(".gguf"):
        model, tok = load_gguf_causal_lm(text, dtype=dtype)
        return LoadedLM(model, tok, Path(text.removeprefix("gguf:")).stem.lower(), spec)
    target = text.removeprefix("hf:")
    if not text.startswith("hf:") and not Path(target).expanduser().is_dir():
        raise SourceError(
            "a language model is an alias, gguf:PATH, hf:DIR_OR_HUB_ID or a local folder",
            spec, f"use one of {', '.join(ALIASES)}, gguf:model.gguf or hf:./my-llama",
        )
    transformers = require("transformers", "llm", "loading a Hugging Face language model")
    local = Path(target).expanduser()
    source = str(local) if local.is_dir() else target
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code
        )
        tok = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise SourceError(
            "the Hugging Face model could not be loaded (no such folder, or the hub is unreachable)",
            spec, "pass a local folder with config.json and weights, or a GGUF file",
        ) from exc
    model.eval()
    return LoadedLM(model, tok, Path(target).name or target, spec)
