"""What every Python API call returns."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Result:
    """The compressed model and what was measured. `raw` is result.json's content (the same for the CLI)."""

    model: nn.Module
    plan: dict[str, Any]
    metrics: dict[str, Any]  # the compressed model's measurements
    dense: dict[str, Any]  # the same measurements of the model handed in
    within_band: bool
    run_id: str | None = None
    out: Path | None = None
    report_path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.metrics.items() if isinstance(v, (int, float))}
        return (f"Result(within_band={self.within_band}, run_id={self.run_id!r}, metrics={shown}, "
                f"out={str(self.out) if self.out else None!r})")


@contextmanager
def run_folder(out: str | Path | None, prefix: str = "prunepilot-") -> Iterator[tuple[Path, bool]]:
    """(folder, keep): the caller's `out`, or a temporary folder deleted when the call returns."""
    if out is not None:
        yield Path(out), True
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp) / "run", False


def folder_log(log: Callable[[str], None], folder: Path, keep: bool) -> Callable[[str], None]:
    """`log`, except that a line naming a temporary run folder says that the folder goes when the call returns
    (a notebook user would otherwise open a report path that no longer exists)."""
    if keep:
        return log
    where = str(folder.parent)

    def say(msg: str) -> None:
        log(f"{msg}  (a temporary folder, deleted on return: pass out= to keep it)" if where in msg else msg)

    return say


def option_text(value: str | torch.device | torch.dtype | None) -> str:
    """A device/dtype given as text, torch.device or torch.dtype, as the jobs' options spell it (None: auto)."""
    if value is None:
        return "auto"
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return str(value)
