"""What every Python API call returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
