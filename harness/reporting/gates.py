"""The gate-retraining comparison rendered as Markdown and a figure, from stored files alone.

Contract
--------
``render(layout)`` rebuilds ``gate_retraining.md`` (a section per model) and
``figures/gate_retraining_<model>.png`` from the three files the retraining phase stores
(``harness.phases.retraining``, read through ``harness.results.gates``): ``gate_retraining.csv``
(one row per gate: accuracy, expected MAdds, LUT latency, measured latency),
``gate_retraining_routes.csv`` (route histogram per gate) and ``gate_retraining.json`` (settings
and environment). It never measures: every figure in them is read, none typed.

A budget sweep (gates named ``<penalty>@<budget>``, ``harness.retrain_gate --latency-budget``) is
rendered by :func:`sweep_section`: per budget, each penalty's measured mean latency against the
budget (the budget's fraction of the largest route, timed in the same rounds), its deviation,
accuracy and routes; the noise floor (one engine timed twice in the same rounds); and the figure
accuracy against measured latency with the budgets drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.reporting.common import md_table
from harness.results.gates import read_comparisons
from harness.results.layout import GATE_LARGEST as LARGEST
from harness.results.layout import Layout

MATCHED_POINTS = 1.0  # accuracies within this many points count as matched (the goal)
BUDGET_TOLERANCE = 0.05  # a gate "meets" its budget when its measured mean is within 5% of it


def verdict(summary: pd.DataFrame, routes: pd.DataFrame) -> str:
    """The comparison the issue asks for, in words, computed from the stored results."""
    g = summary.set_index("gate")
    if not {"madds", "latency"} <= set(g.index):
        return "Only one penalty was trained: no comparison."
    a, b = g.loc["madds"], g.loc["latency"]
    if pd.isna(a.measured_ms_mean) or pd.isna(b.measured_ms_mean):
        return "A gate's engine was not measured (see the error column): no latency comparison."
    d_acc = 100 * (b.val_accuracy - a.val_accuracy)
    d_lat = 100 * (b.measured_ms_mean / a.measured_ms_mean - 1)
    direction = "lower" if d_lat < 0 else "higher"
    counts = routes.pivot_table(index="route", columns="gate", values="count", aggfunc="sum")
    if (counts["madds"] == counts["latency"]).all():
        used = counts.index[counts["madds"] > 0].tolist()
        return (f"No difference to report: both gates send every validation image to the same route(s) "
                f"({', '.join(used)}), at {100 * a.val_accuracy:.1f}% and {100 * b.val_accuracy:.1f}% accuracy. "
                f"The {abs(d_lat):.1f}% gap between their measured latencies ({b.measured_ms_mean:.3f} vs "
                f"{a.measured_ms_mean:.3f} ms per image, interleaved) is the noise floor of two identical engines, "
                f"not a gain.")
    matched = abs(d_acc) <= MATCHED_POINTS
    head = (f"Accuracy matched within {MATCHED_POINTS:g} point ({d_acc:+.1f} points)" if matched else
            f"Accuracy NOT matched within {MATCHED_POINTS:g} point ({d_acc:+.1f} points)")
    return (f"{head}; the latency-penalty gate's measured latency is {abs(d_lat):.1f}% {direction} than the "
            f"MAdds-penalty gate's ({b.measured_ms_mean:.3f} ms vs {a.measured_ms_mean:.3f} ms per image, "
            f"interleaved in one run). Expected MAdds {b.expected_madds / 1e6:.2f}M vs {a.expected_madds / 1e6:.2f}M; "
            f"LUT latency {b.lut_ms:.3f} ms vs {a.lut_ms:.3f} ms.")


def cost_disagreement(routes: pd.DataFrame) -> str:
    """Where MAdds and the LUT order the routes differently (from the stored per-route costs): the
    share of route pairs they order oppositely, and the pair they disagree on most."""
    import numpy as np

    r = routes.drop_duplicates("route")
    madds, ms = r.madds.astype(float).to_numpy(), r.lut_ms.astype(float).to_numpy()
    if len(r) < 2:
        return ""
    i, j = np.triu_indices(len(r), 1)
    opposite = np.sign(madds[i] - madds[j]) * np.sign(ms[i] - ms[j]) < 0
    line = (f"MAdds and the LUT order {100 * opposite.mean():.1f}% of the {len(i)} pairs of the {len(r)} routes "
            "oppositely")
    if not opposite.any():
        return line + "."
    gap = np.abs(np.log(madds[i] / madds[j])) + np.abs(np.log(ms[i] / ms[j]))
    k = int(np.argmax(np.where(opposite, gap, -1)))
    a, b = (i[k], j[k]) if madds[i[k]] < madds[j[k]] else (j[k], i[k])  # a: fewer MAdds, yet slower
    return (line + f"; most of all route {r.route.iloc[a]} ({madds[a] / 1e6:.1f}M MAdds, {ms[a]:.3f} ms on the LUT) "
            f"against {r.route.iloc[b]} ({madds[b] / 1e6:.1f}M, {ms[b]:.3f} ms): {madds[b] / madds[a]:.2f}x the "
            f"MAdds, {100 * (1 - ms[b] / ms[a]):.0f}% faster.")


def _fmt(v, spec):
    return "-" if v is None or pd.isna(v) else format(v, spec)


def _supernet_line(sup: dict) -> str:
    if "route_accuracy" in sup:
        acc = ", ".join(f"{k} route {v:.3f}" for k, v in sup["route_accuracy"].items())
        st = sup.get("settings", {})
        return (f"Stage I (sandwich rule, in-place distillation, {st.get('epochs')} epochs, "
                f"{sup.get('train_s')} s): validation accuracy {acc}.")
    return f"Stage I: supernet from {sup.get('source')}."


def _gate_line(gate: str, m: dict) -> str:
    s = m.get("settings", {})
    hist = m.get("history") or [{}]
    return (f"Stage II, {gate} penalty: {s.get('epochs')} epochs, lr {s.get('lr')} (x0.9 per epoch), "
            f"L = 1.0 L_cls + {s.get('cp_weight')} L_cp + 1.0 L_sgs, cost target {s.get('target')}, "
            f"routes up to {s.get('routes_upto') or 'all'}; last epoch loss {hist[-1].get('loss', float('nan')):.4f}; "
            f"{m.get('train_s')} s.")


def render(layout: Layout) -> list[Path]:
    """``gate_retraining.md`` (a section per model) and a figure per model, from the stored files."""
    stored = read_comparisons(layout)
    target = stored.summary.target.dropna().iloc[0] if stored.summary.target.notna().any() else layout.root.name
    lines = [f"# Gate retraining for real latency ({target})", "",
             f"Generated by `python -m harness.retrain_gate`, a section per model; rebuilt from "
             f"`{layout.gate_summary.name}`, `{layout.gate_routes.name}` and `{layout.gate_meta.name}` "
             "(`python -m harness.report` rebuilds it).", ""]
    figures = []
    for model in stored.summary.model.unique():
        summary = stored.summary[stored.summary.model == model].reset_index(drop=True)
        routes = stored.routes[stored.routes.model == model].reset_index(drop=True)
        meta = stored.meta.get(str(model), {})
        figure = layout.figure(f"gate_retraining_{model}")
        section = (sweep_section if summary.budget.notna().any() else comparison_section)
        lines += section(summary, routes, meta, figure)
        figures.append(figure)
    layout.gate_report.write_text("\n".join(lines))
    return [layout.gate_report, *figures]


def _lut_reliability(meta: dict) -> list[str]:
    """How far the LUT's prices held (``lut_reliability``; comparisons stored before it say nothing)."""
    return [f"How far the LUT's prices hold: {meta['lut_reliability']}.", ""] if meta.get("lut_reliability") else []


def _environment(meta: dict) -> list[str]:
    env = meta.get("env", {})
    return [f"Environment: {meta.get('device_name')}; {meta.get('threads')} threads; busy: {env.get('busy')}; "
            f"other processes {env.get('other_processes_cpu_percent')}% of a core; steal "
            f"{env.get('cpu_steal_percent')}%; wall time {meta.get('wall_time_s')} s; run {meta.get('run_id')}; "
            f"libraries {json.dumps(env.get('libraries', {}))}", ""]


def comparison_section(summary: pd.DataFrame, routes: pd.DataFrame, meta: dict, figure: Path) -> list[str]:
    """One model's two gates (no budgets): the table, the verdict, the route histogram; draws ``figure``."""
    first = summary.iloc[0]
    table = pd.DataFrame({
        "gate": [g if g == LARGEST else f"{g} penalty" for g in summary.gate],
        "val accuracy": [_fmt(v, ".3f") for v in summary.val_accuracy],
        "expected MAdds (M)": [_fmt(v / 1e6, ".2f") for v in summary.expected_madds],
        "LUT latency (ms)": [_fmt(v, ".3f") for v in summary.lut_ms],
        "measured mean (ms/image)": [_fmt(v, ".3f") for v in summary.measured_ms_mean],
        "measured p50 (ms)": [_fmt(v, ".3f") for v in summary.measured_ms_p50],
        "error": ["" if pd.isna(e) else e for e in summary.error]})
    hist = routes.rename(columns={"madds": "route_madds", "lut_ms": "route_lut_ms"}).pivot_table(
        index=["route", "widths", "route_madds", "route_lut_ms"], columns="gate", values="share")
    hist = hist.reset_index().sort_values("route_madds", kind="stable")
    if len(hist) > 32:  # DS-ResNet's 256 routes: list those a gate uses
        hist = hist[(hist[[g for g in ("madds", "latency") if g in hist]] > 0).any(axis=1)]
    hist_table = pd.DataFrame({"route": hist.route, "widths": hist.widths,
                               "MAdds (M)": [f"{v / 1e6:.2f}" for v in hist.route_madds],
                               "LUT (ms)": [f"{v:.3f}" for v in hist.route_lut_ms]}
                              | {f"share, {g} gate": [f"{100 * v:.1f}%" for v in hist[g]]
                                 for g in ("madds", "latency") if g in hist})
    plot(summary, routes, figure)
    return [f"## {first.model}: MAdds penalty vs latency penalty ({first.backend})", "",
            f"Data: {first.data}, {int(first.n_val)} validation images at {int(first.input_size)}x"
            f"{int(first.input_size)}. Latency: the dynamic engine compiled through {first.backend}, one validation "
            "image per call (batch 1), dispatched by its own gate; all rows timed interleaved in one run; mean per "
            "image (a mixture of routes: the p50 is not its mean).", "",
            f"**{verdict(summary, routes)}**", "",
            md_table(table), "",
            cost_disagreement(routes[routes.gate == summary.gate.iloc[0]]), "",
            _supernet_line(meta.get("supernet", {})), "",
            *[_gate_line(g, m) for g, m in meta.get("gates", {}).items()], "",
            f"### Route histogram ({first.model}, validation set)", "",
            md_table(hist_table), "",
            f"![gate retraining, {first.model}](figures/{figure.name})", "",
            *_lut_reliability(meta), *_environment(meta)]


def plot(summary: pd.DataFrame, routes: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    gates = [g for g in ("madds", "latency") if g in set(routes.gate)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    first = routes[routes.gate == gates[0]]
    used = routes.groupby("route", sort=False).share.max()
    keep = [r for r in first.route if used[r] > 0] if len(first) > 32 else list(first.route)
    x = np.arange(len(keep))
    w = 0.8 / max(1, len(gates))
    for i, g in enumerate(gates):
        share = routes[routes.gate == g].set_index("route").share.reindex(keep)
        ax1.bar(x + (i - (len(gates) - 1) / 2) * w, 100 * share.values, w, label=f"{g} penalty")
    madds = first.set_index("route").madds.reindex(keep)
    ax1.set_xticks(x, [f"{r}\n{m / 1e6:.1f}M" for r, m in zip(keep, madds)], fontsize=7)
    ax1.set_xlabel("route (MAdds)")
    ax1.set_ylabel("share of validation images (%)")
    ax1.set_title("Route histogram of the retrained gates")
    ax1.legend()
    names = list(summary.gate)
    vals = summary.measured_ms_mean.astype(float).values
    bars = ax2.bar(range(len(names)), vals, color=[f"C{i}" if n != LARGEST else "0.6" for i, n in enumerate(names)])
    for b, acc in zip(bars, summary.val_accuracy):
        if not np.isnan(b.get_height()):
            ax2.annotate(f"acc {acc:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                         va="bottom", fontsize=8)
    ax2.set_xticks(range(len(names)), [n if n == LARGEST else f"{n}\npenalty" for n in names], fontsize=8)
    ax2.set_ylabel("measured latency (ms per image, mean)")
    ax2.set_title(f"Dynamic engine, {summary.iloc[0].backend}, batch 1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- a budget sweep ------------------------------------------------------------------------------------

def sweep_rows(summary: pd.DataFrame) -> pd.DataFrame:
    """The sweep's gates with ``budget_ms`` (the budget's fraction of the largest route's measured
    mean, same rounds: the machine's drift since the LUT cancels) and ``deviation`` from it."""
    largest = summary[summary.gate == LARGEST].measured_ms_mean.astype(float)
    ref = float(largest.iloc[0]) if len(largest) else float("nan")
    g = summary[summary.budget.notna()].copy()
    g["budget_fraction"] = g.budget_fraction.astype(float)
    g["budget_ms"] = g.budget_fraction * ref
    g["deviation"] = g.measured_ms_mean.astype(float) / g.budget_ms - 1
    return g


def _top_routes(routes: pd.DataFrame, gate: str, k: int = 3) -> str:
    r = routes[(routes.gate == gate) & (routes.share > 0)].sort_values("share", ascending=False).head(k)
    return ", ".join(f"{row.route}: {100 * row.share:.0f}%" for row in r.itertuples())


def accuracy_gap_noise(accuracy: float, n: int) -> float:
    """Two standard errors of the gap between two gates' accuracies near ``accuracy`` on ``n``
    images, taken as independent samples (the gates see the same images, so this is a bound):
    a gap below it is not a difference."""
    return 2 * (2 * accuracy * (1 - accuracy) / n) ** 0.5


def equal_latency_gaps(rows: pd.DataFrame) -> list[tuple[float, float, float]]:
    """At each MAdds gate's measured latency inside the latency gates' measured range: ``(ms, MAdds
    gate's accuracy, the latency gates' accuracy there)``, the latter interpolated linearly between
    the latency gates' points (sorted by measured latency)."""
    import numpy as np

    lat = rows[rows.penalty == "latency"].dropna(subset=["measured_ms_mean"]).sort_values("measured_ms_mean")
    if len(lat) < 2:
        return []
    xs, ys = lat.measured_ms_mean.astype(float).to_numpy(), lat.val_accuracy.astype(float).to_numpy()
    return [(ms, float(acc), float(np.interp(ms, xs, ys)))
            for ms, acc in rows[rows.penalty == "madds"][["measured_ms_mean", "val_accuracy"]].astype(float)
            .itertuples(index=False) if xs[0] <= ms <= xs[-1]]


def _budget_verdict(rows: pd.DataFrame, routes: pd.DataFrame, noise: float | None, acc_noise: float) -> str:
    by = rows.set_index("penalty")
    parts = []
    for p in ("latency", "madds"):
        if p in by.index and pd.notna(by.loc[p].deviation):
            d = by.loc[p].deviation
            ok = "within" if abs(d) <= BUDGET_TOLERANCE else "NOT within"
            parts.append(f"{p} gate {100 * d:+.1f}% from the budget ({ok} {100 * BUDGET_TOLERANCE:g}%)")
    if {"latency", "madds"} <= set(by.index):
        a, b = by.loc["madds"], by.loc["latency"]
        same = (routes[routes.gate == a.gate].set_index("route")["count"]
                == routes[routes.gate == b.gate].set_index("route")["count"]).all()
        if same:
            parts.append("no difference: both gates send every validation image to the same routes")
        elif pd.notna(a.measured_ms_mean) and pd.notna(b.measured_ms_mean):
            gap = b.measured_ms_mean / a.measured_ms_mean - 1
            told = "" if noise is None else (" (within the noise floor)" if abs(gap) <= noise else
                                             " (above the noise floor)")
            d_acc = b.val_accuracy - a.val_accuracy
            parts.append(f"latency gate {100 * abs(gap):.1f}% {'faster' if gap < 0 else 'slower'}{told} at "
                         f"{100 * d_acc:+.1f} points of accuracy ("
                         f"{'within' if abs(d_acc) <= acc_noise else 'beyond'} the accuracy noise)")
    return "; ".join(parts) + "."


def _deployed_cost(meta: dict) -> str:
    """How a retraining priced a route's deployed latency: the LUT's segments plus its dispatch cost
    (``lut_dispatch``), or, in a comparison stored before the LUT held the dispatch, the LUT plus the
    dispatcher's overhead measured beside it (``dispatch_ms``)."""
    if meta.get("lut_dispatch"):
        return f"the LUT's segments plus its dispatch cost per gate; {meta['lut_dispatch']}"
    if meta.get("dispatch_ms") is not None:
        return (f"its LUT latency plus the dispatcher's per-image overhead, {_fmt(meta.get('dispatch_ms'), '.3f')} ms "
                "measured beside the LUT")
    return "its LUT latency"


def sweep_section(summary: pd.DataFrame, routes: pd.DataFrame, meta: dict, figure: Path) -> list[str]:
    """One model's budget sweep: per budget each penalty's measured mean against the budget; draws ``figure``."""
    first = summary.iloc[0]
    rows = sweep_rows(summary)
    nf = meta.get("noise_floor") or {}
    noise = nf.get("relative")
    largest = summary[summary.gate == LARGEST]
    lines = [f"## {first.model}: latency penalty vs MAdds penalty under latency budgets ({first.backend})", "",
             f"`python -m harness.retrain_gate --model {first.model} --latency-budget ...`. Data: {first.data}, "
             f"{int(first.n_val)} validation images at {int(first.input_size)}x{int(first.input_size)}.",
             "",
             f"Per budget (a fraction of the largest route's deployed latency: {_deployed_cost(meta)}), one gate "
             "per penalty: the latency penalty trains toward the budget on the LUT, "
             "the MAdds penalty toward the same fraction of the largest route's MAdds, at least the smallest "
             "route's (what a MAdds-only user would pick). "
             + ("Each gate is then calibrated to its own budget on training images (a shift of each choice's "
                "score by -lambda x its cost, lambda by bisection): the latency gate on that deployed latency, "
                "the MAdds gate on MAdds. " if rows.calibration_lambda.notna().any() else
                "No calibration (--no-calibrate). ")
             + f"Latency: the dynamic engine on {first.backend}, one validation image per call (batch 1), routed "
             "by its own gate, every gate and the largest route interleaved in one run; "
             "mean per image. The budget in ms is its fraction of the largest route's mean measured in the same "
             "rounds, through the same engine (a copy of the gate that always chooses it)"
             + (f" ({float(largest.measured_ms_mean.iloc[0]):.3f} ms)" if len(largest) else "") + ".", ""]
    if noise is not None:
        lines += [f"Noise floor: the {nf['gate']} gate's engine timed twice in the same rounds: "
                  f"{nf['mean_ms'][0]:.3f} vs {nf['mean_ms'][1]:.3f} ms ({100 * noise:.1f}%). A latency gap below "
                  "it is not a difference.", ""]
    lines += [cost_disagreement(routes[routes.gate == rows.gate.iloc[0]]), ""]
    acc, n = float(rows.val_accuracy.astype(float).mean()), int(first.n_val)
    acc_noise = accuracy_gap_noise(acc, n)
    lines += [f"Accuracy noise: on {n} validation images the binomial standard error of an accuracy near "
              f"{100 * acc:.0f}% is {100 * (acc * (1 - acc) / n) ** 0.5:.1f} points, of the gap between two gates' "
              f"accuracies {100 * acc_noise / 2:.1f} points; a gap within two of those ({100 * acc_noise:.1f} "
              "points) is not a difference.", ""]
    equal = equal_latency_gaps(rows)
    if equal:
        gaps = [f"{ms:.3f} ms: MAdds gate {100 * a:.1f}%, latency gates {100 * b:.1f}% "
                f"({round(100 * (b - a), 1) + 0:+.1f} points)" for ms, a, b in equal]  # + 0: no "-0.0"
        lines += ["At equal measured latency (the latency gates' accuracy interpolated along their curve at each "
                  "MAdds gate's measured latency): " + "; ".join(gaps) + ".", ""]
    met = rows[rows.penalty == "latency"].deviation.abs() <= BUDGET_TOLERANCE
    lines += [f"**Latency-penalty gates within {100 * BUDGET_TOLERANCE:g}% of their budget: {int(met.sum())} of "
              f"{len(met)}; MAdds-penalty gates' deviations: "
              + ", ".join(f"{r.budget} {100 * r.deviation:+.1f}%" for r in rows[rows.penalty == "madds"].itertuples())
              + ".**", ""]
    for budget, g in rows.groupby("budget", sort=False):
        lines += [f"### {first.model}, budget {budget} ({g.budget_ms.iloc[0]:.3f} ms in this run)", "",
                  f"{_budget_verdict(g, routes, noise, acc_noise)}", "",
                  md_table(pd.DataFrame({
                      "penalty": g.penalty,
                      "measured mean (ms/image)": [_fmt(v, ".3f") for v in g.measured_ms_mean],
                      "deviation from budget": [_fmt(100 * v, "+.1f") + "%" for v in g.deviation],
                      "val accuracy": [_fmt(v, ".3f") for v in g.val_accuracy],
                      "LUT expected (ms)": [_fmt(v, ".3f") for v in g.lut_ms],
                      "expected MAdds (M)": [_fmt(v / 1e6, ".2f") for v in g.expected_madds],
                      "calibration lambda": [_fmt(v, ".3g") for v in g.calibration_lambda],
                      "top routes (share)": [_top_routes(routes, n) for n in g.gate],
                      "error": ["" if pd.isna(e) else e for e in g.error]})), ""]
    if len(largest):
        lines += [f"Largest route (context, same rounds): {float(largest.measured_ms_mean.iloc[0]):.3f} ms/image, "
                  f"accuracy {float(largest.val_accuracy.iloc[0]):.3f}.", ""]
    plot_sweep(rows, largest, figure)
    return lines + [_supernet_line(meta.get("supernet", {})), "",
                    f"![gate retraining under budgets, {first.model}](figures/{figure.name})", "",
                    *_lut_reliability(meta), *_environment(meta)]


def plot_sweep(rows: pd.DataFrame, largest: pd.DataFrame, path: Path) -> Path:
    """Accuracy against measured mean latency per penalty, the budgets as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (p, marker) in enumerate((("latency", "o"), ("madds", "s"))):
        g = rows[rows.penalty == p].sort_values("budget_fraction")
        if len(g):
            ax.plot(g.measured_ms_mean.astype(float), 100 * g.val_accuracy.astype(float), marker=marker,
                    color=f"C{i}", label=f"{p} penalty")
    for ms, label in rows.drop_duplicates("budget")[["budget_ms", "budget"]].itertuples(index=False):
        ax.axvline(ms, color="0.7", ls="--", lw=1)
        ax.annotate(label, (ms, 1.0), xycoords=("data", "axes fraction"), fontsize=7, ha="center", va="bottom")
    if len(largest):
        ax.scatter(largest.measured_ms_mean.astype(float), 100 * largest.val_accuracy.astype(float), color="0.4",
                   marker="^", label="largest route")
    ax.set_xlabel(f"measured mean latency (ms per image, batch 1, {rows.iloc[0].backend})")
    ax.set_ylabel("validation accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
