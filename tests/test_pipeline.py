"""The one pipeline: artifact keys that separate what must differ, backends that never touch their
input, failures as values, and a store that keeps older results readable."""

import copy
import dataclasses
import signal
import sqlite3

import pytest
import torch

import dsnet
from conftest import randomize
from harness import interrupts
from harness.backends import get_backend
from harness.backends.base import Backend, Engine
from harness.measure.pipeline import ArtifactKey, built, trial, weights_fingerprint
from harness.results.layout import LUT_COLUMNS, Layout
from harness.results.store import ResultStore
from harness.targets import load_target

X86 = load_target("x86").resolve()


@pytest.fixture(scope="module")
def route_module():
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny")))
    return dsnet.materialize(model, model.routes()[1])


def _key(backend, module, precision="fp32", target=X86, x=None):
    x = torch.randn(1, 3, 32, 32) if x is None else x
    return ArtifactKey.of("ds_mbnet_tiny", "1", backend, target, precision, x, weights_fingerprint(module))


def test_fp16_and_fp32_of_the_same_route_get_different_artifacts(route_module, tmp_path):
    b = get_backend("torchscript")
    fp32, fp16 = _key(b, route_module, "fp32"), _key(b, route_module, "fp16")
    assert fp32 != fp16 and fp32.directory(tmp_path) != fp16.directory(tmp_path)
    # so do other shapes, thread counts, weights and a backend's artifact options
    assert _key(b, route_module, x=torch.randn(2, 3, 32, 32)).directory(tmp_path) != fp32.directory(tmp_path)
    other_threads = dataclasses.replace(X86, threads=X86.threads + 1)
    assert _key(b, route_module, target=other_threads).directory(tmp_path) != fp32.directory(tmp_path)
    changed = copy.deepcopy(route_module)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    assert _key(b, changed).directory(tmp_path) != fp32.directory(tmp_path)
    tvm = X86.options("tvm")
    untuned = get_backend("tvm", tvm, workdir=tmp_path / "a")
    tuned = get_backend("tvm", tvm, workdir=tmp_path / "b")  # a tuning database: other records, other artifact
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "database_tuning_record.json").write_text('["record"]\n')
    assert _key(untuned, route_module).directory(tmp_path) != _key(tuned, route_module).directory(tmp_path)
    # and the same task twice is the same artifact
    assert _key(b, route_module) == fp32


def _state(module):
    return ({k: v.clone() for k, v in module.state_dict().items()}, {p.dtype for p in module.parameters()},
            {p.device for p in module.parameters()}, module.training)


@pytest.mark.parametrize("backend,precision", [("eager", "fp32"), ("eager", "fp16"), ("torchscript", "fp32"),
                                               ("torchscript", "fp16"), ("noop", "fp16"), ("onnxruntime", "fp32")])
def test_a_backend_leaves_its_input_module_untouched(backend, precision, route_module, tmp_path):
    b = get_backend(backend, X86.options(backend))
    if b.unavailable(X86):
        pytest.skip(b.unavailable(X86))
    module = copy.deepcopy(route_module).train()  # train mode: eval() on the caller's module would show
    before = _state(module)
    x = torch.randn(1, 3, 32, 32)
    try:
        b.compile(module, x, X86, precision, tmp_path)
    except Exception:  # e.g. a half convolution the CPU lacks: what matters is the input afterwards
        pass
    after = _state(module)
    assert after[1:] == before[1:]
    assert after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])


class Broken(Backend):
    name = "broken"

    def compile(self, module, example, target, precision, artifact_dir):
        raise RuntimeError("unsupported operator aten::frobnicate")


class OffByOne(Backend):
    name = "offbyone"
    artifact = "model.txt"

    def compile(self, module, example, target, precision, artifact_dir):
        (artifact_dir / self.artifact).write_text("built")
        return Engine(lambda x: module(x) + 1.0)

    def load(self, artifact_dir, example, target, precision):
        return Engine(lambda x: torch.zeros(1))


def test_failures_are_values_and_a_wrong_cached_artifact_is_rebuilt(route_module, tmp_path):
    x = torch.randn(1, 3, 32, 32)
    broken = trial(Broken(), route_module, x, X86, "fp32", _key(Broken(), route_module), tmp_path)
    assert broken.status == "compile_failed" and "aten::frobnicate" in broken.error and broken.engine is None
    b = OffByOne()
    first = trial(b, route_module, x, X86, "fp32", _key(b, route_module), tmp_path)
    assert first.status == "check_failed" and "differs from eager" in first.error
    again = trial(b, route_module, x, X86, "fp32", _key(b, route_module), tmp_path)
    # the cached artifact gives a wrong shape; it is rebuilt once and the rebuilt engine judged
    assert again.status == "check_failed" and "differs from eager" in again.error and not again.details["cached"]


class SwallowsCtrlC(Backend):
    """A build that catches the KeyboardInterrupt raised inside it and re-raises it as its own
    error, as TVM's FFI does (seen: ``RuntimeError: RuntimeError`` stored as the network's failure)."""
    name = "swallows"

    def compile(self, module, example, target, precision, artifact_dir):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise RuntimeError("RuntimeError") from None


@pytest.fixture
def ctrl_c_handler():
    before = signal.getsignal(signal.SIGINT)
    interrupts.install()
    yield
    signal.signal(signal.SIGINT, before)
    interrupts._interrupted = False


def test_a_ctrl_c_a_backend_re_raised_as_its_own_error_stops_the_run_instead_of_failing_the_network(
        route_module, tmp_path, ctrl_c_handler):
    x = torch.randn(1, 3, 32, 32)
    b = SwallowsCtrlC()
    with pytest.raises(KeyboardInterrupt):
        trial(b, route_module, x, X86, "fp32", _key(b, route_module), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        built(b, route_module, x, X86, "fp32", tmp_path / "artifact")
    # without a Ctrl-C the same error is a value
    interrupts._interrupted = False
    broken = trial(Broken(), route_module, x, X86, "fp32", _key(Broken(), route_module), tmp_path)
    assert broken.status == "compile_failed"


def test_a_store_of_an_older_version_gains_the_new_columns(tmp_path):
    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as db:  # the schema before compile_s and backend_details
        db.execute("CREATE TABLE results (model TEXT NOT NULL, route TEXT NOT NULL, widths TEXT, backend TEXT NOT "
                   "NULL, precision TEXT NOT NULL, batch_size INTEGER NOT NULL, input_size INTEGER NOT NULL, madds "
                   "INTEGER, params INTEGER, latency_ms_p50 REAL, latency_ms_p90 REAL, latency_ms_mean REAL, "
                   "latency_ms_std REAL, n INTEGER, status TEXT NOT NULL, error TEXT, run_id TEXT, PRIMARY KEY "
                   "(model, route, backend, precision, batch_size, input_size))")
        db.execute("INSERT INTO results VALUES ('m', '0', '', 'eager', 'fp32', 1, 32, 5, 6, 1.5, 2, 1.6, 0.1, 30, "
                   "'ok', '', 'r1')")
    store = ResultStore(path)
    df = store.export_lut(Layout(tmp_path).lut_csv)
    assert list(df.columns) == LUT_COLUMNS and df.latency_ms_p50.tolist() == [1.5]
    with pytest.raises(ValueError, match="status must be one of"):
        store.record({"model": "m", "route": "1", "backend": "eager", "precision": "fp32", "batch_size": 1,
                      "input_size": 32, "status": "run_failed"})
    store.close()


def test_timed_call_falls_back_to_the_plain_call_and_says_why(route_module, tmp_path):
    """CUDA graphs are asked for only by GPU profiles; wherever a graph cannot be used the plain call
    is timed and the row says why (here: a backend with its own streams, and no CUDA at all)."""
    from harness.measure.pipeline import timed_call

    b = get_backend("eager")
    x = torch.randn(1, 3, 32, 32)
    result = trial(b, route_module, x, X86, "fp32", _key(b, route_module, x=x), tmp_path)
    assert result.ok
    native = result.engine.prepare(x)
    fn, same = timed_call(b, result, native)
    assert same is result and torch.equal(fn(), result.engine.run(native))

    class OwnStreams(Backend):
        name = "ownstreams"

    _, said = timed_call(OwnStreams(), result, native, cuda_graphs=True)
    assert said.details["cuda_graph"] == "not captured: ownstreams launches on streams of its own"
    if not torch.cuda.is_available():
        fn, said = timed_call(b, result, native, cuda_graphs=True)  # capturable, but no GPU to capture on
        assert said.details["cuda_graph"].startswith("not captured: ")
        assert torch.equal(fn(), result.engine.run(native))
