"""The sweep: every (workload x backend x precision x batch) of a target, compiled, checked, timed.

Contract
--------
A :class:`Workload` is one static network to measure: a route of a supernet (materialized) or a
static model at a width multiplier. ``workloads(models, input_size, routes)`` lists them with their
MAdds and params (computed, never typed). :class:`Sweep` runs them against a
:class:`~harness.store.ResultStore`:

1. skip keys the store already holds (resume);
2. compile through the backend, or load the cached artifact (cache key: model, route, backend,
   target, precision, input shape, library versions, weights); a compile error is recorded as
   ``compile_failed`` and the sweep goes on;
3. compare the engine's output with eager fp32 on the same input (tolerance per precision); a
   wrong engine is recorded as ``check_failed`` and never timed;
4. time it with the one protocol (:func:`harness.measure.measure`) and record it at once.

Weights are random but deterministic (seeded), so cached artifacts and references agree across
runs. Models and backends never meet except here.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import dsnet
from harness.backends import Failure, compile_engine, get_backend
from harness.backends.base import one_line
from harness.env import library_versions
from harness.measure import CudaEventTimer, Protocol, WallTimer, measure, measure_interleaved, summarize
from harness.store import DYNAMIC_KEY, ResultStore

STATIC_WIDTHS = (1.0, 0.75, 0.5, 0.25)
TOLERANCE = {"fp32": (1e-3, 1e-4), "fp16": (2e-2, 2e-2)}  # (rtol, atol) against eager fp32
WEIGHT_SEED = 0


@dataclass
class Workload:
    model: str
    route: str
    widths: str
    madds: int
    params: int
    build: Callable[[], torch.nn.Module] = field(repr=False)


def workloads(models: list[str], input_size: int, routes: set[str] | None = None) -> list[Workload]:
    """The networks to measure: every route of a supernet, every width of a static model."""
    out: list[Workload] = []
    for name in models:
        torch.manual_seed(WEIGHT_SEED)
        probe = dsnet.create_model(name)
        if len(probe.routing_space.gates):
            for route in probe.routes(input_size):
                p = dsnet.profile(probe, route, input_size)
                out.append(Workload(name, str(route), "/".join(map(str, probe.route_widths(route))),
                                    p.madds, p.params,
                                    lambda m=probe, r=route: dsnet.materialize(m, r)))
        else:
            for w in STATIC_WIDTHS:
                torch.manual_seed(WEIGHT_SEED)
                model = dsnet.create_model(name, width_mult=w)
                p = dsnet.profile(model, None, input_size)
                out.append(Workload(name, f"x{w}", "", p.madds, p.params,
                                    lambda m=model: dsnet.materialize(m)))
    if routes is not None:
        out = [w for w in out if w.route in routes]
    return out


def weights_fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_output(out, ref, precision: str) -> str | None:
    """None if ``out`` matches ``ref`` within the precision's tolerance, else why (one line).

    Both may be tuples of tensors (a module with several outputs): each is compared."""
    if isinstance(ref, tuple) or isinstance(out, tuple):
        if not (isinstance(ref, tuple) and isinstance(out, tuple) and len(ref) == len(out)):
            return "number of outputs differs from eager"
        for i, (o, r) in enumerate(zip(out, ref)):
            problem = check_output(o, r, precision)
            if problem:
                return f"output {i}: {problem}"
        return None
    out, ref = out.detach().float().cpu(), ref.detach().float().cpu()
    if out.shape != ref.shape:
        return f"output shape {tuple(out.shape)} differs from eager {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return "output has non-finite values"
    rtol, atol = TOLERANCE[precision]
    diff = (out - ref).abs()
    bound = atol + rtol * ref.abs()
    if (diff > bound).any():
        return (f"output differs from eager: max abs diff {diff.max().item():.3g} "
                f"(tolerance {atol:g} + {rtol:g}*|eager|, {precision})")
    return None


@dataclass
class Task:
    workload: Workload
    backend: str
    precision: str
    batch_size: int
    input_size: int

    @property
    def key(self) -> tuple:
        return (self.workload.model, self.workload.route, self.backend, self.precision,
                self.batch_size, self.input_size)

    def label(self) -> str:
        return (f"{self.workload.model} {self.workload.route} {self.backend} {self.precision} "
                f"b{self.batch_size}")


class Progress:
    """A one-line progress bar on stderr (one line per item when not a terminal)."""

    def __init__(self, total: int, stream=None, every_s: float = 0.0):
        """``stream``: default the current ``sys.stderr`` (looked up here, not at import time, so a
        replaced stderr is honoured); ``every_s``: when not a terminal, print at most one line per
        ``every_s`` seconds."""
        stream = stream or sys.stderr
        self.total, self.done, self.stream, self.start = total, 0, stream, time.monotonic()
        self.tty = stream.isatty()
        self.every_s, self.last = every_s, -float("inf")

    def update(self, label: str, result: str) -> None:
        self.done += 1
        now = time.monotonic()
        if not self.tty and self.done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        width = 24
        filled = int(width * self.done / max(1, self.total))
        elapsed = time.monotonic() - self.start
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{elapsed:5.0f}s  {label}: {result}")
        if self.tty:
            self.stream.write("\r\033[K" + line[:160])
            if self.done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class Sweep:
    def __init__(self, target, out_dir: Path, protocol: Protocol, store: ResultStore,
                 device_name: str, device_mismatch: bool, run_id: str, farm=None):
        """``farm``: a :class:`harness.remote.Farm`; then artifacts are built here and checked and
        timed on its boards, each row stamped with its board's identity."""
        self.target, self.out_dir, self.protocol, self.store = target, Path(out_dir), protocol, store
        self.device_name, self.device_mismatch, self.run_id = device_name, device_mismatch, run_id
        self.farm = farm
        self.versions = library_versions()
        self._backends: dict[str, object] = {}

    def timer(self):
        """The clock of the protocol on this target: CUDA events on a GPU, wall clock on a CPU."""
        return CudaEventTimer() if self.target.device == "cuda" else WallTimer()

    def backend(self, name: str):
        if name not in self._backends:
            kwargs = {"tuning_dir": self.out_dir / "tvm_tuning"} if name == "tvm" else {}
            if name == "tvm" and self.farm is not None:  # tune on the boards, same database
                kwargs["rpc"] = (self.farm.host, self.farm.port, self.farm.key)
            self._backends[name] = get_backend(name, **kwargs)
        return self._backends[name]

    def artifact_dir(self, task: Task, fingerprint: str) -> Path:
        key = json.dumps({"target": self.target.name, "tvm": self.target.tvm, "backend": task.backend,
                          "precision": task.precision, "shape": [task.batch_size, 3, task.input_size,
                                                                 task.input_size],
                          "versions": self.versions, "weights": fingerprint}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        w = task.workload
        return (self.out_dir / "cache" / task.backend /
                f"{w.model}-{w.route}-{task.precision}-b{task.batch_size}-s{task.input_size}-{digest}")

    def _row(self, task: Task, status: str, error: str = "", m=None, device: str | None = None) -> dict:
        w = task.workload
        row = {"model": w.model, "route": w.route, "widths": w.widths, "backend": task.backend,
               "precision": task.precision, "batch_size": task.batch_size, "input_size": task.input_size,
               "madds": w.madds, "params": w.params, "status": status, "error": error,
               "device_name": device or self.device_name,
               "device_mismatch": 0 if device else int(self.device_mismatch),
               "run_id": self.run_id, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "tuned": int(self.target.tvm.get("tune_trials", 0) > 0) if task.backend == "tvm" else None}
        if m is not None:
            s = m.stats
            row.update(latency_ms_p50=s.p50, latency_ms_p90=s.p90, latency_ms_mean=s.mean,
                       latency_ms_std=s.std, n=s.n, number=m.number, samples_ms=m.samples_ms)
        return row

    @staticmethod
    def _reference(task: Task, module: torch.nn.Module):
        """The check input (seeded) and eager fp32's output on it."""
        torch.manual_seed(1)
        example = torch.randn(task.batch_size, 3, task.input_size, task.input_size)
        with torch.no_grad():
            return example, module(example)

    def run_task(self, task: Task, module: torch.nn.Module, fingerprint: str) -> dict:
        """Compile, check and time one task; the row is stored before this returns."""
        example, ref = self._reference(task, module)
        backend = self.backend(task.backend)
        engine = compile_engine(backend, module, example, self.target, task.precision,
                                self.artifact_dir(task, fingerprint))
        if isinstance(engine, Failure):
            row = self._row(task, "compile_failed", engine.error)
        else:
            try:
                problem = check_output(engine(example), ref, task.precision)
            except Exception as e:
                problem = f"engine raised on the check input: {one_line(e)}"
            if problem:
                row = self._row(task, "check_failed", problem)
            else:
                try:
                    prepared = engine.prepare(example)
                    timer = CudaEventTimer() if self.target.device == "cuda" else WallTimer(sync=engine.sync)
                    m = measure(lambda: engine.run(prepared), self.protocol, timer)
                    row = self._row(task, "ok", m=m)
                except Exception as e:
                    row = self._row(task, "measure_failed", one_line(e))
        self.store.record(row)
        return row

    @staticmethod
    def _modules(tasks: list[Task]):
        """``(task, module, fingerprint)``, each workload materialized once."""
        by_workload: dict[int, list[Task]] = {}
        for t in tasks:
            by_workload.setdefault(id(t.workload), []).append(t)
        for group in by_workload.values():
            module = group[0].workload.build()
            fingerprint = weights_fingerprint(module)
            for task in group:
                yield task, module, fingerprint

    def _report(self, progress, task: Task, row: dict) -> None:
        if progress:
            result = (f"{row['latency_ms_p50']:.3f} ms" if row["status"] == "ok"
                      else f"{row['status']}: {row['error'][:80]}")
            where = f" on {row['device_name']}" if self.farm is not None else ""
            progress.update(task.label() + where, result)

    def run(self, tasks: list[Task], progress: Progress | None = None) -> list[dict]:
        if self.farm is not None:
            return self._run_remote(tasks, progress)
        rows = []
        for task, module, fingerprint in self._modules(tasks):
            row = self.run_task(task, module, fingerprint)
            rows.append(row)
            self._report(progress, task, row)
        return rows

    def _run_remote(self, tasks: list[Task], progress: Progress | None) -> list[dict]:
        """Artifacts are built here, one at a time; each is checked and timed on whichever board is
        free, boards in parallel; rows are stored from this thread as they come back."""
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        from harness.remote import RemoteError

        def on_board(task, path, example, ref):
            board = self.farm.acquire()
            try:
                model = board.load(path)
                problem = check_output(model.run(example), ref, task.precision)
                if problem:
                    return task, self._row(task, "check_failed", problem, device=board.identity)
                return task, self._row(task, "ok", m=model.measure(example, self.protocol), device=board.identity)
            except Exception as e:  # recorded; the sweep goes on
                return task, self._row(task, "measure_failed", one_line(e), device=board.identity)
            finally:
                board.close()

        rows, pending = [], set()

        def collect(futures):
            for f in futures:
                task, row = f.result()
                self.store.record(row)
                rows.append(row)
                self._report(progress, task, row)

        with ThreadPoolExecutor(len(self.farm.boards)) as pool:
            for task, module, fingerprint in self._modules(tasks):
                example, ref = self._reference(task, module)
                backend = self.backend(task.backend)
                artifact_dir = self.artifact_dir(task, fingerprint)
                artifact_dir.mkdir(parents=True, exist_ok=True)
                try:
                    path = (artifact_dir / backend.artifact if backend.has_artifact(artifact_dir)
                            else backend.export(module, example, self.target, task.precision, artifact_dir))
                except RemoteError:
                    raise  # e.g. the cross compiler is missing: nothing can be built, say so once
                except Exception as e:
                    row = self._row(task, "compile_failed", one_line(e))
                    self.store.record(row)
                    rows.append(row)
                    self._report(progress, task, row)
                    continue
                pending.add(pool.submit(on_board, task, path, example, ref))
                if len(pending) >= 2 * len(self.farm.boards):  # build ahead, but not everything
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    collect(done)
            collect(pending)
        return rows


# --------------------------------------------------------------------------------------------
# Dynamic deployment: the compositional LUT, its accuracy, dispatch overhead, realized speed-up

STATIC_COUNTERPART = {"ds_mbnet": "mobilenet_v1", "ds_resnet50": "resnet50"}
E2E_ROUTES = 16  # routes validated end to end when a model has more


def validation_routes(routes: list) -> list:
    """All routes, or ``E2E_ROUTES`` spread over the MAdds order, smallest and largest included."""
    if len(routes) <= E2E_ROUTES:
        return list(routes)
    idx = sorted({round(i * (len(routes) - 1) / (E2E_ROUTES - 1)) for i in range(E2E_ROUTES)})
    return [routes[i] for i in idx]


class DynamicSweep:
    """Measures a supernet's dynamic engine on one backend; every result is stored at once."""

    def __init__(self, sweep: Sweep, model_name: str, backend: str, precision: str, input_size: int,
                 model=None):
        """``model``: the instance to deploy (default: ``model_name`` with seeded random weights)."""
        from harness.dynamic import DynamicEngine

        self.sweep, self.model_name, self.backend_name = sweep, model_name, backend
        self.precision, self.input_size = precision, input_size
        if model is None:
            torch.manual_seed(WEIGHT_SEED)
            model = dsnet.create_model(model_name)
        self.model = model.eval()
        self.plan = dsnet.split(self.model)
        self.engine = DynamicEngine(self.plan, sweep.backend(backend), sweep.target, precision,
                                    sweep.out_dir / "cache" / backend / f"{model_name}-dynamic", input_size,
                                    fingerprint=weights_fingerprint(self.plan))
        self.x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
        self.done = sweep.store.dynamic_done()

    def _key(self, kind, name):
        return (self.model_name, self.backend_name, self.precision, 1, self.input_size, kind, name)

    def _record(self, kind, name, stats=None, samples=None, measured_ms=None, predicted_ms=None, route="",
                madds=None, status="ok", error="") -> None:
        """Store one result. ``measured_ms`` (default: p50) is what ``predicted_ms`` is compared with."""
        row = dict(zip(DYNAMIC_KEY, self._key(kind, name)))
        row.update(route=route, madds=madds, status=status, error=error, run_id=self.sweep.run_id)
        if stats is not None:
            row.update(latency_ms_p50=stats.p50, latency_ms_p90=stats.p90, latency_ms_mean=stats.mean,
                       latency_ms_std=stats.std, n=stats.n, samples_ms=samples)
            measured_ms = stats.p50 if measured_ms is None else measured_ms
        elif measured_ms is not None:  # a derived figure (e.g. dispatch): one value
            row.update(latency_ms_p50=measured_ms, n=1)
        if predicted_ms is not None:
            row.update(predicted_ms=predicted_ms, rel_error=(predicted_ms - measured_ms) / measured_ms)
        self.sweep.store.record_dynamic(row)

    def run(self, progress=None, lut_only: bool = False) -> None:
        """Measure what the store lacks; ``lut_only``: the segments (the LUT) and nothing else."""
        from harness.dynamic import chain_parts, covering_routes, in_context, measure_dispatch, measure_stream
        from harness.lut import LatencyLUT, route_segment_names

        protocol, timer = self.sweep.protocol, self.sweep.timer()
        # 1. every segment timed in context (interleaved in chain order over routes that cover all
        #    segments; a segment's samples pooled over the routes it appears in): the compositional LUT
        cover = covering_routes(self.plan, self.model.routes(self.input_size))
        remaining: dict[str, int] = {}
        for route in cover:
            for name in route_segment_names(route):
                remaining[name] = remaining.get(name, 0) + 1
        samples: dict[str, list[float]] = {}
        for route in cover:
            names = route_segment_names(route)
            if all(self._key("segment", n) in self.done for n in names):
                continue
            res = measure_interleaved(chain_parts(self.engine, route, self.x), in_context(protocol), timer)
            for name, m in res.items():
                samples.setdefault(name, []).extend(m.samples_ms)
                remaining[name] -= 1
                if remaining[name] == 0 and self._key("segment", name) not in self.done:
                    stats = summarize(samples[name])
                    self._record("segment", name, stats, samples[name])
                    if progress:
                        progress(f"{self.model_name} {self.backend_name} segment {name}", f"{stats.p50:.3f} ms")
        if lut_only:
            return
        lut = LatencyLUT.from_frame(self.sweep.store.dynamic_frame(), self.model_name, self.backend_name,
                                    self.precision, 1, self.input_size)
        # 2. end to end per route, with the route's parts interleaved in the same run. Two errors:
        #    "route": sum of the same-run parts vs end to end (the composition itself);
        #    "route_lut": the stored LUT (measured minutes earlier) vs end to end (adds machine drift).
        routes = validation_routes(self.model.routes(self.input_size))
        for route in routes:
            if self._key("route", str(route)) in self.done and self._key("route_lut", str(route)) in self.done:
                continue
            d = measure_dispatch(self.engine, route, self.x, protocol, timer)
            e2e = d["end_to_end"]
            madds = dsnet.profile(self.model, route, self.input_size).madds
            self._record("route", str(route), e2e.stats, e2e.samples_ms, predicted_ms=d["parts_ms"],
                         route=str(route), madds=madds)
            self._record("route_lut", str(route), e2e.stats, e2e.samples_ms, predicted_ms=lut.latency(route),
                         route=str(route), madds=madds)
            if progress:
                progress(f"{self.model_name} {self.backend_name} route {route}",
                         f"{e2e.stats.p50:.3f} ms, parts {d['parts_ms']:.3f} ms, LUT {lut.latency(route):.3f} ms")
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

    def _acceleration(self, static: str, routes, timer, progress) -> None:
        """The dynamic model at the route mix whose mean MAdds match the static x0.5 network, against
        static x1.0 (the paper's realized speed-up) and static x0.5 (the ideal one), interleaved."""
        from harness.dynamic import matched_distribution, measure_acceleration

        engines, madds = {}, {}
        for label, w in (("largest", 1.0), ("matched", 0.5)):
            torch.manual_seed(WEIGHT_SEED)
            model = dsnet.create_model(static, width_mult=w)
            madds[label] = dsnet.profile(model, None, self.input_size).madds
            module = dsnet.materialize(model)
            wl = Workload(static, f"x{w}", "", madds[label], 0, lambda m=module: m)
            task = Task(wl, self.backend_name, self.precision, 1, self.input_size)
            engine = compile_engine(self.sweep.backend(self.backend_name), module, self.x, self.sweep.target,
                                    self.precision, self.sweep.artifact_dir(task, weights_fingerprint(module)))
            if isinstance(engine, Failure):
                self._record("acceleration", "dynamic", status="compile_failed",
                             error=f"{static} x{w}: {engine.error}")
                return
            engines[label] = engine
        route_madds = {r: dsnet.profile(self.model, r, self.input_size).madds
                       for r in self.model.routes(self.input_size)}
        mix = matched_distribution(route_madds, madds["matched"])
        self.engine.prepare_routes(list(mix), self.x)
        res = measure_acceleration(self.engine, mix, engines["largest"], engines["matched"], self.x,
                                   self.sweep.protocol, timer=timer)
        label = " + ".join(f"{p:.3f}*route {r}" for r, p in mix.items())
        mean_madds = sum(p * route_madds[r] for r, p in mix.items())
        self._record("acceleration", "largest", res["largest"], route=f"{static} x1.0", madds=madds["largest"])
        self._record("acceleration", "matched", res["matched"], route=f"{static} x0.5", madds=madds["matched"])
        self._record("acceleration", "dynamic", res["dynamic"], route=label, madds=mean_madds)
        if progress:
            progress(f"{self.model_name} {self.backend_name} acceleration",
                     f"realized {res['realized_speedup']:.2f}x, ideal {res['ideal_speedup']:.2f}x")
