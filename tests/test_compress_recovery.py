"""The compress job's final recovery: the winner's pruned float model fine-tuned for finetune_epochs (distilled
from the dense model), int8 applied again, measured again and exported; journaled as a "final" step so a run
killed during it resumes into it; skipped (and said so) with finetune_epochs=0 or without data."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import prunepilot
from prunepilot.errors import BudgetError
from prunepilot.jobs import compress as cj
from prunepilot.journal import Journal


def _task(n: int, seed: int) -> TensorDataset:
    """A linear 4-class rule over 3x8x8 inputs: learnable in seconds, and pruning 65% of the MACs costs accuracy."""
    x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    w = torch.randn(3 * 64, 4, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, (x.flatten(1) @ w).argmax(1))


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained on the task, its loaders, and an example input. Its 2048x64 linear (131k params) is
    large enough for the int8 heuristic to select it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 64, 64), nn.ReLU(), nn.Linear(64, 4))
    train = DataLoader(_task(2048, 1), batch_size=64, shuffle=True)
    val = DataLoader(_task(512, 2), batch_size=256)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for xb, yb in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval(), train, val, train.dataset.tensors[0][:1]


def _compress(trained, out, **kw):
    model, train, val, x = trained
    kw = {"target_macs": "35%", "tolerance": "+1%/-40%", "finetune_steps": 1, "finetune_epochs": 2, **kw}
    return prunepilot.compress(copy.deepcopy(model), x, train=train, val=val, eval_limit=512, out=out, log=None, **kw)


def _accuracy(model: nn.Module, val) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in val)
    return hits / sum(len(yb) for _, yb in val)


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):
    """The same run with the final recovery (2 epochs) and without it (0): same winner, same pre-recovery weights."""
    base = tmp_path_factory.mktemp("recovery")
    return {"on": (_compress(trained, base / "on"), base / "on"),
            "off": (_compress(trained, base / "off", finetune_epochs=0), base / "off")}


def test_the_final_recovery_raises_accuracy_and_the_recovered_model_is_exported(runs, trained):
    res, out = runs["on"]
    off, off_out = runs["off"]
    rec = res.raw["recovery"]
    assert rec["status"] == "done" and rec["kd"] and rec["final_epochs"] == 2 and rec["metric"] == "accuracy"
    assert rec["after"] > rec["before"] + 0.03  # 0.600 -> 0.684 when written; the dense model scores 0.688
    assert rec["before"] == off.raw["compressed"]["accuracy"]  # what the run without recovery exports
    assert res.raw["compressed"]["accuracy"] == rec["after"]
    assert res.raw["compressed"]["before_recovery"]["accuracy"] == rec["before"]
    assert res.raw["dense"]["accuracy"] == rec["dense"]
    assert rec["budget_holds"] and res.within_band and set(rec["budget_after"]) == {"macs"}
    # the exported weights are the recovered model's, of the same shapes as the unrecovered winner's, and differ
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(off_out / "model.safetensors"))
    assert saved.keys() == before.keys()
    state = res.model.state_dict()
    shared = [k for k in state if k in saved]  # an int8 winner's quantized linears hold packed params instead
    assert shared and all(torch.equal(saved[k], state[k]) for k in shared)
    if res.raw["choice"]["quantization"] == "none":  # which option wins depends on this CPU's int8 numerics
        assert shared == list(state)
    assert any(not torch.equal(saved[k], before[k]) for k in saved)
    assert _accuracy(res.model, trained[2]) == pytest.approx(rec["after"])
    # journaled as the last step, once; only the exported candidate's weights are kept
    attempts = Journal(out / "journal.sqlite").attempts(res.run_id)
    final = [a for a in attempts if a.phase == "final"]
    assert len(final) == 1 and final[0] == attempts[-1] and final[0].verdict == "accept"
    assert final[0].step["of"] == res.raw["best_round"] and rec["attempt"] == final[0].index
    assert [p.name for p in (out / "candidates").iterdir()] == [f"attempt-{final[0].index}.pt"]
    assert "## Final recovery" in (out / "summary.md").read_text()
    assert "before recovery" in res.raw["notes"][0] and "the budget still holds" in res.raw["notes"][0]


def test_finetune_epochs_0_skips_the_final_recovery_and_says_so(runs):
    res, out = runs["off"]
    assert res.raw["recovery"]["status"] == "skipped" and "disabled" in res.raw["recovery"]["reason"]
    assert "no final recovery" in res.raw["notes"][0]
    assert "before_recovery" not in res.raw["compressed"]
    assert not [a for a in Journal(out / "journal.sqlite").attempts(res.run_id) if a.phase == "final"]


def test_the_quantized_winner_is_still_quantized_after_recovery(trained, tmp_path):
    from prunepilot.engines.quantize import quantized_layer_names

    res = _compress(trained, tmp_path, target_macs=None, target_size="30%")
    rec = res.raw["recovery"]
    assert res.raw["choice"]["quantization"] == "int8_dynamic" and rec["status"] == "done"
    assert quantized_layer_names(res.model) and res.raw["quantized_layers"]
    assert rec["budget_holds"] and res.within_band and rec["budget_after"]["size_mb"] == res.raw["compressed"]["size_mb"]
    assert rec["after"] >= rec["before"]
    assert _accuracy(res.model, trained[2]) == pytest.approx(rec["after"])  # the quantized recovered model is returned
    saved = load_file(str(tmp_path / "model.safetensors"))  # float weights: int8 is applied again on load
    assert saved["7.weight"].dtype == torch.float32


def test_a_run_killed_during_the_final_fine_tune_resumes_into_it(trained, tmp_path, monkeypatch, runs):
    real = cj.CompressJob.recover

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # Ctrl-C (or a kill) in the middle of the final fine-tune

    monkeypatch.setattr(cj.CompressJob, "recover", killed)
    with pytest.raises(KeyboardInterrupt):
        _compress(trained, tmp_path)
    j = Journal(tmp_path / "journal.sqlite")
    rid = j.latest_run()
    assert j.run(rid)["status"] == "interrupted"
    recorded = j.attempts(rid)
    assert recorded and all(a.phase != "final" for a in recorded)
    monkeypatch.setattr(cj.CompressJob, "recover", real)
    res = _compress(trained, tmp_path, resume=True)
    assert res.run_id == rid and j.run(rid)["status"] == "done"
    attempts = j.attempts(rid)
    assert attempts[:-1] == recorded and attempts[-1].phase == "final"  # nothing measured twice
    ref = runs["on"][0].raw["recovery"]
    assert {k: res.raw["recovery"][k] for k in ("before", "after")} == {k: ref[k] for k in ("before", "after")}


def test_without_data_there_is_nothing_to_recover(trained, tmp_path):
    model, _, _, x = trained
    res = prunepilot.compress(copy.deepcopy(model), x, target_macs="50%", tolerance="+1%/-40%", out=tmp_path, log=None)
    assert res.raw["recovery"]["status"] == "skipped" and "no data" in res.raw["recovery"]["reason"]
    assert not [a for a in Journal(tmp_path / "journal.sqlite").attempts(res.run_id) if a.phase == "final"]


@pytest.mark.parametrize("epochs", [-1.0, float("nan")])
def test_a_bad_finetune_epochs_is_refused(tmp_path, epochs):
    from prunepilot.budget import Budget

    with pytest.raises(BudgetError, match="finetune_epochs"):
        cj.CompressRun(Budget.parse(macs="50%"), tmp_path, settings=cj.CompressSettings(finetune_epochs=epochs))
