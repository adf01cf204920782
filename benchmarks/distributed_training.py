"""Stage-I training throughput over 1 and N processes (torchrun, DistributedDataParallel, gloo on CPU).

    python benchmarks/distributed_training.py [--procs 1,2] [--repeats 3] [--epochs 2]
        [--model ds_mbnet_tiny] [--input-size 32] [--batch-size 64] [--threads 1]

Each repeat launches ``torchrun --nproc_per_node P`` once per process count, in alternating order
(1, 2, 2, 1, ...), so the machine's drift falls on both alike. A launch trains stage I
(``dsnet.training.train_supernet``: the sandwich rule, four routes a step) on the digits for
``--epochs`` epochs with the global ``--batch-size``, and rank 0 reports images per second over the
training steps (from the first step to the last, between barriers; start-up, data loading and the
BN re-calibration left out). Prints each launch and, per process count, the median and range, and
the median ratio to one process over the repeats. ``--threads``: intra-op threads per process
(torchrun's default is 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import torch

    import dsnet
    from dsnet.data import digits
    from dsnet.distributed import World, barrier, shard_loader, start, stop, world_from_env
    from dsnet.training import train_supernet

    torch.set_num_threads(args.threads)
    world = world_from_env() or World.single()
    start(world)
    try:
        data = digits(args.input_size)
        loader = shard_loader(data.train, args.batch_size, world, seed=0)
        torch.manual_seed(0)
        model = dsnet.create_model(args.model, num_classes=10)
        model.init_for_training()
        times = []

        def progress(label, figures):
            times.append(time.perf_counter())

        barrier(world)
        train_supernet(model, loader, args.epochs, seed=0, calibration_batches=1, progress=progress, world=world)
        steps = len(times)
        if world.main:
            seconds = times[-1] - times[0]
            images = (steps - 1) * args.batch_size  # the steps after the first, which started the clock
            print(json.dumps({"processes": world.size, "steps": steps, "seconds": seconds,
                              "images_per_s": images / seconds}), flush=True)
    finally:
        stop(world)


def launch(args, procs: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
               str(port), __file__, "--worker", "--model", args.model, "--input-size", str(args.input_size),
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--threads", str(args.threads)]
    r = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        sys.exit(f"error: torchrun with {procs} process(es) failed (exit {r.returncode}): "
                 + (r.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(lines[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--model", default="ds_mbnet_tiny")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="the global batch")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    try:
        procs = [int(x) for x in args.procs.split(",")]
    except ValueError:
        sys.exit(f"error: --procs takes comma-separated integers, got {args.procs!r}")
    if any(n < 1 or args.batch_size % n for n in procs) or args.repeats < 1:
        sys.exit(f"error: every process count must be >= 1 and divide --batch-size {args.batch_size}; "
                 "--repeats >= 1")
    runs: dict[int, list[float]] = {n: [] for n in procs}
    for r in range(args.repeats):
        for n in (procs if r % 2 == 0 else procs[::-1]):
            out = launch(args, n)
            runs[n].append(out["images_per_s"])
            print(f"repeat {r + 1}: {n} process(es): {out['images_per_s']:.1f} images/s "
                  f"({out['steps']} steps in {out['seconds']:.1f} s)", flush=True)
    base = runs[procs[0]]
    for n in procs:
        v = runs[n]
        ratio = statistics.median(a / b for a, b in zip(v, base))
        print(f"{n} process(es): median {statistics.median(v):.1f} images/s (range {min(v):.1f}..{max(v):.1f}), "
              f"{ratio:.2f}x {procs[0]} process(es) (median of per-repeat ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
