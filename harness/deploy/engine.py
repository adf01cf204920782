"""The dynamic network as it is deployed on a backend: compiled parts and the gate's decisions.

Contract
--------
``DynamicEngine(plan, backend, target, precision, cache_root, input_size, model_name=...)`` compiles
the head of a ``dsnet.split`` plan (fixed layers + gate, returning features and route scores) and,
on demand, one engine per later segment and input shape (with ``worker=``, a
:class:`~harness.measure.build_worker.BuildWorker`, every segment at batch 1 up front, the worker
building from the back of the list while this process goes from the front), each through
:func:`harness.measure.pipeline.trial`: cached under the one artifact key and checked against
its eager segment (on the seeded :func:`~harness.measure.pipeline.check_input_like` of its shape) before
use. A part that fails raises :class:`PartError` carrying its
:class:`~harness.measure.pipeline.Result`; ``engine.parts`` holds every part's result (compile time,
details). Models know nothing of this module; backends know nothing of DS-Net.

Dynamic inference, ``engine(x) -> (logits, choices)`` like ``DynamicPlan.forward``:

- one image (batch 1), the deployed path, :meth:`DynamicEngine.deployed` on the backend's native
  input: the head, then per gate the argmax of its native scores (``Engine.choice``), a table
  lookup of the segment it picks and that segment run on the previous part's native output
  (``Engine.outputs``: no conversion, no copy, no grouping between parts; ONNX Runtime's parts hand
  their bound arrays on). Its cost beyond the parts is the gate's decision and the lookup.
  :meth:`DynamicEngine.single` is the same from and to torch tensors. ``route=`` forces the
  decisions after they are computed (timing a given route through the deployed code);
- a batch: the samples grouped by route (:func:`dsnet.deploy.dispatch_argmax`), each group through
  the segment compiled for its size.

For measuring (the phases time these; they compute nothing themselves):

- :func:`covering_routes` and :func:`chain_parts`: every segment as the deployed path runs it, on
  its upstream part's native output, in chain order (the compositional LUT: a route's latency is the
  sum of the segments it runs through, plus the measured dispatch cost);
- :func:`stream_routes` and :func:`cycling`: a callable that runs a stream of routes, one per call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dsnet.deploy import dispatch_argmax
from harness.deploy.lut import route_segment_names
from harness.measure.build_worker import BuildJob, BuildWorker
from harness.measure.pipeline import ArtifactKey, Result, check_input_like, image_batch, trial, weights_fingerprint
from harness.targets import Target


class PartError(RuntimeError):
    """A part of the dynamic engine (head or segment) that did not compile or check."""

    def __init__(self, name: str, result: Result):
        super().__init__(f"{name}: {result.status}: {result.error}")
        self.name, self.result = name, result


class DynamicEngine:
    def __init__(self, plan, backend, target: Target, precision: str, cache_root: Path, input_size: int,
                 batch_size: int = 1, model_name: str = "dynamic", worker: BuildWorker | None = None,
                 also_build: list[BuildJob | None] = ()):
        """``model_name`` names the artifacts: make it differ for plans whose parts differ in more
        than their weights (e.g. a gate restricted to fewer routes). ``worker``: every part is built
        now (at batch 1), those still to build shared with this second process, instead of each
        segment when first run; ``also_build``: more jobs for the same list, after the parts (the
        worker starts from the back: e.g. the one artifact, built while this process builds the
        parts), their results (``None``: this process is to build it) in ``engine.also_built``."""
        self.plan, self.backend, self.target, self.precision = plan, backend, target, precision
        self.cache_root, self.model_name, self.input_size = Path(cache_root), model_name, input_size
        self.n_gates = len(plan.stages)
        self.parts: dict[str, Result] = {}
        self._segments: dict[tuple, object] = {}
        self._single: dict[tuple, object] = {}  # (stage, incoming choice, choice) -> its batch-1 engine
        self.also_built: list[Result | None] = [None] * len(also_build)
        head = ("head", plan.head, image_batch(batch_size, input_size))
        if worker is None or batch_size != 1 or precision != "fp32":  # built as first run, on what arrives
            self.head = self._compile(*head)
            return
        segments = [(k, key) for k, stage in enumerate(plan.stages) for key in stage]
        parts = [head] + [(plan.segment_name(k, key), plan.stages[k][key], self._check_example(k, key))
                          for k, key in segments]
        keys = [self._key(name, module, example) for name, module, example in parts]
        built = worker.claims([BuildJob.unless_built(backend, module, example, target, precision,
                                                     key.directory(self.cache_root))
                               for (_, module, example), key in zip(parts, keys)] + list(also_build))
        self.head = self._compile(*head, key=keys[0], built=built(0))
        for n, ((k, key), (name, module, example)) in enumerate(zip(segments, parts[1:]), 1):
            self._segments[(k, key, tuple(example.shape))] = self._compile(name, module, example, keys[n], built(n))
        self.also_built = [built(len(parts) + i) for i in range(len(also_build))]

    def _key(self, name: str, module, example) -> ArtifactKey:
        return ArtifactKey.of(self.model_name, name, self.backend, self.target, self.precision, example,
                              weights_fingerprint(module))

    def _compile(self, name: str, module, example, key: ArtifactKey | None = None, built: Result | None = None):
        shape = "x".join(map(str, example.shape))
        result = trial(self.backend, module, example, self.target, self.precision,
                       key or self._key(name, module, example), self.cache_root, built=built)
        self.parts[f"{name}@{shape}"] = result
        if not result.ok:
            raise PartError(name, result)
        return result.engine

    def _check_example(self, k: int, key: tuple, shape=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """What segment ``key`` of stage ``k`` is compiled and checked on: seeded data of its input's
        shape and dtype (``shape``, ``dtype``; default: those of one image's eager features) carrying
        the channel statistics of its eager input on the seeded image."""
        # Compiled and checked on seeded data, not on the features that first arrive: those may be
        # degenerate (a narrow slice of one image's features can be all zero after ReLU), which would
        # make the check against eager meaningless and the artifact depend on it. Channel statistics,
        # not standard normal data: that can drive a deep segment's activations so high that fp32
        # rounding alone fails a right engine (check_input_like).
        like = self.plan.features_into(k, key, image_batch(1, self.input_size))
        return check_input_like(like.shape if shape is None else shape, like, dtype)

    def segment(self, k: int, key: tuple, feats: torch.Tensor):
        """The compiled segment ``key`` of stage ``k`` for inputs shaped like ``feats``."""
        cache_key = (k, key, tuple(feats.shape))
        if cache_key not in self._segments:
            example = self._check_example(k, key, feats.shape, feats.dtype)
            self._segments[cache_key] = self._compile(self.plan.segment_name(k, key), self.plan.stages[k][key], example)
        return self._segments[cache_key]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamic inference: one image through the deployed path, a batch grouped by route."""
        if x.shape[0] == 1:
            return self.single(x)
        return dispatch_argmax(x, self.head, lambda k, key, f: self.segment(k, key, f)(f), self.n_gates)

    def single(self, x: torch.Tensor, route=None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`deployed` from and to torch: ``(logits, choices)``, choices shaped ``(1, gates)``."""
        raw, choices, last = self._deployed(self.head.prepare(x), route)
        logits = last.to_torch(raw)
        if last.sync:
            last.sync()
        return logits, torch.tensor([choices])

    def deployed(self, native, route=None):
        """The deployed path on the head's native input (``engine.head.prepare(x)``): the last
        part's native output and the choices. What the phases time (see the module docstring)."""
        return self._deployed(native, route)[:2]

    def _deployed(self, native, route):
        head = self.head
        raw = head.run(native)
        values, engine, prev, choices = head.outputs(raw), head, None, []
        for k in range(self.n_gates):
            c = engine.choice(values[1])
            if route is not None:
                c = int(route[k])
            part = self._single.get((k, prev, c))
            if part is None:  # first time through this segment: compiled (and checked) for this shape
                part = self._single[(k, prev, c)] = self.segment(k, (prev, c), _first(engine.to_torch(raw)))
            raw = part.run(values[0])
            values, engine, prev = part.outputs(raw), part, c
            choices.append(c)
        return raw, choices, engine

    def path(self, route, x: torch.Tensor) -> list:
        """The compiled batch-1 engines ``route`` runs through after the head (built before timing)."""
        self.single(x, route)
        out, prev = [], None
        for k, c in enumerate(route):
            out.append(self._single[(k, prev, int(c))])
            prev = int(c)
        return out


def _first(out):
    """The features of a part's torch output (a tuple of features and scores, or logits)."""
    return out[0] if isinstance(out, tuple) else out


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


def chain_parts(engine: DynamicEngine, route, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Timed callables for the head and each segment of ``route``, in chain order, each run as the
    deployed path runs it: on its upstream part's native output (``{segment name: fn}``). Timed in
    this order, each part's input is what the part before it just wrote."""
    path = engine.path(route, x)
    names = route_segment_names(route)
    head_in = engine.head.prepare(x)
    fns = {names[0]: lambda: engine.head.run(head_in)}
    upstream = engine.head
    value = upstream.outputs(upstream.run(head_in))[0]
    for k, part in enumerate(path):
        fns[names[k + 1]] = lambda part=part, value=value: part.run(value)
        if k + 1 < len(path):
            value = part.outputs(part.run(value))[0]
    return fns


def stream_routes(distribution: dict, length: int, seed: int = 0) -> list:
    """A stream of routes drawn from ``distribution`` ({route: probability})."""
    routes = list(distribution)
    p = np.asarray([distribution[r] for r in routes], dtype=float)
    if (p < 0).any() or not np.isclose(p.sum(), 1.0):
        raise ValueError(f"route probabilities must be >= 0 and sum to 1, got {p.tolist()}")
    idx = np.random.default_rng(seed).choice(len(routes), size=length, p=p)
    return [routes[i] for i in idx]


def cycling(call: Callable[[object], object], items: list) -> Callable[[], object]:
    """A zero-argument callable running ``call(item)`` on the next of ``items`` each time (a stream
    of routes, of images), round and round."""
    state = {"i": 0}

    def fn():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return call(item)

    return fn
