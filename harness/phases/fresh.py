"""The dynamic phase timed in fresh processes that only load what the run's process built.

Contract
--------
``run_dynamic_fresh(ctx, model, backend, precision, input_size, progress_factory=None, validate=E2E_ROUTES,
worker=None)`` is :func:`harness.phases.dynamic.run_dynamic` across processes: this one builds,
loads and checks everything the phase times (``measure=False``, builds shared with ``worker``) and
stores nothing; then, when the store lacks the phase's rows, :func:`time_in_fresh_process` spawns
:data:`TIMING_PROCESSES` processes, one after the other, while this process waits. Each opens the
same results store, loads every artifact from the cache, checks each again and runs the phase's
rounds; each hands its measurements to the next (:class:`~harness.phases.dynamic.Pooling`), whose
rounds are numbered after them, and the last stores the rows of all the rounds under the run's id
(the ``engine`` row's details say ``timed_in``). ``progress_factory`` is called in every process,
so it must pickle (a class, or a ``functools.partial`` of one).

A timing process that raises or dies stores the ``engine`` row ``measure_failed`` with why, and the
run goes on. Ctrl-C is this process's: a timing process ignores it, this one stops it and raises
``KeyboardInterrupt``.

Why a fresh process: what a process did before its rounds moves what they time. ONNX Runtime's
cost of cutting DS-MBNet at its gates (the ``split`` row) measured +7..+96 us in a process that had
done nothing before, +136..+206 us at the end of README's main command (its static phase, other
backends' builds and rounds in the same process). A deployed dynamic network runs in a process that
loads its artifacts and serves; this is that process. Why several: each process draws its own
speed. On the AMD EPYC VM (2026-12-05), DS-MBNet's smallest route on Inductor ran 3.83 ms in one
timing process and 5.19 ms in another an hour later, the deployed path over it +155 us (4.0 %) and
+69 us (1.3 %); the rounds' speed factors, computed over the pooled rounds, absorb a process's
speed as they absorb drift, and every paired difference stays within one round, so within one
process. The cost is the artifacts loaded and checked once more per process.
"""

from __future__ import annotations

import multiprocessing
import signal

from harness.backends.base import exit_text, one_line
from harness.env import configure_process, quiet_library_warnings, release_memory
from harness.measure.build_worker import BuildWorker
from harness.phases.context import RunContext
from harness.phases.dynamic import E2E_ROUTES, Pooling, record_engine_failure, run_dynamic
from harness.results.store import ResultStore

STOP_WAIT_S = 10  # a timing process told to stop (SIGTERM) is killed after this long
# the phase's rounds run this many times, each time in a process of its own, and are pooled (see the module docstring)
TIMING_PROCESSES = 2


def run_dynamic_fresh(ctx: RunContext, model: str, backend: str, precision: str, input_size: int,
                      progress_factory=None, validate: int = E2E_ROUTES, worker: BuildWorker | None = None) -> None:
    """Build and check here, time in fresh processes (see the module docstring)."""
    bars = []

    def prepare(n):
        bars.append(progress_factory(n))
        return bars[-1]

    if not run_dynamic(ctx, model, backend, precision, input_size, progress_factory and prepare, validate, worker,
                       measure=False):
        return  # stored already, or its engine failed (recorded)
    if bars:
        bars[-1].note(f"built and checked; timed in {TIMING_PROCESSES} fresh processes, which load them")
    release_memory()  # the engines built here, unreachable now, let go before a second process loads them
    time_in_fresh_process(ctx, model, backend, precision, input_size, progress_factory, validate)


def time_in_fresh_process(ctx: RunContext, model: str, backend: str, precision: str, input_size: int,
                          progress_factory=None, validate: int = E2E_ROUTES, processes: int = TIMING_PROCESSES) -> None:
    """Run the dynamic phase's rounds in ``processes`` spawned processes, one after the other, on the
    same store and run id, each handing its measurements to the next, the last storing the rows."""
    spec = {"target": ctx.target, "layout": ctx.layout, "protocol": ctx.protocol, "device_name": ctx.device_name,
            "device_mismatch": ctx.device_mismatch, "run_id": ctx.run_id, "model": model, "backend": backend,
            "precision": precision, "input_size": input_size, "validate": validate, "progress": progress_factory}
    earlier = None
    for i in range(processes):
        pooling = Pooling(processes=processes, earlier=earlier, last=i == processes - 1)
        status, why, earlier = _one_process({**spec, "pooling": pooling, "which": f"{i + 1} of {processes}"})
        if status != "ok":
            record_engine_failure(ctx, model, backend, precision, input_size, why, status="measure_failed")
            return
        if earlier is None:  # stored already (or nothing timed): nothing to hand on
            return


def _one_process(spec: dict) -> tuple:
    """Start one timing process and wait for its ``(status, why, measured)``."""
    mp = multiprocessing.get_context("spawn")  # a fork of a process holding torch's thread pools can deadlock
    mine, theirs = mp.Pipe(duplex=False)
    process = mp.Process(target=_timing_main, args=(theirs, spec), name="dsnet-harness timing")
    process.start()
    theirs.close()  # its end lives in the timing process only: its death reads as EOF here
    try:
        try:
            message = mine.recv()
        except EOFError:
            process.join()
            message = ("died", f"the timing process ({spec['which']}) ended ({exit_text(process.exitcode)}) "
                               "before it finished", None)
        process.join()
    except BaseException:  # Ctrl-C (or a failure here): the timing process stops with this one
        _stop(process)
        raise
    finally:
        mine.close()
    return message


def _stop(process) -> None:
    process.terminate()
    process.join(STOP_WAIT_S)
    if process.is_alive():
        process.kill()
        process.join()


def _timing_main(conn, spec: dict) -> None:
    """The timing process: the run's context on the same store, its share of the phase's rounds run,
    ``(status, why, measured)`` sent (``measured``: what it hands the next process, or None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's process's to handle
    quiet_library_warnings()
    target = spec["target"]
    configure_process(target.threads, target.device)  # as the run's process (harness.cli.open_target)
    pooling: Pooling = spec["pooling"]
    message = ("ok", "", None)
    ctx = worker = None
    try:
        ctx = RunContext(target, spec["layout"], spec["protocol"], ResultStore(spec["layout"].store),
                         spec["device_name"], spec["device_mismatch"], spec["run_id"], fresh=True)
        worker = BuildWorker()  # an artifact that is not cached after all (evicted meanwhile) builds apart
        run_dynamic(ctx, spec["model"], spec["backend"], spec["precision"], spec["input_size"], spec["progress"],
                    spec["validate"], worker, pooling=pooling)
        message = ("ok", "", pooling.measured)
    except Exception as e:
        message = ("error", f"the timing process ({spec['which']}) failed: {one_line(e)}", None)
    finally:
        if worker is not None:
            worker.close()
        if ctx is not None:
            ctx.close()
    conn.send(message)
