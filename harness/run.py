"""``python -m harness.run --target NAME``: compile and measure every route on a target profile.

One function per phase, in the order they run: :func:`plan` (options against the profile),
:func:`open_context` (machine, store, run identity, optional board farm), :func:`tuning_phase`
(TVM tuned within the profile's ``[tvm] tune_minutes``, as ``harness.tune`` does), :func:`static_phase`
(every route through every backend), :func:`dynamic_phase` (the deployed dynamic network and its
LUT), :func:`table2_phase` (DS-Net++ Table 2), :func:`finish` (exports, summary, tables and
figures). ``--phases`` runs some of static, dynamic and table2 (a short GPU window, a re-run of one).

Writes into the results folder (``--results``, default ``results/<target>``, or
``results/<target>/quick`` with ``--quick``, ``results/<target>-threads<N>`` with ``--threads N``: a
thread count other than the profile's never mixes with its rows; names from ``harness.results.layout``):
``results.sqlite`` (every result, the moment it is taken), ``lut.csv``, ``dynamic.csv``,
``env.json``, ``tables/`` and ``figures/``. A re-run resumes: what the store holds is skipped
(``--retry-failed`` retries failures). Exit codes: 0 done; 2 bad input or a target this machine
cannot run (one line on stderr); 3 machine busy under ``--strict``; 130 interrupted (what was
measured is kept).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil

import dsnet
from harness import interrupts
from harness.backends import backend_class, get_backend, list_backends
from harness.backends.base import one_line
from harness.backends.tvm import CrossCompileError  # the module imports TVM itself only when used
from harness.cli import (
    DEFAULT_MODELS,
    MAX_INPUT_SIZE,
    Progress,
    UsageError,
    add_results_option,
    capture_machine,
    csv_list,
    names_option,
    new_run_id,
    open_results,
    open_target,
    results_layout,
    run_main,
)
from harness.measure.build_worker import BuildWorker
from harness.measure.protocol import Protocol
from harness.measure.remote import Farm, RemoteError
from harness.phases import policy
from harness.phases.context import RunContext
from harness.phases.dynamic import E2E_ROUTES, QUICK_E2E_ROUTES, run_dynamic
from harness.phases.fresh import run_dynamic_fresh
from harness.phases.static import Workload, run_static, static_steps, workloads
from harness.phases.table2 import TABLE2_WAYS, measure_table2
from harness.reporting.common import tuning_label
from harness.reporting.summary import dynamic_summary, summary_table
from harness.reporting.tables import ReportError, build, rebuild_command
from harness.results.layout import DYNAMIC_COLUMNS, LUT_COLUMNS, Layout, read_csv
from harness.results.run_record import complete_document, previous_document, run_document
from harness.targets import Target, known_targets

QUICK_INPUT_SIZE = 64
PHASES = ("static", "dynamic", "table2")
# left out by --quick unless --backends names them, and why
QUICK_LEFT_OUT = {"inductor": "slow compile (~40 s of C++ per network on 2 cores)",
                  "tvm": f"no tuning at --quick's input size ({QUICK_INPUT_SIZE}: the shipped records are for the "
                         "profile's), so its rows would time unscheduled operators (~18 s to build each)"}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m harness.run", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help=f"target profile: {', '.join(known_targets())}")
    p.add_argument("--backends", help="comma-separated subset of the profile's backends (or others, "
                                      "e.g. noop for the harness overhead)")
    p.add_argument("--models", help=f"comma-separated models (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--routes", help="comma-separated route labels to keep, e.g. 0,13 or x1.0,x0.5")
    p.add_argument("--phases", help=f"comma-separated phases to run, in their order: {', '.join(PHASES)} "
                                    "(default: all; TVM's tuning runs before static or dynamic)")
    p.add_argument("--dynamic-backends", help="comma-separated backends the dynamic engine is measured on "
                                              "(default: the profile's dynamic_backends among the run's backends)")
    p.add_argument("--batch-size", help="comma-separated batch sizes (default: the profile's)")
    p.add_argument("--input-size", type=int, help="square input resolution (default: the profile's)")
    add_results_option(p, "results/<target>, or results/<target>/quick with --quick")
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads per engine instead of the profile's (0: all physical cores), e.g. the count "
                        "a deployment pins; results go to results/<target>-threads<N> unless --results names a "
                        "folder")
    p.add_argument("--strict", action="store_true", help="refuse to measure on a busy machine")
    p.add_argument("--quick", action="store_true",
                   help=f"input {QUICK_INPUT_SIZE}, 3 DS-MBNet routes and 2 widths, few repeats; "
                        f"leaves out {' and '.join(QUICK_LEFT_OUT)} unless --backends names them")
    p.add_argument("--retry-failed", action="store_true", help="re-measure results stored as failed")
    p.add_argument("--in-process", action="store_true",
                   help="time the dynamic engine in this process, e.g. under a debugger or profiler (default: "
                        "built and checked here, timed in two fresh processes that load them, as a deployment "
                        "runs, their rounds pooled)")
    p.add_argument("--tune-minutes", type=float, metavar="N",
                   help="TVM tuning budget in minutes, over re-runs (default: the profile's [tvm] tune_minutes; "
                        "0: measure with what the database holds)")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on remote boards through TVM's RPC tracker (backends that build for boards)")
    p.add_argument("--rpc-key", help="the boards' key at the tracker (with --rpc-tracker)")
    p.add_argument("--rpc-wait", type=float, default=60.0, help="seconds to wait for a free board (default 60)")
    return p.parse_args(argv)


@dataclass
class RunPlan:
    """The options resolved against the profile."""

    backends: list[str]
    phases: list[str]
    dynamic: list[str] | None  # --dynamic-backends (None: the profile's)
    models: list[str]
    routes: set[str] | None
    batch_sizes: list[int]
    input_size: int
    protocol: Protocol
    layout: Layout
    skipped: dict[str, str] = field(default_factory=dict)  # {backend or phase: why}
    notes: list[str] = field(default_factory=list)
    validate: int = E2E_ROUTES  # routes of a supernet's dynamic engine validated end to end
    in_process: bool = False  # --in-process: the dynamic engine timed in the run's process


def plan(args, target: Target) -> RunPlan:
    backends = names_option("--backends", args.backends, list_backends(), target.backends)
    dynamic = names_option("--dynamic-backends", args.dynamic_backends, list_backends(), []) \
        if args.dynamic_backends is not None else None
    phases = names_option("--phases", args.phases, list(PHASES), list(PHASES))
    models = names_option("--models", args.models, dsnet.list_models(), list(DEFAULT_MODELS))
    try:
        batches = [int(b) for b in csv_list(args.batch_size)] if args.batch_size else list(target.batch_sizes)
    except ValueError:
        raise UsageError(f"--batch-size takes integers, got '{args.batch_size}'") from None
    if not batches or any(b < 1 for b in batches):
        raise UsageError("--batch-size values must be at least 1")
    if len(set(batches)) != len(batches):
        raise UsageError(f"--batch-size names a batch size more than once: {args.batch_size}")
    input_size = args.input_size if args.input_size is not None else (
        QUICK_INPUT_SIZE if args.quick else target.input_size)
    if not 32 <= input_size <= MAX_INPUT_SIZE:
        raise UsageError(f"--input-size must be between 32 and {MAX_INPUT_SIZE}, got {input_size}")
    if args.tune_minutes is not None and not args.tune_minutes >= 0:  # also refuses nan
        raise UsageError(f"--tune-minutes must be >= 0, got {args.tune_minutes:g}")
    check_memory(max(batches), input_size)
    routes = set(csv_list(args.routes)) if args.routes is not None else None
    if routes is not None and not routes:
        raise UsageError("--routes names nothing")
    protocol, skipped = target.protocol, {}
    if args.quick:
        protocol = protocol.replace(warmup_calls=3, warmup_ms=20, repeat=5, min_repeat_ms=10, budget_s=0)
        if args.backends is None:
            for b, why in QUICK_LEFT_OUT.items():
                if b in backends:
                    backends.remove(b)
                    skipped[b] = f"left out by --quick: {why}; name it in --backends to include"
    return RunPlan(backends, phases, dynamic, models, routes, batches, input_size, protocol,
                   results_layout(args.results, target.name + (f"-threads{args.threads}" if args.threads is not None
                                                               else ""), args.quick), skipped,
                   validate=QUICK_E2E_ROUTES if args.quick else E2E_ROUTES, in_process=args.in_process)


ACTIVATION_FACTOR = 32  # peak activations over the input's size, at least, for the models here (MobileNetV1: ~60)


def check_memory(batch: int, input_size: int) -> None:
    """Refuse, before anything is allocated, a batch whose input alone times
    :data:`ACTIVATION_FACTOR` exceeds the memory available now."""
    need = batch * 3 * input_size * input_size * 4 * ACTIVATION_FACTOR
    available = psutil.virtual_memory().available
    if need > available:
        raise UsageError(f"--batch-size {batch} at {input_size}x{input_size} needs about {need / 2**30:.1f} GiB of "
                         f"activations; {available / 2**30:.1f} GiB are available")


def select_workloads(p: RunPlan, quick: bool) -> list[Workload]:
    """The networks to measure; ``--routes`` labels that match nothing are an error."""
    every = workloads(p.models, p.input_size)
    if p.routes is not None:
        unknown = sorted(p.routes - {w.route for w in every})
        if unknown:
            raise UsageError(f"no route matches --routes {', '.join(unknown)} among the routes of "
                             f"{', '.join(p.models)} (e.g. {', '.join(sorted({w.route for w in every})[:6])})")
        return [w for w in every if w.route in p.routes]
    return policy.quick_routes(every) if quick else every


def connect_farm(args, target: Target, p: RunPlan) -> Farm | None:
    """The boards behind ``--rpc-tracker`` (None without it; :func:`_main` checked that
    ``--rpc-key`` goes with it); backends that cannot build for a board are listed as skipped. Any
    set-up problem is a :class:`UsageError`."""
    if not args.rpc_tracker:
        return None
    for_boards = ", ".join(b for b in list_backends() if backend_class(b).supports_remote)
    for b in [b for b in p.backends if not backend_class(b).supports_remote]:
        p.backends.remove(b)
        p.skipped[b] = f"runs on this machine only: through --rpc-tracker only {for_boards} is measured on the boards"
    try:
        for b in p.backends:  # before connecting: fail fast, say what to install
            get_backend(b, target.options(b)).check_export(target)
        farm = Farm.connect(args.rpc_tracker, args.rpc_key, args.rpc_wait)
    except (RemoteError, CrossCompileError) as e:
        raise UsageError(str(e)) from None
    emulated = f" (emulated: {farm.info.get('emulator')})" if farm.emulated else ""
    print(f"{len(farm.boards)} board(s) under key {args.rpc_key!r}: {', '.join(farm.boards)}{emulated}",
          file=sys.stderr)
    return farm


def open_context(args, target: Target, p: RunPlan, farm: Farm | None):
    """Machine capture, the store, the run's identity: the :class:`RunContext` every phase uses, and
    the run's environment document. ``None`` when the machine is busy under ``--strict``."""
    lock, store = open_results(p.layout)
    env, device_name, device_mismatch = capture_machine(target, args.strict, local_device=farm is None)
    if env["busy"] and args.strict:
        store.close()
        lock.release()
        return None, None
    if farm is not None:
        device_name, device_mismatch = ", ".join(farm.boards), farm.emulated
        if farm.emulated:
            p.notes.append(f"the board under key {farm.key!r} is emulated ({farm.info.get('emulator')}): its rows "
                           f"say emulated=1, and their latency is the emulator's, not a "
                           f"{target.expected_device or target.name}'s")
    ctx = RunContext(target, p.layout, p.protocol, store, device_name, device_mismatch, new_run_id(), farm, lock)
    active = []
    for b in p.backends:
        reason = ctx.backend(b).unavailable(target)
        if reason:
            p.skipped[b] = reason
        else:
            active.append(b)
            p.notes += ctx.backend(b).notes(target)
    interrupts.check()  # a Ctrl-C during a backend's import must not read as "not installed"
    p.backends = active
    env_doc = run_document(
        run_id=ctx.run_id, target=target.name, profile_path=target.path, expected_device=target.expected_device,
        threads=target.threads, device_name=device_name, device_mismatch=device_mismatch, quick=args.quick,
        backend_options={b: ctx.backend(b).details() | ctx.backend(b).cache_key() for b in active},
        protocol=p.protocol.__dict__, backends=active, skipped=p.skipped, env=env, farm=farm)
    ctx.store.record_run(ctx.run_id, env_doc)
    return ctx, env_doc


def tuning_phase(ctx: RunContext, p: RunPlan, quick: bool, minutes: float | None, dynamic_backends: list[str]) -> None:
    """TVM tuned before any TVM build (:func:`harness.phases.policy.tune_before_measuring`), the
    dynamic engine's parts too when the dynamic phase runs on TVM."""
    p.notes = policy.tune_before_measuring(ctx, p.backends, p.models, p.input_size, minutes, quick, Progress, p.notes,
                                           dynamic="tvm" in dynamic_backends)


def static_phase(ctx: RunContext, p: RunPlan, all_workloads: list[Workload], retry_failed: bool,
                 worker: BuildWorker) -> None:
    """Every workload through every active backend, precision and batch size the store lacks."""
    tasks, n_done = policy.static_tasks(ctx, all_workloads, p.backends, p.batch_sizes, p.input_size,
                                        retry_failed, p.skipped)
    print(f"{ctx.target.name}: {len(all_workloads)} networks x {len(p.backends)} backend(s); "
          f"{len(tasks)} to measure, {n_done} already stored in {p.layout.root}", file=sys.stderr)
    run_static(ctx, tasks, Progress(static_steps(ctx, tasks), "static"), worker)


def dynamic_phase(ctx: RunContext, p: RunPlan, backends: list[str], worker: BuildWorker) -> None:
    """The dynamic engine of every supernet among the models, on each dynamic backend: built and
    checked here, timed in fresh processes (:mod:`harness.phases.fresh`), or here with ``--in-process``."""
    measure = run_dynamic if p.in_process else run_dynamic_fresh
    for model, backend, precision in policy.dynamic_runs(ctx, policy.supernets(p.models), backends):
        measure(ctx, model, backend, precision, p.input_size,
                functools.partial(Progress, desc=f"dynamic {model} {backend} {precision}"), p.validate, worker)


def table2_phase(ctx: RunContext, p: RunPlan, backends: list[str], default_models: bool, worker: BuildWorker) -> None:
    """DS-Net++ Table 2 (ResNet-50 at 25% channels six ways) on the dynamic backends, for each of
    its supernets among the models; the default run measures the paper's (``s_resnet50``)."""
    for model, backend, precision in policy.dynamic_runs(ctx, policy.table2_models(p.models, default_models),
                                                         backends):
        measure_table2(ctx, backend, precision, p.input_size, model,
                       Progress(len(TABLE2_WAYS), f"table 2 {model} {backend} {precision}"), worker)


def finish(ctx: RunContext, p: RunPlan, env_doc: dict, wall_s: float) -> None:
    """Exports (``lut.csv``, ``dynamic.csv``, ``env.json``) from the store; always runs, even after
    an interruption, so what was measured is never lost."""
    previous = previous_document(p.layout.env_json)  # read before the exports and env.json are rewritten
    lut = ctx.store.export_lut(p.layout.lut_csv)
    dyn = ctx.store.export_dynamic(p.layout.dynamic_csv)
    # the stored results may come from several runs (a resumed run measures only what is missing)
    exported = set(lut.get("run_id", [])) | set(dyn.get("run_id", []))
    complete_document(env_doc, ctx.store, p.layout, p.skipped, exported, wall_s, previous)
    ctx.close()


def summarize(ctx, p: RunPlan, env_doc: dict) -> None:
    """The summary on stdout, then the tables and figures rebuilt from the exports."""
    df, dyn = read_csv(p.layout.lut_csv, LUT_COLUMNS), read_csv(p.layout.dynamic_csv, DYNAMIC_COLUMNS)
    p.notes += _tuning_note(df[(df.backend == "tvm") & df.model.isin(p.models) & (df.input_size == p.input_size)])
    print(summary_table(df[df.model.isin(p.models) & (df.input_size == p.input_size)], p.skipped, p.notes))
    dyn_scope = dyn[dyn.model.isin(p.models) & (dyn.input_size == p.input_size)]
    if len(dyn_scope):
        print(dynamic_summary(dyn_scope, env_doc.get("run_id")))
    print(f"wrote {p.layout.lut_csv}, {p.layout.dynamic_csv} and {p.layout.env_json} ({env_doc['wall_time_s']} s)")
    try:
        written, _ = build(p.layout, p.input_size, ctx.target.name)
        print(f"tables, figures and the page: {len(written)} files under {p.layout.tables_dir}, {p.layout.figures_dir} "
              f"and {p.layout.page} (rebuild with {rebuild_command(p.layout, p.input_size, ctx.target.name)})")
    except ReportError as e:
        print(f"tables and figures: none ({e})")
    except Exception as e:  # a report bug must not read as a failed run: the results are stored
        print(f"tables and figures: failed ({one_line(e)}); the results are stored in {p.layout.root}",
              file=sys.stderr)


def _tuning_note(tvm_rows) -> list[str]:
    """How tuned the TVM rows are, e.g. ``tvm rows: 4 tuned, 14 untuned``."""
    counts = Counter(tuning_label(d) for d in tvm_rows.backend_details if tuning_label(d))
    return [f"tvm rows: {', '.join(f'{n} {label}' for label, n in sorted(counts.items()))}"] if counts else []


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _main(args), "results measured so far are stored; re-run the same command to resume")


def _main(args) -> int:
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise UsageError("--rpc-tracker and --rpc-key go together")
    target = open_target(args.target, remote=bool(args.rpc_tracker), threads=args.threads)
    p = plan(args, target)
    all_workloads = select_workloads(p, args.quick)
    farm = connect_farm(args, target, p)
    ctx, env_doc = open_context(args, target, p, farm)
    if ctx is None:
        return 3
    t0, status = time.monotonic(), 0
    # one build worker for the run: it builds on the second core while this process builds and checks
    # (nothing is timed while it works), and is spawned once
    worker = BuildWorker()
    try:
        dynamic_on = policy.dynamic_backends(ctx, p.backends, p.dynamic, csv_list(args.backends), p.skipped) \
            if "dynamic" in p.phases and farm is None else []
        if {"static", "dynamic"} & set(p.phases):
            tuning_phase(ctx, p, args.quick, args.tune_minutes, dynamic_on)
        if "static" in p.phases:
            static_phase(ctx, p, all_workloads, args.retry_failed, worker)
        if farm is not None:
            p.skipped["dynamic engine, Table 2"] = "measured on this machine only, not through --rpc-tracker"
        else:
            if "dynamic" in p.phases:
                dynamic_phase(ctx, p, dynamic_on, worker)
            if "table2" in p.phases:
                # Table 2 on the profile's dynamic backends: --dynamic-backends may name compilers whose
                # ResNet-50 builds no tuning covered
                table2_phase(ctx, p, policy.profile_dynamic_backends(ctx, p.backends, csv_list(args.backends),
                                                                     p.skipped),
                             default_models=args.models is None, worker=worker)
    except KeyboardInterrupt:
        status = 130
        print("\ninterrupted: results measured so far are stored; re-run the same command to resume",
              file=sys.stderr)
    finally:
        worker.close()
        finish(ctx, p, env_doc, time.monotonic() - t0)
    summarize(ctx, p, env_doc)
    return status


if __name__ == "__main__":
    sys.exit(main())
