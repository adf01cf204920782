"""Two results folders compared cell by cell: is a difference real, or the machine's noise?

Contract
--------
``compare(lut_a, lut_b)`` joins two ``lut.csv`` frames on the result key (both ``ok``) and returns
one row per cell: both medians, the ratio B / A with a 95% interval built from the two medians'
intervals (``[low_B / high_A, high_B / low_A]``), ``same`` when that interval holds 1, and the
relative latency of each side (``latency_rel``: the cell over its model's reference cell, measured
in the same rounds). ``per_backend(cells)`` summarizes per backend: median and max absolute
difference of absolute and of relative latency (%), and the rank agreement of each model's routes
(Spearman, computed as the Pearson correlation of ranks). Rows without intervals (results of an
older version) get no ``same`` verdict.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from harness.results.layout import RESULT_KEY


class CompareError(ValueError):
    """Nothing to compare (one line)."""


def compare(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    ok = lambda df: df[df.status == "ok"]  # noqa: E731
    cols = [*RESULT_KEY, "madds", "latency_ms_p50", "latency_ms_p50_ci_low", "latency_ms_p50_ci_high", "latency_rel"]
    cells = ok(a)[cols].merge(ok(b)[cols].drop(columns="madds"), on=list(RESULT_KEY), suffixes=("_a", "_b"))
    if cells.empty:
        raise CompareError("the two folders share no measured cell (model, route, backend, precision, batch, size)")
    cells["ratio"] = cells.latency_ms_p50_b / cells.latency_ms_p50_a
    cells["ratio_low"] = cells.latency_ms_p50_ci_low_b / cells.latency_ms_p50_ci_high_a
    cells["ratio_high"] = cells.latency_ms_p50_ci_high_b / cells.latency_ms_p50_ci_low_a
    known = cells.ratio_low.notna() & cells.ratio_high.notna()
    cells["same"] = np.where(known, (cells.ratio_low <= 1) & (cells.ratio_high >= 1), None)
    cells["abs_diff_pct"] = 100 * (cells.ratio - 1)
    cells["rel_diff_pct"] = 100 * (cells.latency_rel_b / cells.latency_rel_a - 1)
    return cells


def _spearman(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 2:
        return float("nan")
    return float(x.rank().corr(y.rank()))


def per_backend(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for backend, g in cells.groupby("backend"):
        ranks = [_spearman(m.latency_ms_p50_a, m.latency_ms_p50_b) for _, m in g.groupby("model") if len(m) > 2]
        ranks = [r for r in ranks if r == r]
        rel = g.rel_diff_pct.abs().dropna()
        rows.append({"backend": backend, "cells": len(g),
                     "same": int((g.same == True).sum()), "different": int((g.same == False).sum()),  # noqa: E712
                     "abs diff median %": g.abs_diff_pct.abs().median(), "abs diff max %": g.abs_diff_pct.abs().max(),
                     "rel diff median %": rel.median() if len(rel) else np.nan,
                     "rel diff max %": rel.max() if len(rel) else np.nan,
                     "route rank Spearman (min over models)": min(ranks) if ranks else np.nan})
    return pd.DataFrame(rows)
