"""``python -m harness.run``: profiles, clear failures with exit codes, and resume after kill -9."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import dsnet
from harness import cli as clitools
from harness import run as runmod
from harness.backends import get_backend
from harness.results.layout import LUT_COLUMNS
from harness.targets import TargetError, known_targets, load_target

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "harness.run", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def test_shipped_profiles_load():
    assert {"x86", "rtx2080ti", "h100", "h200", "arm-cortex-a72"} <= set(known_targets())
    for name in known_targets():
        t = load_target(name)
        assert t.name == name and t.backends
    assert load_target("rtx2080ti").options("tvm")["target"] == {"kind": "cuda", "arch": "sm_75"}
    x86 = load_target("x86").resolve()
    assert x86.threads >= 1 and get_backend("tvm", x86.options("tvm")).options["target"]["mcpu"] != "auto"


@pytest.mark.parametrize("text,message", [
    ('name = "bad"\ndevice = "cpu"\nbackends = ["eager"]\nturbo = true\n',
     r"bad\.toml: unknown key 'turbo' \(valid: name, description, device"),
    ('name = "bad"\ndevice = "cpu"\nbackends = ["eager"]\nthreads = "four"\n',
     r"bad\.toml: key 'threads' must be an integer, got str"),
    ('name = "bad"\ndevice = "cpu"\nbackends = ["eager"]\n[protocol]\nrepeat = "x"\n',
     r"bad\.toml \[protocol\]: key 'repeat' must be an integer, got str"),
    ('name = "bad"\ndevice = "tpu"\nbackends = ["eager"]\n', r"key 'device' must be one of cpu, cuda"),
    ('name = "bad"\ndevice = "cpu"\n', r"missing required key 'backends'"),
    ('name = "bad"\ndevice = "cpu"\nbackends = ["eager"]\nprecisions = ["int3"]\n', r"'precisions' holds 'int3'"),
    ('name = "bad\ndevice = \n', r"bad\.toml: not valid TOML"),
])
def test_malformed_profiles_name_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(TargetError, match=message):
        load_target(str(path))


def test_malformed_profile_exits_2_with_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\ndevice = "cpu"\nbackends = ["eager"]\nturbo = true\n')
    proc = cli("--target", str(path))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "unknown key 'turbo'" in proc.stderr


def test_unknown_target_exits_2_listing_known_ones():
    proc = cli("--target", "rtx9090")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: unknown target 'rtx9090'; known targets: {', '.join(known_targets())}"


def test_gpu_target_without_cuda_exits_2_saying_what_is_missing():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = cli("--target", "rtx2080ti")
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "target 'rtx2080ti' cannot run on this machine: it needs a CUDA GPU" in line
    assert line.endswith("Profiles that can run here: x86")


def test_bad_options_exit_2_with_one_line(tmp_path, capsys):
    for args, message in [(["--backends", "tflite"], "unknown backend(s) tflite"),
                          (["--models", "vgg"], "unknown model(s) vgg"),
                          (["--batch-size", "one"], "--batch-size takes integers"),
                          (["--routes", "99", "--models", "ds_mbnet_tiny"], "no route matches --routes"),
                          (["--routes", "0,99", "--models", "ds_mbnet_tiny"], "no route matches --routes 99"),
                          (["--backends", ","], "--backends names nothing"),
                          (["--backends", "eager,eager"], "--backends names eager more than once"),
                          (["--models", ""], "--models names nothing"),
                          (["--input-size", "0"], "--input-size must be between 32 and 4096, got 0"),
                          (["--input-size", "100000"], "--input-size must be between 32 and 4096"),
                          (["--tune-minutes", "-1"], "--tune-minutes must be >= 0, got -1"),
                          (["--threads", "-1"], "--threads must be 0 (all physical cores) to"),
                          (["--threads", str((os.cpu_count() or 1) + 1)], "this machine's logical cores")]:
        assert runmod.main(["--target", "x86", "--out", str(tmp_path), *args]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (args, err)


def test_busy_machine_is_refused_under_strict(monkeypatch, tmp_path, capsys):
    real = clitools.envmod.capture

    def busy(device, window_s=0.5):
        env = real(device, window_s=0.05)
        env.update(busy=True, other_processes_cpu_percent=180.0)
        return env

    monkeypatch.setattr(clitools.envmod, "capture", busy)
    assert runmod.main(["--target", "x86", "--out", str(tmp_path), "--strict"]) == 3
    assert "machine busy: other processes use 180% of a core" in capsys.readouterr().err


def _profile(tmp_path, expected="auto", repeat=30):
    path = tmp_path / "cpu-test.toml"
    path.write_text(f'name = "cpu-test"\ndevice = "cpu"\nexpected_device = "{expected}"\n'
                    f'backends = ["torchscript", "noop"]\ninput_size = 32\n'
                    f'[protocol]\nwarmup_calls = 2\nwarmup_ms = 10\nrepeat = {repeat}\nmin_repeat_ms = 20\n')
    return str(path)


def test_device_mismatch_is_recorded(tmp_path):
    out = tmp_path / "out"
    code = runmod.main(["--target", _profile(tmp_path, expected="Imaginary CPU 9000", repeat=2),
                        "--models", "ds_mbnet_tiny", "--routes", "0", "--backends", "noop", "--out", str(out)])
    assert code == 0
    env = json.loads((out / "env.json").read_text())
    assert env["device_mismatch"] is True and env["expected_device"] == "Imaginary CPU 9000"
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT DISTINCT device_mismatch FROM results").fetchall() == [(1,)]


def test_raw_samples_are_stored_with_their_round_and_place_in_the_timing_sequence(tmp_path):
    """Two engines in one round phase: every sample keeps its round and its position among all the
    phase's samples (what the machine's speed at that moment is read from, e.g. by
    benchmarks/reproducibility.py's local ratio)."""
    out = tmp_path / "out"
    assert runmod.main(["--target", _profile(tmp_path, repeat=3), "--models", "ds_mbnet_tiny", "--routes", "0,1",
                        "--backends", "noop", "--out", str(out)]) == 0
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT samples_ms, rounds, sample_order FROM results").fetchall()
    assert len(rows) == 2
    placed = {}
    for samples, rounds, order in rows:
        samples, rounds, order = json.loads(samples), json.loads(rounds), json.loads(order)
        assert len(samples) == len(rounds) == len(order) >= 3
        placed |= dict(zip(order, rounds))
    assert sorted(placed) == list(range(len(placed)))  # one sequence over both engines, no gaps
    assert [placed[o] for o in sorted(placed)] == sorted(placed.values())  # rounds follow one another in it
    assert all(o // 2 == r for o, r in placed.items())  # two engines a round


def test_threads_override_the_profile_and_go_to_a_folder_of_their_own(tmp_path, monkeypatch):
    """--threads 1 measures with one thread (env.json says so) into results/<target>-threads1 by
    default, so its rows never mix with those of the profile's thread count."""
    monkeypatch.chdir(tmp_path)  # the default folder is relative: results/...
    configured = []
    monkeypatch.setattr(clitools.envmod, "configure_threads", lambda n: configured.append(n) or n)
    profile = _profile(tmp_path, repeat=2)
    assert runmod.main(["--target", profile, "--models", "ds_mbnet_tiny", "--routes", "0", "--backends", "noop",
                        "--threads", "1", "--phases", "static"]) == 0
    assert configured == [1]
    env = json.loads((tmp_path / "results" / "cpu-test-threads1" / "env.json").read_text())
    assert env["threads"] == 1
    assert not (tmp_path / "results" / "cpu-test").exists()


def test_the_environment_records_what_idle_threads_were_told_and_the_tables_say_it(monkeypatch):
    """Spinning or sleeping idle threads move every latency: a run records the variables that set
    it (the test suite's own among them), and the tables' environment line names them."""
    from harness.env import WAIT_POLICY_VARS, capture
    from harness.reporting.tables import env_line

    for var in WAIT_POLICY_VARS:
        monkeypatch.delenv(var, raising=False)
    defaults = capture(window_s=0.01)
    assert defaults["wait_policy"] == {}
    assert "Idle threads" not in env_line({"env": defaults})
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("TVM_THREAD_POOL_SPIN_COUNT", "0")
    env = capture(window_s=0.01)
    assert env["wait_policy"] == {"OMP_WAIT_POLICY": "PASSIVE", "TVM_THREAD_POOL_SPIN_COUNT": "0"}
    assert "Idle threads as the environment set them: OMP_WAIT_POLICY=PASSIVE, TVM_THREAD_POOL_SPIN_COUNT=0." \
        in env_line({"env": env})


def test_killed_run_loses_nothing_and_the_rerun_measures_only_what_is_missing(tmp_path):
    """Each model is one round phase: killed (-9) once the first model's phase is stored, during
    the second's, the re-run keeps the first untouched and measures only the second."""
    out = tmp_path / "out"
    args = ["--target", _profile(tmp_path), "--models", "ds_mbnet_tiny,mobilenet_v1", "--backends", "torchscript",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "harness.run", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db_path = out / "results.sqlite"
    deadline = time.monotonic() + 300
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if db_path.exists():
            try:
                with sqlite3.connect(db_path) as db:
                    stored = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:
                stored = 0
            if stored >= 1:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db_path) as db:
        before = {r[0]: r[1] for r in db.execute("SELECT route, latency_ms_p50 FROM results")}
    assert 1 <= len(before) < 8 and all(v > 0 for v in before.values())

    _profile(tmp_path, repeat=4)  # the same profile with fewer rounds: what a re-run measures is what is missing
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{8 - len(before)} to measure, {len(before)} already stored" in rerun.stderr
    # the dynamic phase's builds (minutes at 224 px) say so before its first step
    assert "dynamic ds_mbnet_tiny torchscript fp32 [" in rerun.stderr and "and the one artifact" in rerun.stderr
    lut = pd.read_csv(out / "lut.csv", dtype={"route": str})
    assert list(lut.columns) == LUT_COLUMNS
    assert len(lut) == 8 and (lut.status == "ok").all()  # every cell once: none lost, none twice
    kept = lut.set_index("route").latency_ms_p50
    assert all(kept[r] == pytest.approx(v) for r, v in before.items())  # untouched by the re-run
    # the dynamic phase timed the deployed path on every route of the tiny supernet and the one
    # artifact on the routes an input reaches (crafted to take it), each beside the route's static engine
    dyn = pd.read_csv(out / "dynamic.csv", dtype={"name": str})
    routes = {str(r) for r in dsnet.create_model("ds_mbnet_tiny").routes(32)}
    deployed = dyn[dyn.kind == "deployed"]
    assert set(deployed.name) == routes and (deployed.status == "ok").all()
    assert (deployed.predicted_ms > 0).all() and (deployed.latency_ms_p50 > 0).all()
    rows = dyn[dyn.kind == "one_graph"]
    ok = rows[rows.status == "ok"]
    assert set(rows.name) == routes and len(ok) >= 2, rows[["name", "status", "error"]]
    # a route no input reaches (a choice the reference gate never ranks first) is said so
    assert rows[rows.status != "ok"].error.str.contains("no input found that takes route").all()
    assert "over the routes' static engines: deployed path" in rerun.stdout and "one artifact" in rerun.stdout
    # which to deploy: the one artifact minus the deployed path, paired by round on the routes both ran
    with sqlite3.connect(db_path) as db:
        timed = {(kind, name): dict(zip(json.loads(rounds), json.loads(samples))) for kind, name, samples, rounds in
                 db.execute("SELECT kind, name, samples_ms, rounds FROM dynamic WHERE kind IN ('one_graph', "
                            "'deployed') AND status = 'ok'")}
        (p50,) = db.execute("SELECT latency_ms_p50 FROM dynamic WHERE kind = 'overhead' "
                            "AND name = 'one_graph_vs_deployed'").fetchone()
    diffs = [s - timed[("deployed", name)][r] for (kind, name), by_round in timed.items() if kind == "one_graph"
             and ("deployed", name) in timed for r, s in by_round.items() if r in timed[("deployed", name)]]
    assert len(diffs) >= 2 and p50 == pytest.approx(float(pd.Series(diffs).quantile(0.5)))
    assert "one artifact against the deployed path" in rerun.stdout
    # a third run finds everything done
    again = cli(*args)
    assert "0 to measure, 8 already stored" in again.stderr


def test_a_run_into_a_folder_of_exports_without_a_store_keeps_their_rows(tmp_path):
    """A clone of committed results has lut.csv, dynamic.csv and env.json but no results.sqlite:
    a run of another model adds its rows and keeps the others (and names their run)."""
    out = tmp_path / "out"
    profile = _profile(tmp_path, repeat=2)
    assert runmod.main(["--target", profile, "--models", "ds_mbnet_tiny", "--routes", "0", "--backends", "noop",
                        "--out", str(out)]) == 0
    first = json.loads((out / "env.json").read_text())["run_id"]
    for name in ("results.sqlite", "results.sqlite-wal", "results.sqlite-shm"):  # as in a fresh clone
        (out / name).unlink(missing_ok=True)
    assert runmod.main(["--target", profile, "--models", "ds_resnet50_tiny", "--routes", "0-0-0-0",
                        "--backends", "noop", "--out", str(out)]) == 0
    lut = pd.read_csv(out / "lut.csv")
    assert set(lut.model) == {"ds_mbnet_tiny", "ds_resnet50_tiny"}
    assert "ds_mbnet_tiny" in set(pd.read_csv(out / "dynamic.csv").model)
    env = json.loads((out / "env.json").read_text())
    assert first in {r["run_id"] for r in env["earlier_runs"]}


def test_quick_leaves_out_the_slow_and_untuned_compilers_and_validates_its_three_routes():
    """--quick leaves out Inductor (slow compile) and TVM (no records at its input size), each with
    its reason, unless --backends names them, and validates as many routes end to end as its static
    sweep measures."""
    target = load_target("x86").resolve()
    quick = runmod.plan(runmod.parse_args(["--target", "x86", "--quick"]), target)
    assert "tvm" not in quick.backends and "inductor" not in quick.backends
    assert "64" in quick.skipped["tvm"] and "slow compile" in quick.skipped["inductor"]
    assert quick.validate == 3 == len([w for w in runmod.select_workloads(quick, True) if w.model == "ds_mbnet"])
    named = runmod.plan(runmod.parse_args(["--target", "x86", "--quick", "--backends", "eager,tvm"]), target)
    assert named.backends == ["eager", "tvm"] and not named.skipped
    full = runmod.plan(runmod.parse_args(["--target", "x86"]), target)
    assert {"tvm", "inductor"} <= set(full.backends) and full.validate == 16
