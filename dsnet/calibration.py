"""Split-BN re-calibration (DS-Net++ section 3.3, "Re-SBN").

``recalibrate_bn(model, loader, routes=None, max_batches=None)`` resets the running statistics of
every split BN and re-estimates them as a cumulative average over ``loader`` for each route in
``routes`` (default: all routes). A statistics slot shared by several routes (DS-ResNet: a stage's
layers serve every route with that stage ratio) averages over all of them. Weights are untouched.
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
    seen = 0
    try:
        model.train()
        for route in routes:
            model.set_route(route)
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images)
                seen += 1
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.set_route(previous_route)
        model.train(was_training)
    if seen == 0:
        raise ValueError("the data loader yielded no batch: nothing to re-calibrate with")
    return model
