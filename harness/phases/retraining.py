"""Gate retraining for real latency, as stages that return frozen values (``harness.retrain_gate`` is the CLI).

Flow (one direction): :func:`load_splits` -> :func:`stage1` (supernet trained here, or a
checkpoint) -> :func:`route_costs` (MAdds computed; latency from the target's LUT, measured here
when missing) -> :func:`stage2` per penalty (``dsnet.training.train_gate``) -> evaluation
(``dsnet.training.evaluate_gate``) -> :func:`measure_gates` (each retrained gate's dynamic engine
through the pipeline, checked against the eager dynamic forward, timed on the validation images
one per call, all gates interleaved) -> :func:`store_outcome` (the three files
``harness.reporting.gates`` renders).

With latency budgets (:func:`parse_budgets`: ``0.6x`` of the largest route's LUT latency, or ``3ms``)
stage II trains one gate per budget and penalty: the latency penalty toward the budget on the LUT,
the MAdds penalty toward the same fraction of the largest route's MAdds, at least the smallest
route's (what a MAdds-only user would pick for that budget); each gate is then calibrated
(``dsnet.training.calibrate_to_budget``, both penalties alike, on training images, never the
validation images it is evaluated on) so that its expected cost meets its own budget.

Every stage caches in the workspace (``Layout.gate_workspace``): ``supernet.pt``,
``gate-<penalty>-<backend>.pt``, the LUT store; a stage whose settings match is reused, so an
interrupted run loses at most the stage it was in. A problem with the user's input is a
:class:`RetrainingError` (one line).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

import dsnet
from harness.deploy.engine import DynamicEngine, PartError
from harness.deploy.lut import LatencyLUT, LUTError
from harness.measure.pipeline import check_output
from harness.measure.protocol import Stats, measure_interleaved
from harness.phases.context import RunContext
from harness.phases.dynamic import DynamicPhase
from harness.results.gates import previous_comparisons, store_comparison
from harness.results.layout import GATE_LARGEST as LARGEST
from harness.results.layout import Layout
from harness.results.store import StoreError

PENALTIES = ("madds", "latency")
REPEAT = "repeat"  # measure_gates' second timing of one engine (the noise floor)


class RetrainingError(ValueError):
    """A problem with the input of a retraining (one line)."""


@dataclass(frozen=True)
class Budget:
    """A latency budget: ``value`` times the largest route's latency (``unit`` "x") or in ms."""

    value: float
    unit: str  # "x" or "ms"

    @property
    def label(self) -> str:
        return f"{self.value:g}{self.unit}"

    def fraction(self, largest_ms: float) -> float:
        """The budget as a fraction of the largest route's latency ``largest_ms``."""
        return self.value if self.unit == "x" else self.value / largest_ms


def parse_budgets(text: str) -> tuple[Budget, ...]:
    """``"0.4x,0.6x"``, ``"3.0"`` or ``"3ms"`` (ms) -> budgets, in the given order; a bad item is a
    :class:`RetrainingError` naming it."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        unit = "x" if item.lower().endswith("x") else "ms"
        number = item[:-1] if unit == "x" else (item[:-2] if item.lower().endswith("ms") else item)
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise RetrainingError(f"--latency-budget: {item!r} is not a budget; give e.g. 0.6x (a fraction of the "
                                  "largest route's latency), 3.0 or 3ms")
        if unit == "x" and value > 1:
            raise RetrainingError(f"--latency-budget: {item} is more than the largest route's latency (1x)")
        out.append(Budget(value, unit))
    if len({b.label for b in out}) != len(out):
        raise RetrainingError(f"--latency-budget: {text} names a budget twice")
    return tuple(out)


def check_budgets(budgets, lut_ms, dispatch_ms: float = 0.0) -> None:
    """Every budget between the cheapest and the largest route's deployed latency (LUT plus the
    dispatcher's per-image overhead), else one line naming the feasible range."""
    largest, cheapest = max(lut_ms) + dispatch_ms, min(lut_ms) + dispatch_ms
    where = "on the LUT" + (f" plus {dispatch_ms:.3f} ms of dispatch" if dispatch_ms else "")
    for b in budgets:
        ms = b.fraction(largest) * largest
        if ms < cheapest * (1 - 1e-9):
            raise RetrainingError(f"latency budget {b.label} ({ms:.3f} ms) is below the smallest route's latency "
                                  f"{where}; the smallest feasible budget is {cheapest:.3f} ms "
                                  f"({cheapest / largest:.2f}x)")
        if ms > largest * (1 + 1e-9):
            raise RetrainingError(f"latency budget {b.label} is above the largest route's latency {where} "
                                  f"({largest:.3f} ms): every image fits it on the largest route")


@dataclass(frozen=True)
class Settings:
    """What the user asked for; ``layout`` is the results folder, ``workspace`` the stage cache."""

    model: str
    backend: str
    penalties: tuple[str, ...]
    data: str
    input_size: int
    layout: Layout
    checkpoint: Path | None = None
    lut: Path | None = None
    supernet_epochs: int = 10
    supernet_lr: float = 0.1
    gate_epochs: int = 6
    batch_size: int = 64
    lr: float = 0.05
    cp_weight: float = 0.5
    routes_upto: int | None = None
    latency_target: float | None = None  # ms
    latency_fraction: float | None = None  # of the largest route's LUT latency
    madds_target: float | None = None  # millions
    seed: int = 0
    budgets: tuple = ()  # Budget: one gate per budget and penalty, calibrated to it
    calibrate: bool = True  # with budgets: calibrate each gate's scores to its budget

    @property
    def workspace(self) -> Layout:
        data_tag = "digits" if self.data == "digits" else Path(self.data).name
        return self.layout.gate_workspace(self.model, data_tag, self.input_size)


@dataclass(frozen=True)
class Data:
    splits: object  # dsnet.data.Splits
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader

    @property
    def num_classes(self) -> int:
        return len(self.splits.classes)


@dataclass(frozen=True)
class Supernet:
    model: torch.nn.Module
    meta: dict


@dataclass(frozen=True)
class Costs:
    """Per-route MAdds and LUT latency (ms), routing-space order."""

    route_madds: tuple[int, ...]
    route_lut_ms: tuple[float, ...]
    dispatch_ms: float = 0.0  # the deployed engine's per-image cost beyond the LUT (dispatch_overhead)


@dataclass(frozen=True)
class RetrainedGate:
    penalty: str
    model: torch.nn.Module
    meta: dict


@dataclass(frozen=True)
class Measured:
    stats: Stats | None
    error: str = ""
    repeat_of: str | None = None  # the noise floor's entry: the gate whose engine it times again


@dataclass(frozen=True)
class Outcome:
    """Everything :func:`store_outcome` writes."""

    settings: Settings
    data: Data
    supernet: Supernet
    costs: Costs
    gates: dict[str, RetrainedGate]
    evaluations: dict  # penalty -> dsnet.training.GateEvaluation
    measured: dict[str, Measured]
    doc: dict = field(default_factory=dict)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def validate(s: Settings, target) -> None:
    """The checks that need no data or training: fail in seconds, not after stage I."""
    from harness.backends import get_backend, list_backends

    if s.model not in dsnet.list_models():
        raise RetrainingError(f"unknown model {s.model!r}; valid: {', '.join(dsnet.list_models())}")
    if not dsnet.create_model(s.model).dynamic:
        raise RetrainingError(f"model {s.model} has no gate to retrain (a static or slimmable network)")
    if s.backend not in list_backends():
        raise RetrainingError(f"unknown backend {s.backend!r}; valid: {', '.join(list_backends())}")
    why = get_backend(s.backend, target.options(s.backend)).unavailable(target)
    if why:
        raise RetrainingError(f"backend {s.backend} cannot run here: {why}")
    for name in ("supernet_epochs", "gate_epochs"):
        if getattr(s, name) < 1:
            raise RetrainingError(f"--{name.replace('_', '-')} must be at least 1")
    if s.batch_size < 2:
        raise RetrainingError(f"--batch-size must be at least 2 (batch norm trains on batch statistics), "
                              f"got {s.batch_size}")
    if not 32 <= s.input_size <= 4096:
        raise RetrainingError(f"--input-size must be between 32 and 4096, got {s.input_size}")
    for name, value, least in (("lr", s.lr, 0.0), ("supernet_lr", s.supernet_lr, 0.0), ("cp_weight", s.cp_weight, None),
                               ("latency_target", s.latency_target, 0.0), ("madds_target", s.madds_target, 0.0),
                               ("latency_fraction", s.latency_fraction, 0.0)):
        flag = f"--{name.replace('_', '-')}"
        if value is None:
            continue
        if not math.isfinite(value):
            raise RetrainingError(f"{flag} must be a finite number, got {value}")
        if least is None and value < 0:
            raise RetrainingError(f"{flag} must be at least 0, got {value}")
        if least is not None and value <= least:
            raise RetrainingError(f"{flag} must be greater than {least:g}, got {value}")
    if s.budgets and any(v is not None for v in (s.latency_target, s.latency_fraction, s.madds_target)):
        raise RetrainingError("--latency-budget sets both penalties' targets: leave out --latency-target, "
                              "--latency-fraction and --madds-target")
    if s.routes_upto is not None:
        try:
            from dsnet.training import restrict_routes

            restrict_routes(dsnet.create_model(s.model), s.routes_upto)
        except ValueError as e:
            raise RetrainingError(f"--routes-upto: {e}") from None
    if s.checkpoint is not None:
        _check_checkpoint(s.checkpoint)
    try:  # an unreadable stored comparison fails now, not after training
        previous_comparisons(s.layout, s.model)
    except StoreError as e:
        raise RetrainingError(str(e)) from None


def _check_checkpoint(path: Path) -> None:
    """A checkpoint that is missing or not a PyTorch file fails now, with a plain reason."""
    import zipfile

    if not path.is_file():
        raise RetrainingError(f"checkpoint {path} does not exist" if not path.exists() else
                              f"checkpoint {path} is not a file")
    if not zipfile.is_zipfile(path):
        raise RetrainingError(f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive)")


def load_splits(s: Settings) -> Data:
    from dsnet.data import DataError, load_data

    try:
        splits = load_data(s.data, s.input_size)
    except DataError as e:
        raise RetrainingError(str(e)) from None
    g = torch.Generator().manual_seed(s.seed)
    train = torch.utils.data.DataLoader(splits.train, batch_size=s.batch_size, shuffle=True, generator=g,
                                        drop_last=True)
    if len(train) == 0:
        raise RetrainingError(f"{len(splits.train)} training images are fewer than one batch of {s.batch_size}")
    return Data(splits, train, torch.utils.data.DataLoader(splits.val, batch_size=256))


def route_accuracy(model, route, loader) -> float:
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model._with_route(route, lambda x=x: model(x)).argmax(-1) == y).sum())
            n += len(y)
    return correct / max(1, n)


def stage1(s: Settings, data: Data, progress_factory) -> Supernet:
    """Stage I (sandwich rule, in-place distillation), or the given checkpoint; cached."""
    from dsnet.training import CheckpointError, load_checkpoint, save_checkpoint, train_supernet

    kwargs = {"num_classes": data.num_classes}
    if s.checkpoint is not None:
        try:
            model, _ = load_checkpoint(s.checkpoint)
        except CheckpointError as e:
            if "not a dsnet-harness checkpoint" not in str(e):
                raise RetrainingError(str(e)) from None
            model = dsnet.create_model(s.model, **kwargs)
            try:
                dsnet.load_official_state_dict(model, torch.load(s.checkpoint, map_location="cpu"))
            except ValueError as e2:
                raise RetrainingError(f"checkpoint {s.checkpoint}: {str(e2).splitlines()[0]}") from None
        if model.model_name != s.model:
            raise RetrainingError(f"checkpoint {s.checkpoint} holds {model.model_name}, not {s.model}")
        return Supernet(model.eval(), {"source": str(s.checkpoint)})
    settings = {"model": s.model, "data": data.splits.source, "input_size": s.input_size,
                "epochs": s.supernet_epochs, "batch_size": s.batch_size, "seed": s.seed, "lr": s.supernet_lr}
    path = s.workspace.root / "supernet.pt"
    if path.is_file():
        model, meta = load_checkpoint(path)
        if meta.get("settings") == settings:
            print(f"stage I: reusing {path}", file=sys.stderr)
            return Supernet(model, meta)
    torch.manual_seed(s.seed)
    model = dsnet.create_model(s.model, **kwargs)
    model.init_for_training()
    t0 = time.monotonic()
    train_supernet(model, data.train_loader, s.supernet_epochs, lr=s.supernet_lr, seed=s.seed,
                   progress=progress_factory(s.supernet_epochs * len(data.train_loader), "stage I"))
    acc = {label: route_accuracy(model, route, data.val_loader)
           for label, route in (("smallest", model.routes()[0]), ("largest", model.routes()[-1]))}
    meta = {"stage": "I", "settings": settings, "route_accuracy": acc, "train_s": round(time.monotonic() - t0, 1)}
    save_checkpoint(path, model, kwargs, **meta)
    print(f"stage I: {time.monotonic() - t0:.0f} s; val accuracy smallest route {acc['smallest']:.3f}, "
          f"largest {acc['largest']:.3f}; saved {path}", file=sys.stderr)
    return Supernet(model, meta)


def route_costs(s: Settings, data: Data, ctx: RunContext, progress_factory) -> Costs:
    """Per-route MAdds and LUT latency; the LUT from ``--lut`` or measured once in the workspace.
    A LUT that cannot price every route is a :class:`RetrainingError`."""
    # the architecture to price: latency does not depend on the weights; reference statistics make
    # the segments' outputs depend on their inputs, so the check against eager means something
    torch.manual_seed(s.seed)
    arch = dsnet.reference_statistics(dsnet.create_model(s.model, num_classes=data.num_classes))
    routes = arch.routing_space.all_routes()
    madds = tuple(dsnet.profile(arch, r, s.input_size).madds for r in routes)
    try:
        if s.lut is not None:
            lut = LatencyLUT.load(s.lut, s.backend, s.model, input_size=s.input_size)
        else:
            try:
                lut = LatencyLUT.from_frame(ctx.store.dynamic_frame(), s.model, s.backend, "fp32", 1, s.input_size,
                                            source=str(ctx.layout.store))
            except LUTError:
                print(f"LUT: measuring {s.model} segments on {s.backend} at {s.input_size}px (once; stored in "
                      f"{ctx.layout.root})", file=sys.stderr)
                try:
                    phase = DynamicPhase(ctx, s.model, s.backend, "fp32", s.input_size, model=arch)
                except PartError as e:
                    raise RetrainingError(f"the dynamic engine on {s.backend} cannot be built: {e}") from None
                phase.run(progress_factory(len(phase.plan), "LUT"), lut_only=True)
                ctx.store.export_dynamic(ctx.layout.dynamic_csv)
                lut = LatencyLUT.from_frame(ctx.store.dynamic_frame(), s.model, s.backend, "fp32", 1, s.input_size)
        costs = Costs(madds, tuple(lut.tensor(arch).tolist()))
    except LUTError as e:
        raise RetrainingError(str(e)) from None
    if s.budgets and s.calibrate:
        costs = Costs(madds, costs.route_lut_ms, dispatch_overhead(ctx, s, data, arch))
        print(f"dispatch overhead on {s.backend}: {costs.dispatch_ms:.3f} ms per image beyond the LUT "
              f"(largest route {costs.route_lut_ms[-1]:.3f} ms on the LUT)", file=sys.stderr)
    check_budgets(s.budgets, costs.route_lut_ms, costs.dispatch_ms)
    return costs


def gate_name(penalty: str, budget: Budget | None) -> str:
    """A retrained gate's name in the report: the penalty, and its budget in a sweep."""
    return penalty if budget is None else f"{penalty}@{budget.label}"


CALIBRATION_IMAGES = 512  # the first training images: what calibration decides on


def stage2(s: Settings, data: Data, supernet: Supernet, costs: Costs, penalty: str, progress_factory,
           budget: Budget | None = None) -> RetrainedGate:
    """Stage II with ``penalty`` on a copy of the supernet (toward ``budget`` when given, then
    calibrated to it when ``s.calibrate``); cached."""
    from dsnet.training import (
        ComplexityPenalty,
        LossWeights,
        calibrate_to_budget,
        load_checkpoint,
        restrict_routes,
        save_checkpoint,
        train_gate,
    )

    model = copy.deepcopy(supernet.model)
    try:
        restrict_routes(model, s.routes_upto)
    except ValueError as e:
        raise RetrainingError(f"--routes-upto: {e}") from None
    lut = torch.tensor(costs.route_lut_ms)
    # a budget is on the deployed latency, the LUT plus the dispatcher's per-image overhead (0 when
    # not calibrating); the latency penalty trains toward its LUT part
    deployed_largest = float(lut.max()) + costs.dispatch_ms
    fraction = None if budget is None else budget.fraction(deployed_largest)
    if budget is not None and penalty == "latency":
        cp = ComplexityPenalty.latency(lut, model, target_ms=max(fraction * deployed_largest - costs.dispatch_ms,
                                                                 float(lut.min())))
    elif penalty == "latency":
        cp = ComplexityPenalty.latency(lut, model, s.latency_target, s.latency_fraction)
    else:
        madds_target = None if s.madds_target is None else s.madds_target * 1e6
        if budget is not None:  # the same fraction of the largest route's MAdds (at least the smallest route's)
            madds_target = max(fraction * max(costs.route_madds), min(costs.route_madds))
        cp = ComplexityPenalty.madds(model, s.input_size, madds_target)
    calibrate = budget is not None and s.calibrate
    settings = {"penalty": penalty, "backend": s.backend, "epochs": s.gate_epochs, "lr": s.lr,
                "cp_weight": s.cp_weight, "routes_upto": s.routes_upto, "target": cp.target,
                "costs": _digest(cp.costs.tolist()), "seed": s.seed, "supernet": _digest(supernet.meta),
                "budget": None if budget is None else budget.label, "budget_fraction": fraction,
                "calibrated": calibrate, "dispatch_ms": round(costs.dispatch_ms, 4) if calibrate else None}
    suffix = "" if budget is None else f"-{budget.label}"
    path = s.workspace.root / f"gate-{penalty}-{s.backend}{suffix}.pt"
    if path.is_file():
        cached, meta = load_checkpoint(path)
        if meta.get("settings") == settings:
            print(f"stage II ({gate_name(penalty, budget)}): reusing {path}", file=sys.stderr)
            return RetrainedGate(penalty, cached, meta)
    t0 = time.monotonic()
    history = train_gate(model, data.train_loader, cp, s.gate_epochs, lr=s.lr, weights=LossWeights(cp=s.cp_weight),
                         seed=s.seed, progress=progress_factory(s.gate_epochs * len(data.train_loader),
                                                                f"stage II {penalty}"))
    meta = {"stage": "II", "settings": settings, "history": history, "train_s": round(time.monotonic() - t0, 1)}
    name = gate_name(penalty, budget)
    if calibrate:
        images = torch.stack([x for x, _ in (data.splits.train[i] for i in
                                             range(min(CALIBRATION_IMAGES, len(data.splits.train))))])
        try:
            # latency: the deployed cost, LUT plus the dispatcher's per-image overhead, against the budget's
            # fraction of the largest route's deployed cost; MAdds: what a MAdds-only user has
            extra = costs.dispatch_ms if penalty == "latency" else 0.0
            target = max(cp.target, float(cp.costs.min())) if penalty == "madds" else fraction * deployed_largest
            meta["calibration"] = calibrate_to_budget(model, images, cp.costs + extra, target) | {"overhead_ms": extra}
        except ValueError as e:
            raise RetrainingError(f"calibrating the {name} gate: {e}") from None
    save_checkpoint(path, model, {"num_classes": data.num_classes}, **meta)
    print(f"stage II ({name}): {meta['train_s']:.0f} s; saved {path}", file=sys.stderr)
    return RetrainedGate(penalty, model, meta)


@torch.no_grad()
def forced_largest(model, images: torch.Tensor):
    """A copy of ``model`` whose every gate chooses its last allowed choice (the largest route) on
    ``images``: what the deployed engine costs on the largest route, dispatcher included. The bias
    on that choice is the least that wins on every image plus 1 (gate by gate, as the earlier
    choices shape the later gates' inputs), not a huge constant that would drown the scores'
    dependence on the input, which the check against eager needs to see."""
    from dsnet.training import gates as gate_modules

    m = copy.deepcopy(model).eval()
    m.set_route(None)
    for k, g in enumerate(gate_modules(m)):
        g.score_bias.zero_()
        scores = m.forward_dynamic(images).scores[k][:, :g.num_allowed]
        last = g.num_allowed - 1
        others = scores[:, :last].amax(1) if last else scores[:, 0] - 1
        g.score_bias[last] = float((others - scores[:, last]).max().clamp_min(0)) + 1.0
    return m


def dispatch_overhead(ctx: RunContext, s: Settings, data: Data, arch, images: int = 64) -> float:
    """Per-image cost (ms) of the deployed dynamic engine beyond its LUT: the largest route through
    the dispatcher (``engine(x)``: head, argmax, grouping, segments; one validation image per call)
    against the sum of its parts, one call per sample, interleaved in one round phase. The budget
    calibration adds it to every route's LUT latency (a constant the LUT's ratios leave out).
    Measured once per backend and kept in the workspace (``dispatch-<backend>.json``)."""
    from harness.deploy.engine import chain_parts, in_context

    path = s.workspace.root / f"dispatch-{s.backend}.json"
    if path.is_file():
        try:
            return float(json.loads(path.read_text())["dispatch_ms"])
        except (ValueError, KeyError, TypeError):
            print(f"dispatch overhead: {path} unreadable, measuring again", file=sys.stderr)

    xs = [x[None] for x, _ in (data.splits.val[i] for i in range(min(images, len(data.splits.val))))]
    model = forced_largest(arch, torch.cat(xs))  # latency does not depend on the weights
    try:
        engine = DynamicEngine(dsnet.split(model), ctx.backend(s.backend), ctx.target, "fp32", ctx.layout.cache_dir,
                               s.input_size, model_name=f"{s.model}-dispatch")
    except PartError as e:
        raise RetrainingError(f"the dynamic engine on {s.backend} cannot be built: {e}") from None
    largest = model.routes(s.input_size)[-1]
    fns = chain_parts(engine, largest, xs[0])
    state = {"i": 0}

    def dispatched():
        state["i"] += 1
        return engine(xs[state["i"] % len(xs)])

    fns["dispatched"] = dispatched
    res = measure_interleaved(fns, in_context(ctx.protocol), ctx.timer())
    parts = sum(m.stats.p50 for k, m in res.items() if k != "dispatched")
    overhead = res["dispatched"].stats.p50 - parts
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dispatch_ms": overhead, "dispatched_ms": res["dispatched"].stats.p50,
                                "parts_ms": parts, "run_id": ctx.run_id}))
    return overhead


def measure_gates(ctx: RunContext, s: Settings, data: Data, supernet: Supernet, gates: dict[str, RetrainedGate],
                  check_images: int = 16) -> dict[str, Measured]:
    """Each retrained gate's dynamic engine on ``s.backend``: checked against the eager dynamic
    forward on ``check_images`` validation images, then timed over the validation images at batch 1
    (each call one image, dispatched by the compiled gate), all gates and the largest route
    interleaved in one round phase (a fresh seeded order per round; its drift stored)."""
    from dsnet.training import gates as gate_modules

    images = [x[None] for x, _ in data.splits.val]
    phase = ctx.round_phase(f"gates {s.model} {s.backend}", seed=s.seed)
    results: dict[str, Measured] = {}
    repeat_of = None
    # context: the largest route through the same dispatcher (a copy whose gates always choose it)
    timed = {**gates, LARGEST: RetrainedGate("largest", forced_largest(supernet.model, torch.cat(images)), {})}
    for name, gate in timed.items():
        model = gate.model
        # parts differ between gates by their weights only (the head): one name per gate restriction
        # lets every gate share the compiled segments
        variant = f"{s.model}-gate-{'-'.join(str(g.num_allowed) for g in gate_modules(model))}"
        try:
            engine = DynamicEngine(dsnet.split(model), ctx.backend(s.backend), ctx.target, "fp32",
                                   ctx.layout.cache_dir, s.input_size, model_name=variant)
        except PartError as e:
            results[name] = Measured(None, str(e))
            continue
        err = None
        with torch.no_grad():
            model.set_route(None)
            for x in images[:check_images]:
                out, choices = engine(x)
                ref = model.forward_dynamic(x)
                err = check_output(out, ref.logits, "fp32")
                if err is None and not torch.equal(choices, torch.stack([o.argmax(-1) for o in ref.onehots], 1)):
                    err = f"route {choices.tolist()} differs from eager {[int(o.argmax()) for o in ref.onehots]}"
                if err:
                    break
            if not err:
                for x in images:  # compile every segment the validation set reaches before timing
                    engine(x)
        results[name] = Measured(None, err or "")
        if err:
            continue
        state = {"i": 0}

        def call(engine=engine, state=state):
            x = images[state["i"] % len(images)]
            state["i"] += 1
            return engine(x)

        phase.add_call(name, call)
        if repeat_of is None and name != LARGEST:  # the noise floor: the first gate's engine timed again
            again = {"i": 0}
            phase.add_call(REPEAT, lambda engine=engine, state=again: call(engine, state))
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


def store_outcome(o: Outcome) -> list[Path]:
    """The three files the gate report is rendered from (columns from the layout)."""
    s, layout = o.settings, o.settings.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    base = {"model": s.model, "data": o.data.splits.source, "input_size": s.input_size, "backend": s.backend,
            "target": o.doc.get("target")}
    rows = []
    for penalty, e in o.evaluations.items():
        m = o.measured.get(penalty, Measured(None))
        st, gs = m.stats, o.gates[penalty].meta["settings"]
        rows.append(base | {
            "gate": penalty, "val_accuracy": e.accuracy, "n_val": e.n, "expected_madds": e.expected["madds"],
            "lut_ms": e.expected["lut_ms"], "measured_ms_mean": st.mean if st else None,
            "measured_ms_p50": st.p50 if st else None, "measured_n": st.n if st else None, "error": m.error,
            "cp_weight": gs["cp_weight"], "routes_upto": gs["routes_upto"], "cost_target": gs["target"],
            "gate_epochs": gs["epochs"], "train_s": o.gates[penalty].meta.get("train_s"),
            "penalty": gs["penalty"], "budget": gs.get("budget"), "budget_fraction": gs.get("budget_fraction"),
            "calibration_lambda": o.gates[penalty].meta.get("calibration", {}).get("lambda"),
            "measured_ms_ci_low": st.ci_low if st else None, "measured_ms_ci_high": st.ci_high if st else None})
    st = o.measured.get(LARGEST, Measured(None)).stats
    routes = o.supernet.model.routing_space.all_routes()
    if st is not None:
        rows.append(base | {"gate": LARGEST, "val_accuracy": o.doc["largest_route_accuracy"],
                            "n_val": len(o.data.splits.val), "expected_madds": o.costs.route_madds[-1],
                            "lut_ms": o.costs.route_lut_ms[-1], "measured_ms_mean": st.mean, "measured_ms_p50": st.p50,
                            "measured_n": st.n, "error": "", "route": str(routes[-1]),
                            "measured_ms_ci_low": st.ci_low, "measured_ms_ci_high": st.ci_high})
    route_rows = []
    for penalty, e in o.evaluations.items():
        for r, madds, lut in zip(routes, o.costs.route_madds, o.costs.route_lut_ms):
            c = e.route_counts[str(r)]
            route_rows.append(base | {"gate": penalty, "route": str(r),
                                      "widths": "/".join(map(str, o.supernet.model.route_widths(r))),
                                      "madds": madds, "lut_ms": lut, "count": c, "share": c / e.n})
    doc = o.doc | {"supernet": o.supernet.meta, "gates": {p: g.meta for p, g in o.gates.items()},
                   "noise_floor": noise_floor(o.measured)}
    return store_comparison(layout, s.model, pd.DataFrame(rows), pd.DataFrame(route_rows), doc)
