"""Journal: append-only SQLite record of runs, attempts and LLM transcripts. Runs resume and replay from it.

A run's config holds everything needed to rebuild it (model spec with hashes, data, budget, plan, seeds,
agent); its attempts are `Attempt` records; its LLM calls are keyed by the attempt index they served."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .attempt import Attempt

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, kind TEXT, created REAL, status TEXT, out_dir TEXT,
                                 config TEXT, result TEXT);
CREATE TABLE IF NOT EXISTS attempts (run_id TEXT, round INTEGER, created REAL, data TEXT,
                                     PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS llm_calls (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, round INTEGER,
                                      created REAL, data TEXT);
"""


def default_journal_path() -> Path:
    return Path("runs") / "journal.sqlite"


class Journal:
    """Each write is its own transaction, so a crash loses at most the attempt in flight."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path else default_journal_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._conn()) as c, c:
            c.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def start_run(self, kind: str, config: dict[str, Any], out_dir: str | Path, run_id: str | None = None) -> str:
        run_id = run_id or time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with closing(self._conn()) as c, c:
            c.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?)",
                      (run_id, kind, time.time(), "running", str(out_dir), json.dumps(config, default=str), None))
        return run_id

    def record_attempt(self, run_id: str, attempt: "Attempt") -> None:
        # INSERT OR REPLACE: an attempt redone after a kill (before its record landed) is not duplicated
        with closing(self._conn()) as c, c:
            c.execute("INSERT OR REPLACE INTO attempts VALUES (?,?,?,?)",
                      (run_id, attempt.index, time.time(), attempt.model_dump_json()))

    def record_llm_call(self, run_id: str, round_: int, data: dict[str, Any]) -> None:
        with closing(self._conn()) as c, c:
            c.execute("INSERT INTO llm_calls (run_id, round, created, data) VALUES (?,?,?,?)",
                      (run_id, round_, time.time(), json.dumps(data, default=str)))

    def finish_run(self, run_id: str, status: str, result: dict[str, Any] | None = None) -> None:
        with closing(self._conn()) as c, c:
            c.execute("UPDATE runs SET status=?, result=? WHERE id=?",
                      (status, json.dumps(result, default=str) if result is not None else None, run_id))

    def run(self, run_id: str) -> dict[str, Any]:
        with closing(self._conn()) as c:
            row = c.execute("SELECT id, kind, created, status, out_dir, config, result FROM runs WHERE id=?", (run_id,)).fetchone()
        if row is None:
            from .errors import PrunepilotError

            raise PrunepilotError("no run with this id in the journal", run_id, f"list runs with `prunepilot runs list --journal {self.path}`")
        return {"id": row[0], "kind": row[1], "created": row[2], "status": row[3], "out_dir": row[4],
                "config": json.loads(row[5]), "result": json.loads(row[6]) if row[6] else None}

    def runs(self) -> list[dict[str, Any]]:
        with closing(self._conn()) as c:
            rows = c.execute("SELECT id FROM runs ORDER BY created").fetchall()
        return [self.run(r[0]) for r in rows]

    def attempts(self, run_id: str) -> list["Attempt"]:
        from pydantic import ValidationError

        from .attempt import Attempt
        from .errors import PrunepilotError

        with closing(self._conn()) as c:
            rows = c.execute("SELECT data FROM attempts WHERE run_id=? ORDER BY round", (run_id,)).fetchall()
        try:
            return [Attempt.model_validate_json(r[0]) for r in rows]
        except ValidationError as exc:
            raise PrunepilotError("this journal's attempts are not in the current Attempt format (written by an older "
                                  "prunepilot?)", f"{self.path}: {str(exc)[:200]}", "start a new run") from None

    def add_to_config(self, run_id: str, key: str, value: Any) -> None:
        """Record one more fact of the run's configuration learned after it started (what the history store
        gave it), so a resumed run reads it back instead of looking it up again. A key once written is kept."""
        with closing(self._conn()) as c, c:
            row = c.execute("SELECT config FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                return
            config = json.loads(row[0])
            config.setdefault(key, value)
            c.execute("UPDATE runs SET config=? WHERE id=?", (json.dumps(config, default=str), run_id))

    def set_status(self, run_id: str, status: str) -> None:
        with closing(self._conn()) as c, c:
            c.execute("UPDATE runs SET status=? WHERE id=?", (status, run_id))

    def latest_run(self) -> str | None:
        with closing(self._conn()) as c:
            row = c.execute("SELECT id FROM runs ORDER BY created DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def llm_calls(self, run_id: str) -> list[dict[str, Any]]:
        with closing(self._conn()) as c:
            rows = c.execute("SELECT round, data FROM llm_calls WHERE run_id=? ORDER BY id", (run_id,)).fetchall()
        return [{"round": r[0], **json.loads(r[1])} for r in rows]


RUN_MARK = ".prunepilot-run"


def prepare_out(out: Path, *, overwrite: bool = False, resume: bool = False) -> None:
    """One run per output folder: a folder that already holds a run is refused (or cleared with `overwrite`),
    so attempts, transcripts and reports never mix runs."""
    import shutil

    from .errors import PrunepilotError

    out = Path(out)
    if resume:
        return
    if out.exists() and any(p.name != RUN_MARK for p in out.iterdir()):
        if not any((out / f).exists() for f in ("journal.sqlite", "result.json", RUN_MARK)):
            raise PrunepilotError("the output folder is not empty and does not hold a prunepilot run", str(out),
                                  "choose another --out (or empty the folder)")
        if not overwrite:
            prev = Journal(out / "journal.sqlite").latest_run() if (out / "journal.sqlite").exists() else None
            hint = f"`prunepilot runs resume {prev} --journal {out / 'journal.sqlite'}` continues it, " if prev else ""
            raise PrunepilotError("the output folder already holds a run", str(out),
                                  f"{hint}--overwrite replaces it, or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # marks the folder as a run's from its first file on: a run that fails before result.json can be overwritten
    (out / RUN_MARK).write_text("a prunepilot run writes into this folder\n")


def open_run(out: Path, kind: str, config: dict[str, Any], *, run_id: str | None = None, overwrite: bool = False,
             log: Any = print) -> tuple[Journal, str]:
    """The run's folder and journal: a new run (one per folder, see `prepare_out`), or with `run_id` the same run
    continued. OUT/run_id names it for tools that only see the folder."""
    out = Path(out)
    prepare_out(out, overwrite=overwrite, resume=run_id is not None)
    journal = Journal(out / "journal.sqlite")
    if run_id is None:
        run_id = journal.start_run(kind, config, out)
    else:
        journal.set_status(run_id, "running")
    (out / "run_id").write_text(run_id)
    log(f"run {run_id} (journal {out / 'journal.sqlite'})")
    return journal, run_id
