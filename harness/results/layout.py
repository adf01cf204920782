"""The one layout of a results folder: every file and folder name, and the columns of every table.

Contract
--------
``Layout(root)`` names everything a run, a report or a gate retraining reads or writes under
``root`` (default ``results/<target>``; ``results/<target>/quick`` with ``--quick``). The store,
the CSV exports, the tables, the figures and the gate report take their paths and columns from
here and nowhere else:

- ``results.sqlite``: every result the moment it is taken (``harness.results.store``);
- ``lut.csv`` (:data:`LUT_COLUMNS`), ``dynamic.csv`` (:data:`DYNAMIC_COLUMNS`), ``env.json``:
  the exports, rebuilt from the store after every run;
- ``tables/<name>.{md,csv}`` and ``figures/<name>.png``: rebuilt from the exports alone;
- ``gate_retraining.{csv,md,json}``, ``gate_retraining_routes.csv``: the gate comparison
  (:data:`GATE_SUMMARY_COLUMNS`, :data:`GATE_ROUTE_COLUMNS`), one per model
  (``harness.results.gates``); ``gate_retraining/<workspace>/`` its checkpoints and LUT store;
- ``cache/<backend>/<artifact key>/`` compiled artifacts and ``<backend>_tuning/`` a backend's tuning
  database (``tvm_tuning/``)
  (neither is committed).

:func:`read_csv` reads any of the CSVs back with route and segment names kept literal.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path("results")

# -- the static sweep: one row per model x route x backend x precision x batch x input size -------
RESULT_KEY = ("model", "route", "backend", "precision", "batch_size", "input_size")
STATUSES = ("ok", "compile_failed", "check_failed", "measure_failed")
# the median's 95% interval and whether the cell met the protocol's validity rule (harness.measure.protocol)
STATS_COLUMNS = ["latency_ms_p50", "latency_ms_p90", "latency_ms_mean", "latency_ms_std", "n",
                 "latency_ms_p50_ci_low", "latency_ms_p50_ci_high", "valid"]
# compile_s: compile time (the build worker's plus the load here when backend_details says
# build_process worker: built beside this process's own builds), or artifact-load time when
# backend_details says cached; backend_details:
# JSON of the backend's settings that change a number (e.g. TVM's tuning trials and tuned tasks).
LUT_COLUMNS = ["model", "route", "widths", "backend", "precision", "batch_size", "input_size", "madds", "params",
               *STATS_COLUMNS, "latency_rel", "latency_rel_to", "latency_ms_p50_drift_corrected", "status", "error",
               "run_id", "compile_s", "backend_details", "device_name", "emulated"]
# device_name: the CPU or GPU that measured the row, or the board (key@host:port); emulated: 1 when
# that board is an emulator on another machine (its latency is not the device's), else 0.
# latency_rel: the cell's latency over that of latency_rel_to (the model's largest route or width on
# the same backend, precision and batch), the median of per-round ratios measured in the same rounds.
# latency_ms_p50_drift_corrected: p50 of the samples divided by their round's speed factor.
RESULT_EXTRA_COLUMNS = ["number", "samples_ms", "rounds", "sample_order", "device_mismatch", "time_utc"]

# -- the dynamic engine, Table 2 and acceleration: one row per (... kind, name) ------------------------
DYNAMIC_KEY = ("model", "backend", "precision", "batch_size", "input_size", "kind", "name")
# segment: a part of the compositional LUT; dispatch: the deployed path's cost per gate decision beyond
# its parts (name per_decision, with its interval); route: the deployed path per route against the LUT
# (predicted_ms = segments + dispatch); static / deployed / one_graph: a route's own static engine, the
# deployed path and the one artifact in the same rounds (predicted_ms of the latter two: the static p50);
# overhead: deployed (or one_graph) minus static, per round, pooled over routes (its median and interval),
# and one_graph_vs_deployed: the one artifact minus the deployed path, likewise (which to deploy), and
# split: the route's chain of parts minus its static engine, likewise (what the cut at the gates costs,
# before any dispatch), mix: the deployed route mix minus the same mix on the routes' static engines,
# per round (Table 7's deployment share, paired), and architecture: that static mix minus the static
# counterpart at x0.5 likewise (the architecture's share), realized and ideal: the deployed mix and the
# static network at x0.5 minus the static network at x1.0 per round (Table 7's two speed-ups, paired);
# stream: a uniform route stream against the LUT; batch: eight images at batch 8 ("8") and one by one
# ("1x8"); acceleration: Table 7's largest / matched static networks, the dynamic route mix deployed and
# the same mix on the routes' static engines (static_mix); table2: DS-Net++ Table 2's ways; engine: a
# dynamic engine that could not be built (harness.phases.dynamic)
ONE_GRAPH_VS_DEPLOYED = "one_graph_vs_deployed"  # the overhead row comparing the two deployments
SPLIT = "split"  # the overhead row of the parts chained against the static engine (the cut's cost)
STEADY = "deployed_steady"  # the overhead row of the deployed path against the static engine, each after itself
MIX = "mix"  # the overhead row of the deployed route mix against the same mix on static engines
ARCHITECTURE = "architecture"  # the overhead row of that static mix against the static network at x0.5
REALIZED = "realized"  # the overhead row of the deployed route mix against the static network at x1.0
IDEAL = "ideal"  # the overhead row of the static network at x0.5 against it at x1.0
DYNAMIC_KINDS = ("segment", "dispatch", "route", "static", "deployed", "one_graph", "static_steady", "deployed_steady",
                 "overhead", "stream", "batch", "acceleration", "table2", "engine")
DYNAMIC_COLUMNS = [*DYNAMIC_KEY, "route", "madds", *STATS_COLUMNS, "predicted_ms", "rel_error", "status", "error",
                   "run_id", "compile_s", "backend_details"]
DYNAMIC_EXTRA_COLUMNS = ["samples_ms", "rounds", "sample_order"]
# the speed factor of every round of a round phase (sample / engine median, median over the round)
DRIFT_COLUMNS = ["run_id", "phase", "round", "factor"]

# -- gate retraining -----------------------------------------------------------------------------------
GATE_SUMMARY_COLUMNS = ["model", "data", "input_size", "backend", "target", "gate", "val_accuracy", "n_val",
                        "expected_madds", "lut_ms", "measured_ms_mean", "measured_ms_p50", "measured_n", "error",
                        "cp_weight", "routes_upto", "cost_target", "gate_epochs", "train_s", "route", "penalty",
                        "budget", "budget_fraction", "calibration_lambda", "measured_ms_ci_low",
                        "measured_ms_ci_high"]
GATE_LARGEST = "largest route"  # the gate column of the context row: the engine forced to the largest route
GATE_ROUTE_COLUMNS = ["model", "data", "input_size", "backend", "target", "gate", "route", "widths", "madds",
                      "lut_ms", "count", "share"]

# What each column holds (docs/results-format.md is rendered from these by describe(); a test keeps them equal).
COLUMN_DOCS = {
    "model": "the registry name (dsnet.list_models())",
    "route": "the route (`3`, `0-1-2-3`), a width (`x0.5`), or a route mix (acceleration rows)",
    "widths": "the route's output widths of its routed stages",
    "backend": "the compiler (`harness.backends`; `<name>+graphs`: timed as a CUDA graph's replay)",
    "precision": "`fp32` or `fp16`",
    "batch_size": "images per call",
    "input_size": "square input resolution (px)",
    "madds": "multiply-adds per image, computed analytically (a mix: its expected MAdds)",
    "params": "parameters of the materialized route",
    "latency_ms_p50": "median per-call latency (ms): the figure to quote",
    "latency_ms_p90": "90th percentile (ms)",
    "latency_ms_mean": "mean (ms)",
    "latency_ms_std": "sample standard deviation (ms)",
    "n": "samples",
    "latency_ms_p50_ci_low": "low end of the median's 95% interval (binomial order statistics)",
    "latency_ms_p50_ci_high": "high end of the median's 95% interval",
    "valid": "1 when the interval's half-width is within the protocol's max_ci_fraction of the median and "
             "at least min_measured_ms was measured",
    "latency_rel": "the cell's latency over latency_rel_to's, the median of per-round ratios (drift cancels)",
    "latency_rel_to": "the model's largest route or width on the same backend, precision and batch",
    "latency_ms_p50_drift_corrected": "p50 of the samples each divided by its round's speed factor",
    "status": f"one of {', '.join(STATUSES)}",
    "error": "why it failed, one line",
    "run_id": "the run that measured the row (env.json lists the runs)",
    "compile_s": "compile time (s; the build worker's plus the load when backend_details says build_process "
                 "worker), or artifact-load time when backend_details says cached",
    "backend_details": "JSON of the settings that change a number: tuning, records (TVM: local, shipped), "
                       "cached, rebuilt (why a cached artifact was not used), cuda_graph, build_process",
    "device_name": "the CPU or GPU that measured the row, or the board (key@host:port)",
    "emulated": "1 when measured on an emulated board (its latency is not the device's)",
    "kind": "what a dynamic row measures (the kinds below)",
    "name": "the part, route or way the row is about",
    "predicted_ms": "what the row is set against: the LUT's price (route, stream, batch), the route's static "
                    "engine (deployed, one_graph)",
    "rel_error": "(predicted_ms - measured) / measured",
    "data": "the images a gate was retrained on",
    "target": "the target profile",
    "gate": "the retrained gate (its penalty, and budget in a sweep), or the largest route",
    "val_accuracy": "validation accuracy",
    "n_val": "validation images",
    "expected_madds": "expected MAdds per image of the routes the gate chose",
    "lut_ms": "the LUT's deployed latency (expected, for a gate)",
    "measured_ms_mean": "mean measured latency per image (ms), every gate in the same rounds",
    "measured_ms_p50": "median measured latency per image (ms)",
    "measured_n": "samples",
    "measured_ms_ci_low": "low end of the median's 95% interval",
    "measured_ms_ci_high": "high end of the median's 95% interval",
    "cp_weight": "the complexity penalty's weight",
    "routes_upto": "gates restricted to their first choices",
    "cost_target": "the penalty's target cost",
    "gate_epochs": "stage-II epochs",
    "train_s": "stage-II training time (s)",
    "penalty": "`madds` or `latency`",
    "budget": "the latency budget (`0.6x`, `3ms`)",
    "budget_fraction": "the budget as a fraction of the largest route's deployed latency",
    "calibration_lambda": "the calibration's lambda (each choice's score shifted by -lambda x its cost)",
    "count": "validation images that took the route",
    "share": "their share",
}
KIND_DOCS = {
    "segment": "a part of the compositional LUT (head, then one per stage and incoming choice)",
    "dispatch": "the deployed path's cost per gate decision beyond its parts (name per_decision), with its interval; "
                "signed: negative when the parts ran faster chained than each timed apart",
    "route": "the deployed network on a route against the LUT's price (segments + dispatch)",
    "static": "a route's own static engine, in the same rounds",
    "deployed": "the deployed path on a route; predicted_ms is the route's static engine",
    "one_graph": "the one artifact on a route; predicted_ms is the route's static engine",
    "static_steady": "a route's static engine, each sample right after an untimed call of its own (its steady "
                     "state; every other kind is timed after whatever the round ran before it)",
    "deployed_steady": "the deployed path on a route, each sample right after an untimed call of its own; "
                       "predicted_ms is static_steady's",
    "overhead": "deployed (or one_graph) minus static per round, pooled over routes; name one_graph_vs_deployed: "
                "the one artifact minus the deployed path, likewise; name split: the route's parts chained "
                "(the sum of their samples) minus its static engine, likewise: what cutting the network at "
                "its gates costs before any dispatch; name deployed_steady: deployed_steady minus "
                "static_steady likewise (the deployment's cost in a process serving the network alone); name "
                "mix: Table 7's deployed route mix minus the same mix on the routes' static engines per round, "
                "name architecture: that static mix minus the "
                "static network at x0.5 (the two shares of the acceleration's loss, with their intervals); "
                "names realized and ideal: the deployed mix and the static network at x0.5 minus the static "
                "network at x1.0 per round (Table 7's two speed-ups, paired)",
    "stream": "a uniform route stream through the deployed path against the LUT's mean",
    "batch": "eight images at batch 8 (`8`) and one by one (`1x8`)",
    "acceleration": "Table 7: static x1.0 (`largest`) and x0.5 (`matched`), the deployed route mix of x0.5's "
                    "MAdds (`dynamic`) and that mix on the routes' static engines (`static_mix`)",
    "table2": "DS-Net++ Table 2's ways (full, masking, indexing, slicing, materialized, ideal)",
    "engine": "the dynamic engine's build (`build`): `ok`, or the part that could not be built and why "
              "(`measure_failed`: the process that times it failed or died); `backend_details` of an `ok` row "
              "say where the rows were timed: `timed_in` `2 fresh processes, one after the other, their rounds pooled` "
              "(the default, `harness/phases/fresh.py`) or `the run's process` (`--in-process`, or a phase "
              "called directly)",
}

TABLES = ("table2", "table2_ds_resnet50", "table7", "lut", "slimmable_table3")
FIGURES = ("latency_vs_madds", "lut_vs_measured", "acceleration", "table2", "table2_ds_resnet50", "gate_retraining")


@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def default(cls, target_name: str, quick: bool = False) -> Layout:
        return cls(RESULTS_DIR / target_name / ("quick" if quick else ""))

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # stored results and their exports
    @property
    def store(self) -> Path:
        return self.root / "results.sqlite"

    @property
    def lut_csv(self) -> Path:
        return self.root / "lut.csv"

    @property
    def dynamic_csv(self) -> Path:
        return self.root / "dynamic.csv"

    @property
    def env_json(self) -> Path:
        return self.root / "env.json"

    # built from the exports
    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def table(self, name: str, ext: str) -> Path:
        return self.tables_dir / f"{name}.{ext}"

    @property
    def figures_dir(self) -> Path:
        return self.root / "figures"

    def figure(self, name: str) -> Path:
        return self.figures_dir / f"{name}.png"

    @property
    def page(self) -> Path:
        return self.root / "index.html"

    # gate retraining
    @property
    def gate_summary(self) -> Path:
        return self.root / "gate_retraining.csv"

    @property
    def gate_routes(self) -> Path:
        return self.root / "gate_retraining_routes.csv"

    @property
    def gate_meta(self) -> Path:
        return self.root / "gate_retraining.json"

    @property
    def gate_report(self) -> Path:
        return self.root / "gate_retraining.md"

    def gate_workspace(self, model: str, data: str, input_size: int) -> Layout:
        """The retraining workspace: itself a results folder (its own store, LUT and cache)."""
        return Layout(self.root / "gate_retraining" / f"{model}-{data}-{input_size}px")

    # caches (not committed)
    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def tuning_dir(self, backend: str) -> Path:
        """Where a backend keeps state shared by all its artifacts: ``tvm_tuning/`` holds TVM's
        MetaSchedule database. Created only by a backend that uses it."""
        return self.root / f"{backend}_tuning"


def read_csv(path: Path, columns: list[str] | None = None):
    """A stored CSV: names stay literal ("NA", "null" are not missing values), empty cells are NaN.
    With ``columns``, columns an older export lacks are added empty (in that order, others kept)."""
    import pandas as pd  # here, not at import time: the CLIs start (and take Ctrl-C) quickly

    df = pd.read_csv(path, dtype={"route": str, "name": str}, keep_default_na=False, na_values=[""])
    if columns is not None:
        for c in columns:
            if c not in df.columns:
                df[c] = pd.NA
    return df


def describe() -> str:
    """The results format as Markdown (docs/results-format.md), from the names and docs above."""
    lay = Layout(RESULTS_DIR / "<target>")
    files = [(lay.store, "every result, written the moment it is taken (SQLite; not committed)"),
             (lay.lut_csv, "the static sweep, one row per model x route x backend x precision x batch x input size"),
             (lay.dynamic_csv, "the dynamic engine, Table 2 and the acceleration, one row per ("
              + ", ".join(DYNAMIC_KEY) + ")"),
             (lay.env_json, "the machine, the libraries, what idle threads were told where the environment set "
                            "it (`wait_policy`), the protocol, the skipped backends and the drift of each round "
                            "phase, per run"),
             (lay.tables_dir, "the papers' tables (`<name>.md`, `<name>.csv`): " + ", ".join(TABLES)),
             (lay.figures_dir, "the figures (`<name>.png`): " + ", ".join(FIGURES)),
             (lay.page, "every table and figure of the folder on one self-contained page (figures embedded), "
                        "with the environment, the drift, what the folder lacks and each table's rebuild command"),
             (lay.gate_summary, "the gate comparison, one row per gate"), (lay.gate_routes, "its route histograms"),
             (lay.gate_report, "its report"), (lay.cache_dir, "compiled artifacts, signed by the installation that "
                                                             "built them (not committed); `crafted/`: inputs found to "
                                                             "take a route (`.npy`, no pickle) and searches that "
                                                             "found none (`.unreachable`, text)"),
             (lay.tuning_dir("tvm"), "TVM's MetaSchedule database (not committed)")]
    out = ["# The results format", "",
           "Generated from `harness/results/layout.py` (`python -c \"from harness.results.layout import describe; "
           "print(describe(), end='')\" > docs/results-format.md`); a test keeps this page equal to it.", "",
           "## Files of a results folder", "", "| path | what |", "|---|---|"]
    out += [f"| `{p}` | {what} |" for p, what in files]
    for title, cols in (("`lut.csv`", LUT_COLUMNS), ("`dynamic.csv`", DYNAMIC_COLUMNS),
                        ("`gate_retraining.csv`", GATE_SUMMARY_COLUMNS),
                        ("`gate_retraining_routes.csv`", GATE_ROUTE_COLUMNS)):
        out += ["", f"## {title}", "", "| column | what |", "|---|---|"]
        out += [f"| `{c}` | {COLUMN_DOCS[c]} |" for c in cols]
    out += ["", "## Kinds of `dynamic.csv` rows", "", "| kind | what |", "|---|---|"]
    out += [f"| `{k}` | {KIND_DOCS[k]} |" for k in DYNAMIC_KINDS]
    return "\n".join(out) + "\n"
