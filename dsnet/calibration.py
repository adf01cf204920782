"""Split-BN re-calibration (DS-Net++ section 3.3, "Re-SBN").

``recalibrate_bn(model, loader, routes=None, max_batches=None)`` resets the running statistics of
every split BN and re-estimates them as a cumulative average over ``loader`` for each route in
``routes`` (default: all routes). A statistics slot shared by several routes (DS-ResNet: a stage's
layers serve every route with that stage ratio) averages over all of them. Weights are untouched.
``calibration_routes(model, k)``: every route when there are at most ``k``, else the routes whose
gates agree (every shared slot visited) and a seeded draw (DS-ResNet's 256 routes would cost 256
passes over the data; 32 give every shared slot several upstream contexts).

``reference_statistics(model)`` gives a randomly initialized model BN statistics estimated on
seeded random images, so that its outputs depend on the input and on the route (the harness's
reference weights: latency does not depend on trained values, but the check against eager needs
outputs that tell engines apart).
"""

from __future__ import annotations

import torch

from dsnet.layers import SplitBatchNorm2d


@torch.no_grad()
def recalibrate_bn(model, loader, routes=None, max_batches: int | None = None):
    bns = [m for m in model.modules() if isinstance(m, SplitBatchNorm2d)]
    if not bns:
        raise ValueError("model has no split batch norm to re-calibrate")
    routes = model.routes() if routes is None else [model.validate_route(r) for r in routes]
    previous_route, was_training = model.active_route, model.training
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    seen, device = 0, next(model.parameters()).device
    try:
        model.train()
        for route in routes:
            model.set_route(route)
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device, non_blocking=True))
                seen += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.set_route(previous_route)
        model.train(was_training)
    if seen == 0:
        raise ValueError("the data loader yielded no batch: nothing to re-calibrate with")
    return model


def calibration_routes(model, k: int = 32, seed: int = 0) -> list:
    """The routes :func:`recalibrate_bn` averages over: all of them when there are at most ``k``;
    else the routes whose gates all take the same choice (smallest and largest among them: every
    shared slot is visited) and a seeded draw from the rest, ``k`` in all, in ``model.routes()`` order."""
    routes = model.routes()
    if len(routes) <= k:
        return routes
    uniform = [i for i, r in enumerate(routes) if len(set(tuple(r))) == 1]
    rest = sorted(set(range(len(routes))) - set(uniform))
    g = torch.Generator().manual_seed(seed)
    drawn = [rest[j] for j in torch.randperm(len(rest), generator=g)[:max(0, k - len(uniform))].tolist()]
    return [routes[i] for i in sorted(uniform + drawn)]


@torch.no_grad()
def reference_statistics(model, input_size: int = 64, batches: int = 2, batch_size: int = 8, seed: int = 0):
    """Give a randomly initialized ``model`` batch-norm statistics under which activations survive.

    With the default initialization and unit running variance, every block shrinks its input
    (DS-MBNet's logits end up as the classifier bias: inputs and routes give the same output, and a
    check against eager cannot tell engines apart). Here every batch norm's statistics are
    estimated on seeded random images, so each layer's output is normalized to unit scale.
    Supernets are calibrated on the routes where every gate takes the same choice (they cover every
    statistics slot); weights are untouched. Returns ``model`` in eval mode.
    """
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch_size, 3, input_size, input_size, generator=g) for _ in range(batches)]
    gates = model.routing_space.gates
    if len(gates):
        top = max(len(gate) for gate in gates)
        routes = sorted({tuple(min(c, len(gate) - 1) for gate in gates) for c in range(top)})
        return recalibrate_bn(model, images, routes).eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    try:
        model.train()
        for x in images:
            model(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
    return model.eval()
