"""What the tables, the figures and the gate report share: the paper's reference values (shown
only in columns labelled paper), the one error type, the ``ok`` filter, Markdown drawing and the
interleaved acceleration ratios. Imports no other reporting module.
"""

from __future__ import annotations

import json

import pandas as pd

PAPER_TABLE2_MS = {"full": 12.2, "masking": 12.4, "indexing": 16.6, "slicing": 7.9, "ideal": 7.2}
PAPER_TABLE7 = {  # row: (MAdds in M, latency ms)
    "MBNetV1 x1.0": (569, 63), "MBNetV1 x0.75": (317, 48), "MBNetV1 x0.5": (150, 33),
    "DS-MBNet-L": (565, 69), "DS-MBNet-M": (319, 54), "DS-MBNet-S": (153, 39)}
PAPER_ACCELERATION = {"ideal": 63 / 33, "realized": 63 / 39}
PAPER_SLIMMABLE = {1.0: ("569M", "4.2M"), 0.75: ("317M", "2.6M"), 0.5: ("150M", "1.3M"), 0.25: ("41M", "0.5M")}
WAY_NOTES = {
    "full": "supernet, largest route",
    "masking": "supernet, full width, unused channels zeroed",
    "indexing": "supernet, kept weights gathered at run time",
    "slicing": "supernet, weight views W[:c_out, :c_in] at run time",
    "materialized": "the route's weights copied out (same structure, attention and gates)",
    "ideal": "stand-alone resnet50 x0.25 (no attention, no gates)",
}
class ReportError(Exception):
    """Nothing to build from the folder: one line, exit code 2."""


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.status == "ok"] if len(df) else df


def md_table(df: pd.DataFrame) -> str:
    """A Markdown table of ``df`` as given (cells are preformatted strings), drawn by pandas."""
    return df.astype(str).to_markdown(index=False, disable_numparse=True)


def acceleration(dyn: pd.DataFrame, input_size: int) -> pd.DataFrame:
    if dyn.empty:
        return pd.DataFrame()
    a = ok_rows(dyn[(dyn.kind == "acceleration") & (dyn.input_size == input_size) & (dyn.model == "ds_mbnet")])
    rows = []
    for b, g in a.groupby("backend"):
        t = g.set_index("name").latency_ms_mean
        if {"largest", "matched", "dynamic"} <= set(t.index):
            rows.append({"backend": b, "ideal": t["largest"] / t["matched"], "realized": t["largest"] / t["dynamic"]})
    return pd.DataFrame(rows)


TUNING_MARKS = {"untuned": "†", "partly tuned": "‡"}
TUNING_NOTE = ("† TVM untuned (no MetaSchedule record applies: operators left unscheduled); ‡ TVM partly tuned "
               "(some tasks without a record). python -m harness.tune tunes them.")


def tuning_label(details) -> str:
    """``untuned``, ``partly tuned`` or ``tuned`` from a row's ``backend_details`` ('' when the
    backend does not tune)."""
    try:
        label = json.loads(details).get("tuning", "") if isinstance(details, str) and details else ""
    except ValueError:
        return ""
    return "partly tuned" if label.startswith("partly") else label
