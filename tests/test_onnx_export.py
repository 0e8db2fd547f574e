"""ONNX deployment path: export (dynamo, legacy fallback), verification, ORT int8, latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from prunepilot.engines.onnx_export import (  # noqa: E402
    export_and_verify,
    export_onnx,
    ort_latency,
    quantize_onnx_int8,
    verify_onnx,
)
from prunepilot.errors import PrunepilotError  # noqa: E402


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    model = _mlp()
    x = torch.randn(2, 32)
    res = export_and_verify(model, x, tmp_path_factory.mktemp("onnx"), int8=True,
                            verify_inputs=[torch.randn(16, 32) for _ in range(2)])
    return model, res


def test_export_verify_and_int8(exported) -> None:
    model, res = exported
    assert res.fp32.exporter in ("dynamo", "torchscript") and res.fp32.path.exists()
    v = res.verify_fp32
    assert v.passed and v.n_samples == 32  # dynamic batch axis: batches of 16 run on a batch-2 export
    assert v.max_abs_diff < 1e-4 and v.cosine > 0.9999 and v.top1_agreement == 1.0
    assert res.int8_path is not None and res.int8_path.exists()
    assert res.int8_size_bytes < 0.5 * res.fp32.size_bytes
    assert res.verify_int8.passed and res.verify_int8.cosine > 0.98
    assert res.latency_fp32.median_ms > 0 and res.latency_int8.median_ms > 0
    js = res.to_json()
    assert js["fp32"]["exporter"] == res.fp32.exporter and js["int8_size_mb"] > 0


def test_verification_catches_a_different_model(exported, tmp_path) -> None:
    model, res = exported
    other = _mlp()
    with torch.no_grad():
        other[4].weight.mul_(-1.0)  # flips the logits: outputs disagree
    v = verify_onnx(res.fp32.path, other, torch.randn(32, 32))
    assert not v.passed and v.cosine < 0.5


def test_legacy_exporter_explicitly(tmp_path) -> None:
    model, x = _mlp(), torch.randn(2, 32)
    exp = export_onnx(model, x, tmp_path / "legacy.onnx", exporter="torchscript")
    assert exp.exporter == "torchscript" and exp.fallback_reason is None
    assert verify_onnx(exp.path, model, torch.randn(8, 32)).passed
    size = quantize_onnx_int8(exp.path, tmp_path / "legacy.int8.onnx")
    assert 0 < size < exp.size_bytes
    assert ort_latency(exp.path, x, warmup=1, runs=2, threads=1).runs == 2


def test_fallback_when_dynamo_fails(tmp_path, monkeypatch) -> None:
    import prunepilot.engines.onnx_export as ox

    def boom(*a, **k):
        raise RuntimeError("unsupported op for the test")

    monkeypatch.setattr(ox, "_export_dynamo", boom)
    model = _mlp()
    exp = export_onnx(model, torch.randn(2, 32), tmp_path / "m.onnx")
    assert exp.exporter == "torchscript" and "unsupported op" in exp.fallback_reason
    with pytest.raises(PrunepilotError, match="dynamo ONNX exporter failed"):
        export_onnx(model, torch.randn(2, 32), tmp_path / "m2.onnx", exporter="dynamo")
    with pytest.raises(PrunepilotError, match="exporter is"):
        export_onnx(model, torch.randn(2, 32), tmp_path / "m3.onnx", exporter="tflite")


@pytest.mark.slow
def test_vit_block_round_trip(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10,
                              depth=2).eval()
    res = export_and_verify(model, torch.randn(1, 3, 32, 32), tmp_path, int8=True,
                            verify_inputs=torch.randn(8, 3, 32, 32), measure_latency=False)
    assert res.verify_fp32.passed and res.verify_int8.cosine > 0.98


# ----------------------------------------------------------------------------- run folders and commands


def _loaded(model: nn.Module, shape: tuple[int, ...]):
    """The MLP as a model source (py: factory), as the CLI loads it: a quantize run can then be rebuilt from its
    float weights + int8 recipe with no pickle."""
    from prunepilot.sources.models import load_model

    return load_model(f"py:{__name__}:_mlp", input_shape=shape)


def test_quantize_onnx_backend_then_export_of_an_eager_int8_run(tmp_path) -> None:
    from prunepilot.jobs.export import run_export
    from prunepilot.commands.quantize import run_quantize

    res = run_quantize(_loaded(_mlp(), (2, 32)), out=tmp_path / "onnx", backend="onnx", layers="all", rounds=2)
    assert (tmp_path / "onnx" / "model.int8.onnx").exists()
    assert res["quantization"]["verify_vs_dense"]["cosine"] > 0.98
    assert res["compressed"]["size_mb"] < 0.5 * res["dense"]["size_mb"]

    run_quantize(_loaded(_mlp(), (2, 32)), out=tmp_path / "eager", layers="all", rounds=2)
    out = run_export(tmp_path / "eager", int8=True, samples=32, exporter="torchscript")  # dynamo is covered above
    assert out["source"] == "model.safetensors" and out["input_shape"] == [2, 32]  # rebuilt, not unpickled
    # the float twin with int8-grid weights matches the eager int8 model up to activation rounding
    assert out["verify_fp32"]["passed"] and out["verify_fp32"]["cosine"] > 0.99
    assert out["verify_int8"]["passed"]
    assert any("eager int8 layers" in n for n in out["notes"])
    assert (tmp_path / "eager" / "export.json").exists()


def test_export_refuses_foreign_pickles_without_trust(tmp_path) -> None:
    from prunepilot.jobs.export import load_run_model
    from prunepilot.errors import SourceError

    torch.save(_mlp(), tmp_path / "model.pt")
    with pytest.raises(SourceError, match="pickled module"):
        load_run_model(tmp_path)
    model, example, source = load_run_model(tmp_path, trust=True)
    assert source == "model.pt" and example is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no saved model"):
        load_run_model(tmp_path / "empty", trust=True)


def test_export_prefers_the_torch_export_program(tmp_path) -> None:
    from prunepilot.jobs.export import run_export

    model, x = _mlp(), torch.randn(2, 32)
    torch.export.save(torch.export.export(model, (x,)), str(tmp_path / "model.pt2"))
    # no result.json and no --trust: the .pt2 needs neither
    out = run_export(tmp_path, samples=16)  # the legacy exporter cannot trace an unlifted export program
    assert out["source"] == "model.pt2" and out["verify_fp32"]["passed"]


def test_cli_quantize_and_export(tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from prunepilot.cli import app

    monkeypatch.setattr("prunepilot.commands.common.load", lambda *a, **k: _loaded(_mlp(), (2, 32)))
    monkeypatch.setattr("prunepilot.commands.quantize.load", lambda *a, **k: _loaded(_mlp(), (2, 32)))
    runner = CliRunner()
    r = runner.invoke(app, ["quantize", "py:x:y", "--layers", "all", "--rounds", "2", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "layers quantized" in r.output
    r = runner.invoke(app, ["export", str(tmp_path), "--format", "onnx", "--int8", "--samples", "16", "--exporter", "torchscript"])
    assert r.exit_code == 0, r.output
    assert "verify fp32" in r.output and "passed" in r.output


def test_export_of_a_python_run_without_a_source_says_what_to_do(tmp_path) -> None:
    from prunepilot.errors import SourceError
    from prunepilot.jobs.export import load_run_model
    from prunepilot.jobs.quantize import run_quantize
    from prunepilot.sources.models import LoadedModel

    run_quantize(LoadedModel(_mlp(), torch.randn(2, 32), "python:mlp", "from Python"), out=tmp_path, layers="all", rounds=2)
    if (tmp_path / "model.pt2").exists():
        pytest.skip("this torch exports eager dynamic int8: the .pt2 is there to load")
    with pytest.raises(SourceError, match="handed in from Python"):
        load_run_model(tmp_path)


def test_export_of_a_sparsify_run_says_where_its_model_is(tmp_path) -> None:
    import json

    from prunepilot.errors import SourceError
    from prunepilot.jobs.export import load_run_model

    run = tmp_path / "llm"
    run.mkdir()
    (run / "result.json").write_text(json.dumps({"kind": "sparsify", "environment": {},
                                                 "export": {"path": str(run / "model"), "format": "compressed-tensors"}}))
    with pytest.raises(SourceError, match="load_compressed"):
        load_run_model(run)
    (run / "result.json").write_text(json.dumps({"kind": "sparsify", "environment": {}, "export": None}))
    with pytest.raises(SourceError, match="--no-export"):
        load_run_model(run)
