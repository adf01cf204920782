"""DS-Net++ Table 2 measured: one narrow route of a supernet run several ways, interleaved.

Contract
--------
``table2_ways(input_size, ratio, model)`` builds the networks of the table for ResNet-50 at
``ratio`` of its channels (0.25 in the paper), with the harness's reference weights
(:func:`harness.phases.static.reference_model`). ``model`` is the supernet that is sliced:
``s_resnet50``, the paper's "ResNet-50 with 25% channels" (the slimmable ResNet-50 at its 0.25
switch: every layer at 25%, the same architecture as the ideal network, so its ratios measure
slicing alone), or ``ds_resnet50`` (DS-ResNet's route at ratio 0.25 in every stage: full-width
stem, gates and attention heads, so its ratios also measure the architecture):

- ``full``: the supernet at its largest route (every channel computed);
- ``masking``: the supernet at the narrow route in ``mask`` mode (full width, unused channels zeroed);
- ``indexing``: ``index`` mode (the kept weights gathered with an index tensor at run time);
- ``slicing``: ``slice`` mode (weight views ``W[:c_out, :c_in]`` at run time);
- ``materialized``: ``dsnet.materialize`` of the narrow route (contiguous copies, same structure as
  the supernet's route: for DS-ResNet, attention heads and gates included);
- ``ideal``: the stand-alone ``resnet50`` at ``width_mult=ratio`` (the paper's ideal row).

``measure_table2(ctx, backend, precision, input_size, model, worker=None)`` puts each through the
pipeline (compiled, cached under the one artifact key, checked against its eager module; with a
:class:`~harness.measure.build_worker.BuildWorker` the worker builds from the back of the list
while this process goes from the front), times the ``ok``
ones in one :class:`~harness.measure.rounds.RoundPhase` (a fresh seeded order per round) and
stores one row per way in the store's dynamic table (``kind="table2"``), so a re-run skips what is
stored. Compiling a network
fixes its weights: a compiler may fold run-time slicing or indexing into constants, so on compiled
backends those rows measure what the compiler made of them, and the report says so.
"""

from __future__ import annotations

import dsnet
from harness.measure.build_worker import BuildWorker
from harness.measure.pipeline import image_batch, weights_fingerprint
from harness.phases.context import RunContext
from harness.phases.static import reference_model

TABLE2_MODELS = ("s_resnet50", "ds_resnet50")  # the paper's network first
TABLE2_WAYS = ("full", "masking", "indexing", "slicing", "materialized", "ideal")
EXEC_MODE = {"full": "slice", "masking": "mask", "indexing": "index", "slicing": "slice"}


def narrow_route(model, ratio: float):
    """The route running ResNet-50 at ``ratio`` of its channels: a slimmable network's switch, or
    DS-ResNet's route with that ratio at every gate."""
    if not model.dynamic:
        return model.switch(ratio)
    return model.routing_space.route_for(**{g.name: {"ratio": ratio} for g in model.routing_space.gates})


def table2_ways(input_size: int, ratio: float = 0.25, model: str = TABLE2_MODELS[0]) -> dict:
    """``{way: (module, route label, MAdds)}``; each supernet way owns its own copy of the weights."""
    import copy

    supernet = reference_model(model)
    narrow, largest = narrow_route(supernet, ratio), supernet.routes(input_size)[-1]
    ways = {}
    for way in ("full", "masking", "indexing", "slicing"):
        net = copy.deepcopy(supernet)
        route = largest if way == "full" else narrow
        net.set_route(route, EXEC_MODE[way])
        ways[way] = (net, str(route),
                     dsnet.profile(supernet, route, input_size).madds)
    ways["materialized"] = (dsnet.materialize(supernet, narrow), str(narrow),
                            dsnet.profile(supernet, narrow, input_size).madds)
    ideal = reference_model("resnet50", width_mult=ratio)
    ways["ideal"] = (dsnet.materialize(ideal), f"resnet50 x{ratio}", dsnet.profile(ideal, None, input_size).madds)
    return ways


def measure_table2(ctx: RunContext, backend: str, precision: str, input_size: int, model: str = TABLE2_MODELS[0],
                   progress=None, worker: BuildWorker | None = None) -> None:
    key = lambda way: (model, backend, precision, 1, input_size, "table2", way)
    done = ctx.store.dynamic_done()
    if all(key(w) in done for w in TABLE2_WAYS):
        return
    x = image_batch(1, input_size)
    base = {"model": model, "backend": backend, "precision": precision, "batch_size": 1,
            "input_size": input_size, "kind": "table2", "run_id": ctx.run_id}
    phase = ctx.round_phase(f"table2 {model} {backend} {precision}", seed=1)
    rows, ways = {}, table2_ways(input_size, model=model)
    # each way's trial (model, route, backend, precision, module, example, weights), its weights hashed
    # once: the worker's jobs and the trials below read the same tuple
    trials = [(model, f"table2-{way}", backend, precision, module, x, weights_fingerprint(module))
              for way, (module, _, _) in ways.items()]
    built = ctx.share_builds(worker, trials)
    for n, (way, (_, route, madds)) in enumerate(ways.items()):
        *trial, weights = trials[n]
        result = phase.add(way, ctx.trial(*trial, weights=weights, built=built(n)), ctx.timing(backend, x))
        rows[way] = base | {"name": way, "route": route, "madds": madds}
        if way not in phase:
            ctx.store.record_dynamic(rows[way] | result.row())
    for way, result in phase.measure().items():
        ctx.store.record_dynamic(rows[way] | result.row())
        if progress and result.ok:
            progress(f"table 2 {model} {backend} {way}", f"{result.measurement.stats.p50:.3f} ms")
