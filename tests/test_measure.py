"""The measurement protocol on a fake clock: warm-up, number calibration, statistics, interleaving."""

import numpy as np
import pytest

from harness.measure.protocol import Protocol, WallTimer, measure, measure_interleaved, summarize


class FakeClock:
    """Each call of the timed function advances time by the next duration in ``durations``."""

    def __init__(self, durations_ms):
        self.t = 0.0
        self.durations = list(durations_ms)
        self.calls = 0

    def now(self):
        return self.t

    def fn(self):
        self.t += self.durations[min(self.calls, len(self.durations) - 1)] / 1e3
        self.calls += 1


def test_statistics_are_computed_in_one_place():
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s.p50 == 3.0
    assert s.p90 == pytest.approx(np.percentile([1, 2, 3, 4, 10], 90))
    assert s.mean == 4.0
    assert s.std == pytest.approx(np.std([1, 2, 3, 4, 10], ddof=1))
    assert s.n == 5
    assert summarize([7.0]).std == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_warmup_then_number_calls_per_sample_on_a_fake_clock():
    clock = FakeClock([2.0])  # every call takes 2 ms
    p = Protocol(warmup_calls=10, warmup_ms=200, repeat=7, min_repeat_ms=50)
    m = measure(clock.fn, p, WallTimer(clock=clock.now))
    warmup_calls = 100  # 200 ms of 2 ms calls outlasts the 10-call minimum
    assert m.number == 25  # ceil(50 ms / 2 ms)
    assert clock.calls == warmup_calls + 7 * 25
    assert m.samples_ms == pytest.approx([2.0] * 7)
    assert m.stats.p50 == pytest.approx(2.0) and m.stats.n == 7 and m.stats.std == pytest.approx(0.0, abs=1e-9)


def test_slow_warmup_first_calls_do_not_set_the_sample_size():
    # two cold calls of 100 ms, then 1 ms calls: number follows the warm calls
    clock = FakeClock([100.0, 100.0] + [1.0] * 10_000)
    m = measure(clock.fn, Protocol(warmup_calls=10, warmup_ms=0, repeat=3, min_repeat_ms=10),
                WallTimer(clock=clock.now))
    assert m.number == 10
    assert m.samples_ms == pytest.approx([1.0, 1.0, 1.0])


def test_interleaved_timing_alternates_a_and_b():
    order = []
    t = {"now": 0.0}

    def make(name, ms):
        def fn():
            order.append(name)
            t["now"] += ms / 1e3
        return fn

    p = Protocol(warmup_calls=1, warmup_ms=0, repeat=3, min_repeat_ms=0)
    res = measure_interleaved({"a": make("a", 2.0), "b": make("b", 6.0)}, p, WallTimer(clock=lambda: t["now"]))
    assert order[-6:] == ["a", "b"] * 3
    assert res["a"].stats.p50 == pytest.approx(2.0) and res["b"].stats.p50 == pytest.approx(6.0)


def test_protocol_rejects_nonsense():
    with pytest.raises(ValueError, match="repeat must be at least 1"):
        Protocol(repeat=0)
    with pytest.raises(ValueError, match="min_repeat_ms must be >= 0"):
        Protocol(min_repeat_ms=-1)
