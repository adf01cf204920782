"""What every phase of a run shares: the target, the results folder and store, the protocol, the
run's identity, the configured backends and (for boards) the farm.

Contract
--------
``RunContext(target, layout, protocol, store, device_name, device_mismatch, run_id, farm=None, lock=None,
fresh=False)`` (``fresh``: a process started only to time what the run's process built,
:mod:`harness.phases.fresh`); ``ctx.close()`` closes the store and releases the results folder's lock.
``ctx.backend(name)`` is the backend configured from the profile's ``[name]`` table, its
``workdir`` the results folder's ``<name>_tuning/`` and, with a farm, the tracker's address;
one instance per name. ``ctx.trial(...)`` is :func:`harness.measure.pipeline.trial` with the
artifact key built from the context and artifacts cached under ``cache/``; ``ctx.share_builds(worker,
trials)`` hands the artifacts of a list of such trials still to build to a second process
(:class:`~harness.measure.build_worker.BuildWorker`) and returns what each trial's ``built`` is,
claimed in order. ``ctx.round_phase(name,
seed)`` is the phase's one :class:`~harness.measure.rounds.RoundPhase` (the profile's protocol, the
target's clock, its drift stored under ``name``) and ``ctx.timing(backend, x)`` what it times of an
engine checked on ``x``. ``ctx.stamp`` holds the columns every stored row of the run carries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from harness.backends import Backend, base_name, get_backend
from harness.measure.build_worker import BuildJob, BuildWorker
from harness.measure.pipeline import ArtifactKey, Result, timed_call, trial, weights_fingerprint
from harness.measure.protocol import CudaEventTimer, Protocol, Timer, WallTimer
from harness.measure.rounds import RoundPhase
from harness.results.layout import Layout
from harness.results.store import ResultStore
from harness.targets import Target


@dataclass
class RunContext:
    target: Target
    layout: Layout
    protocol: Protocol
    store: ResultStore
    device_name: str
    device_mismatch: bool
    run_id: str
    farm: object = None  # harness.measure.remote.Farm: measure on its boards
    lock: object = None  # harness.results.store.FolderLock held on the results folder, released by close()
    fresh: bool = False  # a process started to time what the run's process built (harness.phases.fresh)
    _backends: dict = field(default_factory=dict, repr=False)

    def backend(self, name: str) -> Backend:
        if name not in self._backends:
            remote = None if self.farm is None else (self.farm.host, self.farm.port, self.farm.key)
            self._backends[name] = get_backend(name, options=self.target.options(base_name(name)),
                                               workdir=self.layout.tuning_dir(base_name(name)), remote=remote)
        return self._backends[name]

    def timer(self) -> Timer:
        """The clock of the protocol on this target: CUDA events on a GPU, wall clock on a CPU."""
        return CudaEventTimer() if self.target.device == "cuda" else WallTimer()

    def timed(self, backend: str, result: Result, native, graphs: bool = True) -> tuple:
        """``(fn, result)``: what the protocol times for an ``ok`` result: a CUDA graph's replay when
        the profile's ``cuda_graphs`` is on or the backend is a ``+graphs`` variant, on a GPU (see
        :func:`harness.measure.pipeline.timed_call`); ``graphs=False``: the plain call always (a
        dynamic phase, whose routes a graph would freeze)."""
        b = self.backend(backend)
        wanted = graphs and (self.protocol.cuda_graphs or b.cuda_graphs)
        if wanted and self.target.device != "cuda":
            return timed_call(b, result, native, False)[0], result.replace(
                details={**result.details, "cuda_graph": "not captured: the target is not a GPU"})
        return timed_call(b, result, native, wanted)

    def timing(self, backend: str, x: torch.Tensor, graphs: bool = True):
        """``timed(result)`` for :meth:`RoundPhase.add`: the engine's call on ``x`` prepared once."""
        return lambda result: self.timed(backend, result, result.engine.prepare(x), graphs)

    def round_phase(self, name: str, seed: int = 0, protocol: Protocol | None = None,
                    shuffle: bool = True) -> RoundPhase:
        """A round phase on this target (default: the profile's protocol), its drift stored as ``name``."""
        return RoundPhase(name, protocol or self.protocol, self.timer(), seed, shuffle,
                          lambda phase, factors: self.store.record_drift(self.run_id, phase, factors))

    def key(self, model: str, route: str, backend: str, precision: str, example: torch.Tensor,
            module: torch.nn.Module, weights: str | None = None) -> ArtifactKey:
        return ArtifactKey.of(model, route, self.backend(backend), self.target, precision, example,
                              weights or weights_fingerprint(module))

    def trial(self, model: str, route: str, backend: str, precision: str, module: torch.nn.Module,
              example: torch.Tensor, ref=None, weights: str | None = None, built: Result | None = None) -> Result:
        key = self.key(model, route, backend, precision, example, module, weights)
        return trial(self.backend(backend), module, example, self.target, precision, key, self.layout.cache_dir, ref,
                     built)

    def build_job(self, model: str, route: str, backend: str, precision: str, module: torch.nn.Module,
                  example: torch.Tensor, weights: str | None = None) -> BuildJob | None:
        """What :meth:`trial` of the same arguments would build, as a build worker's job; None when the
        backend builds no artifact or the artifact is built already."""
        b = self.backend(backend)
        if not b.artifact:  # no key to compute
            return None
        folder = self.key(model, route, backend, precision, example, module, weights).directory(self.layout.cache_dir)
        return BuildJob.unless_built(b, module, example, self.target, precision, folder)

    def share_builds(self, worker: BuildWorker | None, trials: list[tuple]) -> Callable[[int], Result | None]:
        """``built(n)`` for ``trials`` (each the arguments ``(model, route, backend, precision, module,
        example, weights)`` of :meth:`trial`, called in this order): the artifacts still to build shared
        with ``worker`` (:meth:`~harness.measure.build_worker.BuildWorker.claims`)."""
        if worker is None:
            return lambda n: None
        return worker.claims([self.build_job(*args) for args in trials])

    def close(self) -> None:
        """Close the store and give the results folder back to other runs."""
        self.store.close()
        if self.lock is not None:
            self.lock.release()

    def stamp(self) -> dict:
        return {"run_id": self.run_id, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
