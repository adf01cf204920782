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
RESULT_EXTRA_COLUMNS = ["number", "samples_ms", "rounds", "device_mismatch", "time_utc"]

# -- the dynamic engine, Table 2 and acceleration: one row per (... kind, name) ------------------------
DYNAMIC_KEY = ("model", "backend", "precision", "batch_size", "input_size", "kind", "name")
# segment: a part of the compositional LUT; dispatch: the deployed path's cost per gate decision beyond
# its parts (name per_decision, with its interval); route: the deployed path per route against the LUT
# (predicted_ms = segments + dispatch); static / deployed / one_graph: a route's own static engine, the
# deployed path and the one artifact in the same rounds (predicted_ms of the latter two: the static p50);
# overhead: deployed (or one_graph) minus static, per round, pooled over routes (its median and interval);
# stream: a uniform route stream against the LUT; batch: eight images at batch 8 ("8") and one by one
# ("1x8"); acceleration: Table 7's largest / matched static networks, the dynamic route mix deployed and
# the same mix on the routes' static engines (static_mix); table2: DS-Net++ Table 2's ways; engine: a
# dynamic engine that could not be built (harness.phases.dynamic)
DYNAMIC_KINDS = ("segment", "dispatch", "route", "static", "deployed", "one_graph", "overhead", "stream", "batch",
                 "acceleration", "table2", "engine")
DYNAMIC_COLUMNS = [*DYNAMIC_KEY, "route", "madds", *STATS_COLUMNS, "predicted_ms", "rel_error", "status", "error",
                   "run_id", "compile_s", "backend_details"]
DYNAMIC_EXTRA_COLUMNS = ["samples_ms", "rounds"]
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

TABLES = ("table2", "table2_ds_resnet50", "table7", "slimmable_table3")
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
