"""TVM MetaSchedule tuning within a budget: faster than untuned and still correct, resumable after
kill -9, re-runs tune nothing, honest labels, a database for another target is not applied.
Records shipped with the repository: test_tvm_shipped_records.py.

Tiny convolutional networks at 16x16 stand in for routes (a real route's layer takes tens of
seconds of tuning on 2 cores).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.backends import get_backend
from harness.measure.pipeline import ArtifactKey, check_output, reference, trial, weights_fingerprint
from harness.targets import load_target

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _net(channels=(8, 16)):
    torch.manual_seed(0)
    layers, c_in = [], 3
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        c_in = c
    return nn.Sequential(*layers).eval()


def small_search(trials: int, max_trials: int | None = None):
    """Search settings for a test: ``trials`` per task and a population of 16 evolved once (the
    default's 128 twice costs a quarter of a tiny network's tuning time); what these tests check is
    the tuning's flow and the build's output, not how fast the schedules found are."""
    from harness.backends.tvm_tuning import SearchSettings

    return SearchSettings(first_trials=trials, trials_per_iter=trials, max_trials_per_task=max_trials or trials,
                          population=16, genetic_iters=1)


def tvm_on_x86(workdir):
    """The x86 profile and its TVM backend tuning into ``workdir`` (a skip where TVM is absent)."""
    target = load_target("x86").resolve()
    backend = get_backend("tvm", target.options("tvm"), workdir=workdir)
    if backend.unavailable(target):
        pytest.skip(backend.unavailable(target))
    return target, backend


@pytest.fixture
def x86(tmp_path):
    return tvm_on_x86(tmp_path / "tvm_tuning")


def _build(backend, target, module, x, cache):
    key = ArtifactKey.of("net", "r", backend, target, "fp32", x, weights_fingerprint(module))
    result = trial(backend, module, x, target, "fp32", key, cache)
    assert result.ok, result
    return result


def _tasks(backend, target, module, x):
    from harness.backends.tvm_tuning import collect_tasks

    mod, tvm_target = backend.relax_module(module, x, target, "fp32")
    return collect_tasks([mod], tvm_target)


def test_tuning_keeps_the_output_and_a_rerun_tunes_nothing(x86, tmp_path):
    from harness.backends.tvm_tuning import RECORD_FILES, tune

    target, backend = x86
    net, x = _net((16, 32)), torch.randn(1, 3, 32, 32)
    untuned = _build(backend, target, net, x, tmp_path / "cache")
    assert untuned.details["tuning"] == "untuned" and untuned.details["tuned_tasks"] == 0
    tasks = _tasks(backend, target, net, x)
    db = backend.open_database(target)
    search = small_search(8)
    done = tune(db, tasks, budget_s=1e6, search=search)  # step 1 only: the plan adds what the budget allows
    assert done["tuned_now"] >= len(tasks) > 0
    db = backend.database(target)
    assert db is not None and backend.database(target) is db  # read once, not once per build
    workloads, records = RECORD_FILES  # builds read the best record per workload, pruned into best/

    def lines(folder, name):
        return len((folder / name).read_text().splitlines())

    assert db.records == db.directory / "best"
    assert lines(db.records, records) == lines(db.records, workloads) > 0
    assert lines(db.directory, records) > lines(db.records, records)
    tuned = _build(backend, target, net, x, tmp_path / "cache")  # the new records change the artifact's key
    assert tuned.details["cached"] is False
    assert tuned.details["tuning"] == "tuned" and tuned.details["tuned_tasks"] == tuned.details["tasks"] == len(tasks)
    assert check_output(tuned.engine(x), reference(net, x), "fp32") is None  # still eager's output
    # whether tuning pays is a measured time: benchmarks/tvm_tuning_curve.py and the committed runs say
    # it, not a test (a busy machine must not fail the suite)
    # the same budget again tunes nothing, and the artifact is found in the cache
    again = tune(backend.open_database(target), tasks, budget_s=1e6, search=search)
    assert again["tuned_now"] == 0 and again["trials_now"] == 0
    backend.open_database(target)._write_ledger()  # as tuning does after every task
    assert backend.database(target) is not db  # its files changed: read again, never stale
    # the budget counts earlier runs: room for more trials per task, but the seconds are spent
    wider = small_search(8, 64)
    db = backend.open_database(target)
    seconds = sum(db.entry(t.key)["seconds"] for t in tasks)  # enough for 8 trials per task once more
    assert tune(db, tasks, budget_s=0.9 * seconds, search=wider)["trials_now"] == 0
    assert _build(backend, target, net, x, tmp_path / "cache").details["cached"] is True


@pytest.mark.parametrize("options", [{"weight_prepack": True}, {"layout": "NHWC", "weight_prepack": True}])
def test_prepacked_weights_and_nhwc_keep_eagers_output_once_tuned(x86, tmp_path, options):
    """With ``weight_prepack`` MetaSchedule may rewrite a weight's layout for its schedule; the
    build folds that rewrite into the constant, so the deployed function takes the same input and
    gives eager's output (a depthwise layer too: its weight layout differs in NHWC)."""
    from harness.backends.tvm_tuning import apply_records, tune

    target, _ = x86
    backend = get_backend("tvm", {**target.options("tvm"), **options}, workdir=tmp_path / "tvm_tuning")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(), nn.Conv2d(16, 24, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    tasks = _tasks(backend, target, net, x)
    tune(backend.open_database(target), tasks, budget_s=1e6,
         search=small_search(8))
    mod, tvm_target = backend.relax_module(net, x, target, "fp32")

    def rewriting(m):  # the functions that rewrite a weight's layout in every call
        return [gv.name_hint for gv, f in m.functions.items() if "layout_rewrite_preproc" in str(f)]

    applied = apply_records(mod, tvm_target, [backend.open_database(target)])
    assert rewriting(applied), "no schedule rewrote a weight: nothing tested"
    scheduled, details = backend.scheduled(mod, tvm_target, target)
    assert details["tuning"] == "tuned" and not rewriting(scheduled)  # folded into the constants
    tuned = _build(backend, target, net, x, tmp_path / "cache")
    assert tuned.details["tuning"] == "tuned"
    assert check_output(tuned.engine(x), reference(net, x), "fp32") is None


def test_an_unknown_layout_is_refused():
    target = load_target("x86").resolve()
    with pytest.raises(ValueError, match=r"\[tvm\] layout must be one of NCHW, NHWC, got 'NCHWc'"):
        get_backend("tvm", {**target.options("tvm"), "layout": "NCHWc"})


def test_fast_math_replaces_libm_calls_and_keeps_eagers_output(x86, tmp_path):
    """``fast_math`` computes SiLU's sigmoid and tanh with TOPI's polynomial approximations instead
    of one libm call per element; the build still gives eager's output, and it is another artifact."""
    target, _ = x86
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(),
                        nn.Conv2d(16, 8, 1), nn.Tanh()).eval()
    x = torch.randn(1, 3, 16, 16)
    libm_ops = ("T.sigmoid(", "T.tanh(")
    for fast_math in (False, True):
        backend = get_backend("tvm", {**target.options("tvm"), "fast_math": fast_math}, workdir=tmp_path / "db")
        script = backend.relax_module(net, x, target, "fp32")[0].script()
        assert all((op in script) != fast_math for op in libm_ops), (fast_math, [op in script for op in libm_ops])
        built = _build(backend, target, net, x, tmp_path / "cache")
        assert built.details["cached"] is False  # fast_math is part of the artifact's key
        assert check_output(built.engine(x), reference(net, x), "fp32") is None


def test_kill_9_keeps_finished_tasks_and_the_rerun_skips_them(x86, tmp_path):
    from harness.backends.tvm_tuning import LEDGER, tune

    target, backend = x86
    workdir = tmp_path / "tvm_tuning"
    script = textwrap.dedent(f"""
        import torch
        from harness.backends import get_backend
        from harness.backends.tvm_tuning import tune
        from harness.targets import load_target
        from tests.test_tvm_tuning import _net, _tasks, small_search
        target = load_target("x86").resolve()
        backend = get_backend("tvm", target.options("tvm"), workdir={str(workdir)!r})
        net, x = _net((8, 16, 24)), torch.randn(1, 3, 16, 16)
        tune(backend.open_database(target), _tasks(backend, target, net, x), budget_s=1e6,
             search=small_search(4))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = workdir / LEDGER
    deadline = time.monotonic() + 240
    finished = {}
    while time.monotonic() < deadline and proc.poll() is None:
        if ledger.is_file():
            finished = {k: v for k, v in json.loads(ledger.read_text())["tasks"].items() if v["trials"] > 0}
            if finished:
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the tuner and its builder/runner workers
    proc.wait()
    assert finished, "the tuner finished no task within 240 s"
    net, x = _net((8, 16, 24)), torch.randn(1, 3, 16, 16)
    tasks = _tasks(backend, target, net, x)
    db = backend.open_database(target)  # the database survives the kill
    assert all(db.best_ms(t.extracted.dispatched[0]) is not None for t in tasks if t.key in finished)
    names = []
    tune(db, tasks, budget_s=1e6, search=small_search(4),
         progress_factory=lambda total, desc: (lambda label, text: names.append((desc, label))))
    first_pass = [label for desc, label in names if desc.endswith("first pass")]
    assert len(first_pass) == len(tasks) - len(finished)  # the finished tasks are skipped
    assert all(db.entry(t.key)["trials"] >= 4 for t in tasks)


def test_a_database_tuned_for_another_target_is_not_applied(x86, tmp_path):
    from harness.backends.tvm_tuning import LEDGER, SearchSettings, tune

    target, _ = x86
    workdir = tmp_path / "tvm_tuning"
    # the profile's shipped records left out: they would build in the foreign database's place
    backend = get_backend("tvm", {**target.options("tvm"), "shipped_records": ""}, workdir=workdir)
    workdir.mkdir()
    (workdir / "database_workload.json").write_text("")
    (workdir / LEDGER).write_text(json.dumps({"target": "llvm -mcpu=some-other-cpu", "tasks": {}}))
    notes = backend.notes(target)
    assert len(notes) == 1 and "was tuned for llvm -mcpu=some-other-cpu" in notes[0] and "not applied" in notes[0]
    net, x = _net(), torch.randn(1, 3, 16, 16)
    result = _build(backend, target, net, x, tmp_path / "cache")
    assert result.details["tuning"] == "untuned"
    with pytest.raises(ValueError, match="was tuned for llvm -mcpu=some-other-cpu"):
        tune(backend.open_database(target), _tasks(backend, target, net, x), 10, SearchSettings())


def test_the_run_tunes_within_the_profiles_budget_and_labels_its_rows(x86, tmp_path, capsys):
    """``harness.run`` tunes within ``--tune-minutes`` (over the profile's ``[tvm] tune_minutes``): the
    budget (2 s here) ends after the first task, so the rows say partly tuned and the summary says
    how tuned (that a spent budget tunes nothing more on a re-run is the first test's)."""
    import pandas as pd

    from harness import run as runmod

    profile = tmp_path / "tvm-test.toml"
    profile.write_text('name = "tvm-test"\ndevice = "cpu"\nbackends = ["tvm"]\ninput_size = 32\n'
                       '[tvm]\ntarget = { kind = "llvm", mcpu = "auto", num-cores = 0 }\ntune_minutes = 30\n'
                       '[protocol]\nwarmup_calls = 2\nwarmup_ms = 10\nrepeat = 3\nmin_repeat_ms = 5\n')
    args = ["--target", str(profile), "--models", "ds_mbnet_tiny", "--routes", "0", "--out", str(tmp_path / "out"),
            "--tune-minutes", "0.03"]
    assert runmod.main(args) == 0
    out = capsys.readouterr()
    assert "tvm: tuning ds_mbnet_tiny at 32px within 0.03 min (--tune-minutes;" in out.err
    assert "ds_mbnet_tiny head: extracted" in out.err  # the dynamic engine's parts are tuned too
    rows = pd.read_csv(tmp_path / "out" / "lut.csv")
    details = json.loads(rows.backend_details[0])
    assert rows.status[0] == "ok" and details["tuning"].startswith("partly tuned") and 0 < details["tuned_tasks"]
    assert "tvm rows: 1 partly tuned" in out.out
    assert "tvm is untuned" not in out.out  # said before tuning, no longer true
    # the one artifact is built with the same partly tuned database: a record whose trace does not
    # replay on one of its functions (anchor-block equality lends records across fusions) leaves
    # that artifact untuned and says so; it never loses the row
    one = pd.read_csv(tmp_path / "out" / "dynamic.csv").query("kind == 'one_graph'")
    assert (one.status == "ok").any(), one.error.tolist()
    assert not one.error.fillna("").str.contains("Check failed").any(), one.error.tolist()
    # a re-run with the same budget finds it spent without extracting the tasks again; a larger one extracts
    from harness.phases.tuning import SPENT

    assert ": extracted" in out.err and SPENT not in out.out
    assert runmod.main(args) == 0
    again = capsys.readouterr()
    assert ": extracted" not in again.err and SPENT in again.out
    assert runmod.main([*args[:-1], "0.05", "--phases", "static"]) == 0  # no dynamic engines to rebuild
    assert ": extracted" in capsys.readouterr().err


@pytest.mark.parametrize("dynamic_backends, tunes_parts", [("tvm", True), ("eager", False)])
def test_the_dynamic_engines_parts_are_tuned_when_the_run_measures_it_on_tvm(tmp_path, monkeypatch,
                                                                             dynamic_backends, tunes_parts):
    """Which tasks the run tunes follows ``--dynamic-backends``, not only the profile's
    ``dynamic_backends`` (which here leaves TVM out): measuring the dynamic engine on TVM builds
    its head and segments, and their tasks are tuned with the routes'."""
    from harness import run as runmod
    from harness.phases import policy

    asked = []

    def tuning(backend, target, models, input_size, budget_s, progress, dynamic=None, beyond_shipped=False,
               announce=None):
        asked.append(dynamic)
        assert beyond_shipped  # the run tunes only what shipped records lack (none here)
        raise KeyboardInterrupt  # what the run would tune is all this test needs

    monkeypatch.setattr(policy, "run_tuning", tuning)
    profile = tmp_path / "tvm-test.toml"
    profile.write_text('name = "tvm-test"\ndevice = "cpu"\nbackends = ["eager", "tvm"]\ndynamic_backends = ["eager"]\n'
                       'input_size = 32\n[tvm]\ntarget = { kind = "llvm", mcpu = "auto", num-cores = 0 }\n'
                       'tune_minutes = 1\n')
    args = ["--target", str(profile), "--models", "ds_mbnet_tiny", "--phases", "dynamic",
            "--dynamic-backends", dynamic_backends, "--out", str(tmp_path / "out")]
    assert runmod.main(args) == 130
    assert asked == [tunes_parts]


def test_the_tuned_networks_include_what_the_dynamic_phase_builds():
    """With the dynamic engine on TVM the run builds the head, every segment and, for Table 7's
    acceleration, the static counterpart at x1.0 and x0.5: all are tuned (the counterpart once,
    when the run measures it anyway)."""
    from harness.phases.tuning import tuning_modules

    def labels(models, dynamic):
        return [label for label, _, _ in tuning_modules(models, 64, dynamic)]

    static_only = labels(["ds_mbnet"], dynamic=False)
    assert "mobilenet_v1 x1.0" not in static_only and not any("head" in label for label in static_only)
    with_dynamic = labels(["ds_mbnet"], dynamic=True)
    assert {"ds_mbnet head", "mobilenet_v1 x1.0", "mobilenet_v1 x0.5"} <= set(with_dynamic)
    both = labels(["ds_mbnet", "mobilenet_v1"], dynamic=True)
    assert len(both) == len(set(both)) and both.count("mobilenet_v1 x1.0") == 1  # once, as its own workload
