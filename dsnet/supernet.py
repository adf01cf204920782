"""What every model of the registry shares: routes, static copies, and the analytic cost count.

Contract
--------
A model (``Supernet`` subclass; static baselines are supernets with an empty routing space)
provides:

- ``routing_space``: a :class:`dsnet.routes.RoutingSpace`;
- ``set_route(route, exec_mode="slice")``: configure every dynamic layer for ``route``; after it,
  ``forward`` runs that route. ``set_route(None)`` returns to dynamic routing: the gates decide.
- ``count(counter, route)``: describe the route's layers to a :class:`CostCounter`, which yields
  MAdds and params analytically, without tensors;
- ``static_sequence(route)``: the route as plain modules (used by ``dsnet.materialize``);
- ``deployment_segments()``: the pieces of dynamic deployment (used by ``dsnet.split``);
- ``forward_dynamic(x)`` (supernets whose ``dynamic`` is true): gate-driven inference, a
  :class:`DynamicOutput`. Slimmable networks have routes (switches) but no gate: not dynamic.

MAdds convention: multiply-adds of convolutions and fully connected layers (attention heads
included), per image; pooling, activations, normalization and the attention product are not
counted. Params: every parameter of the materialized route (BN affine included).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from dsnet.layers import DynamicDepth, _Dynamic, set_exec_mode
from dsnet.routes import Route, RoutingSpace


class DynamicOutput(NamedTuple):
    """What a supernet's gate-driven forward returns, per sample of the batch.

    ``logits``: class scores. ``onehots``: one ``(N, choices)`` route one-hot per gate (argmax in
    eval; straight-through Gumbel in training, so gradients reach the routing heads). ``scores``:
    each gate's routing-head logits (the SGS loss of stage II is a cross-entropy on them).
    """

    logits: torch.Tensor
    onehots: list[torch.Tensor]
    scores: list[torch.Tensor]


class Classifier(nn.Module):
    """Global average pool, flatten, then the fully connected layer ``fc``."""

    def __init__(self, fc: nn.Module):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def dispatch(x: torch.Tensor, head, run_segment, n_stages: int, decide, training: bool = False) -> DynamicOutput:
    """Route-grouped dynamic inference, the one implementation every dynamic forward uses.

    ``head(x) -> (features, scores)``; ``decide(scores)`` gives each sample's one-hot choice. At
    stage ``k`` every group of samples that chose ``c`` (after choosing ``prev`` at stage ``k-1``)
    runs ``run_segment(k, (prev, c), features, weight)``, which returns ``(features, scores)`` or,
    at the last stage, class logits. ``weight`` is the group's one-hot entry when ``training``
    (multiply by it so gradients reach the gate), else ``None``. Returns every sample's logits,
    one-hots and scores, in batch order."""
    n = x.shape[0]
    feats, scores = head(x)
    groups = [(torch.arange(n, device=feats.device), feats, scores, None)]
    onehots: list[torch.Tensor] = []
    all_scores: list[torch.Tensor] = []
    out = None
    for k in range(n_stages):
        new_groups = []
        stage_onehot = stage_scores = None
        for idx, f, s, prev in groups:
            oh = decide(s)
            if stage_onehot is None:
                stage_onehot, stage_scores = oh.new_zeros(n, oh.shape[1]), s.new_zeros(n, s.shape[1])
            stage_onehot, stage_scores = stage_onehot.index_copy(0, idx, oh), stage_scores.index_copy(0, idx, s)
            choice = oh.argmax(-1)
            for c in torch.unique(choice).tolist():
                sel = (choice == c).nonzero(as_tuple=True)[0]
                # the whole group on one choice (always so at batch 1): no gather, no copy of its features
                fs = f if len(sel) == len(idx) else f[sel].contiguous()
                y = run_segment(k, (prev, c), fs, oh[sel, c] if training else None)
                if k + 1 < n_stages:
                    new_groups.append((idx[sel], y[0], y[1], c))
                else:
                    out = y.new_zeros(n, y.shape[1]) if out is None else out
                    out = out.index_copy(0, idx[sel], y.to(out.dtype))
        onehots.append(stage_onehot)
        all_scores.append(stage_scores)
        groups = new_groups
    return DynamicOutput(out, onehots, all_scores)


def static_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with every dynamic layer replaced by its plain active slice.

    Parameters and buffers are cloned, so the copy shares no storage with the original.
    """
    if isinstance(module, DynamicDepth):  # only the blocks that run
        return nn.Sequential(*(static_copy(b) for b in module.active_blocks))
    if isinstance(module, _Dynamic) or hasattr(module, "to_static"):
        return module.to_static()
    new = copy.copy(module)
    new.__dict__ = dict(module.__dict__)
    new._modules = {k: (None if m is None else static_copy(m)) for k, m in module._modules.items()}
    new._parameters = {k: (None if p is None else nn.Parameter(p.detach().clone(), p.requires_grad))
                       for k, p in module._parameters.items()}
    new._buffers = {k: (None if b is None else b.detach().clone()) for k, b in module._buffers.items()}
    return new


@dataclass
class CostCounter:
    """Analytic MAdds and params of a network described layer by layer.

    Tracks the spatial size as layers with strides are added, starting at ``input_size``.
    """

    input_size: int
    madds: int = 0
    params: int = 0
    hw: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise ValueError(f"input_size must be a positive integer, got {self.input_size!r}")
        self.hw = (self.input_size, self.input_size)

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, depthwise: bool = False,
             bias: bool = False, bn: bool = True, groups: int = 1, padding: int | None = None) -> None:
        pad = k // 2 if padding is None else padding
        h, w = ((d + 2 * pad - k) // stride + 1 for d in self.hw)
        if h < 1 or w < 1:
            raise ValueError(f"input size {self.input_size} is too small for this network: a {k}x{k} convolution "
                             f"(stride {stride}) would see a {self.hw[0]}x{self.hw[1]} feature map and leave none")
        self.hw = (h, w)
        per_out = (1 if depthwise else cin // groups) * k * k
        self.madds += cout * h * w * per_out
        self.params += cout * per_out + (cout if bias else 0) + (2 * cout if bn else 0)

    def pool(self, k: int, stride: int, pad: int) -> None:
        hw = tuple((d + 2 * pad - k) // stride + 1 for d in self.hw)
        if min(hw) < 1:
            raise ValueError(f"input size {self.input_size} is too small for this network: a {k}x{k} pooling "
                             f"would see a {self.hw[0]}x{self.hw[1]} feature map and leave none")
        self.hw = hw  # type: ignore[assignment]

    def linear(self, cin: int, cout: int, bias: bool = True, tokens: int = 1) -> None:
        """A fully connected layer, applied to each of ``tokens`` vectors (a transformer's sequence)."""
        self.madds += tokens * cin * cout
        self.params += cin * cout + (cout if bias else 0)

    def attention(self, c: int, hidden: int) -> None:
        self.linear(c, hidden)
        self.linear(hidden, c)

    def branch(self) -> CostCounter:
        """A counter for a parallel branch (e.g. a projection shortcut) at the current size."""
        b = CostCounter(self.input_size)
        b.hw = self.hw
        return b

    def merge(self, branch: CostCounter) -> None:
        self.madds += branch.madds
        self.params += branch.params


class Supernet(nn.Module):
    """Base of every registered model."""

    routing_space: RoutingSpace
    model_name: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.active_route: Route | None = None

    @property
    def dynamic(self) -> bool:
        """Whether gates in the network pick the route per input (a slimmable network's switch is
        the deployer's pick: routes, but not dynamic)."""
        return bool(len(self.routing_space.gates))

    def init_for_training(self) -> None:
        """Re-initialize the weights stage I trains from scratch (default: PyTorch's, kept)."""

    # -- routes -------------------------------------------------------------------------------
    def routes(self, input_size: int = 224) -> list[Route]:
        """The routing space in increasing order of MAdds (ties keep choice order)."""
        return sorted(self.routing_space.all_routes(),
                      key=lambda r: (self.cost(r, input_size).madds, r.choices))

    def validate_route(self, route) -> Route:
        return self.routing_space.validate(route)

    def set_route(self, route, exec_mode: str = "slice") -> None:
        set_exec_mode(self, exec_mode)
        if route is None:
            self.active_route = None
            return
        route = self.validate_route(route)
        self._apply_route(route)
        self.active_route = route

    def _apply_route(self, route: Route) -> None:
        raise NotImplementedError

    def cost(self, route, input_size: int = 224) -> CostCounter:
        route = self.validate_route(route)
        counter = CostCounter(input_size)
        self.count(counter, route)
        return counter

    def count(self, counter: CostCounter, route: Route) -> None:
        raise NotImplementedError

    def route_widths(self, route) -> list[int]:
        """Output widths of the routed stages, in network order (``[]`` for a static model)."""
        return [w for o in self.routing_space.options(self.validate_route(route))
                for w in o["widths"]]

    # -- deployment ---------------------------------------------------------------------------
    def static_sequence(self, route: Route) -> nn.Module:
        raise NotImplementedError

    def deployment_segments(self):
        raise NotImplementedError

    @torch.no_grad()
    def _with_route(self, route, fn):
        """Run ``fn()`` with ``route`` active (slice mode), then restore the previous route."""
        previous = self.active_route
        modes = {id(m): m.exec_mode for m in self.modules() if isinstance(m, _Dynamic)}
        try:
            self.set_route(route)
            return fn()
        finally:
            if previous is not None:
                self._apply_route(previous)
            self.active_route = previous
            for m in self.modules():
                if isinstance(m, _Dynamic):
                    m.exec_mode = modes[id(m)]


class StaticNetwork(Supernet):
    """A static model: one network, no routes (an empty routing space), the baselines the dynamic
    ones are compared with. A subclass builds ``self.features`` (a sequence ending in the
    classifier) after ``super().__init__()`` and counts its layers in ``count``."""

    features: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self.routing_space = RoutingSpace(())
        self.active_route = Route(())

    def _apply_route(self, route: Route) -> None:
        pass  # nothing to configure: the one route is the network

    def forward(self, x):
        return self.features(x)

    def static_sequence(self, route: Route) -> nn.Module:
        return static_copy(self.features)
