"""The results store: one SQLite file per results folder, written the moment a result exists.

Contract
--------
``ResultStore(path)`` opens (or creates) ``results.sqlite``. ``record(row)`` inserts or replaces
one result and commits at once (WAL journal, synchronous=FULL), so an interrupted run (Ctrl-C,
kill -9) loses at most the measurement in flight. A row is keyed by (model, route, backend,
precision, batch_size, input_size); ``done_keys()`` lists the keys already stored so a re-run
skips them. Raw samples are kept (JSON) beside the statistics. ``record_dynamic`` does the same
for the dynamic engine's, Table 2's and the acceleration's rows. ``export_lut(path)`` and
``export_dynamic(path)`` write the tidy CSVs atomically, keeping the rows of the previous export
whose key this store does not hold (results of runs whose store is gone, e.g. committed exports).
Tables and columns come from ``harness.results.layout``; a store written by an older version
gains the new columns on open. A store holding other tables or views, or a table of ours keyed
otherwise, is refused on open (a :class:`StoreError` naming them): its rows would reach the
exports. A row whose status is not one of the layout's ``STATUSES`` is refused.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pandas as pd

from harness.measure.protocol import drift_summary
from harness.results.layout import (
    DRIFT_COLUMNS,
    DYNAMIC_COLUMNS,
    DYNAMIC_EXTRA_COLUMNS,
    DYNAMIC_KEY,
    DYNAMIC_KINDS,
    LUT_COLUMNS,
    RESULT_EXTRA_COLUMNS,
    RESULT_KEY,
    STATUSES,
)

# column -> SQL type; the key columns are NOT NULL. Columns come from the layout.
_TYPES = {"batch_size": "INTEGER", "input_size": "INTEGER", "madds": "INTEGER", "params": "INTEGER",
          "latency_ms_p50": "REAL", "latency_ms_p90": "REAL", "latency_ms_mean": "REAL", "latency_ms_std": "REAL",
          "n": "INTEGER", "number": "INTEGER", "device_mismatch": "INTEGER", "predicted_ms": "REAL",
          "rel_error": "REAL", "compile_s": "REAL", "latency_ms_p50_ci_low": "REAL",
          "latency_ms_p50_ci_high": "REAL", "valid": "INTEGER", "round": "INTEGER", "factor": "REAL",
          "latency_rel": "REAL", "emulated": "INTEGER"}
TABLES = {  # table: (key, columns)
    "results": (RESULT_KEY, list(dict.fromkeys(LUT_COLUMNS + RESULT_EXTRA_COLUMNS))),
    "dynamic": (DYNAMIC_KEY, list(dict.fromkeys(DYNAMIC_COLUMNS + DYNAMIC_EXTRA_COLUMNS))),
    "drift": (("run_id", "phase", "round"), DRIFT_COLUMNS),
}


_TABLE_TYPES = {"dynamic": {"madds": "REAL"}}  # a route mix has fractional mean MAdds


def _type(table: str, column: str) -> str:
    return _TABLE_TYPES.get(table, {}).get(column) or _TYPES.get(column, "TEXT")


def _create(table: str) -> str:
    key, cols = TABLES[table]
    body = ", ".join(f"{c} {_type(table, c)}{' NOT NULL' if c in key or c == 'status' else ''}" for c in cols)
    return f"CREATE TABLE IF NOT EXISTS {table} ({body}, PRIMARY KEY ({', '.join(key)}))"


class StoreError(RuntimeError):
    """A store that cannot be used (corrupt, unreadable, or in use by another run): one line that
    says what still holds and what to do."""


class ResultStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            problem = self.db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
            for table, (_, cols) in TABLES.items():
                self.db.execute(_create(table))
                have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                for c in cols:  # a store written by an older version: add the new columns, keep the rows
                    if c not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {c} {_type(table, c)}")
            self.db.execute("CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, env TEXT NOT NULL)")
            self.db.commit()
            foreign = self._foreign_schema()
            if foreign:
                self.db.close()
                raise StoreError(f"the results store {self.path} holds what harness.run does not write ({foreign}); "
                                 f"it is not this harness's store: move it aside (mv {self.path} {self.path}.foreign) "
                                 "and re-run")
        except sqlite3.OperationalError as e:
            full = any(w in str(e) for w in ("disk is full", "readonly", "unable to open")) or _nearly_full(self.path)
            if not full:
                raise self._corrupt(e) from None
            raise StoreError(f"the results store {self.path} cannot be written ({e}): free space or choose another "
                             "results folder; the CSV exports beside it hold the last finished run's results") from None
        except sqlite3.DatabaseError as e:
            raise self._corrupt(e) from None

    def _foreign_schema(self) -> str:
        """What the store holds beyond its own schema: other tables or views, unknown columns, or a
        table of ours keyed otherwise (its rows would be exported as they are)."""
        own = {**{t: k for t, (k, _) in TABLES.items()}, "runs": ("run_id",)}
        problems = [f"{kind} {name}" for kind, name in self.db.execute(
            "SELECT type, name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'")
            if name not in own or kind != "table"]
        for table, key in own.items():  # (a column it does not know is never exported: the exports name theirs)
            info = list(self.db.execute(f"PRAGMA table_info({table})"))
            pk = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
            if pk != tuple(key):
                problems.append(f"table {table} keyed by ({', '.join(pk) or 'nothing'}), not ({', '.join(key)})")
        return "; ".join(problems)

    def _corrupt(self, e) -> StoreError:
        return StoreError(
            f"the results store {self.path} is corrupt or not a results store ({' '.join(str(e).split())}); "
            f"the CSV exports beside it (lut.csv, dynamic.csv) still hold the last finished run's results; "
            f"move it aside (mv {self.path} {self.path}.corrupt) and re-run to measure again")

    def close(self) -> None:
        self.db.close()

    def record(self, row: dict) -> None:
        row = dict(row)
        if row.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
        _encode(row)
        cols = [c for c in TABLES["results"][1] if c in row]
        missing = [k for k in RESULT_KEY if k not in row]
        if missing:
            raise ValueError(f"result row lacks key column(s) {missing}")
        self.db.execute(f"INSERT OR REPLACE INTO results ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
        self.db.commit()

    def record_dynamic(self, row: dict) -> None:
        """One dynamic-engine result (a kind of :data:`~harness.results.layout.DYNAMIC_KINDS`)."""
        row = dict(row)
        if row.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
        if row.get("kind") not in DYNAMIC_KINDS:
            raise ValueError(f"kind must be one of {DYNAMIC_KINDS}, got {row.get('kind')!r}")
        _encode(row)
        cols = [c for c in TABLES["dynamic"][1] if c in row]
        self.db.execute(f"INSERT OR REPLACE INTO dynamic ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' * len(cols))})", [row[c] for c in cols])
        self.db.commit()

    def record_drift(self, run_id: str, phase: str, factors: list[float]) -> None:
        """The speed factor of every round of a round phase (see ``harness.measure.protocol``)."""
        self.db.executemany("INSERT OR REPLACE INTO drift (run_id, phase, round, factor) VALUES (?, ?, ?, ?)",
                            [(run_id, phase, r, f) for r, f in enumerate(factors)])
        self.db.commit()

    def drift(self, run_id: str | None = None) -> dict:
        """Per phase of ``run_id`` (default: every run): rounds and the spread of their factors."""
        q, args = "SELECT phase, factor FROM drift", ()
        if run_id is not None:
            q, args = q + " WHERE run_id = ?", (run_id,)
        by_phase: dict[str, list[float]] = {}
        for phase, factor in self.db.execute(q, args):
            by_phase.setdefault(phase, []).append(factor)
        return {p: drift_summary(f) for p, f in by_phase.items()}

    def dynamic_status(self, key: tuple) -> str | None:
        """The stored status of the dynamic row ``key`` (:data:`~harness.results.layout.DYNAMIC_KEY`), or None."""
        row = self.db.execute(f"SELECT status FROM dynamic WHERE {' AND '.join(f'{k} = ?' for k in DYNAMIC_KEY)}",
                              key).fetchone()
        return None if row is None else row[0]

    def dynamic_done(self) -> set[tuple]:
        return {tuple(r) for r in self.db.execute(f"SELECT {', '.join(DYNAMIC_KEY)} FROM dynamic")}

    def dynamic_frame(self) -> pd.DataFrame:
        return pd.read_sql_query(f"SELECT {', '.join(DYNAMIC_COLUMNS)} FROM dynamic ORDER BY model, backend, "
                                 "precision, batch_size, input_size, kind, madds, name", self.db)

    def export_dynamic(self, path: Path) -> pd.DataFrame:
        return _write_atomically(_with_rows_kept(self.dynamic_frame(), path, DYNAMIC_KEY), path)

    def record_run(self, run_id: str, env: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?)", (run_id, json.dumps(env)))
        self.db.commit()

    def runs(self) -> list[dict]:
        """The environment document of every run that wrote to this store, oldest first."""
        docs = [json.loads(r[0]) for r in self.db.execute("SELECT env FROM runs")]
        return sorted(docs, key=lambda d: d.get("run_id", ""))

    def done_keys(self, statuses=STATUSES) -> set[tuple]:
        q = f"SELECT {', '.join(RESULT_KEY)} FROM results WHERE status IN ({', '.join('?' * len(statuses))})"
        return {tuple(r) for r in self.db.execute(q, tuple(statuses))}

    def frame(self) -> pd.DataFrame:
        df = pd.read_sql_query("SELECT * FROM results ORDER BY model, madds, route, backend, precision, "
                               "batch_size", self.db)
        return df

    def export_lut(self, path: Path) -> pd.DataFrame:
        return _write_atomically(_with_rows_kept(self.frame()[LUT_COLUMNS], path, RESULT_KEY), path)


def _nearly_full(path: Path, least: int = 1 << 20) -> bool:
    """Whether the file system holding ``path`` has less than ``least`` bytes free (SQLite reports a
    full disk while it maps its shared memory as a "disk I/O error")."""
    import shutil

    try:
        return shutil.disk_usage(path.parent).free < least
    except OSError:
        return False


def _encode(row: dict) -> None:
    for c in ("samples_ms", "rounds", "sample_order"):
        if isinstance(row.get(c), list):
            row[c] = json.dumps(row[c])


def _with_rows_kept(df: pd.DataFrame, path: Path, key) -> pd.DataFrame:
    """``df`` plus the rows of the export already at ``path`` whose key the store does not hold:
    results measured into this folder by runs whose store is gone (a clone of committed results
    has the CSVs but no ``results.sqlite``) are kept, not overwritten. An unreadable old export
    is replaced."""
    try:
        old = pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.is_file() else None
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return df
    if old is None or old.empty or any(c not in old.columns for c in key):
        return df
    have = set(map(tuple, df[list(key)].astype(str).itertuples(index=False)))
    kept = old[[k not in have for k in map(tuple, old[list(key)].astype(str).itertuples(index=False))]]
    if kept.empty:
        return df
    return pd.concat([df, kept.reindex(columns=df.columns)], ignore_index=True)


def _write_atomically(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    write_atomically(path, lambda tmp: df.to_csv(tmp, index=False))
    return df


def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which a rename then makes ``path``: a
    reader never sees half a file, and an interrupted write leaves the old one whole."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; an export is as readable as any file written here
        os.replace(tmp, path)
    except BaseException:  # a full disk, Ctrl-C: the old file stays whole, no stray temporary file
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderLock:
    """One run at a time per results folder: an exclusive ``flock`` on ``<folder>/.lock`` (released
    by the OS when the process ends, even on kill -9). ``acquire()`` raises :class:`StoreError`
    naming the process that holds it."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"
        self.fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreError(f"results folder {self.path.parent} is in use by another run (pid {holder}): wait for "
                             "it to finish, or give this run another --results folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
