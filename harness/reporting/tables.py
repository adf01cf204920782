"""The papers' tables rebuilt from stored results alone (never measuring); ``harness.report`` is its CLI.

Contract
--------
``build(layout, input_size)`` reads the folder's ``lut.csv``, ``dynamic.csv``, ``env.json`` and,
when present, the gate-retraining files (names and columns from ``harness.results.layout``),
writes ``tables/{table2,table7,slimmable_table3}.{md,csv}`` and the figures
(``harness.reporting.figures``), and returns ``(written paths, skipped reasons)``; a folder with
nothing to build from raises :class:`ReportError` (one line). Paper values appear only in columns
labelled ``paper``; every other figure is read from the stored measurements. The run's
environment is printed under each table. Markdown is drawn by pandas (``to_markdown``).

- **Table 2** (DS-Net++): ResNet-50 at 25% channels run six ways (``harness.phases.table2``), p50
  and the ratio to the ideal network per backend; paper: RTX 2080 Ti, batch 1. ``table2`` slices
  the paper's network (``s_resnet50``), ``table2_ds_resnet50`` DS-ResNet's route.
- **Table 7** (DS-Net++, latency column): MobileNetV1 x1.0/0.75/0.5 and DS-MBNet-L/M/S. DS-MBNet's
  rows are route mixes whose mean MAdds equal the paper's 565M/319M/153M (two adjacent routes,
  ``harness.deploy.lut.matched_distribution``), priced with the deployed dynamic network's route
  latencies. The acceleration lines come from the ``acceleration`` rows (x1.0, x0.5, the deployed
  dynamic model at x0.5's MAdds and the same route mix on the routes' static engines, in the same
  rounds): realized against ideal, and the loss split into the architecture's and the deployment's share.
- **Slimmable networks Table 3** analogue: MAdds, params and latency of each family's widths
  (MobileNet v1 and v2, ResNet-50), measured as the slimmable network's switches where the folder
  holds them, else as the static models at those widths.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

import dsnet
from harness.deploy.lut import LatencyLUT, LUTError, matched_distribution, route_errors_text
from harness.reporting import figures
from harness.reporting.common import (
    EMULATED_MARK,
    INVALID_MARK,
    PAPER_ACCELERATION,
    PAPER_SLIMMABLE,
    PAPER_TABLE2_MS,
    PAPER_TABLE7,
    TABLE2_VARIANTS,
    TUNING_MARKS,
    WAY_NOTES,
    ReportError,
    acceleration,
    cell_notes,
    marked_invalid,
    md_table,
    ok_rows,
    share_text,
    speedup_text,
    tuning_label,
)
from harness.reporting.page import write_page
from harness.results.layout import DYNAMIC_COLUMNS, GATE_ROUTE_COLUMNS, LUT_COLUMNS, Layout, read_csv

# Paper values, shown only in columns labelled "paper" (the papers' tables; docs/architecture.md).
COMPILED_NOTE = ("On compiled backends the weights are fixed at compile time, so the compiler may fold run-time "
                 "slicing, indexing or masking into constants: those rows measure what the compiler made of them "
                 "(compiling a route materializes it); only eager executes the run-time variants as written.")


def read_lut(layout: Layout) -> pd.DataFrame:
    """A folder's ``lut.csv``, checked (:class:`ReportError` when missing or unreadable)."""
    if not layout.lut_csv.is_file():
        raise ReportError(f"no {layout.lut_csv}: run `python -m harness.run --target <target>` first")
    return _read(layout.lut_csv, LUT_COLUMNS)


def load_results(layout: Layout):
    folder = layout.root
    if not folder.is_dir():
        raise ReportError(f"no results folder {folder}: run `python -m harness.run --target <target>` first")
    lut = _read(layout.lut_csv, LUT_COLUMNS)
    dyn = _read(layout.dynamic_csv, DYNAMIC_COLUMNS)
    if lut.empty and dyn.empty:
        raise ReportError(f"{folder} holds no stored results ({layout.lut_csv.name}, {layout.dynamic_csv.name}): "
                          "run `python -m harness.run --target <target>` first")
    try:
        env = json.loads(layout.env_json.read_text()) if layout.env_json.is_file() else {}
        if not isinstance(env, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ReportError(f"{layout.env_json} is not a valid environment file ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]}); rebuild it with `python -m harness.run`") from None
    gates = _read(layout.gate_routes, GATE_ROUTE_COLUMNS)
    return lut, dyn, env, gates


# the columns a table or figure reads from each file, and which of them must be numbers
_NEEDED = {"lut.csv": (["model", "route", "backend", "precision", "batch_size", "input_size", "madds", "status",
                        "latency_ms_p50"], ["batch_size", "input_size", "madds", "latency_ms_p50"]),
           "dynamic.csv": (["model", "backend", "precision", "input_size", "kind", "name", "status", "latency_ms_p50"],
                           ["input_size", "latency_ms_p50"]),
           "gate_retraining_routes.csv": (["model", "gate", "backend", "input_size", "route", "share"],
                                          ["input_size", "share"])}


def _read(path, columns: list[str]) -> pd.DataFrame:
    """A stored CSV, or an empty frame when absent; a file the tables cannot read is a :class:`ReportError`."""
    if not path.is_file():
        return pd.DataFrame()
    try:
        df = read_csv(path)
    except pd.errors.EmptyDataError:
        raise ReportError(f"{path} is empty: rebuild it with `python -m harness.run`") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ReportError(f"{path} is not a results CSV ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]})") from None
    needed, numeric = _NEEDED.get(path.name, ([], []))
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ReportError(f"{path} lacks column(s) {', '.join(missing)}: not a file written by harness.run")
    ok = df[df.status == "ok"] if "status" in df.columns else df
    for c in numeric:
        bad = pd.to_numeric(ok[c], errors="coerce").isna() & ok[c].notna()
        if bad.any():
            raise ReportError(f"{path}: column {c} holds a non-number ({ok[c][bad].iloc[0]!r}, row {bad.idxmax() + 2})")
        df[c] = pd.to_numeric(df[c], errors="coerce")
    for c in columns:
        if c not in df.columns:
            df[c] = pd.NA
    return df


def env_line(env: dict) -> str:
    e = env.get("env", {})
    libs = ", ".join(f"{k} {v}" for k, v in sorted(e.get("libraries", {}).items()))
    emulated = "EMULATED board (not the device; latencies are the emulator's): " \
        if (env.get("remote") or {}).get("emulated") else ""
    return (f"Environment: {emulated}{env.get('device_name', '?')} ({env.get('target', '?')} profile), "
            f"{env.get('threads', '?')} threads, run {env.get('run_id', '?')}; busy: {e.get('busy')}, other "
            f"processes {e.get('other_processes_cpu_percent')}% of a core, steal {e.get('cpu_steal_percent')}%; "
            f"{libs}." + _wait_policy(e.get("wait_policy")) + _not_measured(env.get("skipped", {}))
            + _drift(env.get("drift", {})) + _earlier(env.get("earlier_runs", [])))


def _wait_policy(policy) -> str:
    """What idle threads were told to do, where the run's environment set it (env.json; none: the
    libraries' defaults, which spin a while before sleeping)."""
    if not isinstance(policy, dict) or not policy:
        return ""
    return " Idle threads as the environment set them: " + ", ".join(f"{k}={v}" for k, v in sorted(policy.items())) \
        + "."


def _not_measured(skipped: dict) -> str:
    """The backends the folder lacks and why (a library missing, no GPU for it), from env.json."""
    whole = {b: why for b, why in skipped.items() if "(" not in b and "/" not in b}
    if not whole:
        return ""
    return " Not measured: " + "; ".join(f"{b} ({why})" for b, why in sorted(whole.items())) + "."


def _drift(drift: dict) -> str:
    """The run's drift: how far the rounds' speed factors spread (1.0 = a typical round)."""
    phases = {p: d for p, d in drift.items() if d.get("rounds")}
    if not phases:
        return ""
    lo = min(d["factor_min"] for d in phases.values())
    hi = max(d["factor_max"] for d in phases.values())
    iqr = float(np.median([d["factor_iqr"] for d in phases.values()]))
    return (f" Drift: over {len(phases)} round phase(s) the rounds' speed factors ranged {lo:.3f}..{hi:.3f} "
            f"(median interquartile range {iqr:.3f}); env.json has them per phase.")


def _earlier(runs: list[dict]) -> str:
    if not runs:
        return ""
    busy = [r["run_id"] for r in runs if r.get("busy")]
    return (f" The stored results also include {len(runs)} earlier run(s) on this store "
            f"({', '.join(r['run_id'] for r in runs)}; busy: {', '.join(busy) or 'none'}); each row's run_id "
            "is in the CSVs.")


INVALID_NOTE = ("* not valid under the protocol: the 95% interval of the median is wider than the profile's "
                "max_ci_fraction of it, or the samples cover less than min_measured_ms.")


def _ms(v, valid=None) -> str:
    """A latency cell; marked when the stored row says it is not valid (older results have no flag)."""
    if v is None or pd.isna(v):
        return "-"
    return f"{v:.3f}" + (INVALID_MARK if valid is not None and not pd.isna(valid) and not valid else "")


def _valid(rows: pd.DataFrame, key):
    """The stored validity flag of row ``key`` (None when the results predate it)."""
    return rows["valid"].get(key) if "valid" in rows.columns else None


def _flag(value) -> bool:
    """A stored 0/1 flag, empty (NA: results that predate it) read as 0."""
    return bool(pd.notna(value) and int(value) == 1)


def _latency(rows: pd.DataFrame, key) -> str:
    """A latency cell of ``rows`` (indexed by route or way): the value, its validity mark and, for a
    TVM row, its tuning mark."""
    cell = _ms(rows.latency_ms_p50.get(key), _valid(rows, key))
    if cell != "-" and "backend_details" in rows.columns and key in rows.index:
        cell += TUNING_MARKS.get(tuning_label(rows.backend_details.get(key)), "")
    if cell != "-" and "emulated" in rows.columns and key in rows.index and _flag(rows.emulated.get(key)):
        cell += EMULATED_MARK
    return cell


# -- tables ----------------------------------------------------------------------------------------

TABLE2_RATIOS = (("slicing", "ideal"), ("masking", "full"), ("indexing", "ideal"))  # the paper's 1.10, 1.02, 2.31


def table2(dyn: pd.DataFrame, input_size: int, model: str = "s_resnet50"):
    rows = ok_rows(dyn[(dyn.kind == "table2") & (dyn.input_size == input_size) & (dyn.model == model)]) \
        if len(dyn) else dyn
    if rows.empty:
        raise ReportError(f"no Table 2 measurement (kind table2) of {model} at this input size")
    backends = sorted(set(rows.backend), key=lambda b: (b != "eager", b))
    t = pd.DataFrame({"way": list(WAY_NOTES), "what runs": list(WAY_NOTES.values())})
    madds = rows.drop_duplicates("name").set_index("name").madds
    t["route MAdds (M)"] = [f"{madds[w] / 1e6:.1f}" if w in madds else "-" for w in t.way]
    csv, ratios = [], []
    precisions = sorted(set(rows.precision), key=lambda p: (p != "fp32", p))
    for b in backends:
        for prec in precisions:
            r = rows[(rows.backend == b) & (rows.precision == prec)].set_index("name")
            if r.empty:
                continue
            col = b if prec == "fp32" else f"{b} {prec}"  # fp32 columns keep their plain names
            p50 = r.latency_ms_p50
            ideal = p50.get("ideal", np.nan)
            t[f"{col} p50 (ms)"] = [_ms(p50.get(w), _valid(r, w)) for w in t.way]
            t[f"{col} / ideal"] = [f"{p50[w] / ideal:.2f}x" if w in p50 and ideal == ideal else "-" for w in t.way]
            for w in p50.index:
                csv.append({"backend": b, "precision": prec, "way": w, "route": r.route[w], "madds": r.madds[w],
                            "latency_ms_p50": p50[w], "latency_ms_mean": r.latency_ms_mean[w], "n": r.n[w],
                            "ratio_to_ideal": p50[w] / ideal, "run_id": r.run_id[w] if "run_id" in r else ""})
            ratios.append(f"{col}: " + ", ".join(
                f"{a}/{c} {p50[a] / p50[c]:.2f} (paper {PAPER_TABLE2_MS[a] / PAPER_TABLE2_MS[c]:.2f})"
                for a, c in TABLE2_RATIOS if a in p50 and c in p50))
    t["paper ms (RTX 2080 Ti)"] = [f"{PAPER_TABLE2_MS[w]:.1f}" if w in PAPER_TABLE2_MS else "-" for w in t.way]
    t["paper / ideal"] = [f"{PAPER_TABLE2_MS[w] / PAPER_TABLE2_MS['ideal']:.2f}x" if w in PAPER_TABLE2_MS else "-"
                          for w in t.way]
    notes = [COMPILED_NOTE, "The ratios the paper's argument rests on, ours beside the paper's (RTX 2080 Ti, "
                            "eager): " + "; ".join(ratios) + "."]
    return t, pd.DataFrame(csv), notes


def _matched_mix(route_madds: dict, target: float) -> dict:
    """Two adjacent routes whose mean MAdds equal ``target`` (clipped to the routes' range: the
    paper's 565M lies 0.9M above our largest route's count)."""
    lo, hi = min(route_madds.values()), max(route_madds.values())
    return matched_distribution(route_madds, min(max(target, lo), hi))


def table7(lut: pd.DataFrame, dyn: pd.DataFrame, input_size: int, gates: pd.DataFrame | None = None):
    static = ok_rows(lut[(lut.model == "mobilenet_v1") & (lut.input_size == input_size) & (lut.batch_size == 1)
                     & (lut.precision == "fp32")]) if len(lut) else lut
    routes = ok_rows(dyn[(dyn.model == "ds_mbnet") & (dyn.kind == "route") & (dyn.input_size == input_size)
                     & (dyn.precision == "fp32")]) if len(dyn) else dyn
    if static.empty or routes.empty:
        raise ReportError("Table 7 needs mobilenet_v1 rows in lut.csv and ds_mbnet route rows in dynamic.csv")
    backends = sorted(set(routes.backend) & set(static.backend), key=lambda b: (b != "eager", b))
    if not backends:
        raise ReportError("no backend measured both mobilenet_v1 and the ds_mbnet dynamic engine")
    names, madds_col, per_backend, mixes = [], [], {b: [] for b in backends}, []
    for w in ("1.0", "0.75", "0.5"):
        r = static[static.route == f"x{w}"]
        names.append(f"MBNetV1 x{w}")
        madds_col.append(f"{r.madds.iloc[0] / 1e6:.0f}" if len(r) else "-")
        mixes.append(f"static x{w}")
        for b in backends:
            rb = r[r.backend == b]
            per_backend[b].append(rb.latency_ms_p50.iloc[0] if len(rb) else np.nan)
    route_madds = routes.drop_duplicates("route").set_index("route").madds.to_dict()
    route_ms = {b: routes[routes.backend == b].set_index("route").latency_ms_p50 for b in backends}

    def add_mix(name: str, mix: dict, route_madds=route_madds, route_ms=route_ms) -> None:
        """A row priced as a route distribution: expected MAdds and expected end-to-end latency."""
        names.append(name)
        madds_col.append(f"{sum(p * route_madds[r] for r, p in mix.items()) / 1e6:.0f}")
        mixes.append(" + ".join(f"{p:.2f} x route {r}" for r, p in mix.items()))
        for b in backends:
            lat = route_ms.get(b, {})
            per_backend[b].append(sum(p * lat[r] for r, p in mix.items()) if all(r in lat for r in mix) else np.nan)

    for label in ("DS-MBNet-L", "DS-MBNet-M", "DS-MBNet-S"):
        add_mix(label, _matched_mix(route_madds, PAPER_TABLE7[label][0] * 1e6))
    notes_pp = []
    pp = ok_rows(dyn[(dyn.model == "ds_mbnet_pp") & (dyn.kind == "route") & (dyn.input_size == input_size)
                     & (dyn.precision == "fp32")]) if len(dyn) else dyn
    if len(pp):  # DS-MBNet++ rows where its dynamic engine was measured
        pp_madds = pp.drop_duplicates("route").set_index("route").madds.to_dict()
        pp_ms = {b: pp[pp.backend == b].set_index("route").latency_ms_p50 for b in backends}
        lo, hi = min(pp_madds.values()), max(pp_madds.values())
        for label in ("DS-MBNet-L++", "DS-MBNet-M++", "DS-MBNet-S++"):
            target = PAPER_TABLE7[label][0] * 1e6
            if 0.99 * lo <= target <= 1.01 * hi:
                add_mix(label, _matched_mix(pp_madds, target), pp_madds, pp_ms)
                continue
            names.append(label)
            madds_col.append("-")
            mixes.append(f"outside ds_mbnet_pp's routes ({lo / 1e6:.0f}M..{hi / 1e6:.0f}M)")
            for b in backends:
                per_backend[b].append(np.nan)
            notes_pp.append(f"{label}: the paper's {target / 1e6:.0f}M MAdds lie outside ds_mbnet_pp's routes "
                            f"({lo / 1e6:.0f}M..{hi / 1e6:.0f}M at {input_size}x{input_size}): no route mix has them.")
    retrained = gates[(gates.model == "ds_mbnet") & (gates.input_size == input_size)] \
        if gates is not None and len(gates) else pd.DataFrame()
    for (gate, backend), g in retrained.groupby(["gate", "backend"]) if len(retrained) else []:
        add_mix(f"DS-MBNet, gate retrained with the {gate} penalty ({backend} LUT)",
                {r: p for r, p in zip(g.route, g.share) if p > 0})
    t = pd.DataFrame({"model": names, "MAdds (M)": madds_col, "route mix": mixes})
    for b in backends:
        t[f"{b} latency (ms)"] = [_ms(v) for v in per_backend[b]]
    t["paper MAdds (M)"] = [PAPER_TABLE7[n][0] if n in PAPER_TABLE7 else "-" for n in names]
    t["paper latency (ms)"] = [PAPER_TABLE7[n][1] if n in PAPER_TABLE7 else "-" for n in names]
    csv = pd.DataFrame([{"model": n, "mix": m, "madds": md, "backend": b, "latency_ms": per_backend[b][i]}
                        for i, (n, m, md) in enumerate(zip(names, mixes, madds_col)) for b in backends])
    acc = acceleration(dyn, input_size)
    notes = ["DS-MBNet-L/M/S rows: the stated mix of two adjacent routes whose mean MAdds equal the paper's, "
             "priced with the deployed dynamic network's p50 per route (dynamic.csv, kind route)"
             + (", and the route histograms of the gates retrained at this input size." if len(retrained) else
                "; no gate was retrained at this input size (harness.retrain_gate).")
             + " Static rows: lut.csv p50. The two come from different phases of the run; for ratios use the "
               "interleaved acceleration below."] + notes_pp
    if len(acc):
        lines = [f"{r.backend}: ideal {speedup_text(r._asdict(), 'ideal')} (x1.0 / x0.5), realized "
                 f"{speedup_text(r._asdict(), 'realized')} (x1.0 / DS-MBNet deployed at x0.5's MAdds), "
                 f"{r.realized / r.ideal:.2f} of ideal"
                 + (f"; the same route mix on the routes' static engines {r.static_mix:.2f}x: the architecture's "
                    f"share {share_text(r._asdict(), 'architecture', 'static mix over x0.5')}, the deployment's "
                    f"{share_text(r._asdict(), 'deployment', 'deployed over static mix')}"
                    if "static_mix" in acc and r.static_mix == r.static_mix else "")
                 for r in acc.itertuples()]
        paper = (f"ideal {PAPER_ACCELERATION['ideal']:.2f}x, realized {PAPER_ACCELERATION['realized']:.2f}x "
                 f"({PAPER_ACCELERATION['realized'] / PAPER_ACCELERATION['ideal']:.2f} of ideal)")
        notes.append("Acceleration, every figure of a backend measured in the same rounds: " + "; ".join(lines)
                     + f". Paper: {paper}.")
    return t, csv, notes


def slimmable_table3(lut: pd.DataFrame, input_size: int):
    """Every family of slimmable Table 3 with rows in ``lut``: each width's MAdds, params and p50 per
    backend, from the slimmable network's switch where it was measured, else the static model."""
    rows = ok_rows(lut[(lut.input_size == input_size) & (lut.batch_size == 1) & (lut.precision == "fp32")]) \
        if len(lut) else lut
    cells, parts = [], []
    backends = sorted(set(rows.backend), key=lambda b: (b != "eager", b)) if len(rows) else []
    for family, (slimmable, static, paper) in PAPER_SLIMMABLE.items():
        for model in (slimmable, static):
            found = rows[rows.model == model]
            widths = [w for w in paper if (found.route == f"x{w}").any()]
            if widths:
                break
        if not widths:
            continue
        parts.append(found)
        first = found.drop_duplicates("route").set_index("route")
        for w in widths:
            cell = {"network": family, "switch": f"x{w}", "measured as": model,
                    "MAdds (M)": f"{first.madds[f'x{w}'] / 1e6:.1f}",
                    "params (M)": f"{first.params[f'x{w}'] / 1e6:.2f}"}
            for b in backends:
                cell[f"{b} p50 (ms)"] = _latency(found[found.backend == b].set_index("route"), f"x{w}")
            cells.append(cell | {"paper MAdds": paper[w][0], "paper params": paper[w][1]})
    if not cells:
        raise ReportError("the slimmable Table 3 needs rows of "
                          + ", ".join(f"{s} or {m}" for s, m, _ in PAPER_SLIMMABLE.values()) + " in lut.csv")
    t = pd.DataFrame(cells)
    found = pd.concat(parts)
    csv = found[["model", "route", "backend", "madds", "params", "latency_ms_p50", "latency_ms_mean", "n"]]
    return t, csv.sort_values(["model", "backend", "madds"], ascending=[True, True, False]), []


def lut_table(dyn: pd.DataFrame, input_size: int):
    """Per dynamic model, backend and precision: how far its LUT's prices hold
    (:meth:`harness.deploy.lut.LatencyLUT.reliability`): the invalid segments and the routes priced
    from them, a price's interval from its parts' intervals, the LUT against the deployed engine in
    the same run, and how the dispatch was priced."""
    seg = dyn[(dyn.kind == "segment") & (dyn.input_size == input_size) & (dyn.batch_size == 1)] if len(dyn) else dyn
    if seg.empty:
        raise ReportError(f"the LUT table needs segment rows in dynamic.csv at input {input_size}")
    cells, notes = [], []
    pct = (lambda v: "-" if v is None else f"{100 * v:.1f}")  # noqa: E731
    for (model, backend, precision), _ in seg.groupby(["model", "backend", "precision"], sort=True):
        try:
            lut = LatencyLUT.from_frame(dyn, model, backend, precision, 1, input_size)
            model_ = dsnet.create_model(model)
            lut.tensor(model_)  # every route priced, or the row says why not
            r = lut.reliability(model_)
        except (LUTError, KeyError) as e:  # KeyError: a model this version no longer knows
            notes.append(f"{model} {backend} {precision}: no LUT ({e})")
            continue
        shown = ", ".join(r.invalid_routes[:6]) + (" ..." if len(r.invalid_routes) > 6 else "")
        cells.append({"model": model, "backend": backend, "precision": precision, "routes": r.routes,
                      "segments": len(lut.segment_ms), "invalid segments": len(r.invalid_segments),
                      "routes priced from invalid segments": f"{len(r.invalid_routes)}"
                      + (f" ({shown})" if shown else ""),
                      "price interval median (%)": pct(r.interval_median),
                      "price interval max (%)": pct(r.interval_max),
                      "LUT vs deployed median (%)": pct(r.error_median), "LUT vs deployed max (%)": pct(r.error_max),
                      "validated routes": r.validated,
                      "not judged (deployed timing invalid)": route_errors_text(r.unjudged) or "-",
                      "dispatch": lut.dispatch_note})
    if not cells:
        raise ReportError("no LUT could be built from dynamic.csv: " + "; ".join(notes))
    t = pd.DataFrame(cells)
    notes = ["A route's price is its segments plus one dispatch cost per gate. Price interval: the half-widths of "
             "its parts' 95% intervals added, over the price (an upper bound). An invalid segment's interval is wider "
             "than the protocol allows: a penalty or budget that reads the routes priced from it may be off by its "
             "interval. LUT vs deployed: |LUT - deployed| / deployed on the routes the same run timed deployed; a "
             "route whose deployed timing has an interval wider than the protocol allows cannot judge the LUT: it "
             "is named with its error under not judged, not counted.",
             *notes]
    return t, t.drop(columns=["dispatch"]), notes


TABLES = {
    **{name: (f"DS-Net++ Table 2: {what}, six ways (batch 1, interleaved per backend)",
              lambda lut, dyn, gates, s, model=model: table2(dyn, s, model))
       for name, (model, what) in TABLE2_VARIANTS.items()},
    "table7": ("DS-Net++ Table 7, latency column: MobileNetV1 and DS-MBNet (batch 1)",
               lambda lut, dyn, gates, s: table7(lut, dyn, s, gates)),
    "lut": ("The latency LUT of each dynamic model: how far its prices hold (batch 1)",
            lambda lut, dyn, gates, s: lut_table(dyn, s)),
    "slimmable_table3": ("Slimmable networks Table 3 analogue: each family's switches (batch 1)",
                         lambda lut, dyn, gates, s: slimmable_table3(lut, s)),
}


def rebuild_command(layout: Layout, input_size: int, target: str | None) -> str:
    """The command that rebuilds a folder's tables, figures and page."""
    return (f"python -m harness.report --target {target or '<target>'} --results {layout.root} "
            f"--input-size {input_size}")


def build(layout: Layout, input_size: int, target: str | None = None) -> tuple[list, list[str]]:
    """Every table and figure that the stored results allow, and the folder's page
    (:mod:`harness.reporting.page`); returns (written paths, skipped reasons). ``target``: the
    profile named in the rebuild command (default: the one env.json names)."""
    lut, dyn, env, gates = load_results(layout)
    written, skipped, sections = [], [], []
    layout.tables_dir.mkdir(exist_ok=True)
    for name, (title, fn) in TABLES.items():
        try:
            table, csv, notes = fn(lut, dyn, gates, input_size)
        except ReportError as e:
            skipped.append(f"{name}: {e}")
            continue
        md = [f"# {title}", "", f"Input {input_size}x{input_size}. Rebuilt by `python -m harness.report` from "
              "stored results; paper values only in columns labelled paper.", "", md_table(table), ""]
        if table.astype(str).map(marked_invalid).any().any():
            notes = [*notes, INVALID_NOTE]
        notes = [*notes, *cell_notes(table)]
        md += [f"{n}\n" for n in notes] + [env_line(env), ""]
        layout.table(name, "md").write_text("\n".join(md))
        csv.to_csv(layout.table(name, "csv"), index=False)
        written += [layout.table(name, "md"), layout.table(name, "csv")]
        sections.append((name, "\n".join(md)))
    if len(skipped) == len(TABLES):
        models = sorted(set(lut.model if len(lut) else []) | set(dyn.model if len(dyn) else []))
        raise ReportError(f"{layout.root} has no result the tables use at input {input_size} (it holds "
                          f"{', '.join(models) or 'nothing'}): " + "; ".join(skipped))
    written += figures.build_all(layout, lut, dyn, input_size, skipped)
    written.append(write_page(layout, sections, env, skipped, rebuild_command(layout, input_size, target or
                                                                              env.get("target")),
                              {"lut.csv": lut, "dynamic.csv": dyn}, env_line(env) if env else ""))
    return written, skipped
