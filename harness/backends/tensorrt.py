"""``tensorrt``: torch-tensorrt, dynamo path, fp32 and fp16 (the ``tensorrt`` extra; GPU only).

torch-tensorrt fails at import without a GPU, so it is imported only here, after the probe. On the
dynamo path it ignores ``enabled_precisions`` for fp16, so the module and inputs are cast to half.
"""

from __future__ import annotations

import torch

from harness.backends.base import Backend, Engine, cast, input_caster


class TensorRTBackend(Backend):
    name = "tensorrt"
    devices = ("cuda",)
    precisions = ("fp32", "fp16")
    artifact = "model.ep"

    def unavailable(self, target):
        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU and this machine has none"
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as e:
            return f"torch-tensorrt is not importable ({type(e).__name__}: {e}); pip install -e '.[tensorrt]'"
        return None

    def _engine(self, trt_module, target, precision):
        def run(x):
            with torch.inference_mode():
                return trt_module(x)

        return Engine(run, prepare=input_caster(target, precision),
                      sync=torch.cuda.synchronize)

    def compile(self, module, example, target, precision, artifact_dir):
        import torch_tensorrt

        module, example = cast(module, example, target, precision)
        dtype = torch.half if precision == "fp16" else torch.float
        trt_module = torch_tensorrt.compile(module, ir="dynamo", inputs=[example],
                                            enabled_precisions={dtype})
        torch_tensorrt.save(trt_module, str(artifact_dir / self.artifact), inputs=[example])
        return self._engine(trt_module, target, precision)

    def load(self, artifact_dir, example, target, precision):
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops)

        return self._engine(torch.export.load(str(artifact_dir / self.artifact)).module(), target, precision)
