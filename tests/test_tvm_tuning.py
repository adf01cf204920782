"""TVM MetaSchedule tuning: one database shared by networks, each workload tuned once, re-runs tune nothing.

Two tiny convolutional networks sharing their first layer stand in for two routes (tuning a real
route takes ~35 s per layer on 2 cores).
"""

import pytest
import torch
from torch import nn

from harness.backends import get_backend
from harness.measure.pipeline import ArtifactKey, trial, weights_fingerprint
from harness.targets import load_target

pytestmark = pytest.mark.slow


def _nets():
    torch.manual_seed(0)
    first = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    second = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.ReLU())
    return first.eval(), second.eval()


def test_shared_database_tunes_each_workload_once(tmp_path):
    target = load_target("x86").resolve()
    backend = get_backend("tvm", {**target.options("tvm"), "tune_trials": 1}, workdir=tmp_path / "tvm_tuning")
    if backend.unavailable(target):
        pytest.skip(backend.unavailable(target))
    x = torch.randn(1, 3, 16, 16)

    def build(module, where):
        key = ArtifactKey.of("net", where, backend, target, "fp32", x, weights_fingerprint(module))
        result = trial(backend, module, x, target, "fp32", key, tmp_path)
        assert result.ok, result
        assert result.details["tune_trials"] == 1
        return result.details["tuned_tasks"], result.details["tasks"]

    first, second = _nets()
    tuned, total = build(first, "a")
    assert tuned == total > 0 and backend.tuning_record_count() > 0
    records = backend.tuning_record_count()
    assert build(first, "b") == (0, total)  # compiled again: nothing left to tune
    assert backend.tuning_record_count() == records
    tuned, total2 = build(second, "c")  # shares the first layer's workload
    assert 0 < tuned < total2
