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
match is reused (:func:`_reused`, the one cache check). Between epochs a stage keeps its training
state beside it (``<name>.partial.pt``, :func:`dsnet.checkpoint.save_training_state`), so an
interrupted run loses at most the epoch it was in. Over several processes (``world``) every rank
trains and rank 0 alone reads and writes the workspace, handing what it read to the others. Both
stages train on ``settings.device`` (a CUDA target: the rank's GPU; checkpoints are read onto it and
written from it), with ``settings.amp`` in mixed precision. A problem with the input is a
:class:`RetrainingError`.
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
from dsnet.checkpoint import (
    CheckpointError,
    ForeignCheckpoint,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from dsnet.distributed import World, shard_loader, share
from dsnet.training import (
    ComplexityPenalty,
    LossWeights,
    calibrate_to_budget,
    device_of,
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


def load_splits(s: Settings, world: World | None = None) -> Data:
    """The training and validation loaders; over several processes the training loader gives each
    rank its share of every global batch of ``s.batch_size`` (``dsnet.distributed.shard_loader``)."""
    from dsnet.data import DataError, load_data  # scikit-learn's digits load on first use

    try:
        splits = load_data(s.data, s.input_size)
    except DataError as e:
        raise RetrainingError(str(e)) from None
    workers = {"num_workers": s.loader_workers, "pin_memory": torch.cuda.is_available()}
    if world is not None and world.distributed:
        train = shard_loader(splits.train, s.batch_size, world, s.seed, **workers)
    else:
        g = torch.Generator().manual_seed(s.seed)
        train = torch.utils.data.DataLoader(splits.train, batch_size=s.batch_size, shuffle=True, generator=g,
                                            drop_last=True, **workers)
    if len(train) == 0:
        raise RetrainingError(f"{len(splits.train)} training images are fewer than one batch of {s.batch_size}")
    return Data(splits, train, torch.utils.data.DataLoader(splits.val, batch_size=256, **workers))


def _shared_reuse(path: Path, settings: dict, what: str, world: World | None):
    """:func:`_reused` on rank 0 (the only process that reads the workspace), handed to every rank."""
    main = world is None or world.main
    return share(_reused(path, settings, what) if main else None, world)


def _resumable(path: Path, settings: dict, what: str, world: World | None):
    """``(resume, on_epoch)`` of a stage: the state a killed run left at ``path`` (read on rank 0,
    handed to every rank), and the callback that keeps each epoch's state there (written by rank 0)."""
    main = world is None or world.main
    resume = share(load_training_state(path, settings) if main else None, world)
    if resume is not None and main:
        print(f"{what}: resuming after epoch {resume['epoch']} from {path}", file=sys.stderr)

    def on_epoch(state: dict) -> None:
        if main:
            save_training_state(path, state, settings)

    return resume, on_epoch


def _amp(s: Settings) -> dict:
    """The settings entry of mixed precision: absent when off, so checkpoints trained before the
    option existed still match."""
    return {"amp": True} if s.amp else {}


def _size(world: World | None) -> int:
    return 1 if world is None else world.size


def _partial(path: Path) -> Path:
    """Where a stage keeps its state between epochs, beside its finished checkpoint."""
    return path.with_name(path.stem + ".partial.pt")


def route_accuracy(model, route, loader) -> float:
    model.eval()
    correct, n, device = 0, 0, device_of(model)
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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


def stage1(s: Settings, data: Data, progress_factory, world: World | None = None) -> TrainedSupernet:
    """Stage I (sandwich rule, in-place distillation), or the given checkpoint; cached, and resumed
    after the last complete epoch. Over several processes every rank trains (``world``); rank 0
    alone reads and writes the workspace and hands what it read to the others."""
    kwargs = {"num_classes": data.num_classes}
    main = world is None or world.main
    if s.checkpoint is not None:
        given = share(_given_checkpoint(s, kwargs) if main else None, world)
        return TrainedSupernet(given.model.to(s.device), given.meta)
    settings = {"model": s.model, "data": data.splits.source, "input_size": s.input_size,
                "epochs": s.supernet_epochs, "batch_size": s.batch_size, "seed": s.seed, "lr": s.supernet_lr,
                **_amp(s)}
    path = s.workspace.root / "supernet.pt"
    cached = _shared_reuse(path, settings, "stage I", world)
    if cached:
        model, meta = cached
        return TrainedSupernet(model.to(s.device), meta)
    torch.manual_seed(s.seed)
    model = dsnet.create_model(s.model, **kwargs)
    model.init_for_training()
    model.to(s.device)
    t0 = time.monotonic()
    resume, on_epoch = _resumable(_partial(path), settings, "stage I", world)
    train_supernet(model, data.train_loader, s.supernet_epochs, lr=s.supernet_lr, seed=s.seed,
                   progress=progress_factory(s.supernet_epochs * len(data.train_loader), "stage I") if main else None,
                   world=world, resume=resume, on_epoch=on_epoch, amp=s.amp)
    meta = {"stage": "I", "settings": settings, "train_s": round(time.monotonic() - t0, 1),
            "resumed_after_epoch": 0 if resume is None else resume["epoch"], "processes": _size(world)}
    if main:
        acc = {label: route_accuracy(model, route, data.val_loader)
               for label, route in (("smallest", model.routes()[0]), ("largest", model.routes()[-1]))}
        meta["route_accuracy"] = acc
        save_checkpoint(path, model, kwargs, **meta)
        _partial(path).unlink(missing_ok=True)
        print(f"stage I: {time.monotonic() - t0:.0f} s; val accuracy smallest route {acc['smallest']:.3f}, "
              f"largest {acc['largest']:.3f}; saved {path}", file=sys.stderr)
    return TrainedSupernet(model, meta)


def gate_name(penalty: str, budget: Budget | None) -> str:
    """A retrained gate's name in the report: the penalty, and its budget in a sweep."""
    return penalty if budget is None else f"{penalty}@{budget.label}"


def stage2(s: Settings, data: Data, supernet: TrainedSupernet, costs: Costs, penalty: str, progress_factory,
           budget: Budget | None = None, world: World | None = None) -> RetrainedGate:
    """Stage II with ``penalty`` on a copy of the supernet (toward ``budget`` when given, then
    calibrated to it when ``s.calibrate``); cached and resumed as :func:`stage1`. The calibration
    runs on rank 0 and its gate is handed to every rank."""
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
                "calibrated": calibrate, **_amp(s)}
    suffix = "" if budget is None else f"-{budget.label}"
    path = s.workspace.root / f"gate-{penalty}-{s.backend}{suffix}.pt"
    name = gate_name(penalty, budget)
    main = world is None or world.main
    cached = _shared_reuse(path, settings, f"stage II ({name})", world)
    if cached:
        model, meta = cached
        return RetrainedGate(penalty, model.to(s.device), meta)
    t0 = time.monotonic()
    resume, on_epoch = _resumable(_partial(path), settings, f"stage II ({name})", world)
    history = train_gate(model, data.train_loader, cp, s.gate_epochs, lr=s.lr, weights=LossWeights(cp=s.cp_weight),
                         seed=s.seed, progress=progress_factory(s.gate_epochs * len(data.train_loader),
                                                                f"stage II {penalty}") if main else None,
                         world=world, resume=resume, on_epoch=on_epoch, amp=s.amp)
    meta = {"stage": "II", "settings": settings, "history": history, "train_s": round(time.monotonic() - t0, 1),
            "resumed_after_epoch": 0 if resume is None else resume["epoch"], "processes": _size(world)}
    if not main:  # rank 0 calibrates and keeps the gate; every rank then holds the same
        return share(None, world)
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
    _partial(path).unlink(missing_ok=True)
    print(f"stage II ({name}): {meta['train_s']:.0f} s; saved {path}", file=sys.stderr)
    return share(RetrainedGate(penalty, model, meta), world)
