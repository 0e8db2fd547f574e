"""Result files shared by every command: result.json, plan.json, summary.md (written atomically)."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a crash never leaves a half-written file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2, default=_default)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def environment() -> dict[str, Any]:
    """What the numbers were measured on (threads matter for CPU latency)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }


def build_result(
    *,
    kind: str,
    model: str,
    budget: dict[str, Any],
    dense: dict[str, Any],
    compressed: dict[str, Any],
    within_band: bool,
    errors: dict[str, float],
    **extra: Any,
) -> dict[str, Any]:
    """The common result.json shape: every command fills these keys, and may add its own."""
    return {
        "kind": kind,
        "model": model,
        "budget": budget,
        "dense": dense,
        "compressed": compressed,
        "within_band": within_band,
        "errors": errors,
        "environment": environment(),
        **extra,
    }


def files_on_disk_mb(out, export: dict[str, Any]) -> dict[str, float]:
    """Sizes of the files an export wrote, measured on disk (MB), by their role in `export`."""
    from pathlib import Path

    sizes: dict[str, float] = {}
    for role, name in export.items():
        if isinstance(name, str) and (Path(out) / name).is_file():
            sizes[role] = round((Path(out) / name).stat().st_size / 2**20, 4)
    return sizes
