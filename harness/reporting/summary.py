"""The run's summary on the terminal: p50 per backend for each route, failures, skipped backends,
and the dynamic engine's figures (LUT error, dispatch overhead, realized against ideal speed-up).
Computed from the stored rows; tabulate (through pandas) draws the table."""

from __future__ import annotations

import pandas as pd


def _ms(v: float) -> str:
    if v != v:  # NaN: not measured
        return "-"
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2e}"


def summary_table(df, skipped: dict[str, str], notes: list[str] = ()) -> str:
    """p50 per backend (ms) for each model/route, with the failures, skipped backends and notes."""
    lines = []
    ok = df[df.status == "ok"]
    if len(ok):
        pivot = ok.pivot_table(index=["model", "route", "madds"], columns=["backend", "precision", "batch_size"],
                               values="latency_ms_p50").sort_index(level=["model", "madds"])
        valid = ok.assign(valid=pd.to_numeric(ok["valid"], errors="coerce").fillna(1)).pivot_table(
            index=["model", "route", "madds"], columns=["backend", "precision", "batch_size"],
            values="valid").reindex(index=pivot.index, columns=pivot.columns)
        cols = [f"{b}/{p}/b{n}" for b, p, n in pivot.columns]
        body = pd.DataFrame([[m, r, f"{madds / 1e6:.1f}"] + [_ms(v) + ("" if ok_ != 0 else "*")
                                                             for v, ok_ in zip(vals, flags)]
                             for (m, r, madds), vals, flags in zip(pivot.index, pivot.values, valid.values)],
                            columns=["model", "route", "MAdds(M)"] + cols)
        lines += ["latency p50 (ms; * not valid: the median's 95% interval too wide or too little measured time)",
                  body.to_markdown(index=False, tablefmt="simple", disable_numparse=True, stralign="right")]
    failed = df[df.status != "ok"]
    for _, r in failed.iterrows():
        lines.append(f"FAILED {r.model} {r.route} {r.backend} {r.precision} b{r.batch_size}: "
                     f"{r.status}: {r.error}")
    for b, why in skipped.items():
        lines.append(f"skipped backend {b}: {why}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def dispatch_overhead(g) -> str:
    """The one artifact's and the Python dispatcher's overhead over each route's static engine (same
    rounds), median over routes and as a share of the smallest route's static engine; "" if unmeasured."""
    parts = []
    for kind, label in (("one_graph", "one artifact"), ("dispatcher", "Python dispatcher")):
        rows = g[(g.kind == kind) & (g.status == "ok")]
        if rows.empty:
            continue
        overhead = rows.latency_ms_p50 - rows.predicted_ms
        smallest = rows.sort_values("madds").iloc[0].predicted_ms
        parts.append(f"{label} {overhead.median() * 1e3:.0f} us ({100 * overhead.median() / smallest:.1f}%)")
    if not parts:
        return ""
    n = int(((g.kind == "one_graph") & (g.status == "ok")).sum())
    return (f"overhead over the route's static engine, median over {n} routes (% of the smallest route): "
            + ", ".join(parts) + ";")


def dynamic_summary(dyn) -> str:
    """Per model and backend: LUT error, dispatch overhead, stream error, realized vs ideal speed-up."""
    lines = ["dynamic engine (LUT = sum of measured segments; error = (LUT - end to end) / end to end)"]
    for (model, backend, precision), g in dyn.groupby(["model", "backend", "precision"]):
        g = g[g.kind != "table2"]  # Table 2's rows (no dynamic engine) have their own table
        if g.empty:
            continue
        bad = g[g.status != "ok"]
        if (bad.kind == "engine").any() or len(bad) == len(g):
            lines.append(f"  {model} {backend} {precision}: FAILED {bad.iloc[0].error}")
            continue
        failed = [f"{len(bad)} row(s) failed, first {bad.iloc[0].kind} {bad.iloc[0]['name']}: {bad.iloc[0].error};"] \
            if len(bad) else []
        g = g[g.status == "ok"]
        routes, stored = g[g.kind == "route"], g[g.kind == "route_lut"]
        parts = [f"  {model} {backend} {precision}:"]
        if len(routes):
            err = routes.rel_error.abs() * 100
            lut_err = stored.rel_error.abs() * 100
            overhead = routes.latency_ms_p50 - routes.predicted_ms
            smallest = routes.sort_values("madds").iloc[0]
            parts.append(f"parts vs end to end (same run) median {err.median():.1f}% max {err.max():.1f}%; "
                         f"stored LUT vs end to end median {lut_err.median():.1f}% max {lut_err.max():.1f}% "
                         f"over {len(routes)} routes; dispatch median {overhead.median() * 1e3:.0f} us "
                         f"({100 * overhead.median() / smallest.latency_ms_p50:.1f}% of the smallest route);")
        one = dispatch_overhead(g)
        if one:
            parts.append(one)
        st = g[g.kind == "stream"]
        if len(st):
            parts.append(f"uniform stream error {100 * st.rel_error.iloc[0]:+.1f}%;")
        acc = g[g.kind == "acceleration"].set_index("name")
        if {"largest", "matched", "dynamic"} <= set(acc.index):
            t = acc.latency_ms_mean
            ideal, realized = t["largest"] / t["matched"], t["largest"] / t["dynamic"]
            parts.append(f"speed-up over x1.0: realized {realized:.2f}x vs ideal {ideal:.2f}x "
                         f"({realized / ideal:.2f} of ideal)")
        lines.append(" ".join(parts + failed))
    return "\n".join(lines)
