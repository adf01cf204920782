"""The measurement protocol: one function for every backend (DESIGN.md, "Measurement protocol").

Contract
--------
``measure(fn, protocol)`` times a zero-argument callable:

1. warm up: at least ``warmup_calls`` calls and at least ``warmup_ms`` of them;
2. choose ``number`` (calls per sample) so one sample lasts at least ``min_repeat_ms``;
3. take ``repeat`` samples, each the mean time of ``number`` consecutive calls.

Every raw sample (ms per call) is kept; :func:`summarize` computes p50 (the figure to quote), p90,
mean, std and n, here and nowhere else. ``measure_interleaved`` times several callables A B A B ...
in one run, for ratios. A :class:`Timer` abstracts the clock: :class:`WallTimer` (``perf_counter``,
with an optional device synchronize) and :class:`CudaEventTimer`; tests inject a fake clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Protocol:
    warmup_calls: int = 10
    warmup_ms: float = 200.0
    repeat: int = 30
    min_repeat_ms: float = 50.0
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        for name in ("warmup_calls", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"protocol: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_ms", "min_repeat_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"protocol: {name} must be >= 0, got {getattr(self, name)}")

    def replace(self, **changes) -> Protocol:
        return Protocol(**{**asdict(self), **changes})


@dataclass(frozen=True)
class Stats:
    p50: float
    p90: float
    mean: float
    std: float
    n: int


def summarize(samples_ms) -> Stats:
    """Statistics of per-call latencies (ms). ``std`` is the sample standard deviation."""
    a = np.asarray(samples_ms, dtype=float)
    if a.size == 0:
        raise ValueError("no samples to summarize")
    return Stats(p50=float(np.percentile(a, 50)), p90=float(np.percentile(a, 90)),
                 mean=float(a.mean()), std=float(a.std(ddof=1)) if a.size > 1 else 0.0, n=int(a.size))


@dataclass
class Measurement:
    samples_ms: list[float]
    number: int
    stats: Stats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = summarize(self.samples_ms)


class Timer:
    """Times ``number`` calls of ``fn``; returns elapsed milliseconds."""

    def elapsed_ms(self, fn: Callable[[], object], number: int) -> float:
        raise NotImplementedError


class WallTimer(Timer):
    def __init__(self, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[], None] | None = None):
        self.clock, self.sync = clock, sync

    def elapsed_ms(self, fn, number):
        if self.sync:
            self.sync()
        t0 = self.clock()
        for _ in range(number):
            fn()
        if self.sync:
            self.sync()
        return (self.clock() - t0) * 1e3


class CudaEventTimer(Timer):
    """CUDA events around the calls, then a synchronize (GPU-side time)."""

    def __init__(self):
        import torch

        self.torch = torch

    def elapsed_ms(self, fn, number):
        cuda = self.torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        cuda.synchronize()
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def _warmup(fn, protocol: Protocol, timer: Timer) -> float:
    """Warm up; returns an estimate of one call's time (ms)."""
    calls, spent, per_call = 0, 0.0, []
    while calls < protocol.warmup_calls or spent < protocol.warmup_ms:
        ms = timer.elapsed_ms(fn, 1)
        per_call.append(ms)
        spent += ms
        calls += 1
        if calls >= 10_000:  # a call that takes no measurable time: stop trying
            break
    tail = per_call[len(per_call) // 2:]  # the later calls are warm
    return float(np.median(tail))


def _number(per_call_ms: float, protocol: Protocol) -> int:
    if per_call_ms <= 0:
        return 1000
    return max(1, math.ceil(protocol.min_repeat_ms / per_call_ms))


def measure(fn: Callable[[], object], protocol: Protocol, timer: Timer | None = None) -> Measurement:
    timer = timer or WallTimer()
    number = _number(_warmup(fn, protocol, timer), protocol)
    samples = [timer.elapsed_ms(fn, number) / number for _ in range(protocol.repeat)]
    return Measurement(samples, number)


def measure_interleaved(fns: dict[str, Callable[[], object]], protocol: Protocol,
                        timer: Timer | None = None) -> dict[str, Measurement]:
    """Time several callables in one run, alternating A B A B ... sample by sample."""
    timer = timer or WallTimer()
    numbers = {k: _number(_warmup(f, protocol, timer), protocol) for k, f in fns.items()}
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(protocol.repeat):
        for k, f in fns.items():
            samples[k].append(timer.elapsed_ms(f, numbers[k]) / numbers[k])
    return {k: Measurement(samples[k], numbers[k]) for k in fns}
