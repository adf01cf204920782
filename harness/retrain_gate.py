"""``python -m harness.retrain_gate``: retrain a supernet's gate for real latency on a target.

Flow (one direction): data -> stage-I supernet (trained here, or ``--checkpoint``) -> per-route
costs (MAdds computed; latency from the target's LUT, measured here when missing) -> stage II per
penalty (``dsnet.training.train_gate``) -> evaluation (accuracy, route histogram, expected MAdds,
LUT latency) -> the dynamic engine of each retrained gate compiled through ``--backend`` and timed
on the validation images, one image per call, every gate interleaved in one run -> report.

Everything lands in the results folder (``--results``, default ``results/<target>``); the stages live
in ``harness.phases.retraining``:

- ``gate_retraining/<model>-<data>-<size>px/``: the workspace. ``supernet.pt`` (stage I),
  ``gate-<penalty>-<backend>.pt`` (stage II), ``results.sqlite`` and ``dynamic.csv`` (the LUT,
  when measured here). A re-run reuses every checkpoint whose settings match, and resumes a stage
  after its last complete epoch: an interrupted run loses at most the epoch it was in.
- ``gate_retraining.md`` / ``.csv`` / ``_routes.csv`` and ``figures/gate_retraining.png``: the
  comparison, with the environment.

Over several processes (``torchrun --nproc_per_node N -m harness.retrain_gate ...``, or with
``--nnodes``), both stages train under ``DistributedDataParallel`` (``dsnet.distributed``: gloo on
CPU, NCCL on CUDA), each rank taking ``--batch-size / N`` images of every global batch; rank 0
alone measures the LUT (handed to the others), reads and writes the results folder, checkpoints and
measures the retrained gates. On a CUDA target both stages train on the GPU (each rank its own,
``LOCAL_RANK``), in mixed precision with ``--amp``. Every stage keeps its state after each epoch
(``<checkpoint>.partial.pt``): a re-run of the same command after any rank died resumes after the
last complete epoch, whatever the number of processes.

Exit codes: 0 done; 2 bad input (one line: unknown model or backend, missing data folder, a LUT
that does not match the model, unreadable checkpoint, a target this machine cannot run); 3 busy
under ``--strict``; 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from dsnet.data import DataError
from dsnet.distributed import DistributedError, World, share, start, stop, world_from_env
from dsnet.training import evaluate_gate
from harness.cli import (
    Progress,
    UsageError,
    add_results_option,
    capture_machine,
    new_run_id,
    open_results,
    open_target,
    results_layout,
    run_main,
)
from harness.phases import retraining as rt
from harness.phases.context import RunContext
from harness.reporting.gates import render

PENALTIES = ("madds", "latency")
DEFAULT_INPUT_SIZE = 64  # the digits demo; ImageNet folders want 224


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m harness.retrain_gate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a supernet, e.g. ds_mbnet, ds_resnet50")
    p.add_argument("--target", required=True, help="target profile (see targets/)")
    p.add_argument("--backend", required=True, help="backend whose LUT prices the routes and that runs the engine")
    p.add_argument("--penalty", default="both", choices=PENALTIES + ("both",),
                   help="complexity penalty: MAdds (the paper), LUT latency, or both side by side (default)")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's digits, shipped, the default), 'digits-hard' (the same, each image "
                        "corrupted at its own severity: where routing matters) or an ImageFolder with train/ and val/")
    p.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE, help="square input resolution")
    p.add_argument("--checkpoint", type=Path, help="stage-I supernet to start from (skips stage I): a "
                                                   "dsnet-harness checkpoint or an official DS-Net state dict")
    p.add_argument("--lut", type=Path, help="folder holding the dynamic.csv to price routes with "
                                            "(default: measured in the workspace for this exact model)")
    p.add_argument("--supernet-epochs", type=int, default=10)
    p.add_argument("--supernet-lr", type=float, default=0.1, help="stage-I learning rate (cosine schedule)")
    p.add_argument("--gate-epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64,
                   help="the global batch: under torchrun each of the N processes takes batch-size / N images "
                        "of every step (it must divide evenly), so the steps are those of one process")
    p.add_argument("--lr", type=float, default=0.05, help="stage-II learning rate (x0.9 per epoch)")
    p.add_argument("--cp-weight", type=float, default=0.5, help="weight of the complexity penalty (paper: 0.5)")
    p.add_argument("--routes-upto", type=int, help="let each gate choose only its first K choices")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--latency-target", type=float, help="latency target (ms) of the latency penalty")
    target.add_argument("--latency-fraction", type=float,
                        help="latency target as a fraction of the largest route's LUT latency (e.g. 0.6): "
                             "reads only the LUT's ratios, so drift of the machine cannot move it")
    p.add_argument("--madds-target", type=float, help="MAdds target (millions) of the MAdds penalty")
    p.add_argument("--latency-budget", metavar="B[,B...]",
                   help="latency budget(s): 0.6x (of the largest route's LUT latency), 3.0 or 3ms. Trains one gate "
                        "per budget and penalty (latency toward the budget, MAdds toward the same fraction of the "
                        "largest route's MAdds), calibrates each to its budget, measures all in one run")
    p.add_argument("--no-calibrate", action="store_true",
                   help="with --latency-budget: keep the trained gates as they are (no score calibration)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision in both stages: float16 with loss scaling on a CUDA target, bfloat16 on CPU")
    p.add_argument("--workers", type=int, help="DataLoader worker processes per rank (default: 4 for an image "
                                               "folder, 0 for the in-memory digits)")
    add_results_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="refuse to measure on a busy machine")
    return p.parse_args(argv)


def settings_from(args, target):
    return rt.Settings(model=args.model, backend=args.backend,
                       penalties=PENALTIES if args.penalty == "both" else (args.penalty,), data=args.data,
                       input_size=args.input_size, layout=results_layout(args.results, target.name),
                       checkpoint=args.checkpoint, lut=args.lut, supernet_epochs=args.supernet_epochs,
                       supernet_lr=args.supernet_lr,
                       gate_epochs=args.gate_epochs, batch_size=args.batch_size, lr=args.lr, cp_weight=args.cp_weight,
                       routes_upto=args.routes_upto, latency_target=args.latency_target,
                       latency_fraction=args.latency_fraction,
                       madds_target=args.madds_target, seed=args.seed,
                       budgets=rt.parse_budgets(args.latency_budget) if args.latency_budget else (),
                       calibrate=not args.no_calibrate, workers=args.workers, device=target.device,
                       amp=args.amp)


def _train_progress(total: int, desc: str):
    bar = Progress(total, desc, every_s=5.0)
    return lambda label, figures: bar(label, ", ".join(f"{k} {v:.4g}" for k, v in figures.items()))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _main(args),
                    "finished stages are saved in the workspace; re-run the same command to resume")


def _main(args) -> int:
    target = open_target(args.target)
    try:
        world = world_from_env()
        if world is not None:
            world.split_batch(args.batch_size)  # before any process group: every rank says it alike
    except DistributedError as e:
        raise UsageError(str(e)) from None
    world = world or World.single()
    try:
        s = settings_from(args, target)
        start(world, target.device)
        return _run(args, target, s, world)
    except (rt.RetrainingError, DataError) as e:  # DataError: e.g. an image that cannot be read
        raise UsageError(str(e)) from None
    finally:
        stop(world)


def _run(args, target, s, world: World) -> int:
    """The retraining on every rank; rank 0 alone measures, reads and writes the results folder."""
    if world.main:  # it reads the results folder (a stored comparison); a refusal ends every rank (torchrun)
        rt.validate(s, target)
    data = rt.load_splits(s, world)
    if not world.main:
        return _train_on_a_rank(args, s, data, world)
    env, device_name, mismatch = capture_machine(target, args.strict)
    if share(env["busy"] and args.strict, world):
        return 3
    ws = s.workspace
    lock, store = open_results(ws)
    t0 = time.monotonic()
    ctx = RunContext(target, ws, target.protocol, store, device_name, mismatch, new_run_id())
    try:
        costs = share(rt.route_costs(s, data, ctx, lambda n, desc: Progress(n, desc)), world)  # fails fast
        supernet = rt.stage1(s, data, _train_progress, world)
        gates, evals = {}, {}
        as_tensor = {"madds": torch.tensor(costs.route_madds, dtype=torch.float64),
                     "lut_ms": torch.tensor(costs.route_lut_ms, dtype=torch.float64)}
        for budget in s.budgets or (None,):
            for penalty in s.penalties:
                name = rt.gate_name(penalty, budget)
                gates[name] = rt.stage2(s, data, supernet, costs, penalty, _train_progress, budget, world)
                e = evals[name] = evaluate_gate(gates[name].model, data.val_loader, as_tensor)
                print(f"{name} gate: val accuracy {e.accuracy:.3f}, expected {e.expected['madds'] / 1e6:.2f}M MAdds, "
                      f"LUT {e.expected['lut_ms']:.3f} ms", file=sys.stderr)
        print(f"measuring the dynamic engine on {s.backend} over {len(data.splits.val)} validation images",
              file=sys.stderr)
        measured = rt.measure_gates(ctx, s, data, supernet, gates)
    finally:
        ctx.store.close()
        lock.release()
    largest = supernet.model.routes(s.input_size)[-1]
    doc = {"largest_route_accuracy": rt.route_accuracy(supernet.model, largest, data.val_loader),
           "run_id": ctx.run_id, "target": target.name, "device_name": device_name, "device_mismatch": mismatch,
           "threads": target.threads, "protocol": asdict(target.protocol), "env": env,
           "wall_time_s": round(time.monotonic() - t0, 1), "args": {k: str(v) for k, v in vars(args).items()},
           "lut_dispatch": costs.lut_note, "lut_reliability": costs.lut_reliability}
    paths = rt.store_outcome(rt.Outcome(s, data, supernet, costs, gates, evals, measured, doc))
    paths += render(s.layout)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _train_on_a_rank(args, s, data, world: World) -> int:
    """Another rank than 0: the same collectives as rank 0's :func:`_run` (the busy check, the
    costs rank 0 measured, both stages), no file read or written, no measurement."""
    if share(None, world):
        return 3
    costs = share(None, world)
    supernet = rt.stage1(s, data, _train_progress, world)
    for budget in s.budgets or (None,):
        for penalty in s.penalties:
            rt.stage2(s, data, supernet, costs, penalty, _train_progress, budget, world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
