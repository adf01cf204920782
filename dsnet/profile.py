"""MAdds and parameter counts of a route: analytic, and by forward hooks for cross-checking.

Contract
--------
``profile(model, route, input_size)`` computes MAdds and params analytically from the route (the
model describes its layers to a :class:`dsnet.supernet.CostCounter`; no tensors involved).
``count_by_hooks(module, input_size)`` runs one forward pass of a (materialized) module and counts
the same quantities from the layers that actually ran. The two agree exactly; the tests check it.
Convention (both): multiply-adds of Conv2d and Linear layers per image; params of the module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsnet.routes import Route


@dataclass(frozen=True)
class Profile:
    madds: int
    params: int


def profile(model, route=None, input_size: int = 224) -> Profile:
    if route is None:
        route = Route(())
    c = model.cost(route, input_size)
    return Profile(c.madds, c.params)


@torch.no_grad()
def count_by_hooks(module: nn.Module, input_size: int = 224) -> Profile:
    madds = 0

    def hook(m, inputs, output):
        nonlocal madds
        if isinstance(m, nn.Conv2d):
            per_out = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            madds += output[0].numel() * per_out
        elif isinstance(m, nn.Linear):  # once per token of a sequence (a transformer's), per image
            madds += output[0].numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was_training = module.training
        module.eval()
        module(torch.zeros(1, 3, input_size, input_size))
        module.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return Profile(madds, sum(p.numel() for p in module.parameters()))
