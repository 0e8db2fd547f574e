"""Classification evaluation: accuracy, label-free fidelity, BatchNorm recalibration."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunepilot.errors import PrunepilotError
from prunepilot.evaluate.classification import (
    ClassificationEvaluator,
    dense_logits,
    evaluate_classifier,
    fidelity,
    has_batchnorm,
    recalibrate_batchnorm,
    top1_accuracy,
)




class Fixed(nn.Module):
    """Returns the logits stored in column 1.. of its input: outputs are known exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dummy


def _loader(logits: torch.Tensor, labels: torch.Tensor, bs: int = 2) -> DataLoader:
    return DataLoader(TensorDataset(logits, labels), batch_size=bs)


def test_top1_on_known_outputs() -> None:
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    labels = torch.tensor([0, 1, 0, 2])  # right, right, wrong, wrong
    assert top1_accuracy(Fixed(), _loader(logits, labels)) == pytest.approx(0.5)
    assert top1_accuracy(Fixed(), _loader(logits, labels), max_batches=1) == pytest.approx(1.0)
    r = evaluate_classifier(Fixed(), _loader(logits, labels))
    assert r["n"] == 4 and r["top5"] == 1.0 and r["loss"] > 0


def test_top1_needs_labels_and_samples() -> None:
    with pytest.raises(PrunepilotError, match="labelled"):
        top1_accuracy(Fixed(), DataLoader(torch.randn(4, 3), batch_size=2))
    with pytest.raises(PrunepilotError, match="at least one sample"):
        top1_accuracy(Fixed(), _loader(torch.randn(0, 3), torch.zeros(0, dtype=torch.long)))


def test_evaluation_restores_training_mode() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    m.train()
    top1_accuracy(m, _loader(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    assert m.training


def test_fidelity_identical_and_different() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.randn(32, 8)
    loader = DataLoader(x, batch_size=8)  # no labels: fidelity is label-free
    same = fidelity(m, copy.deepcopy(m), loader)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6) and same["n"] == 32
    other = copy.deepcopy(m)
    with torch.no_grad():
        other[2].weight.mul_(-1)  # flips the ranking of classes
    diff = fidelity(other, m, loader)
    assert diff["agreement"] < 0.5 and diff["kl"] > 0.1
    cached = dense_logits(m, loader)
    assert fidelity(other, cached, loader) == pytest.approx(diff)
    with pytest.raises(PrunepilotError, match="cover every"):
        fidelity(other, cached[:1], loader)


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3), nn.Dropout(0.5))


def test_bn_recalibration_restores_stats_on_shifted_data() -> None:
    m = _bn_net()
    torch.manual_seed(1)
    x = torch.randn(64, 2, 6, 6) * 3.0 + 5.0  # data the running stats (0 mean, 1 var) do not describe
    loader = DataLoader(x, batch_size=16)
    w_before = {k: v.clone() for k, v in m.state_dict().items() if "running" not in k and "num_batches" not in k}
    n = recalibrate_batchnorm(m, loader, num_batches=4)
    assert n == 1 and not m.training and has_batchnorm(m)
    with torch.no_grad():
        conv_out = m[0](x)  # (64, 4, 6, 6)
    bn = m[1]
    # cumulative average over 4 equal batches equals the mean over all 64 samples
    assert torch.allclose(bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-4)
    batch_vars = torch.stack([conv_out[i:i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 64, 16)])
    assert torch.allclose(bn.running_var, batch_vars.mean(0), atol=1e-4)
    assert bn.momentum == 0.1  # restored
    after = {k: v for k, v in m.state_dict().items() if k in w_before}
    assert all(torch.equal(w_before[k], after[k]) for k in w_before)  # no weight changed


def test_bn_recalibration_uses_only_num_batches_and_handles_no_bn() -> None:
    m = _bn_net()
    x = torch.cat([torch.zeros(16, 2, 6, 6), torch.full((16, 2, 6, 6), 100.0)])
    recalibrate_batchnorm(m, DataLoader(x, batch_size=16), num_batches=1)
    with torch.no_grad():
        first = m[0](x[:16]).mean((0, 2, 3))
    assert torch.allclose(m[1].running_mean, first, atol=1e-5)
    plain = nn.Linear(3, 3)
    assert recalibrate_batchnorm(plain, DataLoader(torch.randn(4, 3), batch_size=2)) == 0
    with pytest.raises(PrunepilotError, match="non-empty"):
        recalibrate_batchnorm(m, DataLoader(torch.randn(0, 2, 6, 6), batch_size=2))
    assert torch.allclose(m[1].running_mean, first, atol=1e-5)  # old stats put back


def test_classification_evaluator_recalibrates_and_scores() -> None:
    torch.manual_seed(0)
    dense = _bn_net()
    x = torch.randn(64, 2, 6, 6) * 2 + 3
    y = torch.randint(0, 3, (64,))
    val = DataLoader(TensorDataset(x, y), batch_size=16)
    ev = ClassificationEvaluator(val, dense, calibration_loader=DataLoader(x, batch_size=16), bn_batches=2)
    cand = copy.deepcopy(dense)
    r = ev.measure(cand)
    assert r["bn_layers"] == 1 and 0 <= r["top1"] <= 1 and r["n"] == 64
    assert not torch.equal(cand[1].running_mean, dense[1].running_mean)  # recalibrated in place
    r2 = ClassificationEvaluator(val, dense, labels=False).measure(copy.deepcopy(dense))
    assert "top1" not in r2 and r2["agreement"] == 1.0
    with pytest.raises(PrunepilotError, match="label-free"):
        ClassificationEvaluator(val, None, labels=False)


class _Bundle:
    """The two things for_bundle needs from a DataBundle."""

    def __init__(self, ds: TensorDataset) -> None:
        self.ds = ds

    def loader(self, split: str, *, batch_size: int, shuffle: bool, seed: int, limit: int | None = None):
        return DataLoader(self.ds, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed))


def test_evaluator_for_bundle() -> None:
    ds = TensorDataset(torch.randn(32, 2, 6, 6), torch.randint(0, 3, (32,)))
    ev = ClassificationEvaluator.for_bundle(_Bundle(ds), _bn_net(), limit=None, batch_size=8, bn_batches=2)
    assert set(ev.measure(_bn_net())) >= {"top1", "agreement", "kl", "bn_layers"}
