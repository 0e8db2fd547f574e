"""Budgets: what the compressed model must meet, absolute or relative to the dense model, within a band."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import BudgetError

Metric = Literal["macs", "params", "latency_ms", "memory_mb", "size_mb", "sparsity"]

# Metrics where "smaller is the goal" (a cap); sparsity is a floor reached from below.
CAP_METRICS: tuple[str, ...] = ("macs", "params", "latency_ms", "memory_mb", "size_mb")
MEASURED_METRICS: tuple[str, ...] = ("latency_ms", "memory_mb")

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS = {
    "latency_ms": {"ms": 1.0, "s": 1000.0, "us": 1e-3},
    "memory_mb": {"mb": 1.0, "gb": 1024.0, "kb": 1 / 1024},
    "size_mb": {"mb": 1.0, "gb": 1024.0, "kb": 1 / 1024},
}


class Band(BaseModel):
    """Tolerance around a target: achieved/target - 1 must lie in [-under, +over]."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    over: float = 0.01
    under: float = 0.05

    @classmethod
    def parse(cls, text: str) -> "Band":
        """Parse '+1%/-5%' (or '1%' for a symmetric band)."""
        m = re.fullmatch(r"\s*\+?(\d+(?:\.\d+)?)%\s*(?:/\s*-?(\d+(?:\.\d+)?)%)?\s*", text)
        if not m:
            raise BudgetError(
                "a tolerance is '+OVER%/-UNDER%' (e.g. '+1%/-5%') or one symmetric 'X%'",
                text,
                "write it like --tolerance +1%/-5%",
            )
        over = float(m.group(1)) / 100
        under = float(m.group(2)) / 100 if m.group(2) is not None else over
        if over > 0.5 or under > 0.9:
            raise BudgetError("a tolerance band must be narrower than +50%/-90%", text, "use e.g. +1%/-5%")
        return cls(over=over, under=under)

    def describe(self) -> str:
        return f"+{self.over:.1%}/-{self.under:.1%}"


class Target(BaseModel):
    """One budget target. `value` is absolute in the metric's unit unless `relative` is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    metric: Metric
    value: float
    relative: bool = False
    text: str = ""

    def absolute(self, dense_value: float) -> float:
        if self.metric == "sparsity":
            return self.value
        return self.value * dense_value if self.relative else self.value


# How people write budgets ("under 100 MB", "1.77 GMACs", "<= 20 ms", "10M params", "50% sparsity"): a leading cap
# or floor word and a trailing name of the metric say nothing the option does not, so they are dropped.
_CAP_WORD = re.compile(r"^(?:under|below|at\s*most|up\s*to|max(?:imum)?|<=|<|\u2264|~)\s*")
_FLOOR_WORD = re.compile(r"^(?:at\s*least|min(?:imum)?|>=|>|\u2265|~)\s*")
_TRAIL = {
    "macs": r"\s*(?:macs?|mult-?adds?)$",
    "params": r"\s*(?:param(?:eter)?s?)$",
    "sparsity": r"\s*(?:sparsity|sparse)$",
    "latency_ms": r"\s*(?:latency|per\s*batch)$",
}


def _normalise(metric: str, text: str) -> str:
    raw = text.strip().lower()
    ours, theirs = (_FLOOR_WORD, _CAP_WORD) if metric == "sparsity" else (_CAP_WORD, _FLOOR_WORD)
    if theirs.match(raw) and not ours.match(raw):
        raise BudgetError(f"a {metric} target is a {'floor' if metric == 'sparsity' else 'cap'}: the compressed model "
                          f"lands {'at or above' if metric == 'sparsity' else 'at or below'} it, within the band",
                          text, "write the number alone, e.g. " + ("50%" if metric == "sparsity" else "40%"))
    raw = ours.sub("", raw)
    if metric in _TRAIL:
        raw = re.sub(_TRAIL[metric], "", raw)
    if metric == "macs" and re.search(r"flops?$", raw):
        raise BudgetError("prunepilot counts MACs (multiply-accumulates), and FLOPs are counted differently across "
                          "tools (1 MAC = 2 FLOPs in most, 1 in some papers)", text,
                          "pass the MAC count, e.g. --target-macs 1.77G (half a FLOP count in the 2-FLOPs convention)")
    return raw.replace(" ", "")


def _parse_number(metric: str, text: str) -> tuple[float, bool]:
    raw = _normalise(metric, text)
    if raw.endswith("%"):
        num = raw[:-1]
        try:
            frac = float(num) / 100
        except ValueError:
            raise BudgetError(f"a relative {metric} target is a percentage like '45%'", text, "use e.g. 45%") from None
        if not (0 < frac <= 1.0 if metric != "sparsity" else 0 <= frac < 1.0):
            raise BudgetError(
                f"a relative {metric} target must lie in (0%, 100%]" if metric != "sparsity"
                else "a sparsity target must lie in [0%, 100%)",
                text,
                "pick a percentage of the dense model, e.g. 50%",
            )
        return frac, metric != "sparsity"
    if metric in _UNITS:
        units = _UNITS[metric]
        m = re.fullmatch(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)([a-z]*)", raw)
        if not m or (m.group(2) and m.group(2) not in units):
            raise BudgetError(
                f"a {metric} target is a number with a unit ({', '.join(units)}) or a percentage",
                text,
                f"e.g. {'20ms' if metric == 'latency_ms' else '100MB'} or 40%",
            )
        value = float(m.group(1)) * units[m.group(2) or next(iter(units))]
    elif metric == "sparsity":
        try:
            value = float(raw)
        except ValueError:
            raise BudgetError("a sparsity target is a fraction (0.5) or a percentage (50%)", text, "e.g. 50%") from None
        if not 0 <= value < 1:
            raise BudgetError("a sparsity fraction must lie in [0, 1)", text, "e.g. 0.5 or 50%")
        return value, False
    else:
        m = re.fullmatch(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)([kmgt]?)", raw)
        if not m:
            raise BudgetError(
                f"a {metric} target is a count with an optional k/M/G/T suffix or a percentage",
                text,
                "e.g. 1.77G or 45%",
            )
        value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"a {metric} target must be positive", text, "give a positive number")
    return value, False


def parse_target(metric: str, text: str) -> Target:
    if metric not in ("macs", "params", "latency_ms", "memory_mb", "size_mb", "sparsity"):
        raise BudgetError("unknown budget metric", metric, "use one of macs, params, latency_ms, memory_mb, size_mb, sparsity")
    value, relative = _parse_number(metric, text)
    return Target(metric=metric, value=value, relative=relative, text=text)


class Budget(BaseModel):
    """A set of targets sharing one tolerance band."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    targets: tuple[Target, ...]
    band: Band = Band()

    @classmethod
    def parse(cls, tolerance: str | None = None, **texts: str | None) -> "Budget":
        """Budget.parse(macs="1.77G", params="60%", tolerance="+1%/-5%")."""
        targets = tuple(parse_target(k, v) for k, v in texts.items() if v is not None)
        if not targets:
            raise BudgetError(
                "a budget needs at least one target",
                None,
                "pass e.g. --target-macs 50% (or --target-params / --target-latency / --target-memory)",
            )
        seen = [t.metric for t in targets]
        if len(set(seen)) != len(seen):
            raise BudgetError("each metric may appear once in a budget", seen, "drop the duplicate target")
        return cls(targets=targets, band=Band.parse(tolerance) if tolerance else Band())

    def resolve(self, dense: dict[str, float]) -> "ResolvedBudget":
        """Turn relative targets into absolute ones against the dense model and check reachability."""
        goals: dict[str, float] = {}
        for t in self.targets:
            if t.metric != "sparsity" and t.metric not in dense:
                raise BudgetError(f"the dense model has no measured '{t.metric}'", t.text, "measure it or drop the target")
            goal = t.absolute(dense.get(t.metric, 0.0))
            if t.metric in CAP_METRICS and goal > dense[t.metric] * (1 + self.band.over):
                raise BudgetError(
                    f"a {t.metric} target must be below the dense model's {t.metric} ({_fmt(t.metric, dense[t.metric])})",
                    f"{t.text} = {_fmt(t.metric, goal)}",
                    "give a smaller absolute value or a percentage below 100%",
                )
            goals[t.metric] = goal
        return ResolvedBudget(goals=goals, band=self.band, texts={t.metric: t.text for t in self.targets})

    def describe(self) -> str:
        return ", ".join(f"{t.metric} {t.text}" for t in self.targets) + f" (band {self.band.describe()})"


@dataclass(frozen=True)
class ResolvedBudget:
    """Absolute goals, ready to be checked against measured metrics."""

    goals: dict[str, float]
    band: Band
    texts: dict[str, str] = field(default_factory=dict)

    def error(self, metric: str, achieved: float) -> float:
        """Relative error (achieved - target) / target, as AgenticPruner defines it."""
        goal = self.goals[metric]
        return (achieved - goal) / goal if goal else achieved

    def within(self, metric: str, achieved: float) -> bool:
        e = self.error(metric, achieved)
        if metric == "sparsity":
            return abs(achieved - self.goals[metric]) <= 0.005
        return -self.band.under - 1e-12 <= e <= self.band.over + 1e-12

    def meets_cap(self, metric: str, achieved: float) -> bool:
        """Hard side only: at most +over above the goal (used for measured, noisy targets)."""
        return self.error(metric, achieved) <= self.band.over + 1e-12

    def all_within(self, metrics: dict[str, float]) -> bool:
        return all(self.within(m, metrics[m]) for m in self.goals if m in metrics)

    def to_json(self) -> dict:
        return {
            "targets": {m: {"goal": g, "text": self.texts.get(m, "")} for m, g in self.goals.items()},
            "band": {"over": self.band.over, "under": self.band.under},
        }


def _fmt(metric: str, v: float) -> str:
    if metric in ("macs", "params"):
        return f"{v / 1e9:.4g}G" if v >= 1e9 else f"{v / 1e6:.4g}M"
    if metric == "latency_ms":
        return f"{v:.3g} ms"
    if metric in ("memory_mb", "size_mb"):
        return f"{v:.4g} MB"
    return f"{v:.4g}"


format_metric = _fmt
