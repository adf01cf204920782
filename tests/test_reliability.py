"""Checks that can fail, and every bad input a clean error: one line, exit 2, no traceback, nothing lost."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import dsnet
from harness import report as reportmod
from harness import retrain_gate as retrainmod
from harness import run as runmod
from harness import tune as tunemod
from harness.backends import get_backend
from harness.backends.base import Backend
from harness.measure.pipeline import ArtifactKey, check_output, trial, weights_fingerprint
from harness.measure.protocol import Protocol
from harness.phases.context import RunContext
from harness.phases.dynamic import run_dynamic
from harness.phases.static import reference_model
from harness.results.layout import Layout
from harness.results.store import FolderLock, ResultStore
from harness.targets import load_target

X86 = load_target("x86").resolve()
FAST = Protocol(warmup_calls=1, warmup_ms=0, repeat=3, min_repeat_ms=0)


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    assert lines[-1].startswith("error: ") and pattern in lines[-1], lines
    return lines[-1]


# -- reference weights and the check that guards every figure -------------------------------------------

def _two_outputs(name: str, size: int):
    model = reference_model(name)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(1, 3, size, size, generator=g), torch.randn(1, 3, size, size, generator=g)
    if len(model.routing_space.gates):
        routes = model.routes(size)
        first, last = dsnet.materialize(model, routes[0]), dsnet.materialize(model, routes[-1])
    else:
        first, last = dsnet.materialize(model), dsnet.materialize(reference_model(name, width_mult=0.5))
    with torch.no_grad():
        return first(x1), first(x2), last(x1)


def _relative(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", dsnet.list_models())
def test_reference_outputs_depend_on_the_input_and_the_route(name):
    size = 32 if name.endswith("_tiny") else 64
    out, other_input, other_route = _two_outputs(name, size)
    assert torch.isfinite(out).all()
    assert _relative(out, other_input) > 1e-2, "two inputs give the same output"
    assert _relative(out, other_route) > 1e-2, "two routes (or widths) give the same output"


def test_a_module_whose_output_ignores_its_input_is_never_trusted(tmp_path):
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()
    with torch.no_grad():
        module[1].weight.mul_(1e-12)
        module[1].bias.fill_(1.0)
    x = torch.randn(1, 3, 8, 8)
    b = get_backend("eager")
    result = trial(b, module, x, X86, "fp32", ArtifactKey.of("m", "0", b, X86, "fp32", x, "w"), tmp_path)
    assert result.status == "check_failed" and "hardly depends on the input" in result.error


@pytest.mark.parametrize("name,right,wrong,size", [("ds_mbnet_tiny", 0, -1, 32), ("mobilenet_v1", 1.0, 0.5, 32)])
def test_a_swapped_artifact_is_caught_and_rebuilt(name, right, wrong, size, tmp_path):
    def module(which):
        if name == "mobilenet_v1":
            return dsnet.materialize(reference_model(name, width_mult=which))
        model = reference_model(name)
        return dsnet.materialize(model, model.routes(size)[which])

    b = get_backend("torchscript")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    good, bad = module(right), module(wrong)
    keys = {m: ArtifactKey.of(name, str(w), b, X86, "fp32", x, weights_fingerprint(m))
            for m, w in ((good, right), (bad, wrong))}
    assert trial(b, bad, x, X86, "fp32", keys[bad], tmp_path).ok
    shutil.rmtree(keys[good].directory(tmp_path), ignore_errors=True)
    shutil.copytree(keys[bad].directory(tmp_path), keys[good].directory(tmp_path))  # the wrong artifact in its slot
    result = trial(b, good, x, X86, "fp32", keys[good], tmp_path)
    assert "the cached artifact failed the check: output differs from eager" in result.details["rebuilt"]
    assert result.ok and not result.details["cached"]  # the engine that is timed is the rebuilt one
    with torch.no_grad():
        assert check_output(result.engine(x), good(x), "fp32") is None


class NaNSegment(Backend):
    """Eager, except that one segment of the dynamic engine outputs NaN."""

    name = "nanseg"

    def compile(self, module, example, target, precision, artifact_dir):
        engine = get_backend("eager").compile(module, example, target, precision, artifact_dir)
        if "s0_inx_c2" in artifact_dir.name:
            run = engine.run
            engine.run = lambda x: run(x) * float("nan")
        return engine


def test_a_nan_segment_is_caught_and_never_timed(tmp_path):
    store = ResultStore(tmp_path / "results.sqlite")
    ctx = RunContext(X86, Layout(tmp_path), FAST, store, "cpu", False, "test")
    ctx._backends["nanseg"] = NaNSegment()
    run_dynamic(ctx, "ds_mbnet_tiny", "nanseg", "fp32", 32)
    df = store.dynamic_frame()
    store.close()
    failed = df[df.status != "ok"]
    assert list(failed.kind) == ["engine"] and failed.status.iloc[0] == "check_failed"
    assert "s0_inx_c2" in failed.error.iloc[0] and "non-finite" in failed.error.iloc[0]
    assert "s0_inx_c2" not in set(df.name) and not (df.kind == "route").any()  # nothing of it timed


# -- bad input: one line, exit 2 ----------------------------------------------------------------------------

def _profile(tmp_path, extra: str) -> str:
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\ndevice = "cpu"\nbackends = ["noop"]\n{extra}\n')
    return str(path)


@pytest.mark.parametrize("extra,pattern", [
    ("threads = -4", "p.toml: key 'threads' must be at least 0, got -4"),
    ("batch_sizes = [0]", "p.toml: key 'batch_sizes' holds 0; each entry must be at least 1"),
    ("input_size = -3", "p.toml: key 'input_size' must be at least 32, got -3"),
    ("[tvm]\ntune_minutes = \"many\"", "p.toml [tvm]: key 'tune_minutes' must be"),
    ("threads = 100000", "p.toml: key 'threads' is 100000, more than this machine's"),
    ("precisions = []", "p.toml: key 'precisions' is empty"),
    ("batch_sizes = [1, 1]", "p.toml: key 'batch_sizes' names 1 more than once"),
    ("dynamic_backends = [\"noop\", \"tflite\"]", "p.toml: key 'dynamic_backends' holds 'tflite'; each entry must "
                                                 "be one of eager"),
])
def test_bad_profiles_name_the_file_and_key(tmp_path, capsys, extra, pattern):
    assert runmod.main(["--target", _profile(tmp_path, extra), "--results", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, pattern)


@pytest.mark.parametrize("backends, pattern", [
    ("[]", "key 'backends' is empty"),
    ('["noop", "noop"]', "key 'backends' names noop more than once"),
    ('["noop", "tflite"]', "key 'backends' holds 'tflite'"),
])
def test_a_profile_s_backends_are_checked_on_load(tmp_path, capsys, backends, pattern):
    path = tmp_path / "p.toml"
    path.write_text(f'name = "p"\ndevice = "cpu"\nbackends = {backends}\n')
    assert runmod.main(["--target", str(path), "--results", str(tmp_path / "r")]) == 2
    _one_error_line(capsys, pattern)


@pytest.mark.parametrize("main, args, pattern", [
    ("run", ["--batch-size", "1,1"], "--batch-size names a batch size more than once"),
    ("run", ["--batch-size", "100000000"], "needs about"),
    ("tune", ["--minutes", "inf"], "--minutes must be a finite number greater than 0, got inf"),
    ("export", ["--model", "ds_mbnet_tiny", "--backend", "torchscript", "--check-inputs", "-5"],
     "--check-inputs must be at least 0, got -5"),
    ("retrain", ["--model", "ds_mbnet_tiny", "--backend", "eager", "--latency-fraction", "5"],
     "--latency-fraction is a fraction of the largest route's latency, in (0, 1]; got 5.0"),
])
def test_numbers_are_range_checked_at_the_edge(tmp_path, capsys, main, args, pattern):
    from harness import export as exportmod

    target = ["--target", _profile(tmp_path, "input_size = 32")]
    mains = {"run": lambda: runmod.main([*target, "--models", "ds_mbnet_tiny", "--backends", "noop", *args,
                                         "--results", str(tmp_path / "r")]),
             "tune": lambda: tunemod.main(["--target", "x86", *args, "--results", str(tmp_path / "r")]),
             "export": lambda: exportmod.main([*args, "--out", str(tmp_path / "m.ts")]),
             "retrain": lambda: retrainmod.main([*args, "--target", "x86", "--out", str(tmp_path / "g")])}
    assert mains[main]() == 2
    _one_error_line(capsys, pattern)


def test_a_garbage_lut_and_a_foreign_store_are_refused_in_one_line(tmp_path, capsys):
    import sqlite3

    lut = tmp_path / "lut"
    lut.mkdir()
    (lut / "dynamic.csv").write_bytes(os.urandom(2048))
    assert retrainmod.main(["--model", "ds_mbnet_tiny", "--backend", "eager", "--target", "x86", "--lut", str(lut),
                            "--out", str(tmp_path / "g")]) == 2
    _one_error_line(capsys, "is not a dynamic.csv of harness.run")
    ResultStore(tmp_path / "s" / "results.sqlite").close()
    with sqlite3.connect(tmp_path / "s" / "results.sqlite") as db:
        db.execute("CREATE TABLE extra (model TEXT, route TEXT)")
    assert runmod.main(["--target", "x86", "--models", "ds_mbnet_tiny", "--backends", "noop",
                        "--results", str(tmp_path / "s")]) == 2
    _one_error_line(capsys, "holds what harness.run does not write (table extra)")


def test_a_model_summary_refuses_an_input_its_network_cannot_take(capsys):
    from dsnet import summary

    assert summary.main(["--model", "ds_vit_pp", "--input-size", "12"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ds_vit_pp: input size 12 is too small for this network") and "\n" not in line


def test_bad_results_folders(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["--target", "x86", "--models", "ds_mbnet_tiny", "--backends", "noop"]
    assert runmod.main([*base, "--results", str(afile)]) == 2
    _one_error_line(capsys, "it or a folder above it is a file")
    assert runmod.main([*base, "--results", str(afile / "under")]) == 2
    _one_error_line(capsys, "it or a folder above it is a file")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        assert runmod.main([*base, "--results", str(ro)]) == 2
        _one_error_line(capsys, "is not writable")


def test_a_corrupt_store_says_what_to_do_and_keeps_it(tmp_path, capsys):
    (tmp_path / "results.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    args = ["--target", "x86", "--models", "ds_mbnet_tiny", "--backends", "noop", "--results", str(tmp_path)]
    assert runmod.main(args) == 2
    line = _one_error_line(capsys, "is corrupt or not a results store")
    assert "mv " in line and "results.sqlite.corrupt" in line
    assert (tmp_path / "results.sqlite").stat().st_size > 4096  # left as it was, for the user to inspect


def test_a_second_run_on_the_same_folder_refuses(tmp_path, capsys):
    lock = FolderLock(tmp_path).acquire()
    try:
        args = ["--target", "x86", "--models", "ds_mbnet_tiny", "--backends", "noop", "--results", str(tmp_path)]
        assert runmod.main(args) == 2
        _one_error_line(capsys, f"is in use by another run (pid {os.getpid()})")
    finally:
        lock.release()


def test_exports_are_as_readable_as_env_json(tmp_path):
    args = ["--target", "x86", "--models", "ds_mbnet_tiny", "--routes", "0", "--backends", "noop", "--quick",
            "--results", str(tmp_path)]
    assert runmod.main(args) == 0
    modes = {p: stat.S_IMODE((tmp_path / p).stat().st_mode) for p in ("lut.csv", "dynamic.csv", "env.json")}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("write,pattern", [
    (lambda d: (d / "lut.csv").write_text(""), "lut.csv is empty"),
    (lambda d: (d / "lut.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20), "lut.csv"),
    (lambda d: (d / "lut.csv").write_text("model,route\nds_mbnet,0\n"), "lacks column(s) backend"),
    (lambda d: pd.DataFrame([{"model": "mobilenet_v1", "route": "x1.0", "backend": "eager", "precision": "fp32",
                              "batch_size": 1, "input_size": 224, "madds": 1, "status": "ok",
                              "latency_ms_p50": "fast"}]).to_csv(d / "lut.csv", index=False),
     "column latency_ms_p50 holds a non-number ('fast', row 2)"),
    (lambda d: (shutil.copy("results/x86/lut.csv", d / "lut.csv"), (d / "env.json").write_text("{not json")),
     "env.json is not a valid environment file"),
])
def test_bad_stored_results_give_one_line(tmp_path, capsys, monkeypatch, write, pattern):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    write(tmp_path)
    assert reportmod.main(["--target", "x86", "--results", str(tmp_path)]) == 2
    _one_error_line(capsys, pattern)


@pytest.mark.parametrize("args,pattern", [
    (["--cp-weight", "nan"], "--cp-weight must be a finite number, got nan"),
    (["--lr", "-1"], "--lr must be greater than 0, got -1.0"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--latency-target", "-1"], "--latency-target must be greater than 0, got -1.0"),
    (["--latency-fraction", "0"], "--latency-fraction must be greater than 0, got 0.0"),
    (["--routes-upto", "99"], "--routes-upto"),
    (["--checkpoint", "README.md"], "is not a PyTorch checkpoint"),
    (["--checkpoint", "nowhere.pt"], "checkpoint nowhere.pt does not exist"),
    (["--data", "README.md"], "is a file, not a folder"),
    (["--results", "README.md"], "it or a folder above it is a file"),
])
def test_bad_retraining_input_fails_before_any_work(args, pattern, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(__file__)))
    code = retrainmod.main(["--model", "ds_mbnet_tiny", "--target", "x86", "--backend", "eager",
                            "--input-size", "32", *args])
    assert code == 2
    _one_error_line(capsys, pattern)


def test_the_model_api_refuses_nonsense():
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        dsnet.create_model("ds_mbnet", num_classes=0)
    with pytest.raises(ValueError, match="input_size must be a positive integer, got 0"):
        dsnet.profile(dsnet.create_model("ds_mbnet_tiny"), dsnet.Route((0,)), input_size=0)


def test_a_corrupt_image_is_one_line(tmp_path, capsys, monkeypatch):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            Image.new("RGB", (40, 40), (10, 200, 30)).save(d / "good.png")
    (tmp_path / "data" / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    code = retrainmod.main(["--model", "ds_mbnet_tiny", "--target", "x86", "--backend", "eager", "--input-size", "32",
                            "--data", str(tmp_path / "data"), "--batch-size", "3", "--supernet-epochs", "1",
                            "--results", str(tmp_path / "out")])
    assert code == 2
    _one_error_line(capsys, "broken.png")


def test_a_lut_at_another_input_size_names_both_sizes(tmp_path):
    from harness.deploy.lut import LatencyLUT, LUTError

    pd.DataFrame([{"model": "ds_mbnet_tiny", "backend": "eager", "precision": "fp32", "batch_size": 1,
                   "input_size": 32, "kind": "segment", "name": "head", "latency_ms_p50": 1.0, "status": "ok",
                   "error": ""}]).to_csv(tmp_path / "dynamic.csv", index=False)
    with pytest.raises(LUTError, match=r"at input size 64; it has: ds_mbnet_tiny/eager at 32px"):
        LatencyLUT.load(tmp_path, "eager", "ds_mbnet_tiny", input_size=64)


@pytest.mark.parametrize("args,pattern", [
    (["--minutes", "0"], "--minutes must be a finite number greater than 0, got 0"),
    (["--models", "nope"], "unknown model(s) nope"),
    (["--input-size", "8"], "--input-size must be between 32 and"),
    (["--rpc-tracker", "h:1"], "--rpc-tracker and --rpc-key go together"),
    (["--ship", "out"], "--ship needs --mcpu: records are shipped for a baseline"),
    (["--mcpu", "x86-64-v3", "--rpc-tracker", "h:1", "--rpc-key", "k"], "--mcpu tunes on this machine"),
])
def test_bad_tuning_input_is_one_line(args, pattern, capsys, tmp_path):
    assert tunemod.main(["--target", "x86", "--results", str(tmp_path), *args]) == 2
    _one_error_line(capsys, pattern)


def test_tuning_for_a_baseline_this_cpu_cannot_run_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tunemod, "host_cpu_flags", lambda: {"sse4_2"})
    assert tunemod.main(["--target", "x86", "--results", str(tmp_path), "--mcpu", "x86-64-v3"]) == 2
    _one_error_line(capsys, "--mcpu x86-64-v3: this CPU lacks abm, avx, avx2")
    profile = tmp_path / "board.toml"  # a TVM target that is not x86-64 has no x86-64 baseline
    profile.write_text('name = "board"\ndevice = "cpu"\nbackends = ["tvm"]\n[tvm]\ntarget = { kind = "llvm" }\n')
    assert tunemod.main(["--target", str(profile), "--results", str(tmp_path), "--mcpu", "x86-64-v3"]) == 2
    _one_error_line(capsys, "--mcpu x86-64-v3 is an x86-64 baseline; the profile's TVM target is")


def test_tuning_into_a_database_of_another_target_is_refused(capsys, tmp_path):
    pytest.importorskip("tvm")
    workdir = tmp_path / "tvm_tuning"
    workdir.mkdir()
    (workdir / "database_workload.json").write_text("")
    (workdir / "ledger.json").write_text('{"target": "llvm -mcpu=another-cpu", "tasks": {}}')
    code = tunemod.main(["--target", "x86", "--models", "ds_mbnet_tiny", "--input-size", "32", "--minutes", "1",
                         "--results", str(tmp_path)])
    assert code == 2
    _one_error_line(capsys, "was tuned for llvm -mcpu=another-cpu")
    (workdir / "ledger.json").write_text("{not json")
    assert tunemod.main(["--target", "x86", "--models", "ds_mbnet_tiny", "--input-size", "32", "--minutes", "1",
                         "--results", str(tmp_path)]) == 2
    _one_error_line(capsys, "tuning ledger")


def test_an_unreadable_tuning_database_says_what_to_do_and_leaves_nothing_half_written(tmp_path):
    """Builds read the records pruned into best/: a broken best/ is pruned again from the records
    (its error says so); broken records stop before anything is written."""
    tvm = pytest.importorskip("tvm")
    from harness.backends.tvm_tuning import BEST, PRUNED_FROM, RECORD_FILES, TuningDatabase

    workdir, target = tmp_path / "tvm_tuning", tvm.target.Target("llvm")
    workdir.mkdir()
    for name in RECORD_FILES:
        (workdir / name).write_text("")  # a database with no record yet
    db = TuningDatabase.best_of(workdir, target)
    assert db.records == workdir / BEST and (workdir / BEST / PRUNED_FROM).is_file()
    (workdir / BEST / RECORD_FILES[1]).write_text("{not json\n")
    with pytest.raises(ValueError, match=rf"{BEST} is unreadable .*; delete it to prune it again from the records"):
        _ = TuningDatabase.best_of(workdir, target).ms  # read on first use
    (workdir / RECORD_FILES[1]).write_text("{not json\n")
    with pytest.raises(ValueError, match="tvm_tuning is unreadable .*; move the folder away to tune afresh"):
        TuningDatabase.best_of(workdir, target)
    assert sorted(p.name for p in workdir.iterdir()) == sorted([BEST, *RECORD_FILES])


# -- servers and the processes the harness starts ------------------------------------------------------------

def test_the_board_server_binds_loopback_unless_told_otherwise(monkeypatch, capsys):
    """It runs every library it is sent: another address only when named, with a warning."""
    import sys
    import types

    from harness.measure import board_server

    seen = {}

    class Server:
        def __init__(self, host, port, port_end, **kw):
            seen["host"] = host
            self.proc = types.SimpleNamespace(join=lambda: None)

    fake = types.ModuleType("tvm")
    fake.rpc = types.SimpleNamespace(Server=Server)
    monkeypatch.setitem(sys.modules, "tvm", fake)
    board_server.main(["--tracker", "127.0.0.1:9190", "--key", "k"])
    assert seen["host"] == "127.0.0.1" and "warning" not in capsys.readouterr().err
    board_server.main(["--tracker", "10.0.0.2:9190", "--key", "k", "--host", "0.0.0.0"])
    assert seen["host"] == "0.0.0.0"
    assert "whoever can reach that address can run code on this board" in capsys.readouterr().err


def test_emulate_stop_ends_only_the_processes_it_started(tmp_path):
    import json
    import subprocess
    import sys

    from harness import emulate

    run = tmp_path / "run"
    run.mkdir()
    started = emulate._spawn([sys.executable, "-c", "import time; time.sleep(60)"], run / "s.log",
                             run / "server-k.pid")
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        # pid files naming a process that runs something else (a reused pid), and an older bare pid
        (run / "tracker-9190.pid").write_text(json.dumps({"pid": unrelated.pid,
                                                          "cmdline": ["python", "-m", "tvm.exec.rpc_tracker"]}))
        (run / "server-old.pid").write_text(str(unrelated.pid))
        emulate.stop(tmp_path)
        assert started.wait(timeout=10) is not None
        assert unrelated.poll() is None, "stop ended a process it did not start"
    finally:
        unrelated.kill()
        unrelated.wait()


# -- a full disk, a read-only output: one line, exit 2, nothing half-written --------------------------------

def _mounted(tmp_path, options: str):
    """A small tmpfs under ``tmp_path`` (skips where this user cannot mount one)."""
    import subprocess

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs to mount a small tmpfs (root)")
    return mnt


def _umount(mnt):
    import subprocess

    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("size, backend, says", [
    ("16k", "noop", "the results store"),  # the store cannot be made
    ("400k", "torchscript", "no space left for an artifact"),  # the store fits, an artifact does not
])
def test_a_full_disk_is_one_line_and_exit_2(tmp_path, size, backend, says):
    import subprocess
    import sys

    mnt = _mounted(tmp_path, f"size={size}")
    try:
        r = subprocess.run([sys.executable, "-m", "harness.run", "--target", _profile(tmp_path, "input_size = 32"),
                            "--models", "ds_mbnet_tiny", "--backends", backend, "--results", str(mnt / "out")],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and says in last, last
        assert not list(mnt.rglob("*.tmp"))
    finally:
        _umount(mnt)


@pytest.mark.parametrize("command", ["run", "report", "compare", "export"])
def test_a_read_only_output_is_one_line_and_exit_2(tmp_path, command, capsys):
    from harness import compare as comparemod
    from harness import export as exportmod

    mnt = _mounted(tmp_path, "size=1m,ro")
    committed = Path(__file__).resolve().parent.parent / "results" / "x86"
    try:
        code = {"run": lambda: runmod.main(["--target", _profile(tmp_path, "input_size = 32"), "--models",
                                            "ds_mbnet_tiny", "--routes", "0", "--backends", "noop", "--results",
                                            str(mnt / "out")]),
                "report": lambda: reportmod.main(["--target", "x86", "--results", str(mnt)]),
                "compare": lambda: comparemod.main([str(committed), str(committed), "--csv", str(mnt / "c.csv")]),
                "export": lambda: exportmod.main(["--model", "ds_mbnet_tiny", "--backend", "torchscript",
                                                  "--input-size", "32", "--out", str(mnt / "m.ts")])}[command]()
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("error:")
    finally:
        _umount(mnt)
