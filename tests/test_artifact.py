"""The default pruned-model artefact: model.safetensors + structure.json (+ model.pt2), no pickle; load_pruned
rebuilds it bit-exactly from the recorded ModelSpec and refuses changed files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from prunepilot import pipeline
from prunepilot.budget import Budget
from prunepilot.engines.artifact import load_pruned, save_pruned
from prunepilot.errors import SourceError
from prunepilot.plan import Plan
from prunepilot.sources.models import load_model

from tiny_models import CASES, make


class TiedMLP(nn.Module):
    """Tied weights (one Parameter under two names) and a non-contiguous buffer: what save_file refuses as is."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 4)
        self.register_buffer("mix", torch.randn(8, 8).t())

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)) @ self.mix)))


def tied_mlp() -> nn.Module:
    return TiedMLP()


@pytest.fixture(scope="module", params=[("residual", False), ("vit", False), ("vit", True)],
                ids=["residual", "vit-head-dims", "vit-heads"])
def run(request, tmp_path_factory):
    """One prune per case through a real ModelSpec (py: factory + a state_dict file); the module handed to
    save_pruned is kept so the reload can be compared with it."""
    case, heads = request.param
    tmp = tmp_path_factory.mktemp(case)
    dense, x = make(case)
    sd = tmp / "dense_sd.pt"
    torch.save(dense.state_dict(), sd)
    factory = CASES[case][0].__name__
    loaded = load_model(f"py:tiny_models:{factory}", input_shape=tuple(x.shape), state_dict=sd)
    saved: dict[str, nn.Module] = {}

    def keep(model, *a, **k):
        saved["model"] = model
        return save_pruned(model, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "save_pruned", keep)
        result = pipeline.run_prune(loaded, Budget.parse(macs="50%"), Plan(round_to=4, prune_heads=heads),
                                    tmp / "run", latency_rounds=2)
    if heads:  # the case is only meaningful if whole heads were removed
        assert json.loads((tmp / "run" / "structure.json").read_text())["allocation"]["heads"]
    return {"out": tmp / "run", "sd": sd, "x": x, "model": saved["model"], "result": result, "dense": dense}


def test_default_artefact_is_not_a_pickle(run) -> None:
    out = run["out"]
    assert (out / "model.safetensors").is_file() and (out / "structure.json").is_file()
    assert not (out / "model.pt").exists()
    export = run["result"]["export"]
    assert export["module"] is None and export["state_dict"] == "model.safetensors"
    rec = json.loads((out / "structure.json").read_text())
    assert rec["format"] == 1 and len(rec["state_dict_sha256"]) == 64
    assert rec["params"] == sum(p.numel() for p in run["model"].parameters())
    assert rec["model"]["state_dict"] == str(run["sd"].resolve())
    assert rec["allocation"]["kept"] and rec["params"] < sum(p.numel() for p in run["dense"].parameters())


def test_load_pruned_reproduces_the_saved_model_exactly(run) -> None:
    loaded = load_pruned(run["out"])
    assert not loaded.module.training and loaded.spec is None
    x = run["x"]
    with torch.no_grad():
        assert torch.equal(loaded.module(x), run["model"](x))
    assert tuple(loaded.example_input.shape) == tuple(x.shape)
    if run["result"]["export"]["exported_program"]:
        ep = torch.export.load(str(run["out"] / "model.pt2")).module()
        with torch.no_grad():
            assert torch.allclose(ep(x), run["model"](x), atol=1e-5)


def test_load_pruned_under_inference_mode(run) -> None:
    with torch.inference_mode():  # torch-pruning needs autograd: load_pruned must not inherit the caller's mode
        module = load_pruned(run["out"]).module
    with torch.no_grad():
        assert torch.equal(module(run["x"]), run["model"](run["x"]))


def test_export_job_prefers_the_safetensors_artefact(run) -> None:
    from prunepilot.jobs.export import load_run_model

    model, example, source = load_run_model(run["out"])
    assert source == "model.safetensors" and tuple(example.shape) == tuple(run["x"].shape)
    with torch.no_grad():
        assert torch.equal(model(run["x"]), run["model"](run["x"]))


def test_changed_weights_are_refused(run, tmp_path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(run["out"], out)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(SourceError, match="sha256"):
        load_pruned(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="missing"):
        load_pruned(out)
    (out / "structure.json").unlink()
    with pytest.raises(SourceError, match="structure.json"):
        load_pruned(out)


def test_changed_dense_state_dict_is_refused(run) -> None:
    sd: Path = run["sd"]
    original = sd.read_bytes()
    try:
        sd.write_bytes(original + b"\0")
        with pytest.raises(SourceError, match="state_dict changed"):
            load_pruned(run["out"])
    finally:
        sd.write_bytes(original)
    load_pruned(run["out"])  # restored: loads again


def test_pickle_module_is_opt_in(run, tmp_path) -> None:
    rec = json.loads((run["out"] / "structure.json").read_text())
    info = pipeline.save_model(run["model"], run["x"], tmp_path, record=rec, pickle_module=True)
    assert info["module"] == "model.pt" and (tmp_path / "model.pt").is_file()
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=False)(run["x"]), run["model"](run["x"]))
        assert torch.equal(load_pruned(tmp_path).module(run["x"]), run["model"](run["x"]))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    assert pipeline.save_model(run["model"], run["x"], legacy)["module"] == "model.pt"  # no record: the old pickle


def test_tied_and_non_contiguous_tensors_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    loaded = load_model(f"py:{__name__}:tied_mlp", input_shape=(2, 8))
    model, x = loaded.module, loaded.example_input
    record = {"model": loaded.spec.model_dump(), "allocation": {"kept": {}, "heads": {}}}
    info = save_pruned(model, x, tmp_path, record=record)
    assert info["module"] is None and not (tmp_path / "model.pt").exists()
    back = load_pruned(tmp_path).module
    assert back.b.weight is back.a.weight  # the tie is the architecture's; both keys loaded the same values
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_a_module_from_python_is_saved_without_pickle_but_not_rebuildable(tmp_path) -> None:
    from prunepilot.sources.models import LoadedModel

    model, x = make("residual")
    res = pipeline.run_prune(LoadedModel(model, x, "py:tiny", "tiny"), Budget.parse(macs="50%"), Plan(round_to=4),
                             tmp_path, latency_rounds=2)
    assert not (tmp_path / "model.pt").exists() and "cannot rebuild" in res["export"]["rebuild"]
    with pytest.raises(SourceError, match="cannot rebuild"):
        load_pruned(tmp_path)
