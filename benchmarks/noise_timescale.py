"""On what time scale the machine's speed moves: two engines timed alternately, and how far a pair of
their samples disagrees as the time between the two grows.

    python benchmarks/noise_timescale.py [--model mobilenet_v1] [--routes x1.0,x0.25] [--seconds 60]
        [--threads 0] [--input-size 224]

Times the two networks (eager, the harness's own workloads and thread setting; 0: all physical
cores) alternately, A B A B ... (``measure_interleaved``), each sample the mean of the calls that
fill ``--sample-ms`` (the protocol's ``min_repeat_ms``), for about ``--seconds``. Prints each
engine's spread (standard deviation of log samples), the spread of the log ratio of A's i-th sample
to B's sample ``lag`` samples later (lag 0: timed back to back) and A's autocorrelation at those lags.

Read against a round phase: a round of the static sweep times every engine of a model once (28 on
DS-MBNet, ~1.5 s at 50 ms a sample), so a cell and its reference are on average half a round apart;
if the ratio's spread grows with the lag, the speed moves within a round and pairing per round
cancels only the slower part of it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

LAGS = (0, 1, 2, 5, 10, 30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/noise_timescale.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v1")
    p.add_argument("--routes", default="x1.0,x0.25", help="two route labels of the model (A,B)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sample-ms", type=float, default=50.0)
    p.add_argument("--threads", type=int, default=0, help="0: all physical cores, as the x86 profile")
    p.add_argument("--input-size", type=int, default=224)
    args = p.parse_args(argv)
    labels = args.routes.split(",")
    if len(labels) != 2:
        p.error(f"--routes takes two labels, got {args.routes!r}")
    if args.seconds <= 0 or args.sample_ms <= 0:
        p.error("--seconds and --sample-ms must be positive")

    import torch

    from harness.env import configure_threads
    from harness.measure.pipeline import image_batch
    from harness.measure.protocol import Protocol, measure_interleaved
    from harness.phases.static import workloads

    configure_threads(args.threads)  # as harness.run does: the thread count, the process pinned
    try:
        found = {w.route: w for w in workloads([args.model], args.input_size, set(labels))}
    except ValueError as e:
        p.error(str(e))
    missing = [lb for lb in labels if lb not in found]
    if missing:
        p.error(f"{args.model} has no route(s) {', '.join(missing)}")
    x = image_batch(1, args.input_size)
    nets = [found[lb].build().eval() for lb in labels]
    protocol = Protocol(repeat=max(3, round(args.seconds * 1e3 / (2 * args.sample_ms))), min_repeat_ms=args.sample_ms)
    with torch.inference_mode():  # A B A B ..., one sample each per round, in this order
        res = measure_interleaved({"A": lambda: nets[0](x), "B": lambda: nets[1](x)}, protocol)
    logs = [np.log(res[k].samples_ms) for k in "AB"]
    numbers = [res[k].number for k in "AB"]
    n = min(map(len, logs))
    a, b = (np.asarray(v[:n]) for v in logs)
    print(f"{args.model} {labels[0]} (A) and {labels[1]} (B), eager, {torch.get_num_threads()} thread(s), "
          f"{n} samples each of ~{args.sample_ms:.0f} ms ({numbers[0]} and {numbers[1]} calls)")
    print(f"spread of the samples (sd of log): A {100 * a.std():.1f}%, B {100 * b.std():.1f}%; "
          f"medians {np.exp(np.median(a)):.3f} and {np.exp(np.median(b)):.3f} ms")
    step = 2 * args.sample_ms / 1e3
    for lag in (lag for lag in LAGS if lag < n - 2):
        d = a[:n - lag] - b[lag:]
        auto = np.corrcoef(a[:n - lag], a[lag:])[0, 1] if lag else 1.0
        print(f"A then B {lag:2d} pair(s) later (~{lag * step:4.1f} s apart): sd of log ratio "
              f"{100 * d.std():5.1f}%   A's autocorrelation {auto:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
