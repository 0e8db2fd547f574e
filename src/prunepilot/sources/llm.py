"""Causal language models behind one spec: GGUF aliases/files, local Hugging Face folders, hub ids.

    smollm2 | gemma3-270m | gguf:PATH.gguf | hf:./local-dir | hf:org/name | ./local-dir
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import SourceError, require
from .gguf import ALIASES, load_gguf_causal_lm
from .hf_progress import hf_progress_off


@dataclass
class LoadedLM:
    model: Any  # transformers PreTrainedModel (causal LM), eval mode
    tokenizer: Any
    name: str  # short name for reports
    spec: str  # what the user typed ("python:ClassName" for a model handed in from Python)
    checkpoint_dtype: torch.dtype | None = None  # the dtype of the weights as stored (None: unknown)
    rss_before_weights_mb: float | None = None  # this process's RSS after the tokenizer, before the weights

    @classmethod
    def from_objects(cls, model: Any, tokenizer: Any, name: str | None = None) -> LoadedLM:
        """A model and tokenizer the user already holds (the Python API): nothing is loaded or copied."""
        if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
            raise SourceError("sparsify takes a transformers causal LM (a PreTrainedModel with a config)",
                              type(model).__name__, "pass e.g. AutoModelForCausalLM.from_pretrained(...)")
        if tokenizer is None or not callable(tokenizer):
            raise SourceError("sparsify needs the model's tokenizer", type(tokenizer).__name__,
                              "pass AutoTokenizer.from_pretrained(...) of the same model")
        dtype = next(model.parameters()).dtype
        label = name or getattr(model.config, "name_or_path", "") or type(model).__name__
        return cls(model.eval(), tokenizer, Path(str(label)).name or type(model).__name__,
                   f"python:{type(model).__name__}", dtype)


def load_causal_lm(spec: str, dtype: torch.dtype | str | None = "auto", trust_remote_code: bool = False,
                   before_weights: Callable[[Any], None] | None = None) -> LoadedLM:
    """Load a causal LM from a spec (see module doc), in its checkpoint dtype unless `dtype` is given (a bf16
    safetensors checkpoint stays bf16; a dequantised GGUF is float32). Hub ids need network access or a warm
    HF cache. Weights are loaded on the CPU; Placement (sparsify/device.py) moves them. A safetensors checkpoint in
    the dtype it is run in is memory-mapped copy-on-write: the file's pages are the weights (one copy; pruning
    writes only the pages it changes), so nothing here is loaded twice. `before_weights(tokenizer)` runs between the
    tokenizer and the weights: text that cannot fill the asked token blocks fails before minutes of loading."""
    from ..sparsify.device import current_rss_mb, resolve_dtype

    want = resolve_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    text = spec.strip()
    if text.lower() in ALIASES or text.startswith("gguf:") or text.lower().endswith(".gguf"):
        model, tok = load_gguf_causal_lm(text, dtype=want or "auto", before_weights=before_weights)
        return LoadedLM(model, tok, Path(text.removeprefix("gguf:")).stem.lower(), spec, torch.float32)
    target = text.removeprefix("hf:")
    if not text.startswith("hf:") and not Path(target).expanduser().is_dir():
        raise SourceError(
            "a language model is an alias, gguf:PATH, hf:DIR_OR_HUB_ID or a local folder",
            spec, f"use one of {', '.join(ALIASES)}, gguf:model.gguf or hf:./my-llama",
        )
    transformers = require("transformers", "llm", "loading a Hugging Face language model")
    local = Path(target).expanduser()
    source = str(local) if local.is_dir() else target
    try:  # the tokenizer first: it is cheap, and a folder without one fails before the weights are read
        tok = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        before = current_rss_mb()  # the baseline excludes the text the hook tokenizes: it is the run's, not imports'
        if before_weights is not None:
            before_weights(tok)
        with hf_progress_off():
            model = transformers.AutoModelForCausalLM.from_pretrained(
                source, dtype=want or "auto", trust_remote_code=trust_remote_code
            )
    except OSError as exc:
        raise SourceError(
            "the Hugging Face model could not be loaded (no such folder, or the hub is unreachable)",
            spec, "pass a local folder with config.json and weights, or a GGUF file",
        ) from exc
    model.eval()
    stored = _stored_dtype(local / "config.json") if local.is_dir() else None
    return LoadedLM(model, tok, Path(target).name or target, spec, stored or next(model.parameters()).dtype, before)


def _stored_dtype(config: Path) -> torch.dtype | None:
    """The dtype config.json says the weights were saved in (a --dtype override does not change it)."""
    import json

    try:
        c = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    d = str(c.get("dtype") or c.get("torch_dtype") or "")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(d)
