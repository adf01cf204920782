"""``python -m harness.tune --target NAME``: tune TVM for the networks a run measures, within a budget.

Collects every distinct TVM task of the target's networks (all routes, all widths, the dynamic
engine's parts where the profile's ``dynamic_backends`` name tvm) at the profile's input size and
tunes them with MetaSchedule into the results folder's database (``<results>/tvm_tuning/``),
which every later ``harness.run`` build applies. The budget (``--minutes``, default the profile's
``[tvm] tune_minutes``, else :data:`DEFAULT_MINUTES`) counts over re-runs: an interrupted run
keeps its records and the next one tunes only what is missing; a re-run with the same budget
tunes nothing. Exit codes: 0 done; 2 bad input (one line on stderr); 130 interrupted (records kept).

Shipping records (docs/tuning.md, "Shipped records"): ``--mcpu x86-64-v3`` tunes for that
baseline instead of the profile's CPU, into its own folder (default ``results/<target>-<mcpu>``, so
the host's database is never mixed with it), and ``--ship DIR`` then writes the best record per
workload into ``DIR`` with ``about.json``: what a profile's ``[tvm] shipped_records`` names.
``--vouch`` tunes nothing: it extracts the tasks of the models at the input size, checks that the
profile's shipped records cover every one and writes so into their ``about.json``, so that a run of
those models skips the extraction (to do again when the networks' code or the libraries change).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import dsnet
from harness.backends import get_backend
from harness.backends.base import one_line
from harness.backends.tvm_tuning import BASELINE_CPU_FLAGS, host_cpu_flags, ship_records
from harness.cli import (
    DEFAULT_MODELS,
    MAX_INPUT_SIZE,
    Progress,
    UsageError,
    add_results_option,
    names_option,
    open_target,
    results_layout,
    run_main,
)
from harness.env import cpu_model
from harness.measure.remote import RemoteError, parse_tracker
from harness.phases.tuning import SPENT, run_tuning, vouch_shipped
from harness.results.layout import Layout
from harness.results.store import FolderLock, StoreError
from harness.targets import known_targets

DEFAULT_MINUTES = 30.0


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m harness.tune", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help=f"target profile: {', '.join(known_targets())}")
    p.add_argument("--models", help=f"comma-separated models (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--minutes", type=float, help="tuning budget in minutes, over re-runs (default: the profile's "
                                                 f"[tvm] tune_minutes, else {DEFAULT_MINUTES:g})")
    p.add_argument("--input-size", type=int, help="square input resolution (default: the profile's)")
    add_results_option(p)
    p.add_argument("--rpc-tracker", metavar="HOST:PORT", help="tune on boards through TVM's RPC tracker")
    p.add_argument("--rpc-key", help="the boards' key at the tracker (with --rpc-tracker)")
    p.add_argument("--mcpu", choices=sorted(BASELINE_CPU_FLAGS),
                   help="tune for this x86-64 baseline instead of the profile's CPU (records to ship; default "
                        "results folder results/<target>-<mcpu>)")
    p.add_argument("--ship", type=Path, metavar="DIR",
                   help="then write the best record per workload into DIR as shipped records (needs --mcpu)")
    p.add_argument("--vouch", action="store_true",
                   help="tune nothing: check that the profile's shipped records cover every task of the models "
                        "and write so into their about.json (a run of those models then skips extracting them)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _main(args), "the tuning records measured so far are kept; re-run to go on")


def _main(args) -> int:
    if bool(args.rpc_tracker) != bool(args.rpc_key):
        raise UsageError("--rpc-tracker and --rpc-key go together")
    target = open_target(args.target, remote=bool(args.rpc_tracker))
    if "tvm" not in target.backends and not target.options("tvm"):
        raise UsageError(f"target '{target.name}' has no [tvm] table: nothing to tune")
    models = names_option("--models", args.models, dsnet.list_models(), list(DEFAULT_MODELS))
    input_size = args.input_size if args.input_size is not None else target.input_size
    if not 32 <= input_size <= MAX_INPUT_SIZE:
        raise UsageError(f"--input-size must be between 32 and {MAX_INPUT_SIZE}, got {input_size}")
    minutes = args.minutes if args.minutes is not None else (target.options("tvm").get("tune_minutes")
                                                             or DEFAULT_MINUTES)
    if not (minutes > 0 and math.isfinite(minutes)):
        raise UsageError(f"--minutes must be a finite number greater than 0, got {minutes:g}")
    remote = None
    if args.rpc_tracker:
        try:
            host, port = parse_tracker(args.rpc_tracker)
        except RemoteError as e:
            raise UsageError(str(e)) from None
        remote = (host, port, args.rpc_key)
    options = dict(target.options("tvm"))
    if args.ship and not args.mcpu:
        raise UsageError("--ship needs --mcpu: records are shipped for a baseline every CPU of the kind runs "
                         f"({', '.join(sorted(BASELINE_CPU_FLAGS))}), not for this CPU")
    if args.mcpu:
        options["target"] = _baseline_target(options.get("target"), args.mcpu, remote)
    layout = (results_layout(args.results, target.name) if args.results is not None or not args.mcpu
              else Layout(Path("results") / f"{target.name}-{args.mcpu}"))
    try:
        backend = get_backend("tvm", options, workdir=layout.tuning_dir("tvm"), remote=remote)
    except ValueError as e:
        raise UsageError(str(e)) from None
    why = backend.unavailable(target)
    if why:
        raise UsageError(f"tvm: {why}")
    if args.vouch:
        if args.ship or args.mcpu or remote:
            raise UsageError("--vouch checks the profile's shipped records on this machine: without --ship, "
                             "--mcpu or --rpc-tracker")
        try:
            entry = vouch_shipped(backend, target, models, input_size, lambda total, desc: Progress(total, desc))
        except ValueError as e:
            raise UsageError(f"--vouch: {one_line(e)}") from None
        print(f"the shipped records in {backend.shipped_records().directory} cover all {entry['tasks']} tasks of "
              f"{entry['networks']} networks ({', '.join(models)} at {input_size}px): vouched in their about.json")
        return 0
    if target.device != "cpu":
        raise UsageError(f"target '{target.name}' builds TVM for {target.device} with DLight's default schedules; "
                         "harness.tune tunes CPU targets")
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(layout.root).acquire()
    except (OSError, StoreError) as e:
        raise UsageError(f"results folder {layout.root}: {e}") from None
    try:
        print(f"tuning {', '.join(models)} at {input_size}px for {target.name} within {minutes:g} min "
              f"into {layout.tuning_dir('tvm')}", file=sys.stderr)
        try:
            summary = run_tuning(backend, target, models, input_size, minutes * 60,
                                 lambda total, desc: Progress(total, desc))
        except ValueError as e:  # a database tuned for another target, an unreadable ledger
            raise UsageError(str(e)) from None
        except (RuntimeError, OSError) as e:  # a network TVM cannot import, a worker that died

            raise UsageError(f"tuning failed: {one_line(e)} (the records measured so far are kept)") from None
    finally:
        lock.release()
    print(f"tuned {summary['tuned_now']} task(s) now ({summary['trials_now']} trials, {summary['seconds_now']:.0f} s); "
          f"the database holds {summary['tuned']} of the {summary['tasks']} tasks of {summary['networks']} networks"
          + ("" if summary["extracted"] else f" ({SPENT})"))
    if args.ship:
        tvm_target = backend.open_database(target).target
        about = {"networks": models, "input_size": input_size, "minutes": minutes, "tasks": summary["tasks"],
                 "tuned": summary["tuned"], "tuned_on": cpu_model(),
                 "date": time.strftime("%Y-%m-%d", time.gmtime())}
        try:
            out = ship_records(layout.tuning_dir("tvm"), tvm_target, args.ship, list(BASELINE_CPU_FLAGS[args.mcpu]),
                               about)
        except (OSError, ValueError) as e:
            raise UsageError(f"--ship {args.ship}: {one_line(e)}") from None
        print(f"shipped the best record per workload to {out} (name it in a profile's [tvm] shipped_records)")
    return 0


def _baseline_target(tvm_target: dict | None, mcpu: str, remote) -> dict:
    """The profile's TVM target tuned for the x86-64 baseline ``mcpu``; refused where this CPU could
    not run what it measures."""
    if remote is not None:
        raise UsageError("--mcpu tunes on this machine, not on boards through a tracker")
    if not tvm_target or not str(tvm_target.get("mtriple", "")).startswith("x86_64"):
        raise UsageError(f"--mcpu {mcpu} is an x86-64 baseline; the profile's TVM target is {tvm_target}")
    lacking = sorted(set(BASELINE_CPU_FLAGS[mcpu]) - host_cpu_flags())
    if lacking:
        raise UsageError(f"--mcpu {mcpu}: this CPU lacks {', '.join(lacking)} and cannot run what it would measure")
    return {**tvm_target, "mcpu": mcpu}


if __name__ == "__main__":
    sys.exit(main())
