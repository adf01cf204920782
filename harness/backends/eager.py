"""``eager``: the module as PyTorch runs it (the reference every other engine is checked against)."""

from __future__ import annotations

import torch

from harness.backends.base import Backend, DeviceTarget, Engine, cast, cuda_sync, input_caster


class EagerBackend(Backend):
    name = "eager"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")
    graph_capturable = True

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        module, _ = cast(module, example, target, precision)

        def run(x):
            with torch.inference_mode():
                return module(x)

        return Engine(run, prepare=input_caster(target, precision),
                      sync=cuda_sync(target))


class NoopBackend(Backend):
    """``noop``: an engine that does no work; its latency is the harness's own overhead per call.

    It returns the output eager computed once at compile time, so it passes the output check like
    any engine while each timed call costs only the harness's call path.
    """

    name = "noop"
    devices = ("cpu", "cuda")
    precisions = ("fp32", "fp16")

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        module, example = cast(module, example, target, "fp32", device="cpu")
        with torch.inference_mode():
            answer = module(example)
        return Engine(lambda x: answer)
