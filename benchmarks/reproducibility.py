"""The same run twice: how far its figures move from one run to the next, and which statistic moves least.

    python benchmarks/reproducibility.py --out /tmp/repro [--hog 1] -- --target x86 --models ds_mbnet,mobilenet_v1 \
        --backends eager,onnxruntime
    python benchmarks/reproducibility.py --runs /tmp/repro/run1 /tmp/repro/run2      # two finished runs

The first form runs ``python -m harness.run`` with the arguments after ``--`` twice, back to back,
into ``OUT/run1`` and ``OUT/run2`` (``--hog N``: the second run shares the machine with N processes
spinning on a core each, a machine that slows down on demand, as a VM does when its neighbours
wake; ``--duty 0.3``: each spins in bursts, 30% of the time, so the load comes and goes). Either
form then prints, per backend, cell by cell over the two runs' shared ``ok`` cells:

- absolute: the median and max |difference| of p50 (%): the machine's speed, not a goal on a VM;
- relative latency (each network over its model's largest, same backend, measured in the same
  rounds) under four statistics: ``latency_rel`` as the run stored it (the median over rounds of
  the per-round ratio); from the stored raw samples ``p10 ratio`` (the ratio of the two engines'
  10th percentiles: their least-disturbed samples), ``min ratio``, and ``local ratio`` (the
  per-round ratio with each sample first divided by its local speed factor: the other engines'
  samples timed just before and after it, from the stored ``sample_order``, since the machine's
  speed moves within a round). For each: the median and max |difference| (%), the largest shift of
  a model's whole curve (the median of its cells' signed differences: what its reference cell, or a
  speed change that is not uniform over network sizes, moved), the median difference around that
  shift, and the rank agreement of each model's routes (Spearman);
- each run's drift: the spread of its rounds' speed factors (``env.json``), so that a difference
  is read against how much the machine moved.

Issue 38's goal reads on the relative rows: median difference at most 2%, max 6%.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

STATISTICS = ("latency_rel", "p10 ratio", "min ratio", "local ratio")
LOCAL_WINDOW = 3  # samples before and after: ~0.15 s each way at 50 ms a sample


def _local_factors(cells: pd.DataFrame, window: int = LOCAL_WINDOW) -> dict:
    """Each sample's local speed factor in one round phase (``cells``: its rows, with
    ``sample_order``): the median, over the other engines' samples timed within ``window`` positions
    of it, of sample / that engine's median. ``{row index: factors}``; 1.0 where the order was not
    stored (a store written before it was)."""
    timeline, norm = [], {}
    for i, r in cells.iterrows():
        s = np.asarray(json.loads(r.samples_ms))
        norm[i] = s / np.median(s)
        order = json.loads(r.sample_order) if isinstance(r.get("sample_order"), str) else None
        timeline += [(o, i, j) for j, o in enumerate(order or [])]
    timeline.sort()
    factors = {i: np.ones(len(v)) for i, v in norm.items()}
    for pos, (_, i, j) in enumerate(timeline):
        near = [norm[k][m] for _, k, m in timeline[max(0, pos - window):pos + window + 1] if k != i]
        if near:
            factors[i][j] = np.median(near)
    return factors


def relative_latencies(results: Path) -> pd.DataFrame:
    """Per ok static cell of a run's store: p50 and its latency relative to its model's largest
    network on the same backend, precision and batch, under each of :data:`STATISTICS`."""
    from harness.measure.protocol import Measurement, paired_ratio
    from harness.results.layout import Layout
    from harness.results.store import ResultStore

    store = ResultStore(Layout(results).store)
    try:
        df = store.frame()
    finally:
        store.close()
    df = df[df.status == "ok"]
    factors = {}
    for _, phase in df.groupby(["model", "input_size"]):  # a model's static cells share one round phase
        factors |= _local_factors(phase)
    rows = []
    for (model, backend, precision, batch, size), g in df.groupby(["model", "backend", "precision", "batch_size",
                                                                   "input_size"]):
        g = g.sort_values("madds")
        samples = {r.route: np.asarray(json.loads(r.samples_ms)) for r in g.itertuples()}
        rounds = {r.route: json.loads(r.rounds) for r in g.itertuples()}
        local = {r.route: samples[r.route] / factors[r.Index] for r in g.itertuples()}
        ref = g.route.iloc[-1]
        for r in g.itertuples():
            a, b = samples[r.route], samples[ref]
            rows.append({"model": model, "backend": backend, "precision": precision, "batch_size": batch,
                         "input_size": size, "route": r.route, "madds": r.madds, "p50": r.latency_ms_p50,
                         "latency_rel": float(r.latency_rel),
                         "p10 ratio": float(np.percentile(a, 10) / np.percentile(b, 10)),
                         "min ratio": float(a.min() / b.min()),
                         "local ratio": paired_ratio(Measurement(list(local[r.route]), 1, rounds[r.route]),
                                                     Measurement(list(local[ref]), 1, rounds[ref]))})
    return pd.DataFrame(rows)


def _spearman(x: pd.Series, y: pd.Series) -> float:
    if len(x) < 3:
        return float("nan")
    return float(np.corrcoef(x.rank(), y.rank())[0, 1])


def differences(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per backend: absolute and relative run-to-run differences (see the module docstring)."""
    key = ["model", "backend", "precision", "batch_size", "input_size", "route"]
    cells = a.merge(b, on=key, suffixes=("_1", "_2"))
    if cells.empty:
        raise SystemExit("error: the two runs share no measured cell")
    out = []
    for backend, g in cells.groupby("backend"):
        row = {"backend": backend, "cells": len(g)}
        absolute = 100 * (g.p50_2 / g.p50_1 - 1).abs()
        row["abs median %"], row["abs max %"] = absolute.median(), absolute.max()
        rel = g[g.madds_1 < g.groupby(["model", "precision", "batch_size", "input_size"]).madds_1.transform("max")]
        for stat in STATISTICS:
            signed = 100 * (rel[f"{stat}_2"] / rel[f"{stat}_1"] - 1)
            d = signed.abs()
            row[f"{stat}: median %"], row[f"{stat}: max %"] = d.median(), d.max()
            # the whole curve of a model moving together (its reference cell's error, or a speed change
            # that is not uniform over sizes) against what moves cell by cell around it
            shift = signed.groupby(rel.model).transform("median")
            row[f"{stat}: curve shift %"] = shift.abs().groupby(rel.model).first().max()
            row[f"{stat}: around it %"] = (signed - shift).abs().median()
            ranks = [_spearman(m[f"{stat}_1"], m[f"{stat}_2"]) for _, m in rel.groupby("model")]
            row[f"{stat}: Spearman min"] = np.nanmin(ranks) if ranks and not np.all(np.isnan(ranks)) else np.nan
        out.append(row)
    return pd.DataFrame(out)


def drift_line(results: Path) -> str:
    """The spread of a run's round speed factors over its phases (from ``env.json``)."""
    try:
        drift = json.loads((results / "env.json").read_text()).get("drift", {})
    except (OSError, ValueError):
        return f"{results}: no env.json"
    phases = [d for d in drift.values() if isinstance(d, dict) and d.get("rounds")]
    if not phases:
        return f"{results}: no drift recorded"
    lo, hi = min(d["factor_min"] for d in phases), max(d["factor_max"] for d in phases)
    iqr = float(np.median([d["factor_iqr"] for d in phases]))
    return (f"{results}: {len(phases)} round phases, speed factors {lo:.2f}..{hi:.2f}, "
            f"median interquartile range {iqr:.3f}")


def _spin(duty: float, seed: int) -> None:
    """Spin on a core; with ``duty`` < 1, in bursts (0.2-2 s) with pauses between, so that the
    machine's load comes and goes as a VM's neighbours' does."""
    import random

    rng = random.Random(seed)
    while True:
        if duty >= 1:
            continue
        burst = rng.uniform(0.2, 2.0)
        end = time.monotonic() + burst
        while time.monotonic() < end:
            pass
        time.sleep(burst * (1 - duty) / duty)


def run_twice(out: Path, run_args: list[str], hog: int, duty: float) -> tuple[Path, Path]:
    folders = (out / "run1", out / "run2")
    for i, folder in enumerate(folders):
        hogs = [mp.Process(target=_spin, args=(duty, j), daemon=True) for j in range(hog if i == 1 else 0)]
        for h in hogs:
            h.start()
        t0 = time.monotonic()
        try:
            cmd = [sys.executable, "-m", "harness.run", *run_args, "--results", str(folder)]
            print(f"run {i + 1}: {' '.join(cmd[1:])}" + (f" (beside {hog} spinning processes)" if hogs else ""),
                  file=sys.stderr, flush=True)
            r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        finally:
            for h in hogs:
                h.terminate()
        if r.returncode != 0:
            raise SystemExit(f"error: run {i + 1} exited {r.returncode}")
        print(f"run {i + 1}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return folders


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python benchmarks/reproducibility.py", description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs=2, type=Path, metavar=("RUN1", "RUN2"), help="two finished results folders")
    p.add_argument("--out", type=Path, help="where the two runs go (with arguments for harness.run after --)")
    p.add_argument("--hog", type=int, default=0, help="processes spinning beside the second run (default 0)")
    p.add_argument("--duty", type=float, default=1.0,
                   help="share of the time each of them spins, in bursts of 0.2-2 s (default 1: always)")
    args = p.parse_args(own)
    if args.runs:
        folders = args.runs
    elif args.out and run_args:
        if any(a.startswith("--results") for a in run_args):
            p.error("the two runs' folders are OUT/run1 and OUT/run2: leave --results out")
        if not 0 < args.duty <= 1:
            p.error(f"--duty must be in (0, 1], got {args.duty}")
        folders = run_twice(args.out, run_args, args.hog, args.duty)
    else:
        p.error("give --runs RUN1 RUN2, or --out OUT -- <harness.run arguments>")
    for f in folders:
        if not (f / "results.sqlite").is_file():
            p.error(f"{f} holds no results.sqlite of harness.run")
    table = differences(relative_latencies(folders[0]), relative_latencies(folders[1]))
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.2f}".format):
        print(table.set_index("backend").T.to_string())
    for f in folders:
        print("drift", drift_line(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
