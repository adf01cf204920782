"""``python -m harness.retrain_gate``: clear failures, the end-to-end comparison, resume, report rebuild."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.reporting.gates import render
from harness.results.layout import GATE_LARGEST as LARGEST
from harness.results.layout import Layout

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "ds_mbnet_tiny", "--target", "x86", "--input-size", "32"]


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "harness.retrain_gate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def _one_error_line(r, pattern: str):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert pattern in lines[0], lines[0]


def test_missing_data_folder(tmp_path):
    _one_error_line(cli(*TINY, "--backend", "eager", "--data", str(tmp_path / "imagenet"), "--out", str(tmp_path)),
                    "does not exist")


def test_lut_of_another_model(tmp_path):
    pd.DataFrame([{"model": "ds_resnet50_tiny", "backend": "eager", "precision": "fp32", "batch_size": 1,
                   "input_size": 32, "kind": "segment", "name": "head", "latency_ms_p50": 1.0, "status": "ok",
                   "error": ""}]).to_csv(tmp_path / "dynamic.csv", index=False)
    _one_error_line(cli(*TINY, "--backend", "eager", "--lut", str(tmp_path), "--out", str(tmp_path)),
                    "no segments for model ds_mbnet_tiny")


@pytest.mark.parametrize("args,pattern", [
    (["--model", "mobilenet_v1", "--target", "x86", "--backend", "eager"], "mobilenet_v1 has no gate to retrain"),
    (["--model", "s_resnet50_tiny", "--target", "x86", "--backend", "eager"], "(a static or slimmable network)"),
    (["--model", "ds_mbnet_tiny", "--target", "x86", "--backend", "nope"], "unknown backend 'nope'"),
    (["--model", "ds_mbnet_tiny", "--target", "nowhere", "--backend", "eager"], "nowhere"),
])
def test_bad_arguments(args, pattern, tmp_path):
    _one_error_line(cli(*args, "--out", str(tmp_path)), pattern)


def test_an_unreadable_stored_comparison_fails_before_training(tmp_path):
    for name in ("gate_retraining.csv", "gate_retraining_routes.csv"):
        shutil.copy(ROOT / "results" / "x86" / name, tmp_path / name)
    (tmp_path / "gate_retraining.json").write_text('{"models": ')
    _one_error_line(cli(*TINY, "--backend", "eager", "--out", str(tmp_path)), "is unreadable")
    assert not (tmp_path / "gate_retraining").exists()  # nothing trained


def _fast_x86(directory) -> str:
    """The x86 profile with a short protocol (no extra rounds for invalid cells): what this test
    checks is the retraining's flow, not its timings, and on a busy machine the full protocol spends
    its whole budget on every phase."""
    text = (ROOT / "targets" / "x86.toml").read_text()
    start = text.index("\n[protocol]")
    end = text.find("\n[", start + 1)
    text = (text[:start] + "\n[protocol]\nwarmup_calls = 3\nwarmup_ms = 20\nrepeat = 8\nmin_repeat_ms = 5\n"
            "budget_s = 0\n" + (text[end:] if end >= 0 else ""))
    path = directory / "x86.toml"
    path.write_text(text)
    return str(path)


def test_end_to_end_resume_and_rebuild(tmp_path, tmp_path_factory):
    # the folder already holds other models' comparisons (the committed DS-MBNet and DS-ResNet sweeps):
    # they are kept beside the new one, and all are rendered
    for name in ("gate_retraining.csv", "gate_retraining_routes.csv", "gate_retraining.json"):
        shutil.copy(ROOT / "results" / "x86" / name, tmp_path / name)
    kept = pd.read_csv(tmp_path / "gate_retraining.csv")
    assert set(kept.model) == {"ds_mbnet", "ds_resnet50"}
    fast = [_fast_x86(tmp_path_factory.mktemp("profile")) if a == "x86" else a for a in TINY]
    args = [*fast, "--backend", "eager", "--supernet-epochs", "1", "--gate-epochs", "1", "--out", str(tmp_path)]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    both = pd.read_csv(tmp_path / "gate_retraining.csv")
    pd.testing.assert_frame_equal(both[both.model != "ds_mbnet_tiny"].dropna(axis=1, how="all"),
                                  kept.dropna(axis=1, how="all"), check_dtype=False)
    assert set(json.loads((tmp_path / "gate_retraining.json").read_text())["models"]) == {
        "ds_mbnet", "ds_resnet50", "ds_mbnet_tiny"}
    summary = both[both.model == "ds_mbnet_tiny"]
    assert list(summary.gate) == ["madds", "latency", LARGEST]
    assert (summary.measured_ms_mean > 0).all() and summary.val_accuracy.between(0, 1).all()
    routes = pd.read_csv(tmp_path / "gate_retraining_routes.csv", dtype={"route": str})
    routes = routes[routes.model == "ds_mbnet_tiny"]
    for gate, g in routes.groupby("gate"):
        assert g["count"].sum() == summary.set_index("gate").n_val[gate] and g.share.sum() == pytest.approx(1)
    assert (tmp_path / "figures" / "gate_retraining_ds_mbnet_tiny.png").stat().st_size > 0
    assert (tmp_path / "figures" / "gate_retraining_ds_resnet50.png").stat().st_size > 0
    ws = tmp_path / "gate_retraining" / "ds_mbnet_tiny-digits-32px"
    assert {"supernet.pt", "gate-madds-eager.pt", "gate-latency-eager.pt", "dynamic.csv"} <= {
        p.name for p in ws.iterdir()}
    md = (tmp_path / "gate_retraining.md").read_text()
    assert "latency-penalty gate's measured latency is" in md
    assert "## ds_mbnet: latency penalty vs MAdds penalty under latency budgets" in md
    assert "## ds_resnet50: latency penalty vs MAdds penalty under latency budgets" in md
    assert "## ds_mbnet_tiny: MAdds penalty vs latency penalty" in md
    assert "How far the LUT's prices hold: " in md and "LUT ds_mbnet_tiny/eager: " in r.stderr

    # a re-run trains nothing: every stage is reused from the workspace
    r2 = cli(*args)
    assert r2.returncode == 0, r2.stderr
    assert "stage I: reusing" in r2.stderr
    assert "stage II (madds): reusing" in r2.stderr and "stage II (latency): reusing" in r2.stderr
    assert "LUT: measuring" not in r2.stderr

    # the report is rebuilt from the stored files alone, identically
    md2 = (tmp_path / "gate_retraining.md").read_text()
    (tmp_path / "gate_retraining.md").unlink()
    render(Layout(tmp_path))
    assert (tmp_path / "gate_retraining.md").read_text() == md2

    # a budget sweep on the same workspace: stage I and the LUT reused, one calibrated gate per budget
    # and penalty, all measured in one run, the report per budget
    # (a hand-made LUT: on eager at 32 px the tiny routes take about the same time, and a budget
    # below the smallest route is refused; its dispatch cost, 0.25 ms with an interval above zero, is
    # added to every route)
    (tmp_path / "lut").mkdir()
    base = {"model": "ds_mbnet_tiny", "backend": "eager", "precision": "fp32", "batch_size": 1, "input_size": 32,
            "status": "ok", "error": ""}
    pd.DataFrame([base | {"kind": "segment", "name": name, "latency_ms_p50": ms}
                  for name, ms in (("head", 0.5), ("s0_inx_c0", 0.5), ("s0_inx_c1", 1.0), ("s0_inx_c2", 1.5),
                                   ("s0_inx_c3", 2.0))]
                 + [base | {"kind": "dispatch", "name": "per_decision", "latency_ms_p50": 0.25,
                            "latency_ms_p50_ci_low": 0.2, "latency_ms_p50_ci_high": 0.3}]
                 ).to_csv(tmp_path / "lut" / "dynamic.csv", index=False)
    args = [*args, "--lut", str(tmp_path / "lut")]
    r3 = cli(*args, "--latency-budget", "0.7x,0.9x")
    assert r3.returncode == 0, r3.stderr
    assert "stage I: reusing" in r3.stderr and "LUT: measuring" not in r3.stderr
    summary = pd.read_csv(tmp_path / "gate_retraining.csv")
    summary = summary[summary.model == "ds_mbnet_tiny"]
    assert list(summary.gate) == ["madds@0.7x", "latency@0.7x", "madds@0.9x", "latency@0.9x", LARGEST]
    sweep = summary[summary.budget.notna()]
    assert (sweep.calibration_lambda.notna()).all() and (sweep.measured_ms_mean > 0).all()
    lut = sweep[sweep.penalty == "latency"]
    largest_lut = summary.set_index("gate").lut_ms[LARGEST]
    assert (lut.lut_ms <= lut.budget_fraction * largest_lut + 1e-9).all()  # calibrated: the LUT meets the budget
    md3 = (tmp_path / "gate_retraining.md").read_text()
    assert "### ds_mbnet_tiny, budget 0.7x" in md3 and "### ds_mbnet_tiny, budget 0.9x" in md3
    assert "### ds_mbnet, budget 0.6x" in md3 and md3.count("Noise floor") == 3
    (tmp_path / "gate_retraining.md").unlink()
    render(Layout(tmp_path))
    assert (tmp_path / "gate_retraining.md").read_text() == md3
    assert "dispatch cost +250 us per decision (interval +200..+300 us) added per gate" in r3.stderr
    assert summary.set_index("gate").lut_ms[LARGEST] == pytest.approx(0.5 + 2.0 + 0.25)
    bad = cli(*args, "--latency-budget", "0.3x")  # (after the line saying how the LUT priced the dispatch)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: latency budget 0.3x")
    assert "below the smallest route's deployed latency on the LUT; the smallest feasible budget is 1.250 ms" \
        in bad.stderr


def test_a_comparison_stored_before_models_shared_the_folder_reads_as_its_model(tmp_path):
    """``gate_retraining.json`` once held one run's document, not ``{"models": {...}}``."""
    from harness.results.gates import read_comparisons

    summary = pd.read_csv(ROOT / "results" / "x86" / "gate_retraining.csv")
    summary[summary.model == "ds_mbnet"].to_csv(tmp_path / "gate_retraining.csv", index=False)
    shutil.copy(ROOT / "results" / "x86" / "gate_retraining_routes.csv", tmp_path / "gate_retraining_routes.csv")
    doc = json.loads((ROOT / "results" / "x86" / "gate_retraining.json").read_text())["models"]["ds_mbnet"]
    (tmp_path / "gate_retraining.json").write_text(json.dumps(doc))
    stored = read_comparisons(Layout(tmp_path))
    assert list(stored.meta) == ["ds_mbnet"] and stored.meta["ds_mbnet"]["run_id"] == doc["run_id"]
    render(Layout(tmp_path))
    assert "## ds_mbnet: latency penalty vs MAdds penalty" in (tmp_path / "gate_retraining.md").read_text()
