"""What a backend is: a named compiler from a static ``nn.Module`` to a timed callable.

Contract
--------
A :class:`Backend` has a ``name``, the ``devices`` and ``precisions`` it supports, the schema of
its own profile table (``OPTIONS``: ``{key: (type, required)}``, checked when the profile loads)
and is built as ``Backend(options, workdir, remote)``: ``options`` the profile's table (resolved
by :meth:`Backend.resolve_options`), ``workdir`` a folder for state shared by all its artifacts
(a tuning database), ``remote`` an RPC tracker ``(host, port, key)`` for backends that build for
boards (``supports_remote``). A ``target`` below is a :class:`DeviceTarget` (what a backend
reads of a profile). It provides:

- ``unavailable(target) -> str | None``: why it cannot run for this target (library missing, no
  GPU, ...), or ``None``. Probing never raises.
- ``compile(module, example, target, precision, artifact_dir) -> Engine``: build an engine and
  write its artifact into ``artifact_dir`` (may raise; ``harness.measure.pipeline`` turns that
  into a failed result).
- ``load(artifact_dir, example, target, precision) -> Engine``: rebuild the engine from a cached
  artifact.
- ``export(...) -> Exported``: the artifact only, for a board (``supports_remote`` backends).
- ``cache_key()``: the options that change an artifact (part of the artifact key);
  ``details()``: the options that change a measured number (recorded with every result).

A backend never modifies the module it is given: :func:`cast` works on a copy.

An :class:`Engine` separates input preparation from the timed call: ``prepare(x)`` converts a
torch tensor to the backend's native input once, ``run(native)`` is what the protocol times, and
``to_torch(out)`` converts the output back: a tensor, or a tuple of tensors for a module with
several outputs (a deployment head returns features and route scores). Engines of one backend
chain without conversions: ``outputs(out)`` splits a native output into native values, each of
which another engine's ``run`` takes as its input, and ``choice(scores)`` is a gate's argmax on
native scores (defaults: tuples of torch tensors or NumPy arrays). A native output may be
overwritten by the engine's next call (``to_torch`` copies when so). ``details`` holds what
this compile did that changes a number (e.g. TVM: tasks tuned). Backends know nothing of DS-Net.
"""

from __future__ import annotations

import copy
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from harness.env import strict_fp32
from harness.schema import check_table


class DeviceTarget(Protocol):
    """What a backend reads of a target profile; :class:`harness.targets.Target` is one (the
    backends sit below the targets, so they name this shape rather than import the class)."""

    name: str
    device: str  # "cpu" or "cuda"
    threads: int


def one_line(exc: BaseException) -> str:
    """An exception as one line: type, message, and where it was raised."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    text = f"{type(exc).__name__}: {msg}{where}"
    return text if len(text) <= 500 else text[:497] + "..."


def exit_text(code: int | None) -> str:
    """How a child process ended, from its return code: ``killed by SIGSEGV``, ``exit code 1``."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def as_torch_outputs(outputs, convert: Callable[[Any], torch.Tensor] = lambda t: t):
    """One output -> a tensor; several (tuple, list, TVM Array) -> a tuple of tensors."""
    if isinstance(outputs, torch.Tensor) or hasattr(outputs, "numpy") and not isinstance(outputs, (list, tuple)):
        return convert(outputs)
    outs = tuple(convert(o) for o in outputs)
    return outs[0] if len(outs) == 1 else outs


def native_outputs(out) -> tuple:
    """An engine's native output as a tuple of its outputs (a module with one output: a 1-tuple)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def native_choice(scores) -> int:
    """The gate's decision on one image's native route scores (a torch tensor or a NumPy array):
    the index of the first largest score, as ``argmax``. Read as a Python list: right after a
    part's kernels the interpreter runs with cold caches, and ``tolist`` is one C call where a
    tensor's ``argmax`` and ``int`` are two trips through torch's dispatcher (the decision alone,
    timed between DS-MBNet's head and tail at 224, 200 shuffled rounds, AMD EPYC VM: this function
    on TorchScript's scores 48 -> 26 us, on ONNX Runtime's 30 -> 25 us; the bare ``tolist`` read on
    eager's 29 -> 15 us). NaN scores and more than one row go to ``argmax``, which ranks NaN highest."""
    values = scores.tolist()
    while isinstance(values, list) and len(values) == 1 and isinstance(values[0], list):
        values = values[0]  # (1, n) -> (n,)
    if not isinstance(values, list) or not values or isinstance(values[0], list):
        return int(scores.argmax())
    total = sum(values)
    if total != total:  # a NaN (or inf - inf): argmax's order
        return int(scores.argmax())
    return values.index(max(values))


class Engine:
    def __init__(self, run: Callable[[Any], Any], prepare: Callable[[torch.Tensor], Any] = lambda x: x,
                 to_torch: Callable[[Any], torch.Tensor] = lambda y: y, sync: Callable[[], None] | None = None,
                 details: dict | None = None, outputs: Callable[[Any], tuple] = native_outputs,
                 choice: Callable[[Any], int] = native_choice):
        self.run, self.prepare, self.to_torch, self.sync = run, prepare, to_torch, sync
        self.details = dict(details or {})
        # chaining engines of one backend in its own types (the dynamic engine's single-image path):
        # ``outputs(run(v))`` is a tuple of native values, each one the next engine's ``run`` takes
        # as it is; ``choice(scores)`` is the argmax of native route scores
        self.outputs, self.choice = outputs, choice

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.to_torch(self.run(self.prepare(x)))
        if self.sync:
            self.sync()
        return out


@dataclass(frozen=True)
class Exported:
    """An artifact built for another machine: its path and what the build did (``details``)."""

    path: Path
    details: dict = field(default_factory=dict)


class Backend:
    name: str = ""
    devices: tuple[str, ...] = ("cpu",)
    precisions: tuple[str, ...] = ("fp32",)
    artifact: str = ""  # file name inside the artifact directory ("" = nothing to cache)
    OPTIONS: dict[str, tuple] = {}  # the schema of the profile's [<name>] table
    PATH_OPTIONS: tuple[str, ...] = ()  # options that are paths, relative to the profile's folder
    supports_remote = False  # can build artifacts that run on a board behind an RPC tracker
    # its engines launch their CUDA work on torch's current stream, so a CUDA graph can capture a
    # call (TVM and ONNX Runtime launch on streams of their own)
    graph_capturable = False
    # can compile dsnet.one_graph's network (gate and every route, control flow in the graph) into one
    # artifact: harness.export writes it, the dynamic phase times it beside the Python dispatcher
    one_artifact = False
    # on a CPU its builds are fast only for the shapes its tuning covered (TVM: an untuned convolution
    # runs tens of times slower), so the dynamic phase leaves out shapes no tuning asked for (batch 8's)
    tuned_per_shape = False
    # on a CPU its builds run in the build worker's processes only, never in the process that times
    # (harness.measure.build_worker): measured on the AMD EPYC VM (2026-12-05), after four TVM builds
    # in the process DS-MBNet's ONNX Runtime parts chained cost +137..+169 us over their static
    # engines, against +68..+81 us when the worker built them (+7..+96 us with no build before)
    build_apart = False

    def __init__(self, options: dict | None = None, workdir: Path | None = None,
                 remote: tuple[str, int, str] | None = None):
        # the "+graphs" variant (harness.backends.get_backend) renames the instance and sets this:
        # its static engines are timed as the replay of a captured CUDA graph
        self.cuda_graphs = False
        options = dict(options or {})
        check_table(options, self.OPTIONS, f"[{self.name}] options")
        self.options = self.resolve_options(options)
        self.workdir = None if workdir is None else Path(workdir)
        self.remote = remote

    @property
    def base_name(self) -> str:
        """The backend's registered name: what names its artifacts and its profile table, the same
        for its ``+graphs`` variant."""
        return type(self).name

    def resolve_options(self, options: dict) -> dict:
        """``options`` with this machine's ``auto`` values filled in."""
        return options

    def cache_key(self) -> dict:
        """The options that change the artifact (part of its key)."""
        return {}

    def details(self) -> dict:
        """The options that change a measured number (stored with every result)."""
        return {}

    def unavailable(self, target: DeviceTarget) -> str | None:
        return None

    def unsupported(self, target: DeviceTarget, precision: str) -> str | None:
        """Why this backend cannot run ``precision`` on ``target``'s device, or None."""
        if target.device not in self.devices:
            return f"{self.name} does not run on {target.device}"
        if precision not in self.precisions:
            return f"{self.name} has no {precision} path (supports {', '.join(self.precisions)})"
        return None

    def notes(self, target: DeviceTarget) -> list[str]:
        """Caveats a reader of this backend's figures must know (printed under the summary)."""
        return []

    def compile(self, module: torch.nn.Module, example: torch.Tensor, target: DeviceTarget, precision: str,
                artifact_dir: Path) -> Engine:
        raise NotImplementedError

    def load(self, artifact_dir: Path, example: torch.Tensor, target: DeviceTarget, precision: str) -> Engine:
        raise NotImplementedError

    def export(self, module: torch.nn.Module, example: torch.Tensor, target: DeviceTarget, precision: str,
               artifact_dir: Path) -> Exported:
        raise NotImplementedError(f"{self.name} cannot build artifacts for a board")

    def check_export(self, target: DeviceTarget) -> None:
        """Raise a one-line error now when :meth:`export` cannot work for ``target`` (e.g. a
        missing cross compiler), before anything is built."""

    def has_artifact(self, artifact_dir: Path) -> bool:
        return bool(self.artifact) and (artifact_dir / self.artifact).is_file()

    def artifact_files(self, artifact_dir: Path) -> list[Path]:
        """Every file the artifact in ``artifact_dir`` is made of: ``artifact`` and any file it
        reads beside it (ONNX Runtime: the weights of a model too large for one file). All are
        signed after a build and checked before a load."""
        return [artifact_dir / self.artifact] if self.artifact else []

    def copy_artifact(self, artifact_dir: Path, out: Path) -> list[Path]:
        """Copy the artifact to ``out`` (a file path) with whatever it reads; returns the files written."""
        import shutil

        shutil.copyfile(artifact_dir / self.artifact, out)
        return [out]


def device_of(target) -> torch.device:
    return torch.device("cuda" if target.device == "cuda" else "cpu")


def cast(module: torch.nn.Module, example: torch.Tensor, target: DeviceTarget, precision: str,
         device: str | None = None):
    """A copy of the module and the input on ``device`` (default: the target's), in eval mode and
    the precision (fp16: half). The caller's module is never modified. On a GPU, TF32 is turned
    off (:func:`harness.env.strict_fp32`)."""
    dev = torch.device(device) if device else device_of(target)
    if dev.type == "cuda":
        strict_fp32()  # fp32 is fp32, not TF32 (also for callers that did not open the target)
    module, example = copy.deepcopy(module).to(dev).eval(), example.to(dev)
    if precision == "fp16":
        module, example = module.half(), example.half()
    return module, example


def input_caster(target: DeviceTarget, precision: str,
                 device: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``prepare`` for engines fed torch tensors: device and dtype of the compiled module."""
    dev = torch.device(device) if device else device_of(target)
    dtype = torch.half if precision == "fp16" else torch.float

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.to(dev, dtype).contiguous()

    return prepare


def cuda_sync(target: DeviceTarget) -> Callable[[], None] | None:
    return torch.cuda.synchronize if target.device == "cuda" else None


def capture_cuda_graph(call: Callable[[], Any], warmup: int = 3) -> tuple[Callable[[], None], Any]:
    """``call`` captured into a CUDA graph: ``(replay, output)``, where ``replay()`` re-runs the
    captured kernels on the same input and output memory (``output`` holds the result after each
    replay). Warm-up runs on a side stream first, as capture requires (cuBLAS/cuDNN workspaces and
    lazy initialisation happen outside the graph). Raises what the capture raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        output = call()
    torch.cuda.synchronize()
    return graph.replay, output
