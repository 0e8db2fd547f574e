"""Candidates measured through one executor (loop/executor.py): batches of independent proposals give the same
journal as one at a time; 2 local Ray workers give the same attempts and best plan as in-process; a resumed
batched run matches the uninterrupted one; clear errors for a missing ray, an unreachable address, a job or
options that cannot run on workers."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

from prunepilot.agents.evolve import EvolveStrategist
from prunepilot.errors import PrunepilotError
from prunepilot.journal import Journal
from prunepilot.loop import LoopLimits, Master
from prunepilot.loop import executor as ex
from test_evolve import env, make_job, same  # noqa: F401  (the module fixture: a tiny Llama, its bank and profile)

EVALS = 20


def _run(env: dict[str, Any], journal: Journal, *, executor: Any = None, strategist: Any = None,
         run_id: str | None = None, limits: LoopLimits | None = None) -> tuple[Any, list]:
    run_id = run_id or journal.start_run("sparsify", {}, journal.path.parent)
    job = make_job(env, EVALS)
    try:
        Master(job, strategist or EvolveStrategist(), journal, run_id, seed=0, limits=limits, log=lambda s: None,
               executor=executor).run()
    finally:
        env["bank"].restore()
    return job, journal.attempts(run_id)


class OneAtATime(EvolveStrategist):
    """evolve without batches: the Master asks for one proposal at a time."""

    independent = None  # type: ignore[assignment]


def test_batches_read_exactly_like_one_at_a_time(env: dict[str, Any], tmp_path: Path) -> None:
    _, batched = _run(env, Journal(tmp_path / "a.sqlite"))
    _, single = _run(env, Journal(tmp_path / "b.sqlite"), strategist=OneAtATime())
    assert same(batched) == same(single)
    gen0 = [a for a in batched if a.plan_params.get("gen") == 0]
    assert len(gen0) == 9  # 6 screens, 2 survivors, 1 finalist


def test_evolve_batch_sizes(env: dict[str, Any], tmp_path: Path) -> None:
    """The Master proposes the rest of a generation's screens at once, then its 2 survivors, then the finalist."""
    sizes: list[int] = []

    class Recording(EvolveStrategist):
        def independent(self, ctx):  # type: ignore[override]
            k = super().independent(ctx)
            sizes.append(k)
            return k

    _run(env, Journal(tmp_path / "j.sqlite"), strategist=Recording())
    assert sizes[:5] == [1] * 5  # the sensitivity seeds: a line search
    assert sizes[5:8] == [6, 2, 1]


def test_resume_mid_batch_matches_the_uninterrupted_run(env: dict[str, Any], tmp_path: Path) -> None:
    _, whole = _run(env, Journal(tmp_path / "w.sqlite"))
    journal = Journal(tmp_path / "j.sqlite")
    run_id = journal.start_run("sparsify", {}, tmp_path)
    for k in (8, 10, 13):  # inside a generation's screens, between its survivors, inside the next screens
        _run(env, journal, run_id=run_id, limits=LoopLimits(max_attempts=k))
        assert len(journal.attempts(run_id)) == k
    _, resumed = _run(env, journal, run_id=run_id)
    assert same(resumed) == same(whole)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_refused_at_once() -> None:
    port = _free_port()  # nothing listens there
    with pytest.raises(PrunepilotError, match="cannot be reached") as e:
        ex.make(2, f"127.0.0.1:{port}")
    assert "ray start --head" in str(e.value)
    with pytest.raises(PrunepilotError, match="HOST:PORT"):
        ex.make(1, "not-an-address")
    with pytest.raises(PrunepilotError, match="at least 1"):
        ex.make(0)
    assert isinstance(ex.make(1, None), ex.InProcess)


def test_cli_refuses_a_bad_address_before_loading_anything(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from prunepilot.cli import app

    port = _free_port()
    for argv in (["sparsify", "hf:/nonexistent/model", "--agent", "evolve"],
                 ["prune", "torchvision:resnet18", "--target-macs", "50%", "--data", "fashion-mnist"]):
        r = CliRunner().invoke(app, [*argv, "--workers", "2", "--ray-address", f"127.0.0.1:{port}", "--out",
                                     str(tmp_path / argv[0])])
        assert r.exit_code != 0
        assert isinstance(r.exception, PrunepilotError) and "cannot be reached" in str(r.exception), r.output
    r = CliRunner().invoke(app, ["sparsify", "hf:/nonexistent/model", "--agent", "owl", "--workers", "2"])
    assert isinstance(r.exception, PrunepilotError) and "has no loop" in str(r.exception)
    r = CliRunner().invoke(app, ["prune", "torchvision:resnet18", "--target-macs", "50%", "--workers", "2"])
    assert isinstance(r.exception, PrunepilotError) and "needs --data" in str(r.exception)


def test_missing_ray_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):  # type: ignore[no-untyped-def]
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(PrunepilotError, match=r"prunepilot\[ray\]"):
        ex.make(2)


def test_a_job_without_worker_hooks_is_refused(tmp_path: Path) -> None:
    class NoHooks:
        kind = "toy"

    with pytest.raises(PrunepilotError, match="cannot measure candidates on Ray"):
        ex.RayExecutor(2)._start(NoHooks())


def test_the_scoped_executor_reaches_masters_built_without_one() -> None:
    marker = ex.InProcess()
    with ex.scoped(marker):
        assert ex.current() is marker
    assert ex.current() is not marker and isinstance(ex.current(), ex.InProcess)


@pytest.fixture(scope="module")
def ray_pool() -> Any:
    """One local Ray for the module's Ray tests (its start-up is most of their time); 2 workers per job."""
    pytest.importorskip("ray")
    pool = ex.RayExecutor(2)
    yield pool
    pool.close()


def test_two_ray_workers_same_attempts_and_best_as_in_process(env: dict[str, Any], tmp_path: Path,
                                                               ray_pool: Any) -> None:
    job, local = _run(env, Journal(tmp_path / "local.sqlite"))
    rjob, remote = _run(env, Journal(tmp_path / "ray.sqlite"), executor=ray_pool)
    assert len({i["pid"] for i in ray_pool.info}) == 2  # two worker processes
    assert ray_pool._job is None  # the run's end freed the workers' copies of the job
    # same plans, allocations, verdicts and order; the scores agree to float precision
    strip = lambda h: [a.model_dump(exclude={"seconds", "metrics", "score", "reflection"}) for a in h]  # noqa: E731
    assert strip(remote) == strip(local)
    for a, b in zip(local, remote):
        for k, v in a.metrics.items():
            assert b.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (a.index, k)
    best_l, best_r = job.best(local), rjob.best(remote)
    assert best_l is not None and best_r is not None
    assert best_r.index == best_l.index and best_r.allocation == best_l.allocation
    assert job.summary(local)["evals"] == rjob.summary(remote)["evals"] == EVALS


# ------------------------------------------------------------------------------------------ the prune job
class BatchedGrid:
    """The grid baseline, declaring its remaining rounds independent (grid points never read results)."""

    name = "grid"
    kinds = ("prune",)

    def __init__(self) -> None:
        from prunepilot.agents.strategists import GridStrategist

        self.grid = GridStrategist()

    def propose(self, ctx):  # type: ignore[no-untyped-def]
        return self.grid.propose(ctx)

    def independent(self, ctx) -> int:  # type: ignore[no-untyped-def]
        return int(ctx.step["rounds"]) - int(ctx.step["round"])


def test_prune_job_batched_on_two_ray_workers(tmp_path: Path, ray_pool: Any) -> None:
    """The prune job through the same executor: the workers recover and score the pruned candidates and send
    back their metrics and weights; same attempts and best as measuring them here one at a time."""
    import torch
    from tiny_models import make
    from torch.utils.data import TensorDataset

    import test_master as tm
    from prunepilot.agents.registry import make_builtin
    from prunepilot.budget import Budget
    from prunepilot.evaluate.scoring import Evaluator
    from prunepilot.jobs.prune import PruneSettings
    from prunepilot.pipeline import Pruner
    from prunepilot.sources.data import DataBundle, Normalization
    from prunepilot.sources.models import LoadedModel

    model, x = make("residual")  # the prune tests' tiny residual CNN on random 32x32 images (test_master)
    pruner = Pruner(LoadedModel(model, x[:1], "py:tiny", "tiny"), latency_runs=0)
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(256, 3, 32, 32, generator=g), torch.randint(0, 10, (256,), generator=g))
    bundle = DataBundle(ds, ds, ds, 10, (3, 32, 32), "synthetic", "random tensors", Normalization((0.0,), (1.0,)))
    evaluator = Evaluator(bundle, pruner.dense, PruneSettings(**tm.SETTINGS).scoring())
    rb = Budget.parse(macs="50%").resolve(pruner.profile.dense)
    results = {}
    for arm in ("local", "ray"):
        job = tm.prune_job(pruner, rb, evaluator, tmp_path / arm, rounds=4)
        journal, run_id = tm.new_run(tmp_path, arm)
        pool = ray_pool if arm == "ray" else ex.InProcess()
        strategist = BatchedGrid() if arm == "ray" else make_builtin("grid", "prune")
        best = Master(job, strategist, journal, run_id, log=lambda s: None, executor=pool).run()
        results[arm] = (journal.attempts(run_id), best, job)
    (local, best_l, job_l), (remote, best_r, job_r) = results["local"], results["ray"]
    strip = lambda h: [a.model_dump(include={"index", "plan", "allocation", "projected", "verdict"}) for a in h]  # noqa: E731
    assert strip(remote) == strip(local) and len(remote) == 4
    for a, b in zip(local, remote):
        assert b.metrics["accuracy"] == pytest.approx(a.metrics["accuracy"], abs=1 / 64 + 1e-9)
    assert best_l is not None and best_r is not None and best_r.allocation == best_l.allocation
    # the kept candidate holds the worker's recovered weights: rebuilt, it scores what the worker measured
    rebuilt = job_r.rebuild(best_r)
    assert evaluator.score(rebuilt, 0)["accuracy"] == pytest.approx(best_r.metrics["accuracy"], abs=1 / 64 + 1e-9)
