"""Every available backend's engine equals eager; a wrong engine is caught and never timed."""

import subprocess
import sys

import pytest
import torch

import dsnet
from conftest import randomize
from harness.backends import GRAPHS, get_backend, list_backends
from harness.backends.base import Backend, Engine, native_choice
from harness.measure.pipeline import ArtifactKey, check_output, trial, weights_fingerprint
from harness.measure.protocol import Protocol
from harness.phases.context import RunContext
from harness.phases.static import Task, Workload, run_static
from harness.results.layout import Layout
from harness.results.store import ResultStore
from harness.targets import load_target

X86 = load_target("x86").resolve()
CPU_BACKENDS = ["eager", "torchscript", "onnxruntime", "tvm", "inductor"]


def _available(name):
    why = get_backend(name, X86.options(name)).unavailable(X86)
    if why:
        pytest.skip(f"{name} unavailable here: {why}")


@pytest.fixture(scope="module")
def tiny():
    # random affine and gates (randomize), statistics under which outputs depend on the input
    return dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny")))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_engine_matches_eager_and_reloads_from_cache(backend, tiny, tmp_path):
    _available(backend)
    routes = tiny.routes()
    # inductor compiles C++ for ~10 s per network: one route; the others: smallest and largest
    for route in routes[-1:] if backend == "inductor" else (routes[0], routes[-1]):
        module = dsnet.materialize(tiny, route)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            ref = module(x)
        b = get_backend(backend, X86.options(backend))
        key = ArtifactKey.of("ds_mbnet_tiny", str(route), b, X86, "fp32", x, weights_fingerprint(module))
        result = trial(b, module, x, X86, "fp32", key, tmp_path)
        assert result.ok, result
        assert check_output(result.engine(x), ref, "fp32") is None
        assert ref.abs().max() > 1e-3  # a meaningful comparison, not zeros against zeros
        # any CPU tensor of the shape: data 4 bytes past an aligned address (as NumPy may load a
        # file: TVM's DLPack import refuses data not 64-byte aligned), and channels-last strides
        unaligned = torch.empty(x.numel() + 1)[1:].view_as(x).copy_(x)
        for odd in (unaligned, x.contiguous(memory_format=torch.channels_last)):
            assert check_output(result.engine(odd), ref, "fp32") is None
        assert result.compile_s > 0 and result.details["cached"] is False
        if b.artifact:
            assert b.has_artifact(key.directory(tmp_path))
            again = trial(b, module, x, X86, "fp32", key, tmp_path)
            assert again.ok and again.details["cached"] is True
            assert check_output(again.engine(x), ref, "fp32") is None
        if backend == "onnxruntime":  # the bound outputs a chain hands on start where ORT's own buffers do
            from harness.backends.onnxruntime import ALIGNMENT

            outs = result.engine.run(result.engine.prepare(x))
            assert outs and all(a.ctypes.data % ALIGNMENT == 0 for a in outs)
        if backend == "inductor":  # built frozen on a CPU (batch norm folded), said in the row and kept
            assert result.details["freezing"] is True and again.details["freezing"] is True
            # called with its spec read once, not through the package's per-call parsing: same output
            from harness.backends.inductor import direct_call

            runner = torch._inductor.aoti_load_package(str(key.directory(tmp_path) / b.artifact))
            call = direct_call(runner)
            assert call is not runner
            xl = x.contiguous(memory_format=torch.channels_last)  # compiled for channels-last on a CPU
            with torch.inference_mode():
                assert torch.equal(call(xl), runner(xl))
                assert check_output(call(xl), ref, "fp32") is None


class WrongBackend(Backend):
    """Compiles 'fine' but computes something else."""

    name = "wrong"

    def compile(self, module, example, target, precision, artifact_dir):
        return Engine(lambda x: module(x) * 1.01)


class BrokenBackend(Backend):
    name = "broken"

    def compile(self, module, example, target, precision, artifact_dir):
        raise RuntimeError("unsupported operator aten::frobnicate\nsecond line")


FAST = Protocol(warmup_calls=1, warmup_ms=0, repeat=3, min_repeat_ms=0)


def _sweep(tmp_path, backend_obj, protocol=FAST):
    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), protocol, store, "cpu", False, "test")
    ctx._backends[backend_obj.name] = backend_obj
    return ctx, store


def _task(tiny, backend):
    route = tiny.routes()[0]
    wl = Workload("ds_mbnet_tiny", str(route), "", 0, 0, lambda: dsnet.materialize(tiny, route))
    return Task(wl, backend, "fp32", 1, 32)


def test_wrong_engine_is_recorded_as_failed_and_never_timed(tiny, tmp_path):
    backend = WrongBackend()
    calls = []
    real = backend.compile

    def counting_compile(*a, **k):
        engine = real(*a, **k)
        run = engine.run
        engine.run = lambda x: (calls.append(1), run(x))[1]
        return engine

    backend.compile = counting_compile
    ctx, store = _sweep(tmp_path, backend)
    [row] = run_static(ctx, [_task(tiny, "wrong")])
    assert row["status"] == "check_failed"
    assert "output differs from eager: max abs diff" in row["error"]
    assert len(calls) == 1  # the check call only: no timing
    assert row.get("latency_ms_p50") is None
    assert store.frame().status.tolist() == ["check_failed"]


def test_compile_failure_is_recorded_and_the_sweep_goes_on(tiny, tmp_path):
    ctx, store = _sweep(tmp_path, BrokenBackend())
    rows = run_static(ctx, [_task(tiny, "broken"), _task(tiny, "eager")])
    assert [r["status"] for r in rows] == ["compile_failed", "ok"]
    assert rows[0]["error"].startswith("RuntimeError: unsupported operator aten::frobnicate second line")
    assert "\n" not in rows[0]["error"]
    assert rows[1]["n"] == 3 and rows[1]["latency_ms_p50"] > 0


def test_check_output_tolerances():
    ref = torch.tensor([[1.0, -2.0, 3.0]])
    assert check_output(ref + 1e-5, ref, "fp32") is None
    assert "max abs diff" in check_output(ref + 1e-2, ref, "fp32")
    assert check_output(ref + 1e-2, ref, "fp16") is None
    # fp16 is judged against the output's scale: a small logit may be off by 3% of the largest one
    logits = torch.tensor([[40.0, 0.01, -5.0]])
    assert check_output(logits + torch.tensor([[0.0, 0.5, 0.0]]), logits, "fp16") is None
    assert "max|eager|" in check_output(logits * 1.1, logits, "fp16")  # a wrong engine is off by the scale
    assert "max|eager|" in check_output(logits + torch.tensor([[0.0, 2.0, 0.0]]), logits, "fp16")
    # fp32: a near-zero element among large ones may carry 1e-5 of the scale (rounding of the large
    # sums), not more; an engine off by a thousandth of the scale still fails
    big = torch.tensor([[86.0, 0.0, -40.0]])
    assert check_output(big + torch.tensor([[0.0, 2.5e-4, 0.0]]), big, "fp32") is None
    assert "max|eager|" in check_output(big + torch.tensor([[0.0, 0.09, 0.0]]), big, "fp32")
    assert "shape" in check_output(ref[:, :2], ref, "fp32")
    assert "non-finite" in check_output(ref * float("nan"), ref, "fp32")


def test_tensorrt_probe_explains_itself_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    why = get_backend("tensorrt").unavailable(load_target("rtx2080ti"))
    assert why == "TensorRT needs a CUDA GPU and this machine has none"
    assert get_backend("tensorrt").unsupported(X86, "fp32") == "tensorrt does not run on cpu"


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown backend 'tflite'; valid backends: eager, noop, "):
        get_backend("tflite")
    plain = [b for b in list_backends() if not b.endswith(GRAPHS)]
    assert set(CPU_BACKENDS + ["tensorrt", "noop"]) == set(plain)
    with pytest.raises(ValueError, match="onnxruntime launches on streams of its own"):
        get_backend("onnxruntime+graphs")


def test_a_graphs_variant_is_the_backend_with_cuda_graphs_and_its_artifacts(tiny, tmp_path):
    """``<name>+graphs`` exists exactly for the backends whose engines run on torch's stream; it is
    the same backend (its options, its artifacts), timed as a captured graph's replay; on a CPU target
    the row says the graph was not captured, and the plain call is timed."""
    from harness.backends import backend_class

    variants = {b[:-len(GRAPHS)] for b in list_backends() if b.endswith(GRAPHS)}
    plain = [b for b in list_backends() if not b.endswith(GRAPHS)]
    assert variants == {b for b in plain if backend_class(b).graph_capturable}
    route = dsnet.materialize(tiny, tiny.routes()[-1])
    x = torch.randn(1, 3, 32, 32)
    base, graphs = get_backend("torchscript"), get_backend("torchscript+graphs")
    assert (graphs.name, graphs.base_name, graphs.cuda_graphs, base.cuda_graphs) == \
        ("torchscript+graphs", "torchscript", True, False)
    key = lambda b: ArtifactKey.of("t", "r", b, X86, "fp32", x, weights_fingerprint(route))  # noqa: E731
    assert key(base) == key(graphs)  # built once, timed both ways
    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), Protocol(warmup_calls=1, warmup_ms=0, repeat=2, min_repeat_ms=0),
                     store, "cpu", False, "t")
    result = ctx.trial("t", "r", "torchscript+graphs", "fp32", route, x)
    fn, timed = ctx.timing("torchscript+graphs", x)(result)
    assert timed.details["cuda_graph"] == "not captured: the target is not a GPU" and fn() is not None
    plain = ctx.trial("t", "r", "torchscript", "fp32", route, x)
    assert plain.details["cached"]  # the variant's build, loaded
    assert "cuda_graph" not in ctx.timing("torchscript", x)(plain)[1].details
    store.close()


def test_importing_the_harness_imports_no_heavy_backend():
    code = ("import sys, harness, harness.backends, harness.run, harness.report, harness.retrain_gate, dsnet, "
            "harness.phases.static, harness.phases.dynamic, harness.phases.retraining, harness.reporting.tables; "
            "heavy = [m for m in ('tvm', 'onnxruntime', 'torch_tensorrt', 'tensorrt', 'onnx') if m in sys.modules]; "
            "print(heavy); sys.exit(bool(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("shape", [(1, 14), (14,), (1, 1, 5), (3, 4)])
def test_native_choice_is_argmax_on_tensors_and_arrays(shape):
    """The gate's decision read through ``tolist`` picks what ``argmax`` picks: ties go to the first,
    NaN ranks highest, torch tensors and NumPy arrays alike."""
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(shape, generator=g) for _ in range(20)]
    tie = torch.zeros(shape)
    tie.view(-1)[1] = tie.view(-1)[-1] = 1.0
    nan = torch.randn(shape, generator=g)
    nan.view(-1)[-1] = float("nan")
    cases += [tie, nan, torch.full(shape, float("-inf")), torch.randint(0, 3, shape)]
    for scores in cases:
        expected = int(scores.argmax())
        assert native_choice(scores) == expected, scores
        assert native_choice(scores.numpy()) == expected, scores


@pytest.mark.parametrize("shape,dtype", [((1, 3, 5, 7), "float32"), ((1, 10), "int64"), ((3,), "float16"),
                                         ((0, 4), "float32"), ((), "float32")])
def test_aligned_empty_is_an_aligned_writable_array_of_the_shape(shape, dtype):
    import numpy as np

    from harness.backends.onnxruntime import ALIGNMENT, aligned_empty

    arrays = [aligned_empty(shape, dtype) for _ in range(8)]  # NumPy alone starts some 16 bytes off
    for a in arrays:
        assert a.shape == shape and a.dtype == np.dtype(dtype) and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % ALIGNMENT == 0
        a[...] = 1
    assert all(np.all(a == 1) for a in arrays)  # no two overlap


def test_onnxruntime_cpu_sessions_of_a_process_share_one_arena_and_chain_right(tmp_path):
    """Every CPU session draws its intermediate tensors from the process's one registered arena
    (``shared_cpu_arena``, registered once however many sessions come); a chain of two sessions
    running one after the other from it computes what eager does."""
    _available("onnxruntime")
    from harness.backends.onnxruntime import shared_cpu_arena

    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()).eval()
    second = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = first(x)
    backend = get_backend("onnxruntime", X86.options("onnxruntime"))
    a = backend.compile(first, x, X86, "fp32", tmp_path)
    (tmp_path / "b").mkdir()
    b = backend.compile(second, feats, X86, "fp32", tmp_path / "b")
    assert shared_cpu_arena() and shared_cpu_arena.cache_info().misses == 1
    assert a.details["cpu_arena"] == b.details["cpu_arena"] == "shared by the process's sessions"
    native = a.prepare(x)
    for _ in range(3):  # each run's intermediates back to the arena, the next session's from it
        out = b.to_torch(b.run(a.outputs(a.run(native))[0]))
    with torch.no_grad():
        assert check_output(out, second(first(x)), "fp32") is None


def test_onnxruntime_threads_spin_during_a_call_and_not_after_it(tmp_path):
    """The session's intra-op threads spin between a call's operators and stop when it returns
    (``harness.backends.onnxruntime.SPINNING``): the process takes no CPU while it waits after a
    call. Threads left spinning take a core for tens of milliseconds (ONNX Runtime's default: 26 ms
    of the 50 ms wait on the 2-core VM with the stop turned off; the bound below is a fifth of a
    core over the wait)."""
    _available("onnxruntime")
    import time

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)]).eval()
    x = torch.randn(1, 16, 32, 32)
    engine = get_backend("onnxruntime", X86.options("onnxruntime")).compile(net, x, X86, "fp32", tmp_path)
    assert engine.details["intra_op_spinning"] == "during a call"
    native = engine.prepare(x)
    waits = []
    for _ in range(5):
        engine.run(native)
        before = time.process_time()
        time.sleep(0.05)
        waits.append(time.process_time() - before)
    assert sorted(waits)[2] < 0.01, waits
