"""The GPU path on a real GPU (``pytest -m gpu``; every test here skips cleanly without CUDA).

Every GPU backend against eager fp32 on CUDA in fp32 and fp16, the CUDA-event timer, CUDA graphs,
the device-mismatch flag, and a caller's module that never moves to the GPU.
"""

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import dsnet
from conftest import randomize
from harness.backends import get_backend
from harness.backends.base import capture_cuda_graph
from harness.measure.pipeline import ArtifactKey, check_output, timed_call, trial, weights_fingerprint
from harness.measure.protocol import CudaEventTimer, Protocol, measure
from harness.targets import load_target

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parent.parent
GPU_BACKENDS = ["eager", "torchscript", "inductor", "tvm", "tensorrt", "onnxruntime"]


@pytest.fixture(scope="module")
def h100():
    return load_target("h100").resolve()


@pytest.fixture(scope="module")
def route_module():
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny")))
    return dsnet.materialize(model, model.routes()[-1])


def _backend(name, target):
    b = get_backend(name, target.options(name))
    why = b.unavailable(target)
    if why:
        pytest.skip(f"{name} unavailable on this GPU machine: {why}")
    return b


def _trial(b, module, x, target, precision, tmp_path):
    key = ArtifactKey.of("ds_mbnet_tiny", "largest", b, target, precision, x, weights_fingerprint(module))
    return trial(b, module, x, target, precision, key, tmp_path)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_engine_matches_eager_and_leaves_the_callers_module_alone(backend, precision, h100, route_module,
                                                                     tmp_path):
    b = _backend(backend, h100)
    if b.unsupported(h100, precision):
        pytest.skip(b.unsupported(h100, precision))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = route_module(x)
    result = _trial(b, route_module, x, h100, precision, tmp_path)
    assert result.ok, result
    out = result.engine(x)
    out = out[0] if isinstance(out, tuple) else out
    assert check_output(out, ref, precision) is None  # fp16: the pipeline's fp16 tolerance
    if backend in ("eager", "torchscript", "inductor", "tensorrt"):  # torch tensors on the GPU
        assert out.is_cuda and out.dtype == (torch.half if precision == "fp16" else torch.float)
    # the caller's module stays where it was: CPU, fp32
    assert {p.device.type for p in route_module.parameters()} == {"cpu"}
    assert {p.dtype for p in route_module.parameters()} == {torch.float32}
    if b.artifact:  # the artifact reloads on the GPU and still matches
        again = _trial(b, route_module, x, h100, precision, tmp_path)
        assert again.ok and again.details["cached"] is True, again


def test_cuda_event_timer_measures_gpu_time():
    timer = CudaEventTimer()
    cycles = 20_000_000  # about 10 ms of spinning at ~2 GHz
    short = min(timer.elapsed_ms(lambda: torch.cuda._sleep(cycles), 1) for _ in range(3))
    long = min(timer.elapsed_ms(lambda: torch.cuda._sleep(2 * cycles), 1) for _ in range(3))
    assert short > 1.0  # the kernel's time is seen, not only its launch
    assert 1.6 < long / short < 2.4
    # with number > 1 the elapsed time covers every call
    assert 2.5 < timer.elapsed_ms(lambda: torch.cuda._sleep(cycles), 3) / short < 3.5
    m = measure(lambda: torch.cuda._sleep(cycles // 10), Protocol(warmup_calls=2, warmup_ms=5, repeat=5,
                                                                  min_repeat_ms=5), timer)
    assert m.stats.n == 5 and m.stats.p50 > 0


@pytest.mark.parametrize("backend", ["eager", "torchscript"])
def test_cuda_graph_replay_equals_the_plain_call(backend, h100, route_module, tmp_path):
    b = _backend(backend, h100)
    x = torch.randn(1, 3, 64, 64)
    result = _trial(b, route_module, x, h100, "fp32", tmp_path)
    assert result.ok, result
    native = result.engine.prepare(x)
    fn, graphed = timed_call(b, result, native, cuda_graphs=True)
    assert graphed.details["cuda_graph"] == "replayed"
    _, plain = timed_call(b, result, native, cuda_graphs=False)
    assert "cuda_graph" not in plain.details
    # a replay re-runs the captured kernels on whatever the captured input holds now
    replay, captured = capture_cuda_graph(lambda: result.engine.run(native))
    before = result.engine.to_torch(captured).clone()
    native.copy_(torch.randn(1, 3, 64, 64, device="cuda"))
    replay()
    torch.cuda.synchronize()
    after = result.engine.to_torch(captured).clone()
    assert not torch.equal(after, before)
    assert check_output(after, result.engine.to_torch(result.engine.run(native)), "fp32") is None


def test_cuda_graphs_are_said_not_captured_for_a_backend_with_its_own_streams(h100, route_module, tmp_path):
    b = _backend("tvm", h100)
    x = torch.randn(1, 3, 64, 64)
    result = _trial(b, route_module, x, h100, "fp32", tmp_path)
    assert result.ok, result
    fn, said = timed_call(b, result, result.engine.prepare(x), cuda_graphs=True)
    assert said.details["cuda_graph"].startswith("not captured: tvm")
    fn()  # the plain call is what gets timed


def _run(*args):
    return subprocess.run([sys.executable, "-m", "harness.run", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def test_a_run_on_another_gpu_records_the_real_device_and_the_mismatch(tmp_path):
    proc = _run("--target", "rtx2080ti", "--quick", "--backends", "eager", "--models", "mobilenet_v1",
                "--routes", "x0.25", "--results", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = torch.cuda.get_device_name(0)
    assert "expects 'NVIDIA GeForce RTX 2080 Ti'" in proc.stderr
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["device_name"] == name and env["device_mismatch"] is True
    lut = pd.read_csv(tmp_path / "lut.csv")
    assert set(lut["status"]) == {"ok"}
    with sqlite3.connect(tmp_path / "results.sqlite") as db:  # every stored row carries the flag
        assert set(db.execute("SELECT device_name, device_mismatch FROM results")) == {(name, 1)}


def test_a_gpu_run_with_cuda_graphs_measures_static_and_dynamic_engines(tmp_path):
    """A profile asking for CUDA graphs: static rows say the replay was timed; the dynamic engine
    (its segments, its LUT check) runs on the GPU in fp32 and fp16."""
    profile = tmp_path / "h100.toml"  # a profile's file is named after its name
    profile.write_text((ROOT / "targets" / "h100.toml").read_text().replace("cuda_graphs = false",
                                                                          "cuda_graphs = true"))
    out = tmp_path / "results"
    proc = _run("--target", str(profile), "--quick", "--backends", "eager,torchscript", "--models", "ds_mbnet_tiny",
                "--results", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lut = pd.read_csv(out / "lut.csv")
    assert set(lut["status"]) == {"ok"}, lut[["backend", "precision", "route", "status", "error"]]
    assert set(lut["precision"]) == {"fp32", "fp16"}
    details = [json.loads(d) for d in lut["backend_details"]]
    assert {d.get("cuda_graph") for d in details} == {"replayed"}
    dyn = pd.read_csv(out / "dynamic.csv")
    shown = dyn[["backend", "precision", "kind", "name", "status", "error"]].to_string()
    # the parts and the deployed path's LUT check ran; a comparison the phase refused (on the H200 a
    # --quick run stored one measure_failed row) says why
    assert (dyn[dyn.kind.isin(["segment", "route"])].status == "ok").all(), shown
    refused = dyn[dyn.status != "ok"]
    assert set(refused.status) <= {"measure_failed"} and refused.error.fillna("").str.len().gt(0).all(), shown
    assert {"eager", "torchscript"} <= set(dyn["backend"])


def test_both_training_stages_run_on_cuda_in_mixed_precision():
    """Stage I and II on the GPU with float16 autocast and a loss scale: finite losses, float32
    weights left on the GPU, the loss scale kept in the epoch's state; the evaluation reads the GPU
    model from CPU batches."""
    from dsnet.data import digits
    from dsnet.training import ComplexityPenalty, evaluate_gate, train_gate, train_supernet

    splits = digits(32)
    train = torch.utils.data.DataLoader(torch.utils.data.Subset(splits.train, range(128)), batch_size=32,
                                        shuffle=True, generator=torch.Generator().manual_seed(0), pin_memory=True)
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(splits.val, range(64)), batch_size=64)
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_tiny", num_classes=10).cuda()
    states = []
    out = train_supernet(model, train, epochs=1, amp=True, on_epoch=states.append)
    assert torch.isfinite(torch.tensor(out["loss"]))
    assert states[0]["scaler"]["scale"] > 0 and states[0]["cuda_rng"] is not None
    history = train_gate(model, train, ComplexityPenalty.madds(model, 32), epochs=1, amp=True)
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    assert all(p.is_cuda and p.dtype == torch.float32 for p in model.parameters())
    assert evaluate_gate(model, val).n == 64
