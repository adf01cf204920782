"""The dynamic phase: one round phase whose rows say what is deployed, what the LUT prices it at, and
what the dispatch costs (with its interval), checked before anything is timed."""

import json

import pandas as pd
import pytest

import dsnet
from harness.deploy.lut import DISPATCH_NAME, LatencyLUT, holds_zero, route_segment_names
from harness.measure.protocol import Measurement, Protocol
from harness.phases.context import RunContext
from harness.phases.dynamic import (
    dispatch_estimate,
    dispatch_result,
    record_engine_failure,
    run_dynamic,
    split_differences,
)
from harness.results.layout import Layout
from harness.results.store import ResultStore
from harness.targets import load_target

X86 = load_target("x86").resolve()
FAST = Protocol(warmup_calls=2, warmup_ms=0, repeat=6, min_repeat_ms=0, budget_s=0)


def test_dispatch_is_paired_by_round_and_divided_by_the_gates():
    deployed = Measurement([10.0, 11.0, 12.0], 1, [0, 1, 2])
    head = Measurement([4.0, 4.5, 5.0], 1, [0, 1, 2])
    tail = Measurement([5.0, 6.0], 1, [0, 2])  # round 1 lost: that round is left out
    assert dispatch_estimate(deployed, [head, tail], 2) == pytest.approx([0.5, 1.0 / 2])


def test_the_cut_at_the_gates_is_the_chain_of_parts_minus_the_static_engine_paired_by_round():
    static = Measurement([8.0, 9.0, 8.5, 9.5], 1, [0, 1, 2, 3])
    head = Measurement([4.0, 4.5, 5.0, 4.0], 1, [0, 1, 2, 3])
    tail = Measurement([4.5, 5.0, 4.0], 1, [0, 1, 3])  # round 2 lost: that round is left out
    assert split_differences([head, tail], static) == pytest.approx([0.5, 0.5, -1.5])
    assert split_differences([head, tail], Measurement([7.0], 1, [2])) == []  # no round in common


def test_a_dispatch_cost_is_signed_and_refused_only_when_a_part_would_take_negative_time():
    """The parts' own samples are no floor under the deployed path (what ran before a call moves its
    time): a saving per decision is kept, signed, unless it exceeds the cheapest part after a gate."""
    assert dispatch_result([], FAST, 1.0).status == "measure_failed"
    saving = [-0.3, -0.2, -0.25, -0.31, -0.22, -0.28, -0.27, -0.24]
    kept = dispatch_result(saving, FAST, 1.0)
    assert kept.ok and kept.measurement.stats.ci_high < 0 and kept.measurement.stats.p50 < 0
    refused = dispatch_result(saving, FAST, 0.15)  # the deployed path would have run a 0.15 ms part in < 0
    assert refused.status == "measure_failed" and "impossible" in refused.error and "refused" in refused.error
    assert "150 us" in refused.error
    ok = dispatch_result([-0.01, 0.02, 0.01, 0.0, 0.03, -0.02, 0.01, 0.02], FAST, 0.0)
    assert ok.ok and ok.measurement.stats.ci_low <= 0 <= ok.measurement.stats.ci_high


@pytest.fixture(scope="module")
def eager_phase(tmp_path_factory):
    """DS-MBNet at 64 px on eager: its dynamic phase with a short protocol (acceleration included:
    MobileNetV1 is its static counterpart)."""
    tmp = tmp_path_factory.mktemp("phase")
    store = ResultStore(tmp / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp), FAST, store, "cpu", False, "test")
    # an earlier run's failed build, which this run's must replace
    record_engine_failure(ctx, "ds_mbnet", "eager", "fp32", 64, RuntimeError("an earlier build failed"))
    run_dynamic(ctx, "ds_mbnet", "eager", "fp32", 64)
    df = store.dynamic_frame()
    samples = pd.read_sql_query("SELECT kind, name, samples_ms, rounds FROM dynamic", store.db)
    store.close()
    return df.merge(samples, on=["kind", "name"], how="left", validate="one_to_one")


def test_the_phase_stores_every_kind_in_one_round_phase(eager_phase):
    df = eager_phase
    # every row ok; the dispatch cost may be refused (a saving beyond a part's own time: a measured
    # time, not a property of the code, so the test does not depend on it)
    rest = df[df.kind != "dispatch"]
    assert (rest.status == "ok").all(), rest[rest.status != "ok"][["kind", "name", "error"]]
    d = df[df.kind == "dispatch"].iloc[0]
    assert d.status == "ok" or "impossible" in d.error
    routes = [str(r) for r in dsnet.create_model("ds_mbnet").routes(64)]
    count = df.groupby("kind").size().to_dict()
    assert count == {"segment": 1 + 14, "dispatch": 1, "route": 14, "static": 14, "deployed": 14, "overhead": 7,
                     "static_steady": 14, "deployed_steady": 14, "stream": 1, "batch": 2, "acceleration": 4,
                     "engine": 1}
    assert df[df.kind == "engine"].status.tolist() == ["ok"]  # the earlier failure no longer stands
    for kind in ("route", "static", "deployed", "static_steady", "deployed_steady"):
        assert sorted(df[df.kind == kind].name, key=int) == routes
    acc = df[df.kind == "acceleration"].set_index("name")
    assert set(acc.index) == {"largest", "matched", "dynamic", "static_mix"} and (acc.latency_ms_mean > 0).all()
    assert set(df[df.kind == "batch"].batch_size) == {1, 8}
    # the deployed path's overhead over the static engines, the part of it due to the cut at the gates,
    # and Table 7's two shares and two speed-ups paired round by round
    over = df[df.kind == "overhead"].set_index("name")
    assert set(over.index) == {"deployed", "split", "mix", "architecture", "realized", "ideal", "deployed_steady"}
    # the steady-state pair: the deployed path minus the static engine, each right after itself, per round
    # and pooled over the routes
    steady = df[df.kind.isin(["static_steady", "deployed_steady"])].set_index(["kind", "name"])
    diffs = []
    for route in routes:
        ref = dict(zip(json.loads(steady.rounds["static_steady", route]),
                       json.loads(steady.samples_ms["static_steady", route])))
        diffs += [s - ref[r] for r, s in zip(json.loads(steady.rounds["deployed_steady", route]),
                                             json.loads(steady.samples_ms["deployed_steady", route])) if r in ref]
        assert steady.predicted_ms["deployed_steady", route] == steady.latency_ms_p50["static_steady", route]
    assert sorted(json.loads(over.samples_ms["deployed_steady"])) == pytest.approx(sorted(diffs))
    for name, kind, ref in (("realized", "dynamic", "largest"), ("ideal", "matched", "largest")):
        rounds = dict(zip(json.loads(acc.rounds[ref]), json.loads(acc.samples_ms[ref])))
        diffs = [s - rounds[r] for r, s in zip(json.loads(acc.rounds[kind]), json.loads(acc.samples_ms[kind]))
                 if r in rounds]
        assert sorted(json.loads(over.samples_ms[name])) == pytest.approx(sorted(diffs))


def test_route_rows_are_what_the_stored_lut_prices_the_deployed_route_at(eager_phase):
    df = eager_phase
    lut = LatencyLUT.from_frame(df, "ds_mbnet", "eager", input_size=64)
    d = df[(df.kind == "dispatch") & (df.name == DISPATCH_NAME)].iloc[0]
    counted = d.status == "ok" and not holds_zero(d.latency_ms_p50_ci_low, d.latency_ms_p50_ci_high)
    used = d.latency_ms_p50 if counted else 0.0
    assert lut.dispatch_ms == pytest.approx(used)
    seg = df[df.kind == "segment"].set_index("name").latency_ms_p50
    for r in df[df.kind == "route"].itertuples():
        route = dsnet.Route.parse(r.name)
        expected = sum(seg[n] for n in route_segment_names(route)) + used
        assert r.predicted_ms == pytest.approx(expected) == pytest.approx(lut.latency(route))
        assert r.rel_error == pytest.approx((r.predicted_ms - r.latency_ms_p50) / r.latency_ms_p50)
    # the deployed rows are set against the route's static engine in the same rounds
    static = df[df.kind == "static"].set_index("name").latency_ms_p50
    deployed = df[df.kind == "deployed"].set_index("name")
    assert (deployed.predicted_ms == static.reindex(deployed.index)).all()


def test_a_rerun_measures_nothing_when_every_row_is_stored(eager_phase, tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    for row in eager_phase.to_dict("records"):
        store.record_dynamic({k: v for k, v in row.items() if not pd.isna(v)})
    ctx = RunContext(X86, Layout(tmp_path), FAST, store, "cpu", False, "rerun")
    run_dynamic(ctx, "ds_mbnet", "eager", "fp32", 64)
    assert set(store.dynamic_frame().run_id) == {"test"}  # nothing re-measured under the new run's id
    # a failed build left by an older run beside rows measured since: built again here, it says ok
    record_engine_failure(ctx, "ds_mbnet", "eager", "fp32", 64, RuntimeError("an earlier build failed"))
    run_dynamic(ctx, "ds_mbnet", "eager", "fp32", 64)
    df = store.dynamic_frame()
    assert df[df.kind == "engine"].status.tolist() == ["ok"] and set(df[df.kind != "engine"].run_id) == {"test"}
    store.close()


@pytest.mark.parametrize("second", ["possible", "impossible"])
def test_an_impossible_dispatch_is_measured_again_once_then_refused(tmp_path, monkeypatch, second):
    """The rounds that gave an impossible dispatch cost are run once more; the second value is kept
    (refused when it is impossible again), and the row says it was re-measured and why."""
    import harness.phases.dynamic as dynamic
    from harness.measure.rounds import RoundPhase

    calls, measured = [], []
    real_estimate, real_measure = dynamic.dispatch_estimate, RoundPhase.measure

    def estimate(deployed, parts, gates):  # the first rounds: the deployed path a second cheaper than its parts
        values = real_estimate(deployed, parts, gates)
        impossible = len(measured) == 1 or second == "impossible"
        calls.append(impossible)
        return [-1e3 - abs(v) for v in values] if impossible else values

    def measure(self, on_round=None, earlier=None):
        measured.append(self.name)
        return real_measure(self, on_round, earlier)

    monkeypatch.setattr(dynamic, "dispatch_estimate", estimate)
    monkeypatch.setattr(RoundPhase, "measure", measure)
    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), FAST, store, "cpu", False, "test")
    dynamic.DynamicPhase(ctx, "ds_mbnet_tiny", "eager", "fp32", 64).run(lut_only=True)
    df = store.dynamic_frame()
    store.close()
    assert len(measured) == 2  # one phase, its rounds run twice
    d = df[df.kind == "dispatch"].iloc[0]
    details = json.loads(d.backend_details)
    assert "impossible" in details["remeasured"]
    if second == "possible":
        assert d.status == "ok"
    else:
        assert d.status == "measure_failed" and "impossible" in d.error and "refused" in d.error
    assert (df[df.kind == "segment"].status == "ok").all()


def _lut_frame(valid=True, with_intervals=True):
    """A hand-made dynamic.csv of the tiny DS-MBNet (4 routes): head 1 ms, route c its tail (c + 1) ms."""
    base = {"model": "ds_mbnet_tiny", "backend": "eager", "precision": "fp32", "batch_size": 1, "input_size": 32,
            "status": "ok", "error": ""}
    rows = [base | {"kind": "segment", "name": "head", "latency_ms_p50": 1.0, "latency_ms_p50_ci_low": 0.9,
                    "latency_ms_p50_ci_high": 1.1, "valid": 1}]
    rows += [base | {"kind": "segment", "name": f"s0_inx_c{c}", "latency_ms_p50": c + 1.0,
                     "latency_ms_p50_ci_low": c + 1.0 - 0.2, "latency_ms_p50_ci_high": c + 1.0 + 0.2,
                     "valid": int(valid or c != 2)} for c in range(4)]
    # route 1's deployed timing has an interval wider than the protocol allows (valid 0)
    rows += [base | {"kind": "route", "name": str(c), "latency_ms_p50": 2.0 + c, "rel_error": e, "valid": v}
             for c, e, v in ((0, 0.02, 1), (3, -0.06, 1), (1, 0.12, 0))]
    df = pd.DataFrame(rows)
    return df if with_intervals else df.drop(columns=["latency_ms_p50_ci_low", "latency_ms_p50_ci_high", "valid"])


def test_the_lut_says_which_routes_rest_on_invalid_segments_and_how_far_its_prices_hold():
    model = dsnet.create_model("ds_mbnet_tiny")
    r = LatencyLUT.from_frame(_lut_frame(valid=False), "ds_mbnet_tiny", "eager").reliability(model)
    assert r.routes == 4 and r.invalid_segments == ("s0_inx_c2",) and r.invalid_routes == ("2",)
    # route c: half-widths 0.1 (head) + 0.2 (tail) over 2 + c ms
    assert r.interval_max == pytest.approx(0.3 / 2) and r.interval_median == pytest.approx(
        float(pd.Series([0.3 / (2 + c) for c in range(4)]).median()))
    # a deployed timing too noisy to judge the LUT by is named with its error, not counted
    assert (r.validated, r.error_median, r.error_max) == (2, pytest.approx(0.04), pytest.approx(0.06))
    assert r.unjudged == (("1", pytest.approx(0.12)),)
    note = r.note()
    assert "1 of 4 routes" in note and "s0_inx_c2" in note and "routes 2" in note and "+-15.0%" in note
    assert "1 route(s) not judged" in note and "1 (+12.0%)" in note
    assert "every segment valid" in LatencyLUT.from_frame(_lut_frame(), "ds_mbnet_tiny", "eager").reliability(
        model).note()
    # an export without intervals or validity (older results): nothing is claimed of them
    old = LatencyLUT.from_frame(_lut_frame(with_intervals=False), "ds_mbnet_tiny", "eager").reliability(model)
    assert old.invalid_segments == () and old.interval_median is None and "+-" not in old.note()
    assert old.validated == 3 and old.unjudged == ()  # no validity stored: every route counts


def test_crafted_inputs_are_kept_for_later_runs_and_a_planted_one_is_found_again(tmp_path, monkeypatch):
    """The one artifact's per-route inputs (gradient steps: minutes at 224 px) are stored in the cache
    folder as plain arrays; a later process loads one only when the eager plan still takes the route
    on it."""
    import numpy as np
    import torch

    import harness.phases.dynamic as dynamic
    from dsnet.one_graph import input_for_route

    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), FAST, store, "cpu", False, "test")
    searches = []

    def counted(plan, route, example):
        searches.append(tuple(route))
        return input_for_route(plan, route, example)

    def fresh_process():
        monkeypatch.setattr(dynamic, "_CRAFTED", {})
        return dynamic.DynamicPhase(ctx, "ds_mbnet_tiny", "eager", "fp32", 64)

    route = tuple(int(c) for c in dsnet.create_model("ds_mbnet_tiny").routes(64)[-1])
    first = fresh_process()._crafted(route, counted)
    (path,) = (tmp_path / "cache" / "crafted").glob("*.npy")
    assert searches == [tuple(route)]
    again = fresh_process()._crafted(route, counted)
    assert searches == [tuple(route)] and np.array_equal(again.numpy(), first.numpy())
    zeros = np.zeros(first.shape, np.float32)
    assert dynamic._route_taken(fresh_process().plan, torch.from_numpy(zeros)) != tuple(route)  # precondition
    for planted in (zeros, np.array([["not", "an image"]])):
        np.save(path, planted)
        searches.clear()
        phase = fresh_process()
        x = phase._crafted(route, counted)
        assert searches == [tuple(route)], "a planted input was used"
        assert dynamic._route_taken(phase.plan, x) == tuple(route)
    store.close()


def test_a_search_that_fails_is_remembered_and_the_one_artifact_is_timed_on_the_gates_own_routes(tmp_path,
                                                                                                 monkeypatch):
    """Where no input is found for a route (a gate that never ranks that choice first), the search is
    not run again by a later process, and the one artifact is still timed: on routes the gates take on
    seeded images, the phase's own image first, each beside its static engine even when not priced."""
    import harness.phases.dynamic as dynamic

    searches = []

    def unreachable(plan, route, example):
        searches.append(tuple(route))
        raise ValueError(f"no input found that takes route {list(route)} in 0 steps")

    monkeypatch.setattr(dynamic, "input_for_route", unreachable)
    monkeypatch.setattr(dynamic, "_CRAFTED", {})
    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), FAST, store, "cpu", False, "test")
    probe = dynamic.DynamicPhase(ctx, "ds_mbnet_tiny", "torchscript", "fp32", 64)
    natural = [r for r, _ in probe._natural_routes()]  # all of them: the probe is not stopped early
    others = [r for r in probe.routes if r != natural[0]]
    monkeypatch.setattr(dynamic, "validation_routes", lambda routes, n=None: others[:2])  # not the image's own route
    run_dynamic(ctx, "ds_mbnet_tiny", "torchscript", "fp32", 64)
    df = store.dynamic_frame()
    one = df[df.kind == "one_graph"].set_index("name")
    assert sorted(searches) == sorted(tuple(int(c) for c in r) for r in others[:2])
    timed = [str(r) for r in natural[:2]]  # as many as the crafted inputs sought
    assert sorted(one.index[one.status == "ok"]) == sorted(timed), one[["status", "error"]]
    assert (one.loc[timed, "predicted_ms"] > 0).all()  # each beside its static engine, in the same rounds
    statics = df[df.kind == "static"].set_index("name")
    assert (statics.loc[timed, "status"] == "ok").all()
    failed = one[one.status != "ok"]
    assert (failed.status == "measure_failed").all() and failed.error.str.contains("no input found").all()
    assert df[(df.kind == "deployed") & (df.name == str(natural[0]))].empty  # not priced: no deployed row
    assert len(list((tmp_path / "cache" / "crafted").glob("*.unreachable"))) == 2
    # a later process: the failures are read back, not searched again
    searches.clear()
    monkeypatch.setattr(dynamic, "_CRAFTED", {})
    phase = dynamic.DynamicPhase(ctx, "ds_mbnet_tiny", "torchscript", "fp32", 64)
    with pytest.raises(ValueError, match="an earlier run's search"):
        phase._crafted(others[0])
    assert searches == []
    store.close()
