"""``tensorrt``: torch-tensorrt, dynamo path, fp32 and fp16 (the ``tensorrt`` extra; GPU only).

torch-tensorrt fails at import without a GPU, so it is imported only here, after the probe.
Precision is carried by the module and its inputs, not by a flag: TensorRT >= 10.12 builds strongly
typed networks (``use_explicit_typing``, torch-tensorrt's default, ``enabled_precisions``
deprecated) and TensorRT 11 drops weak typing, so an fp16 flag on an fp32 module silently builds
fp32. fp16 is therefore a half module with half inputs (``cast``); older torch-tensorrt without
``use_explicit_typing`` gets ``enabled_precisions`` as well. After the build the engine's output
dtype is checked against the precision asked for: an engine that is not what its row says fails.
"""

from __future__ import annotations

import torch

from harness.backends.base import Backend, DeviceTarget, Engine, cast, input_caster


class TensorRTBackend(Backend):
    name = "tensorrt"
    devices = ("cuda",)
    precisions = ("fp32", "fp16")
    graph_capturable = True
    artifact = "model.ep"

    def unavailable(self, target: DeviceTarget):
        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU and this machine has none"
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as e:
            return f"torch-tensorrt is not importable ({type(e).__name__}: {e}); pip install -e '.[tensorrt]'"
        return None

    def _engine(self, trt_module, target: DeviceTarget, precision):
        def run(x):
            with torch.inference_mode():
                return trt_module(x)

        return Engine(run, prepare=input_caster(target, precision),
                      sync=torch.cuda.synchronize)

    def compile(self, module, example, target: DeviceTarget, precision, artifact_dir):
        import torch_tensorrt

        module, example = cast(module, example, target, precision)
        dtype = torch.half if precision == "fp16" else torch.float
        settings = {"use_explicit_typing": True} if _has_setting("use_explicit_typing") \
            else {"enabled_precisions": {dtype}}
        trt_module = torch_tensorrt.compile(module, ir="dynamo", inputs=[example], **settings)
        with torch.inference_mode():
            out = trt_module(example)
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if o.dtype != dtype:
                raise RuntimeError(f"TensorRT built an engine with {o.dtype} outputs for {precision} "
                                   f"(expected {dtype}); not measured as {precision}")
        torch_tensorrt.save(trt_module, str(artifact_dir / self.artifact), inputs=[example])
        return self._engine(trt_module, target, precision)

    def load(self, artifact_dir, example, target: DeviceTarget, precision):
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops)

        return self._engine(torch.export.load(str(artifact_dir / self.artifact)).module(), target, precision)


def _has_setting(name: str) -> bool:
    """Whether the installed torch-tensorrt's compilation settings have ``name``."""
    try:
        from torch_tensorrt.dynamo import CompilationSettings

        return name in getattr(CompilationSettings, "__dataclass_fields__", {})
    except Exception:
        return False
