"""CIFAR-style ResNets and the cached Fashion-MNIST baseline (trained here on a tiny IDX set)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunepilot.errors import SourceError
from prunepilot.models import build, resnet20, resnet56
from prunepilot.models.baseline import baseline_paths, cache_slot, get_or_train_baseline, load_baseline




def test_shapes_and_cost() -> None:
    tp = pytest.importorskip("torch_pruning")
    x = torch.zeros(2, 1, 28, 28)
    m = resnet20().eval()
    assert m(x).shape == (2, 10)
    macs, params = tp.utils.count_ops_and_params(m, x[:1])
    assert 30e6 < macs < 33e6 and 0.25e6 < params < 0.3e6  # ResNet-20 on 28x28: ~31.5M MACs, 0.27M params
    assert resnet56(num_classes=7, in_channels=3).eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    assert len(resnet56().layer1) == 9


def test_bad_arch_and_depth() -> None:
    with pytest.raises(SourceError, match="resnet20"):
        build("resnet18")
    with pytest.raises(ValueError, match="6n\\+2"):
        from prunepilot.models.cifar_resnet import CifarResNet

        CifarResNet(depth=21)


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_get_or_train_caches_and_reloads(tmp_path: Path) -> None:
    data = tmp_path / "idx"
    data.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28)))
    _write_idx(data / "train-labels-idx1-ubyte.gz", np.arange(60) % 10)
    _write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    cache = tmp_path / "cache"
    with pytest.raises(SourceError, match="train-baseline"):
        load_baseline("resnet20", cache)
    m, info = get_or_train_baseline("resnet20", epochs=1, cache_dir=cache, data=f"fashion-mnist:{data}",
                                    progress=False)
    pt, js = baseline_paths("resnet20", cache)
    assert pt.is_file() and js.is_file()
    saved = json.loads(js.read_text())
    assert saved["epochs"] == 1 and 0 <= saved["test_top1"] <= 1 and saved["macs"] > 30e6
    m2, info2 = get_or_train_baseline("resnet20", cache_dir=cache, progress=False)  # cached: no training
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(m(x), m2(x))
    assert not m2.training and info2["trained_at"] == info["trained_at"]
    torch.load(pt, weights_only=True)  # plain state_dict: safe to load
    # another epoch count lives beside the default instead of replacing it
    m3, info3 = get_or_train_baseline("resnet20", epochs=0.5, cache_dir=cache, data=f"fashion-mnist:{data}",
                                      progress=False)
    assert info3["epochs"] == 0.5 and baseline_paths("resnet20", cache, 0.5)[0].is_file()
    assert get_or_train_baseline("resnet20", cache_dir=cache, progress=False)[1]["epochs"] == 1
    assert cache_slot("resnet20", 1, cache) == (pt, None)
    assert cache_slot("resnet20", 2, cache) == (baseline_paths("resnet20", cache, 2)[0], 2)


def test_train_baseline_command(tmp_path: Path) -> None:
    typer_testing = pytest.importorskip("typer.testing")
    import typer

    from prunepilot.commands import train

    data = tmp_path / "idx"
    data.mkdir()
    rng = np.random.default_rng(1)
    _write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (30, 28, 28)))
    _write_idx(data / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    _write_idx(data / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28)))
    _write_idx(data / "t10k-labels-idx1-ubyte.gz", np.arange(10) % 10)
    app = typer.Typer()
    train.register(app)

    @app.command("noop")  # a second command keeps typer in multi-command mode, as in the real CLI
    def _noop() -> None: ...

    out = tmp_path / "m.pt"
    r = typer_testing.CliRunner().invoke(app, ["train-baseline", "--epochs", "1", "--out", str(out), "--data",
                                               f"fashion-mnist:{data}", "--quiet", "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert out.is_file() and out.with_suffix(".json").is_file() and "test top-1" in r.output


@pytest.mark.slow
def test_cached_real_baseline_is_accurate() -> None:
    if not baseline_paths("resnet20")[0].is_file():
        pytest.skip("no cached baseline: run python bench/train_baseline.py")
    from prunepilot.evaluate.classification import top1_accuracy
    from prunepilot.sources.data import load_data

    m, info = load_baseline("resnet20")
    acc = top1_accuracy(m, load_data("fashion-mnist").loader("test", batch_size=500, limit=1000))
    assert acc > 0.85 and info["test_top1"] > 0.85
