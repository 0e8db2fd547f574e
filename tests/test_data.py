"""Data sources: IDX parsing, real Fashion-MNIST, image folders, Hugging Face error path."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunepilot.errors import MissingDependency, SourceError
from prunepilot.sources.data import FASHION_MNIST_DIR, Normalization, load_data, read_idx, subsample




def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def _tiny_mnist(root: Path, n_train: int = 40, n_test: int = 20) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    _write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, 28, 28)))
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    _write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz=False)
    _write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz=False)


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr, gz=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "b"), arr)


def test_read_idx_rejects_garbage_and_truncation(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x02ab")
    with pytest.raises(SourceError, match="two zero bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"abc")
    with pytest.raises(SourceError, match="payload size"):
        read_idx(tmp_path / "short")


def test_tiny_idx_dir_splits_and_shapes(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    b = load_data(f"fashion-mnist:{tmp_path}", val_size=10)
    assert b.sizes() == {"train": 30, "val": 10, "test": 20}
    assert b.num_classes == 10 and b.input_shape == (1, 28, 28)
    x, y = b.train[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0 <= y < 10
    # stratified: one val sample per class
    assert sorted(int(b.val[i][1]) for i in range(10)) == list(range(10))
    # train and val are disjoint and together the whole training file
    tr, va = set(b.train.indices), set(b.val.indices)
    assert not tr & va and len(tr | va) == 40


def test_splits_deterministic_per_seed(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    a = load_data(f"fashion-mnist:{tmp_path}", val_size=10, seed=1)
    b = load_data(f"fashion-mnist:{tmp_path}", val_size=10, seed=1)
    c = load_data(f"fashion-mnist:{tmp_path}", val_size=10, seed=2)
    assert a.val.indices == b.val.indices and a.val.indices != c.val.indices
    la = [y.tolist() for _, y in a.loader("train", batch_size=8, seed=3)]
    lb = [y.tolist() for _, y in b.loader("train", batch_size=8, seed=3)]
    assert la == lb


def test_resize_to_model_input_shape(tmp_path: Path) -> None:
    _tiny_mnist(tmp_path)
    b = load_data(f"fashion-mnist:{tmp_path}", input_shape=(3, 32, 32), val_size=10)
    x, _ = b.test[0]
    assert x.shape == (3, 32, 32) and b.input_shape == (3, 32, 32)
    assert len(b.normalization.mean) == 3
    assert torch.allclose(x[0], x[1])  # grey repeated to RGB


def test_missing_dataset_names_the_apt_package(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="apt-get install dataset-fashion-mnist"):
        load_data(f"fashion-mnist:{tmp_path}")


def test_bad_specs() -> None:
    with pytest.raises(SourceError, match="data spec must be"):
        load_data("mnist-please")
    with pytest.raises(SourceError, match="imagefolder needs a directory"):
        load_data("imagefolder:")
    with pytest.raises(SourceError, match="input_shape"):
        load_data("fashion-mnist", input_shape=(5, 28, 28))


def test_subsample_is_deterministic_and_bounded() -> None:
    ds = list(range(100))
    a, b = subsample(ds, 10, seed=4), subsample(ds, 10, seed=4)
    assert list(a) == list(b) and len(a) == 10
    assert subsample(ds, None) is ds and subsample(ds, 1000) is ds
    with pytest.raises(SourceError):
        subsample(ds, 0)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist() -> None:
    b = load_data("fashion-mnist")
    assert b.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert b.num_classes == 10 and len(b.classes) == 10
    xs, ys = next(iter(b.loader("val", batch_size=256, limit=256)))
    assert xs.shape == (256, 1, 28, 28) and ys.min() >= 0 and ys.max() <= 9
    # normalised with the recorded training statistics: roughly zero mean, unit std
    assert abs(float(xs.mean())) < 0.2 and 0.7 < float(xs.std()) < 1.3
    assert b.to_json()["normalization"] == {"mean": [0.2860], "std": [0.3530]}
    labels = torch.tensor([int(b.val[i][1]) for i in range(0, 5000, 5)])
    assert torch.bincount(labels, minlength=10).min() > 50  # stratified, all classes present


def _png_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 10, size=(12, 9)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.full((size[1], size[0], 3), 40 * c, dtype=np.uint8) + rng.integers(0, 30, (size[1], size[0], 3),
                                                                                        dtype=np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")


def test_imagefolder_single_folder_split(tmp_path: Path) -> None:
    _png_folder(tmp_path)
    b = load_data(f"imagefolder:{tmp_path}", input_shape=(3, 16, 16))
    assert b.num_classes == 3 and b.classes == ("cat", "dog", "fox")
    s = b.sizes()
    assert sum(s.values()) == 30 and s["test"] == 3 and s["val"] == 3
    all_idx = set(b.train.indices) | set(b.val.indices) | set(b.test.indices)
    assert len(all_idx) == 30  # disjoint and complete
    x, y = b.train[0]
    assert x.shape == (3, 16, 16) and 0 <= y < 3
    xs, ys = next(iter(b.loader("train", batch_size=4)))
    assert xs.shape == (4, 3, 16, 16)


def test_imagefolder_train_val_layout_and_grey(tmp_path: Path) -> None:
    _png_folder(tmp_path / "train", per_class=10)
    _png_folder(tmp_path / "val", per_class=2)
    b = load_data(f"imagefolder:{tmp_path}", input_shape=(1, 8, 8), val_size=3)
    assert b.sizes() == {"train": 27, "val": 3, "test": 6}
    x, _ = b.test[0]
    assert x.shape == (1, 8, 8)
    assert b.normalization == Normalization((0.5,), (0.5,))


def test_imagefolder_default_shape_and_errors(tmp_path: Path) -> None:
    _png_folder(tmp_path / "ok", size=(12, 9))
    assert load_data(f"imagefolder:{tmp_path / 'ok'}").input_shape == (3, 9, 12)
    with pytest.raises(SourceError, match="existing directory"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(SourceError, match="at least two class"):
        load_data(f"imagefolder:{tmp_path / 'one'}")
    _png_folder(tmp_path / "mix" / "train", classes=("a", "b"), per_class=3)
    _png_folder(tmp_path / "mix" / "val", classes=("a", "c"), per_class=1)
    with pytest.raises(SourceError, match="unknown classes"):
        load_data(f"imagefolder:{tmp_path / 'mix'}")


def test_hf_without_datasets_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail even if installed
    with pytest.raises(MissingDependency, match="pip install"):
        load_data("hf:fashion_mnist")
    with pytest.raises(SourceError, match="dataset name"):
        load_data("hf:")
