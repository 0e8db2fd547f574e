"""Exports that deploy: a bf16 model is written in bf16 (not fp32); the compressed-tensors layout (sparse-bitmask
for unstructured, sparse-24-bitmask for 2:4) reloads with equal outputs and is smaller on disk; result.json's
sizes are the bytes of the files; 2:4 semi-structured kernels are a CUDA-only measurement that skips cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunepilot.engines import sparsity as sp
from prunepilot.errors import PlanError
from prunepilot.sparsify.calibrate import linear_layers, modules_by_name, sequential_sparsify
from prunepilot.sparsify.export import files_mb, load_compressed, save_and_verify
from prunepilot.sparsify.kernels import semi_structured_speedup
from prunepilot.sparsify.plan import project
from test_llm_memory import ids, tiny, word_docs, word_tokenizer


def _sparse(dtype: torch.dtype, nm: sp.NM | None = None) -> torch.nn.Module:
    model = tiny(dtype)
    sequential_sparsify(model, ids(4, 32, 1), project({}, linear_layers(model), 0.5), "wanda", nm)
    return model


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits.float()


def test_bf16_export_stays_bf16(tmp_path: Path) -> None:
    model = _sparse(torch.bfloat16)
    info = save_and_verify(model, word_tokenizer(), tmp_path / "m", ids(1, 16, 2))
    assert info["dtype"] == "bfloat16" and info["tensors_identical"] and info["identical"]
    assert info["max_abs_logit_diff"] == 0.0
    n_params = sum(p.numel() for p in model.parameters())
    assert info["size_mb"] == pytest.approx(files_mb(tmp_path / "m"), abs=1e-3)
    assert files_mb(tmp_path / "m") * 2**20 < n_params * 2 + 64 * 1024  # 2 bytes a weight + the header
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


def test_fp32_compute_exports_in_the_checkpoint_dtype(tmp_path: Path) -> None:
    model = _sparse(torch.float32)
    info = save_and_verify(model, word_tokenizer(), tmp_path / "m", ids(1, 16, 2), dtype=torch.bfloat16)
    assert info["dtype"] == "bfloat16" and info["tensors_identical"]  # every tensor equals the model's, cast
    assert next(model.parameters()).dtype == torch.float32  # the in-memory model is untouched


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_compressed_tensors_export_reloads_with_equal_outputs(tmp_path: Path, pattern: str | None) -> None:
    nm = sp.parse_nm(pattern) if pattern else None
    model = _sparse(torch.bfloat16, nm)
    names = [i.name for i in linear_layers(model)]
    save_and_verify(model, word_tokenizer(), tmp_path / "dense", None)
    info = save_and_verify(model, word_tokenizer(), tmp_path / "ct", ids(1, 16, 2), fmt="compressed-tensors",
                           sparse_names=names, nm=nm, sparsity=0.5)
    assert info["tensors_identical"] and info["identical"] and info["max_abs_logit_diff"] == 0.0
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors"
    sc = cfg["sparsity_config"]
    assert sc["format"] == ("sparse-24-bitmask" if nm else "sparse-bitmask")
    assert sc["sparsity_structure"] == ("2:4" if nm else "unstructured") and set(sc["targets"]) == set(names)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "model.safetensors"), framework="pt") as fh:
        keys = set(fh.keys())
        q = names[0]
        if nm:
            assert {f"{q}.compressed", f"{q}.bitmask", f"{q}.shape"} <= keys
            w = modules_by_name(model, linear_layers(model))[q].weight
            assert fh.get_tensor(f"{q}.compressed").shape == (w.shape[0], w.shape[1] // 2)
        else:
            assert {f"{q}.weight.compressed", f"{q}.weight.bitmask", f"{q}.weight.row_offsets"} <= keys
        assert f"{q}.weight" not in keys
    reloaded = load_compressed(tmp_path / "ct", attn=model.config._attn_implementation)
    x = ids(2, 24, 3)
    assert torch.equal(_logits(reloaded, x), _logits(model, x))
    assert info["size_mb"] < files_mb(tmp_path / "dense")  # values + 1 bit a weight beat 2 bytes a weight


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="export format"):
        save_and_verify(tiny(), word_tokenizer(), tmp_path / "m", None, fmt="gguf")


def test_run_sizes_are_measured_from_files(tmp_path: Path) -> None:
    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    src = tmp_path / "src"
    tiny(torch.bfloat16).save_pretrained(src)
    word_tokenizer().save_pretrained(src)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(word_docs(30, 200)))
    cfg = SparsifyConfig(model=f"hf:{src}", sparsity="2:4", method="sparsegpt", agent="uniform",
                         calib=f"text:{corpus}", calib_seqs=4, calib_seqlen=32, eval_seqs=2, eval_seqlen=32,
                         probe_seqs=1, probe_seqlen=32, fidelity_seqs=1, export_format="compressed-tensors",
                         progress=False)
    res = run_sparsify(cfg, tmp_path / "run", say=lambda s: None)
    assert res["dense"]["size_mb"] == pytest.approx(files_mb(src), abs=1e-3)
    assert res["compressed"]["size_mb"] == pytest.approx(files_mb(tmp_path / "run" / "model"), abs=1e-3)
    assert res["compressed"]["sparse_size_mb"] == res["compressed"]["size_mb"] < res["dense"]["size_mb"]
    assert res["export"]["dtype"] == "bfloat16" and res["export"]["identical"]
    assert res["memory"]["dtype"] == "bfloat16"
    if not torch.cuda.is_available():
        assert "CUDA" in res["kernels"]["skipped"]


def test_semi_structured_kernels_skip_cleanly_without_cuda() -> None:
    model = _sparse(torch.float32, sp.NM(2, 4))
    mods = list(modules_by_name(model, linear_layers(model)).values())
    out = semi_structured_speedup(mods, torch.device("cpu"))
    assert set(out) == {"skipped"} and "CUDA" in out["skipped"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_kernels_on_cuda() -> None:  # pragma: no cover - GPU machines only
    lin = torch.nn.Linear(1024, 1024, bias=False).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(sp.magnitude_mask(lin.weight, 0.5, sp.NM(2, 4)))
    out = semi_structured_speedup([lin], torch.device("cuda"), tokens=512, reps=5)
    assert "skipped" in out or out["speedup"] > 0
