"""The measurement protocol: one function for every backend (docs/architecture.md; docs/run.md, the protocol).

Contract
--------
``measure(fn, protocol)`` times a zero-argument callable:

1. warm up: at least ``warmup_calls`` calls and at least ``warmup_ms`` of them;
2. choose ``number`` (calls per sample) so one sample lasts at least ``min_repeat_ms``;
3. take ``repeat`` samples, each the mean time of ``number`` consecutive calls.

Every raw sample (ms per call) is kept; :func:`summarize` computes p50 (the figure to quote), p90,
mean, std, n, the 95% confidence interval of the median (distribution-free, from the binomial
order statistics) and whether the cell is ``valid`` (interval half-width within
``max_ci_fraction`` of the median and at least ``min_measured_ms`` of measured time), here and
nowhere else.

Several engines are compared in rounds (:func:`measure_rounds`): every engine is warmed up and
given its ``number`` first, then each round visits every engine once, in a fresh seeded random
order, one sample each, so slow drift of the machine falls on every engine alike. Each sample
keeps its round and its place in the phase's timing sequence (``Measurement.order``); each round
gets a speed factor (the median over its engines of sample / engine median), the run's drift;
:meth:`Rounds.drift_corrected` divides it out. Cells not yet valid get more rounds, up to
``budget_s``.
``measure_interleaved`` is the same with a fixed order (A B A B ...: parts of one chain timed in
context). A :class:`Timer` abstracts the clock: :class:`WallTimer` (``perf_counter``, with an
optional device synchronize) and :class:`CudaEventTimer`; tests inject a fake clock.
"""

from __future__ import annotations

import itertools
import math
import random
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
    max_ci_fraction: float = 0.05  # valid: 95% interval half-width of the median within this fraction of it
    min_measured_ms: float = 500.0  # valid: at least this much measured time (all samples' calls)
    budget_s: float = 0.0  # extra rounds for cells not yet valid, within this many seconds per phase

    def __post_init__(self) -> None:
        for name in ("warmup_calls", "repeat"):
            if getattr(self, name) < 1:
                raise ValueError(f"protocol: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_ms", "min_repeat_ms", "min_measured_ms", "budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"protocol: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.max_ci_fraction <= 1:
            raise ValueError(f"protocol: max_ci_fraction must be in (0, 1], got {self.max_ci_fraction}")

    def replace(self, **changes) -> Protocol:
        return Protocol(**{**asdict(self), **changes})


@dataclass(frozen=True)
class Stats:
    p50: float
    p90: float
    mean: float
    std: float
    n: int
    ci_low: float = math.nan  # 95% confidence interval of the median
    ci_high: float = math.nan
    measured_ms: float = math.nan  # time covered by the samples (samples x calls per sample)
    valid: bool = False


def median_interval(n: int, confidence: float = 0.95) -> tuple[int, int]:
    """0-based indices ``(lo, hi)`` into ``n`` sorted samples bracketing the median with at least
    ``confidence`` (binomial order statistics, no assumption on the distribution). For few samples
    the interval is the whole range."""
    tail = (1 - confidence) / 2
    cdf, lo = 0.0, 0
    for k in range(n + 1):  # largest k with P(Bin(n, 1/2) < k) <= tail
        if cdf + math.comb(n, k) / 2**n > tail:
            lo = k
            break
        cdf += math.comb(n, k) / 2**n
    lo = max(0, lo - 1) if lo else 0
    return lo, max(lo, n - 1 - lo)


def summarize(samples_ms, number: int = 1, protocol: Protocol | None = None) -> Stats:
    """Statistics of per-call latencies (ms), each sample the mean of ``number`` calls. ``std`` is
    the sample standard deviation; validity follows ``protocol`` (default :class:`Protocol`)."""
    a = np.asarray(samples_ms, dtype=float)
    if a.size == 0:
        raise ValueError("no samples to summarize")
    protocol = protocol or Protocol()
    lo, hi = median_interval(a.size)
    ordered = np.sort(a)
    p50 = float(np.percentile(a, 50))
    ci_low, ci_high = float(ordered[lo]), float(ordered[hi])
    measured = float(a.sum() * max(1, number))
    valid = bool((ci_high - ci_low) / 2 <= protocol.max_ci_fraction * p50 and measured >= protocol.min_measured_ms)
    return Stats(p50=p50, p90=float(np.percentile(a, 90)), mean=float(a.mean()),
                 std=float(a.std(ddof=1)) if a.size > 1 else 0.0, n=int(a.size), ci_low=ci_low, ci_high=ci_high,
                 measured_ms=measured, valid=valid)


@dataclass
class Measurement:
    samples_ms: list[float]
    number: int
    rounds: list[int] | None = None  # the round of each sample (measure_rounds)
    protocol: Protocol | None = field(default=None, repr=False)
    order: list[int] | None = None  # each sample's position in its round phase's timing sequence
    stats: Stats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = summarize(self.samples_ms, self.number, self.protocol)


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
    return Measurement(samples, number, protocol=protocol)


@dataclass
class Rounds:
    """What :func:`measure_rounds` returns: a measurement per engine, and each round's speed factor
    (median over the round's engines of sample / that engine's median: 1.0 = a typical round)."""

    measurements: dict[str, Measurement]
    factors: list[float]

    def __getitem__(self, name: str) -> Measurement:
        return self.measurements[name]

    def items(self):
        return self.measurements.items()

    def drift_corrected(self, name: str) -> Stats:
        """``name``'s statistics with each sample divided by its round's speed factor: the drift
        the rounds saw removed (what the machine would have measured at a typical round's speed)."""
        m = self.measurements[name]
        rounds = sorted({r for x in self.measurements.values() for r in (x.rounds or [])})
        factor = dict(zip(rounds, self.factors))
        return summarize([s / factor[r] for s, r in zip(m.samples_ms, m.rounds or [])], m.number, m.protocol)


def paired_ratios(m: Measurement, ref: Measurement) -> list[float]:
    """``m``'s sample over ``ref``'s, for every round both were timed in (drift cancels in each pair)."""
    ref_by_round = dict(zip(ref.rounds or [], ref.samples_ms))
    ratios = [s / ref_by_round[r] for r, s in zip(m.rounds or [], m.samples_ms) if ref_by_round.get(r)]
    if not ratios:
        raise ValueError("the two measurements share no round")
    return ratios


def paired_ratio(m: Measurement, ref: Measurement) -> float:
    """``m`` relative to ``ref`` measured in the same rounds: the median of :func:`paired_ratios`."""
    return float(np.median(paired_ratios(m, ref)))


def drift_summary(factors: list[float]) -> dict:
    """Rounds and the spread of their speed factors (1.0: a typical round): the run's drift."""
    f = np.asarray(factors, dtype=float)
    if f.size == 0:
        return {"rounds": 0}
    return {"rounds": int(f.size), "factor_min": round(float(f.min()), 4), "factor_max": round(float(f.max()), 4),
            "factor_iqr": round(float(np.percentile(f, 75) - np.percentile(f, 25)), 4)}


def measure_rounds(fns: dict[str, Callable[[], object]], protocol: Protocol, timer: Timer | None = None,
                   seed: int = 0, shuffle: bool = True, on_round: Callable[[int, int], None] | None = None,
                   groups: list[list[str]] | None = None, numbers: dict[str, int] | None = None,
                   earlier: dict[str, Measurement] | None = None, primed: set[str] | None = None) -> Rounds:
    """Time several callables in rounds (see the module docstring). ``shuffle=False`` keeps the
    given order in every round; ``groups`` (a partition of ``fns``' names) are units that keep their
    order within a round while the units are shuffled (a chain's parts timed in context);
    ``numbers`` fixes the calls per sample of some callables (e.g. a chunk of a route stream, so
    a sample's mean is the stream's); ``on_round(done, planned)`` reports progress. ``earlier``:
    the same callables' measurements from rounds timed before (in another process): each result
    holds their samples first, with their rounds and positions, and this call's rounds numbered
    after theirs, so paired statistics pair within a round and the speed factors span both.
    ``primed``: callables whose every sample follows one untimed call of their own, so the sample
    times them in their steady state (right after themselves, as a process serving that one network
    runs it) rather than after whatever the round ran before them."""
    timer = timer or WallTimer()
    earlier = {k: m for k, m in (earlier or {}).items() if k in fns and m.rounds is not None}
    first_round = 1 + max((r for m in earlier.values() for r in m.rounds), default=-1)
    first_position = 1 + max((p for m in earlier.values() for p in (m.order or [])), default=-1)
    units = [list(g) for g in groups] if groups is not None else [[k] for k in fns]
    if sorted(map(str, (k for g in units for k in g))) != sorted(map(str, fns)):
        raise ValueError("measure_rounds: groups must name every callable exactly once")
    primed = set(primed or ())
    if primed - set(fns):
        raise ValueError(f"measure_rounds: primed names callables not given: {sorted(map(str, primed - set(fns)))}")
    fixed = numbers or {}
    numbers = {k: fixed.get(k) or _number(_warmup(f, protocol, timer), protocol) for k, f in fns.items()}
    for k in fixed:  # warmed up too
        _warmup(fns[k], protocol, timer)
    samples: dict[str, list[float]] = {k: list(earlier[k].samples_ms) if k in earlier else [] for k in fns}
    rounds: dict[str, list[int]] = {k: list(earlier[k].rounds) if k in earlier else [] for k in fns}
    order: dict[str, list[int]] = {k: list(earlier[k].order or []) if k in earlier else [] for k in fns}
    position = itertools.count(first_position)
    # rounds after earlier ones shuffle otherwise
    rng = random.Random(seed if not first_round else seed * 1_000_003 + first_round)

    def one_round(r: int, todo: list[list[str]]) -> None:
        if shuffle:
            rng.shuffle(todo)
        for unit in todo:
            for k in unit:
                if k in primed:
                    fns[k]()
                samples[k].append(timer.elapsed_ms(fns[k], numbers[k]) / numbers[k])
                rounds[k].append(r)
                order[k].append(next(position))

    for r in range(protocol.repeat):
        one_round(first_round + r, units)
        if on_round:
            on_round(r + 1, protocol.repeat)
    r, extra_start = first_round + protocol.repeat, time.monotonic()
    while protocol.budget_s > 0 and time.monotonic() - extra_start < protocol.budget_s:
        invalid = {k for k in fns if not summarize(samples[k], numbers[k], protocol).valid}
        if not invalid:
            break
        one_round(r, [u for u in units if invalid & set(u)])  # a part is re-timed in its chain
        r += 1
    measurements = {k: Measurement(samples[k], numbers[k], rounds[k], protocol, order[k]) for k in fns}
    return Rounds(measurements, _round_factors(measurements))


def _round_factors(measurements: dict[str, Measurement]) -> list[float]:
    by_round: dict[int, list[float]] = {}
    for m in measurements.values():
        p50 = m.stats.p50
        for r, s in zip(m.rounds or [], m.samples_ms):
            if p50 > 0:
                by_round.setdefault(r, []).append(s / p50)
    return [float(np.median(by_round[r])) for r in sorted(by_round)]


def measure_interleaved(fns: dict[str, Callable[[], object]], protocol: Protocol,
                        timer: Timer | None = None) -> Rounds:
    """Time several callables in one run, in the given order every round (A B A B ...)."""
    return measure_rounds(fns, protocol, timer, shuffle=False)
