"""`prunepilot runs list|show|resume|replay`: the journal of agent runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import console

JournalOpt = typer.Option(Path("runs/demo/journal.sqlite"), "--journal", help="The run's journal (OUT/journal.sqlite).")


def _open(journal: Path):
    """The journal at `journal`; a path with no journal is an error, not a new empty one."""
    from ..errors import PrunepilotError
    from ..journal import Journal

    if not Path(journal).is_file():
        raise PrunepilotError("no journal at this path", str(journal),
                              "pass --journal OUT/journal.sqlite of the run's output folder")
    return Journal(journal)


def _check_rebuildable(kind: str, c: dict) -> None:
    """Refuse, before anything is written, a run the journal alone cannot rebuild (model or data from Python)."""
    from ..errors import SourceError

    if kind == "sparsify":
        for key in ("model", "calib"):
            if str(c.get(key, "")).startswith("python:"):
                raise SourceError(f"this run's {'model' if key == 'model' else 'calibration data'} was handed in from "
                                  "Python, so the journal cannot rebuild it", c[key],
                                  "re-run it from Python with the same objects")
        return
    if not c.get("model_spec"):
        raise SourceError("this run's model was handed in from Python, so the journal cannot reload it",
                          c.get("model"), "re-run it from Python with the same model")
    if kind == "prune":
        from ..jobs.prune import PruneRun

        PruneRun.from_config(c)  # refuses data, evaluate() or loss() from Python
    elif kind == "compress":
        from ..jobs.compress import CompressRun

        CompressRun.from_config(c)


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="Inspect, resume and replay journaled agent runs.", no_args_is_help=True)
    app.add_typer(runs, name="runs")

    @runs.command("list")
    def list_(journal: Path = JournalOpt) -> None:
        """List runs in a journal."""
        j = _open(journal)
        t = Table()
        t.add_column("id", no_wrap=True, min_width=22)  # what the user copies into `runs show/resume`: never cut
        for c in ("kind", "status", "attempts"):
            t.add_column(c)
        for c in ("model", "out"):
            t.add_column(c, overflow="fold")  # paths wrap instead of losing their tail to an ellipsis
        for r in j.runs():
            t.add_row(r["id"], r["kind"], r["status"], str(len(j.attempts(r["id"]))), r["config"].get("model", ""), r["out_dir"])
        console.print(t)

    @runs.command()
    def show(run_id: str, journal: Path = JournalOpt) -> None:
        """Show a run's attempts: phase, strategist, verdict, scores, rationale and reflection, errors."""
        j = _open(journal)
        r = j.run(run_id)
        console.print(f"[bold]{r['id']}[/] {r['kind']} {r['status']} — {r['config'].get('model')} — agent {r['config'].get('agent')}")
        t = Table()
        for c in ("#", "phase", "strategist", "verdict", "budget error", "score", "rationale / reflection"):
            t.add_column(c)
        for a in j.attempts(run_id):
            note = a.rationale + (f"\n[dim]{a.reflection}[/]" if a.reflection else "")
            if a.error:
                note += f"\n[red]{a.error}[/]"
            if a.fallback_reason:
                note += f"\n[yellow]fallback: {a.fallback_reason}[/]"
            t.add_row(str(a.index), a.phase, a.strategist, a.verdict,
                      ", ".join(f"{m} {e:+.2%}" for m, e in a.errors.items()),
                      f"{a.score:.4f}" if a.score is not None else "-", note)
        console.print(t)
        calls = j.llm_calls(run_id)
        if calls:
            console.print(f"{len(calls)} LLM calls journaled")
        if r["status"] == "failed" and r.get("result"):
            console.print(f"[red]failed:[/] {r['result'].get('error')}")

    def _continue(run_id: str, journal: Path, transcripts: list | None, agent: str | None, trust: bool) -> None:
        j = _open(journal)
        r = j.run(run_id)
        if r["status"] == "done" and transcripts is None:
            console.print(f"run {run_id} is already done; `prunepilot runs show {run_id}` lists its attempts")
            return
        if r["kind"] == "sparsify":
            _continue_sparsify(j, run_id, r["config"], transcripts)
        elif r["kind"] == "prune":
            _continue_prune(run_id, r["config"], transcripts, agent, trust)
        elif r["kind"] == "compress":
            _continue_compress(run_id, r["config"], trust)
        else:
            from ..errors import PrunepilotError

            raise PrunepilotError("only prune, sparsify and compress runs can be resumed", r["kind"], "start a new run")

    def _reload(c: dict, trust: bool):
        """The run's model from its journaled source, refusing a changed file or a pickle not trusted now."""
        from ..errors import SourceError
        from ..sources.data import data_fingerprint
        from ..sources.models import ModelSpec

        if not c.get("model_spec"):
            raise SourceError("this run's model was handed in from Python, so the journal cannot reload it",
                              c.get("model"), "continue it from Python with the same model and out folder, resume=True")
        spec = ModelSpec.model_validate(c["model_spec"])
        if spec.trust and not trust:
            raise SourceError("this run loaded a pickled model, which can run code; resuming never trusts it on your behalf",
                              spec.uri, "pass --trust if you still trust that file")
        spec.check_unchanged()
        if c.get("data_fingerprint") and data_fingerprint(c["data"]) != c["data_fingerprint"]:
            raise SourceError("the run's data files changed since it was journaled", c["data"],
                              "restore the original data, or start a new run")
        return spec.load()

    def _continue_compress(run_id: str, c: dict, trust: bool) -> None:
        from ..jobs.compress import CompressRun, run_compress_job

        run = CompressRun.from_config(c)
        run_compress_job(_reload(c, trust), run, run_id=run_id, log=console.print)

    def _continue_prune(run_id: str, c: dict, transcripts: list | None, agent: str | None, trust: bool) -> None:
        from ..jobs.prune import PruneRun, run_prune_search

        run = PruneRun.from_config(c, agent=agent)
        run_prune_search(_reload(c, trust), run, run_id=run_id, transcripts=transcripts, log=console.print)

    def _continue_sparsify(j, run_id: str, c: dict, transcripts: list | None) -> None:
        from ..sparsify.run import SparsifyConfig, run_sparsify

        fields = {k: v for k, v in c.items() if k in SparsifyConfig.__dataclass_fields__ and k != "client"}
        cfg = SparsifyConfig(**fields)
        if transcripts is not None:
            from ..agents.llm.replay import ReplayClient

            cfg.client = ReplayClient(transcripts, strict=False, name="replay")
        if c.get("out") is None:
            from ..errors import PrunepilotError

            raise PrunepilotError("this sparsify run wrote no output folder, so it cannot be resumed", run_id, "start a new run")
        run_sparsify(cfg, Path(c["out"]), say=console.print, run_id=run_id)

    @runs.command()
    def resume(run_id: str, journal: Path = JournalOpt,
               trust: bool = typer.Option(False, "--trust", help="Allow reloading a pickled model the run was started with --trust on.")) -> None:
        """Continue a run killed at any point (kill -9 included): recorded attempts are kept, the loop goes on from
        the next one, then the run finishes (final recovery, export, report). Refuses when a model, state_dict or
        data file changed since the run started."""
        _continue(run_id, journal, None, None, trust)

    @runs.command()
    def replay(run_id: str, journal: Path = JournalOpt, out: Path = typer.Option(None, "--out", help="Where the replayed run writes (default OUT-replay).")) -> None:
        """Re-run a run into a new folder: an LLM run answers from its journaled transcripts (no LLM reachable), a
        built-in strategist re-decides deterministically."""
        from ..journal import Journal

        j = _open(journal)
        calls = j.llm_calls(run_id)
        r = j.run(run_id)
        c = dict(r["config"])
        _check_rebuildable(r["kind"], c)
        new_out = Path(out) if out else Path(str(c["out"]) + "-replay")
        from ..journal import prepare_out

        prepare_out(new_out, overwrite=True)
        new_journal = new_out / "journal.sqlite"
        nj = Journal(new_journal)
        c["out"] = str(new_out)
        new_id = nj.start_run(r["kind"], c, new_out)
        if not calls:  # a built-in strategist is deterministic: replaying is re-running it on the same inputs
            console.print(f"this run made no LLM calls; re-running its built-in strategist into run {new_id} ({new_out})")
            _continue(new_id, new_journal, None, None, False)
            return
        console.print(f"replaying {len(calls)} LLM calls into run {new_id} ({new_out})")
        # lenient: measured numbers in the history (latency, accuracy) never repeat bit for bit, so replay
        # answers in recorded order instead of refusing on a prompt hash mismatch
        _continue(new_id, new_journal, calls, "replay:lenient", False)
