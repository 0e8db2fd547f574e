"""Projection and engine correctness on tiny residual, depthwise/grouped and attention models."""

import copy

import pytest
import torch
from torch import nn

from prunepilot.budget import Budget
from prunepilot.costmodel import build_cost_model
from prunepilot.engines.structured import Allocation, apply_allocation, verify_runs
from prunepilot.pipeline import count_real
from prunepilot.plan import Plan
from prunepilot.projector import Projector
from prunepilot.structure import analyse

from tiny_models import CASES, make


@pytest.fixture(scope="module", params=list(CASES))
def analysed(request):
    model, x = make(request.param)
    structure, _ = analyse(model, x)
    cost = build_cost_model(model, x, structure)
    return request.param, model, x, structure, cost


def test_structure_finds_groups_and_protects_head(analysed):
    case, model, x, structure, cost = analysed
    assert len(structure.groups) >= 3
    assert "head" in structure.ignored
    if case == "vit":
        assert any(g.kind == "attention" and g.num_heads == 4 for g in structure.groups.values())


def test_cost_model_reproduces_dense_counts(analysed):
    _, model, x, structure, cost = analysed
    real = count_real(model, x)
    assert cost.macs({}) == pytest.approx(real["macs"], rel=1e-9)
    assert cost.params({}) == pytest.approx(real["params"], rel=1e-9)


def test_cost_model_predicts_pruned_counts(analysed):
    _, model, x, structure, cost = analysed
    kept = {n: max(1, int(g.units * 0.6)) for n, g in structure.groups.items()}
    alloc = Allocation(kept, {})
    pruned = apply_allocation(copy.deepcopy(model), x, structure, alloc)
    real = count_real(pruned, x)
    assert cost.macs(alloc.fractions(structure)) == pytest.approx(real["macs"], rel=0.01)
    assert cost.params(alloc.fractions(structure)) == pytest.approx(real["params"], rel=1e-6)


@pytest.mark.parametrize("target", ["70%", "50%"])
def test_projection_lands_in_band_and_model_runs(analysed, target):
    _, model, x, structure, cost = analysed
    rb = Budget.parse(macs=target).resolve({"macs": cost.dense_macs, "params": cost.dense_params})
    proj = Projector(structure, cost).project(Plan(default_ratio=0.3), rb)
    assert proj.feasible, proj.reason
    pruned = apply_allocation(copy.deepcopy(model), x, structure, proj.allocation)
    out = verify_runs(pruned, x, model(x).shape)
    assert torch.isfinite(out).all()
    real = count_real(pruned, x)
    assert rb.within("macs", real["macs"]), (real["macs"], rb.goals)


def test_projection_with_rounding_and_two_targets(analysed):
    _, model, x, structure, cost = analysed
    rb = Budget.parse(macs="60%", params="70%", tolerance="+2%/-10%").resolve({"macs": cost.dense_macs, "params": cost.dense_params})
    proj = Projector(structure, cost).project(Plan(round_to=4), rb)
    for m in ("macs", "params"):
        assert proj.errors[m] <= 0.02 + 1e-9  # never over the cap
    assert proj.iterations > 0 and proj.seconds >= 0


def test_unreachable_budget_explains(analysed):
    _, model, x, structure, cost = analysed
    rb = Budget.parse(macs="0.5%").resolve({"macs": cost.dense_macs, "params": cost.dense_params})
    proj = Projector(structure, cost).project(Plan(), rb)
    assert not proj.feasible
    assert "unreachable" in proj.reason and "Fix" in proj.reason


def test_vit_head_pruning_updates_attention_metadata():
    model, x = make("vit")
    structure, _ = analyse(model, x)
    heads = {n: 2 for n, g in structure.groups.items() if g.num_heads}
    kept = {n: g.units for n, g in structure.groups.items()}
    pruned = apply_allocation(copy.deepcopy(model), x, structure, Allocation(kept, heads))
    for blk in pruned.blocks:
        assert blk.attn.num_heads == 2
        assert blk.attn.qkv.out_features == 3 * blk.attn.num_heads * blk.attn.head_dim
    verify_runs(pruned, x, model(x).shape)


def test_protected_layer_is_not_pruned():
    model, x = make("residual")
    structure, _ = analyse(model, x, protected=["b1.0"])
    assert "b1.0" in structure.ignored
    assert "b1.0" not in structure.groups


class _SharedConv(torch.nn.Module):
    """One 16-channel conv applied twice: a single coupled group, so multiples of 8 keep only 8 or 16 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.head(x.mean((2, 3)))


def test_too_coarse_channel_multiple_is_refined_until_the_budget_lands():
    model, x = _SharedConv().eval(), torch.randn(1, 3, 16, 16)
    structure, _ = analyse(model, x)
    cost = build_cost_model(model, x, structure)
    rb = Budget.parse(macs="50%").resolve({"macs": cost.dense_macs, "params": cost.dense_params})
    proj = Projector(structure, cost).project(Plan(round_to=8), rb)
    assert proj.feasible, proj.reason
    assert any("multiples of 8 cannot land" in n for n in proj.notes)
    real = count_real(apply_allocation(copy.deepcopy(model), x, structure, proj.allocation), x)
    assert rb.within("macs", real["macs"])
    # where the multiple already lands the budget it is kept: no note, widths stay multiples of 8
    rb27 = Budget.parse(macs="27.4%", tolerance="+1%/-5%").resolve({"macs": cost.dense_macs, "params": cost.dense_params})
    kept = Projector(structure, cost).project(Plan(round_to=8), rb27)
    assert kept.feasible and not any("multiples" in n for n in kept.notes)
    assert all(w % 8 == 0 for w in kept.allocation.kept.values())


def test_a_model_with_nothing_to_cut_says_which_layers_are_kept_and_why(tmp_path):
    """An LSTM classifier: torch-pruning cuts no group; the refusal names each kept layer with its reason."""
    import prunepilot
    from prunepilot.errors import BudgetError

    class RNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lstm, self.fc = nn.Embedding(50, 16), nn.LSTM(16, 32, batch_first=True), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.lstm(self.emb(x))[0][:, -1])

    with pytest.raises(BudgetError) as err:
        prunepilot.prune(RNN(), torch.randint(0, 50, (1, 8)), target_macs=0.5, out=tmp_path / "r")
    msg = str(err.value)
    assert "lstm: kept whole: recurrent layers (LSTM)" in msg and "fc: output layer" in msg
    assert "protect fewer" not in msg  # nothing was protected by the user
