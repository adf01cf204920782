"""What the deployed dynamic network costs beyond its routes' static engines, and how well the LUT prices it.

    python benchmarks/deployed_overhead.py [--results results/x86] [--models ds_mbnet,ds_resnet50]

Reads ``results.sqlite`` of a finished ``harness.run`` (the dynamic phase's raw samples and their
rounds: every figure of a model and backend was timed in one round phase) and prints, per model and
backend, against issue 33's goals:

- the deployed path over each route's own static engine: the per-round differences pooled over the
  routes (median, 95% interval of the median, interquartile range), in us and as a share of the
  smallest route's static engine (goal: at most 2% on DS-MBNet, 5% on DS-ResNet-50); the one
  artifact likewise; and the deployed path over the static engine each in its steady state (every
  sample right after an untimed call of its own: a process serving the network alone), where the
  store holds it;
- the dispatch cost per gate decision the LUT adds (with its interval);
- the LUT (segments + dispatch) against the deployed path per route: median and max |error|
  (goal: median at most 3%, max 8%);
- Table 7's acceleration: realized / ideal, and the deployment's share (deployed route mix over the
  same mix on the routes' static engines; goal: at most 5%) beside the architecture's.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))


def _measurement(row):
    from harness.measure.protocol import Measurement

    return Measurement(json.loads(row["samples_ms"]), 1, json.loads(row["rounds"]) if row["rounds"] else None)


def _interval(values) -> str:
    from harness.measure.protocol import median_interval

    v = np.sort(np.asarray(values, dtype=float))
    lo, hi = median_interval(len(v))
    return f"{np.median(v) * 1e3:+.0f} us (interval {v[lo] * 1e3:+.0f}..{v[hi] * 1e3:+.0f}, " \
           f"IQR {np.percentile(v, 25) * 1e3:+.0f}..{np.percentile(v, 75) * 1e3:+.0f}, n {len(v)})"


def _paired_row(name: str, diffs: list[float]) -> dict:
    """An ``overhead`` row of per-round differences with the columns the dynamic phase stores: a store
    written before the phase paired Table 7's engines gets it from the samples."""
    from harness.measure.pipeline import stats_row
    from harness.measure.protocol import Measurement

    return {"kind": "overhead", "name": name, "status": "ok", **stats_row(Measurement(diffs, 1, None))}


def report(rows: list[dict], model: str, backend: str) -> list[str]:
    import pandas as pd

    from harness.phases.dynamic import paired_differences
    from harness.reporting.common import acceleration_row, share_text
    from harness.results.layout import ARCHITECTURE, MIX

    by = {(r["kind"], r["name"]): r for r in rows if r["status"] == "ok"}
    statics = {n: r for (k, n), r in by.items() if k == "static"}
    if not statics:
        return [f"{model} {backend}: no static engines timed beside the deployed path"]
    smallest = min(statics.values(), key=lambda r: r["madds"])["latency_ms_p50"]
    out = [f"{model} {backend} (smallest route's static engine {smallest:.3f} ms):"]
    for kind, ref, label in (("deployed", "static", "deployed path"), ("one_graph", "static", "one artifact"),
                             ("deployed_steady", "static_steady", "deployed path, each right after itself")):
        diffs = [d for (k, n), s in by.items() if k == ref and (kind, n) in by and by[(kind, n)]["samples_ms"]
                 for d in paired_differences(_measurement(by[(kind, n)]), _measurement(s))]
        if diffs:
            share = 100 * float(np.median(diffs)) / smallest
            out.append(f"  {label} over the route's static engine: {_interval(diffs)}; {share:+.1f}% of the smallest")
    d = by.get(("dispatch", "per_decision"))
    if d:
        counted = "counted" if d["latency_ms_p50_ci_low"] > 0 else "counted as zero"
        out.append(f"  dispatch per decision {d['latency_ms_p50'] * 1e3:+.0f} us (interval "
                   f"{d['latency_ms_p50_ci_low'] * 1e3:+.0f}..{d['latency_ms_p50_ci_high'] * 1e3:+.0f}; {counted})")
    err = np.array([abs(r["rel_error"]) for (k, _), r in by.items() if k == "route" and r["rel_error"] is not None])
    if err.size:
        out.append(f"  LUT vs deployed: median |error| {100 * np.median(err):.1f}%, max {100 * err.max():.1f}% "
                   f"over {err.size} routes")
    accelerations = [r for r in rows if r["kind"] == "acceleration"]  # none without a static counterpart
    # Table 7's shares paired by round: the phase's rows, or from the samples where it did not store them
    for name, kind, ref in ((MIX, "dynamic", "static_mix"), (ARCHITECTURE, "static_mix", "matched")):
        pair = [by.get(("acceleration", n)) for n in (kind, ref)]
        if ("overhead", name) not in by and all(m and m["samples_ms"] for m in pair):
            accelerations.append(_paired_row(name, paired_differences(*(_measurement(m) for m in pair))))
    accelerations += [r for (k, n), r in by.items() if k == "overhead" and n in (MIX, ARCHITECTURE)]
    acc = acceleration_row(pd.DataFrame(accelerations)) if accelerations else None
    if acc:
        line = f"  acceleration: realized {acc['realized']:.2f}x of ideal {acc['ideal']:.2f}x " \
               f"({acc['realized'] / acc['ideal']:.2f} of ideal)"
        if "deployment" in acc:
            import dsnet

            against = f"the route mix on static engines over {dsnet.static_counterpart(model)} at the same MAdds"
            line += f"; deployment's share {share_text(acc, 'deployment')}, architecture's " \
                    f"{share_text(acc, 'architecture', against)}"
        out.append(line)
    return out


def main(argv=None) -> int:
    from harness.results.layout import Layout

    p = argparse.ArgumentParser(prog="python benchmarks/deployed_overhead.py", description=__doc__.split("\n")[0])
    p.add_argument("--results", default="results/x86", help="a harness.run results folder")
    p.add_argument("--models", help="comma-separated models (default: every dynamic model in the store)")
    args = p.parse_args(argv)
    path = Layout(args.results).store
    if not path.is_file():
        print(f"error: no {path.name} in {args.results} (run python -m harness.run first)", file=sys.stderr)
        return 2
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    rows = [dict(r) for r in db.execute("SELECT * FROM dynamic WHERE batch_size = 1 AND kind != 'table2'")]
    wanted = set(args.models.split(",")) if args.models else None
    for model, backend in sorted({(r["model"], r["backend"]) for r in rows}):
        if wanted is None or model in wanted:
            print("\n".join(report([r for r in rows if (r["model"], r["backend"]) == (model, backend)],
                                   model, backend)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
