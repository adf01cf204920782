"""``inductor``: ``torch.export`` + AOTInductor (a compiled shared library in a ``.pt2`` package).

On a GPU a package is first loaded and run in a child process: on the H100 machines of this
project (torch 2.11 + CUDA 13) ``aoti_load_package`` crashed the process with a segmentation fault
in most loads, which would end a whole sweep. A package whose child crashes is a failed row with
the signal and the child's last line; one that runs there is loaded here.

On a CPU the build uses Inductor's ``freezing`` (PyTorch's AOTInductor documentation recommends it
there): the weights become constants, batch norm is folded into the convolutions and the weights
are prepacked. Measured on the AMD EPYC VM at 224 (2026-12-04, frozen over unfrozen in the same
rounds): DS-MBNet routes 0.71-0.79x the time, MobileNetV1 x1.0 0.65x, builds about as long. Without
it the CPU rows measured AOTInductor without batch-norm folding, which every other backend does.

On a CPU an image-shaped (4-d) input is also compiled and run in channels-last order
(:func:`channels_last`): Inductor computes convolutions in that order on a CPU, and a graph's
input and output keep the order they were traced with, so a part traced on contiguous features
turned them to channels-last on entry and its upstream part turned them back on exit. Measured on
the AMD EPYC VM at 224 (2026-12-05, 1000 shuffled rounds, paired): DS-MBNet's head then tail over
route 0's static engine +52 us (+44..+59) contiguous, +3 us (-6..+12) channels-last; the static
engine itself -4 us (-14..+4), no change.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness.backends.base import (
    Backend,
    DeviceTarget,
    Engine,
    as_torch_outputs,
    cast,
    cuda_sync,
    exit_text,
    input_caster,
)


class InductorBackend(Backend):
    name = "inductor"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")
    graph_capturable = True
    artifact = "model.pt2"
    one_artifact = True

    def cache_key(self):
        # CPU artifacts built before freezing, or before channels-last inputs, are rebuilt
        return {"cpu_freezing": True, "cpu_channels_last": True}

    @staticmethod
    def build_options(target: DeviceTarget) -> dict:
        """Inductor's options for ``target``'s build (see the module docstring)."""
        return {"freezing": True} if target.device == "cpu" else {}

    def unavailable(self, target: DeviceTarget):
        import shutil

        if target.device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            return "AOTInductor needs a C++ compiler (g++) on PATH"
        return None

    def _engine(self, runner, target: DeviceTarget, precision):
        call, layout = direct_call(runner), channels_last(target)
        caster = input_caster(target, precision)

        def run(x):  # the order it was compiled for: a no-op on an upstream part's output
            with torch.inference_mode():
                return call(layout(x))

        return Engine(run, prepare=lambda x: layout(caster(x)), to_torch=as_torch_outputs,
                      sync=cuda_sync(target))

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        module, example = cast(module, example, target, precision)
        example = channels_last(target)(example)
        options = self.build_options(target)
        with torch.no_grad():
            program = torch.export.export(module, (example,))
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=str(artifact_dir / self.artifact), inductor_configs=options)
        engine = self._engine(_load_package(path, example, target), target, precision)
        engine.details.update(options)  # kept with the artifact: a cached load says it too
        return engine

    def load(self, artifact_dir, example, target: DeviceTarget, precision):
        example = channels_last(target)(input_caster(target, precision)(example))  # as the engine runs it
        return self._engine(_load_package(str(artifact_dir / self.artifact), example, target), target, precision)


def channels_last(target: DeviceTarget):
    """The input order the engines for ``target`` are compiled for and run on: on a CPU a 4-d tensor
    in channels-last order (see the module docstring; ``contiguous`` returns a tensor already in it
    as it is), anything else as it comes."""
    if target.device != "cpu":
        return lambda x: x

    def layout(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

    return layout


def direct_call(runner):
    """``runner(x)`` for one input tensor with the package's call spec read once. The package's own
    ``__call__`` parses its input and output specs from JSON and flattens its arguments on every
    call: DS-MBNet's head then tail at 224, 200 shuffled rounds (AMD EPYC VM): 161 us less for the
    two calls (interquartile -313..-2 us), outputs equal. A package whose input is not one positional
    tensor, or a runner without the loader, keeps its own call."""
    import torch.utils._pytree as pytree

    loader = getattr(runner, "loader", None)
    run = getattr(loader, "boxed_run", None) or getattr(loader, "run", None)
    if run is None or not hasattr(loader, "get_call_spec"):
        return runner
    in_spec, out_spec = (pytree.treespec_loads(spec) for spec in loader.get_call_spec())
    if in_spec != pytree.tree_flatten(((torch.empty(0),), {}))[1]:
        return runner
    return lambda x: pytree.tree_unflatten(run([x]), out_spec)  # boxed: the list is the runner's to consume


_CHILD = """
import sys, torch
runner = torch._inductor.aoti_load_package(sys.argv[1])
with torch.inference_mode():
    runner(torch.load(sys.argv[2]))
torch.cuda.synchronize()
"""


def _load_package(path: str, example: torch.Tensor, target: DeviceTarget):
    """The package's runner; on a GPU only after a child process loaded and ran it (see the
    module docstring)."""
    if target.device == "cuda":
        with tempfile.TemporaryDirectory() as tmp:
            x = Path(tmp) / "x.pt"
            torch.save(example.detach(), x)
            child = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(x)], capture_output=True,
                                   text=True, timeout=600)
        rc = child.returncode
        if rc != 0:
            last = next((ln.strip() for ln in reversed(child.stderr.splitlines()) if ln.strip()), "")
            raise RuntimeError(f"AOTInductor's loader failed in a child process ({exit_text(rc)}): {last[:200]}; "
                               "not loaded in the measuring process")
    return torch._inductor.aoti_load_package(path)
