"""The run's summary on the terminal: p50 per backend for each route, failures, skipped backends,
and the dynamic engine's figures (LUT error, dispatch overhead, realized against ideal speed-up).
Computed from the stored rows; tabulate (through pandas) draws the table."""

from __future__ import annotations

import pandas as pd

from harness.deploy.lut import holds_zero, judged_errors, unjudged_text
from harness.reporting.common import acceleration_row, share_text, speedup_text
from harness.results.layout import ONE_GRAPH_VS_DEPLOYED, SPLIT, STEADY


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


def _us(ms: float) -> str:
    return f"{ms * 1e3:.0f} us"


def deployment_line(g) -> str:
    """The deployed path's and the one artifact's overhead over the routes' own static engines (the
    pooled per-round differences: median and interval), also as a share of the smallest route's
    static engine, the part of the deployed path's due to the cut at the gates (its parts chained
    against the static engine; the rest is the dispatch), the deployed path's overhead when each
    engine is called right after itself (steady state), and which of the two to deploy where both
    ran on the same routes (an interval holding zero: neither); "" if unmeasured."""
    static = g[(g.kind == "static") & (g.status == "ok")]
    smallest = static.sort_values("madds").iloc[0].latency_ms_p50 if len(static) else float("nan")
    overhead = g[(g.kind == "overhead") & (g.status == "ok")].drop_duplicates("name").set_index("name")
    parts = []

    def share(r) -> str:  # of the smallest route's static engine
        return f"{100 * r.latency_ms_p50 / smallest:+.1f}%"

    for name, label in (("deployed", "deployed path"), ("one_graph", "one artifact")):
        if name in overhead.index:
            r = overhead.loc[name]
            text = f"{share(r)} of the smallest route"
            if name == "deployed" and SPLIT in overhead.index:  # where it goes: the cut, then the dispatch
                text += f"; of it the parts chained {_with_interval(overhead.loc[SPLIT])}"
            parts.append(f"{label} {_with_interval(r, text)}")
            if name == "deployed" and STEADY in overhead.index:  # the same, each engine right after itself
                parts.append(f"each call right after one of its own "
                             f"{_with_interval(overhead.loc[STEADY], share(overhead.loc[STEADY]))}")
    if not parts:
        return ""
    line = "over the routes' static engines: " + ", ".join(parts) + ";"
    if ONE_GRAPH_VS_DEPLOYED in overhead.index:
        r = overhead.loc[ONE_GRAPH_VS_DEPLOYED]
        verdict = ("deploy the one artifact" if r.latency_ms_p50_ci_high < 0 else
                   "deploy the separate engines" if r.latency_ms_p50_ci_low > 0 else "no measurable difference")
        line += f" one artifact against the deployed path {_with_interval(r)}: {verdict};"
    return line


def _with_interval(r, extra: str = "") -> str:
    """A pooled difference's median and 95% interval in microseconds, ``+123 us (+45..+201)``, with
    ``extra`` inside the parentheses after the interval."""
    return (f"{r.latency_ms_p50 * 1e3:+.0f} us ({r.latency_ms_p50_ci_low * 1e3:+.0f}.."
            f"{r.latency_ms_p50_ci_high * 1e3:+.0f}{'; ' + extra if extra else ''})")


def dynamic_summary(dyn, run_id: str | None = None) -> str:
    """Per model and backend: the LUT against the deployed path, the dispatch cost, the deployment's
    overhead, stream and batch, and realized against ideal speed-up. With ``run_id`` (the run
    printing it), a model and backend none of whose rows that run measured is labelled with the
    runs that did: the exports keep earlier runs' rows, and a run that left the backend out must
    not seem to have measured it."""
    lines = ["dynamic engine (LUT = measured segments + dispatch per gate; error = (LUT - deployed) / deployed)"]
    for (model, backend, precision), g in dyn.groupby(["model", "backend", "precision"]):
        g = g[g.kind != "table2"]  # Table 2's rows (no dynamic engine) have their own table
        if g.empty:
            continue
        head = f"  {model} {backend} {precision}"
        runs = sorted(set(g["run_id"].dropna().astype(str))) if "run_id" in g else []
        if run_id is not None and run_id not in runs:
            head += f" (not measured by this run: kept from run {', '.join(runs) or 'unknown'})"
        bad = g[g.status != "ok"]
        if (bad.kind == "engine").any() or len(bad) == len(g):
            lines.append(f"{head}: FAILED {bad.iloc[0].error}")
            continue
        failed = [f"{len(bad)} row(s) failed, first {bad.iloc[0].kind} {bad.iloc[0]['name']}: {bad.iloc[0].error};"] \
            if len(bad) else []
        d = g[g.kind == "dispatch"]
        g = g[g.status == "ok"]
        parts = [f"{head}:"]
        errors, unjudged = judged_errors(g[g.kind == "route"])
        if errors:
            err = pd.Series([e for _, e in errors]).abs() * 100
            parts.append(f"LUT vs deployed median {err.median():.1f}% max {err.max():.1f}% over {len(errors)} routes;")
        if unjudged:
            parts.append(unjudged_text(unjudged) + ";")
        if len(d) and d.iloc[0].status == "ok":
            r = d.iloc[0]
            if holds_zero(r.latency_ms_p50_ci_low, r.latency_ms_p50_ci_high):
                counted = "counted as zero"
            elif r.latency_ms_p50 < 0:
                counted = "counted: the parts ran faster chained than timed apart"
            else:
                counted = "counted"
            parts.append(f"dispatch {_us(r.latency_ms_p50)} per decision ({_us(r.latency_ms_p50_ci_low)}.."
                         f"{_us(r.latency_ms_p50_ci_high)}, {counted});")
        deployed = deployment_line(g)
        if deployed:
            parts.append(deployed)
        st = g[g.kind == "stream"]
        if len(st):
            parts.append(f"uniform stream error {100 * st.rel_error.iloc[0]:+.1f}%;")
        b = g[g.kind == "batch"].set_index("name")
        if {"8", "1x8"} <= set(b.index):
            parts.append(f"batch 8 {b.latency_ms_p50['8'] / 8:.3f} ms per image vs one by one "
                         f"{b.latency_ms_p50['1x8'] / 8:.3f};")
        acc = acceleration_row(g)
        if acc:
            parts.append(f"speed-up over x1.0: realized {speedup_text(acc, 'realized')} vs ideal "
                         f"{speedup_text(acc, 'ideal')} "
                         f"({acc['realized'] / acc['ideal']:.2f} of ideal"
                         + (f"; deployment's share {share_text(acc, 'deployment')}" if "deployment" in acc else "")
                         + ")")
        lines.append(" ".join(parts + failed))
    return "\n".join(lines)
