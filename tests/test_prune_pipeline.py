"""End to end: the prune job on a tiny model writes results that reload and agree."""

import json

import torch

from prunepilot.budget import Budget
from prunepilot.pipeline import run_prune
from prunepilot.plan import Plan
from prunepilot.sources.models import LoadedModel, load_model

from tiny_models import make


def test_run_prune_writes_results_and_reloads(tmp_path):
    model, x = make("residual")
    loaded = LoadedModel(model, x, "py:tiny", "tiny")
    result = run_prune(loaded, Budget.parse(macs="50%"), Plan(round_to=4), tmp_path, latency_rounds=2)
    assert result["within_band"] is True
    for f in ("result.json", "plan.json", "summary.md", "profile.json", "model.safetensors", "structure.json"):
        assert (tmp_path / f).exists()
    assert not (tmp_path / "model.pt").exists()  # no pickle by default
    data = json.loads((tmp_path / "result.json").read_text())
    assert set(["budget", "dense", "compressed", "within_band", "projection"]) <= set(data)
    assert {"macs", "params", "latency_ms", "size_mb"} <= set(data["compressed"])
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    assert data["export"]["exported_program"]  # a plain CNN exports
    ep = load_model(f"file:{tmp_path / 'model.pt2'}", input_shape=tuple(x.shape))
    assert all(torch.equal(v, weights[k]) for k, v in ep.module.state_dict().items() if k in weights)
    assert ep.module(x).shape == (2, 10) and torch.isfinite(ep.module(x)).all()


def test_file_source_refuses_pickles_without_trust(tmp_path):
    import pytest

    from prunepilot.errors import SourceError

    model, x = make("residual")
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(SourceError, match="--trust"):
        load_model(f"file:{tmp_path / 'm.pt'}")
    loaded = load_model(f"file:{tmp_path / 'm.pt'}", trust=True, input_shape=(1, 3, 32, 32))
    assert loaded.module(loaded.example_input).shape == (1, 10)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(SourceError, match="state_dict"):
        load_model(f"file:{tmp_path / 'sd.pt'}")
