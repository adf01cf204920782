"""The comparison plots, drawn from stored results (``harness.reporting.tables.build`` calls :func:`build_all`).

Each function takes the stored frames, writes one PNG under ``<results>/figures/`` and returns its
path, or raises :class:`harness.reporting.common.ReportError` when the results lack what it draws:

- ``latency_vs_madds.png``: per backend, DS-MBNet routes as points, MobileNetV1 widths as a line;
  cells the protocol marks not valid are ringed in red;
- ``lut_vs_measured.png``: the compositional LUT's prediction against the end-to-end dynamic engine;
- ``acceleration.png``: realized against ideal speed-up per backend, beside the paper's;
- ``table2.png``: DS-Net++ Table 2 as bars (ratio to the ideal network);
- ``gate_retraining_<model>.png``: the retrained gates, a figure per model (``harness.reporting.gates``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.reporting import gates
from harness.reporting.common import (
    PAPER_ACCELERATION,
    PAPER_TABLE2_MS,
    TABLE2_VARIANTS,
    WAY_NOTES,
    ReportError,
    acceleration,
    ok_rows,
    tuning_label,
)
from harness.results.layout import Layout
from harness.results.store import StoreError


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def latency_vs_madds(lut: pd.DataFrame, input_size: int, path: Path) -> Path:
    d = ok_rows(lut[(lut.input_size == input_size) & (lut.batch_size == 1) & (lut.precision == "fp32")]) \
        if len(lut) else lut
    if d.empty:
        raise ReportError("no per-route latencies in lut.csv at this input size")
    backends = sorted(set(d.backend) - {"noop"}, key=lambda b: (b != "eager", b))
    plt = _plt()
    cols = min(3, len(backends))
    rows = -(-len(backends) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, b in zip(axes.flat, backends):
        g = d[d.backend == b]
        # a line per family of widths (static models, slimmable switches: routes labelled xW),
        # the routes of each dynamic supernet as points
        widths = {m for m in set(g.model) if g[g.model == m].route.astype(str).str.startswith("x").all()}
        for j, model in enumerate(sorted(widths)):
            s = g[g.model == model].sort_values("madds")
            slimmable = model.startswith("s_")
            ax.plot(s.madds / 1e6, s.latency_ms_p50, "--D" if slimmable else "-o", ms=4, color=f"C{j % 10}",
                    label=f"{model} {'switches' if slimmable else 'widths'}")
        for i, model in enumerate(sorted(set(g.model) - widths)):
            s = g[g.model == model]
            ax.scatter(s.madds / 1e6, s.latency_ms_p50, marker="^v<>"[i % 4], s=22,
                       color="0.3" if i == 0 else f"C{9 - i}", label=f"{model} routes")
        if g.madds.max() > 20 * g.madds.min():  # families from 40M to 4G MAdds: log axes
            ax.set_xscale("log")
            ax.set_yscale("log")
        invalid = g[pd.to_numeric(g.valid, errors="coerce") == 0] if "valid" in g else g.iloc[:0]
        if len(invalid):  # cells the protocol could not make valid: ringed
            ax.scatter(invalid.madds / 1e6, invalid.latency_ms_p50, s=90, facecolors="none", edgecolors="red",
                       linewidths=0.8, label="not valid (interval too wide)")
        labels = {tuning_label(v) for v in g.backend_details} - {""} if "backend_details" in g else set()
        ax.set_title(b if not labels or labels == {"tuned"} else f"{b} ({', '.join(sorted(labels))})")
        ax.set_xlabel("MAdds (M)")
        ax.set_ylabel("latency p50 (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(backends):]:
        ax.axis("off")
    emulated = "emulated" in d and (pd.to_numeric(d.emulated, errors="coerce") == 1).any()
    fig.suptitle(f"Latency against MAdds, batch 1, {input_size}x{input_size}"
                 + ("\nEMULATED board: the emulator's latency, not the device's" if emulated else ""))
    return _save(fig, path)


def lut_vs_measured(dyn: pd.DataFrame, input_size: int, path: Path) -> Path:
    d = ok_rows(dyn[(dyn.input_size == input_size) & (dyn.kind == "route")]) if len(dyn) else dyn
    d = d[d.predicted_ms.notna()] if len(d) else d
    if d.empty:
        raise ReportError("no validated dynamic-engine routes in dynamic.csv at this input size")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for (model, backend), g in d.groupby(["model", "backend"]):
        ax.scatter(g.latency_ms_p50, g.predicted_ms, s=16, label=f"{model} {backend}")
    lo = float(min(d.latency_ms_p50.min(), d.predicted_ms.min())) * 0.9
    hi = float(max(d.latency_ms_p50.max(), d.predicted_ms.max())) * 1.1
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="prediction = measurement")
    ax.set_xlabel("measured: the deployed dynamic network on the route (ms, p50)")
    ax.set_ylabel("LUT: segments + dispatch per gate (ms)")
    ax.set_title("The LUT against the deployed network (same rounds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return _save(fig, path)


def acceleration_plot(dyn: pd.DataFrame, input_size: int, path: Path) -> Path:
    a = acceleration(dyn, input_size)
    if a.empty:
        raise ReportError("no interleaved acceleration measurement in dynamic.csv at this input size")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    labels = list(a.backend) + ["paper (RTX 2080 Ti)"]
    ideal = list(a.ideal) + [PAPER_ACCELERATION["ideal"]]
    realized = list(a.realized) + [PAPER_ACCELERATION["realized"]]
    on_static = list(a.static_mix if "static_mix" in a else [np.nan] * len(a)) + [np.nan]
    x = np.arange(len(labels))
    ax.bar(x - 0.27, ideal, 0.27, yerr=_interval_bars(a, "ideal"), capsize=2, label="ideal: MBNetV1 x1.0 / x0.5")
    ax.bar(x, on_static, 0.27, label="routes' static engines: x1.0 / DS-MBNet's mix (architecture)")
    ax.bar(x + 0.27, realized, 0.27, yerr=_interval_bars(a, "realized"), capsize=2,
           label="realized: x1.0 / DS-MBNet deployed at x0.5's MAdds")
    for xi, (i, r) in enumerate(zip(ideal, realized)):
        ax.annotate(f"{r / i:.2f} of ideal", (xi + 0.27, r), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("speed-up over MBNetV1 x1.0 (x)")
    ax.set_title("Realized against ideal acceleration (batch 1)")
    ax.legend(fontsize=6)
    return _save(fig, path)


def _interval_bars(a: pd.DataFrame, speedup: str) -> np.ndarray:
    """Error bars (2 x bars, the paper's bar last) from each backend's paired 95% interval of
    ``speedup``; NaN, so none is drawn, for the paper's bar and where the run did not pair it (a
    zero-length bar would read as an interval of nothing)."""
    intervals = a[f"{speedup}_interval"] if f"{speedup}_interval" in a else [None] * len(a)
    bars = [(v - iv[0], iv[1] - v) if isinstance(iv, tuple) else (np.nan, np.nan)
            for v, iv in zip(a[speedup], intervals)]
    return np.array(bars + [(np.nan, np.nan)]).T


def table2_plot(dyn: pd.DataFrame, input_size: int, path: Path, model: str = "s_resnet50") -> Path:
    d = ok_rows(dyn[(dyn.kind == "table2") & (dyn.input_size == input_size) & (dyn.model == model)]) \
        if len(dyn) else dyn
    if d.empty:
        raise ReportError(f"no Table 2 measurement of {model} in dynamic.csv at this input size")
    ways = list(WAY_NOTES)
    series = {}
    for (b, prec), g in d.groupby(["backend", "precision"]):
        p50 = g.set_index("name").latency_ms_p50
        if "ideal" in p50:
            series[b if prec == "fp32" else f"{b} {prec}"] = [p50.get(w, np.nan) / p50["ideal"] for w in ways]
    series["paper (RTX 2080 Ti)"] = [PAPER_TABLE2_MS.get(w, np.nan) / PAPER_TABLE2_MS["ideal"] for w in ways]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(series)
    x = np.arange(len(ways))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=name)
    ax.axhline(1.0, color="0.4", lw=0.8)
    ax.set_xticks(x, ways)
    ax.set_ylabel("latency / ideal (x)")
    ax.set_title(f"DS-Net++ Table 2: ResNet-50 at 25% channels, sliced from {model}, batch 1")
    ax.legend(fontsize=7)
    return _save(fig, path)


def build_all(layout: Layout, lut, dyn, input_size: int, skipped: list[str]) -> list[Path]:
    written = []
    for name, fn in (("latency_vs_madds", lambda p: latency_vs_madds(lut, input_size, p)),
                     ("lut_vs_measured", lambda p: lut_vs_measured(dyn, input_size, p)),
                     ("acceleration", lambda p: acceleration_plot(dyn, input_size, p)),
                     *((name, lambda p, m=model: table2_plot(dyn, input_size, p, m))
                       for name, (model, _) in TABLE2_VARIANTS.items())):
        try:
            written.append(fn(layout.figure(name)))
        except ReportError as e:
            skipped.append(f"figure {name}: {e}")
    if layout.gate_summary.is_file():
        try:
            written += gates.render(layout)
        except (FileNotFoundError, StoreError) as e:  # a file missing beside the summary, or unreadable
            skipped.append(f"gate retraining: {e}")
    else:
        skipped.append("gate retraining: no results (run `python -m harness.retrain_gate`)")
    return written
