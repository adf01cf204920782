"""Backends registered by name; each imports its heavy library only when used (TorchBench style).

``get_backend(name, options=None, workdir=None, remote=None)`` returns a configured
:class:`~harness.backends.base.Backend` (its ``options`` are the profile's table of the same name,
checked and resolved by the backend); ``backend_class(name)`` the class without instantiating;
``list_backends()`` the names. Unknown names raise ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import importlib

from harness.backends.base import Backend, Engine

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


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = _REGISTRY[name].split(":")
    except KeyError:
        raise ValueError(f"unknown backend '{name}'; valid backends: {', '.join(_REGISTRY)}") from None
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, options: dict | None = None, workdir=None, remote=None) -> Backend:
    return backend_class(name)(options=options, workdir=workdir, remote=remote)


__all__ = ["Backend", "Engine", "backend_class", "get_backend", "list_backends"]
