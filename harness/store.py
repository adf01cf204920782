"""The results store: one SQLite file per results folder, written the moment a result exists.

Contract
--------
``ResultStore(path)`` opens (or creates) ``results.sqlite``. ``record(row)`` inserts or replaces
one result and commits at once (WAL journal, synchronous=FULL), so an interrupted run (Ctrl-C,
kill -9) loses at most the measurement in flight. A row is keyed by (model, route, backend,
precision, batch_size, input_size); ``done_keys()`` lists the keys already stored so a re-run
skips them. Raw samples are kept (JSON) beside the statistics. ``export_lut(path)`` writes the
tidy ``lut.csv`` (columns :data:`LUT_COLUMNS`) atomically.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pandas as pd

KEY = ("model", "route", "backend", "precision", "batch_size", "input_size")
LUT_COLUMNS = ["model", "route", "widths", "backend", "precision", "batch_size", "input_size", "madds",
               "params", "latency_ms_p50", "latency_ms_p90", "latency_ms_mean", "latency_ms_std", "n",
               "status", "error", "run_id"]
EXTRA_COLUMNS = ["number", "samples_ms", "device_name", "device_mismatch", "tuned", "run_id", "time_utc"]
STATUSES = ("ok", "compile_failed", "check_failed", "measure_failed")
_DYNAMIC_COLUMNS = {"model", "backend", "precision", "batch_size", "input_size", "kind", "name", "route", "madds",
                    "latency_ms_p50", "latency_ms_p90", "latency_ms_mean", "latency_ms_std", "n", "predicted_ms",
                    "rel_error", "status", "error", "samples_ms", "run_id"}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    model TEXT NOT NULL, route TEXT NOT NULL, widths TEXT, backend TEXT NOT NULL,
    precision TEXT NOT NULL, batch_size INTEGER NOT NULL, input_size INTEGER NOT NULL,
    madds INTEGER, params INTEGER, latency_ms_p50 REAL, latency_ms_p90 REAL, latency_ms_mean REAL,
    latency_ms_std REAL, n INTEGER, status TEXT NOT NULL, error TEXT,
    number INTEGER, samples_ms TEXT, device_name TEXT, device_mismatch INTEGER, tuned INTEGER,
    run_id TEXT, time_utc TEXT,
    PRIMARY KEY ({", ".join(KEY)})
);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, env TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dynamic (
    model TEXT NOT NULL, backend TEXT NOT NULL, precision TEXT NOT NULL, batch_size INTEGER NOT NULL,
    input_size INTEGER NOT NULL, kind TEXT NOT NULL, name TEXT NOT NULL, route TEXT, madds REAL,
    latency_ms_p50 REAL, latency_ms_p90 REAL, latency_ms_mean REAL, latency_ms_std REAL, n INTEGER,
    predicted_ms REAL, rel_error REAL, status TEXT NOT NULL, error TEXT, samples_ms TEXT, run_id TEXT,
    PRIMARY KEY (model, backend, precision, batch_size, input_size, kind, name)
);
"""
DYNAMIC_KEY = ("model", "backend", "precision", "batch_size", "input_size", "kind", "name")


class ResultStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def record(self, row: dict) -> None:
        row = dict(row)
        if row.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
        if isinstance(row.get("samples_ms"), list):
            row["samples_ms"] = json.dumps(row["samples_ms"])
        cols = [c for c in LUT_COLUMNS + EXTRA_COLUMNS if c in row]
        missing = [k for k in KEY if k not in row]
        if missing:
            raise ValueError(f"result row lacks key column(s) {missing}")
        self.db.execute(f"INSERT OR REPLACE INTO results ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
        self.db.commit()

    def record_dynamic(self, row: dict) -> None:
        """One dynamic-engine result (kind: segment, route, dispatch, stream, acceleration)."""
        row = dict(row)
        if isinstance(row.get("samples_ms"), list):
            row["samples_ms"] = json.dumps(row["samples_ms"])
        cols = [c for c in row if c in _DYNAMIC_COLUMNS]
        self.db.execute(f"INSERT OR REPLACE INTO dynamic ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
        self.db.commit()

    def dynamic_done(self) -> set[tuple]:
        return {tuple(r) for r in self.db.execute(f"SELECT {', '.join(DYNAMIC_KEY)} FROM dynamic")}

    def dynamic_frame(self) -> pd.DataFrame:
        from harness.lut import DYNAMIC_COLUMNS

        return pd.read_sql_query(f"SELECT {', '.join(DYNAMIC_COLUMNS)} FROM dynamic ORDER BY model, backend, "
                                 "precision, batch_size, input_size, kind, madds, name", self.db)

    def export_dynamic(self, path: Path) -> pd.DataFrame:
        df = self.dynamic_frame()
        fd, tmp = tempfile.mkstemp(dir=Path(path).parent, suffix=".csv.tmp")
        os.close(fd)
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return df

    def record_run(self, run_id: str, env: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?)", (run_id, json.dumps(env)))
        self.db.commit()

    def runs(self) -> list[dict]:
        """The environment document of every run that wrote to this store, oldest first."""
        docs = [json.loads(r[0]) for r in self.db.execute("SELECT env FROM runs")]
        return sorted(docs, key=lambda d: d.get("run_id", ""))

    def done_keys(self, statuses=STATUSES) -> set[tuple]:
        q = f"SELECT {', '.join(KEY)} FROM results WHERE status IN ({', '.join('?' * len(statuses))})"
        return {tuple(r) for r in self.db.execute(q, tuple(statuses))}

    def frame(self) -> pd.DataFrame:
        df = pd.read_sql_query("SELECT * FROM results ORDER BY model, madds, route, backend, precision, "
                               "batch_size", self.db)
        return df

    def export_lut(self, path: Path) -> pd.DataFrame:
        df = self.frame()[LUT_COLUMNS]
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
        os.close(fd)
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
        return df
