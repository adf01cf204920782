"""A registry of models by name (timm style).

``@register_model`` records a builder under its function name; ``create_model(name, **kwargs)``
builds it; ``list_models()`` lists the names. An unknown name or keyword raises ``ValueError``
naming the valid choices. ``@register_model(static_counterpart="mobilenet_v1")`` also declares
the static network a dynamic model is set against at equal MAdds (DS-Net++ Table 7: DS-MBNet
against MobileNetV1 x1.0 and x0.5); ``static_counterpart(name)`` returns it, or None. The
built-in models register themselves when ``dsnet.models`` is imported, which ``import dsnet``
does: this module imports no model (models import it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

_MODELS: dict[str, Callable] = {}
_STATIC_COUNTERPARTS: dict[str, str] = {}


def register_model(fn: Callable | None = None, *, static_counterpart: str | None = None):
    """``@register_model`` or ``@register_model(static_counterpart=name)`` (see the module docstring)."""

    def add(fn: Callable) -> Callable:
        if fn.__name__ in _MODELS:
            raise ValueError(f"model {fn.__name__!r} is already registered")
        _MODELS[fn.__name__] = fn
        if static_counterpart is not None:
            _STATIC_COUNTERPARTS[fn.__name__] = static_counterpart
        return fn

    return add(fn) if fn is not None else add


def static_counterpart(name: str) -> str | None:
    """The registered static network ``name`` is compared with at equal MAdds, or None."""
    return _STATIC_COUNTERPARTS.get(name)


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
