"""The user's own DataLoaders behind the interface the jobs read (`loader(split, ...)`, `to_json()`).

Their transforms and their batches are used as they are: `batch_size` is theirs (ours is ignored), `limit`
stops after that many samples, and iteration is seeded (the global RNG is forked and seeded for each pass,
so a shuffling DataLoader without its own generator gives the same order for every candidate).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SourceError
from ..evaluate.batches import split_batch
from ..inputs import batch_size as batch_len


class SeededBatches:
    """Re-iterable view of a user's loader: at most `limit` samples, the same order for the same seed."""

    def __init__(self, loader: Iterable, limit: int | None, seed: int) -> None:
        self.loader, self.limit, self.seed = loader, limit, seed

    def __iter__(self) -> Iterator[Any]:
        gen = getattr(self.loader, "generator", None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if isinstance(gen, torch.Generator):
                gen.manual_seed(self.seed)
            seen = 0
            for batch in self.loader:
                if self.limit is not None and seen >= self.limit:
                    return
                yield batch
                seen += batch_len(split_batch(batch)[0])

    def __len__(self) -> int:
        try:
            n = len(self.loader)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError("the user's loader has no length") from None
        if self.limit is None:
            return n
        per = getattr(self.loader, "batch_size", None) or 1
        return min(n, max(1, -(-self.limit // per)))


@dataclass
class UserData:
    train: Iterable | None
    val: Iterable | None
    test: Iterable | None = None
    name: str = "user DataLoaders"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "val", "test"):
            obj = getattr(self, split)
            if obj is not None and (isinstance(obj, (torch.Tensor, str, bytes)) or not hasattr(obj, "__iter__")):
                raise SourceError(f"{split}= must be an iterable of batches (a DataLoader)", type(obj).__name__,
                                  f"pass {split}=torch.utils.data.DataLoader(dataset, batch_size=...)")

    def has(self, split: str) -> bool:
        return self._get(split) is not None

    def _get(self, split: str) -> Iterable | None:
        if split == "test":
            return self.test if self.test is not None else self.val
        if split == "val":
            return self.val
        if split == "train":
            return self.train
        raise SourceError("data split must be one of train, val, test", split, "pass split='val'")

    def loader(self, split: str, *, batch_size: int = 128, limit: int | None = None, shuffle: bool | None = None,
               seed: int = 0, num_workers: int = 0) -> SeededBatches:
        source = self._get(split)
        if source is None:
            raise SourceError(f"this step needs {split} batches", f"no {split}= DataLoader was given",
                              f"pass {split}= (or val= for scoring and the final test)")
        return SeededBatches(source, limit, seed)

    def to_json(self) -> dict[str, Any]:
        sizes = {}
        for split in ("train", "val", "test"):
            obj = getattr(self, split)
            ds = getattr(obj, "dataset", None)
            try:
                sizes[split] = len(ds) if ds is not None else None  # type: ignore[arg-type]
            except TypeError:
                sizes[split] = None
        return {"name": self.name, "description": "batches from the caller's own DataLoaders (their transforms)",
                "sizes": sizes, **self.extra}
