"""The two training stages of a gate retraining, each cached in the workspace.

Contract
--------
``load_splits(settings) -> Data`` (loaders of the training and validation images);
``stage1(settings, data, progress_factory) -> TrainedSupernet`` (the sandwich rule with in-place
distillation, ``dsnet.training.train_supernet``; or the checkpoint given, in the project's format or
the official DS-Net layout); ``stage2(settings, data, supernet, costs, penalty, progress_factory,
budget=None) -> RetrainedGate`` (``dsnet.training.train_gate`` with the MAdds or the LUT latency
penalty on a copy of the supernet; with a budget, the penalty's target follows it and the gate is
then calibrated to it, ``dsnet.training.calibrate_to_budget``, on training images, never on the
validation images it is evaluated on).

Every stage's result is a checkpoint in the workspace (``supernet.pt``,
``gate-<penalty>-<backend>[-<budget>].pt``) with the settings that made it: a stage whose settings
match is reused (:func:`_reused`, the one cache check), so an interrupted run loses at most the
stage it was in. A problem with the input is a :class:`RetrainingError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import dsnet
from dsnet.checkpoint import CheckpointError, ForeignCheckpoint, load_checkpoint, save_checkpoint
from dsnet.training import (
    ComplexityPenalty,
    LossWeights,
    calibrate_to_budget,
    restrict_routes,
    train_gate,
    train_supernet,
)
from harness.phases.retraining.settings import Budget, RetrainingError, Settings

PENALTIES = ("madds", "latency")
CALIBRATION_IMAGES = 512  # the first training images: what calibration decides on


@dataclass(frozen=True)
class Data:
    splits: object  # dsnet.data.Splits
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)


@dataclass(frozen=True)
class TrainedSupernet:
    """Stage I's supernet (eval mode) and how it was obtained."""

    model: torch.nn.Module
    meta: dict


@dataclass(frozen=True)
class RetrainedGate:
    """Stage II's model (the supernet with this penalty's gate) and how it was trained."""

    penalty: str
    model: torch.nn.Module
    meta: dict


@dataclass(frozen=True)
class Costs:
    """Per-route MAdds and deployed latency on the LUT (ms: segments plus dispatch), routing-space order."""

    route_madds: tuple[int, ...]
    route_lut_ms: tuple[float, ...]
    lut_note: str = ""  # how the LUT priced the dispatch (harness.deploy.lut.dispatch_cost)
    lut_reliability: str = ""  # how far its prices hold (harness.deploy.lut.LUTReliability.note)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _reused(path: Path, settings: dict, what: str):
    """``(model, meta)`` of the checkpoint at ``path`` when it was made with ``settings``, else None."""
    if not path.is_file():
        return None
    try:
        model, meta = load_checkpoint(path)
    except CheckpointError as e:  # e.g. half a file from a killed run's older version: trained again
        print(f"{what}: {path} unreadable ({e}); training again", file=sys.stderr)
        return None
    if meta.get("settings") != settings:
        return None
    print(f"{what}: reusing {path}", file=sys.stderr)
    return model, meta


def load_splits(s: Settings) -> Data:
    from dsnet.data import DataError, load_data  # scikit-learn's digits load on first use

    try:
        splits = load_data(s.data, s.input_size)
    except DataError as e:
        raise RetrainingError(str(e)) from None
    g = torch.Generator().manual_seed(s.seed)
    train = torch.utils.data.DataLoader(splits.train, batch_size=s.batch_size, shuffle=True, generator=g,
                                        drop_last=True)
    if len(train) == 0:
        raise RetrainingError(f"{len(splits.train)} training images are fewer than one batch of {s.batch_size}")
    return Data(splits, train, torch.utils.data.DataLoader(splits.val, batch_size=256))


def route_accuracy(model, route, loader) -> float:
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model._with_route(route, lambda x=x: model(x)).argmax(-1) == y).sum())
            n += len(y)
    return correct / max(1, n)


def _given_checkpoint(s: Settings, kwargs: dict) -> TrainedSupernet:
    """The supernet of ``--checkpoint``: the project's format, else the official DS-Net layout."""
    try:
        model, _ = load_checkpoint(s.checkpoint)
    except ForeignCheckpoint:
        model = dsnet.create_model(s.model, **kwargs)
        try:
            dsnet.load_official_state_dict(model, torch.load(s.checkpoint, map_location="cpu"))
        except ValueError as e:
            raise RetrainingError(f"checkpoint {s.checkpoint}: {str(e).splitlines()[0]}") from None
    except CheckpointError as e:
        raise RetrainingError(str(e)) from None
    if model.model_name != s.model:
        raise RetrainingError(f"checkpoint {s.checkpoint} holds {model.model_name}, not {s.model}")
    return TrainedSupernet(model.eval(), {"source": str(s.checkpoint)})


def stage1(s: Settings, data: Data, progress_factory) -> TrainedSupernet:
    """Stage I (sandwich rule, in-place distillation), or the given checkpoint; cached."""
    kwargs = {"num_classes": data.num_classes}
    if s.checkpoint is not None:
        return _given_checkpoint(s, kwargs)
    settings = {"model": s.model, "data": data.splits.source, "input_size": s.input_size,
                "epochs": s.supernet_epochs, "batch_size": s.batch_size, "seed": s.seed, "lr": s.supernet_lr}
    path = s.workspace.root / "supernet.pt"
    cached = _reused(path, settings, "stage I")
    if cached:
        return TrainedSupernet(*cached)
    torch.manual_seed(s.seed)
    model = dsnet.create_model(s.model, **kwargs)
    model.init_for_training()
    t0 = time.monotonic()
    train_supernet(model, data.train_loader, s.supernet_epochs, lr=s.supernet_lr, seed=s.seed,
                   progress=progress_factory(s.supernet_epochs * len(data.train_loader), "stage I"))
    acc = {label: route_accuracy(model, route, data.val_loader)
           for label, route in (("smallest", model.routes()[0]), ("largest", model.routes()[-1]))}
    meta = {"stage": "I", "settings": settings, "route_accuracy": acc, "train_s": round(time.monotonic() - t0, 1)}
    save_checkpoint(path, model, kwargs, **meta)
    print(f"stage I: {time.monotonic() - t0:.0f} s; val accuracy smallest route {acc['smallest']:.3f}, "
          f"largest {acc['largest']:.3f}; saved {path}", file=sys.stderr)
    return TrainedSupernet(model, meta)


def gate_name(penalty: str, budget: Budget | None) -> str:
    """A retrained gate's name in the report: the penalty, and its budget in a sweep."""
    return penalty if budget is None else f"{penalty}@{budget.label}"


def stage2(s: Settings, data: Data, supernet: TrainedSupernet, costs: Costs, penalty: str, progress_factory,
           budget: Budget | None = None) -> RetrainedGate:
    """Stage II with ``penalty`` on a copy of the supernet (toward ``budget`` when given, then
    calibrated to it when ``s.calibrate``); cached."""
    model = copy.deepcopy(supernet.model)
    try:
        restrict_routes(model, s.routes_upto)
    except ValueError as e:
        raise RetrainingError(f"--routes-upto: {e}") from None
    lut = torch.tensor(costs.route_lut_ms)
    largest = float(lut.max())  # the largest route's deployed latency on the LUT (dispatch included)
    fraction = None if budget is None else budget.fraction(largest)
    if budget is not None and penalty == "latency":
        cp = ComplexityPenalty.latency(lut, model, target_ms=max(fraction * largest, float(lut.min())))
    elif penalty == "latency":
        cp = ComplexityPenalty.latency(lut, model, s.latency_target, s.latency_fraction)
    else:
        madds_target = None if s.madds_target is None else s.madds_target * 1e6
        if budget is not None:  # the same fraction of the largest route's MAdds (at least the smallest route's)
            madds_target = max(fraction * max(costs.route_madds), min(costs.route_madds))
        cp = ComplexityPenalty.madds(model, s.input_size, madds_target)
    calibrate = budget is not None and s.calibrate
    settings = {"penalty": penalty, "backend": s.backend, "epochs": s.gate_epochs, "lr": s.lr,
                "cp_weight": s.cp_weight, "routes_upto": s.routes_upto, "target": cp.target,
                "costs": _digest(cp.costs.tolist()), "seed": s.seed, "supernet": _digest(supernet.meta),
                "budget": None if budget is None else budget.label, "budget_fraction": fraction,
                "calibrated": calibrate}
    suffix = "" if budget is None else f"-{budget.label}"
    path = s.workspace.root / f"gate-{penalty}-{s.backend}{suffix}.pt"
    name = gate_name(penalty, budget)
    cached = _reused(path, settings, f"stage II ({name})")
    if cached:
        return RetrainedGate(penalty, *cached)
    t0 = time.monotonic()
    history = train_gate(model, data.train_loader, cp, s.gate_epochs, lr=s.lr, weights=LossWeights(cp=s.cp_weight),
                         seed=s.seed, progress=progress_factory(s.gate_epochs * len(data.train_loader),
                                                                f"stage II {penalty}"))
    meta = {"stage": "II", "settings": settings, "history": history, "train_s": round(time.monotonic() - t0, 1)}
    if calibrate:
        images = torch.stack([x for x, _ in (data.splits.train[i] for i in
                                             range(min(CALIBRATION_IMAGES, len(data.splits.train))))])
        try:
            # latency: the deployed cost on the LUT against the budget's fraction of the largest route's;
            # MAdds: what a MAdds-only user has
            target = max(cp.target, float(cp.costs.min())) if penalty == "madds" else fraction * largest
            meta["calibration"] = calibrate_to_budget(model, images, cp.costs, target)
        except ValueError as e:
            raise RetrainingError(f"calibrating the {name} gate: {e}") from None
    save_checkpoint(path, model, {"num_classes": data.num_classes}, **meta)
    print(f"stage II ({name}): {meta['train_s']:.0f} s; saved {path}", file=sys.stderr)
    return RetrainedGate(penalty, model, meta)
