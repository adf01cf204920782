"""The measurement protocol on a fake clock: warm-up, number calibration, statistics, interleaving."""

import numpy as np
import pytest

from harness.measure.protocol import (
    Protocol,
    WallTimer,
    measure,
    measure_interleaved,
    measure_rounds,
    median_interval,
    summarize,
)


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


def test_rounds_get_the_ranking_right_under_drift_where_sequential_timing_fails():
    """The machine slows down steadily (a planted drift of 0.3% per call); engine a is truly 3%
    faster than b. Timed one after the other (b first), a looks slower; in rounds, a wins."""
    state = {"t": 0.0, "calls": 0}

    def make(true_ms):
        def fn():
            state["t"] += true_ms * (1 + 3e-3 * state["calls"]) / 1e3
            state["calls"] += 1
        return fn

    clock = WallTimer(clock=lambda: state["t"])
    p = Protocol(warmup_calls=5, warmup_ms=0, repeat=30, min_repeat_ms=0)
    a, b = make(1.00), make(1.03)
    seq_b = measure(b, p, clock).stats.p50
    seq_a = measure(a, p, clock).stats.p50
    assert seq_a > seq_b  # sequential timing ranks them wrongly
    res = measure_rounds({"a": a, "b": b}, p, clock, seed=0)
    assert res["a"].stats.p50 < res["b"].stats.p50  # rounds rank them rightly
    assert len(res.factors) == 30 and res.factors[-1] > res.factors[0]  # the drift is visible in the factors


class FlaggingTimer(WallTimer):
    """A wall timer that sets ``on`` while it times (so a callable tells a timed call from the
    warm-up's or a primed one) and reports every sample as 1 ms."""

    def __init__(self):
        super().__init__()
        self.on = False

    def elapsed_ms(self, fn, number):
        self.on = True
        super().elapsed_ms(fn, number)
        self.on = False
        return 1.0


def test_every_round_visits_every_engine_once_in_a_fresh_seeded_order():
    log = []
    timer = FlaggingTimer()

    def make(name):
        def fn():
            if timer.on:
                log.append(name)
        return fn

    fns = {n: make(n) for n in "abcd"}
    p = Protocol(warmup_calls=1, warmup_ms=0, repeat=12, min_repeat_ms=0)
    res = measure_rounds(fns, p, timer, seed=3)
    assert log[:4] == list("abcd")  # the warm-up: one call each, before any round
    timed = log[4:]
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # the order changes from round to round
    assert res["a"].rounds == list(range(12))
    for n in "abcd":  # each sample's place in the phase's timing sequence, kept with it
        assert res[n].order == [i for i, name in enumerate(timed) if name == n]
    first = list(log)
    log.clear()
    measure_rounds(fns, p, timer, seed=3)
    assert log == first  # seeded: the same order again


def test_a_primed_callable_is_timed_right_after_an_untimed_call_of_its_own():
    """``primed``: every sample of ``a`` follows one call of ``a`` that is not timed (its steady
    state); ``b`` is timed after whatever ran before it."""
    log = []
    timer = FlaggingTimer()
    fns = {n: (lambda n=n: log.append((n, timer.on))) for n in "ab"}
    p = Protocol(warmup_calls=1, warmup_ms=0, repeat=5, min_repeat_ms=0)
    res = measure_rounds(fns, p, timer, seed=1, primed={"a"})
    rounds = log[2:]  # after the warm-up
    assert [c for c in rounds if c[0] == "a"] == [("a", False), ("a", True)] * 5
    assert [c for c in rounds if c[0] == "b"] == [("b", True)] * 5
    for i, call in enumerate(rounds):  # the untimed call comes right before the timed one
        if call == ("a", True):
            assert rounds[i - 1] == ("a", False)
    assert len(res["a"].samples_ms) == len(res["b"].samples_ms) == 5
    with pytest.raises(ValueError, match="primed names callables not given"):
        measure_rounds(fns, p, timer, primed={"c"})


def test_rounds_continue_earlier_ones_from_another_process():
    """``earlier`` (the same engines timed in another process): its samples come first, this call's
    rounds are numbered after its rounds, pairs stay within a round, and the speed factors span both
    (a process twice as slow is a slow round, not a slower engine)."""
    from harness.measure.protocol import paired_ratio

    p = Protocol(warmup_calls=1, warmup_ms=0, repeat=3, min_repeat_ms=0)
    speed = {"now": 1.0}

    class Timer(WallTimer):
        def elapsed_ms(self, fn, number):
            return fn() * speed["now"]

    fns = {"a": lambda: 10.0, "b": lambda: 4.0}
    first = measure_rounds(fns, p, Timer(), seed=3)
    speed["now"] = 2.0  # the second process draws a slower machine
    both = measure_rounds(fns, p, Timer(), seed=3, earlier=first.measurements)
    assert both["a"].samples_ms == [10.0] * 3 + [20.0] * 3 and both["a"].rounds == list(range(6))
    assert both["b"].order[:3] == first["b"].order and min(both["b"].order[3:]) > max(first["a"].order)
    assert paired_ratio(both["b"], both["a"]) == pytest.approx(0.4)
    assert both.factors == pytest.approx([2 / 3] * 3 + [4 / 3] * 3)
    assert both.drift_corrected("a").p50 == pytest.approx(15.0) and both["a"].stats.p50 == pytest.approx(15.0)


def test_median_interval_and_validity_on_known_samples():
    assert median_interval(30) == (9, 20)  # the binomial table's 10th and 21st of 30
    assert median_interval(3) == (0, 2)  # few samples: the whole range
    s = summarize(list(range(1, 31)), number=1, protocol=Protocol(max_ci_fraction=0.5, min_measured_ms=100))
    assert (s.ci_low, s.ci_high) == (10.0, 21.0) and s.p50 == 15.5
    assert s.valid  # half-width 5.5 <= 0.5 * 15.5 and 465 ms measured
    assert not summarize(list(range(1, 31)), 1, Protocol(max_ci_fraction=0.1, min_measured_ms=100)).valid
    assert not summarize([10.0] * 30, 1, Protocol(min_measured_ms=1000)).valid  # too little time measured
    assert summarize([10.0] * 30, 4, Protocol(min_measured_ms=1000)).valid  # 30 samples of 4 calls: 1.2 s


def test_a_paired_ratio_cancels_the_drift_between_rounds():
    from harness.measure.protocol import Measurement, paired_ratio

    drift = [1.0, 1.5, 0.8, 2.0, 1.1]
    ref = Measurement([10.0 * d for d in drift], 1, rounds=list(range(5)))
    m = Measurement([4.0 * d for d in drift], 1, rounds=list(range(5)))
    assert paired_ratio(m, ref) == pytest.approx(0.4)  # exact, although the samples spread 2.5x
    with pytest.raises(ValueError, match="share no round"):
        paired_ratio(m, Measurement([1.0], 1, rounds=[9]))


def test_drift_corrected_statistics_divide_out_each_rounds_speed_factor():
    """Two engines, every round slowed by a planted factor: the raw samples spread 2.5x, the
    drift-corrected ones not at all, and the corrected p50 keeps each engine's typical time."""
    from harness.measure.protocol import Measurement, Rounds, _round_factors

    drift = [1.0, 1.5, 0.8, 2.0, 1.1]
    ms = {"a": Measurement([10.0 * d for d in drift], 1, rounds=list(range(5))),
          "b": Measurement([4.0 * d for d in drift], 1, rounds=list(range(5)))}
    res = Rounds(ms, _round_factors(ms))
    assert res.factors == pytest.approx([d / 1.1 for d in drift])  # 1.1: the median round
    a = res.drift_corrected("a")
    assert a.p50 == pytest.approx(11.0) and a.ci_low == pytest.approx(a.ci_high)
    assert ms["a"].stats.ci_high / ms["a"].stats.ci_low > 1.2  # the raw interval is wide
    assert res.drift_corrected("b").p50 / a.p50 == pytest.approx(0.4)
