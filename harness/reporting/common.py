"""What the tables, the figures and the gate report share: the paper's reference values (shown
only in columns labelled paper), the one error type, the ``ok`` filter, Markdown drawing and the
interleaved acceleration ratios. Imports no other reporting module.
"""

from __future__ import annotations

import json

import pandas as pd

from harness.results.layout import ARCHITECTURE, IDEAL, MIX, REALIZED

PAPER_TABLE2_MS = {"full": 12.2, "masking": 12.4, "indexing": 16.6, "slicing": 7.9, "ideal": 7.2}
PAPER_TABLE7 = {  # row: (MAdds in M, latency ms)
    "MBNetV1 x1.0": (569, 63), "MBNetV1 x0.75": (317, 48), "MBNetV1 x0.5": (150, 33),
    "DS-MBNet-L": (565, 69), "DS-MBNet-M": (319, 54), "DS-MBNet-S": (153, 39),
    "DS-MBNet-L++": (570, 73), "DS-MBNet-M++": (325, 57), "DS-MBNet-S++": (156, 41)}
PAPER_ACCELERATION = {"ideal": 63 / 33, "realized": 63 / 39}
# Slimmable networks Table 3: network -> (slimmable model, static model, {width: (FLOPs, params)})
PAPER_SLIMMABLE = {
    "MobileNet v1": ("s_mobilenet_v1", "mobilenet_v1", {1.0: ("569M", "4.2M"), 0.75: ("317M", "2.6M"),
                                                        0.5: ("150M", "1.3M"), 0.25: ("41M", "0.5M")}),
    "MobileNet v2": ("s_mobilenet_v2", "mobilenet_v2", {1.0: ("301M", "3.5M"), 0.75: ("209M", "2.6M"),
                                                        0.5: ("97M", "2.0M"), 0.35: ("59M", "1.7M")}),
    "ShuffleNet": ("s_shufflenet", "shufflenet", {2.0: ("524M", "5.4M"), 1.0: ("138M", "1.8M"), 0.5: ("38M", "0.7M")}),
    "ResNet-50": ("s_resnet50", "resnet50", {1.0: ("4.1G", "25.5M"), 0.75: ("2.3G", "14.7M"),
                                             0.5: ("1.1G", "6.9M"), 0.25: ("278M", "2.0M")}),
}
WAY_NOTES = {
    "full": "supernet, largest route",
    "masking": "supernet, full width, unused channels zeroed",
    "indexing": "supernet, kept weights gathered at run time",
    "slicing": "supernet, weight views W[:c_out, :c_in] at run time",
    "materialized": "the route's weights copied out (the supernet's structure at that route)",
    "ideal": "stand-alone resnet50 x0.25",
}
# Table 2's sliced supernet: the paper's (slimmable ResNet-50, every layer at 25%) and DS-ResNet's route
TABLE2_VARIANTS = {
    "table2": ("s_resnet50", "ResNet-50 at 25% channels (the slimmable ResNet-50's x0.25 switch: the "
                             "ideal network's architecture, so the ratios measure slicing alone)"),
    "table2_ds_resnet50": ("ds_resnet50", "DS-ResNet at ratio 0.25 in every stage (full-width stem, gates and "
                                          "attention heads: the ratios also measure that architecture)"),
}
INVALID_MARK = "*"  # after a latency cell whose row is not valid under the protocol


class ReportError(Exception):
    """Nothing to build from the folder: one line, exit code 2."""


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df.status == "ok"] if len(df) else df


def md_table(df: pd.DataFrame) -> str:
    """A Markdown table of ``df`` as given (cells are preformatted strings), drawn by pandas."""
    return df.astype(str).to_markdown(index=False, disable_numparse=True)


def acceleration_row(g: pd.DataFrame) -> dict:
    """Table 7's acceleration from one model and backend's ``acceleration`` rows (same rounds; the
    mixes' samples are means of 16 calls, so their p50 estimates the mix's mean): ideal (x1.0 /
    x0.5) and realized (x1.0 / the deployed route mix at x0.5's MAdds) speed-up; with the mix also
    run on the routes' static engines, the loss split into the architecture's share
    (``architecture``: static mix over x0.5, minus 1) and the deployment's (``deployment``: deployed
    mix over static mix, minus 1). Where the run paired them round by round (the ``overhead`` rows
    ``mix`` and ``architecture``), each share is its row's median difference over the reference's
    p50, and ``deployment_interval`` / ``architecture_interval`` its 95% interval likewise: a ratio
    of two medians moves with the drift between their samples (one run, eager: deployment +13.3%
    against a paired +2.5%, interval +0.2..+5.7%). The two speed-ups likewise where the rows
    ``ideal`` and ``realized`` pair x0.5 and the deployed mix with x1.0 (``ideal_interval``,
    ``realized_interval``). Empty when not measured."""
    t = ok_rows(g[g.kind == "acceleration"]).set_index("name").latency_ms_p50
    if not {"largest", "matched", "dynamic"} <= set(t.index):
        return {}

    def paired(name):  # the overhead row of per-round differences the run stored, or None
        rows = ok_rows(g[(g.kind == "overhead") & (g.name == name)])
        return rows.iloc[0] if len(rows) else None

    out = {"ideal": t["largest"] / t["matched"], "realized": t["largest"] / t["dynamic"]}
    for speedup, name in (("ideal", IDEAL), ("realized", REALIZED)):
        if (r := paired(name)) is not None:  # x1.0 over (x1.0 + the round's difference): median, interval
            out[speedup] = t["largest"] / (t["largest"] + r.latency_ms_p50)
            out[f"{speedup}_interval"] = (t["largest"] / (t["largest"] + r.latency_ms_p50_ci_high),
                                          t["largest"] / (t["largest"] + r.latency_ms_p50_ci_low))
    if "static_mix" in t.index:
        out |= {"static_mix": t["largest"] / t["static_mix"], "architecture": t["static_mix"] / t["matched"] - 1,
                "deployment": t["dynamic"] / t["static_mix"] - 1}
        for share, name, ref in (("deployment", MIX, "static_mix"), ("architecture", ARCHITECTURE, "matched")):
            if (r := paired(name)) is not None:  # per-round differences: drift cancels in each, and an interval
                out[share] = r.latency_ms_p50 / t[ref]
                out[f"{share}_interval"] = (r.latency_ms_p50_ci_low / t[ref], r.latency_ms_p50_ci_high / t[ref])
    return out


def share_text(acc: dict, share: str, what: str = "") -> str:
    """A share of an :func:`acceleration_row` (``deployment``, ``architecture``) as text, ``+2.7%
    (what)``, with its interval where the run paired it, ``+2.7% (what; interval -1.0..+6.3%)``."""
    notes = [what] if what else []
    interval = acc.get(f"{share}_interval")
    if isinstance(interval, tuple):  # a frame's row without it holds NaN
        notes.append(f"interval {100 * interval[0]:+.1f}..{100 * interval[1]:+.1f}%")
    return f"{100 * acc[share]:+.1f}%" + (f" ({'; '.join(notes)})" if notes else "")


def speedup_text(acc: dict, speedup: str) -> str:
    """A speed-up of an :func:`acceleration_row` (``ideal``, ``realized``) as text, ``1.62x``, with its
    interval where the run paired it, ``1.62x (1.58..1.66x)``."""
    interval = acc.get(f"{speedup}_interval")
    paired = f" ({interval[0]:.2f}..{interval[1]:.2f}x)" if isinstance(interval, tuple) else ""
    return f"{acc[speedup]:.2f}x{paired}"


def acceleration(dyn: pd.DataFrame, input_size: int) -> pd.DataFrame:
    """:func:`acceleration_row` per backend, DS-MBNet at ``input_size``."""
    if dyn.empty:
        return pd.DataFrame()
    a = dyn[dyn.kind.isin(["acceleration", "overhead"]) & (dyn.input_size == input_size) & (dyn.model == "ds_mbnet")]
    rows = [{"backend": b} | row for b, g in a.groupby("backend") if (row := acceleration_row(g))]
    return pd.DataFrame(rows)


TUNING_MARKS = {"untuned": "†", "partly tuned": "‡"}
TUNING_NOTE = ("† TVM untuned (no MetaSchedule record applies: operators left unscheduled); ‡ TVM partly tuned "
               "(some tasks without a record). python -m harness.tune tunes them.")


EMULATED_MARK = "§"
EMULATED_NOTE = ("§ measured on an emulated board (python -m harness.emulate: qemu-user on another machine): the "
                 "emulator's latency, not the device's; it checks that the artifact runs and is right.")


def marked_invalid(cell) -> bool:
    """Whether a table cell carries :data:`INVALID_MARK` (before any tuning or emulation mark)."""
    return str(cell).rstrip("".join(TUNING_MARKS.values()) + EMULATED_MARK).endswith(INVALID_MARK)


def cell_notes(t) -> list[str]:
    """The notes for the marks a table's cells carry (tuning, emulation)."""
    cells = [str(v) for c in t.columns for v in t[c]]
    notes = [TUNING_NOTE] if any(m in v for m in TUNING_MARKS.values() for v in cells) else []
    return notes + ([EMULATED_NOTE] if any(EMULATED_MARK in v for v in cells) else [])


def tuning_label(details) -> str:
    """``untuned``, ``partly tuned`` or ``tuned`` from a row's ``backend_details`` ('' when the
    backend does not tune)."""
    try:
        label = json.loads(details).get("tuning", "") if isinstance(details, str) and details else ""
    except ValueError:
        return ""
    return "partly tuned" if label.startswith("partly") else label
