"""Data sources behind one URI-like spec: `fashion-mnist[:DIR]`, `imagefolder:DIR`, `hf:NAME[:split]`.

Every source returns a `DataBundle` with three deterministic splits:
  train  what recovery fine-tunes on
  val    held out from the training data, for ranking candidates inside the search loop
  test   the official test split, touched only for the final score (no selection on it)
Normalisation is recorded in the bundle so a report can say what the model saw.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import SourceError, require

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Statistics of the 60k Fashion-MNIST training images (pixel values in [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std applied after scaling pixels to [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class Preprocess:
    """How images become model inputs: normalisation (None: the source's default), an optional resize of the
    shorter side and an optional centre crop, before the final resize to the model's input size."""

    normalization: Normalization | None = None
    resize: int | None = None
    crop: int | None = None
    source: str = "default"  # what chose the normalisation: default | imagenet | none | user | timm data config

    def to_json(self) -> dict[str, Any]:
        return {"normalization": self.normalization.to_json() if self.normalization else None,
                "resize": self.resize, "crop": self.crop, "source": self.source}


def parse_normalize(text: str | None, *, model: Any = None, resize: int | None = None,
                    crop: int | None = None) -> Preprocess:
    """`--normalize imagenet|none|MEAN,STD|auto` (+ `--resize N`, `--crop N`) as a Preprocess.

    MEAN and STD are one value for every channel or a slash-separated value per channel
    (`0.485/0.456/0.406,0.229/0.224/0.225`). `auto` takes a timm model's own data config (mean, std and
    crop fraction) when the model has one, else the data source's default."""
    for name, v in (("--resize", resize), ("--crop", crop)):
        if v is not None and v < 1:
            raise SourceError(f"{name} is a positive number of pixels", v, f"e.g. {name} 256")
    raw = (text or "auto").strip().lower()
    if raw == "auto":
        cfg = _timm_data_config(model)
        if cfg is not None:
            size = int(cfg["input_size"][-1])
            auto_resize = resize or (int(size / cfg["crop_pct"]) if cfg.get("crop_pct") else None)
            return Preprocess(Normalization(tuple(cfg["mean"]), tuple(cfg["std"])), auto_resize,
                              crop or (size if auto_resize else None), "timm data config")
        return Preprocess(None, resize, crop, "default")
    if raw == "imagenet":
        return Preprocess(Normalization(IMAGENET_MEAN, IMAGENET_STD), resize, crop, "imagenet")
    if raw == "none":
        return Preprocess(Normalization((0.0,), (1.0,)), resize, crop, "none")
    parts = raw.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        mean, std = (tuple(float(v) for v in part.split("/")) for part in parts)
    except ValueError:
        raise SourceError("--normalize is imagenet, none, auto or MEAN,STD", text,
                          "e.g. --normalize 0.5,0.5 or --normalize 0.485/0.456/0.406,0.229/0.224/0.225") from None
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise SourceError("--normalize MEAN,STD needs as many means as stds, every std > 0", text,
                          "e.g. --normalize 0.5,0.25")
    return Preprocess(Normalization(mean, std), resize, crop, "user")


def _timm_data_config(model: Any) -> dict[str, Any] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "mean" not in cfg or "std" not in cfg:
        return None
    try:
        from timm.data import resolve_data_config

        return resolve_data_config({}, model=model)
    except Exception:  # noqa: BLE001 - an odd config falls back to the model's raw pretrained_cfg
        return {"mean": cfg["mean"], "std": cfg["std"], "input_size": cfg.get("input_size", (3, 224, 224)),
                "crop_pct": cfg.get("crop_pct")}


def _fit_channels(norm: Normalization, channels: int) -> Normalization:
    """One value for every channel, or RGB statistics for a grey model (their mean), as the model needs."""
    if len(norm.mean) == channels:
        return norm
    if len(norm.mean) == 1:
        return Normalization(norm.mean * channels, norm.std * channels)
    if channels == 1:
        return Normalization((sum(norm.mean) / len(norm.mean),), (sum(norm.std) / len(norm.std),))
    raise SourceError("normalisation statistics must match the model's input channels",
                      f"{len(norm.mean)} values for {channels} channels", "give one value or one per channel")


@dataclass
class DataBundle:
    """Train/val/test datasets of (image tensor (C,H,W) float, int label) pairs plus their metadata."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    description: str
    normalization: Normalization
    classes: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Dataset:
        if name not in ("train", "val", "test"):
            raise SourceError("data split must be one of train, val, test", name, "pass split='val' or 'test'")
        return getattr(self, name)

    def loader(
        self,
        split: str,
        *,
        batch_size: int = 128,
        limit: int | None = None,
        shuffle: bool | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> DataLoader:
        """A CPU DataLoader over `split`; `limit` keeps a fixed, seed-determined subset (fast in-loop scoring).

        Training loaders shuffle by default with a seeded generator, so two runs with one seed see
        the same batches in the same order.
        """
        ds = subsample(self.split(split), limit, seed=seed)
        shuffle = (split == "train") if shuffle is None else shuffle
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=gen)

    def sizes(self) -> dict[str, int]:
        return {s: len(self.split(s)) for s in ("train", "val", "test")}  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "sizes": self.sizes(),
            "normalization": self.normalization.to_json(),
            **self.extra,
        }


def _resize_crop(pre: Preprocess | None) -> tuple[int | None, int | None]:
    return (pre.resize, pre.crop) if pre is not None else (None, None)


def subsample(ds: Dataset, limit: int | None, *, seed: int = 0) -> Dataset:
    """A deterministic random subset of at most `limit` items (the whole set when limit is None)."""
    n = len(ds)  # type: ignore[arg-type]
    if limit is None or limit >= n:
        return ds
    if limit <= 0:
        raise SourceError("data limit must be a positive number of samples", limit, "pass limit >= 1 or None")
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return Subset(ds, idx.tolist())


# ----------------------------------------------------------------------------------------------
# datasets


class _Shaper:
    """Converts a uint8 image (C,H,W) to a normalised float tensor of the target (C,H,W)."""

    def __init__(self, input_shape: tuple[int, int, int], norm: Normalization,
                 resize: int | None = None, crop: int | None = None) -> None:
        self.c, self.h, self.w = input_shape
        self.resize, self.crop = resize, crop
        norm = _fit_channels(norm, self.c)
        self.mean = torch.tensor(norm.mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(norm.std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.float().div_(255.0)  # (C0,H0,W0) in [0,1]
        if x.shape[0] != self.c:
            if x.shape[0] == 1:
                x = x.expand(self.c, -1, -1)  # grey -> RGB by repetition
            elif self.c == 1:
                x = x[:3].mean(0, keepdim=True)  # RGB -> grey
            else:
                raise SourceError("cannot map image channels to the model's input channels",
                                  f"{x.shape[0]} -> {self.c}", "pass an input_shape with 1 or 3 channels")
        if self.resize is not None:  # shorter side to `resize`, then a centre crop (ImageNet-style eval)
            h, w = x.shape[1:]
            scale = self.resize / min(h, w)
            x = F.interpolate(x[None], size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                              align_corners=False, antialias=True)[0]
        crop = self.crop or (min(self.h, self.w) if self.resize is not None else None)
        if crop is not None and min(x.shape[1:]) >= crop:
            top, left = (x.shape[1] - crop) // 2, (x.shape[2] - crop) // 2
            x = x[:, top:top + crop, left:left + crop]
        if x.shape[1:] != (self.h, self.w):
            x = F.interpolate(x[None], size=(self.h, self.w), mode="bilinear", align_corners=False,
                              antialias=True)[0]
        return (x - self.mean) / self.std  # (C,H,W)


class ArrayDataset(Dataset):
    """In-memory uint8 images (N,C,H,W) and int64 labels (N,), shaped and normalised on access."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, shaper: _Shaper) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise SourceError("images must be (N,C,H,W) with one label each",
                              f"images {tuple(images.shape)}, labels {tuple(labels.shape)}", None)
        self.images, self.labels, self.shaper = images, labels.long(), shaper

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.shaper(self.images[i]), int(self.labels[i])


class FileDataset(Dataset):
    """Images read lazily from files (PIL), so a large folder never sits in memory."""

    def __init__(self, items: Sequence[tuple[Path, int]], shaper: _Shaper) -> None:
        self.items, self.shaper = list(items), shaper

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.shaper(_read_image(path, self.shaper.c)), label


class RecordDataset(Dataset):
    """Rows of a Hugging Face dataset: an image column (PIL or array) and an integer label column."""

    def __init__(self, rows: Any, image_key: str, label_key: str, shaper: _Shaper) -> None:
        self.rows, self.image_key, self.label_key, self.shaper = rows, image_key, label_key, shaper

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.rows[int(i)]
        return self.shaper(_to_chw_uint8(row[self.image_key], self.shaper.c)), int(row[self.label_key])


def _read_image(path: Path, channels: int) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return _to_chw_uint8(im, channels)
    except OSError as exc:
        raise SourceError("every image file must be readable", f"{path}: {exc}", "remove or fix the file") from exc


def _to_chw_uint8(img: Any, channels: int) -> torch.Tensor:
    """PIL image or HWC/HW array -> uint8 tensor (C,H,W) with 1 or 3 channels."""
    from PIL import Image

    if isinstance(img, Image.Image):
        img = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    t = torch.from_numpy(np.array(arr, copy=True))  # writable copy (PIL buffers are read-only)
    return t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # (C,H,W)


# ----------------------------------------------------------------------------------------------
# IDX (the MNIST file format)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzipped): 2 zero bytes, dtype code, ndim, ndim big-endian int32 dims."""
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise SourceError("IDX files start with two zero bytes and a known dtype code",
                          f"{path} starts with {raw[:4].hex() or 'nothing'}",
                          "point at the original (gzipped) Fashion-MNIST/MNIST IDX files")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise SourceError("IDX payload size must match its header", f"{path}: header {dims}, {len(body)} bytes",
                          "the file is truncated or corrupt: reinstall the dataset")
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    for d in (root, root / "raw", root / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    return None


def _load_fashion_mnist(
    root: Path | None, input_shape: tuple[int, ...] | None, seed: int, val_size: int | float | None,
    normalization: Normalization | None,
    preprocess: Preprocess | None = None,
) -> DataBundle:
    root = Path(root) if root else FASHION_MNIST_DIR
    shape = _check_shape(input_shape or (1, 28, 28))  # before reading 30 MB
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find_idx(root, s) for s in stems]
    if any(p is None for p in paths):
        missing = [s for s, p in zip(stems, paths) if p is None]
        raise SourceError("fashion-mnist needs the four IDX files (gzipped or not)",
                          f"{root} lacks {', '.join(missing)}",
                          "apt-get install dataset-fashion-mnist (installs /usr/share/datasets/fashion-mnist),"
                          " or pass fashion-mnist:DIR")
    x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths)  # type: ignore[arg-type]
    norm = normalization or Normalization(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    norm = _fit_channels(norm, shape[0])
    shaper = _Shaper(shape, norm, *(_resize_crop(preprocess)))
    full = ArrayDataset(torch.from_numpy(x_tr.copy())[:, None], torch.from_numpy(y_tr.astype(np.int64)), shaper)
    test = ArrayDataset(torch.from_numpy(x_te.copy())[:, None], torch.from_numpy(y_te.astype(np.int64)), shaper)
    if val_size is None:  # the usual 55k/5k split; a small IDX set (tests, subsets) holds out 10%
        val_size = 5000 if len(full) >= 20000 else 0.1
    train, val = _holdout(full, full.labels.tolist(), val_size, seed)
    return DataBundle(train, val, test, 10, shape, "fashion-mnist",
                      f"Fashion-MNIST from {root}: {len(train)} train / {len(val)} val (held out of the"
                      f" 60k training set, seed {seed}) / {len(test)} official test",
                      norm, FASHION_MNIST_CLASSES, {"root": str(root), "seed": seed})


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:  # (1, C, H, W): tolerate a batch dimension
        shape = shape[1:]
    if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
        raise SourceError("image input_shape must be (C, H, W) with C in {1, 3}", shape,
                          "pass e.g. input_shape=(1, 28, 28) or (3, 224, 224)")
    return shape  # type: ignore[return-value]


def _holdout(ds: Dataset, labels: Sequence[int], val_size: int | float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified, seed-determined split of `ds` into (train, val)."""
    n = len(labels)
    k = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise SourceError("the validation hold-out must leave both splits non-empty",
                          f"val_size={val_size} of {n} samples", "pass a smaller val_size (count or fraction)")
    rng = np.random.default_rng(seed)
    lab = np.asarray(labels)
    val_idx: list[int] = []
    classes = np.unique(lab)
    for c in classes:  # per class, take its share so val has the class balance of train
        members = np.flatnonzero(lab == c)
        take = max(1, int(round(k * len(members) / n))) if len(members) > 1 else 0
        val_idx.extend(rng.permutation(members)[:take].tolist())
    val_set = set(val_idx)
    train_idx = [i for i in range(n) if i not in val_set]
    return Subset(ds, train_idx), Subset(ds, sorted(val_idx))


def _three_way(ds: Dataset, labels: Sequence[int], val_size: int | float | None,
               seed: int) -> tuple[Dataset, Dataset, Dataset]:
    """Stratified (train, val, test) from one labelled set: test 10%, val `val_size` (default 10%)."""
    rest, test = _holdout(ds, labels, 0.1, seed)
    rest_idx: list[int] = rest.indices  # type: ignore[attr-defined]
    tr, va = _holdout(rest, [labels[i] for i in rest_idx], val_size if val_size is not None else 1 / 9, seed + 1)
    train = Subset(ds, [rest_idx[i] for i in tr.indices])  # type: ignore[attr-defined]
    val = Subset(ds, [rest_idx[i] for i in va.indices])  # type: ignore[attr-defined]
    return train, val, test


# ----------------------------------------------------------------------------------------------
# image folders


def _class_items(root: Path, classes: Sequence[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    dirs = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = list(classes) if classes is not None else dirs
    extra = set(dirs) - set(classes)
    if extra:
        raise SourceError("every split of an image folder must use the training split's classes",
                          f"{root} has unknown classes {sorted(extra)}", "rename or remove those folders")
    items = []
    for label, name in enumerate(classes):
        d = root / name
        if d.is_dir():
            items += [(p, label) for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    return classes, items


def _load_imagefolder(
    root: Path, input_shape: tuple[int, ...] | None, seed: int, val_size: int | float | None,
    normalization: Normalization | None,
    preprocess: Preprocess | None = None,
) -> DataBundle:
    if not root.is_dir():
        raise SourceError("imagefolder:DIR needs an existing directory", str(root),
                          "pass a folder with one subfolder per class (or train/ and val/ folders of them)")
    subdirs = {d.name for d in root.iterdir() if d.is_dir()}
    if "train" in subdirs:
        classes, train_items = _class_items(root / "train")
        eval_dir = next((root / n for n in ("test", "val", "validation") if n in subdirs), None)
        _, eval_items = _class_items(eval_dir, classes) if eval_dir else (classes, [])
        layout = f"train/ + {eval_dir.name}/" if eval_dir else "train/ only"
    else:
        classes, train_items, eval_items, eval_dir = *_class_items(root), [], None
        layout = "one folder of classes"
    if len(classes) < 2 or not train_items:
        raise SourceError("an image folder needs at least two class subfolders with images",
                          f"{root}: classes {classes}, {len(train_items)} images",
                          f"lay it out as DIR/<class>/*.png (suffixes {', '.join(IMAGE_SUFFIXES)})")
    labels = [lab for _, lab in train_items]
    if input_shape is None:  # default: the first image's own size, RGB
        first = _read_image(train_items[0][0], 3)
        input_shape = (3, *first.shape[1:])
    shape = _check_shape(input_shape)
    norm = normalization or (Normalization(IMAGENET_MEAN, IMAGENET_STD) if shape[0] == 3
                             else Normalization((0.5,), (0.5,)))
    norm = _fit_channels(norm, shape[0])
    shaper = _Shaper(shape, norm, *(_resize_crop(preprocess)))
    full = FileDataset(train_items, shaper)
    if eval_items:
        # train/ feeds train + a held-out val; the user's val/ (or test/) is kept for the final score only
        train, val = _holdout(full, labels, val_size if val_size is not None else 0.1, seed)
        test: Dataset = FileDataset(eval_items, shaper)
    else:
        # no evaluation folder: carve val and test (10% each, stratified) out of the one folder
        train, val, test = _three_way(full, labels, val_size, seed)
    return DataBundle(train, val, test, len(classes), shape, f"imagefolder:{root}",
                      f"image folder {root} ({layout}): {len(train)} train / {len(val)} val / {len(test)} test,"
                      f" {len(classes)} classes, resized to {shape}", norm, tuple(classes),
                      {"root": str(root), "seed": seed})


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets


def _load_hf(
    name: str, eval_split: str | None, input_shape: tuple[int, ...] | None, seed: int,
    val_size: int | float | None, normalization: Normalization | None, preprocess: Preprocess | None = None,
) -> DataBundle:
    datasets = require("datasets", "data", "loading a Hugging Face dataset (hf:NAME)")
    try:
        dd = datasets.load_dataset(name)
    except Exception as exc:  # network errors, unknown names, ... all mean "cannot resolve"
        raise SourceError("a Hugging Face dataset must be loadable (cached locally when offline)",
                          f"{name}: {type(exc).__name__}: {exc}",
                          "check the name, or download it once with network access") from exc
    splits = list(dd.keys())
    if "train" not in splits:
        raise SourceError("an hf: dataset needs a 'train' split", f"{name} has {splits}", "use another dataset")
    eval_split = eval_split or next((s for s in ("test", "validation", "val") if s in splits), None)
    if eval_split is not None and eval_split not in splits:
        raise SourceError("the evaluation split must exist", f"{name}:{eval_split}; available {splits}",
                          f"use hf:{name}:<one of {splits}>")
    tr = dd["train"]
    feats = tr.features
    image_key = next((k for k, f in feats.items() if type(f).__name__ == "Image"), None) or next(
        (k for k in ("image", "img", "pixel_values") if k in feats), None)
    label_key = next((k for k, f in feats.items() if type(f).__name__ == "ClassLabel"), None) or next(
        (k for k in ("label", "labels", "fine_label") if k in feats), None)
    if image_key is None or label_key is None:
        raise SourceError("an hf: dataset needs an image column and a class-label column",
                          f"{name} has columns {list(feats)}", "use an image-classification dataset")
    lab_feat = feats[label_key]
    classes = tuple(getattr(lab_feat, "names", ()) or ())
    labels = [int(v) for v in tr[label_key]]
    num_classes = len(classes) or (max(labels) + 1)
    if input_shape is None:
        first = _to_chw_uint8(tr[0][image_key], 3)
        input_shape = (first.shape[0], *first.shape[1:])
    shape = _check_shape(input_shape)
    norm = normalization or (Normalization(IMAGENET_MEAN, IMAGENET_STD) if shape[0] == 3
                             else Normalization((0.5,), (0.5,)))
    norm = _fit_channels(norm, shape[0])
    shaper = _Shaper(shape, norm, *(_resize_crop(preprocess)))
    full = RecordDataset(tr, image_key, label_key, shaper)
    if eval_split is not None:
        train, val = _holdout(full, labels, val_size if val_size is not None else 0.1, seed)
        test: Dataset = RecordDataset(dd[eval_split], image_key, label_key, shaper)
    else:
        train, val, test = _three_way(full, labels, val_size, seed)
    return DataBundle(train, val, test, num_classes, shape, f"hf:{name}",
                      f"Hugging Face dataset {name}: train (minus held-out val) / {eval_split or 'carved'} as test",
                      norm, classes, {"seed": seed, "eval_split": eval_split})


# ----------------------------------------------------------------------------------------------


def load_data(
    spec: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    val_size: int | float | None = None,
    normalization: Normalization | None = None,
    preprocess: Preprocess | None = None,
) -> DataBundle:
    """Resolve a data spec into a `DataBundle`.

    Specs: `fashion-mnist` or `fashion-mnist:DIR` (IDX files), `imagefolder:DIR`, `hf:NAME[:eval_split]`.
    `input_shape` (C,H,W) is the model's input: images are resized and grey/RGB converted to it.
    `val_size` is the held-out validation size (a count, or a fraction < 1); `seed` fixes every split.
    `preprocess` (see `parse_normalize`) sets normalisation, resize and crop; `normalization` alone is the
    older spelling of its first field.
    """
    if preprocess is not None and preprocess.normalization is not None:
        normalization = preprocess.normalization
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in ("fashion-mnist", "fashion_mnist", "fmnist", "fashionmnist"):
        return _load_fashion_mnist(Path(arg).expanduser() if arg else None, input_shape, seed, val_size,
                                   normalization, preprocess)
    if kind == "imagefolder":
        if not arg:
            raise SourceError("imagefolder needs a directory", spec, "write imagefolder:/path/to/images")
        return _load_imagefolder(Path(arg).expanduser(), input_shape, seed, val_size, normalization, preprocess)
    if kind == "hf":
        if not arg:
            raise SourceError("hf needs a dataset name", spec, "write hf:NAME or hf:NAME:test")
        name, _, split = arg.partition(":")
        return _load_hf(name, split or None, input_shape, seed, val_size, normalization, preprocess)
    raise SourceError("data spec must be fashion-mnist[:DIR], imagefolder:DIR or hf:NAME[:split]", spec,
                      "e.g. --data fashion-mnist")


def data_fingerprint(spec: str, max_files: int = 200_000) -> str | None:
    """A cheap fingerprint of the files behind a local data spec (relative path, size, mtime of each), so a
    resumed run can refuse data that changed. None for sources that are not local files (hf:...)."""
    import hashlib
    import os

    scheme, _, rest = spec.partition(":")
    if scheme == "fashion-mnist":
        root = Path(rest) if rest else FASHION_MNIST_DIR
    elif scheme in ("imagefolder", "text", "file"):
        root = Path(rest)
    else:
        return None
    root = root.expanduser()
    if not root.exists():
        return None
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())[:max_files]
    for p in files:
        st = os.stat(p)
        h.update(f"{p.relative_to(root) if p != root else p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
