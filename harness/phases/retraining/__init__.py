"""Gate retraining for real latency (``harness.retrain_gate`` is the CLI), one module per concern.

Flow (one direction): ``settings`` (what is asked, :func:`validate`, budgets) -> ``stages``
(:func:`load_splits`, :func:`stage1`: the supernet trained here or a checkpoint) -> ``costs``
(:func:`route_costs`: MAdds computed, deployed latency from the target's LUT, measured when
missing) -> ``stages`` (:func:`stage2` per penalty and budget, ``dsnet.training.train_gate``, then
calibrated to the budget) -> evaluation (``dsnet.training.evaluate_gate``) -> ``timing``
(:func:`measure_gates`: each retrained gate's dynamic engine checked and timed as deployed, all in
one round phase) -> ``results`` (:func:`store_outcome`: the files ``harness.reporting.gates``
renders). Every stage is cached in the workspace (``Layout.gate_workspace``), so an interrupted
run loses at most the stage it was in; a problem with the user's input is a
:class:`RetrainingError` (one line).
"""

from harness.phases.retraining.costs import route_costs
from harness.phases.retraining.results import Outcome, store_outcome
from harness.phases.retraining.settings import (
    Budget,
    RetrainingError,
    Settings,
    check_budgets,
    parse_budgets,
    validate,
)
from harness.phases.retraining.stages import (
    PENALTIES,
    Costs,
    Data,
    RetrainedGate,
    TrainedSupernet,
    gate_name,
    load_splits,
    route_accuracy,
    stage1,
    stage2,
)
from harness.phases.retraining.timing import REPEAT, Measured, forced_largest, measure_gates, noise_floor

__all__ = [
    "PENALTIES", "REPEAT", "Budget", "Costs", "Data", "Measured", "Outcome", "RetrainedGate", "RetrainingError",
    "Settings", "TrainedSupernet", "check_budgets", "forced_largest", "gate_name", "load_splits", "measure_gates",
    "noise_floor", "parse_budgets", "route_accuracy", "route_costs", "stage1", "stage2", "store_outcome", "validate",
]
