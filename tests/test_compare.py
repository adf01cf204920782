"""``python -m harness.compare``: per-cell ratios with intervals, "same" when not significant, per-backend summary."""

from __future__ import annotations

import pandas as pd
import pytest

from harness import compare as comparemod
from harness.reporting.compare import compare, per_backend


def _lut(cells: dict) -> pd.DataFrame:
    """``{route: (p50, ci_low, ci_high, rel)}`` as lut.csv rows of one model and backend."""
    return pd.DataFrame([{"model": "m", "route": r, "backend": "eager", "precision": "fp32", "batch_size": 1,
                          "input_size": 32, "madds": i, "latency_ms_p50": p, "latency_ms_p50_ci_low": lo,
                          "latency_ms_p50_ci_high": hi, "latency_rel": rel, "status": "ok"}
                         for i, (r, (p, lo, hi, rel)) in enumerate(cells.items())])


A = {"0": (1.0, 0.95, 1.05, 0.25), "1": (2.0, 1.9, 2.1, 0.5), "2": (4.0, 3.9, 4.1, 1.0)}
B = {"0": (1.02, 0.97, 1.06, 0.25), "1": (2.6, 2.5, 2.7, 0.6), "2": (4.0, 3.95, 4.05, 1.0)}


def test_cells_are_same_only_when_the_interval_holds_one():
    cells = compare(_lut(A), _lut(B)).set_index("route")
    assert cells.same["0"] and not cells.same["1"] and cells.same["2"]
    assert cells.ratio["1"] == pytest.approx(1.3)
    assert (cells.ratio_low["1"], cells.ratio_high["1"]) == (pytest.approx(2.5 / 2.1), pytest.approx(2.7 / 1.9))
    assert cells.rel_diff_pct["1"] == pytest.approx(20.0)
    s = per_backend(compare(_lut(A), _lut(B))).iloc[0]
    assert (s["same"], s["different"]) == (2, 1)
    assert s["abs diff max %"] == pytest.approx(30.0) and s["rel diff max %"] == pytest.approx(20.0)
    assert s["route rank Spearman (min over models)"] == pytest.approx(1.0)


def test_the_cli_prints_and_refuses_folders_without_results(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _lut(A).to_csv(tmp_path / "a" / "lut.csv", index=False)
    _lut(B).to_csv(tmp_path / "b" / "lut.csv", index=False)
    assert comparemod.main([str(tmp_path / "a"), str(tmp_path / "b"), "--csv", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    assert "route rank Spearman" in out and (tmp_path / "c.csv").is_file()
    assert comparemod.main([str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no ") and "lut.csv" in err[0]
