"""Where the Master's candidates are measured: in this process (default) or on Ray workers.

The Master asks a strategist how many of its next proposals are independent of each other's measurements
(`Strategist.independent(ctx)`, 1 when it has no such method: evolve's offspring of one generation, or the
survivors it re-scores, are), proposes that batch against the history plus the batch's *pending* siblings
(verdict "pending", no metrics), and then measures it through one executor:

- `InProcess`: the job's own `evaluate()` measures each candidate here, one after the other.
- `RayExecutor(workers, address)`: Ray actors, each holding the job's evaluation state, built once per worker
  from `job.worker_spec()` (shipped through Ray's object store, so a worker on another machine needs neither
  the checkpoint nor the calibration pass), measure the batch's candidates at once (`ray.util.ActorPool`:
  Ray schedules, nothing here does); the measurements come back in order and the Master judges and records
  them one by one, in the order a single process would, so the journal stays the only state: a resumed or
  replayed run proposes the same plans, and the same seed gives the same plans and best as in-process.

A job that can be measured remotely has these optional methods (the sparsify job does):
- `allocation_of(projection) -> dict`: what the attempt will record as its allocation (shown while pending),
- `worker_spec() -> WorkerSpec`: a picklable object whose `build()`, run once on a worker, returns a scorer
  with `measure(payload) -> result`,
- `remote_task(projection, step, history) -> payload | None`: what to measure (None: nothing to measure, e.g.
  an allocation already measured),
- `with_measurement(projection, result) -> projection`: the projection `evaluate()` then scores without
  measuring again.

Commands and the Python API choose the executor with `scoped(executor)` (or `options(workers, address)`);
a Master built without one uses the scoped executor, else `InProcess`."""

from __future__ import annotations

import contextlib
import contextvars
import os
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import PrunepilotError


class WorkerSpec(Protocol):
    def build(self) -> Any:
        """Run once on a worker: the scorer (`measure(payload) -> result`) that holds the job's evaluation state."""
        ...


@dataclass(frozen=True)
class Measured:
    """One remote measurement: its result, or the one-line error and traceback of the worker's exception."""

    value: Any = None
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0


class Executor(Protocol):
    remote: bool  # False: the job's evaluate() measures in this process
    workers: int

    def measure(self, job: Any, payloads: list[Any]) -> list[Measured]: ...

    def finish(self) -> None:
        """The Master's run is over: free the workers' copies of the job (a scoped executor may serve another)."""
        ...

    def describe(self) -> dict[str, Any]: ...


class InProcess:
    remote = False
    workers = 1

    def measure(self, job: Any, payloads: list[Any]) -> list[Measured]:  # pragma: no cover - never called
        raise RuntimeError("InProcess measures through the job's own evaluate()")

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"executor": "in-process", "workers": 1}


# ------------------------------------------------------------------------------------------------------- Ray
def _ray():
    try:
        import ray
    except ImportError:
        raise PrunepilotError("--workers/--ray-address evaluate candidates on Ray, which is not installed", None,
                              "pip install 'prunepilot[ray]'  (or: pip install ray), or drop --workers/--ray-address "
                              "to evaluate in this process") from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    """host and port of a Ray address (HOST:PORT or ray://HOST:PORT); None for 'auto' / 'local'."""
    a = address.strip()
    if a in ("auto", "local"):
        return None
    a = a.removeprefix("ray://")
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise PrunepilotError("a Ray address is HOST:PORT, ray://HOST:PORT or auto", address,
                              "e.g. --ray-address 127.0.0.1:6379 (the head's address printed by `ray start --head`)")
    return host.strip("[]"), int(port)


def check_address(address: str, timeout: float = 5.0) -> None:
    """Refuse an unreachable cluster at once (ray.init would otherwise retry for a minute)."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
    except OSError as exc:
        raise PrunepilotError("the Ray cluster at --ray-address cannot be reached", f"{address}: {exc}",
                              "start its head with `ray start --head` (it prints the address), check host and port, "
                              "or drop --ray-address to start a local Ray with --workers N") from None


def _worker_class(ray: Any) -> Any:
    @ray.remote
    class EvalWorker:
        """A worker process: holds one job's evaluation state at a time (built once from the job's spec) and
        measures the payloads sent to it. The process outlives a job, so the next run's workers start warm."""

        def __init__(self, paths: list[str], threads: int | None) -> None:
            import sys

            import torch

            if threads:
                torch.set_num_threads(threads)
            sys.path.extend(p for p in paths if p not in sys.path)  # the driver's modules (a user's model class)
            self.scorer: Any = None

        def load(self, spec: bytes) -> dict[str, Any]:
            import torch
            from ray import cloudpickle

            self.scorer = None
            t = time.perf_counter()
            self.scorer = cloudpickle.loads(spec).build()
            return {"pid": os.getpid(), "host": socket.gethostname(), "build_s": time.perf_counter() - t,
                    "threads": torch.get_num_threads()}

        def drop(self) -> None:
            import gc

            self.scorer = None
            gc.collect()

        def measure(self, payload: Any) -> Measured:
            t = time.perf_counter()
            try:
                value = self.scorer.measure(payload)
            except Exception as exc:  # a bad candidate wastes its attempt, never the run
                text = " ".join(str(exc).split())
                return Measured(None, f"{type(exc).__name__}: {text}"[:500], traceback.format_exc(), time.perf_counter() - t)
            return Measured(value, seconds=time.perf_counter() - t)

    return EvalWorker


class RayExecutor:
    """`workers` Ray actors (on a local Ray this process starts, or on the cluster at `address`), each holding
    the job's evaluation state; a batch's payloads are spread over them by `ray.util.ActorPool`.

    threads: torch threads per worker (default: this machine's cores / workers on a local Ray, 1 per CPU Ray
    gives a worker on a cluster). gpus: GPUs per worker (default: 1 when the job's model is on CUDA)."""

    remote = True
    start_timeout_s = 900.0  # workers not placed and loaded by then: refused with the cluster's resources

    def __init__(self, workers: int, address: str | None = None, *, threads: int | None = None,
                 gpus: float | None = None, log: Any = None) -> None:
        if workers < 1:
            raise PrunepilotError("--workers must be at least 1", workers, "e.g. --workers 2")
        self.workers, self.address, self.threads, self.gpus = workers, address, threads, gpus
        self.log = log or (lambda s: None)
        self._ray: Any = None
        self._started_ray = False
        self._job: Any = None
        self._actors: list[Any] = []
        self._gpus: float | None = None
        self.info: list[dict[str, Any]] = []

    def check(self) -> None:
        """Refuse at once what cannot work: ray missing, an unreachable address."""
        _ray()
        if self.address:
            check_address(self.address)

    def _init(self) -> Any:
        ray = _ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": True, "logging_level": "ERROR"}
            if self.address:
                check_address(self.address)
                try:
                    ray.init(address=self.address, **kw)
                except Exception as exc:
                    raise PrunepilotError("could not join the Ray cluster at --ray-address", f"{self.address}: {exc}",
                                          "check that a Ray head runs there with the same ray and Python versions") from None
            else:
                ray.init(num_cpus=max(self.workers, os.cpu_count() or 1), **kw)
            self._started_ray = True
        self._ray = ray
        return ray

    def _start(self, job: Any) -> None:
        """Workers holding this job's evaluation state: started on first use, loaded once per job."""
        if self._job is job and self._actors:
            return
        self.finish()
        spec_of = getattr(job, "worker_spec", None)
        if spec_of is None:
            raise PrunepilotError(f"the {getattr(job, 'kind', type(job).__name__)} job cannot measure candidates on Ray "
                                  "workers yet", None, "drop --workers/--ray-address")
        ray = self._init()
        t = time.perf_counter()
        import sys

        from ray import cloudpickle

        gpus = self.gpus if self.gpus is not None else self._default_gpus(job)
        if self._actors and gpus != self._gpus:
            self._kill()
        if not self._actors:
            threads = self.threads
            if threads is None and not self.address:
                threads = max(1, (os.cpu_count() or 1) // self.workers)
            cls = _worker_class(ray)
            self._actors = [cls.options(num_cpus=1, num_gpus=gpus).remote(list(sys.path), threads)
                            for _ in range(self.workers)]
            self._gpus = gpus
        spec = ray.put(cloudpickle.dumps(spec_of()))  # unpickled by each worker once it has the driver's sys.path
        try:
            self.info = ray.get([a.load.remote(spec) for a in self._actors], timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self._kill()
            raise PrunepilotError(f"{self.workers} Ray workers were not all placed and loaded within "
                                  f"{self.start_timeout_s:.0f}s", f"{self.workers} workers x {gpus:g} GPU(s), 1 CPU each; "
                                  f"cluster resources {ray.cluster_resources()}", "ask for fewer --workers, or add nodes") from None
        except Exception as exc:
            self._kill()
            raise PrunepilotError("a Ray worker could not build the job's evaluation state", f"{type(exc).__name__}: {exc}"[:600],
                                  "read the worker's log (ray logs), or drop --workers to evaluate in this process") from None
        finally:
            del spec
        self._job = job
        self.log(f"ray: {self.workers} worker(s) ready in {time.perf_counter() - t:.1f}s "
                 f"(each built the evaluation state in {max(i['build_s'] for i in self.info):.1f}s)")

    def _default_gpus(self, job: Any) -> float:
        """A CUDA job's workers: one GPU each on a cluster; on a local Ray the GPUs here shared among them."""
        if getattr(job, "device_type", "cpu") != "cuda":
            return 0.0
        if self.address:
            return 1.0
        import torch

        return min(1.0, torch.cuda.device_count() / self.workers)

    def measure(self, job: Any, payloads: list[Any]) -> list[Measured]:
        self._start(job)
        from ray.util import ActorPool

        pool = ActorPool(self._actors)
        try:
            return list(pool.map(lambda actor, p: actor.measure.remote(p), payloads))  # in submission order
        except Exception as exc:  # a worker died (out of memory, a lost node): the run stops, resumable
            raise PrunepilotError("a Ray worker failed while measuring candidates", f"{type(exc).__name__}: {exc}"[:600],
                                  "the journal holds every attempt recorded so far: fix the cause and resume the run") from None

    def finish(self) -> None:
        """The job's run is over: the workers drop their copy of it (their processes stay for the next job)."""
        if self._actors and self._job is not None and self._ray is not None:
            with contextlib.suppress(Exception):
                self._ray.get([a.drop.remote() for a in self._actors])
        self._job = None

    def _kill(self) -> None:
        if self._ray is not None:
            for a in self._actors:
                with contextlib.suppress(Exception):
                    self._ray.kill(a)
        self._actors, self._job = [], None

    def close(self) -> None:
        self.finish()
        self._kill()
        if self._started_ray and self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()
        self._started_ray = False

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "workers": self.workers, "address": self.address or "local",
                "hosts": sorted({i["host"] for i in self.info}), "threads_per_worker": [i["threads"] for i in self.info]}


# -------------------------------------------------------------------------------------------- choosing one
_CURRENT: contextvars.ContextVar[Any] = contextvars.ContextVar("prunepilot_executor", default=None)


def current() -> Any:
    """The executor a Master without one uses: the scoped one, else in-process."""
    return _CURRENT.get() or InProcess()


def make(workers: int | None = 1, address: str | None = None, *, log: Any = None) -> Any:
    """The executor `--workers N --ray-address ADDR` ask for: in-process for 1 worker and no address (checked now:
    ray importable, the address reachable)."""
    workers = 1 if workers is None else int(workers)
    if workers < 1:
        raise PrunepilotError("--workers must be at least 1", workers, "e.g. --workers 2")
    if workers == 1 and not address:
        return InProcess()
    ex = RayExecutor(workers, address, log=log)
    ex.check()
    return ex


@contextlib.contextmanager
def scoped(executor: Any) -> Iterator[Any]:
    """Masters built inside the block (without an executor of their own) use `executor`; closed at the end."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)
        close = getattr(executor, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def options(workers: int | None = 1, address: str | None = None, *, log: Any = None) -> Iterator[Any]:
    """`with options(workers=2): prunepilot.sparsify(...)`: the candidates of every run inside on 2 Ray workers."""
    with scoped(make(workers, address, log=log)) as ex:
        yield ex
