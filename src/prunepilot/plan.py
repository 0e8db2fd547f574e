"""Plan: the analyst's per-layer strategy, as validated data (never code)."""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import PlanError

PLAN_VERSION = 1
MAX_RATIO = 0.9  # never remove more than 90% of a group's channels: keeps every layer alive

Importance = Literal["l1", "l2", "taylor", "random"]
QuantScheme = Literal["none", "int8_dynamic", "int8_weight_only"]


class Plan(BaseModel):
    """Per-layer strategy, the same noun for every job (structured ratios, sparsity levels, quantization).

    `ratios` maps a target to the fraction of channels to remove. A target is an isomorphic family name
    (see `prunepilot profile`), a group/layer name, or a `re:` regular expression over group names.
    Precedence: exact group name > regex (first match in order) > family > `default_ratio`.
    The projector treats the ratios as a *shape* and rescales them so the budget holds. `default_ratio=None`
    means "no opinion": the job keeps the current allocation for unnamed targets (sparsity ramp).
    Each job's engine caps a ratio at its own safe maximum (channels 0.9, weights 0.95).
    """

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = PLAN_VERSION
    ratios: dict[str, float] = Field(default_factory=dict)
    default_ratio: float | None = 0.3
    importance: Importance = "l2"
    round_to: int | None = None
    protected: list[str] = Field(default_factory=list)
    prune_heads: bool = False
    quantize: dict[str, QuantScheme] = Field(default_factory=dict)
    skip: list[str] = Field(default_factory=list)  # residual blocks replaced by the identity (`profile` lists them)
    rationale: str = ""
    reflection: str = ""  # the analyst's comment on the history it read
    source: str = ""  # which strategist wrote it (fallbacks say so)
    params: dict[str, float] = Field(default_factory=dict)  # the strategist's own knobs, echoed in history

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for k, r in v.items():
            if not (0.0 <= r <= 1.0):
                raise ValueError(f"ratio for '{k}' must lie in [0, 1], got {r}")
            if k.startswith("re:"):
                try:
                    re.compile(k[3:])
                except re.error as exc:
                    raise ValueError(f"'{k}' is not a valid regular expression: {exc}") from None
        return v

    @field_validator("params")
    @classmethod
    def _params_finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = sorted(k for k, x in v.items() if not math.isfinite(x))
        if bad:
            raise ValueError(f"params must be finite numbers; not finite: {', '.join(bad)}")
        return v

    @field_validator("default_ratio")
    @classmethod
    def _default_in_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"default_ratio must lie in [0, 1], got {v}")
        return v

    @field_validator("round_to")
    @classmethod
    def _round_to_valid(cls, v: int | None) -> int | None:
        if v is not None and not (1 <= v <= 256):
            raise ValueError(f"round_to must be between 1 and 256, got {v}")
        return v

    def with_skip(self, blocks) -> "Plan":
        """This plan with `blocks` skipped too (the user's --skip / skip= on top of any plan)."""
        return self.model_copy(update={"skip": sorted(set(self.skip) | set(blocks))}) if blocks else self

    def ratio_for(self, group: str, family: str) -> float:
        """Resolve the ratio a group gets under this plan (before projection)."""
        if group in self.ratios:
            return self.ratios[group]
        for key, r in self.ratios.items():
            if key.startswith("re:") and re.search(key[3:], group):
                return r
        if family in self.ratios:
            return self.ratios[family]
        return self.default_ratio or 0.0

    def is_protected(self, group: str, family: str) -> bool:
        for p in self.protected:
            if p == group or p == family or (p.startswith("re:") and re.search(p[3:], group)):
                return True
        return False

    def check_names(self, groups: list[str], families: list[str], layers: list[str] | None = None,
                    blocks: list[str] | None = None) -> None:
        """Unknown names are an error, never silently ignored."""
        for key in self.skip:
            if key not in (blocks or []):
                raise PlanError(
                    "a plan skips a module that is not a skippable residual block",
                    key,
                    f"skip one of the blocks `prunepilot profile` lists ({', '.join((blocks or [])[:4]) or 'this model has none'}"
                    f"{', ...' if len(blocks or []) > 4 else ''})",
                )
        known = set(groups) | set(families)
        for key in list(self.ratios) + list(self.protected):
            if key.startswith("re:"):
                if not any(re.search(key[3:], g) for g in groups):
                    raise PlanError(
                        "a plan's regex must match at least one prunable group",
                        key,
                        "run `prunepilot profile` to list group and family names",
                    )
            elif key not in known:
                close = [n for n in known if key.split(".")[-1] in n][:3]
                raise PlanError(
                    "a plan names a group or family the model does not have",
                    key,
                    f"use a name from `prunepilot profile`{' (did you mean ' + ', '.join(close) + '?)' if close else ''}",
                )
        for key in self.quantize:
            names = layers if layers is not None else groups
            if key.startswith("re:"):
                if not any(re.search(key[3:], n) for n in names):
                    raise PlanError("a quantize regex must match at least one layer", key, "check layer names")
            elif key not in names and key != "*":
                raise PlanError("a quantize entry names a layer the model does not have", key, "check layer names")

    @classmethod
    def from_json_text(cls, text: str) -> "Plan":
        try:
            return cls.model_validate_json(text)
        except Exception as exc:
            raise PlanError("the plan is not valid against the Plan schema", str(exc)[:500], "fix the listed fields") from None
