"""``torchscript``: ``torch.jit.trace`` + ``freeze`` + ``optimize_for_inference``.

TorchScript is deprecated in recent PyTorch (``torch.export`` + AOTInductor is its successor) but
still works; its deprecation warnings are silenced here. The artifact is the frozen trace:
``optimize_for_inference`` runs again on load, because a module saved after it does not load
("required keyword attribute 'value' is undefined").

A module with data-dependent control flow (the one-graph dynamic network) provides
``to_torchscript(example)`` and is compiled through it: tracing records only the branch the
example takes.
"""

from __future__ import annotations

import warnings

import torch

from harness.backends.base import Backend, DeviceTarget, Engine, cast, cuda_sync, input_caster


class TorchScriptBackend(Backend):
    name = "torchscript"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")
    graph_capturable = True
    artifact = "model.ts"
    one_artifact = True

    def _engine(self, scripted, target: DeviceTarget, precision):
        def run(x):
            with torch.inference_mode():
                return scripted(x)

        return Engine(run, prepare=input_caster(target, precision),
                      sync=cuda_sync(target))

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        module, example = cast(module, example, target, precision)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = module.to_torchscript(example) if hasattr(module, "to_torchscript") \
                else torch.jit.trace(module, example)
            frozen = torch.jit.freeze(scripted)
            torch.jit.save(frozen, str(artifact_dir / self.artifact))
            scripted = torch.jit.optimize_for_inference(frozen)
        return self._engine(scripted, target, precision)

    def load(self, artifact_dir, example, target: DeviceTarget, precision):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.load(str(artifact_dir / self.artifact),
                                    map_location="cuda" if target.device == "cuda" else "cpu")
            with torch.no_grad():
                scripted = torch.jit.optimize_for_inference(frozen)
        return self._engine(scripted, target, precision)
