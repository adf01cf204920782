"""What each TVM tuning setting buys: one network tuned under several settings, then timed interleaved.

    python benchmarks/tvm_search_settings.py [--arms base,xgb,xgb_prepack,nhwc,nhwc_prepack,nhwc_prepack_fast] \\
        [--minutes 8] [--model mobilenet_v1 --routes x1.0] [--input-size 224] [--root DIR] [--measure-only]

Each arm (a set of ``[tvm]`` options and a cost model, :data:`ARMS`) tunes the chosen routes into
its own database under ``--root`` for ``--minutes`` (the harness's budgeted tuner, its other search
settings as in ``SearchSettings``), then every arm's build, ONNX Runtime and eager are compiled
and checked against eager's output (the harness's pipeline) and timed in one round phase with
the x86 profile's protocol. Prints one line per engine: its p50 and its ratios to ONNX Runtime
and to the first arm, each the median of per-round ratios with its 95% interval.
``--measure-only`` times the databases already under ``--root`` again (another run's rounds, same
builds).

The profile's shipped records against a database tuned on this machine (DB), in the same rounds::

    mkdir -p ROOT/shipped && cp -r DB ROOT/unshipped
    python benchmarks/tvm_search_settings.py --model ds_mbnet --routes 0,6,13 \\
        --arms unshipped,shipped --root ROOT --measure-only

Fast math against exact on one database (DS-MBNet's SiLU; MobileNetV1 has none)::

    mkdir -p ROOT && cp -r DB ROOT/nhwc_prepack && cp -r DB ROOT/nhwc_prepack_fast
    python benchmarks/tvm_search_settings.py --model ds_mbnet --routes 0,13 \\
        --arms nhwc_prepack,nhwc_prepack_fast --root ROOT --measure-only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

# arm -> ([tvm] options over the x86 profile's, cost model)
ARMS = {
    "base": ({"layout": "NCHW", "weight_prepack": False, "fast_math": False}, "random"),
    "xgb": ({"layout": "NCHW", "weight_prepack": False, "fast_math": False}, "xgb"),
    "xgb_prepack": ({"layout": "NCHW", "weight_prepack": True, "fast_math": False}, "xgb"),
    "nhwc": ({"layout": "NHWC", "weight_prepack": False, "fast_math": False}, "xgb"),
    "nhwc_prepack": ({"layout": "NHWC", "weight_prepack": True, "fast_math": False}, "xgb"),
    # the same tasks as nhwc_prepack (the anchor convolutions do not change): --measure-only on a
    # copy of one database under both arms times exact against fast math on the same records
    "nhwc_prepack_fast": ({"layout": "NHWC", "weight_prepack": True, "fast_math": True}, "xgb"),
    # the x86 profile as it is, and without its shipped records: with --measure-only, an empty
    # ROOT/shipped builds from the shipped records alone, ROOT/unshipped from a database tuned here;
    # an empty ROOT/shipped_v3 builds them for the x86-64-v3 baseline they were tuned for, not this CPU
    "shipped": ({}, "xgb"),
    "unshipped": ({"shipped_records": ""}, "xgb"),
    "shipped_v3": ({"target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "num-cores": 0}},
                   "xgb"),
}


def main(argv=None) -> int:
    from harness.backends import get_backend
    from harness.backends.tvm_tuning import SearchSettings, collect_tasks, tune
    from harness.cli import open_target
    from harness.measure.pipeline import ArtifactKey, reference, trial, weights_fingerprint
    from harness.measure.protocol import measure_rounds, median_interval, paired_ratio, paired_ratios
    from harness.phases.static import workloads

    p = argparse.ArgumentParser(prog="python benchmarks/tvm_search_settings.py", description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(a for a in ARMS if "shipped" not in a),
                   help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--minutes", type=float, default=8.0, help="tuning budget per arm")
    p.add_argument("--model", default="mobilenet_v1")
    p.add_argument("--routes", default="x1.0", help="comma-separated routes or widths of --model")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--root", default="results/x86/tvm_search_settings/tvm_tuning", help="one database per arm under it")
    p.add_argument("--measure-only", action="store_true", help="time what --root holds, tune nothing")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        print(f"error: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    target = open_target("x86")
    chosen = workloads([args.model], args.input_size, set(args.routes.split(",")))
    x = torch.randn(1, 3, args.input_size, args.input_size)

    def backend(arm):
        return get_backend("tvm", {**target.options("tvm"), **ARMS[arm][0]}, workdir=Path(args.root) / arm)

    for arm in arms if not args.measure_only else ():
        be = backend(arm)
        mods = [be.relax_module(w.build(), x, target, "fp32") for w in chosen]
        tasks = collect_tasks([m for m, _ in mods], mods[0][1])
        t0 = time.monotonic()
        done = tune(be.open_database(target), tasks, args.minutes * 60, SearchSettings(cost_model=ARMS[arm][1]))
        print(f"{arm}: {len(tasks)} tasks, {done['trials_now']} trials, {time.monotonic() - t0:.0f} s", flush=True)
    fns = {}
    for w in chosen:
        module = w.build().eval()
        ref = reference(module, x)
        for name in ["eager", "onnxruntime", *arms]:
            be = backend(name) if name in ARMS else get_backend(name, target.options(name))
            key = ArtifactKey.of(w.model, w.route, be, target, "fp32", x, weights_fingerprint(module))
            result = trial(be, module, x, target, "fp32", key, Path(args.root) / "artifacts", ref)
            print(f"{w.route} {name}: {result.status} {result.details} {result.error or ''}", flush=True)
            if result.ok:
                prepared = result.engine.prepare(x)
                fns[f"{w.route} {name}"] = lambda e=result.engine, p=prepared: e.run(p)
    res = measure_rounds(fns, target.protocol, None, seed=3)

    def ratio(label, ref):  # median of the per-round ratios and its 95% interval
        if ref not in fns:
            return "    -"
        r = sorted(paired_ratios(res[label], res[ref]))
        lo, hi = median_interval(len(r))
        return f"{paired_ratio(res[label], res[ref]):5.2f} ({r[lo]:.2f}-{r[hi]:.2f})"

    for label in fns:
        route = label.rsplit(" ", 1)[0]
        print(f"{label:28s} p50 {res[label].stats.p50:8.3f} ms  / ORT {ratio(label, route + ' onnxruntime')}"
              f"  / {arms[0]} {ratio(label, f'{route} {arms[0]}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
