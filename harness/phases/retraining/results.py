"""A gate retraining's outcome as the three files the gate report is rendered from.

Contract
--------
:class:`Outcome` holds everything a retraining produced; ``store_outcome(outcome)`` writes the
summary (one row per gate and the largest route, :data:`~harness.results.layout.GATE_SUMMARY_COLUMNS`),
the per-route histogram (:data:`~harness.results.layout.GATE_ROUTE_COLUMNS`) and the JSON document
(settings, training histories, noise floor) through ``harness.results.gates`` and returns their paths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.phases.retraining.settings import Settings
from harness.phases.retraining.stages import Costs, Data, RetrainedGate, TrainedSupernet
from harness.phases.retraining.timing import Measured, noise_floor
from harness.results.gates import store_comparison
from harness.results.layout import GATE_LARGEST as LARGEST


@dataclass(frozen=True)
class Outcome:
    """Everything :func:`store_outcome` writes."""

    settings: Settings
    data: Data
    supernet: TrainedSupernet
    costs: Costs
    gates: dict[str, RetrainedGate]
    evaluations: dict  # gate name -> dsnet.training.GateEvaluation
    measured: dict[str, Measured]
    doc: dict = field(default_factory=dict)


def _timing(m: Measured) -> dict:
    st = m.stats
    return {"measured_ms_mean": st.mean if st else None, "measured_ms_p50": st.p50 if st else None,
            "measured_n": st.n if st else None, "measured_ms_ci_low": st.ci_low if st else None,
            "measured_ms_ci_high": st.ci_high if st else None, "error": m.error}


def store_outcome(o: Outcome) -> list[Path]:
    """The three files the gate report is rendered from (columns from the layout)."""
    s, layout = o.settings, o.settings.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    base = {"model": s.model, "data": o.data.splits.source, "input_size": s.input_size, "backend": s.backend,
            "target": o.doc.get("target")}
    rows = []
    for name, e in o.evaluations.items():
        gs = o.gates[name].meta["settings"]
        rows.append(base | _timing(o.measured.get(name, Measured(None))) | {
            "gate": name, "val_accuracy": e.accuracy, "n_val": e.n, "expected_madds": e.expected["madds"],
            "lut_ms": e.expected["lut_ms"], "cp_weight": gs["cp_weight"], "routes_upto": gs["routes_upto"],
            "cost_target": gs["target"], "gate_epochs": gs["epochs"], "train_s": o.gates[name].meta.get("train_s"),
            "penalty": gs["penalty"], "budget": gs.get("budget"), "budget_fraction": gs.get("budget_fraction"),
            "calibration_lambda": o.gates[name].meta.get("calibration", {}).get("lambda")})
    routes = o.supernet.model.routing_space.all_routes()
    largest = o.measured.get(LARGEST, Measured(None))
    if largest.stats is not None:
        rows.append(base | _timing(largest) | {
            "gate": LARGEST, "val_accuracy": o.doc["largest_route_accuracy"], "n_val": len(o.data.splits.val),
            "expected_madds": o.costs.route_madds[-1], "lut_ms": o.costs.route_lut_ms[-1], "route": str(routes[-1])})
    route_rows = []
    for name, e in o.evaluations.items():
        for r, madds, lut in zip(routes, o.costs.route_madds, o.costs.route_lut_ms):
            c = e.route_counts[str(r)]
            route_rows.append(base | {"gate": name, "route": str(r),
                                      "widths": "/".join(map(str, o.supernet.model.route_widths(r))),
                                      "madds": madds, "lut_ms": lut, "count": c, "share": c / e.n})
    doc = o.doc | {"supernet": o.supernet.meta, "gates": {p: g.meta for p, g in o.gates.items()},
                   "noise_floor": noise_floor(o.measured)}
    return store_comparison(layout, s.model, pd.DataFrame(rows), pd.DataFrame(route_rows), doc)
