"""Backends registered by name; each imports its heavy library only when used (TorchBench style).

``get_backend(name, options=None, workdir=None, remote=None)`` returns a configured
:class:`~harness.backends.base.Backend` (its ``options`` are the profile's table of the same name,
checked and resolved by the backend); ``backend_class(name)`` the class without instantiating;
``list_backends()`` the names. Unknown names raise ``ValueError`` listing the valid ones.

A backend whose engines launch on torch's stream also comes as ``<name>+graphs``
(:data:`GRAPHS`): the same backend, the same artifacts (``Backend.base_name``), its static engines
timed as the replay of a captured CUDA graph (``Backend.cuda_graphs``), so one run holds both the
plain and the graph-replayed rows of each cell. ``base_name(name)`` strips the variant.
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


GRAPHS = "+graphs"
# the backends whose engines launch on torch's current stream (Backend.graph_capturable, checked by a test)
_GRAPH_CAPTURABLE = ("eager", "torchscript", "inductor", "tensorrt")


def list_backends() -> list[str]:
    return list(_REGISTRY) + [b + GRAPHS for b in _GRAPH_CAPTURABLE]


def base_name(name: str) -> str:
    """``name`` without its ``+graphs`` variant."""
    return name[:-len(GRAPHS)] if name.endswith(GRAPHS) else name


def backend_class(name: str) -> type[Backend]:
    try:
        module, cls = _REGISTRY[base_name(name)].split(":")
    except KeyError:
        raise ValueError(f"unknown backend '{name}'; valid backends: {', '.join(list_backends())}") from None
    if name.endswith(GRAPHS) and base_name(name) not in _GRAPH_CAPTURABLE:
        raise ValueError(f"unknown backend '{name}': {base_name(name)} launches on streams of its own, so a CUDA "
                         f"graph cannot capture its calls; valid backends: {', '.join(list_backends())}")
    return getattr(importlib.import_module(module), cls)


def get_backend(name: str, options: dict | None = None, workdir=None, remote=None) -> Backend:
    backend = backend_class(name)(options=options, workdir=workdir, remote=remote)
    if name.endswith(GRAPHS):
        backend.name, backend.cuda_graphs = name, True
    return backend


__all__ = ["GRAPHS", "Backend", "Engine", "backend_class", "base_name", "get_backend", "list_backends"]
