"""The retrained gates timed as deployed: each gate's dynamic engine, checked, then all in one round phase.

Contract
--------
``measure_gates(ctx, settings, data, supernet, gates) -> {name: Measured}``: each retrained gate's
dynamic engine on ``settings.backend`` (``harness.deploy.engine``), checked against the eager
dynamic forward (logits and chosen routes) on the first validation images, then timed over the
validation images at batch 1 (each call one image, routed by the compiled gate through the deployed
path), every gate, the largest route (:func:`forced_largest`, through the same path) and the first
gate's engine a second time (:data:`REPEAT`, the noise floor) in one
:class:`~harness.measure.rounds.RoundPhase` (its drift stored). An engine that cannot be built or
checked is a :class:`Measured` with its error and no statistics. ``noise_floor(measured)`` is the
gap between the two timings of one engine.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import dsnet
from dsnet.gate import model_gates
from harness.deploy.engine import DynamicEngine, PartError, cycling
from harness.measure.pipeline import check_output
from harness.measure.protocol import Stats
from harness.phases.context import RunContext
from harness.phases.retraining.settings import Settings
from harness.phases.retraining.stages import Data, RetrainedGate, TrainedSupernet
from harness.results.layout import GATE_LARGEST as LARGEST

REPEAT = "repeat"  # measure_gates' second timing of one engine (the noise floor)


@dataclass(frozen=True)
class Measured:
    stats: Stats | None
    error: str = ""
    repeat_of: str | None = None  # the noise floor's entry: the gate whose engine it times again


@torch.no_grad()
def forced_largest(model, images: torch.Tensor):
    """A copy of ``model`` whose every gate chooses its last allowed choice (the largest route) on
    ``images``: what the deployed engine costs on the largest route, dispatch included. The bias
    on that choice is the least that wins on every image plus 1 (gate by gate, as the earlier
    choices shape the later gates' inputs), not a huge constant that would drown the scores'
    dependence on the input, which the check against eager needs to see."""
    m = copy.deepcopy(model).eval()
    m.set_route(None)
    for k, g in enumerate(model_gates(m)):
        g.score_bias.zero_()
        scores = m.forward_dynamic(images).scores[k][:, :g.num_allowed]
        last = g.num_allowed - 1
        others = scores[:, :last].amax(1) if last else scores[:, 0] - 1
        g.score_bias[last] = float((others - scores[:, last]).max().clamp_min(0)) + 1.0
    return m


def _checked_engine(ctx: RunContext, s: Settings, model, images: list, check_images: int):
    """``(engine, error)``: the gate's dynamic engine, checked on the first images, every segment the
    validation images reach compiled; the engine is None when it failed."""
    # parts differ between gates by their weights only (the head): one name per gate restriction
    # lets every gate share the compiled segments
    variant = f"{s.model}-gate-{'-'.join(str(g.num_allowed) for g in model_gates(model))}"
    try:
        engine = DynamicEngine(dsnet.split(model), ctx.backend(s.backend), ctx.target, "fp32",
                               ctx.layout.cache_dir, s.input_size, model_name=variant)
    except PartError as e:
        return None, str(e)
    with torch.no_grad():
        model.set_route(None)
        for x in images[:check_images]:
            out, choices = engine(x)
            ref = model.forward_dynamic(x)
            err = check_output(out, ref.logits, "fp32")
            if err is None and not torch.equal(choices, torch.stack([o.argmax(-1) for o in ref.onehots], 1)):
                err = f"route {choices.tolist()} differs from eager {[int(o.argmax()) for o in ref.onehots]}"
            if err:
                return None, err
        try:
            for x in images:  # compile every segment the validation set reaches before timing
                engine(x)
        except PartError as e:
            return None, str(e)
    return engine, ""


def measure_gates(ctx: RunContext, s: Settings, data: Data, supernet: TrainedSupernet,
                  gates: dict[str, RetrainedGate], check_images: int = 16) -> dict[str, Measured]:
    """See the module docstring."""
    images = [x[None] for x, _ in data.splits.val]
    # checked and timed from the models on the CPU (trained on a GPU, they are moved back: training
    # is over); each backend puts the compiled parts on the target's device itself
    supernet.model.cpu()
    for gate in gates.values():
        gate.model.cpu()
    phase = ctx.round_phase(f"gates {s.model} {s.backend}", seed=s.seed)
    results: dict[str, Measured] = {}
    repeat_of = None
    # context: the largest route through the same deployed path (a copy whose gates always choose it)
    timed = {**gates, LARGEST: RetrainedGate("largest", forced_largest(supernet.model, torch.cat(images)), {})}
    for name, gate in timed.items():
        engine, err = _checked_engine(ctx, s, gate.model, images, check_images)
        results[name] = Measured(None, err)
        if engine is None:
            continue
        native = [engine.head.prepare(x) for x in images]
        phase.add_call(name, cycling(engine.deployed, native))
        if repeat_of is None and name != LARGEST:  # the noise floor: the first gate's engine timed again
            phase.add_call(REPEAT, cycling(engine.deployed, native))
            repeat_of = name
    for name, r in phase.measure().items():
        results[name] = Measured(r.measurement.stats if r.ok else None, r.error,
                                 repeat_of if name == REPEAT else None)
    return results


def noise_floor(measured: dict) -> dict | None:
    """The same engine timed twice in the same rounds (:func:`measure_gates`): the gap between the
    two means is what no difference between gates can be told from."""
    again = measured.get(REPEAT)
    gate = again.repeat_of if again is not None else None
    first = measured.get(gate)
    if gate is None or again is None or again.stats is None or first is None or first.stats is None:
        return None
    a, b = first.stats.mean, again.stats.mean
    return {"gate": gate, "mean_ms": [a, b], "relative": abs(b - a) / a}
