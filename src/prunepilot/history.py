"""User-level run history: what earlier runs on a similar model found, so a new run can start from it.

One SQLite table in the user cache (beside the trained baselines), keyed by run id. Reading is best-effort:
a missing, locked or corrupt file yields no priors rather than a failed run, since history is only a hint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Union

from pydantic import BaseModel, ConfigDict

from .errors import PrunepilotError

SCHEMA = """
CREATE TABLE IF NOT EXISTS priors (run_id TEXT PRIMARY KEY, created REAL, kind TEXT, family TEXT,
                                   structure TEXT, groups INTEGER, size REAL, data TEXT);
CREATE INDEX IF NOT EXISTS priors_structure ON priors (kind, structure);
CREATE INDEX IF NOT EXISTS priors_family ON priors (kind, family);
"""

SUMMARY_SHAPE_ENTRIES = 8
SEED_KEY = "history_seed"  # a run's journaled config: what the store gave it (warm start, priors), for resumes


def default_history_path() -> Path:
    """$PRUNEPILOT_HISTORY (the file itself), else $PRUNEPILOT_CACHE/history.sqlite, else
    $XDG_CACHE_HOME/prunepilot/history.sqlite, else ~/.cache/prunepilot/history.sqlite."""
    # Same roots as models.baseline.default_cache_dir (not imported: that module pulls in torch).
    if os.environ.get("PRUNEPILOT_HISTORY"):
        return Path(os.environ["PRUNEPILOT_HISTORY"]).expanduser()
    if os.environ.get("PRUNEPILOT_CACHE"):
        return Path(os.environ["PRUNEPILOT_CACHE"]).expanduser() / "history.sqlite"
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return base / "prunepilot" / "history.sqlite"


class Fingerprint(BaseModel):
    """What makes two jobs comparable: job kind, architecture family, group structure hash, count and size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    family: str
    structure: str
    groups: int
    size: float

    @classmethod
    def of(cls, kind: str, family: str, groups: dict[str, int], size: float) -> "Fingerprint":
        """`groups` maps group (or family) name -> width; the hash is order-independent."""
        canon = json.dumps(sorted([str(k), int(v)] for k, v in groups.items()), separators=(",", ":"))
        return cls(kind=kind, family=family, structure=hashlib.sha256(canon.encode()).hexdigest(),
                   groups=len(groups), size=float(size))


class PriorRun(BaseModel):
    """The outcome of one finished run, as the job reported it (budget fractions of dense, best attempt)."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    created: float
    fingerprint: Fingerprint
    budget: dict[str, float]
    plan_shape: dict[str, float]
    outcome: dict[str, float]
    score: float
    attempts: int
    rounds_to_best: int
    strategist: str
    prunepilot_version: str
    layers: dict[str, float] = {}  # per-layer shape where the job has one (sparsify); plan_shape stays per group


def budget_distance(a: dict[str, float], b: dict[str, float]) -> float:
    """Sum of |goal difference| over shared metrics; a metric only one side constrains counts as 1 (a whole dense)."""
    d = sum(abs(a[m] - b[m]) for m in a.keys() & b.keys()) + len(a.keys() ^ b.keys())
    return round(d, 9)  # so 0.7-0.5 and 0.5-0.3 tie, and the score decides between them


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _closeness(fp: Fingerprint, p: PriorRun) -> float:
    return _rel(fp.groups, p.fingerprint.groups) + _rel(fp.size, p.fingerprint.size)


def _score_key(score: float) -> float:
    return -score if math.isfinite(score) else math.inf  # NaN/inf scores sort last, never break the sort


class HistoryStore:
    """SQLite-backed history; every write is its own transaction, reads never raise."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path).expanduser() if path else default_history_path()
        try:  # a bad file must not stop the run: reads return [], record() says what is wrong
            self._ensure()
        except Exception:
            pass

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def _ensure(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._conn()) as c, c:
            c.executescript(SCHEMA)

    def record(self, prior: PriorRun) -> None:
        """Store (or replace, by run_id) one run; PrunepilotError when the database cannot be written."""
        fp = prior.fingerprint
        try:
            self._ensure()
            with closing(self._conn()) as c, c:
                c.execute("INSERT OR REPLACE INTO priors VALUES (?,?,?,?,?,?,?,?)",
                          (prior.run_id, prior.created, fp.kind, fp.family, fp.structure, fp.groups, fp.size,
                           json.dumps(prior.model_dump())))
        except (sqlite3.Error, OSError) as exc:
            raise PrunepilotError("the run history database cannot be written", f"{self.path}: {exc}",
                                  "delete or move that file, set PRUNEPILOT_CACHE to another folder, "
                                  "or run with --no-history") from exc

    def _rows(self, where: str, args: tuple[Any, ...]) -> list[PriorRun]:
        with closing(self._conn()) as c:
            rows = c.execute(f"SELECT data FROM priors WHERE {where}", args).fetchall()
        out = []
        for (data,) in rows:
            try:  # one unreadable row (e.g. an older schema) is skipped, not fatal
                out.append(PriorRun.model_validate(json.loads(data)))
            except Exception:
                continue
        return out

    def _candidates(self, fp: Fingerprint) -> list[PriorRun]:
        """Same kind + structure; when there are none, same kind + family. Closest size first, then newest."""
        if not self.path.is_file():
            return []
        runs = self._rows("kind=? AND structure=?", (fp.kind, fp.structure))
        if not runs:
            runs = self._rows("kind=? AND family=?", (fp.kind, fp.family))
        return sorted(runs, key=lambda p: (_closeness(fp, p), -p.created))

    def matching(self, fp: Fingerprint, *, limit: int = 5) -> list[PriorRun]:
        """Up to `limit` comparable runs, most similar model first; [] on any read failure."""
        try:
            return self._candidates(fp)[:max(limit, 0)]
        except Exception:
            return []

    def nearest(self, fp: Fingerprint, budget: dict[str, float], limit: int = 5) -> list[PriorRun]:
        """Comparable runs ordered by budget distance, then score (best first); [] on any read failure."""
        try:
            runs = self._candidates(fp)  # the whole tier, not the first `limit`: budget decides here
            runs.sort(key=lambda p: (budget_distance(budget, p.budget), _score_key(p.score)))
            return runs[:max(limit, 0)]
        except Exception:
            return []

    def best_shape_for(self, fp: Fingerprint, budget: dict[str, float]) -> PriorRun | None:
        """The best-scoring comparable run at the nearest budget, or None."""
        runs = self.nearest(fp, budget, limit=1)
        return runs[0] if runs else None


class NullHistory:
    """Stores nothing and knows nothing (`--no-history`)."""

    path: Path | None = None

    def record(self, prior: PriorRun) -> None:
        return None

    def matching(self, fp: Fingerprint, *, limit: int = 5) -> list[PriorRun]:
        return []

    def nearest(self, fp: Fingerprint, budget: dict[str, float], limit: int = 5) -> list[PriorRun]:
        return []

    def best_shape_for(self, fp: Fingerprint, budget: dict[str, float]) -> PriorRun | None:
        return None


History = Union[HistoryStore, NullHistory]


def _num(x: float) -> float | None:
    return round(float(x), 4) if math.isfinite(x) else None  # strict JSON has no NaN/Infinity


def prior_summary(priors: list[PriorRun]) -> list[dict[str, Any]]:
    """Compact JSON-safe view for a prompt: budget, outcome, score, rounds to best, the largest plan entries."""
    out = []
    for p in priors:
        shape = sorted(p.plan_shape.items(), key=lambda kv: (-kv[1] if math.isfinite(kv[1]) else math.inf, kv[0]))
        item: dict[str, Any] = {
            "budget": {k: _num(v) for k, v in p.budget.items()},
            "outcome": {k: _num(v) for k, v in p.outcome.items()},
            "score": _num(p.score),
            "rounds_to_best": p.rounds_to_best,
            "plan_shape": {k: _num(v) for k, v in shape[:SUMMARY_SHAPE_ENTRIES]},
        }
        if len(shape) > SUMMARY_SHAPE_ENTRIES:
            item["plan_shape_omitted"] = len(shape) - SUMMARY_SHAPE_ENTRIES
        out.append(item)
    return out


def journaled_seed(journal: Any, run_id: str, lookup: Callable[[], tuple[list[PriorRun], Any]]) -> dict[str, Any]:
    """What the store gives a run: {"warm_start": plan dict or None, "from_run": id or None, "priors": compact
    views}. Looked up once (`lookup() -> (priors, warm Plan or None)`) and written into the run's journaled
    config, so a resumed or replayed run takes the same warm start even when the store changed meanwhile."""
    learned = journal.run(run_id)["config"].get(SEED_KEY)
    if learned is None:
        priors, plan = lookup()
        learned = {"warm_start": plan.model_dump(exclude_unset=True) if plan is not None else None,
                   "from_run": priors[0].run_id if plan is not None else None, "priors": prior_summary(priors)}
        journal.add_to_config(run_id, SEED_KEY, learned)
    return learned


def seed_plan(learned: dict[str, Any]) -> Any:
    """The warm-start Plan of a journaled seed, or None."""
    from .plan import Plan

    return Plan.model_validate(learned["warm_start"]) if learned.get("warm_start") else None
