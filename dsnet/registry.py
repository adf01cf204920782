"""A registry of models by name (timm style).

``@register_model`` records a builder under its function name; ``create_model(name, **kwargs)``
builds it; ``list_models()`` lists the names. An unknown name or keyword raises ``ValueError``
naming the valid choices. The built-in models register themselves when ``dsnet.models`` is
imported, which ``import dsnet`` does: this module imports no model (models import it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

_MODELS: dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(name: str, **kwargs):
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(_MODELS))}") from None
    params = inspect.signature(builder).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"model {name!r} takes no argument(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(params)}")
    if "num_classes" in kwargs and (isinstance(kwargs["num_classes"], bool)
                                    or not isinstance(kwargs["num_classes"], int) or kwargs["num_classes"] < 1):
        raise ValueError(f"model {name!r}: num_classes must be a positive integer, got {kwargs['num_classes']!r}")
    model = builder(**kwargs)
    model.model_name = name
    return model
