"""TVM records shipped with the repository: they build a folder that tuned nothing, are refused in
one line where they do not apply (another TVM, CPU features this CPU lacks, files that do not
unpack), are written by ``harness.tune --ship``, and vouch for the default run's tasks so that the
run skips extracting them.

Split from test_tvm_tuning.py (whose helpers it uses) so that the two halves of TVM's tests run
on both test workers.
"""

import json
from pathlib import Path

import pytest
import torch
from test_tvm_tuning import _build, _net, _tasks, small_search, tvm_on_x86

from harness.backends import get_backend
from harness.measure.pipeline import check_output, reference
from harness.targets import load_target

pytestmark = pytest.mark.slow


@pytest.fixture
def x86(tmp_path):
    return tvm_on_x86(tmp_path / "tvm_tuning")


def test_shipped_records_build_a_folder_that_has_no_database_and_are_refused_where_they_do_not_apply(x86, tmp_path):
    """Records shipped in the repository (the best per workload of a database tuned elsewhere, with
    what they were tuned with) build a results folder that has tuned nothing: its rows say
    ``shipped``, its output is eager's. Its own records come first once it has some. Records of
    another TVM version or for CPU features this CPU lacks are refused in one line, never applied."""
    from harness.backends.tvm_tuning import ABOUT, SHIPPED_FILES, ship_records, tune

    target, _ = x86
    # "elsewhere": the machine that tuned and shipped the records, for the x86-64-v3 baseline (the
    # records then build for this CPU's own mcpu)
    tvm_options = target.options("tvm")
    elsewhere = get_backend("tvm", {**tvm_options, "target": {**tvm_options["target"], "mcpu": "x86-64-v3"}},
                            workdir=tmp_path / "elsewhere")
    net, x = _net(), torch.randn(1, 3, 16, 16)
    tasks = _tasks(elsewhere, target, net, x)
    tune(elsewhere.open_database(target), tasks, budget_s=1e6,
         search=small_search(4))
    shipped = ship_records(elsewhere.tuning_dir, elsewhere.open_database(target).target, tmp_path / "shipped",
                           cpu_flags=[], about={"networks": ["net"]})
    assert "x86-64-v3" in json.loads((shipped / ABOUT).read_text())["target"]
    assert sorted(p.name for p in shipped.iterdir()) == sorted([ABOUT, *SHIPPED_FILES])  # compressed
    assert tvm_options["target"]["mcpu"] != "x86-64-v3"
    assert json.loads((shipped / ABOUT).read_text())["networks"] == ["net"]

    def backend_with(workdir, records):
        b = get_backend("tvm", {**target.options("tvm"), "shipped_records": str(records)}, workdir=workdir)
        return b

    fresh = backend_with(tmp_path / "fresh", shipped)
    notes = fresh.notes(target)
    assert any(f"shipped records in {shipped} " in n for n in notes) and not any("untuned" in n for n in notes), notes
    built = _build(fresh, target, net, x, tmp_path / "cache")
    assert built.details["records"] == "shipped" and built.details["tuning"] == "tuned"
    assert check_output(built.engine(x), reference(net, x), "fp32") is None
    # a run's tuning (harness.run: beyond the shipped records) spends its budget only on the tasks
    # they lack (a deeper net's last layer and what follows it), never on those the records cover;
    # the budget ends after the first task it tunes
    from harness.phases.tuning import tune_tasks

    deeper, gaps = _net((8, 16, 32)), backend_with(tmp_path / "gaps", shipped)
    deeper_tasks = _tasks(gaps, target, deeper, x)
    records = gaps.shipped(target)
    covered = {t.key for t in deeper_tasks if records.best_ms(t.extracted.dispatched[0]) is not None}
    assert 0 < len(covered) < len(deeper_tasks)
    summary = tune_tasks(gaps, target, deeper_tasks, budget_s=1.0, beyond=records)
    assert summary["tasks"] == len(deeper_tasks) and summary["shipped"] == len(covered), summary
    assert summary["tuned_now"] == 1 and summary["tuned"] == len(covered) + 1, summary
    tuned_here = set(gaps.open_database(target).ledger["tasks"])
    assert len(tuned_here) == 1 and tuned_here.isdisjoint(covered), tuned_here
    built = _build(gaps, target, deeper, x, tmp_path / "cache")
    assert built.details["records"] == "local + shipped", built.details
    assert check_output(built.engine(x), reference(deeper, x), "fp32") is None
    own_dir = tmp_path / "own"
    tune(backend_with(own_dir, shipped).open_database(target), tasks, budget_s=1e6,
         search=small_search(2))
    own = _build(backend_with(own_dir, shipped), target, net, x, tmp_path / "cache")
    assert own.details["records"] == "local"

    about = json.loads((shipped / ABOUT).read_text())
    for change, says in (({"tvm": "0.0.1"}, "were tuned with TVM 0.0.1"),
                         ({"cpu_flags": ["no_such_feature"]}, "need CPU features this CPU lacks (no_such_feature)")):
        (shipped / ABOUT).write_text(json.dumps({**about, **change}))
        refused = backend_with(tmp_path / f"fresh-{len(says)}", shipped)
        notes = refused.notes(target)
        assert any(says in n and "not applied" in n for n in notes), notes
        assert any("tvm is untuned" in n for n in notes), notes
        assert _build(refused, target, net, x, tmp_path / "cache").details["records"] == "none"


def test_shipped_records_that_do_not_unpack_are_refused_in_one_line(x86, tmp_path):
    import tvm

    from harness.backends.tvm_tuning import ABOUT, SHIPPED_FILES

    target, _ = x86
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / ABOUT).write_text(json.dumps({"tvm": tvm.__version__, "cpu_flags": []}))
    for name in SHIPPED_FILES:
        (shipped / name).write_bytes(b"not xz")
    backend = get_backend("tvm", {**target.options("tvm"), "shipped_records": str(shipped)}, workdir=tmp_path / "tvm")
    notes = backend.notes(target)
    assert any(f"{SHIPPED_FILES[0]} is unreadable" in n and n.endswith("not applied") for n in notes), notes
    assert any("tvm is untuned" in n for n in notes), notes
    assert all("\n" not in n for n in notes)
    assert backend.shipped(target) is None


def test_harness_tune_ships_records_for_a_baseline_in_a_folder_of_its_own(x86, tmp_path, capsys, monkeypatch):
    """``harness.tune --mcpu x86-64-v3 --ship DIR``: tuned for the baseline (never into the host's
    database: its default folder is its own) and written as shipped records that say what they
    cover and which CPU features they need."""
    from harness import tune as tunemod
    from harness.backends.tvm_tuning import ABOUT, BASELINE_CPU_FLAGS

    monkeypatch.chdir(tmp_path)
    args = ["--target", "x86", "--models", "ds_mbnet_tiny", "--input-size", "32", "--minutes", "0.03",
            "--mcpu", "x86-64-v3", "--ship", str(tmp_path / "shipped")]
    assert tunemod.main(args) == 0
    out = capsys.readouterr()
    assert str(Path("results") / "x86-x86-64-v3" / "tvm_tuning") in out.err
    assert not (tmp_path / "results" / "x86").exists()
    about = json.loads((tmp_path / "shipped" / ABOUT).read_text())
    assert json.loads(about["target"])["mcpu"] == "x86-64-v3" and about["networks"] == ["ds_mbnet_tiny"]
    assert about["cpu_flags"] == sorted(BASELINE_CPU_FLAGS["x86-64-v3"]) and 0 < about["tuned"] <= about["tasks"]
    assert "shipped the best record per workload to" in out.out
    shipped = get_backend("tvm", {**x86[0].options("tvm"), "shipped_records": str(tmp_path / "shipped")},
                          workdir=tmp_path / "fresh")
    assert shipped.shipped_refusal() is None and shipped.shipped(x86[0]) is not None


def test_a_profiles_shipped_records_are_found_beside_the_profile(tmp_path):
    profile = tmp_path / "profiles" / "box.toml"
    profile.parent.mkdir()
    profile.write_text('name = "box"\ndevice = "cpu"\nbackends = ["tvm"]\n'
                       '[tvm]\ntarget = { kind = "llvm" }\nshipped_records = "tvm_records/box"\n')
    options = load_target(str(profile)).options("tvm")
    assert options["shipped_records"] == str(tmp_path / "profiles" / "tvm_records" / "box")


def test_the_shipped_records_vouch_for_the_default_runs_tasks_as_the_code_stands(x86):
    """README's default-run time counts on it: the run skips extracting its 377 tasks because the
    shipped records' about.json vouches for them. Changing ``dsnet``, the build settings or the
    libraries changes the tasks' signature; then check and vouch again:
    ``python -m harness.tune --target x86 --vouch`` (a minute)."""
    from harness.backends.tvm_tuning import ShippedRecords
    from harness.cli import DEFAULT_MODELS
    from harness.phases.tuning import task_signature

    target, backend = x86
    records = ShippedRecords(Path(target.options("tvm")["shipped_records"]))
    signature = task_signature(backend, target, list(DEFAULT_MODELS), target.input_size)
    assert records.vouched(signature) is not None, (
        "the shipped records do not vouch for the default run's tasks as the code stands: "
        "run python -m harness.tune --target x86 --vouch")


def test_a_run_vouched_for_skips_extraction_and_vouching_refuses_records_that_miss_a_task(x86, tmp_path, monkeypatch):
    """``run_tuning`` beyond the shipped records returns at once when their about.json vouches for
    the run's task signature, and extracts as ever when it does not (another input size);
    ``vouch_shipped`` extracts, and refuses records that miss a task, writing nothing."""
    import shutil

    from harness.backends.tvm_tuning import ABOUT
    from harness.phases import tuning

    target, _ = x86
    shipped = tmp_path / "shipped"
    shutil.copytree(target.options("tvm")["shipped_records"], shipped)
    backend = get_backend("tvm", {**target.options("tvm"), "shipped_records": str(shipped)},
                          workdir=tmp_path / "tvm_tuning")
    if backend.shipped(target) is None:
        pytest.skip(f"the shipped records do not apply here: {backend.shipped_refusal()}")
    before = (shipped / ABOUT).read_text()
    with pytest.raises(ValueError, match=r"the shipped records miss \d+ of the \d+ tasks: not vouched"):
        tuning.vouch_shipped(backend, target, ["ds_mbnet_tiny"], 32)  # tuned for other networks
    assert (shipped / ABOUT).read_text() == before

    signature = tuning.task_signature(backend, target, ["ds_mbnet_tiny"], 32)
    backend.shipped_records().vouch({"models": ["ds_mbnet_tiny"], "input_size": 32, "dynamic": False,
                                     "signature": signature, "tasks": 7, "networks": 3})

    def extracted(*args, **kwargs):
        raise RuntimeError("extracted")

    monkeypatch.setattr(tuning, "tuning_tasks", extracted)
    fresh = get_backend("tvm", {**target.options("tvm"), "shipped_records": str(shipped)},
                        workdir=tmp_path / "fresh")  # reads the about.json just written
    announced = []
    summary = tuning.run_tuning(fresh, target, ["ds_mbnet_tiny"], 32, 60.0, beyond_shipped=True,
                                announce=lambda: announced.append(32))
    assert summary["vouched"] and not summary["extracted"]
    assert announced == []  # no "tuning ... within N min" before a run that tunes nothing
    assert (summary["tasks"], summary["tuned"], summary["shipped"], summary["networks"]) == (7, 7, 7, 3)
    with pytest.raises(RuntimeError, match="extracted"):  # another input size: other tasks
        tuning.run_tuning(fresh, target, ["ds_mbnet_tiny"], 48, 60.0, beyond_shipped=True,
                          announce=lambda: announced.append(48))
    assert announced == [48]
    with pytest.raises(RuntimeError, match="extracted"):  # harness.tune tunes every task, shipped or not
        tuning.run_tuning(fresh, target, ["ds_mbnet_tiny"], 32, 60.0)


def test_the_task_signature_leaves_the_hosts_cpu_out(x86):
    """The vouch is made on one machine and read on others (CI's, a user's): the host's CPU, which
    the x86 profile's ``mcpu = "auto"`` resolves to, decides no task (the 377 tasks of the default
    run were the same on an AMD EPYC and on an Intel Xeon), so it is not part of the signature;
    the build settings are."""
    from harness.phases.tuning import task_signature

    target, backend = x86
    options = target.options("tvm")

    def signature(**target_changes):
        b = get_backend("tvm", {**options, "target": {**backend.options["target"], **target_changes}},
                        workdir=backend.workdir)
        return task_signature(b, target, ["ds_mbnet_tiny"], 64)

    assert signature(mcpu="znver4") == signature(mcpu="rocketlake") == signature()
    assert signature(mtriple="aarch64-linux-gnu") != signature()
