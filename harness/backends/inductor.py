"""``inductor``: ``torch.export`` + AOTInductor (a compiled shared library in a ``.pt2`` package)."""

from __future__ import annotations

import torch

from harness.backends.base import Backend, Engine, as_torch_outputs, cast, cuda_sync, input_caster


class InductorBackend(Backend):
    name = "inductor"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")
    graph_capturable = True
    artifact = "model.pt2"

    def unavailable(self, target):
        import shutil

        if target.device == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
            return "AOTInductor needs a C++ compiler (g++) on PATH"
        return None

    def _engine(self, runner, target, precision):
        def run(x):
            with torch.inference_mode():
                return runner(x)

        return Engine(run, prepare=input_caster(target, precision), to_torch=as_torch_outputs,
                      sync=cuda_sync(target))

    def compile(self, module, example, target, precision, artifact_dir):
        module, example = cast(module, example, target, precision)
        with torch.no_grad():
            program = torch.export.export(module, (example,))
            path = torch._inductor.aoti_compile_and_package(
                program, package_path=str(artifact_dir / self.artifact))
        return self._engine(torch._inductor.aoti_load_package(path), target, precision)

    def load(self, artifact_dir, example, target, precision):
        return self._engine(torch._inductor.aoti_load_package(str(artifact_dir / self.artifact)),
                            target, precision)
