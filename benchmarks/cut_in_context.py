"""What cutting a dynamic network at its gates costs, warm and among other engines.

    python benchmarks/cut_in_context.py --model ds_resnet50 --backend onnxruntime [--route 0-0-0-0]
        [--decoys 0,8] [--rounds 150] [--input-size 224] [--cache DIR] [--load-all-segments]

The dynamic phase of ``harness.run`` times every engine of a model in the same shuffled rounds: the
deployed path and the static engine of each priced route, each part of each route's chain, the one
artifact, the streams. So each engine is called after others have run, with caches that hold little
of its own. This benchmark asks how much of the deployed path's cost over a route's static engine
comes from that context. For one route (default: the smallest), it times in rounds, one call per
sample, each after ``D`` other routes' static engines have run (untimed), for each ``D`` of
``--decoys``:

- ``static``: the route's static engine;
- ``deployed``: the deployed path forced to the route (:meth:`DynamicEngine.deployed`: gate decisions
  computed, then replaced by the route's);
- ``chain``: the route's parts in chain order (:func:`~harness.deploy.engine.chain_parts`), the sum
  of their samples in a round.

and prints ``deployed - static`` and ``chain - static``, paired per round (median, 95% interval of
the median, share of the static engine), and each part's median. ``D = 0``: the static engine and
the deployed path each right after an untimed call of its own (their steady state, as the phase's
``static_steady`` and ``deployed_steady`` rows; the chain after the route's other engines);
``D = 8``: each after eight other networks.
Artifacts are built through the harness pipeline (checked against eager) into ``--cache`` (default: a
temporary folder; a results folder's ``cache/`` reuses a run's artifacts, built under the same keys).
The route's parts are loaded first; ``--load-all-segments`` loads every segment first, in stage order,
as the dynamic phase does (on DS-ResNet-50 that order alone made ONNX Runtime's cut dearer:
docs/run.md, "Two contexts").
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))


def _interval(diffs, scale: float) -> str:
    """Median of per-round differences (ms) with the 95% interval of the median, in us and as a share."""
    from harness.measure.protocol import median_interval

    v = np.sort(np.asarray(diffs, dtype=float))
    lo, hi = median_interval(len(v))
    med = float(np.median(v))
    return f"{med * 1e3:+.0f} us ({v[lo] * 1e3:+.0f}..{v[hi] * 1e3:+.0f}; {100 * med / scale:+.1f}%)"


def main(argv=None) -> int:
    import torch

    import dsnet
    from harness.backends import base_name, get_backend
    from harness.deploy.engine import DynamicEngine, PartError, chain_parts
    from harness.measure.pipeline import ArtifactKey, image_batch, trial, weights_fingerprint
    from harness.measure.protocol import Measurement, Protocol, Timer, WallTimer, measure_rounds
    from harness.phases.dynamic import paired_differences
    from harness.phases.static import reference_model
    from harness.targets import TargetError, load_target

    p = argparse.ArgumentParser(prog="python benchmarks/cut_in_context.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ds_mbnet", help="a dynamic model (dsnet.list_models())")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--route", help="one choice per gate, e.g. 0-1-3-2 (default: the smallest route)")
    p.add_argument("--decoys", default="0,8", help="comma-separated counts of other routes' static engines run "
                                                   "before each timed call")
    p.add_argument("--rounds", type=int, default=150)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--target", default="x86", help="the profile whose backend options and threads are used")
    p.add_argument("--cache", help="artifact folder (default: a temporary one)")
    p.add_argument("--load-all-segments", action="store_true",
                   help="load every segment of the model first, in stage order, as the dynamic phase does")
    args = p.parse_args(argv)

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.model not in dsnet.list_models():
        return fail(f"unknown model '{args.model}'")
    try:
        target = load_target(args.target).resolve()
        decoy_counts = sorted({int(d) for d in args.decoys.split(",")})
    except (TargetError, ValueError) as e:
        return fail(str(e))
    if args.rounds < 3 or min(decoy_counts) < 0:
        return fail("--rounds must be at least 3 and --decoys at least 0")
    backend = get_backend(args.backend, options=target.options(base_name(args.backend)))
    why = backend.unavailable(target)
    if why:
        return fail(f"{args.backend}: {why}")
    model = reference_model(args.model).eval()
    if not model.dynamic:
        return fail(f"{args.model} has no gates (a static or slimmable network)")
    routes = model.routes(args.input_size)
    madds = {r: dsnet.profile(model, r, args.input_size).madds for r in routes}
    try:
        route = model.validate_route(args.route) if args.route else min(routes, key=madds.get)
    except dsnet.RouteError as e:
        return fail(f"--route: {e}")
    others = [r for r in routes if r != route]
    random.Random(0).shuffle(others)
    if max(decoy_counts) > len(others):
        return fail(f"{args.model} has {len(others)} other routes, fewer than {max(decoy_counts)} decoys")

    with tempfile.TemporaryDirectory(prefix="cut_in_context-") as scratch:
        cache = Path(args.cache or scratch)
        x = image_batch(1, args.input_size)

        def static_engine(r):
            module = dsnet.materialize(model, r)
            key = ArtifactKey.of(args.model, str(r), backend, target, "fp32", x, weights_fingerprint(module))
            result = trial(backend, module, x, target, "fp32", key, cache)
            if not result.ok:
                raise PartError(f"route {r}", result)
            return result.engine

        print(f"building {args.model} route {route} on {args.backend} ({target.threads} threads) "
              f"and {max(decoy_counts)} other routes' static engines...", file=sys.stderr)
        try:
            engine = DynamicEngine(dsnet.split(model), backend, target, "fp32", cache, args.input_size,
                                   model_name=args.model)
            if args.load_all_segments:
                for k, stage in enumerate(engine.plan.stages):
                    for key in stage:
                        engine.segment(k, key, engine.plan.features_into(k, key, x))
            static = static_engine(route)
            parts = chain_parts(engine, route, x)
            decoys = [static_engine(r) for r in others[:max(decoy_counts)]]
        except PartError as e:
            return fail(str(e))
        static_in = static.prepare(x)
        head_in = engine.head.prepare(x)
        decoy_ins = [d.prepare(x) for d in decoys]
        fns = {"static": lambda: static.run(static_in), "deployed": lambda: engine.deployed(head_in, route)}
        fns.update({f"part {name}": fn for name, fn in parts.items()})
        part_names = [f"part {name}" for name in parts]
        later_parts = {fns[k] for k in part_names[1:]}

        class AfterDecoys(Timer):
            """Runs the decoys, untimed, before each timed sample but a chain's later parts (timed right
            after the part before them, as the deployed path runs them)."""

            def __init__(self, n: int):
                self.n, self.clock = n, WallTimer()

            def elapsed_ms(self, fn, number):
                if fn not in later_parts:
                    for d, d_in in zip(decoys[:self.n], decoy_ins[:self.n]):
                        d.run(d_in)
                return self.clock.elapsed_ms(fn, number)

        protocol = Protocol(warmup_calls=5, warmup_ms=0, repeat=args.rounds, min_repeat_ms=0)
        with torch.inference_mode():
            for n in decoy_counts:
                rounds = measure_rounds(fns, protocol, AfterDecoys(n), groups=[["static"], ["deployed"], part_names],
                                        numbers=dict.fromkeys(fns, 1), primed={"static", "deployed"} if not n else None)
                s = rounds["static"]
                scale = s.stats.p50
                chain = [sum(rounds[k].samples_ms[i] for k in part_names) for i in range(len(s.samples_ms))]
                chained = Measurement(chain, 1, rounds[part_names[0]].rounds)
                deployed = _interval(paired_differences(rounds["deployed"], s), scale)
                print(f"{args.model} {args.backend} route {route}, {n} decoys, {args.rounds} rounds: "
                      f"static {scale:.3f} ms; deployed - static {deployed}; "
                      f"chain - static {_interval(paired_differences(chained, s), scale)}; parts "
                      + ", ".join(f"{k[5:]} {rounds[k].stats.p50:.3f}" for k in part_names) + " ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
