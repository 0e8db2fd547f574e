"""The compress job through the one Master: journaled measurements, resume after an interruption with the same
measurements as an uninterrupted run, no pickle in the artefact (the int8 layers are applied again on load),
one-line errors for budgets no combination meets, and the CLI's `runs resume`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from prunepilot.budget import Budget
from prunepilot.cli import app
from prunepilot.errors import PrunepilotError
from prunepilot.jobs import compress as cj
from prunepilot.journal import Journal
from prunepilot.sources.models import load_model



def small_vit():
    """A small ViT whose linears are large enough for dynamic int8 to pay (>= 16k params each)."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=96, depth=2,
                             num_heads=4, num_classes=10, pretrained=False).eval()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The ViT as a real model source (py: factory + state_dict), so the journal can reload it."""
    tmp = tmp_path_factory.mktemp("src")
    torch.manual_seed(0)
    sd = tmp / "vit_sd.pt"
    torch.save(small_vit().state_dict(), sd)
    return {"uri": f"py:{__name__}:small_vit", "sd": sd, "shape": (1, 3, 32, 32)}


def _load(source):
    return load_model(source["uri"], input_shape=source["shape"], state_dict=source["sd"])


def _run(source, out, budget, **kw):
    run = cj.CompressRun(Budget.parse(**budget), out, settings=cj.CompressSettings(latency_runs=2, **kw))
    return cj.run_compress_job(_load(source), run, log=lambda _m: None, return_model=True)


def _steps(out):
    j = Journal(out / "journal.sqlite")
    rid = j.latest_run()
    return [(a.phase, a.step.get("option"), a.step.get("knob"), a.verdict, a.metrics.get("value")) for a in j.attempts(rid)]


def test_compress_meets_a_size_budget_with_int8_and_reloads_without_a_pickle(source, tmp_path):
    from prunepilot.engines.artifact import load_pruned
    from prunepilot.engines.quantize import quantized_layer_names

    result, model = _run(source, tmp_path, {"size_mb": "35%", "tolerance": "+1%/-40%"})
    assert result["kind"] == "compress" and result["within_band"]
    assert result["compressed"]["size_mb"] <= result["budget"]["targets"]["size_mb"]["goal"] * 1.01
    assert result["choice"]["quantization"] == "int8_dynamic"  # 35% of fp32 needs int8 on the linears
    assert not (tmp_path / "model.pt").exists() and (tmp_path / "model.safetensors").is_file()
    assert set(result["brackets"]) == {"none", "int8_dynamic"}
    steps = _steps(tmp_path)
    assert [s for s in steps if s[0] == "select"] and all(s[0] in ("bracket", "select") for s in steps)
    reloaded = load_pruned(tmp_path).module  # rebuilt from source + allocation + weights, int8 applied again
    assert quantized_layer_names(reloaded) == quantized_layer_names(model) != []
    x = torch.randn(*source["shape"])
    with torch.no_grad():
        assert torch.allclose(reloaded(x), model(x), atol=1e-5)
    assert json.loads((tmp_path / "structure.json").read_text())["quantization"]["layers"]


def test_an_interrupted_run_resumes_with_the_same_measurements(source, tmp_path, monkeypatch):
    budget = {"memory_mb": "45%", "tolerance": "+1%/-8%"}  # memory is deterministic: the two runs must agree
    _run(source, tmp_path / "ref", budget, quant_options=("none",))
    reference = _steps(tmp_path / "ref")
    assert len(reference) >= 3

    calls = {"n": 0}
    real = cj.CompressJob.evaluate

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what Ctrl-C (or a kill between attempts) leaves behind
        return real(self, *a, **k)

    monkeypatch.setattr(cj.CompressJob, "evaluate", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(source, tmp_path / "cut", budget, quant_options=("none",))
    monkeypatch.setattr(cj.CompressJob, "evaluate", real)
    j = Journal(tmp_path / "cut" / "journal.sqlite")
    rid = j.latest_run()
    assert j.run(rid)["status"] == "interrupted" and len(j.attempts(rid)) == 2

    res = CliRunner().invoke(app, ["runs", "resume", rid, "--journal", str(tmp_path / "cut" / "journal.sqlite")])
    assert res.exit_code == 0, res.output
    assert "resuming after 2 recorded attempts" in res.output
    assert _steps(tmp_path / "cut") == reference
    assert j.run(rid)["status"] == "done"
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["run_id"] == rid


def test_a_budget_no_combination_meets_says_the_nearest_point(source, tmp_path):
    with pytest.raises(PrunepilotError, match="no pruning \\+ quantization combination meets") as err:
        _run(source, tmp_path, {"memory_mb": "1%"}, quant_options=("none",), max_measurements=3)
    assert "most compressed point" in str(err.value)
    assert Journal(tmp_path / "journal.sqlite").runs()[0]["status"] == "failed"


def test_a_second_run_in_the_same_folder_is_refused(source, tmp_path):
    _run(source, tmp_path, {"macs": "60%"}, quant_options=("none",))
    with pytest.raises(PrunepilotError, match="already holds a run"):
        _run(source, tmp_path, {"macs": "60%"}, quant_options=("none",))


def test_int8_with_no_layer_worth_quantizing_is_skipped_with_the_reason(tmp_path):
    from prunepilot.sources.models import LoadedModel

    from tiny_models import make

    model, x = make("vit")  # every linear under 16k params: the heuristic selects none
    run = cj.CompressRun(Budget.parse(macs="60%"), tmp_path, settings=cj.CompressSettings(latency_runs=2))
    result = cj.run_compress_job(LoadedModel(model, x[:1], "py:tiny", "tiny"), run, log=lambda _m: None)
    assert result["choice"]["quantization"] == "none"
    assert "no layer" in result["brackets"]["int8_dynamic"]["stop_reason"]
    assert [a.step["option"] for a in Journal(tmp_path / "journal.sqlite").attempts(result["run_id"])] == ["none"]


def test_unknown_quantization_options_are_refused(tmp_path):
    with pytest.raises(Exception, match="none and int8_dynamic"):
        cj.CompressRun(Budget.parse(macs="50%"), tmp_path, settings=cj.CompressSettings(quant_options=("int4",)))


def test_python_api_compress_journals_and_resumes_from_python(tmp_path):
    import prunepilot

    torch.manual_seed(0)
    model, x = small_vit(), torch.randn(1, 3, 32, 32)
    res = prunepilot.compress(model, x, target_size="40%", tolerance="+1%/-40%", out=tmp_path, log=None)
    assert res.within_band and res.raw["kind"] == "compress" and res.run_id
    assert res.metrics["size_mb"] <= 0.4 * res.dense["size_mb"] * 1.01
    with torch.no_grad():
        assert torch.isfinite(res.model(x)).all()
    again = prunepilot.compress(model, x, target_size="40%", tolerance="+1%/-40%", out=tmp_path, resume=True, log=None)
    assert again.run_id == res.run_id and again.raw["rounds"] == res.raw["rounds"]  # nothing measured twice
    other = small_vit()
    with pytest.raises(PrunepilotError, match="not the model the run started with"):
        prunepilot.compress(_perturbed(other), x, target_size="40%", out=tmp_path, resume=True, log=None)


def _perturbed(model):
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    return model


def test_macs_beside_a_measured_target_are_a_cap(source, tmp_path):
    result, _ = _run(source, tmp_path, {"memory_mb": "45%", "macs": "90%", "tolerance": "+1%/-10%"}, quant_options=("none",))
    assert result["within_band"], result["errors"]
    assert result["errors"]["macs"] < -0.05  # memory needed more pruning than the MACs cap asked for
