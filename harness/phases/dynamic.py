"""The dynamic engine phase: the deployed network against its routes' static engines, its LUT and dispatch cost.

Contract
--------
``DynamicPhase(ctx, model_name, backend, precision, input_size, model=None, validate=E2E_ROUTES, worker=None)``
builds the supernet's dynamic engine on one backend (every part through the pipeline: cached,
checked against eager; with a :class:`~harness.measure.build_worker.BuildWorker`, every part and
the one artifact built up front alongside it, the worker starting with the one artifact; a part
that fails raises :class:`harness.deploy.engine.PartError`, which :func:`run_dynamic` records as an
``engine`` row and goes on). ``phase.run(progress, lut_only=False, measure=True, pooling=None)``
(``measure=False``: build and check only; ``pooling``: a :class:`Pooling`, this process's share of
rounds timed over several processes) measures, when the store lacks
any of its rows, everything in ONE round phase (:class:`~harness.measure.rounds.RoundPhase`), one call
per sample (parts of a chain are timed in context: a part repeated back to back keeps its weights
hot), so every figure below is compared with the others measured in the same rounds:

- per route of the priced routes (every route, or ``validate`` spread over them, :data:`E2E_ROUTES`
  by default and :data:`QUICK_E2E_ROUTES` for ``harness.run --quick``; with
  ``lut_only`` the few routes that cover every segment): its chain of parts in chain order, each part
  run as the deployed path runs it (:func:`~harness.deploy.engine.chain_parts`), and the deployed
  path forced to the route (:meth:`~harness.deploy.engine.DynamicEngine.deployed`: the gate's
  decision computed, then replaced by the route's);
- unless ``lut_only``: each route's own static engine (the route materialized and compiled whole, as
  the static sweep builds it); that engine and the deployed path forced to the route once more
  each, every sample right after an untimed call of its own (``primed``: their steady state, as a
  process serving that one network runs it, where every other entry is timed after whatever the
  round ran before it, caches holding little of its own: a cut network pays that at every part,
  ``benchmarks/cut_in_context.py``); the one artifact (backends with ``one_artifact``) on inputs crafted
  to take :data:`ONE_GRAPH_ROUTES` routes spread over the priced ones (where no input is found for
  some, on routes the gates take on seeded images instead, each beside its static engine), a uniform route stream
  through the deployed path, eight images at batch 8 and one by one (not on a backend whose CPU
  builds are fast only for tuned shapes, ``Backend.tuned_per_shape``), and, when the model has a
  static counterpart (``dsnet.static_counterpart``), that network at x1.0 and x0.5 beside the route
  mix of x0.5's MAdds run deployed and on the routes' static engines (Table 7's acceleration).

Before anything is timed the deployed path is checked: on the seeded image against the eager dynamic
forward (logits and choices), and forced to each route against the route's eager static network;
a route that fails is ``check_failed`` and never timed. Rows (``dynamic`` table, kinds of
:data:`harness.results.layout.DYNAMIC_KINDS`), stored when the rounds end:

- ``segment``: each part's samples pooled over the chains it ran in: the compositional LUT;
- ``dispatch`` (name ``per_decision``): the deployed path's cost beyond the sum of its parts, per
  gate decision: the median over the priced routes and rounds of (deployed - parts) / gates, with
  the median's 95% interval. The LUT prices a route as its segments plus gates x this cost, and
  counts it as zero when the interval holds zero. It may be negative: each part is timed as its own
  sample, and what ran just before a call moves its time (``benchmarks/cut_in_context.py``: hundreds
  of microseconds on DS-ResNet-50), so the parts' samples are not a floor under the deployed path;
  the LUT then subtracts it. A saving per decision larger than the cheapest part that follows a gate
  (:func:`dispatch_result`: that part would have run in negative time) is impossible: the phase's
  rounds are run once more (every row then comes from the second rounds, the dispatch row's details
  say ``remeasured`` and why), and a second impossible value is stored as ``measure_failed``
  (refused);
- ``route``: the deployed path per priced route; ``predicted_ms`` what the LUT prices it at
  (segments + dispatch), ``rel_error`` the LUT's error;
- ``static`` and ``deployed``: per route its static engine, and the deployed path with
  ``predicted_ms`` the static engine's p50 (the deployment's overhead, gate included); ``one_graph``
  likewise for the one artifact; ``static_steady`` and ``deployed_steady`` likewise in steady state;
- ``overhead`` (``deployed``, ``one_graph``): the deployment's cost over the routes' own static
  engines, pooled: every route's per-round difference (deployed - static), its median and interval;
  and ``one_graph_vs_deployed``, the one artifact minus the deployed path likewise on the routes both
  ran: which of the two to deploy (the run's summary names it when the interval excludes zero);
  ``mix``, Table 7's deployed route mix minus the same mix on the routes' static engines, and
  ``architecture``, that static mix minus the static counterpart at x0.5, each round by round (the
  two shares of the acceleration's loss with their intervals); and ``split``, each priced
  route's chain of parts (the sum of its parts' samples in a round) minus its static engine
  likewise: what cutting the network at its gates costs before any dispatch (the deployed path's
  overhead is about this plus gates x ``dispatch``); and ``deployed_steady``, ``deployed_steady``
  minus ``static_steady`` likewise: the deployment's cost where the network is all the process runs;
- ``stream`` (``uniform``): a uniform stream of the priced routes through the deployed path, 16 calls
  a sample (a sample's mean is the stream's), against the LUT's mean;
- ``batch``: ``8`` (batch_size 8, one call for eight images, grouped by route) and ``1x8`` (the same
  eight images one by one through the deployed path), ``predicted_ms`` the LUT's sum for them;
- ``acceleration``: ``largest`` / ``matched`` (static x1.0 / x0.5), ``dynamic`` (the deployed route
  mix) and ``static_mix`` (the same mix on the routes' static engines): realized against ideal
  speed-up, split into the architecture's share (static mix over x0.5) and the deployment's (dynamic
  over static mix). The mixes run 16 calls a sample, so the median of samples estimates their mean.

Plain calls, no CUDA graphs: a graph would freeze the route chosen when captured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import dsnet
from dsnet.one_graph import input_for_route, one_graph
from harness import interrupts
from harness.backends.base import one_line
from harness.deploy.engine import (
    DynamicEngine,
    PartError,
    chain_parts,
    covering_routes,
    cycling,
    stream_routes,
)
from harness.deploy.lut import DISPATCH_NAME, LatencyLUT, dispatch_cost, matched_distribution, route_segment_names
from harness.measure.build_worker import BuildWorker
from harness.measure.pipeline import Result, check_output, image_batch, reference, weights_fingerprint
from harness.measure.protocol import Measurement, Protocol
from harness.phases.context import RunContext
from harness.phases.static import reference_model
from harness.results.layout import (
    ARCHITECTURE,
    DYNAMIC_KEY,
    IDEAL,
    MIX,
    ONE_GRAPH_VS_DEPLOYED,
    REALIZED,
    SPLIT,
    STEADY,
)
from harness.results.store import write_atomically

E2E_ROUTES = 16  # routes validated end to end when a model has more
QUICK_E2E_ROUTES = 3  # --quick: smallest, middle and largest, as its static sweep
BATCH = 8  # the batched path is measured on this many images
STREAM_CHUNK = 16  # calls per sample of a route stream: a sample's mean is the stream's, its median robust
ACCELERATION_WIDTHS = {"largest": 1.0, "matched": 0.5}  # Table 7: the static counterpart's widths built
ONE_GRAPH_ROUTES = 4  # routes the one artifact is timed on (inputs crafted by gradient steps: costly at 224 px)
NATURAL_PROBES = 16  # seeded images whose routes stand in for routes no crafted input takes


# inputs that take a route, or why none (DynamicPhase._crafted): the reason as text, not the exception,
# whose traceback would keep the phase that searched (its engines, gigabytes) alive for the whole run
_CRAFTED: dict[tuple, torch.Tensor | str] = {}


def _route_taken(plan, x: torch.Tensor) -> tuple:
    """The route the eager plan's gates send the one image ``x`` down."""
    with torch.no_grad():
        return tuple(int(c) for c in plan(x)[1][0].tolist())


def _load_array(path: Path, shape: tuple) -> torch.Tensor | None:
    """A float32 array of ``shape`` stored at ``path`` (no pickle), or None when absent or unfit."""
    try:
        a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if a.dtype != np.float32 or a.shape != shape or not np.isfinite(a).all():
        return None
    return torch.from_numpy(a)


def _save_array(path: Path, x: torch.Tensor) -> None:
    """``x`` stored at ``path`` whole or not at all (a rename: an interrupted write leaves nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, x.detach().cpu().numpy().astype(np.float32), allow_pickle=False)

    write_atomically(path, write)


def dynamic_steps(protocol: Protocol) -> int:
    """Progress steps of a dynamic phase: the checks, then the rounds."""
    return 1 + protocol.repeat


def spread(routes: list, n: int) -> list:
    """All routes, or ``n`` spread over their order, the first and the last included."""
    if len(routes) <= n:
        return list(routes)
    idx = sorted({round(i * (len(routes) - 1) / (n - 1)) for i in range(n)})
    return [routes[i] for i in idx]


def validation_routes(routes: list, n: int = E2E_ROUTES) -> list:
    """All routes, or ``n`` spread over the MAdds order, smallest and largest included."""
    return spread(routes, n)


def in_context(protocol: Protocol) -> Protocol:
    """One call per sample: parts timed in chain order see the caches as deployment does (a part
    repeated back to back keeps its own weights hot and reads too fast). Validity then rests on the
    median's interval alone: single calls of a few ms never add up to ``min_measured_ms``."""
    return protocol.replace(min_repeat_ms=0, min_measured_ms=0)


def chain_by_round(parts: list[Measurement]) -> dict:
    """The sum of a chain's parts in every round where all of them were timed: ``{round: ms}``."""
    by_round = [dict(zip(m.rounds or [], m.samples_ms)) for m in parts]
    return {r: sum(b[r] for b in by_round) for r in (by_round[0] if by_round else {}) if all(r in b for b in by_round)}


def dispatch_estimate(deployed: Measurement, parts: list[Measurement], gates: int) -> list[float]:
    """Per gate decision, what the deployed path costs beyond its parts: ``(deployed - sum of
    parts) / gates`` in every round where all were timed (paired: the round's drift cancels)."""
    chain = chain_by_round(parts)
    return [(s - chain[r]) / gates for r, s in zip(deployed.rounds or [], deployed.samples_ms) if r in chain]


def split_differences(parts: list[Measurement], static: Measurement) -> list[float]:
    """What cutting a route at its gates costs before any dispatch: the sum of the route's parts
    minus its static engine, in every round where all were timed (paired)."""
    chain = chain_by_round(parts)
    return [chain[r] - s for r, s in zip(static.rounds or [], static.samples_ms) if r in chain]


def paired_differences(m: Measurement, ref: Measurement) -> list[float]:
    """``m``'s sample minus ``ref``'s in every round both were timed in (the round's drift cancels)."""
    by_round = dict(zip(ref.rounds or [], ref.samples_ms))
    return [s - by_round[r] for r, s in zip(m.rounds or [], m.samples_ms) if r in by_round]


def dispatch_result(diffs: list[float], protocol: Protocol, cheapest_part_ms: float) -> Result:
    """The ``dispatch`` row's result from the per-decision differences (:func:`dispatch_estimate`):
    their statistics, signed, or ``measure_failed`` when there are none or the interval lies wholly
    below ``-cheapest_part_ms`` (the median of the cheapest part that follows a gate: a deployed path
    that saved more per decision would have run that part in negative time; impossible, refused)."""
    if not diffs:
        return Result("measure_failed", "no route's deployed path was timed")
    m = Measurement(diffs, 1, None, protocol)
    s = m.stats
    if s.ci_high < -cheapest_part_ms:
        return Result("measure_failed", f"impossible: the deployed path ran {-s.p50 * 1e3:.0f} us per decision faster "
                                        f"than the sum of its parts (interval {s.ci_low * 1e3:.0f}.."
                                        f"{s.ci_high * 1e3:.0f} us), more than its cheapest part after a gate "
                                        f"takes ({cheapest_part_ms * 1e3:.0f} us); refused", measurement=m)
    return Result("ok", measurement=m)


@dataclass
class Pooling:
    """One phase's rounds timed over ``processes`` processes, one after the other
    (:mod:`harness.phases.fresh`): ``earlier``, the measurements of the processes before this one
    (``{key: Measurement}``), pooled into this one's rounds; ``last``: this process stores the rows,
    otherwise it stores nothing and leaves its pooled measurements in ``measured``."""

    processes: int = 1
    earlier: dict | None = None
    last: bool = True
    measured: dict | None = None


class DynamicPhase:
    """Measures a supernet's dynamic engine on one backend; see the module docstring."""

    def __init__(self, ctx: RunContext, model_name: str, backend: str, precision: str, input_size: int,
                 model=None, validate: int = E2E_ROUTES, worker: BuildWorker | None = None):
        """``model``: the instance to deploy (default: ``model_name`` with the harness's reference weights);
        ``validate``: how many routes are validated end to end (see the module docstring); ``worker``:
        a second process that builds parts alongside this one (``DynamicEngine``'s)."""
        self.ctx, self.model_name, self.backend_name, self.validate = ctx, model_name, backend, validate
        self.precision, self.input_size, self.worker = precision, input_size, worker
        if model is None:
            model = reference_model(model_name)
        self.model = model.eval()
        self.plan = dsnet.split(self.model)
        self.x = image_batch(1, input_size)
        # the one artifact, when there is one to build, goes to the worker first (the back of its list)
        one = [ctx.build_job(*self._one_artifact_trial)] \
            if worker is not None and ctx.backend(backend).one_artifact else []
        self.engine = DynamicEngine(self.plan, ctx.backend(backend), ctx.target, precision, ctx.layout.cache_dir,
                                    input_size, model_name=model_name, worker=worker, also_build=one)
        self._one_built = self.engine.also_built[0] if one else None
        self.gates = self.engine.n_gates
        self.routes = self.model.routes(input_size)
        self.madds = {str(r): dsnet.profile(self.model, r, input_size).madds for r in self.routes}

    @functools.cached_property
    def _fingerprint(self) -> str:
        """The plan's weights' fingerprint (a hash of every weight: computed once)."""
        return weights_fingerprint(self.plan)

    def steps(self) -> int:
        """Progress steps of :meth:`run` (:func:`dynamic_steps`)."""
        return dynamic_steps(self.ctx.protocol)

    def _key(self, kind: str, name: str, batch: int = 1) -> tuple:
        return (self.model_name, self.backend_name, self.precision, batch, self.input_size, kind, name)

    def _record(self, kind: str, name: str, result: Result, predicted_ms: float | None = None,
                measured_ms: float | None = None, route: str = "", madds=None, batch: int = 1) -> None:
        """Store one row: ``result``'s status, error, details and statistics; ``predicted_ms`` set
        against ``measured_ms`` (default: its p50; a stream's mean)."""
        row = dict(zip(DYNAMIC_KEY, self._key(kind, name, batch)))
        row.update(route=route, madds=madds, run_id=self.ctx.run_id, **result.row())
        if result.measurement is not None and predicted_ms is not None:
            measured = result.measurement.stats.p50 if measured_ms is None else measured_ms
            row.update(predicted_ms=predicted_ms, rel_error=(predicted_ms - measured) / measured)
        self.ctx.store.record_dynamic(row)

    def _engine_ok(self, processes: int = 1) -> Result:
        """The ``engine`` row of an engine built and checked, saying which processes timed it."""
        where = "the run's process" if not self.ctx.fresh else "a fresh process" if processes == 1 \
            else f"{processes} fresh processes, one after the other, their rounds pooled"
        return Result("ok", details={"timed_in": where})

    def _part(self, name: str) -> Result:
        """The pipeline result of part ``name`` at batch 1 (compile time and details of its rows)."""
        return next((r for k, r in self.engine.parts.items() if k.split("@")[0] == name), Result("ok"))

    def wanted(self, lut_only: bool) -> list[tuple]:
        """The keys this phase stores (a re-run measures again when any is missing)."""
        names = {n for r in self.routes for n in route_segment_names(r)}
        keys = [self._key("segment", n) for n in names] + [self._key("dispatch", DISPATCH_NAME)]
        if not lut_only:
            keys += [self._key(k, str(r)) for r in validation_routes(self.routes, self.validate)
                     for k in ("route", "deployed", "deployed_steady")]
        return keys

    def run(self, progress=None, lut_only: bool = False, measure: bool = True, pooling: Pooling | None = None) -> bool:
        """Measure what the store lacks (see the module docstring); returns whether it lacked any.
        ``measure=False``: build, load and check everything the rounds would time, time nothing and
        store nothing (a fresh process then finds every artifact cached, :mod:`harness.phases.fresh`).
        ``pooling``: these rounds are one process's share of the phase's (see :class:`Pooling`)."""
        pooling = pooling or Pooling()
        done = self.ctx.store.dynamic_done()
        if all(k in done for k in self.wanted(lut_only)):
            if self.ctx.store.dynamic_status(self._key("engine", "build")) not in (None, "ok"):
                # an earlier run's failed build, measured since: this process built and checked it again
                self._record("engine", "build", Result("ok"))
            return False
        priced = covering_routes(self.plan, self.routes) if lut_only else validation_routes(self.routes, self.validate)
        chained = list(dict.fromkeys([*covering_routes(self.plan, self.routes), *priced]))
        phase = self.ctx.round_phase(f"dynamic {self.model_name} {self.backend_name} {self.precision}", seed=3,
                                     protocol=in_context(self.ctx.protocol))
        self._check_natural()
        for i, route in enumerate(chained):  # the LUT's parts, each in its chain
            keys = []
            for name, fn in chain_parts(self.engine, route, self.x).items():
                phase.add(("part", i, name), self._part(name), lambda r, fn=fn: (fn, r))
                keys.append(("part", i, name))
            phase.group(keys)
        head_in = self.engine.head.prepare(self.x)
        failed = {}
        for route in priced:
            name = str(route)
            result = self._check_forced(route)
            result = phase.add(("deployed", name), result,
                               lambda r, route=route: (lambda: self.engine.deployed(head_in, route), r))
            if not result.ok:
                failed[name] = result
        if not lut_only and hasattr(progress, "note"):
            progress.note(f"loading or building {len(priced)} routes' static engines"
                          + (" and the one artifact" if self.ctx.backend(
                              self.backend_name).one_artifact else ""))
        extra = {} if lut_only else self._enter_comparisons(phase, priced, head_in)
        if progress:
            progress(f"{self.model_name} {self.backend_name} checked", f"{len(phase)} engines")
        if not measure:
            return True
        label = f"{self.model_name} {self.backend_name}"
        on_round = (lambda d, n: progress(f"{label} round {d}/{n}", f"{len(phase)} engines")) if progress else None
        results = phase.measure(on_round, pooling.earlier)
        if not pooling.last:  # a share of the rounds: handed on to the next process, nothing stored
            pooling.measured = phase.rounds.measurements if phase.rounds is not None else None
            return True
        dispatch = self._dispatch(results, chained, priced, phase.protocol)
        if dispatch.status == "measure_failed" and dispatch.measurement is not None:  # impossible: again, once
            first = dispatch.error
            if progress:
                progress(f"{label}: {first.split(';')[0]}", "re-measuring once")
            results = phase.measure(on_round, pooling.earlier)
            dispatch = self._dispatch(results, chained, priced, phase.protocol)
            dispatch = dispatch.replace(details={**dispatch.details, "remeasured": f"the first rounds gave: {first}"})
        self._store(phase, results, chained, priced, failed, extra, lut_only, dispatch, pooling.processes)
        return True

    # -- checks -----------------------------------------------------------------------------------
    def _check_natural(self) -> None:
        """The deployed path on the seeded image equals the eager dynamic forward (logits and
        choices); a mismatch fails the whole engine (:class:`PartError`)."""
        with torch.no_grad():
            ref_logits, ref_choices = self.plan(self.x)
        logits, choices = self.engine.single(self.x)
        problem = check_output(logits, ref_logits, self.precision)
        if problem is None and not torch.equal(choices, ref_choices.cpu()):
            problem = f"the deployed path chose {choices.tolist()}, eager {ref_choices.tolist()}"
        if problem:
            raise PartError("deployed path", Result("check_failed", problem))

    def _check_forced(self, route) -> Result:
        """The deployed path forced to ``route`` against the route's eager static network."""
        static = dsnet.materialize(self.model, route)
        try:
            logits, _ = self.engine.single(self.x, route)
            problem = check_output(logits, reference(static, self.x), self.precision)
        except PartError as e:
            return e.result
        except Exception as e:
            problem = f"the deployed path raised: {one_line(e)}"
        if problem:
            return Result("check_failed", f"route {route}: {problem}")
        return Result("ok")

    # -- the comparisons (not lut_only) ----------------------------------------------------------------
    def _static(self, route):
        return self._trial(self.model_name, str(route), dsnet.materialize(self.model, route))

    def _trial(self, model_name: str, route: str, module):
        """``ctx.trial`` of a static engine the phase times beside the deployed path; one still to build
        on a backend that builds apart is built in a build worker's process (``BuildWorker.build``)."""
        args = (model_name, route, self.backend_name, self.precision, module, self.x)
        built = None
        if self.worker is not None and self.ctx.backend(self.backend_name).build_apart:
            job = self.ctx.build_job(*args)
            built = self.worker.build(job) if job is not None and job.apart else None
        return self.ctx.trial(*args, built=built)

    def _enter_static(self, phase, route, extra) -> Result:
        """Time ``route``'s own static engine in the phase's rounds, or keep its failure for its row;
        returns its result."""
        result = phase.add(("static", str(route)), self._static(route),
                           self.ctx.timing(self.backend_name, self.x, graphs=False))
        if not result.ok:
            extra["failed"][("static", str(route))] = result
        return result

    def _enter_steady(self, phase, route, static: Result, head_in) -> None:
        """``route``'s static engine and the deployed path forced to it, each sample right after an
        untimed call of its own (``primed``): the steady state of a process serving one network,
        beside the same engines timed after whatever the round ran before them."""
        name = str(route)
        if static.ok and ("deployed", name) in phase:
            phase.add(("static_steady", name), static, self.ctx.timing(self.backend_name, self.x, graphs=False),
                      primed=True)
            phase.add_call(("deployed_steady", name), lambda: self.engine.deployed(head_in, route), primed=True)

    def _enter_comparisons(self, phase, priced, head_in) -> dict:
        """Enter static engines, the one artifact, the stream, batch 8 and the acceleration; returns
        what :meth:`_store` needs of them (failures to store, the batch's routes, the mix)."""
        extra = {"failed": {}}
        for route in priced:
            self._enter_steady(phase, route, self._enter_static(phase, route, extra), head_in)
        if self.ctx.backend(self.backend_name).one_artifact:
            self._enter_one_artifact(phase, priced, extra)
        uniform = stream_routes({r: 1.0 / len(priced) for r in priced}, 256)
        phase.add_call(("stream", "uniform"), cycling(lambda r: self.engine.deployed(head_in, r), uniform),
                       number=STREAM_CHUNK)
        backend = self.ctx.backend(self.backend_name)
        if not (backend.tuned_per_shape and self.ctx.target.device == "cpu"):
            self._enter_batch(phase, extra)
        static_name = dsnet.static_counterpart(self.model_name)
        if static_name:
            self._enter_acceleration(phase, static_name, head_in, extra)
        return extra

    @functools.cached_property
    def _one_graph(self):
        return one_graph(self.plan, self.x)

    @functools.cached_property
    def _one_artifact_trial(self) -> tuple:
        """``(model, route, backend, precision, module, example, weights)`` of the one artifact's trial
        (its weights hashed once: DS-ResNet-50's hold 1 GiB)."""
        graph = self._one_graph
        return (self.model_name, "one_graph", self.backend_name, self.precision, graph, self.x,
                weights_fingerprint(graph))

    def _enter_one_artifact(self, phase, priced, extra) -> None:
        """The one-graph network (:mod:`dsnet.one_graph`) compiled once, per route on an input
        crafted to take it, checked to take the route and to match eager there. When an input is
        found for fewer than all of those routes (gates at the reference weights rank some choices
        first for no input: DS-ResNet's), the routes the gates take on seeded images make up the
        number (:meth:`_natural_routes`), each beside its own static engine (``extra["natural"]``
        lists those not priced), so the artifact is timed on one route at least."""
        graph = self._one_graph
        *args, weights = self._one_artifact_trial
        artifact = self.ctx.trial(*args, weights=weights, built=self._one_built)
        extra["one_graph"] = artifact
        targets = spread(priced, ONE_GRAPH_ROUTES)
        timed = []
        for route in targets:
            result = artifact
            if artifact.ok:
                try:
                    xr = self._crafted(route)
                except ValueError as e:  # e.g. a choice the gate's scores never rank first
                    result = artifact.replace(status="measure_failed",
                                              error=f"{one_line(e)} (the gate may never choose it)")
                else:
                    result = self._check_one_artifact(graph, artifact, route, xr)
            if self._enter_one_route(phase, artifact, route, result, xr if result.ok else None, extra):
                timed.append(route)
        if not artifact.ok or len(timed) >= len(targets):
            return
        for route, image in self._natural_routes():  # the gates' own routes, up to as many as were sought
            if len(timed) >= len(targets):
                break
            if route in timed:
                continue
            if route not in priced:  # its static engine, in the same rounds
                self._enter_static(phase, route, extra)
                extra.setdefault("natural", []).append(route)
            extra["failed"].pop(("one_graph", str(route)), None)  # no crafted input for it: this image takes it
            if self._enter_one_route(phase, artifact, route, self._check_one_artifact(graph, artifact, route, image),
                                     image, extra):
                timed.append(route)

    def _natural_routes(self):
        """Yields ``(route, image)`` for each distinct route the gates take on seeded images, in the order
        found: the phase's own image, then standard normal images of seeds 1... Not scaled up:
        DS-ResNet-50's later gates move at 2-4x the scale, but its activations then grow until fp32
        rounding alone fails the one artifact's check (tried: max abs diff 1.5 and 2.9e3)."""
        found = set()
        for i in range(NATURAL_PROBES):
            x = self.x if i == 0 else torch.randn(self.x.shape, generator=torch.Generator().manual_seed(i))
            taken = _route_taken(self.plan, x)
            route = next((r for r in self.routes if tuple(int(c) for c in r) == taken), None)
            if route is not None and route not in found:
                found.add(route)
                yield route, x

    def _enter_one_route(self, phase, artifact: Result, route, result: Result, xr, extra) -> bool:
        """Time the one artifact on ``route`` (input ``xr``) when ``result`` is ok, else keep the
        failure for its row; returns whether it is timed."""
        if not result.ok:
            extra["failed"][("one_graph", str(route))] = result
            return False
        native = artifact.engine.prepare(xr)
        phase.add(("one_graph", str(route)), result, lambda r, e=artifact.engine, i=native: (lambda: e.run(i), r))
        return True

    def _crafted(self, route, search=None) -> torch.Tensor:
        """An input the plan's gates send down ``route``, found once per model, weights, size and
        route (every backend of the run reuses it) and kept in the cache folder for later runs (a
        ``.npy`` array, loaded without pickle; used only when the eager plan still takes ``route``
        on it, else found again: a stale or planted file costs the search, never a wrong row). A
        search that fails is remembered too (a ``.unreachable`` text file beside it, holding the
        error): raised again without searching, until the file is deleted."""
        route = tuple(int(c) for c in route)
        fingerprint = self._fingerprint
        # per cache folder too: what one folder's run found is written into that folder, so a process
        # that times from it (harness.phases.fresh) finds it there rather than searching again
        key = (str(self.ctx.layout.cache_dir), self.model_name, fingerprint, self.input_size, route)
        if key not in _CRAFTED:
            path = self.ctx.layout.cache_dir / "crafted" / (
                f"{self.model_name}-{fingerprint[:16]}-{self.input_size}-{'_'.join(map(str, route))}.npy")
            failed = path.with_suffix(".unreachable")
            x = _load_array(path, tuple(self.x.shape))
            if x is None or _route_taken(self.plan, x) != route:
                if failed.is_file():
                    _CRAFTED[key] = (f"{failed.read_text(errors='replace').strip()[:300]} (an earlier run's "
                                     f"search; delete cache/crafted/{failed.name} to search again)")
                else:
                    try:
                        x = (search or input_for_route)(self.plan, route, self.x)
                    except ValueError as e:
                        _CRAFTED[key] = why = str(e)
                        failed.parent.mkdir(parents=True, exist_ok=True)
                        write_atomically(failed, lambda tmp: Path(tmp).write_text(why + "\n"))
                    else:
                        _save_array(path, x)
            _CRAFTED.setdefault(key, x)
        found = _CRAFTED[key]
        if isinstance(found, str):
            raise ValueError(found)
        return found

    def _check_one_artifact(self, graph, artifact: Result, route, xr) -> Result:
        with torch.no_grad():
            ref = graph(xr)
        try:
            out = artifact.engine(xr)
        except Exception as e:  # an engine that raises on this input: its rows say so, the run goes on
            return artifact.replace(status="check_failed", error=f"one artifact on route {route} raised: {one_line(e)}")
        taken = [int(c) for c in torch.as_tensor(out[1]).reshape(-1).tolist()]
        if taken != [int(c) for c in route]:
            return artifact.replace(status="check_failed",
                                    error=f"the one artifact took route {taken} on the input crafted for {route}")
        problem = check_output(out, ref, self.precision)
        if problem:
            return artifact.replace(status="check_failed", error=f"one artifact on route {route}: {problem}")
        return artifact

    def _enter_batch(self, phase, extra) -> None:
        """Eight seeded images: at batch 8 through the grouped path (an engine whose head takes
        eight), and one by one through the deployed path; checked against the eager forward."""
        images = torch.randn(BATCH, 3, self.input_size, self.input_size, generator=torch.Generator().manual_seed(8))
        try:
            batched = DynamicEngine(self.plan, self.ctx.backend(self.backend_name), self.ctx.target, self.precision,
                                    self.ctx.layout.cache_dir, self.input_size, batch_size=BATCH,
                                    model_name=self.model_name)
            with torch.no_grad():
                ref_logits, ref_choices = self.plan(images)
            logits, choices = batched(images)
            problem = check_output(logits, ref_logits, self.precision)
            if problem is None and not torch.equal(choices.cpu(), ref_choices.cpu()):
                problem = f"batch {BATCH} chose {choices.tolist()}, eager {ref_choices.tolist()}"
        except PartError as e:
            extra["failed"][("batch", str(BATCH))] = e.result
            return
        if problem:
            extra["failed"][("batch", str(BATCH))] = Result("check_failed", problem)
            return
        extra["batch_routes"] = [tuple(int(c) for c in row) for row in ref_choices.tolist()]
        one = [self.engine.head.prepare(images[i:i + 1]) for i in range(BATCH)]
        for native in one:
            self.engine.deployed(native)  # compile every segment the images reach before timing
        phase.add_call(("batch", str(BATCH)), lambda: batched(images))
        phase.add_call(("batch", f"1x{BATCH}"), lambda: [self.engine.deployed(n) for n in one])

    def _enter_acceleration(self, phase, static_name: str, head_in, extra) -> None:
        engines, madds = {}, {}
        for label, w in ACCELERATION_WIDTHS.items():
            model = reference_model(static_name, width_mult=w)
            madds[label] = dsnet.profile(model, None, self.input_size).madds
            result = phase.add(("acceleration", label), self._trial(static_name, f"x{w}", dsnet.materialize(model)),
                               self.ctx.timing(self.backend_name, self.x, graphs=False))
            if not result.ok:
                extra["failed"][("acceleration", "dynamic")] = result.replace(
                    error=f"{static_name} x{w}: {result.error}")
                return
            engines[label] = result.engine
        try:
            mix = matched_distribution({r: self.madds[str(r)] for r in self.routes}, madds["matched"])
        except ValueError as e:  # e.g. at a small input the fixed layers weigh more than x0.5's whole network
            extra["failed"][("acceleration", "dynamic")] = Result("measure_failed", f"{static_name} x0.5: {e}")
            return
        statics = {}
        for r in mix:
            result = self._static(r)
            if not result.ok:
                extra["failed"][("acceleration", "dynamic")] = result.replace(error=f"route {r}: {result.error}")
                return
            statics[r] = (result.engine, result.engine.prepare(self.x))
        stream = stream_routes(mix, 256)
        phase.add_call(("acceleration", "dynamic"), cycling(lambda r: self.engine.deployed(head_in, r), stream),
                       number=STREAM_CHUNK)
        phase.add_call(("acceleration", "static_mix"), cycling(lambda r: statics[r][0].run(statics[r][1]), stream),
                       number=STREAM_CHUNK)
        extra["acceleration"] = {"mix": mix, "madds": madds, "static": static_name}

    # -- rows ------------------------------------------------------------------------------------------
    def _dispatch(self, results, chained, priced, protocol) -> Result:
        """The dispatch per decision (:func:`dispatch_result`), paired by round with each priced
        route's own chain."""
        diffs, after_gates = [], []
        for route in priced:
            parts, deployed = self._chain(results, chained, route), results.get(("deployed", str(route)))
            if parts and deployed is not None and deployed.measurement is not None:
                diffs += dispatch_estimate(deployed.measurement, parts, self.gates)
                after_gates += [m.stats.p50 for m in parts[1:]]
        return dispatch_result(diffs, protocol, min(after_gates, default=0.0))

    @staticmethod
    def _chain(results, chained, route) -> list[Measurement] | None:
        """The measurements of ``route``'s own chain of parts, or None where a part has none."""
        i = chained.index(route)
        parts = [results[("part", i, n)].measurement for n in route_segment_names(route)]
        return parts if all(m is not None for m in parts) else None

    def _store(self, phase, results, chained, priced, failed, extra, lut_only, dispatch: Result,
               processes: int = 1) -> None:
        rounds = phase.rounds
        failure = next((r for r in results.values() if not r.ok), None) if rounds is None else None
        # segments: each part's samples pooled over the chains it ran in
        pooled: dict[str, list] = {}
        for (kind, *rest), r in results.items():
            if kind == "part" and r.ok:
                pooled.setdefault(rest[1], [[], []])
                pooled[rest[1]][0].extend(r.measurement.samples_ms)
                pooled[rest[1]][1].extend(r.measurement.rounds)
        segment_ms = {}
        for name, (samples, rnds) in pooled.items():
            m = Measurement(samples, 1, rnds, phase.protocol)
            segment_ms[name] = m.stats.p50
            self._record("segment", name, self._part(name).replace(measurement=m))
        # the engine was built and checked: an earlier run's failed build of it no longer stands
        self._record("engine", "build", self._engine_ok(processes))
        if failure is not None:  # the rounds themselves failed: every row says so
            for route in priced:
                self._record("route", str(route), failure, route=str(route), madds=self.madds[str(route)])
            return
        self._record("dispatch", DISPATCH_NAME, dispatch)
        dispatch_ms = dispatch_cost(dispatch.row())[0]
        lut = LatencyLUT(self.model_name, self.backend_name, self.precision, 1, self.input_size, segment_ms, {},
                         dispatch_ms)
        for route in priced:
            name = str(route)
            res = results.get(("deployed", name), failed.get(name))
            self._record("route", name, res, predicted_ms=lut.latency(route) if res.ok else None, route=name,
                         madds=self.madds[name])
        if lut_only:
            return
        for (kind, name), res in extra["failed"].items():
            self._record(kind, name, res, route=name if kind in ("static", "one_graph") else "",
                         madds=self.madds.get(name), batch=BATCH if kind == "batch" and name == str(BATCH) else 1)
        compared = [*priced, *extra.get("natural", [])]  # the one artifact's natural route: no deployed row
        for route in compared:
            name = str(route)
            static = results.get(("static", name))
            static_ms = static.measurement.stats.p50 if static is not None and static.ok else None
            if static is not None:
                self._record("static", name, static, route=name, madds=self.madds[name])
            dep = results.get(("deployed", name), failed.get(name))
            if dep is not None:
                self._record("deployed", name, dep, predicted_ms=static_ms, route=name, madds=self.madds[name])
            if ("one_graph", name) in results:
                self._record("one_graph", name, results[("one_graph", name)], predicted_ms=static_ms, route=name,
                             madds=self.madds[name])
            steady = results.get(("static_steady", name))
            if steady is not None and ("deployed_steady", name) in results:
                self._record("static_steady", name, steady, route=name, madds=self.madds[name])
                self._record("deployed_steady", name, results[("deployed_steady", name)],
                             predicted_ms=steady.measurement.stats.p50 if steady.ok else None, route=name,
                             madds=self.madds[name])
        self._record("stream", "uniform", results[("stream", "uniform")],
                     predicted_ms=float(np.mean([lut.latency(r) for r in priced])))
        def pooled(kind, ref):  # per-round differences kind - ref, pooled over the routes both ran
            return [d for route in compared if (kind, str(route)) in results and (ref, str(route)) in results
                    for d in paired_differences(results[(kind, str(route))].measurement,
                                                results[(ref, str(route))].measurement)]

        def paired_row(name, diffs):  # an overhead row of per-round differences (none without any)
            if diffs:
                self._record("overhead", name, Result("ok", measurement=Measurement(diffs, 1, None, phase.protocol)))

        # each deployment over the routes' own static engines, and the one artifact against the
        # deployed path of separate engines: which of the two to deploy (summary: deployment_line)
        for name, kind, ref in (("deployed", "deployed", "static"), ("one_graph", "one_graph", "static"),
                                (ONE_GRAPH_VS_DEPLOYED, "one_graph", "deployed"),
                                (STEADY, "deployed_steady", "static_steady")):
            paired_row(name, pooled(kind, ref))
        # of the deployed path's overhead, what the cut at the gates costs (its parts against the
        # route's static engine); the rest is the dispatch (row dispatch)
        diffs = []
        for route in priced:
            parts, static = self._chain(results, chained, route), results.get(("static", str(route)))
            if parts and static is not None and static.measurement is not None:
                diffs += split_differences(parts, static.measurement)
        paired_row(SPLIT, diffs)
        if ("batch", str(BATCH)) in results:
            predicted = sum(lut.latency(r) for r in extra["batch_routes"])
            self._record("batch", str(BATCH), results[("batch", str(BATCH))], predicted_ms=predicted, batch=BATCH)
            self._record("batch", f"1x{BATCH}", results[("batch", f"1x{BATCH}")], predicted_ms=predicted)
        acc = extra.get("acceleration")
        if acc:
            mix = acc["mix"]
            label = " + ".join(f"{p:.3f}*route {r}" for r, p in mix.items())
            mean_madds = sum(p * self.madds[str(r)] for r, p in mix.items())
            for name, route, madds in (("largest", f"{acc['static']} x1.0", acc["madds"]["largest"]),
                                       ("matched", f"{acc['static']} x0.5", acc["madds"]["matched"]),
                                       ("dynamic", label, mean_madds), ("static_mix", label, mean_madds)):
                self._record("acceleration", name, results[("acceleration", name)], route=route, madds=madds)
            # Table 7's two shares of the loss with their intervals: each pair of engines round by round
            # and its two speed-ups over the network at x1.0, likewise
            for name, kind, ref in ((MIX, "dynamic", "static_mix"), (ARCHITECTURE, "static_mix", "matched"),
                                    (REALIZED, "dynamic", "largest"), (IDEAL, "matched", "largest")):
                m, r = results[("acceleration", kind)].measurement, results[("acceleration", ref)].measurement
                paired_row(name, paired_differences(m, r) if m is not None and r is not None else [])


def record_engine_failure(ctx: RunContext, model: str, backend: str, precision: str, input_size: int,
                          error: PartError | Exception | str, status: str = "compile_failed") -> None:
    """A dynamic engine that could not be built (or timed: ``status`` and what went wrong as text):
    one ``engine`` row with the failing part's status."""
    status = error.result.status if isinstance(error, PartError) else status
    text = error if isinstance(error, (str, PartError)) else one_line(error)
    ctx.store.record_dynamic({"model": model, "backend": backend, "precision": precision, "batch_size": 1,
                              "input_size": input_size, "kind": "engine", "name": "build", "status": status,
                              "error": str(text), "run_id": ctx.run_id})


def run_dynamic(ctx: RunContext, model: str, backend: str, precision: str, input_size: int,
                progress_factory=None, validate: int = E2E_ROUTES, worker: BuildWorker | None = None,
                measure: bool = True, pooling: Pooling | None = None) -> bool:
    """Measure one supernet's dynamic engine on one backend (``validate`` routes end to end; its
    parts built alongside ``worker``); a part that fails is recorded. ``measure=False``: build, load
    and check all it would time, time nothing; ``pooling``: this process's share of the rounds
    (:meth:`DynamicPhase.run`). Returns whether the store lacked its rows (False too when its
    engine failed: recorded)."""
    progress = progress_factory(dynamic_steps(ctx.protocol) if measure else 1) if progress_factory else None
    if progress is not None:
        progress.note("loading or building its parts")
    try:
        phase = DynamicPhase(ctx, model, backend, precision, input_size, validate=validate, worker=worker)
    except Exception as e:  # a part that does not compile or check: recorded, the run goes on
        interrupts.check()  # unless it was a Ctrl-C a backend re-raised as its own error
        record_engine_failure(ctx, model, backend, precision, input_size, e)
        return False
    try:
        return phase.run(progress, measure=measure, pooling=pooling)
    except PartError as e:  # a segment built on demand, or the deployed path's check
        record_engine_failure(ctx, model, backend, precision, input_size, e)
        return False
