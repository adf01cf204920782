"""DS-Net++ Table 2 measured: the six ways of running ResNet-50 at 25% channels, each checked and timed
in one round phase, their artifacts built alongside the build worker."""

import json

import pytest

from harness.measure.build_worker import BuildWorker
from harness.measure.protocol import Protocol
from harness.phases.context import RunContext
from harness.phases.table2 import TABLE2_WAYS, measure_table2
from harness.results.layout import Layout
from harness.results.store import ResultStore
from harness.targets import load_target

X86 = load_target("x86").resolve()
FAST = Protocol(warmup_calls=2, warmup_ms=0, repeat=4, min_repeat_ms=0, budget_s=0)


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_every_way_is_checked_timed_and_stored_once(backend, tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), FAST, store, "cpu", False, "test")
    with BuildWorker() as worker:
        measure_table2(ctx, backend, "fp32", 32, "s_resnet50_tiny", worker=worker)
    rows = store.dynamic_frame()
    assert sorted(rows.name) == sorted(TABLE2_WAYS) and set(rows.kind) == {"table2"}
    assert (rows.status == "ok").all(), rows[rows.status != "ok"][["name", "error"]]
    assert (rows.latency_ms_p50 > 0).all() and (rows.madds > 0).all()
    assert rows.set_index("name").madds["full"] > rows.set_index("name").madds["slicing"]
    built_by = [json.loads(d or "{}").get("build_process") for d in rows.backend_details]
    # torchscript: the worker built some artifacts (loaded and checked here); eager builds nothing
    assert ("worker" in built_by) == (backend != "eager")
    measure_table2(ctx, backend, "fp32", 32, "s_resnet50_tiny")  # stored: a re-run measures nothing again
    assert len(store.dynamic_frame()) == len(TABLE2_WAYS)
    store.close()
