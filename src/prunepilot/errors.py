"""User-facing errors: each states the rule, the value that broke it, and what to do."""

from __future__ import annotations


class PrunepilotError(Exception):
    """Base error whose message is meant for the user, not a traceback reader."""

    def __init__(self, rule: str, value: object | None = None, fix: str | None = None) -> None:
        self.rule, self.value, self.fix = rule, value, fix
        parts = [rule]
        if value is not None:
            parts.append(f"got: {value}")
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("; ".join(parts))


class BudgetError(PrunepilotError):
    """A budget string or combination is invalid or unreachable."""


class PlanError(PrunepilotError):
    """A plan is malformed or names layers/families the model does not have."""


class SourceError(PrunepilotError):
    """A model or data source cannot be resolved or loaded."""


class MissingDependency(PrunepilotError):
    """An optional backend is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the optional package '{package}'",
            None,
            f"pip install 'prunepilot[{extra}]'  (or: pip install {package})",
        )


def require(module: str, extra: str, purpose: str):
    """Import an optional heavy backend lazily, naming the exact pip extra when absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency(module.split(".")[0], extra, purpose) from exc
