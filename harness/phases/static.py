"""The static sweep: every (workload x backend x precision x batch) of a target, through the pipeline.

Contract
--------
A :class:`Workload` is one static network to measure: a route of a supernet (materialized) or a
static model at a width multiplier. ``workloads(models, input_size, routes)`` lists them with their
MAdds and params (computed, never typed). :func:`run_static` runs :class:`Task` s against the
context's store:

1. the caller leaves out keys the store already holds (resume);
2. per model, one round phase: every task of the model goes through
   :func:`harness.measure.pipeline.trial` first (compile or load the cached artifact, check against
   eager fp32; ``compile_failed`` / ``check_failed`` stored at once, the sweep goes on; on a CPU
   target the artifacts to build are shared with a :class:`~harness.measure.build_worker.BuildWorker`
   process, which builds from the back of the list while this process goes from the front), then every
   checked engine is timed in the model's :class:`~harness.measure.rounds.RoundPhase` (each round
   visits every engine once in a fresh seeded order), the rows and the rounds' speed factors
   stored when the model's rounds end. An interrupted model is measured again by the re-run;
   models already stored are kept;
3. with a farm, :func:`harness.measure.remote.board_trial` instead (built here, checked and timed
   on a board, boards in parallel), each row stored at once.

Weights are random but deterministic (:func:`reference_model`: seeded, with BN statistics estimated
on seeded random images so outputs depend on the input and the route), so cached artifacts and
references agree across runs. Models and backends never meet except through the pipeline.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import dsnet
from harness.measure.build_worker import BuildWorker
from harness.measure.pipeline import Result, exported, image_batch, reference, weights_fingerprint
from harness.measure.protocol import paired_ratio
from harness.measure.remote import board_trial
from harness.phases.context import RunContext

STATIC_WIDTHS = (1.0, 0.75, 0.5, 0.25)
WEIGHT_SEED = 0


@dataclass
class Workload:
    model: str
    route: str
    widths: str
    madds: int
    params: int
    build: Callable[[], torch.nn.Module] = field(repr=False)


def reference_model(name: str, **kwargs) -> torch.nn.Module:
    """``name`` with the harness's reference weights: seeded initialization, and batch-norm
    statistics under which activations survive (``dsnet.reference_statistics``). Latency does not
    depend on the values; the check against eager needs outputs that tell engines apart. The same in
    every process: the statistics are computed on one thread (a parallel reduction's order changes
    their last bits, and with them the weights' fingerprint in every artifact's key), so a process
    started to time (:mod:`harness.phases.fresh`) loads what the run's process built."""
    torch.manual_seed(WEIGHT_SEED)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return dsnet.reference_statistics(dsnet.create_model(name, **kwargs))
    finally:
        torch.set_num_threads(threads)


def workloads(models: list[str], input_size: int, routes: set[str] | None = None) -> list[Workload]:
    """The networks to measure: every route of a supernet, every switch of a slimmable network,
    every width of a static model."""
    out: list[Workload] = []
    for name in models:
        probe = dsnet.create_model(name)
        if len(probe.routing_space.gates):
            probe = reference_model(name)
            for route in probe.routes(input_size):
                p = dsnet.profile(probe, route, input_size)
                # a slimmable network's switch is labelled by its width, as the static widths are
                label = str(route) if probe.dynamic else f"x{probe.routing_space.options(route)[0]['width_mult']}"
                out.append(Workload(name, label, "/".join(map(str, probe.route_widths(route))),
                                    p.madds, p.params,
                                    lambda m=probe, r=route: dsnet.materialize(m, r)))
        else:
            for w in STATIC_WIDTHS:
                model = reference_model(name, width_mult=w)
                p = dsnet.profile(model, None, input_size)
                out.append(Workload(name, f"x{w}", "", p.madds, p.params,
                                    lambda m=model: dsnet.materialize(m)))
    if routes is not None:
        out = [w for w in out if w.route in routes]
    return out


@dataclass
class Task:
    workload: Workload
    backend: str
    precision: str
    batch_size: int
    input_size: int

    @property
    def key(self) -> tuple:
        return (self.workload.model, self.workload.route, self.backend, self.precision,
                self.batch_size, self.input_size)

    def label(self) -> str:
        return (f"{self.workload.model} {self.workload.route} {self.backend} {self.precision} "
                f"b{self.batch_size}")

    def example(self) -> torch.Tensor:
        """The check and timing input (seeded)."""
        return image_batch(self.batch_size, self.input_size)


def result_row(ctx: RunContext, task: Task, result: Result, board=None) -> dict:
    """The stored row of one task: its key, the workload's MAdds, the result, the run's stamp, and
    the device that measured it (this machine, or ``board``: a :class:`harness.measure.remote.Board`;
    an emulated board's rows say ``emulated = 1`` and count as a device mismatch)."""
    w = task.workload
    device = {"device_name": ctx.device_name, "device_mismatch": int(ctx.device_mismatch), "emulated": 0}
    if board is not None:
        device = {"device_name": board.identity, "device_mismatch": int(board.emulated),
                  "emulated": int(board.emulated)}
    return {"model": w.model, "route": w.route, "widths": w.widths, "backend": task.backend,
            "precision": task.precision, "batch_size": task.batch_size, "input_size": task.input_size,
            "madds": w.madds, "params": w.params, **device, **ctx.stamp(), **result.row()}


def _modules(tasks: list[Task]):
    """``(task, module, fingerprint)``, each workload materialized once (backends copy, never modify)."""
    by_workload: dict[int, list[Task]] = {}
    for t in tasks:
        by_workload.setdefault(id(t.workload), []).append(t)
    for group in by_workload.values():
        module = group[0].workload.build()
        fingerprint = weights_fingerprint(module)
        for task in group:
            yield task, module, fingerprint


def static_steps(ctx: RunContext, tasks: list[Task]) -> int:
    """Progress steps of :func:`run_static`: one per task, plus one per round of each model."""
    if ctx.farm is not None:
        return len(tasks)
    return len(tasks) + ctx.protocol.repeat * len({t.workload.model for t in tasks})


def run_static(ctx: RunContext, tasks: list[Task], progress=None, worker: BuildWorker | None = None) -> list[dict]:
    """Trial every task and time the checked engines in rounds, one round phase per model (see the
    module docstring). ``progress(label, text)`` is called :func:`static_steps` times. ``worker``:
    the run's build worker (default: one of its own)."""
    if ctx.farm is not None:
        return _run_on_boards(ctx, tasks, progress)
    if worker is None:
        with BuildWorker() as own:
            return run_static(ctx, tasks, progress, own)
    by_model: dict[str, list[Task]] = {}
    for t in tasks:
        by_model.setdefault(t.workload.model, []).append(t)
    rows = []
    for model, model_tasks in by_model.items():
        rows += _round_phase(ctx, model, model_tasks, progress, worker)
    return rows


def _round_phase(ctx: RunContext, model: str, tasks: list[Task], progress, worker: BuildWorker | None = None
                 ) -> list[dict]:
    rows = []
    phase = ctx.round_phase(f"static {model}", seed=zlib.crc32(model.encode()))
    entered: dict[str, Task] = {}
    trials = [(task, module, fingerprint, task.example()) for task, module, fingerprint in _modules(tasks)]
    built_by_worker = ctx.share_builds(worker, [(model, task.workload.route, task.backend, task.precision, module,
                                                 example, fingerprint)
                                                for task, module, fingerprint, example in trials])
    for n in range(len(trials)):
        (task, module, fingerprint, example), trials[n] = trials[n], None  # each module freed once used
        built = built_by_worker(n)
        result = ctx.trial(model, task.workload.route, task.backend, task.precision, module, example,
                           weights=fingerprint, built=built)
        result = phase.add(task.label(), result, ctx.timing(task.backend, example))
        if task.label() in phase:
            entered[task.label()] = task
        else:
            rows.append(_store(ctx, task, result_row(ctx, task, result), None))
        if progress:
            progress(task.label(), "checked" if result.ok else f"{result.status}: {result.error[:80]}")
    if not entered:
        return rows
    on_round = (lambda done, planned: progress(f"{model} round {done}/{planned}", f"{len(entered)} engines")) \
        if progress else None
    results = phase.measure(on_round)
    relative = _relative(entered, phase.rounds) if phase.rounds is not None else {}
    for label, task in entered.items():
        row = result_row(ctx, task, results[label]) | relative.get(label, {})
        if phase.rounds is not None:
            row["latency_ms_p50_drift_corrected"] = phase.rounds.drift_corrected(label).p50
        rows.append(_store(ctx, task, row, None))
    return rows


def _relative(entered: dict, rounds) -> dict:
    """Per engine, its latency relative to the largest network of its backend, precision and batch
    in the same rounds (``latency_rel``, ``latency_rel_to``)."""
    groups: dict[tuple, list[str]] = {}
    for label, task in entered.items():
        groups.setdefault((task.backend, task.precision, task.batch_size), []).append(label)
    out = {}
    for labels in groups.values():
        ref = max(labels, key=lambda lb: entered[lb].workload.madds)
        for lb in labels:
            out[lb] = {"latency_rel": paired_ratio(rounds[lb], rounds[ref]),
                       "latency_rel_to": entered[ref].workload.route}
    return out


def _store(ctx: RunContext, task: Task, row: dict, progress) -> dict:
    ctx.store.record(row)
    if progress:
        text = (f"{row['latency_ms_p50']:.3f} ms" if row["status"] == "ok"
                else f"{row['status']}: {row['error'][:80]}")
        where = f" on {row['device_name']}" if ctx.farm is not None else ""
        progress(task.label() + where, text)
    return row


def _run_on_boards(ctx: RunContext, tasks: list[Task], progress) -> list[dict]:
    """Artifacts are built here, one at a time; each is checked and timed on whichever board is
    free, boards in parallel; rows are stored from this thread as they come back."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    farm = ctx.farm

    def on_board(task, result, example, ref):
        board = farm.acquire()
        try:
            return task, result_row(ctx, task, board_trial(board, result, example, ref, task.precision,
                                                           ctx.protocol), board=board)
        finally:
            board.close()

    rows, pending = [], set()

    def collect(futures):
        for f in futures:
            task, row = f.result()
            rows.append(_store(ctx, task, row, progress))

    with ThreadPoolExecutor(len(farm.boards)) as pool:
        for task, module, fingerprint in _modules(tasks):
            example = task.example()
            ref = reference(module, example)
            key = ctx.key(task.workload.model, task.workload.route, task.backend, task.precision, example, module,
                          fingerprint)
            result = exported(ctx.backend(task.backend), module, example, ctx.target, task.precision, key,
                              ctx.layout.cache_dir)
            if not result.ok:
                rows.append(_store(ctx, task, result_row(ctx, task, result), progress))
                continue
            pending.add(pool.submit(on_board, task, result, example, ref))
            if len(pending) >= 2 * len(farm.boards):  # build ahead, but not everything
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                collect(done)
        collect(pending)
    return rows
