"""The dynamic engine on a backend, and how well per-route latencies predict it.

Contract
--------
``DynamicEngine(plan, backend, target, precision, cache_root, input_size, model_name=...)`` compiles
the head of a ``dsnet.split`` plan (fixed layers + gate, returning features and route scores) and,
on demand, one engine per later segment and group size, each through
:func:`harness.measure.pipeline.trial`: cached under the one artifact key and checked against
its eager segment before use. A part that fails raises :class:`PartError` carrying its
:class:`~harness.measure.pipeline.Result`; ``engine.parts`` holds every part's result (compile
time, details). ``engine(x)`` runs dynamic inference: the gate's argmax
per sample, samples grouped by route, each group through its compiled segment; it returns
``(logits, choices)`` like ``DynamicPlan.forward``. ``engine.route_call(x, route)`` is the timed
batch-1 path for one route: head, gate decision (argmax computed as in real dispatch), hand-off,
segments. Models know nothing of this module; backends know nothing of DS-Net.

Measurements (all with the one protocol, interleaved where a ratio or difference is taken):

- :func:`covering_routes` and :func:`chain_parts`: every segment timed in context, interleaved in
  chain order one call per sample (the compositional LUT: a route's latency is predicted as the sum
  of the segments it runs through);
- :func:`measure_dispatch`: head, segments and end to end of one route, interleaved in one run:
  validates the composition and gives the dispatch overhead (gate decision and hand-off);
- :func:`measure_stream`: the dynamic engine over a stream of inputs whose routes follow a
  distribution, against the LUT's expectation;
- :func:`measure_acceleration`: a route distribution against static networks (the largest and the
  one of matched MAdds) in one interleaved run: realized and ideal speed-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dsnet.deploy import dispatch_argmax
from harness.deploy.lut import route_segment_names
from harness.measure.pipeline import ArtifactKey, Result, trial, weights_fingerprint
from harness.measure.protocol import Protocol, Timer, measure, measure_interleaved, measure_rounds


class PartError(RuntimeError):
    """A part of the dynamic engine (head or segment) that did not compile or check."""

    def __init__(self, name: str, result: Result):
        super().__init__(f"{name}: {result.status}: {result.error}")
        self.name, self.result = name, result


class DynamicEngine:
    def __init__(self, plan, backend, target, precision: str, cache_root: Path, input_size: int,
                 batch_size: int = 1, model_name: str = "dynamic"):
        """``model_name`` names the artifacts: make it differ for plans whose parts differ in more
        than their weights (e.g. a gate restricted to fewer routes)."""
        self.plan, self.backend, self.target, self.precision = plan, backend, target, precision
        self.cache_root, self.model_name = Path(cache_root), model_name
        self.n_gates = len(plan.stages)
        self.parts: dict[str, Result] = {}
        example = torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
        self.head = self._compile("head", plan.head, example)
        self._segments: dict[tuple, object] = {}

    def _compile(self, name: str, module, example):
        shape = "x".join(map(str, example.shape))
        key = ArtifactKey.of(self.model_name, name, self.backend, self.target, self.precision, example,
                             weights_fingerprint(module))
        result = trial(self.backend, module, example, self.target, self.precision, key, self.cache_root)
        self.parts[f"{name}@{shape}"] = result
        if not result.ok:
            raise PartError(name, result)
        return result.engine

    def segment(self, k: int, key: tuple, feats: torch.Tensor):
        """The compiled segment ``key`` of stage ``k`` for inputs shaped like ``feats``."""
        cache_key = (k, key, tuple(feats.shape))
        if cache_key not in self._segments:
            name = self.plan.segment_name(k, key)
            # Compiled and checked on seeded data of the features' shape, not on ``feats``: what first
            # arrives may be degenerate (a narrow slice of one image's features can be all zero after
            # ReLU), which would make the check against eager meaningless and the artifact depend on it.
            example = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1), dtype=feats.dtype)
            self._segments[cache_key] = self._compile(name, self.plan.stages[k][key], example)
        return self._segments[cache_key]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dispatch_argmax(x, self.head, lambda k, key, f: self.segment(k, key, f)(f), self.n_gates)

    def route_call(self, prepared, route):
        """Timed end-to-end call for ``route``: head, gate decision, hand-off, segments."""
        head = self.head
        feats, scores = head.to_torch(head.run(prepared))
        scores.argmax(-1)  # the gate's decision, computed as in real dispatch; ``route`` is forced
        engines = self._path[tuple(route)]
        for k, eng in enumerate(engines):
            y = eng.to_torch(eng.run(eng.prepare(feats)))
            if k + 1 < len(engines):
                feats = y[0]
        return y

    def prepare_routes(self, routes, x: torch.Tensor) -> None:
        """Compile every segment the given routes run through for inputs like ``x`` (before timing)."""
        head_feats, _ = self.head(x)
        self._path = {}
        for route in routes:
            feats, prev, path = head_feats, None, []
            for k, c in enumerate(route):
                eng = self.segment(k, (prev, c), feats)
                path.append(eng)
                if k + 1 < self.n_gates:
                    feats = eng(feats)[0]
                prev = c
            self._path[tuple(route)] = path


def covering_routes(plan, routes) -> list:
    """Few routes that together run through every segment of ``plan`` (greedy, in the given order)."""
    wanted = {"head"} | {plan.segment_name(k, key) for k, seg in enumerate(plan.stages) for key in seg}
    cover, seen = [], set()
    for route in routes:
        names = set(route_segment_names(route))
        if names - seen:
            cover.append(route)
            seen |= names
        if seen >= wanted:
            break
    return cover


def chain_parts(engine: DynamicEngine, route, x: torch.Tensor) -> dict:
    """Timed callables for the head and each segment of ``route``, on the inputs the chain feeds
    them: ``{segment name: fn}`` in chain order."""
    engine.prepare_routes([route], x)
    names = route_segment_names(route)
    prepared = engine.head.prepare(x)
    feats, _ = engine.head.to_torch(engine.head.run(prepared))
    fns = {names[0]: lambda: engine.head.run(prepared)}
    path = engine._path[tuple(route)]
    for k, eng in enumerate(path):
        inp = eng.prepare(feats)
        fns[names[k + 1]] = lambda eng=eng, inp=inp: eng.run(inp)
        if k + 1 < len(path):
            feats = eng.to_torch(eng.run(inp))[0]
    return fns


def in_context(protocol: Protocol) -> Protocol:
    """One call per sample: parts timed interleaved in chain order see the caches as deployment does
    (a part repeated back to back keeps its own weights hot and reads too fast). Validity then rests
    on the median's interval alone: single calls of a few ms never add up to ``min_measured_ms``,
    and extra rounds could not change that."""
    return protocol.replace(min_repeat_ms=0, min_measured_ms=0)


def measure_dispatch(engine: DynamicEngine, route, x: torch.Tensor, protocol: Protocol,
                     timer: Timer | None = None) -> dict:
    """Dispatch overhead of one route: end to end minus its parts, all interleaved in one run."""
    fns = chain_parts(engine, route, x)
    prepared = engine.head.prepare(x)
    fns["end_to_end"] = lambda: engine.route_call(prepared, route)
    res = measure_interleaved(fns, in_context(protocol), timer)
    parts = sum(m.stats.p50 for name, m in res.items() if name != "end_to_end")
    e2e = res["end_to_end"]
    return {"parts_ms": parts, "end_to_end": e2e, "end_to_end_ms": e2e.stats.p50,
            "overhead_ms": e2e.stats.p50 - parts}


def stream_routes(distribution: dict, length: int, seed: int = 0) -> list:
    """A stream of routes drawn from ``distribution`` ({route: probability})."""
    routes = list(distribution)
    p = np.asarray([distribution[r] for r in routes], dtype=float)
    if (p < 0).any() or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"route probabilities must be >= 0 and sum to 1, got {p.tolist()}")
    idx = np.random.default_rng(seed).choice(len(routes), size=length, p=p)
    return [routes[i] for i in idx]


def _stream_fn(engine: DynamicEngine, prepared, stream):
    state = {"i": 0}

    def fn():
        route = stream[state["i"] % len(stream)]
        state["i"] += 1
        return engine.route_call(prepared, route)

    return fn


def measure_stream(engine: DynamicEngine, distribution: dict, lut_ms: dict, x: torch.Tensor,
                   protocol: Protocol, length: int = 256, timer: Timer | None = None) -> dict:
    """Mean latency per inference over a route stream, against sum_k p_k LUT[k]."""
    engine.prepare_routes(list(distribution), x)
    prepared = engine.head.prepare(x)
    m = measure(_stream_fn(engine, prepared, stream_routes(distribution, length)), protocol, timer)
    predicted = sum(p * lut_ms[str(r)] for r, p in distribution.items())
    return {"measured": m.stats, "predicted_ms": predicted,
            "rel_error": (predicted - m.stats.mean) / m.stats.mean}


def measure_acceleration(engine: DynamicEngine, distribution: dict, largest, matched, x: torch.Tensor,
                         protocol: Protocol, length: int = 256, timer: Timer | None = None) -> dict:
    """Realized speed-up of the dynamic model at ``distribution`` over the static ``largest``,
    beside the ideal speed-up of the static network of matched MAdds, measured in the same rounds
    (a fresh seeded order per round). ``largest``/``matched`` are compiled static engines."""
    engine.prepare_routes(list(distribution), x)
    prepared = engine.head.prepare(x)
    px_l, px_m = largest.prepare(x), matched.prepare(x)
    res = measure_rounds({
        "largest": lambda: largest.run(px_l), "matched": lambda: matched.run(px_m),
        "dynamic": _stream_fn(engine, prepared, stream_routes(distribution, length))}, protocol, timer, seed=2)
    # a stream's per-call time varies by route: compare means (p50 of a mixture is not its mean)
    t = {k: v.stats.mean for k, v in res.items()}
    ideal, realized = t["largest"] / t["matched"], t["largest"] / t["dynamic"]
    return {"largest": res["largest"].stats, "matched": res["matched"].stats, "dynamic": res["dynamic"].stats,
            "ideal_speedup": ideal, "realized_speedup": realized, "realized_over_ideal": realized / ideal,
            "factors": res.factors}
