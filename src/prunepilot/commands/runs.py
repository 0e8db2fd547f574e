"""`prunepilot runs list|show|resume|replay`: the journal of agent runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .common import console

JournalOpt = typer.Option(Path("runs/demo/journal.sqlite"), "--journal", help="The run's journal (OUT/journal.sqlite).")


def register(app: typer.Typer) -> None:
    runs = typer.Typer(help="Inspect, resume and replay journaled agent runs.", no_args_is_help=True)
    app.add_typer(runs, name="runs")

    @runs.command("list")
    def list_(journal: Path = JournalOpt) -> None:
        """List runs in a journal."""
        from ..journal import Journal

        j = Journal(journal)
        t = Table()
        for c in ("id", "kind", "status", "attempts", "model", "out"):
            t.add_column(c)
        for r in j.runs():
            t.add_row(r["id"], r["kind"], r["status"], str(len(j.attempts(r["id"]))), r["config"].get("model", ""), r["out_dir"])
        console.print(t)

    @runs.command()
    def show(run_id: str, journal: Path = JournalOpt) -> None:
        """Show a run's attempts: plan rationale, errors, accuracy, verdict."""
        from ..journal import Journal

        j = Journal(journal)
        r = j.run(run_id)
        console.print(f"[bold]{r['id']}[/] {r['status']} — {r['config'].get('model')} — agent {r['config'].get('agent')}")
        t = Table()
        if r["kind"] == "sparsify":
            for c in ("it", "phase", "level", "verdict", "probe ppl", "probe KL", "rationale / reflection"):
                t.add_column(c)
            for a in j.attempts(run_id):
                t.add_row(str(a.get("iteration")), a.get("phase", ""), f"{a.get('level', 0):.3f}", a.get("verdict", ""),
                          f"{a.get('probe_ppl', float('nan')):.2f}", f"{a.get('probe_kl', float('nan')):.4f}",
                          f"{a.get('rationale', '')}\n[dim]{a.get('reflection', '')}[/]")
        else:
            for c in ("round", "strategist", "verdict", "errors", "accuracy", "rationale / reflection"):
                t.add_column(c)
            for a in j.attempts(run_id):
                acc = a.get("metrics", {}).get("accuracy")
                t.add_row(str(a["round"]), a.get("strategist", ""), a.get("verdict", ""),
                          ", ".join(f"{m} {e:+.2%}" for m, e in a.get("errors", {}).items()),
                          f"{acc:.4f}" if acc is not None else "-", f"{a.get('rationale', '')}\n[dim]{a.get('reflection', '')}[/]")
        console.print(t)
        calls = j.llm_calls(run_id)
        if calls:
            console.print(f"{len(calls)} LLM calls journaled")

    def _continue(run_id: str, journal: Path, transcripts: list | None, agent: str | None) -> None:
        from ..agents.master import SearchConfig
        from ..budget import Budget
        from ..journal import Journal
        from ..search import run_search
        from ..sources.models import load_model

        j = Journal(journal)
        r = j.run(run_id)
        c = r["config"]
        if r["kind"] == "sparsify":
            _rerun_sparsify(c, transcripts)
            return
        loaded = load_model(c["model"], trust=True, input_shape=None)
        cfg = SearchConfig(**c["search"])
        run_search(loaded, Budget.model_validate(c["budget"]), c["data"], Path(c["out"]), agent=agent or c["agent"], cfg=cfg,
                   finetune_epochs=c["finetune_epochs"], kd=c["kd"], journal_path=journal, run_id=run_id,
                   transcripts=transcripts, log=console.print)

    def _rerun_sparsify(c: dict, transcripts: list | None) -> None:
        # A sparsify loop holds no state worth restoring mid-way (a few minutes of probes): it restarts from the
        # journaled config as a new run in the same journal; with transcripts, the recorded LLM answers decide.
        from ..sparsify.run import SparsifyConfig, run_sparsify

        fields = {k: v for k, v in c.items() if k in SparsifyConfig.__dataclass_fields__ and k != "client"}
        cfg = SparsifyConfig(**fields)
        if transcripts is not None:
            from ..agents.llm.replay import ReplayClient

            cfg.client = ReplayClient(transcripts, strict=False, name="replay")
        console.print("sparsify runs restart from their journaled config (a new run id in the same journal)")
        run_sparsify(cfg, Path(c["out"]), say=console.print)

    @runs.command()
    def resume(run_id: str, journal: Path = JournalOpt) -> None:
        """Continue a run killed at any point: finished attempts are kept, the loop goes on from the next round."""
        _continue(run_id, journal, None, None)

    @runs.command()
    def replay(run_id: str, journal: Path = JournalOpt, out: Path = typer.Option(None, "--out", help="Where the replayed run writes (default OUT-replay).")) -> None:
        """Re-run a run's decisions from its LLM transcripts, with no LLM reachable."""
        from ..journal import Journal

        j = Journal(journal)
        calls = j.llm_calls(run_id)
        if not calls:
            console.print("this run made no LLM calls: its built-in strategist replays deterministically with `runs resume` on a copy")
            raise typer.Exit(1)
        r = j.run(run_id)
        c = dict(r["config"])
        new_out = Path(out) if out else Path(c["out"] + "-replay")
        new_journal = new_out / "journal.sqlite"
        nj = Journal(new_journal)
        c["out"] = str(new_out)
        if r["kind"] == "sparsify":
            c["out"] = str(new_out)
            console.print(f"replaying {len(calls)} LLM calls")
            _rerun_sparsify(c, calls)
            return
        new_id = nj.start_run("prune", c, new_out)
        console.print(f"replaying {len(calls)} LLM calls into {new_id}")
        # lenient: measured numbers in the history (latency, accuracy) never repeat bit for bit, so replay
        # answers in recorded order instead of refusing on a prompt hash mismatch
        _continue(new_id, new_journal, calls, "replay:lenient")
