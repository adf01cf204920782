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
from harness.measure import CudaEventTimer, Protocol, WallTimer, measure
from harness.store import ResultStore

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


def _fingerprint(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def check_output(out: torch.Tensor, ref: torch.Tensor, precision: str) -> str | None:
    """None if ``out`` matches ``ref`` within the precision's tolerance, else why (one line)."""
    out = out.detach().float().cpu()
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

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.done, self.stream, self.start = total, 0, stream, time.monotonic()
        self.tty = stream.isatty()

    def update(self, label: str, result: str) -> None:
        self.done += 1
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
                 device_name: str, device_mismatch: bool, run_id: str):
        self.target, self.out_dir, self.protocol, self.store = target, Path(out_dir), protocol, store
        self.device_name, self.device_mismatch, self.run_id = device_name, device_mismatch, run_id
        self.versions = library_versions()
        self._backends: dict[str, object] = {}

    def backend(self, name: str):
        if name not in self._backends:
            kwargs = {"tuning_dir": self.out_dir / "tvm_tuning"} if name == "tvm" else {}
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

    def _row(self, task: Task, status: str, error: str = "", m=None) -> dict:
        w = task.workload
        row = {"model": w.model, "route": w.route, "widths": w.widths, "backend": task.backend,
               "precision": task.precision, "batch_size": task.batch_size, "input_size": task.input_size,
               "madds": w.madds, "params": w.params, "status": status, "error": error,
               "device_name": self.device_name, "device_mismatch": int(self.device_mismatch),
               "run_id": self.run_id, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "tuned": int(self.target.tvm.get("tune_trials", 0) > 0) if task.backend == "tvm" else None}
        if m is not None:
            s = m.stats
            row.update(latency_ms_p50=s.p50, latency_ms_p90=s.p90, latency_ms_mean=s.mean,
                       latency_ms_std=s.std, n=s.n, number=m.number, samples_ms=m.samples_ms)
        return row

    def run_task(self, task: Task, module: torch.nn.Module, fingerprint: str) -> dict:
        """Compile, check and time one task; the row is stored before this returns."""
        torch.manual_seed(1)
        example = torch.randn(task.batch_size, 3, task.input_size, task.input_size)
        with torch.no_grad():
            ref = module(example).float()
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

    def run(self, tasks: list[Task], progress: Progress | None = None) -> list[dict]:
        rows = []
        by_workload: dict[int, list[Task]] = {}
        for t in tasks:
            by_workload.setdefault(id(t.workload), []).append(t)
        for group in by_workload.values():
            module = group[0].workload.build()  # materialize once per workload
            fingerprint = _fingerprint(module)
            for task in group:
                row = self.run_task(task, module, fingerprint)
                rows.append(row)
                if progress:
                    result = (f"{row['latency_ms_p50']:.3f} ms" if row["status"] == "ok"
                              else f"{row['status']}: {row['error'][:80]}")
                    progress.update(task.label(), result)
        return rows
