"""What a backend is: a named compiler from a static ``nn.Module`` to a timed callable.

Contract
--------
A :class:`Backend` has a ``name``, the ``devices`` and ``precisions`` it supports, and:

- ``unavailable(target) -> str | None``: why it cannot run for this target (library missing, no
  GPU, ...), or ``None``. Probing never raises.
- ``compile(module, example, target, precision, artifact_dir) -> Engine``: build an engine and
  write its artifact into ``artifact_dir`` (may raise: see :func:`compile_engine`).
- ``load(artifact_dir, example, target, precision) -> Engine``: rebuild the engine from a cached
  artifact (the harness caches artifacts by model, route, backend, target, shape and versions).

An :class:`Engine` separates input preparation from the timed call: ``prepare(x)`` converts a
torch tensor to the backend's native input once, ``run(native)`` is what the protocol times, and
``to_torch(out)`` converts the output back: a tensor, or a tuple of tensors for a module with
several outputs (a deployment head returns features and route scores). Backends know nothing of
DS-Net.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Failure:
    """A compile (or load) that did not produce an engine; ``error`` is one line."""

    stage: str
    error: str


def one_line(exc: BaseException) -> str:
    """An exception as one line: type, message, and where it was raised."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    text = f"{type(exc).__name__}: {msg}{where}"
    return text if len(text) <= 500 else text[:497] + "..."


def as_torch_outputs(outputs, convert: Callable[[Any], torch.Tensor] = lambda t: t):
    """One output -> a tensor; several (tuple, list, TVM Array) -> a tuple of tensors."""
    if isinstance(outputs, torch.Tensor) or hasattr(outputs, "numpy") and not isinstance(outputs, (list, tuple)):
        return convert(outputs)
    outs = tuple(convert(o) for o in outputs)
    return outs[0] if len(outs) == 1 else outs


class Engine:
    def __init__(self, run: Callable[[Any], Any], prepare: Callable[[torch.Tensor], Any] = lambda x: x,
                 to_torch: Callable[[Any], torch.Tensor] = lambda y: y, sync: Callable[[], None] | None = None):
        self.run, self.prepare, self.to_torch, self.sync = run, prepare, to_torch, sync

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.to_torch(self.run(self.prepare(x)))
        if self.sync:
            self.sync()
        return out


class Backend:
    name: str = ""
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    artifact: str = ""  # file name inside the artifact directory ("" = nothing to cache)

    def unavailable(self, target) -> str | None:
        return None

    def unsupported(self, target, precision: str) -> str | None:
        """Why this backend cannot run ``precision`` on ``target``'s device, or None."""
        if target.device not in self.devices:
            return f"{self.name} does not run on {target.device}"
        if precision not in self.precisions:
            return f"{self.name} has no {precision} path (supports {', '.join(self.precisions)})"
        return None

    def compile(self, module: torch.nn.Module, example: torch.Tensor, target, precision: str,
                artifact_dir: Path) -> Engine:
        raise NotImplementedError

    def load(self, artifact_dir: Path, example: torch.Tensor, target, precision: str) -> Engine:
        raise NotImplementedError

    def has_artifact(self, artifact_dir: Path) -> bool:
        return bool(self.artifact) and (artifact_dir / self.artifact).is_file()


def compile_engine(backend: Backend, module, example, target, precision, artifact_dir: Path) -> Engine | Failure:
    """Load a cached artifact or compile; any exception becomes a :class:`Failure` value."""
    artifact_dir.mkdir(parents=True, exist_ok=True)
    if backend.has_artifact(artifact_dir):
        try:
            return backend.load(artifact_dir, example, target, precision)
        except Exception:  # a stale or broken cache entry: rebuild it
            pass
    try:
        return backend.compile(module, example, target, precision, artifact_dir)
    except Exception as e:  # the sweep records the failure and goes on
        return Failure("compile", one_line(e))


def device_of(target) -> torch.device:
    return torch.device("cuda" if target.device == "cuda" else "cpu")


def cast(module: torch.nn.Module, example: torch.Tensor, target, precision: str,
         device: str | None = None):
    """Module and input on ``device`` (default: the target's), in the precision (fp16: half casting)."""
    dev = torch.device(device) if device else device_of(target)
    module, example = module.to(dev).eval(), example.to(dev)
    if precision == "fp16":
        module, example = module.half(), example.half()
    return module, example


def input_caster(target, precision: str, device: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``prepare`` for engines fed torch tensors: device and dtype of the compiled module."""
    dev = torch.device(device) if device else device_of(target)
    dtype = torch.half if precision == "fp16" else torch.float

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.to(dev, dtype).contiguous()

    return prepare


def cuda_sync(target) -> Callable[[], None] | None:
    return torch.cuda.synchronize if target.device == "cuda" else None
