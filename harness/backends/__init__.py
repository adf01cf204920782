"""Backends registered by name; each imports its heavy library only when used (TorchBench style).

``get_backend(name)`` returns a :class:`~harness.backends.base.Backend`; ``list_backends()`` the
names. Unknown names raise ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import importlib

from harness.backends.base import Backend, Engine, Failure, compile_engine

_REGISTRY = {
    "eager": "harness.backends.eager:EagerBackend",
    "noop": "harness.backends.eager:NoopBackend",
    "torchscript": "harness.backends.torchscript:TorchScriptBackend",
    "onnxruntime": "harness.backends.onnxruntime:OnnxRuntimeBackend",
    "tvm": "harness.backends.tvm:TVMBackend",
    "inductor": "harness.backends.inductor:InductorBackend",
    "tensorrt": "harness.backends.tensorrt:TensorRTBackend",
}


def list_backends() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str, **kwargs) -> Backend:
    try:
        module, cls = _REGISTRY[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend '{name}'; valid backends: {', '.join(_REGISTRY)}") from None
    return getattr(importlib.import_module(module), cls)(**kwargs)


__all__ = ["Backend", "Engine", "Failure", "compile_engine", "get_backend", "list_backends"]
