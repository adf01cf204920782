"""A second process that builds artifacts while this one builds and checks others.

Contract
--------
``BuildWorker()`` spawns nothing until it is given work. ``worker.share(jobs)`` takes a list of
:class:`BuildJob` in the order this process will go through them and returns a :class:`Shared`:
the worker takes jobs from the back of the list while this process takes them from the front,
by calling ``shared.claim(i)`` for ``i = 0, 1, ...`` in order: ``None`` when job ``i`` is this
process's to build (it builds and checks it as ever, :func:`harness.measure.pipeline.trial`), else
the worker's :class:`~harness.measure.pipeline.Result` for it, waited for
(:func:`harness.measure.pipeline.built`: compiled into the job's artifact folder, not checked;
``trial(..., built=result)`` loads and checks it). The two meet in the middle, so neither waits
while the other has work left.

Results are values: a build that raises is ``compile_failed``; a worker that dies (a crash in a
compiler) fails the build it was running, with the signal, and a fresh worker takes the next. A
job the worker cannot take (a module that cannot be pickled) is its claimer's (``None``).
``worker.claims(jobs)`` is the same for a list with holes (``None``: nothing to share there) and
returns ``built(n)``, claimed in order. On a CPU a job whose backend says ``build_apart`` is never
built in this process: the worker takes such jobs first, in this process's order, and one this
process reaches before the worker does goes to a second worker, waited for (``worker.build(job)``
builds one job in a worker's process). Should the workers stop, their jobs are built here as ever.
``worker.close()`` (or leaving ``with``) stops the worker at once, a build in progress included
(a half-written artifact fails its load on the next run and is rebuilt); a worker whose parent
dies exits when it next reads or writes its pipe.

Why: on a CPU the compilers the harness drives are mostly single-threaded (LLVM's code generation,
``torch.export``, a C++ compiler), so a second builder uses the core the first leaves idle. And a
compiler can leave the measuring process slower for what is timed after it: a TVM build in the
process left ONNX Runtime's later rounds slower (``harness.backends.base.Backend.build_apart``). Builds
only: nothing is timed while the worker runs (phases time after their builds are claimed). The
worker runs with one torch thread and one TVM thread, and is started with ``spawn`` (a fork of a
process holding torch's thread pools can deadlock).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import torch

from harness.backends.base import exit_text
from harness.env import quiet_library_warnings
from harness.measure.pipeline import Result


@dataclass
class BuildJob:
    """One artifact to build: the backend (configured as in this process), the module and example
    input, the target and precision, and the artifact's folder (its key's, under the cache)."""

    backend: object
    module: torch.nn.Module
    example: torch.Tensor
    target: object
    precision: str
    artifact_dir: Path

    @classmethod
    def unless_built(cls, backend, module, example, target, precision: str, artifact_dir: Path) -> BuildJob | None:
        """The job, or None when ``backend`` builds no artifact or ``artifact_dir`` holds one already."""
        if not backend.artifact or backend.has_artifact(artifact_dir):
            return None
        return cls(backend, module, example, target, precision, artifact_dir)

    @property
    def apart(self) -> bool:
        """Never built in the measuring process (on a CPU: ``Backend.build_apart``)."""
        return self.backend.build_apart and self.target.device == "cpu"

    def payload(self) -> bytes:
        """What the worker receives: the backend as its name, options, workdir and remote, so the
        worker configures its own (and keeps it, with what it memoizes, for the next job)."""
        b = self.backend
        buf = io.BytesIO()
        torch.save({"backend": (b.name, b.options, b.workdir, b.remote), "module": self.module,
                    "example": self.example, "target": self.target, "precision": self.precision,
                    "artifact_dir": self.artifact_dir}, buf)
        return buf.getvalue()


class Shared:
    """Jobs shared between this process (from the front, :meth:`claim`) and the worker: the jobs to
    build apart first, in this process's order, then the others from the back (with ``share_all``)."""

    def __init__(self, jobs: list[BuildJob], share_all: bool = True):
        self.jobs = jobs
        self._share_all = share_all
        self._next = 0  # this process has claimed jobs [0, next)
        self._taken = [False] * len(jobs)  # by the worker, or claimed before it took them
        self._apart = [job.apart for job in jobs]
        self._lock = threading.Lock()
        self._results = [Future() for _ in jobs]

    def claim(self, i: int) -> Result | None:
        """Job ``i`` (claimed in order): ``None`` when it is this process's to build, else the
        worker's result, once it is there."""
        with self._lock:
            if i != self._next:
                raise ValueError(f"jobs are claimed in order: expected {self._next}, got {i}")
            self._next += 1
            if not self._taken[i]:  # not the worker's: it never will be (one to build apart goes
                self._taken[i] = True  # to a second worker, :meth:`BuildWorker.claims`)
                return None
        try:
            return self._results[i].result()
        except _NotBuilt:  # the worker could not take it (e.g. a module it cannot be sent): built here
            return None

    def _take(self) -> int | None:
        """The worker's next job: the first one to build apart, else the last one nobody took."""
        with self._lock:
            n = len(self.jobs)
            i = next((i for i in range(n) if self._apart[i] and not self._taken[i]), None)
            if i is None and self._share_all:
                i = next((i for i in range(n - 1, self._next - 1, -1) if not self._taken[i]), None)
            if i is not None:
                self._taken[i] = True
            return i

    def _cancel(self, why: str) -> None:
        for f in self._results:
            if not f.done():
                f.set_exception(_NotBuilt(why))


class _NotBuilt(Exception):
    """A job the worker took but could not build (not a failed build: its claimer builds it)."""


class BuildWorker:
    def __init__(self):
        self._process = None
        self._conn = None
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._lock = threading.Lock()  # starting and killing the worker
        self._busy = False  # a job is in the worker
        self._second: BuildWorker | None = None  # builds apart what this process reaches first

    def __enter__(self) -> BuildWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def share(self, jobs: list[BuildJob], share_all: bool = True) -> Shared:
        for t in self._threads:  # the previous list's thread: done once its jobs were all claimed
            t.join()
        self._threads = []
        shared = Shared(jobs, share_all)
        if jobs:
            t = threading.Thread(target=self._serve, args=(shared,), name="build-worker", daemon=True)
            self._threads.append(t)
            t.start()
        return shared

    def claims(self, jobs: list[BuildJob | None]) -> Callable[[int], Result | None]:
        """``built(n)`` for a list in this process's order, ``None`` where there is nothing to share
        (already built, or no artifact): the worker's result for entry ``n``, or ``None`` where this
        process builds it. Called for ``n = 0, 1, ...`` in order. Nothing is shared off a CPU (a second
        process would hold a second CUDA context); on one core, or when fewer than two are to build,
        only the jobs to build apart (:attr:`BuildJob.apart`)."""
        present = [(n, job) for n, job in enumerate(jobs) if job is not None]
        if not present or any(job.target.device != "cpu" for _, job in present):
            return lambda n: None
        share_all = len(present) >= 2 and (os.cpu_count() or 1) >= 2
        if not (share_all or any(job.apart for _, job in present)):
            return lambda n: None
        shared = self.share([job for _, job in present], share_all)
        index = {n: i for i, (n, _) in enumerate(present)}

        def built(n: int) -> Result | None:
            if n not in index:
                return None
            result = shared.claim(index[n])
            job = shared.jobs[index[n]]
            if result is None and job.apart and job.module is not None and not self._closed.is_set():
                result = self.build(job)  # reached here before the worker took it: still not built here
            return result

        return built

    def build(self, job: BuildJob) -> Result | None:
        """Build ``job`` in a second worker's process and wait for it (``None``: it cannot be sent, or
        the workers are stopped)."""
        with self._lock:
            if self._closed.is_set():
                return None
            if self._second is None:
                self._second = BuildWorker()
            second = self._second
        try:
            payload = job.payload()
        except Exception:  # noqa: BLE001 - a module that cannot be sent: built here
            return None
        return second._build(job, payload)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            second, self._second = self._second, None
            if self._process is not None and self._busy:
                self._process.kill()  # a build in progress is not waited for
        if second is not None:
            second.close()
        for t in self._threads:
            t.join()
        self._threads = []
        if self._process is not None:  # idle (a killed one was reaped by its thread): EOF ends it cleanly
            self._conn.close()
            self._process.join(timeout=30)
            if self._process.exitcode is None:
                self._process.kill()
                self._process.join()
            self._process = self._conn = None

    # -- this process's side: one thread per shared list, feeding the worker one job at a time ---------
    def _serve(self, shared: Shared) -> None:
        try:
            while not self._closed.is_set():
                i = shared._take()
                if i is None:
                    return
                job = shared.jobs[i]
                try:
                    payload = job.payload()
                except Exception as e:  # noqa: BLE001 - a module that cannot be sent: its claimer builds it
                    shared._results[i].set_exception(_NotBuilt(f"not sent to the worker: {e}"))
                    continue
                job.module = None  # sent: the worker has its own copy
                shared._results[i].set_result(self._build(job, payload))
        finally:  # whatever stopped this thread, the jobs it left are built by their claimer
            shared._cancel("the build worker stopped")

    def _build(self, job: BuildJob, payload: bytes) -> Result:
        with self._lock:
            if self._closed.is_set():
                return Result("compile_failed", "the build worker was stopped", details=job.backend.details())
            if self._process is None:
                ctx = multiprocessing.get_context("spawn")
                self._conn, child = ctx.Pipe()
                self._process = ctx.Process(target=_worker_main, args=(child,),
                                            name="dsnet-harness build worker", daemon=True)
                self._process.start()
                child.close()  # the worker's end lives in the worker only: its death reads as EOF here
            process, conn = self._process, self._conn
            self._busy = True
        try:
            conn.send_bytes(payload)
            ready = wait([conn, process.sentinel])
            if conn in ready:
                return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            pass
        finally:
            self._busy = False
        process.join()
        with self._lock:
            self._process = self._conn = None  # the next job gets a fresh worker
        conn.close()
        if self._closed.is_set():
            return Result("compile_failed", "the build worker was stopped", details=job.backend.details())
        return Result("compile_failed", f"the build worker died while building this artifact "
                      f"({exit_text(process.exitcode)})", details=job.backend.details())


# -- the worker's side -------------------------------------------------------------------------------
def _worker_main(conn) -> None:
    """Build each job received until the pipe closes; Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet_library_warnings()  # or torch's own deprecation notices print once per build
    os.environ["TVM_NUM_THREADS"] = "1"  # read when TVM's thread pool starts, after this
    torch.set_num_threads(1)
    from harness.backends import get_backend
    from harness.measure.pipeline import OutOfSpace, Result, built

    backends = {}
    while True:
        try:
            job = torch.load(io.BytesIO(conn.recv_bytes()), weights_only=False)
        except EOFError:
            return
        name, options, workdir, remote = job["backend"]
        key = pickle.dumps((name, options, workdir, remote))
        if key not in backends:
            backends[key] = get_backend(name, options=options, workdir=workdir, remote=remote)
        try:
            result = built(backends[key], job["module"], job["example"], job["target"], job["precision"],
                           job["artifact_dir"])
        except OutOfSpace as e:  # the run stops on it (trial raises it again in the parent)
            result = Result("compile_failed", e.strerror, details={"out_of_space": str(e.filename)})
        try:
            conn.send_bytes(pickle.dumps(result))
        except OSError:  # the parent is gone
            return
