"""What each route costs: MAdds computed, deployed latency from the target's LUT (measured once when missing).

Contract
--------
``route_costs(settings, data, ctx, progress_factory) -> Costs``: per route of the model's routing
space (routing-space order) its MAdds (``dsnet.profile``) and its latency on the LUT of
``settings.backend``: from ``--lut`` (a results folder), else from the workspace's store, else
measured there once by the dynamic phase in LUT mode (``harness.phases.dynamic``: segments and the
dispatch cost in one round phase) and exported beside it. The LUT prices the deployed network:
segments plus one dispatch cost per gate (``harness.deploy.lut``); how it priced the dispatch, and
how far its prices hold (invalid segments and the routes priced from them, the prices' intervals,
the LUT's error against the deployed engine), are printed and kept (``Costs.lut_note``,
``Costs.lut_reliability``). A LUT that cannot price every route, an engine that cannot be
built, or a budget no route can meet is a :class:`RetrainingError`.
"""

from __future__ import annotations

import sys

import torch

import dsnet
from harness.deploy.engine import PartError
from harness.deploy.lut import LatencyLUT, LUTError
from harness.phases.context import RunContext
from harness.phases.dynamic import DynamicPhase
from harness.phases.retraining.settings import RetrainingError, Settings, check_budgets
from harness.phases.retraining.stages import Costs, Data


def _measured_lut(s: Settings, ctx: RunContext, arch, progress_factory) -> LatencyLUT:
    """The workspace's LUT, measured now when its store has none."""
    try:
        return LatencyLUT.from_frame(ctx.store.dynamic_frame(), s.model, s.backend, "fp32", 1, s.input_size,
                                     source=str(ctx.layout.store))
    except LUTError:
        pass
    print(f"LUT: measuring {s.model}'s segments and dispatch on {s.backend} at {s.input_size}px (once; stored in "
          f"{ctx.layout.root})", file=sys.stderr)
    try:
        phase = DynamicPhase(ctx, s.model, s.backend, "fp32", s.input_size, model=arch)
        phase.run(progress_factory(phase.steps(), "LUT"), lut_only=True)
    except PartError as e:
        raise RetrainingError(f"the dynamic engine on {s.backend} cannot be built: {e}") from None
    ctx.store.export_dynamic(ctx.layout.dynamic_csv)
    return LatencyLUT.from_frame(ctx.store.dynamic_frame(), s.model, s.backend, "fp32", 1, s.input_size)


def route_costs(s: Settings, data: Data, ctx: RunContext, progress_factory) -> Costs:
    """Per-route MAdds and deployed LUT latency (see the module docstring)."""
    # the architecture to price: latency does not depend on the weights; reference statistics make
    # the segments' outputs depend on their inputs, so the check against eager means something
    torch.manual_seed(s.seed)
    arch = dsnet.reference_statistics(dsnet.create_model(s.model, num_classes=data.num_classes))
    routes = arch.routing_space.all_routes()
    madds = tuple(dsnet.profile(arch, r, s.input_size).madds for r in routes)
    try:
        lut = LatencyLUT.load(s.lut, s.backend, s.model, input_size=s.input_size) if s.lut is not None \
            else _measured_lut(s, ctx, arch, progress_factory)
        costs = Costs(madds, tuple(lut.tensor(arch).tolist()), lut.dispatch_note, lut.reliability(arch).note())
    except LUTError as e:
        raise RetrainingError(str(e)) from None
    print(f"LUT {s.model}/{s.backend}: {lut.dispatch_note}", file=sys.stderr)
    print(f"LUT {s.model}/{s.backend}: {costs.lut_reliability}", file=sys.stderr)
    check_budgets(s.budgets, costs.route_lut_ms)
    return costs
