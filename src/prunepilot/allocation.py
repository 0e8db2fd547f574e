"""Allocation: what the projector returns for structured pruning (kept units per group, kept heads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .structure import Structure


@dataclass(frozen=True)
class Allocation:
    """Kept decision units per group (channel units; head-dim positions for attention groups) and, when pruning
    whole heads, kept heads per attention group; `skip`: residual blocks replaced by the identity (blocks.py)."""

    kept: dict[str, int]
    heads: dict[str, int]
    skip: tuple[str, ...] = field(default=())

    def fractions(self, structure: "Structure") -> dict[str, float]:
        """Kept fraction of each group's channels (removing heads removes their channels too)."""
        f = {g: k / structure.groups[g].units for g, k in self.kept.items()}
        for g, h in self.heads.items():
            f[g] = f.get(g, 1.0) * h / structure.groups[g].num_heads
        return f

    def head_fractions(self, structure: "Structure") -> dict[str, float]:
        return {g: h / structure.groups[g].num_heads for g, h in self.heads.items()}

    def widths(self, structure: "Structure") -> dict[str, tuple[int, int]]:
        """group -> (dense width, pruned width) in channels of the root dimension."""
        out = {}
        for name, g in structure.groups.items():
            f = self.kept.get(name, g.units) / g.units
            h = self.heads.get(name, g.num_heads) / g.num_heads if g.num_heads else 1.0
            out[name] = (g.width, int(round(g.width * f * h)))
        return out

    def to_json(self) -> dict:
        out: dict = {"kept": dict(self.kept), "heads": dict(self.heads)}
        if self.skip:  # absent when empty: records of runs that skip nothing read as before
            out["skip"] = list(self.skip)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Allocation":
        return cls({str(k): int(v) for k, v in data.get("kept", {}).items()},
                   {str(k): int(v) for k, v in data.get("heads", {}).items()},
                   tuple(sorted(str(b) for b in data.get("skip", []))))
