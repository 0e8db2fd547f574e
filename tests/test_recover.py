"""Recovery fine-tune: reduces loss, distils, works on torch-pruning-pruned models, deterministic."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunepilot.engines.recover import finetune, kd_loss
from prunepilot.errors import PrunepilotError
from prunepilot.evaluate.classification import top1_accuracy




def _problem(n: int = 256, seed: int = 0) -> TensorDataset:
    """Two Gaussian blobs per class in 2-D image-like tensors: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()  # the label shifts one quadrant
    return TensorDataset(x, y)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))


def _loader(seed: int = 0) -> DataLoader:
    return DataLoader(_problem(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))


def test_finetune_reduces_loss_and_learns() -> None:
    m = _cnn()
    acc0 = top1_accuracy(m, DataLoader(_problem(seed=1), batch_size=64))
    s = finetune(m, _loader(), steps=60, lr=0.05, progress=False)
    assert s.steps == 60 and not s.diverged and not s.kd
    assert s.loss_last < 0.7 * s.loss_first
    assert not m.training
    assert top1_accuracy(m, DataLoader(_problem(seed=1), batch_size=64)) > max(acc0, 0.6)
    assert s.epochs == pytest.approx(60 / 8)


def test_epoch_budget_and_bad_budgets() -> None:
    assert finetune(_cnn(), _loader(), epochs=0.5, progress=False).steps == 4
    assert finetune(_cnn(), _loader(), progress=False).steps == 8  # default: one epoch
    with pytest.raises(PrunepilotError, match="not both"):
        finetune(_cnn(), _loader(), steps=3, epochs=1)
    with pytest.raises(PrunepilotError, match="steps must be"):
        finetune(_cnn(), _loader(), steps=0)
    with pytest.raises(PrunepilotError, match="optimizer"):
        finetune(_cnn(), _loader(), steps=1, optimizer="lion")


def test_deterministic_with_seed() -> None:
    loader = _loader()
    a, b, c = _cnn(), _cnn(), _cnn()
    sa = finetune(a, loader, steps=12, lr=0.05, seed=7, progress=False)
    sb = finetune(b, loader, steps=12, lr=0.05, seed=7, progress=False)  # same loader object, reseeded
    finetune(c, loader, steps=12, lr=0.05, seed=8, progress=False)
    assert sa.losses == sb.losses
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))


def test_kd_path_and_label_free_distillation() -> None:
    teacher = _cnn()
    finetune(teacher, _loader(), steps=40, lr=0.05, progress=False)
    student = _cnn()
    s = finetune(student, _loader(), steps=20, lr=0.05, teacher=teacher, kd_alpha=0.7, progress=False)
    assert s.kd and s.loss_last < s.loss_first
    # no labels: pure distillation needs the teacher
    x_only = DataLoader(_problem().tensors[0], batch_size=32, shuffle=True)
    s2 = finetune(_cnn(), x_only, steps=20, lr=0.05, teacher=teacher, progress=False)
    assert s2.loss_last < s2.loss_first
    with pytest.raises(PrunepilotError, match="needs a teacher"):
        finetune(_cnn(), x_only, steps=2)
    assert not teacher.training


def test_kd_loss_zero_for_identical_logits() -> None:
    z = torch.randn(4, 5)
    assert float(kd_loss(z, z, 4.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(z, -z, 4.0)) > 0


def test_finetune_on_torch_pruning_pruned_model() -> None:
    tp = pytest.importorskip("torch_pruning")
    m = _cnn()
    finetune(m, _loader(), steps=30, lr=0.05, progress=False)
    ex = torch.zeros(1, 1, 8, 8)
    dense_macs, _ = tp.utils.count_ops_and_params(m, ex)
    pruned = copy.deepcopy(m)
    pruner = tp.pruner.MetaPruner(pruned, ex, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[pruned[-1]])
    pruner.step()
    macs, _ = tp.utils.count_ops_and_params(pruned, ex)
    assert macs < 0.6 * dense_macs and pruned[0].out_channels == 4
    s = finetune(pruned, _loader(), steps=30, lr=0.05, teacher=m, progress=False)
    assert not s.diverged and s.loss_last < s.loss_first
    assert pruned(ex).shape == (1, 3)


def test_divergence_is_reported_not_propagated() -> None:
    x, y = _problem().tensors
    x = x.clone()
    x[40] = float("nan")  # one poisoned sample in the second batch
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    m = _cnn()
    s = finetune(m, loader, steps=5, lr=0.05, progress=False)
    assert s.diverged and s.steps == 1
    assert all(torch.isfinite(p).all() for p in m.parameters())  # the bad step was never applied


def test_progress_bar_runs() -> None:
    s = finetune(_cnn(), _loader(), steps=3, progress=True)
    assert s.steps == 3


@pytest.mark.slow
def test_recovery_pipeline_on_pruned_resnet20() -> None:
    """Residual coupling included: prune ResNet-20 to ~half its channels, recalibrate BN, fine-tune."""
    tp = pytest.importorskip("torch_pruning")
    from prunepilot.evaluate.classification import recalibrate_batchnorm
    from prunepilot.models import resnet20

    torch.manual_seed(0)
    dense = resnet20(num_classes=3).eval()
    ex = torch.zeros(1, 1, 28, 28)
    pruned = copy.deepcopy(dense)
    tp.pruner.MetaPruner(pruned, ex, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.3,
                         ignored_layers=[pruned.fc]).step()
    assert pruned.conv1.out_channels < 16
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 3, (64,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)
    assert recalibrate_batchnorm(pruned, loader, num_batches=2) == 21  # stem + 9 blocks x 2 + 2 shortcuts
    s = finetune(pruned, loader, steps=4, lr=0.01, teacher=dense, progress=False)
    assert s.steps == 4 and not s.diverged and pruned(ex).shape == (1, 3)
