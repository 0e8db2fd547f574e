"""The SparseGPT level database (--search-masks sparsegpt): levels equal SparseGPT itself, any exact count is served,
restore gives the dense weights back, the loop runs on it end to end, and options that it cannot serve are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from prunepilot.engines import sparsity as sp
from prunepilot.errors import PlanError
from prunepilot.journal import Journal
from prunepilot.sparsify.calibrate import Calibration, _gram, _hooks, linear_layers, modules_by_name
from prunepilot.sparsify.plan import MAX_RATIO, project
from prunepilot.sparsify.sgpt_bank import SparseGPTBank, level_grid

from test_sparsity_loop import VOCAB, tiny_llama, tokens


def test_levels_stacked_in_one_sweep_equal_sparsegpt_one_level_at_a_time() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    x = torch.randn(200, 40, generator=g) * torch.rand(40, generator=g)
    h = x.T @ x
    levels = [0.3, 0.5, 0.75]
    stacked = sp.sparsegpt_levels(w, h, levels, blocksize=16, max_rows=48)  # two sweeps: 2 levels, then 1
    for s, got in zip(levels, stacked):
        ref, mask = sp.sparsegpt_prune(w, h, s, blocksize=16)
        assert torch.equal(got == 0, ~mask) and torch.allclose(got, ref, atol=1e-6)
        assert int((got == 0).sum()) == sp.count_pruned(w.numel(), s)


def test_level_grid_covers_the_reachable_range_and_the_target() -> None:
    assert level_grid(0.7, 0.3, 0.3) == [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
    assert max(level_grid(0.7, 0.3, 0.3)) <= MAX_RATIO
    ramp = level_grid(0.43, 0.43, 0.1)
    assert 0.43 in ramp and ramp[0] == pytest.approx(0.03) and ramp[-1] == pytest.approx(0.53)
    assert all(b - a == pytest.approx(0.05) for a, b in zip(ramp, ramp[1:]))


@pytest.fixture(scope="module")
def bank() -> Any:
    model = tiny_llama()
    calib = tokens(8, 32, 1)
    infos = linear_layers(model)
    b = SparseGPTBank(model, infos, calib, [0.3, 0.5, 0.7])
    yield {"bank": b, "model": model, "infos": infos, "calib": calib}
    b.close()


def test_a_count_on_a_level_is_that_levels_sparsegpt_weights(bank: dict[str, Any]) -> None:
    """Level weights are SparseGPT on the dense model's own inputs (block 0 has the same inputs either way)."""
    b, model, infos = bank["bank"], bank["model"], bank["infos"]
    dense = tiny_llama()
    mods = modules_by_name(dense, infos)
    name = next(i.name for i in infos if i.block == 0 and i.kind == "mlp.down_proj")
    cal = Calibration(dense, bank["calib"], 4)
    grams: dict[str, torch.Tensor] = {}
    handles, shared = _hooks(mods, [name], _gram, grams)
    for x in cal.inputs:
        shared.clear()
        dense.model.layers[0](x, **cal.kwargs[0])
    for hd in handles:
        hd.remove()
    ref, _ = sp.sparsegpt_prune(mods[name].weight, grams[name], 0.5)
    k = sp.count_pruned(mods[name].weight.numel(), 0.5)
    assert torch.allclose(b.weights_for(name, k), ref, atol=1e-6)


def test_any_exact_count_is_served_and_restore_gives_dense_back(bank: dict[str, Any]) -> None:
    b, model, infos = bank["bank"], bank["model"], bank["infos"]
    mods = modules_by_name(model, infos)
    dense = {i.name: mods[i.name].weight.detach().clone() for i in infos}
    for target in (0.2, 0.41, 0.5, 0.63, 0.85):  # below the first level, between levels, on one, above the last
        counts = project({}, infos, target)
        b.apply(counts)
        for i in infos:
            assert int((mods[i.name].weight == 0).sum()) == counts[i.name], (target, i.name)
    one = infos[4].name
    k = b.level_counts[one][1] + 3  # just past a level: that level topped up by Wanda score, nothing else moved
    level = b.weights_for(one, b.level_counts[one][1])
    topped = b.weights_for(one, k)
    kept = topped != 0
    assert int((~kept).sum()) == k and torch.equal(topped[kept], level[kept])
    b.restore()
    assert all(torch.equal(mods[i.name].weight, dense[i.name]) for i in infos)


def _text(tmp_path: Path) -> str:
    g = torch.Generator().manual_seed(3)
    words = " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (12000,), generator=g))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(words[i : i + 400] for i in range(0, len(words), 400)))
    return f"text:{corpus}"


def test_run_sparsify_searches_on_the_level_database(tmp_path: Path) -> None:
    from test_evolve import _tokenizer

    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    model_dir = tmp_path / "tiny"
    tiny_llama().save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    logs: list[str] = []
    cfg = SparsifyConfig(model=f"hf:{model_dir}", sparsity="60%", agent="evolve", evals=10, method="sparsegpt",
                         search_masks="sparsegpt", calib=_text(tmp_path), calib_seqs=8, calib_seqlen=32, eval_seqs=4,
                         eval_seqlen=32, probe_seqs=4, probe_seqlen=32, fidelity_seqs=1, use_history=False)
    out = tmp_path / "run"
    res = run_sparsify(cfg, out, say=logs.append)
    assert res["within_band"] and abs(res["compressed"]["sparsity"] - 0.6) < 1e-3
    assert "sparsegpt_bank" in res["timings_s"] and any("SparseGPT level database" in s for s in logs)
    assert res["config"]["search_masks"] == "sparsegpt" == res["search_masks"]  # the report's details show it
    assert "SparseGPT level database" in (out / "summary.md").read_text()
    loop = res["loop"]
    assert loop["evals"] == 10 and loop["probe_kl_final"] <= loop["probe_kl_uniform"]
    (r,) = Journal(out / "journal.sqlite").runs()
    assert r["config"]["search_masks"] == "sparsegpt"  # a resumed run rebuilds the same database


@pytest.mark.parametrize("change, why", [
    ({"agent": "uniform"}, "no loop"),
    ({"sparsity": "2:4"}, "no loop"),
    ({"method": "wanda"}, "applies another method"),
    ({"extra": {"executor": {"workers": 2, "ray_address": None}}}, "Ray workers"),
    ({"search_masks": "obs"}, "one of"),
])
def test_options_the_database_cannot_serve_are_refused_before_any_work(tmp_path: Path, change: dict, why: str) -> None:
    from prunepilot.sparsify.run import SparsifyConfig, run_sparsify

    cfg = SparsifyConfig(**({"model": "hf:/nonexistent", "agent": "evolve", "search_masks": "sparsegpt"} | change))
    with pytest.raises(PlanError, match=why):
        run_sparsify(cfg, tmp_path / "run", say=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_a_database_that_does_not_fit_on_disk_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from prunepilot.sparsify import sgpt_bank

    model = tiny_llama()
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(PlanError, match="does not fit"):
        sgpt_bank.SparseGPTBank(model, linear_layers(model), tokens(4, 16, 1), [0.5])
