"""What a gate retraining is asked for: the settings, latency budgets, and the checks that need no data.

Contract
--------
:class:`Settings` holds the user's request; ``validate(settings, target)`` fails in seconds (before
any data is read or any stage trains) with a :class:`RetrainingError` (one line) for anything it
can tell is wrong. ``parse_budgets("0.4x,3ms")`` reads ``--latency-budget`` into :class:`Budget` s
(a fraction of the largest route's deployed latency, or milliseconds); ``check_budgets(budgets,
lut_ms)`` refuses a budget outside what the routes can meet on the LUT (which prices the deployed
network, dispatch included: ``harness.deploy.lut``).
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import dsnet
from dsnet.training import restrict_routes
from harness.backends import get_backend, list_backends
from harness.deploy.lut import LatencyLUT, LUTError
from harness.results.gates import previous_comparisons
from harness.results.layout import Layout
from harness.results.store import StoreError
from harness.targets import Target


class RetrainingError(ValueError):
    """A problem with the input of a retraining (one line)."""


@dataclass(frozen=True)
class Budget:
    """A latency budget: ``value`` times the largest route's latency (``unit`` "x") or in ms."""

    value: float
    unit: str  # "x" or "ms"

    @property
    def label(self) -> str:
        return f"{self.value:g}{self.unit}"

    def fraction(self, largest_ms: float) -> float:
        """The budget as a fraction of the largest route's latency ``largest_ms``."""
        return self.value if self.unit == "x" else self.value / largest_ms


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``"0.4x,0.6x"``, ``"3.0"`` or ``"3ms"`` (ms) -> budgets, in the given order; a bad item is a
    :class:`RetrainingError` naming it."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        unit = "x" if item.lower().endswith("x") else "ms"
        number = item[:-1] if unit == "x" else (item[:-2] if item.lower().endswith("ms") else item)
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise RetrainingError(f"--latency-budget: {item!r} is not a budget; give e.g. 0.6x (a fraction of the "
                                  "largest route's latency), 3.0 or 3ms")
        if unit == "x" and value > 1:
            raise RetrainingError(f"--latency-budget: {item} is more than the largest route's latency (1x)")
        out.append(Budget(value, unit))
    if len({b.label for b in out}) != len(out):
        raise RetrainingError(f"--latency-budget: {text} names a budget twice")
    return tuple(out)


def check_budgets(budgets, lut_ms) -> None:
    """Every budget between the cheapest and the largest route's deployed latency on the LUT, else
    one line naming the feasible range."""
    largest, cheapest = max(lut_ms), min(lut_ms)
    for b in budgets:
        ms = b.fraction(largest) * largest
        if ms < cheapest * (1 - 1e-9):
            raise RetrainingError(f"latency budget {b.label} ({ms:.3f} ms) is below the smallest route's deployed "
                                  f"latency on the LUT; the smallest feasible budget is {cheapest:.3f} ms "
                                  f"({cheapest / largest:.2f}x)")
        if ms > largest * (1 + 1e-9):
            raise RetrainingError(f"latency budget {b.label} is above the largest route's deployed latency on the "
                                  f"LUT ({largest:.3f} ms): every image fits it on the largest route")


@dataclass(frozen=True)
class Settings:
    """What the user asked for; ``layout`` is the results folder, ``workspace`` the stage cache."""

    model: str
    backend: str
    penalties: tuple[str, ...]
    data: str
    input_size: int
    layout: Layout
    checkpoint: Path | None = None
    lut: Path | None = None
    supernet_epochs: int = 10
    supernet_lr: float = 0.1
    gate_epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    cp_weight: float = 0.5
    routes_upto: int | None = None
    latency_target: float | None = None  # ms
    latency_fraction: float | None = None  # of the largest route's LUT latency
    madds_target: float | None = None  # millions
    seed: int = 0
    budgets: tuple = ()  # Budget: one gate per budget and penalty, calibrated to it
    calibrate: bool = True  # with budgets: calibrate each gate's scores to its budget
    workers: int | None = None  # DataLoader workers (None: 4 for an image folder, 0 for the in-memory digits)
    device: str = "cpu"  # where both stages train: the target's device ("cuda": the rank's GPU)
    amp: bool = False  # mixed precision (dsnet.training.MixedPrecision)

    @property
    def loader_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return 0 if self.data in ("digits", "digits-hard") else min(4, os.cpu_count() or 1)

    @property
    def workspace(self) -> Layout:
        data_tag = "digits" if self.data == "digits" else Path(self.data).name
        return self.layout.gate_workspace(self.model, data_tag, self.input_size)


def validate(s: Settings, target: Target) -> None:
    """The checks that need no data or training: fail in seconds, not after stage I."""

    if s.model not in dsnet.list_models():
        raise RetrainingError(f"unknown model {s.model!r}; valid: {', '.join(dsnet.list_models())}")
    if not dsnet.create_model(s.model).dynamic:
        raise RetrainingError(f"model {s.model} has no gate to retrain (a static or slimmable network)")
    if s.backend not in list_backends():
        raise RetrainingError(f"unknown backend {s.backend!r}; valid: {', '.join(list_backends())}")
    why = get_backend(s.backend, target.options(s.backend)).unavailable(target)
    if why:
        raise RetrainingError(f"backend {s.backend} cannot run here: {why}")
    if s.workers is not None and s.workers < 0:
        raise RetrainingError(f"--workers must be at least 0, got {s.workers}")
    for name in ("supernet_epochs", "gate_epochs"):
        if getattr(s, name) < 1:
            raise RetrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if s.batch_size < 2:
        raise RetrainingError(f"--batch-size must be at least 2 (batch norm trains on batch statistics), "
                              f"got {s.batch_size}")
    if not 32 <= s.input_size <= 4096:
        raise RetrainingError(f"--input-size must be between 32 and 4096, got {s.input_size}")
    for name, value, least in (("lr", s.lr, 0.0), ("supernet_lr", s.supernet_lr, 0.0), ("cp_weight", s.cp_weight, None),
                               ("latency_target", s.latency_target, 0.0), ("madds_target", s.madds_target, 0.0),
                               ("latency_fraction", s.latency_fraction, 0.0)):
        flag = f"--{name.replace('_', '-')}"
        if value is None:
            continue
        if not math.isfinite(value):
            raise RetrainingError(f"{flag} must be a finite number, got {value}")
        if least is None and value < 0:
            raise RetrainingError(f"{flag} must be at least 0, got {value}")
        if least is not None and value <= least:
            raise RetrainingError(f"{flag} must be greater than {least:g}, got {value}")
    if s.latency_fraction is not None and s.latency_fraction > 1:
        raise RetrainingError(f"--latency-fraction is a fraction of the largest route's latency, in (0, 1]; "
                              f"got {s.latency_fraction}")
    if s.budgets and any(v is not None for v in (s.latency_target, s.latency_fraction, s.madds_target)):
        raise RetrainingError("--latency-budget sets both penalties' targets: leave out --latency-target, "
                              "--latency-fraction and --madds-target")
    if s.routes_upto is not None:
        try:
            restrict_routes(dsnet.create_model(s.model), s.routes_upto)
        except ValueError as e:
            raise RetrainingError(f"--routes-upto: {e}") from None
    if s.checkpoint is not None:
        _check_checkpoint(s.checkpoint)
    if s.lut is not None:  # a LUT from elsewhere is input: refused before the machine is probed (whose
        try:               # busy warning would come first) or any data is loaded
            LatencyLUT.load(s.lut, s.backend, s.model, input_size=s.input_size)
        except LUTError as e:
            raise RetrainingError(str(e)) from None
    try:  # an unreadable stored comparison fails now, not after training
        previous_comparisons(s.layout, s.model)
    except StoreError as e:
        raise RetrainingError(str(e)) from None


def _check_checkpoint(path: Path) -> None:
    """A checkpoint that is missing or not a PyTorch file fails now, with a plain reason."""
    if not path.is_file():
        raise RetrainingError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
    if not zipfile.is_zipfile(path):
        raise RetrainingError(f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive)")
