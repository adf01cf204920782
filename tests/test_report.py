"""``python -m harness.report``: tables and figures rebuilt from stored results, never measured."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import report
from harness.phases.table2 import TABLE2_WAYS
from harness.reporting import tables
from harness.reporting.common import cell_notes

ROOT = Path(__file__).resolve().parent.parent
STORED = ROOT / "results" / "x86"
STORED_FILES = ("lut.csv", "dynamic.csv", "env.json", "gate_retraining.csv", "gate_retraining_routes.csv",
                "gate_retraining.json")


def test_rebuilds_the_committed_tables_identically(tmp_path, capsys):
    """A folder holding only the stored results of the committed x86 run (copied, not measured
    here): every committed table comes out byte for byte."""
    for name in STORED_FILES:
        shutil.copy(STORED / name, tmp_path / name)
    assert report.main(["--target", "x86", "--results", str(tmp_path)]) == 0
    committed = sorted((STORED / "tables").iterdir())
    assert {p.name for p in committed} >= {"table2.md", "table2_ds_resnet50.md", "table7.md", "slimmable_table3.md",
                                           "lut.md", "table2.csv"}
    for p in committed:
        assert (tmp_path / "tables" / p.name).read_text() == p.read_text(), p.name
    assert (tmp_path / "gate_retraining.md").read_text() == (STORED / "gate_retraining.md").read_text()
    for fig in ("latency_vs_madds", "lut_vs_measured", "acceleration", "table2", "table2_ds_resnet50",
                "gate_retraining_ds_mbnet", "gate_retraining_ds_resnet50"):
        assert (tmp_path / "figures" / f"{fig}.png").stat().st_size > 10_000


def _one_error_line(capsys, pattern):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0], err


def test_empty_or_missing_folder(tmp_path, capsys):
    assert report.main(["--target", "x86", "--results", str(tmp_path / "none")]) == 2
    _one_error_line(capsys, "no results folder")
    assert report.main(["--target", "x86", "--results", str(tmp_path)]) == 2
    _one_error_line(capsys, "holds no stored results")


def test_results_of_another_model(tmp_path, capsys):
    pd.DataFrame([{"model": "ds_resnet50_tiny", "route": "0-0-0-0", "backend": "eager", "precision": "fp32",
                   "batch_size": 1, "input_size": 224, "madds": 1, "params": 1, "latency_ms_p50": 1.0,
                   "status": "ok", "error": ""}]).to_csv(tmp_path / "lut.csv", index=False)
    assert report.main(["--target", "x86", "--results", str(tmp_path)]) == 2
    _one_error_line(capsys, "it holds ds_resnet50_tiny")


def test_table2_ratios_are_computed_from_the_stored_rows():
    p50 = {"full": 8.0, "masking": 9.0, "indexing": 12.0, "slicing": 5.0, "materialized": 4.5, "ideal": 4.0}
    dyn = pd.DataFrame([{"model": "s_resnet50", "backend": "eager", "precision": "fp32", "batch_size": 1,
                         "input_size": 224, "kind": "table2", "name": w, "route": "0", "madds": 1e6,
                         "latency_ms_p50": p50[w], "latency_ms_mean": p50[w], "n": 30, "status": "ok",
                         "error": "", "run_id": "r"} for w in TABLE2_WAYS])
    table, csv, _ = tables.table2(dyn, 224)
    t = table.set_index("way")
    assert t.loc["full", "eager p50 (ms)"] == "8.000" and t.loc["full", "eager / ideal"] == "2.00x"
    assert t.loc["indexing", "eager / ideal"] == "3.00x" and t.loc["ideal", "eager / ideal"] == "1.00x"
    assert t.loc["slicing", "paper / ideal"] == f"{7.9 / 7.2:.2f}x"  # paper columns come from the paper
    assert csv.set_index("way").ratio_to_ideal["masking"] == pytest.approx(9.0 / 4.0)
    with pytest.raises(tables.ReportError, match="no Table 2"):
        tables.table2(dyn, 64)
    with pytest.raises(tables.ReportError, match="no Table 2 measurement .* of ds_resnet50"):
        tables.table2(dyn, 224, "ds_resnet50")  # each supernet's rows make their own table


def test_table2_keeps_each_precision_apart_with_the_papers_ratios():
    """A GPU run stores fp32 and fp16 rows of every way: each precision gets its own columns (they
    were once looked up together and the report crashed), and the note gives the three ratios."""
    p50 = {"fp32": {"full": 8.0, "masking": 9.0, "indexing": 12.0, "slicing": 5.0, "materialized": 4.5, "ideal": 4.0},
           "fp16": {"full": 4.0, "masking": 6.0, "indexing": 4.0, "slicing": 2.2, "materialized": 2.0, "ideal": 2.0}}
    dyn = pd.DataFrame([{"model": "s_resnet50", "backend": "eager", "precision": prec, "batch_size": 1,
                         "input_size": 224, "kind": "table2", "name": w, "route": "0", "madds": 1e6,
                         "latency_ms_p50": p50[prec][w], "latency_ms_mean": p50[prec][w], "n": 30, "status": "ok",
                         "error": "", "run_id": "r"} for prec in p50 for w in TABLE2_WAYS])
    table, csv, notes = tables.table2(dyn, 224)
    t = table.set_index("way")
    assert t.loc["slicing", "eager / ideal"] == "1.25x" and t.loc["slicing", "eager fp16 / ideal"] == "1.10x"
    assert set(csv.precision) == {"fp32", "fp16"} and len(csv) == 12
    ratios = notes[-1]
    assert "eager: slicing/ideal 1.25 (paper 1.10), masking/full 1.12 (paper 1.02), indexing/ideal 3.00 " \
           "(paper 2.31)" in ratios
    assert "eager fp16: slicing/ideal 1.10" in ratios and "masking/full 1.50" in ratios


def test_untuned_and_partly_tuned_tvm_cells_are_marked():
    def row(backend, width, ms, details):
        return {"model": "mobilenet_v1", "route": f"x{width}", "backend": backend, "precision": "fp32",
                "batch_size": 1, "input_size": 224, "madds": width * 1e8, "params": width * 1e6,
                "latency_ms_p50": ms, "latency_ms_mean": ms, "n": 30, "valid": 1, "status": "ok", "error": "",
                "backend_details": details}

    tuned = '{"tuning": "tuned", "tuned_tasks": 9, "tasks": 9}'
    lut = pd.DataFrame([row("eager", 1.0, 10.0, "{}"), row("eager", 0.5, 4.0, "{}"),
                        row("tvm", 1.0, 400.0, '{"tuning": "untuned", "tuned_tasks": 0, "tasks": 9}'),
                        row("tvm", 0.5, 30.0, '{"tuning": "partly tuned (5/9)", "tuned_tasks": 5, "tasks": 9}')])
    t, _, notes = tables.slimmable_table3(lut, 224)
    t = t.set_index("switch")
    assert t.loc["x1.0", "tvm p50 (ms)"] == "400.000†" and t.loc["x0.5", "tvm p50 (ms)"] == "30.000‡"
    assert t.loc["x1.0", "eager p50 (ms)"] == "10.000"  # other backends carry no mark
    notes = cell_notes(t)  # the notes tables.build adds for the marks a table carries
    assert len(notes) == 1 and "untuned" in notes[0]
    lut.loc[lut.backend == "tvm", "backend_details"] = tuned
    t, _, notes = tables.slimmable_table3(lut, 224)
    assert t.set_index("switch").loc["x1.0", "tvm p50 (ms)"] == "400.000" and cell_notes(t) == []


def test_table7_prices_ds_mbnet_pp_rows_and_says_when_the_paper_lies_outside_its_routes():
    def lut_row(w, ms):
        return {"model": "mobilenet_v1", "route": f"x{w}", "backend": "eager", "precision": "fp32", "batch_size": 1,
                "input_size": 224, "madds": w * 569e6, "params": 1, "latency_ms_p50": ms, "status": "ok", "error": ""}

    def route_row(model, route, madds, ms):
        return {"model": model, "backend": "eager", "precision": "fp32", "batch_size": 1, "input_size": 224,
                "kind": "route", "name": f"route {route}", "route": str(route), "madds": madds,
                "latency_ms_p50": ms, "status": "ok", "error": ""}

    lut = pd.DataFrame([lut_row(1.0, 20.0), lut_row(0.75, 15.0), lut_row(0.5, 10.0)])
    dyn = pd.DataFrame([route_row("ds_mbnet", 0, 132e6, 8.0), route_row("ds_mbnet", 1, 564e6, 20.0),
                        route_row("ds_mbnet_pp", 0, 183e6, 9.0), route_row("ds_mbnet_pp", 1, 603e6, 25.0)])
    t, _, notes = tables.table7(lut, dyn, 224)
    t = t.set_index("model")
    share = (570e6 - 183e6) / (603e6 - 183e6)  # L++: the mix of the two routes at 570M
    assert t.loc["DS-MBNet-L++", "eager latency (ms)"] == f"{(1 - share) * 9.0 + share * 25.0:.3f}"
    assert t.loc["DS-MBNet-L++", "paper latency (ms)"] == 73
    assert t.loc["DS-MBNet-S++", "eager latency (ms)"] == "-"
    assert t.loc["DS-MBNet-S++", "route mix"] == "outside ds_mbnet_pp's routes (183M..603M)"
    assert any("DS-MBNet-S++: the paper's 156M MAdds lie outside" in n for n in notes)


def test_the_run_summary_leaves_out_models_with_only_table2_rows():
    from harness.reporting.summary import dynamic_summary

    dyn = pd.DataFrame([{"model": "s_resnet50", "backend": "eager", "precision": "fp32", "kind": "table2",
                         "name": w, "status": "ok", "error": ""} for w in TABLE2_WAYS])
    assert dynamic_summary(dyn).splitlines()[1:] == []


def test_the_run_summary_says_which_dynamic_rows_an_earlier_run_measured():
    """The exports keep earlier runs' rows; the summary of a run that left a backend out must not
    present that backend's kept rows as its own."""
    from harness.reporting.summary import dynamic_summary

    def row(backend, run_id, ms):
        return {"model": "ds_mbnet", "backend": backend, "precision": "fp32", "kind": "route", "name": "route 0",
                "route": "0", "latency_ms_p50": ms, "predicted_ms": ms * 1.02, "rel_error": 0.02, "status": "ok",
                "error": "", "run_id": run_id}

    dyn = pd.DataFrame([row("eager", "now", 10.0), row("tvm", "then", 8.0), row("tvm", "before", 8.1)])
    lines = dynamic_summary(dyn, "now").splitlines()[1:]
    assert lines[0].startswith("  ds_mbnet eager fp32: LUT vs deployed median 2.0%")
    assert lines[1].startswith("  ds_mbnet tvm fp32 (not measured by this run: kept from run before, then): LUT vs")
    assert "not measured" not in dynamic_summary(dyn)  # no run named: nothing to say


def test_the_run_summary_judges_the_lut_only_by_valid_deployed_timings():
    """A deployed timing whose interval is wider than the protocol allows is named with its error,
    not counted in the LUT's median and max."""
    from harness.reporting.summary import dynamic_summary

    def row(name, err, valid):
        return {"model": "ds_mbnet", "backend": "eager", "precision": "fp32", "kind": "route", "name": name,
                "route": name, "latency_ms_p50": 10.0, "rel_error": err, "valid": valid, "status": "ok", "error": ""}

    line = dynamic_summary(pd.DataFrame([row("0", 0.01, 1), row("4", -0.03, 1), row("5", -0.095, 0)])).splitlines()[1]
    assert "LUT vs deployed median 2.0% max 3.0% over 2 routes;" in line
    assert "1 route(s) not judged, their deployed timing's interval wider than the protocol allows: 5 (-9.5%)" in line


def test_the_summary_says_which_deployment_to_use_only_when_the_interval_excludes_zero():
    from harness.reporting.summary import deployment_line

    def row(kind, name, p50, lo, hi):
        return {"kind": kind, "name": name, "latency_ms_p50": p50, "latency_ms_p50_ci_low": lo,
                "latency_ms_p50_ci_high": hi, "status": "ok", "madds": 1}

    def line(lo, hi):
        return deployment_line(pd.DataFrame([
            row("static", "0", 4.0, 3.9, 4.1), row("overhead", "deployed", 0.3, 0.2, 0.4),
            row("overhead", "one_graph", 0.2, 0.1, 0.3),
            row("overhead", "one_graph_vs_deployed", (lo + hi) / 2, lo, hi)]))

    assert line(-0.15, -0.02).endswith(
        "one artifact against the deployed path -85 us (-150..-20): deploy the one artifact;")
    assert line(0.02, 0.15).endswith(": deploy the separate engines;")
    assert line(-0.05, 0.1).endswith(": no measurable difference;")
    assert "+7.5% of the smallest route" in line(-0.05, 0.1)  # deployed +300 us over the 4 ms static engine
    # where the deployed path's overhead goes: the parts chained against the static engine (the cut at the gates)
    split = deployment_line(pd.DataFrame([row("static", "0", 4.0, 3.9, 4.1), row("overhead", "deployed", 0.3, 0.2, 0.4),
                                          row("overhead", "split", 0.1, -0.02, 0.2)]))
    assert split == ("over the routes' static engines: deployed path +300 us (+200..+400; +7.5% of the smallest "
                     "route; of it the parts chained +100 us (-20..+200));")
    # and the same deployment when each engine runs right after itself (a process serving the network alone)
    steady = deployment_line(pd.DataFrame([row("static", "0", 4.0, 3.9, 4.1),
                                           row("overhead", "deployed", 0.3, 0.2, 0.4),
                                           row("overhead", "deployed_steady", 0.04, -0.01, 0.08)]))
    assert steady == ("over the routes' static engines: deployed path +300 us (+200..+400; +7.5% of the smallest "
                      "route), each call right after one of its own +40 us (-10..+80; +1.0%);")


def test_cost_disagreement_names_the_pair_madds_orders_wrongly():
    from harness.reporting.gates import cost_disagreement

    routes = pd.DataFrame({"gate": "g", "route": ["0", "1", "2"], "madds": [10e6, 20e6, 30e6],
                           "lut_ms": [1.0, 3.0, 2.0]})
    line = cost_disagreement(pd.concat([routes, routes.assign(gate="h")]))  # per route, not per gate
    assert line.startswith("MAdds and the LUT order 33.3% of the 3 pairs of the 3 routes oppositely")
    assert "route 1 (20.0M MAdds, 3.000 ms on the LUT) against 2 (30.0M, 2.000 ms): 1.50x the MAdds, 33% faster" in line
    agree = cost_disagreement(routes.assign(lut_ms=[1.0, 2.0, 3.0]))
    assert agree == "MAdds and the LUT order 0.0% of the 3 pairs of the 3 routes oppositely."


def test_accuracy_at_equal_measured_latency_and_its_noise():
    from harness.reporting.gates import accuracy_gap_noise, equal_latency_gaps

    rows = pd.DataFrame({"penalty": ["latency", "latency", "latency", "madds", "madds"],
                         "measured_ms_mean": [4.0, 6.0, 8.0, 5.0, 9.0],
                         "val_accuracy": [0.30, 0.40, 0.36, 0.25, 0.38]})
    # 5.0 ms lies halfway between the latency gates at 4 and 6 ms; 9.0 ms is outside their range
    assert equal_latency_gaps(rows) == [(5.0, 0.25, pytest.approx(0.35))]
    assert equal_latency_gaps(rows[rows.penalty == "madds"]) == []
    assert accuracy_gap_noise(0.5, 200) == pytest.approx(2 * (2 * 0.25 / 200) ** 0.5)


def test_table7_shares_come_from_the_rounds_paired_with_their_intervals():
    """A ratio of two medians moves with the drift between their samples; where the phase paired the
    engines round by round (overhead rows mix and architecture), the shares are those medians."""
    from harness.reporting.common import acceleration_row, share_text, speedup_text

    def row(kind, name, p50, lo=None, hi=None):
        return {"kind": kind, "name": name, "latency_ms_p50": p50, "latency_ms_p50_ci_low": lo,
                "latency_ms_p50_ci_high": hi, "status": "ok"}

    acc = [row("acceleration", "largest", 20.0), row("acceleration", "matched", 8.0),
           row("acceleration", "dynamic", 11.0), row("acceleration", "static_mix", 10.0)]
    unpaired = acceleration_row(pd.DataFrame(acc))
    assert unpaired["deployment"] == pytest.approx(0.1) and unpaired["architecture"] == pytest.approx(0.25)
    assert share_text(unpaired, "deployment") == "+10.0%"
    paired = acceleration_row(pd.DataFrame(acc + [row("overhead", "mix", 0.3, -0.1, 0.5),
                                                  row("overhead", "architecture", 1.6, 1.2, 2.0)]))
    assert paired["deployment"] == pytest.approx(0.03)
    assert paired["deployment_interval"] == pytest.approx((-0.01, 0.05))
    assert paired["architecture"] == pytest.approx(0.2)
    assert paired["architecture_interval"] == pytest.approx((0.15, 0.25))
    assert paired["realized"] == pytest.approx(20 / 11) and "realized_interval" not in paired
    # the speed-ups from rounds paired with x1.0: x1.0 over (x1.0 + the median difference)
    both = acceleration_row(pd.DataFrame(acc + [row("overhead", "realized", -9.0, -10.0, -5.0),
                                                row("overhead", "ideal", -12.0, -12.5, -11.0)]))
    assert both["realized"] == pytest.approx(20 / 11)
    assert both["realized_interval"] == pytest.approx((20 / 15, 2.0))
    assert both["ideal"] == pytest.approx(2.5) and both["ideal_interval"] == pytest.approx((20 / 9, 20 / 7.5))
    assert speedup_text(both, "realized") == "1.82x (1.33..2.00x)" and speedup_text(unpaired, "ideal") == "2.50x"
    assert share_text(paired, "deployment", "deployed over static mix") == \
        "+3.0% (deployed over static mix; interval -1.0..+5.0%)"
    # the figure's error bars: the paired interval, none (NaN, not a zero-length bar) where the run did
    # not pair it and on the paper's bar
    from harness.reporting.figures import _interval_bars

    bars = _interval_bars(pd.DataFrame([both, unpaired]), "realized")
    assert bars.shape == (2, 3)
    assert bars[:, 0] == pytest.approx([20 / 11 - 20 / 15, 2.0 - 20 / 11])
    assert np.isnan(bars[:, 1:]).all()
