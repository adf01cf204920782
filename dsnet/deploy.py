"""From a supernet to static networks: one route (``materialize``) or dynamic deployment (``split``).

Contract
--------
``materialize(model, route, fold_bn=False)`` returns a standalone eval-mode ``nn.Module`` that
computes ``model``'s eval output on ``route`` with contiguous copies of that route's weights and BN
statistics: no gate, no slicing, no storage shared with the supernet. ``fold_bn=True`` folds every
BN that follows a convolution into it.

``split(model)`` returns a :class:`DynamicPlan`: a ``head`` (fixed layers ending in the first
gate; returns ``(features, route_logits)``) and one dict per later segment, keyed by
``(incoming choice or None, chosen choice)``. A segment ending in a gate returns
``(features, route_logits)``; the last returns class logits. ``DynamicPlan.forward`` is the eager
reference of dynamic inference: argmax per gate, samples grouped by route.
"""

from __future__ import annotations

import torch
from torch import nn

from dsnet.gate import route_onehot
from dsnet.layers import fold_bn as _fold_conv_bn
from dsnet.routes import Route
from dsnet.supernet import Supernet, dispatch


def _check_model(model) -> Supernet:
    if not isinstance(model, Supernet):
        raise TypeError(f"expected a dsnet model (see dsnet.list_models()), got {type(model).__name__}")
    return model


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``BatchNorm2d`` that directly follows a ``Conv2d`` in ``module`` (in place).

    Pairs are found among consecutive children and attributes ``convN``/``bnN`` of a block.
    """
    children = list(module.named_children())
    for (name_a, a), (name_b, b) in zip(children, children[1:]):
        if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
            setattr(module, name_a, _fold_conv_bn(a, b))
            setattr(module, name_b, nn.Identity())
    for _, child in module.named_children():
        fold_batchnorm(child)
    return module


def _fold_named_pairs(module: nn.Module) -> None:
    # Blocks whose forward calls conv_x then bn_y in sequence but registers other modules between
    # them (e.g. conv_dw, bn1, act1, attn, conv_pw, bn2) are handled by name pairs.
    pairs = (("conv_dw", "bn1"), ("conv_pw", "bn2"), ("conv1", "bn1"), ("conv2", "bn2"),
             ("conv3", "bn3"), ("conv", "bn"))
    for m in module.modules():
        for c, b in pairs:
            conv, bn = getattr(m, c, None), getattr(m, b, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                setattr(m, c, _fold_conv_bn(conv, bn))
                setattr(m, b, nn.Identity())


def _finish(module: nn.Module, fold_bn: bool) -> nn.Module:
    if fold_bn:
        _fold_named_pairs(module)
        fold_batchnorm(module)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def materialize(model, route=None, fold_bn: bool = False) -> nn.Module:
    """A standalone static network computing ``model`` on ``route``."""
    model = _check_model(model)
    if route is None:
        if len(model.routing_space.gates):
            kind = "dynamic: name a route" if model.dynamic else "slimmable: name a switch"
            raise ValueError(f"{model.model_name or type(model).__name__} is {kind}; "
                             f"{model.routing_space.describe()}")
        route = Route(())
    route = model.validate_route(route)
    return _finish(model.static_sequence(route), fold_bn)


class DynamicPlan(nn.Module):
    """Pieces of dynamic deployment (see module docstring)."""

    def __init__(self, head: nn.Module, stages: list[dict[tuple, nn.Module]]):
        nn.Module.__init__(self)
        self.head = head
        self.stages = stages
        # Register the segments so .to(), .eval() and parameters() see them.
        self._segments = nn.ModuleDict({self.segment_name(k, key): m
                                        for k, seg in enumerate(stages) for key, m in seg.items()})

    @staticmethod
    def segment_name(k: int, key: tuple) -> str:
        prev, choice = key
        return f"s{k}_in{'x' if prev is None else prev}_c{choice}"

    def __len__(self) -> int:
        return 1 + sum(len(s) for s in self.stages)

    @torch.no_grad()
    def features_into(self, k: int, key: tuple, x: torch.Tensor) -> torch.Tensor:
        """The eager features that segment ``key`` of stage ``k`` takes when ``x`` runs down a route
        that reaches it (every earlier gate choosing ``key``'s incoming choice)."""
        feats, _ = self.head(x)
        prev = None
        for j in range(k):
            step = (prev, key[0])
            if step not in self.stages[j]:  # a restricted gate: another way to the same incoming choice
                step = next(s for s in self.stages[j] if s[0] == prev and (j < k - 1 or s[1] == key[0]))
            feats, _ = self.stages[j][step](feats)
            prev = step[1]
        return feats

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits, choices)`` with ``choices[i]`` the route of sample ``i``."""
        return dispatch_argmax(x, self.head, lambda k, key, f: self.stages[k][key](f), len(self.stages))


def dispatch_argmax(x: torch.Tensor, head, run_segment, n_stages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deployed dynamic inference: :func:`dsnet.supernet.dispatch` with argmax choices and segments
    ``run_segment(k, (prev, c), features)``. Returns ``(logits, choices)``, ``choices[i]`` the route
    of sample ``i``. Shared by :class:`DynamicPlan` and the harness's compiled dynamic engine."""
    out = dispatch(x, head, lambda k, key, f, _w: run_segment(k, key, f), n_stages,
                   lambda s: route_onehot(s, training=False))
    return out.logits, torch.stack([oh.argmax(-1) for oh in out.onehots], 1)


def split(model, fold_bn: bool = False) -> DynamicPlan:
    """The segments of ``model``'s dynamic deployment, each a static network."""
    model = _check_model(model)
    if not model.dynamic:
        raise ValueError(f"{model.model_name or type(model).__name__} has no gates to split at (a static "
                         "or slimmable network); use dsnet.materialize")
    head, stages = model.deployment_segments()
    _finish(head, fold_bn)
    for seg in stages:
        for m in seg.values():
            _finish(m, fold_bn)
    return DynamicPlan(head, stages).eval()
