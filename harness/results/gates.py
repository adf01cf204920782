"""The stored gate comparisons of a results folder: read back, and kept per model.

Contract
--------
A results folder holds one gate comparison per model (``harness.retrain_gate``), in the three
files :class:`~harness.results.layout.Layout` names: ``gate_retraining.csv`` (one row per gate,
:data:`GATE_SUMMARY_COLUMNS`), ``gate_retraining_routes.csv`` (route histograms,
:data:`GATE_ROUTE_COLUMNS`) and ``gate_retraining.json`` (``{"models": {model: document}}``).
:func:`read_comparisons` reads them (an unreadable file is a :class:`StoreError`, one line);
:func:`store_comparison` writes one model's comparison after the others' (kept:
:func:`previous_comparisons`), replacing its own rows and document, never another model's, each
file atomically (an interrupted write leaves every model's comparison whole).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.results.layout import GATE_ROUTE_COLUMNS, GATE_SUMMARY_COLUMNS, Layout, read_csv
from harness.results.store import StoreError, write_atomically


@dataclass(frozen=True)
class Comparisons:
    """The stored gate comparisons of a results folder (one per model), as the report reads them."""

    summary: pd.DataFrame  # GATE_SUMMARY_COLUMNS
    routes: pd.DataFrame  # GATE_ROUTE_COLUMNS
    meta: dict  # model -> the run's document (settings, environment, noise floor)


def read_comparisons(layout: Layout) -> Comparisons:
    """The three stored files; a missing one is ``FileNotFoundError``, an unreadable one
    :class:`StoreError` (one line, naming the folder). A document from before several models
    shared the folder (no ``models`` key) is the one model of its summary."""
    files = (layout.gate_summary, layout.gate_routes, layout.gate_meta)
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{layout.root} has no gate-retraining results ({', '.join(missing)} missing): "
                                "run `python -m harness.retrain_gate` first")
    try:
        summary = read_csv(layout.gate_summary, GATE_SUMMARY_COLUMNS)
        routes = read_csv(layout.gate_routes, GATE_ROUTE_COLUMNS)
        meta = json.loads(layout.gate_meta.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise StoreError(f"the gate comparison in {layout.root} is unreadable ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); move the gate_retraining.* files away") from None
    if "models" not in meta:
        meta = {"models": {str(m): meta for m in summary.model.unique()}}
    return Comparisons(summary, routes, meta["models"])


def previous_comparisons(layout: Layout, model: str) -> Comparisons:
    """What the folder holds for models other than ``model`` (kept beside a new comparison of it)."""
    try:
        c = read_comparisons(layout)
    except FileNotFoundError:
        return Comparisons(pd.DataFrame(columns=GATE_SUMMARY_COLUMNS), pd.DataFrame(columns=GATE_ROUTE_COLUMNS), {})
    return Comparisons(c.summary[c.summary.model != model], c.routes[c.routes.model != model],
                       {m: d for m, d in c.meta.items() if m != model})


def store_comparison(layout: Layout, model: str, summary: pd.DataFrame, routes: pd.DataFrame, doc: dict) -> list:
    """``model``'s comparison (``summary`` and ``routes`` rows, its run's ``doc``) after the other
    models' already in ``layout``, each file written atomically; returns the three paths."""
    others = previous_comparisons(layout, model)
    for path, kept, new, columns in ((layout.gate_summary, others.summary, summary, GATE_SUMMARY_COLUMNS),
                                     (layout.gate_routes, others.routes, routes, GATE_ROUTE_COLUMNS)):
        frames = [f.reindex(columns=columns) for f in (kept, new) if len(f)]
        table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
        write_atomically(path, lambda tmp, t=table: t.to_csv(tmp, index=False))
    text = json.dumps({"models": others.meta | {model: doc}}, indent=1, default=str)
    write_atomically(layout.gate_meta, lambda tmp: Path(tmp).write_text(text))
    return [layout.gate_summary, layout.gate_routes, layout.gate_meta]
