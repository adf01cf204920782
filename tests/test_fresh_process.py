"""The dynamic phase timed in fresh processes: they load what the run's process built (build
nothing), their rounds are pooled into rows stored under the run's id, and a timing process that
fails or dies is recorded."""

import dataclasses
import gc
import os

import pandas as pd

import harness.run as runmod
from harness.measure.protocol import Protocol
from harness.phases.context import RunContext
from harness.phases.dynamic import DynamicPhase, run_dynamic
from harness.phases.fresh import TIMING_PROCESSES, run_dynamic_fresh, time_in_fresh_process
from harness.results.layout import Layout
from harness.results.store import ResultStore
from harness.targets import load_target

X86 = load_target("x86").resolve()
FAST = Protocol(warmup_calls=2, warmup_ms=0, repeat=4, min_repeat_ms=0, budget_s=0)
SIZE = 32


def _context(root) -> RunContext:
    return RunContext(X86, Layout(root), FAST, ResultStore(root / "results.sqlite"), "cpu", False, "run-1")


def _artifacts(root) -> dict:
    """Every file under the artifact cache with its modification time and size."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in (root / "cache").rglob("*") if p.is_file()}


def _engine_row(ctx, backend="torchscript") -> pd.Series:
    df = ctx.store.dynamic_frame()
    return df[(df.kind == "engine") & (df.backend == backend)].iloc[0]


def test_the_fresh_process_times_what_this_one_built_and_builds_nothing(tmp_path):
    other = _context(tmp_path / "other")  # a results folder this process prepared before (inputs it searched)
    assert run_dynamic(other, "ds_mbnet_tiny", "torchscript", "fp32", SIZE, validate=3, measure=False)
    other.close()
    ctx = _context(tmp_path)
    assert run_dynamic(ctx, "ds_mbnet_tiny", "torchscript", "fp32", SIZE, validate=3, measure=False)
    assert ctx.store.dynamic_frame().empty  # built and checked, nothing timed or stored
    gc.collect()  # and let go: nothing keeps the phase (its engines) alive while the other process loads its own
    assert not any(isinstance(o, DynamicPhase) for o in gc.get_objects())
    built = _artifacts(tmp_path)
    assert any(p.name == "model.ts" for p in built)
    time_in_fresh_process(ctx, "ds_mbnet_tiny", "torchscript", "fp32", SIZE, validate=3)
    assert _artifacts(tmp_path) == built  # every artifact loaded from the cache, none written
    df = ctx.store.dynamic_frame()  # this process's store sees the other's rows
    deployed = df[df.kind == "deployed"]
    assert len(deployed) == 3 and (deployed.status == "ok").all() and (deployed.latency_ms_p50 > 0).all()
    # two timing processes, one after the other: every row holds the rounds of both
    assert (deployed.n == TIMING_PROCESSES * FAST.repeat).all() and TIMING_PROCESSES == 2
    factors = ctx.store.db.execute("SELECT round FROM drift WHERE phase LIKE 'dynamic ds_mbnet_tiny%'").fetchall()
    assert sorted(r for (r,) in factors) == list(range(TIMING_PROCESSES * FAST.repeat))
    assert set(df.run_id) == {"run-1"}
    engine = _engine_row(ctx)
    assert engine.status == "ok" and "2 fresh processes" in engine.backend_details
    # stored: the next run builds nothing and starts no process
    assert not run_dynamic(ctx, "ds_mbnet_tiny", "torchscript", "fp32", SIZE, validate=3, measure=False)
    ctx.close()


def test_a_timing_process_that_fails_is_recorded_and_the_run_goes_on(tmp_path):
    ctx = _context(tmp_path)
    (tmp_path / "elsewhere").write_text("a file where the timing process's results folder would be\n")
    elsewhere = dataclasses.replace(ctx, layout=Layout(tmp_path / "elsewhere" / "under"))
    time_in_fresh_process(elsewhere, "ds_mbnet_tiny", "torchscript", "fp32", SIZE, validate=3)
    engine = _engine_row(ctx)
    assert engine.status == "measure_failed" and engine.error.startswith("the timing process (1 of 2) failed: ")
    ctx.close()


def _exit_at_once(steps):
    """A progress factory that ends the timing process the moment the phase starts."""
    os._exit(3)


def test_a_timing_process_that_dies_is_recorded(tmp_path):
    ctx = _context(tmp_path)
    run_dynamic_fresh(ctx, "ds_mbnet_tiny", "eager", "fp32", SIZE, validate=3)  # a first phase: it stores
    eager = _engine_row(ctx, "eager")
    assert eager.status == "ok" and "2 fresh processes" in eager.backend_details
    time_in_fresh_process(ctx, "ds_mbnet_tiny", "torchscript", "fp32", SIZE, _exit_at_once, validate=3)
    engine = _engine_row(ctx)
    assert engine.status == "measure_failed"
    assert engine.error == "the timing process (1 of 2) ended (exit code 3) before it finished"
    ctx.close()


def test_in_process_times_the_dynamic_engine_in_the_runs_process(tmp_path):
    profile = tmp_path / "cpu-test.toml"
    profile.write_text('name = "cpu-test"\ndevice = "cpu"\nbackends = ["eager"]\ndynamic_backends = ["eager"]\n'
                       f'input_size = {SIZE}\n[protocol]\nwarmup_calls = 2\nwarmup_ms = 0\nrepeat = 3\n'
                       'min_repeat_ms = 0\n')
    out = tmp_path / "out"
    assert runmod.main(["--target", str(profile), "--models", "ds_mbnet_tiny", "--phases", "dynamic",
                        "--in-process", "--results", str(out)]) == 0
    dyn = pd.read_csv(out / "dynamic.csv")
    engine = dyn[dyn.kind == "engine"].iloc[0]
    assert engine.status == "ok" and "the run's process" in engine.backend_details
