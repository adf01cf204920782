"""TVM MetaSchedule tuning: one database shared by networks, each workload tuned once, re-runs tune nothing.

Two tiny convolutional networks sharing their first layer stand in for two routes (tuning a real
route takes ~35 s per layer on 2 cores).
"""

import dataclasses

import pytest
import torch
from torch import nn

from harness.backends import Failure, compile_engine, get_backend
from harness.sweep import check_output
from harness.targets import load_target

pytestmark = pytest.mark.slow


def _nets():
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    second = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU())
    return first.eval(), second.eval()


def test_shared_database_tunes_each_workload_once(tmp_path):
    backend = get_backend("tvm", tuning_dir=tmp_path / "tvm_tuning")
    x86 = load_target("x86").resolve()
    if backend.unavailable(x86):
        pytest.skip(backend.unavailable(x86))
    target = dataclasses.replace(x86, tvm={**x86.tvm, "tune_trials": 1})
    x = torch.randn(1, 3, 16, 16)

    def build(module, where):
        engine = compile_engine(backend, module, x, target, "fp32", tmp_path / where)
        assert not isinstance(engine, Failure), engine
        with torch.no_grad():
            assert check_output(engine(x), module(x), "fp32") is None
        return backend.last_tuned_tasks, backend.last_task_count

    first, second = _nets()
    tuned, total = build(first, "a")
    assert tuned == total > 0 and backend.tuning_record_count() > 0
    records = backend.tuning_record_count()
    assert build(first, "b") == (0, total)  # compiled again: nothing left to tune
    assert backend.tuning_record_count() == records
    tuned, total2 = build(second, "c")  # shares the first layer's workload
    assert 0 < tuned < total2
