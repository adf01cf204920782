"""The dynamic engine phase: the compositional LUT, its accuracy, dispatch overhead, realized speed-up.

Contract
--------
``DynamicPhase(ctx, model_name, backend, precision, input_size, model=None)`` builds the supernet's
dynamic engine on one backend (every part through the pipeline: cached, checked against eager;
a part that fails raises :class:`harness.deploy.engine.PartError`, which :func:`run_dynamic`
records as an ``engine`` row and goes on). ``phase.run(progress, lut_only=False)`` measures what
the store lacks and stores each result at once (``dynamic`` table, kinds of
:data:`harness.results.layout.DYNAMIC_KINDS`):

1. ``segment``: every segment timed in context (one round phase over routes that together cover
   every segment, each chain's parts in chain order, one call per sample, a segment's samples
   pooled over the routes it appears in): the compositional LUT;
2. ``route`` / ``route_lut``: end to end per validated route against the same-run parts, and all
   validated routes end to end in the same rounds against the stored LUT, both relative to the
   largest route (the drift since the LUT was measured cancels);
3. ``stream``: a uniform route stream against the LUT's expectation;
4. ``acceleration``: the route mix of matched MAdds against the static x1.0 and x0.5 networks,
   interleaved (realized against ideal speed-up), when the model has a static counterpart;
5. ``one_graph`` / ``dispatcher``: on backends that hold the whole network as one artifact
   (``Backend.one_artifact``; :mod:`dsnet.one_graph`), per validated route, the one artifact and the
   Python dispatcher (``engine(x)``: head, argmax, grouping, segments) on an input crafted to take
   the route, beside the route's own static engine, all in the same rounds. ``predicted_ms`` is the
   static engine's p50: ``latency_ms_p50 - predicted_ms`` is the dispatch overhead (gate included).
   Plain calls, no CUDA graphs: a graph would freeze the route the artifact chose when captured.
"""

from __future__ import annotations

import json

import torch

import dsnet
from harness.backends.base import one_line
from harness.deploy.engine import (
    DynamicEngine,
    PartError,
    chain_parts,
    covering_routes,
    in_context,
    measure_acceleration,
    measure_dispatch,
    measure_stream,
)
from harness.deploy.lut import LatencyLUT, matched_distribution, route_segment_names
from harness.measure.pipeline import Result, check_output
from harness.measure.protocol import measure_interleaved, measure_rounds, paired_ratio, summarize
from harness.phases.context import RunContext
from harness.phases.static import reference_model
from harness.results.layout import DYNAMIC_KEY

STATIC_COUNTERPART = {"ds_mbnet": "mobilenet_v1", "ds_resnet50": "resnet50"}
E2E_ROUTES = 16  # routes validated end to end when a model has more


def validation_routes(routes: list) -> list:
    """All routes, or ``E2E_ROUTES`` spread over the MAdds order, smallest and largest included."""
    if len(routes) <= E2E_ROUTES:
        return list(routes)
    idx = sorted({round(i * (len(routes) - 1) / (E2E_ROUTES - 1)) for i in range(E2E_ROUTES)})
    return [routes[i] for i in idx]


class DynamicPhase:
    """Measures a supernet's dynamic engine on one backend; every result is stored at once."""

    def __init__(self, ctx: RunContext, model_name: str, backend: str, precision: str, input_size: int,
                 model=None):
        """``model``: the instance to deploy (default: ``model_name`` with seeded random weights)."""
        self.ctx, self.model_name, self.backend_name = ctx, model_name, backend
        self.precision, self.input_size = precision, input_size
        if model is None:
            model = reference_model(model_name)
        self.model = model.eval()
        self.plan = dsnet.split(self.model)
        self.engine = DynamicEngine(self.plan, ctx.backend(backend), ctx.target, precision, ctx.layout.cache_dir,
                                    input_size, model_name=model_name)
        self.x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
        self.done = ctx.store.dynamic_done()

    def steps(self) -> int:
        """Progress steps of :meth:`run` (segments, validated routes, stream, acceleration)."""
        return len(self.plan) + len(validation_routes(self.model.routes(self.input_size))) + 4

    def _key(self, kind, name):
        return (self.model_name, self.backend_name, self.precision, 1, self.input_size, kind, name)

    def _record(self, kind, name, stats=None, samples=None, measured_ms=None, predicted_ms=None, route="",
                madds=None, status="ok", error="", part: Result | None = None) -> None:
        """Store one result. ``measured_ms`` (default: p50) is what ``predicted_ms`` is compared with;
        ``part``: the pipeline result of the engine part the row times (compile time, details)."""
        row = dict(zip(DYNAMIC_KEY, self._key(kind, name)))
        row.update(route=route, madds=madds, status=status, error=error, run_id=self.ctx.run_id)
        if part is not None:
            row.update(compile_s=part.compile_s, backend_details=json.dumps(part.details, sort_keys=True))
        if stats is not None:
            row.update(latency_ms_p50=stats.p50, latency_ms_p90=stats.p90, latency_ms_mean=stats.mean,
                       latency_ms_std=stats.std, n=stats.n, latency_ms_p50_ci_low=stats.ci_low,
                       latency_ms_p50_ci_high=stats.ci_high, valid=int(stats.valid), samples_ms=samples)
            measured_ms = stats.p50 if measured_ms is None else measured_ms
        elif measured_ms is not None:  # a derived figure (e.g. dispatch): one value
            row.update(latency_ms_p50=measured_ms, n=1)
        if predicted_ms is not None:
            row.update(predicted_ms=predicted_ms, rel_error=(predicted_ms - measured_ms) / measured_ms)
        self.ctx.store.record_dynamic(row)

    def _part(self, name: str) -> Result | None:
        """The pipeline result of part ``name`` at batch 1 (None if not built)."""
        return next((r for k, r in self.engine.parts.items() if k.split("@")[0] == name), None)

    def run(self, progress=None, lut_only: bool = False) -> None:
        """Measure what the store lacks; ``lut_only``: the segments (the LUT) and nothing else."""
        protocol, timer = self.ctx.protocol, self.ctx.timer()
        # 1. every segment timed in context, in one round phase: each round runs the chains of routes
        #    that together cover every segment, each chain's parts in chain order; a segment's samples
        #    are pooled over the routes it appears in. Drift falls on every segment alike (one phase,
        #    not one per route), so the LUT's ratios hold. An interrupted phase is measured again.
        names = {n for route in self.model.routes(self.input_size) for n in route_segment_names(route)}
        if any(self._key("segment", n) not in self.done for n in names):
            self._segments_in_rounds(covering_routes(self.plan, self.model.routes(self.input_size)),
                                     protocol, timer, progress)
        if lut_only:
            return
        lut = LatencyLUT.from_frame(self.ctx.store.dynamic_frame(), self.model_name, self.backend_name,
                                    self.precision, 1, self.input_size)
        # 2. end to end per route, with the route's parts interleaved in the same run: "route" rows,
        #    the sum of the same-run parts against end to end (the composition itself)
        routes = validation_routes(self.model.routes(self.input_size))
        madds = {str(r): dsnet.profile(self.model, r, self.input_size).madds for r in routes}
        for route in routes:
            if self._key("route", str(route)) in self.done:
                continue
            d = measure_dispatch(self.engine, route, self.x, protocol, timer)
            e2e = d["end_to_end"]
            self._record("route", str(route), e2e.stats, e2e.samples_ms, predicted_ms=d["parts_ms"],
                         route=str(route), madds=madds[str(route)])
            if progress:
                progress(f"{self.model_name} {self.backend_name} route {route}",
                         f"{e2e.stats.p50:.3f} ms, parts {d['parts_ms']:.3f} ms, LUT {lut.latency(route):.3f} ms")
        # 2b. "route_lut": the stored LUT against every route end to end, all routes in the same rounds,
        #     both relative to the largest route, so the machine's drift since the LUT was measured
        #     cancels: predicted = LUT(r) / LUT(largest) x end-to-end(largest)
        if any(self._key("route_lut", str(r)) not in self.done for r in routes):
            self._lut_in_rounds(routes, lut, madds, protocol, timer)
        if progress:
            progress(f"{self.model_name} {self.backend_name} stored LUT vs end to end", f"{len(routes)} routes")
        # 3. a stream of routes (uniform over the validated routes) against the LUT's expectation
        uniform = {r: 1.0 / len(routes) for r in routes}
        if self._key("stream", "uniform") not in self.done:
            s = measure_stream(self.engine, uniform, {str(r): lut.latency(r) for r in routes}, self.x, protocol,
                               timer=timer)
            # a mix of routes: compare the mean with the expectation (the p50 of a mixture is not its mean)
            self._record("stream", "uniform", s["measured"], measured_ms=s["measured"].mean,
                         predicted_ms=s["predicted_ms"])
            if progress:
                progress(f"{self.model_name} {self.backend_name} stream", f"{s['measured'].mean:.3f} ms")
        # 4. realized against ideal acceleration, when the model has a static counterpart
        static = STATIC_COUNTERPART.get(self.model_name)
        if static and self._key("acceleration", "dynamic") not in self.done:
            self._acceleration(static, routes, timer, progress)
        # 5. the one artifact and the Python dispatcher against each route's static engine
        if self.ctx.backend(self.backend_name).one_artifact and \
                any(self._key(k, str(r)) not in self.done for r in routes for k in ("one_graph", "dispatcher")):
            self._one_artifact(routes, madds, timer, progress)

    def _segments_in_rounds(self, cover, protocol, timer, progress) -> None:
        fns, owner = {}, {}
        for i, route in enumerate(cover):
            for name, fn in chain_parts(self.engine, route, self.x).items():
                fns[f"{i}:{name}"], owner[f"{i}:{name}"] = fn, name
        res = measure_interleaved(fns, in_context(protocol), timer)
        self.ctx.store.record_drift(self.ctx.run_id, f"dynamic {self.model_name} {self.backend_name} segments",
                                    res.factors)
        samples: dict[str, list[float]] = {}
        for key, m in res.items():
            samples.setdefault(owner[key], []).extend(m.samples_ms)
        for name, s in samples.items():
            if self._key("segment", name) in self.done:
                continue
            stats = summarize(s, 1, protocol)
            self._record("segment", name, stats, s, part=self._part(name))
            if progress:
                progress(f"{self.model_name} {self.backend_name} segment {name}", f"{stats.p50:.3f} ms")

    def _lut_in_rounds(self, routes, lut, madds: dict, protocol, timer) -> None:
        self.engine.prepare_routes(routes, self.x)
        prepared = self.engine.head.prepare(self.x)
        fns = {str(r): (lambda r=r: self.engine.route_call(prepared, r)) for r in routes}
        res = measure_rounds(fns, in_context(protocol), timer, seed=3)
        self.ctx.store.record_drift(self.ctx.run_id, f"dynamic {self.model_name} {self.backend_name} routes",
                                    res.factors)
        ref = str(routes[-1])
        ref_ms, ref_lut = res[ref].stats.p50, lut.latency(routes[-1])
        for r in routes:
            m = res[str(r)]
            self._record("route_lut", str(r), m.stats, m.samples_ms, measured_ms=paired_ratio(m, res[ref]) * ref_ms,
                         predicted_ms=lut.latency(r) / ref_lut * ref_ms, route=str(r), madds=madds[str(r)])

    def _acceleration(self, static: str, routes, timer, progress) -> None:
        """The dynamic model at the route mix whose mean MAdds match the static x0.5 network, against
        static x1.0 (the paper's realized speed-up) and static x0.5 (the ideal one), interleaved."""
        engines, madds = {}, {}
        for label, w in (("largest", 1.0), ("matched", 0.5)):
            model = reference_model(static, width_mult=w)
            madds[label] = dsnet.profile(model, None, self.input_size).madds
            result = self.ctx.trial(static, f"x{w}", self.backend_name, self.precision, dsnet.materialize(model),
                                    self.x)
            if not result.ok:
                self._record("acceleration", "dynamic", status=result.status, error=f"{static} x{w}: {result.error}")
                return
            engines[label] = result.engine
        route_madds = {r: dsnet.profile(self.model, r, self.input_size).madds
                       for r in self.model.routes(self.input_size)}
        mix = matched_distribution(route_madds, madds["matched"])
        self.engine.prepare_routes(list(mix), self.x)
        res = measure_acceleration(self.engine, mix, engines["largest"], engines["matched"], self.x,
                                   self.ctx.protocol, timer=timer)
        self.ctx.store.record_drift(self.ctx.run_id, f"acceleration {self.model_name} {self.backend_name}",
                                    res["factors"])
        label = " + ".join(f"{p:.3f}*route {r}" for r, p in mix.items())
        mean_madds = sum(p * route_madds[r] for r, p in mix.items())
        self._record("acceleration", "largest", res["largest"], route=f"{static} x1.0", madds=madds["largest"])
        self._record("acceleration", "matched", res["matched"], route=f"{static} x0.5", madds=madds["matched"])
        self._record("acceleration", "dynamic", res["dynamic"], route=label, madds=mean_madds)
        if progress:
            progress(f"{self.model_name} {self.backend_name} acceleration",
                     f"realized {res['realized_speedup']:.2f}x, ideal {res['ideal_speedup']:.2f}x")

    def _one_artifact(self, routes, madds: dict, timer, progress) -> None:
        """Step 5 (module docstring): compile the one-graph network (cached, checked against eager on
        the example), craft an input per route, check the artifact takes the route and matches eager
        there, then time artifact, dispatcher and static engine of every route in one round phase."""
        from dsnet.one_graph import input_for_route, one_graph

        graph = one_graph(self.plan, self.x)
        artifact = self.ctx.trial(self.model_name, "one_graph", self.backend_name, self.precision, graph, self.x)
        fns = {}
        for r in routes:
            name, why = str(r), None
            if not artifact.ok:
                status, why = artifact.status, f"one artifact: {artifact.error}"
            else:
                status, why, xr, static = self._one_artifact_route(graph, artifact, r, input_for_route)
            if why:
                for kind in ("one_graph", "dispatcher"):
                    self._record(kind, name, route=name, madds=madds[name], status=status, error=why, part=artifact)
                continue
            one_in, static_in = artifact.engine.prepare(xr), static.engine.prepare(xr)
            fns[f"static {name}"] = lambda e=static.engine, i=static_in: e.run(i)
            fns[f"one_graph {name}"] = lambda e=artifact.engine, i=one_in: e.run(i)
            fns[f"dispatcher {name}"] = lambda xr=xr: self.engine(xr)
        if fns:
            res = measure_rounds(fns, self.ctx.protocol, timer, seed=4)
            self.ctx.store.record_drift(self.ctx.run_id, f"one artifact {self.model_name} {self.backend_name}",
                                        res.factors)
            for r in routes:
                name = str(r)
                if f"static {name}" not in fns:
                    continue
                static_ms = res[f"static {name}"].stats.p50
                for kind in ("one_graph", "dispatcher"):
                    m = res[f"{kind} {name}"]
                    self._record(kind, name, m.stats, m.samples_ms, predicted_ms=static_ms, route=name,
                                 madds=madds[name], part=artifact if kind == "one_graph" else None)
        if progress:
            ok = [r for r in routes if f"static {r}" in fns]
            progress(f"{self.model_name} {self.backend_name} one artifact",
                     f"{len(ok)}/{len(routes)} routes timed beside the dispatcher and static engines")

    def _one_artifact_route(self, graph, artifact: Result, route, input_for_route):
        """``(status, why, input, static result)`` for one route: why is None when it can be timed."""
        try:
            xr = input_for_route(self.plan, route, self.x)
        except ValueError as e:  # e.g. a choice the gate's scores never rank first
            return "measure_failed", f"{one_line(e)} (the gate may never choose it)", None, None
        with torch.no_grad():
            ref = graph(xr)
        out = artifact.engine(xr)
        taken = [int(c) for c in torch.as_tensor(out[1]).reshape(-1).tolist()]
        if taken != [int(c) for c in route]:
            return "check_failed", f"the one artifact took route {taken} on the input crafted for {route}", None, None
        problem = check_output(out, ref, self.precision)
        if problem:
            return "check_failed", f"one artifact on route {route}: {problem}", None, None
        static = self.ctx.trial(self.model_name, str(route), self.backend_name, self.precision,
                                dsnet.materialize(self.model, route), self.x)
        if not static.ok:
            return static.status, f"static engine of route {route}: {static.error}", None, None
        return "ok", None, xr, static


def record_engine_failure(ctx: RunContext, model: str, backend: str, precision: str, input_size: int,
                          error: PartError | Exception) -> None:
    """A dynamic engine that could not be built: one ``engine`` row with the failing part's status."""
    status = error.result.status if isinstance(error, PartError) else "compile_failed"
    ctx.store.record_dynamic({"model": model, "backend": backend, "precision": precision, "batch_size": 1,
                              "input_size": input_size, "kind": "engine", "name": "build", "status": status,
                              "error": one_line(error) if not isinstance(error, PartError) else str(error),
                              "run_id": ctx.run_id})


def run_dynamic(ctx: RunContext, model: str, backend: str, precision: str, input_size: int,
                progress_factory=None) -> None:
    """Measure one supernet's dynamic engine on one backend; a part that fails is recorded."""
    try:
        phase = DynamicPhase(ctx, model, backend, precision, input_size)
    except Exception as e:  # a part that does not compile or check: recorded, the run goes on
        record_engine_failure(ctx, model, backend, precision, input_size, e)
        return
    try:
        phase.run(progress_factory(phase.steps()) if progress_factory else None)
    except PartError as e:  # a segment built on demand
        record_engine_failure(ctx, model, backend, precision, input_size, e)
