"""One backend against others, per network, from a run's stored samples (paired round by round).

    python benchmarks/backend_ratios.py [--results results/x86] [--backend tvm] [--against onnxruntime,eager]

Reads ``results.sqlite`` of a finished ``harness.run`` (its raw samples and their rounds: each
model's networks and backends were timed in one round phase, interleaved) and prints, per network
the store holds on ``--backend``, that backend's p50 and its time relative to each ``--against``
backend: the median over shared rounds of the two samples' ratio (:func:`paired_ratios`), with the
lowest and highest per-round ratio. A ratio below 1: ``--backend`` is faster. The TVM rows also say
how tuned each build was (its ``backend_details``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from harness.measure.protocol import Measurement, paired_ratios
    from harness.results.layout import Layout
    from harness.results.store import ResultStore

    p = argparse.ArgumentParser(prog="python benchmarks/backend_ratios.py", description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results/x86", help="a harness.run results folder")
    p.add_argument("--backend", default="tvm")
    p.add_argument("--against", default="onnxruntime,eager", help="comma-separated backends")
    args = p.parse_args(argv)
    path = Layout(args.results).store
    if not path.is_file():
        print(f"error: no {path.name} in {args.results} (run python -m harness.run first)", file=sys.stderr)
        return 2
    df = ResultStore(path).frame()
    df = df[df.status == "ok"]
    cells = {(r.model, r.route, r.backend): r for r in df.itertuples()}

    def measurement(r) -> Measurement:
        return Measurement(json.loads(r.samples_ms), 1, json.loads(r.rounds))

    against = args.against.split(",")
    print(f"{'network':24s} {args.backend + ' p50 ms':>12s}  " + "  ".join(f"/ {b:28s}" for b in against))
    for (model, route, backend), r in cells.items():
        if backend != args.backend:
            continue
        m, cols = measurement(r), []
        for b in against:
            ref = cells.get((model, route, b))
            if ref is None:
                cols.append(f"/ {b}: not measured".ljust(30))
                continue
            ratios = paired_ratios(m, measurement(ref))
            spread = f"({min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} rounds)"
            cols.append(f"{np.median(ratios):5.2f}x {spread}".ljust(30))
        tuning = json.loads(r.backend_details or "{}").get("tuning", "")
        print(f"{model + ' ' + route:24s} {r.latency_ms_p50:12.3f}  " + "  ".join(cols) + f"  {tuning}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
