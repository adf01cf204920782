"""Routes: one choice per gate, and the routing space a supernet offers.

Contract
--------
A :class:`Route` is an immutable tuple of choice indices, one per gate, in the order of the
model's gates. What a choice *means* lives in the model's :class:`RoutingSpace`: each
:class:`GateSpec` names its options, and an option is a mapping of named dimensions
(``{"widths": (224, 736)}`` for DS-MBNet, ``{"ratio": 0.5, "widths": (512,)}`` for DS-ResNet:
``widths`` lists the output widths of the stages the gate controls; DS-Net++'s
compound routing adds keys such as ``kernel``, ``padding``, ``depth``, and DS-ViT++ ``embed_dim``,
``heads``, ``mlp_ratio``: new keys, same structure).

``RoutingSpace.validate(route)`` accepts a :class:`Route`, a sequence of ints, or a single int
(for one-gate models) and raises :class:`RouteError`, naming the valid choices, for anything
else.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class RouteError(ValueError):
    """A route outside a model's routing space, or a malformed one."""


@dataclass(frozen=True, order=True)
class Route:
    """One choice index per gate."""

    choices: tuple[int, ...]

    def __post_init__(self) -> None:
        try:  # operator.index accepts ints (and numpy/torch integers), never floats or strings
            choices = tuple(operator.index(c) for c in self.choices)
        except TypeError:
            raise RouteError(f"malformed route {self.choices!r}: choices are integer indices") from None
        object.__setattr__(self, "choices", choices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def __getitem__(self, i: int) -> int:
        return self.choices[i]

    def __str__(self) -> str:
        return "-".join(str(c) for c in self.choices)

    @classmethod
    def parse(cls, text: str) -> Route:
        """Inverse of ``str(route)``: ``"3"`` or ``"0-1-3-2"``."""
        try:
            return cls(tuple(int(p) for p in text.strip().split("-")))
        except ValueError:
            raise RouteError(f"malformed route {text!r}: expected choice indices joined by '-', "
                             "e.g. '3' or '0-1-3-2'") from None


@dataclass(frozen=True)
class GateSpec:
    """One gate: its name and the options its routing head chooses from."""

    name: str
    options: tuple[Mapping[str, Any], ...]

    def __len__(self) -> int:
        return len(self.options)


@dataclass(frozen=True)
class RoutingSpace:
    """The product of the gates' options (every combination is a route)."""

    gates: tuple[GateSpec, ...]

    def __len__(self) -> int:
        n = 1
        for g in self.gates:
            n *= len(g)
        return n

    def all_routes(self) -> list[Route]:
        """Every route, in lexicographic order of choices."""
        return [Route(c) for c in itertools.product(*(range(len(g)) for g in self.gates))]

    def describe(self) -> str:
        return "; ".join(f"gate {g.name!r}: choices 0..{len(g) - 1}" for g in self.gates)

    def validate(self, route: Route | Sequence[int] | int) -> Route:
        if isinstance(route, bool):
            raise RouteError(f"malformed route {route!r}; {self.describe()}")
        if isinstance(route, int):
            route = (route,)
        if isinstance(route, str):
            route = Route.parse(route)
        if not isinstance(route, Route):
            try:
                route = Route(tuple(route))
            except (TypeError, RouteError):
                raise RouteError(f"malformed route {route!r}: expected one choice index per gate; "
                                 f"{self.describe()}") from None
        if len(route) != len(self.gates):
            raise RouteError(f"route {route} has {len(route)} choice(s), the model has "
                             f"{len(self.gates)} gate(s); {self.describe()}")
        for gate, c in zip(self.gates, route):
            if not 0 <= c < len(gate):
                raise RouteError(f"route {route}: choice {c} is outside gate {gate.name!r}, valid "
                                 f"choices 0..{len(gate) - 1}; {self.describe()}")
        return route

    def options(self, route: Route) -> tuple[Mapping[str, Any], ...]:
        """The option chosen at each gate."""
        route = self.validate(route)
        return tuple(g.options[c] for g, c in zip(self.gates, route))

    def route_for(self, **per_gate: Any) -> Route:
        """The route whose options match, e.g. ``route_for(stage1={"ratio": 0.25}, ...)``."""
        choices = []
        for g in self.gates:
            want = per_gate.get(g.name)
            matches = [i for i, o in enumerate(g.options)
                       if want is not None and all(o.get(k) == v for k, v in want.items())]
            if len(matches) != 1:
                raise RouteError(f"no unique option of gate {g.name!r} matches {want!r}; options: "
                                 f"{[dict(o) for o in g.options]}")
            choices.append(matches[0])
        return Route(tuple(choices))


def spread(values: Sequence[Any], n: int) -> list:
    """``values`` spread over ``n`` routes in order: route ``i`` takes the value at the position
    nearest ``i / (n - 1)`` of the list (halves round up). DS-Net++ lists each dimension's
    candidates of a compound routing space but not which route takes which; this reading makes
    every dimension grow with the route index."""
    if n < 2:
        return [values[-1]] * n
    last = len(values) - 1
    return [values[(2 * i * last + (n - 1)) // (2 * (n - 1))] for i in range(n)]
