"""The one round phase every phase times through: what it times, in which order, how it fails."""

import pytest

from harness.measure.pipeline import Result
from harness.measure.protocol import Protocol, WallTimer
from harness.measure.rounds import RoundPhase

PROTOCOL = Protocol(warmup_calls=1, warmup_ms=0, repeat=8, min_repeat_ms=0)


class OneMsTimer(WallTimer):
    """Every call takes 1 ms (the callables log themselves by name)."""

    def elapsed_ms(self, fn, number):
        for _ in range(number):
            fn()
        return 1.0 * number


def _logger(log, name):
    return lambda: log.append(name)


def test_only_ok_results_are_timed_and_a_failing_preparation_is_measure_failed():
    log, drift = [], {}
    phase = RoundPhase("p", PROTOCOL, OneMsTimer(), record_drift=lambda name, f: drift.setdefault(name, f))
    ok = phase.add("a", Result("ok"), lambda r: (_logger(log, "a"), r.replace(details={"x": 1})))
    failed = phase.add("b", Result("check_failed", "wrong"), lambda r: (_logger(log, "b"), r))

    def cannot_prepare(r):
        raise RuntimeError("no input for it")

    unprepared = phase.add("c", Result("ok"), cannot_prepare)
    assert ok.ok and ok.details == {"x": 1}
    assert failed.status == "check_failed" and "b" not in phase
    assert unprepared.status == "measure_failed" and "no input for it" in unprepared.error and "c" not in phase
    out = phase.measure()
    assert set(out) == {"a"} and set(log) == {"a"}
    assert out["a"].measurement.stats.n == PROTOCOL.repeat and out["a"].details == {"x": 1}
    assert out["a"].row()["latency_ms_p50"] == pytest.approx(1.0)
    assert list(drift) == ["p"] and len(drift["p"]) == PROTOCOL.repeat


def test_a_group_keeps_its_order_in_every_round_while_units_are_shuffled():
    log = []
    phase = RoundPhase("p", PROTOCOL, OneMsTimer(), seed=5)
    for name in ("h", "t", "x", "y", "z"):
        phase.add_call(name, _logger(log, name))
    phase.group(["h", "t"])
    phase.measure()
    rounds = [log[5 + 5 * i: 10 + 5 * i] for i in range(PROTOCOL.repeat)]  # after one warm-up call each
    assert all(sorted(r) == sorted("htxyz") for r in rounds)
    assert all(r.index("t") == r.index("h") + 1 for r in rounds)  # the chain in its order, unbroken
    assert len({tuple(r) for r in rounds}) > 1  # the units' order changes between rounds
    with pytest.raises(ValueError, match="group"):
        phase.group(["x", "nope"])
    with pytest.raises(ValueError, match="twice"):
        phase.add_call("x", _logger(log, "x"))


def test_a_phase_whose_timing_raises_fails_every_engine_and_records_no_drift():
    drift = {}
    phase = RoundPhase("p", PROTOCOL, WallTimer(), record_drift=lambda name, f: drift.setdefault(name, f))
    calls = {"n": 0}

    def breaks_in_the_rounds():
        calls["n"] += 1
        if calls["n"] > 1:  # the warm-up call passes
            raise RuntimeError("device lost")

    phase.add_call("a", lambda: None)
    phase.add_call("b", breaks_in_the_rounds)
    out = phase.measure()
    assert {k: r.status for k, r in out.items()} == {"a": "measure_failed", "b": "measure_failed"}
    assert all("device lost" in r.error for r in out.values())
    assert drift == {} and phase.rounds is None


def test_an_empty_phase_measures_nothing():
    assert RoundPhase("p", PROTOCOL).measure() == {}
