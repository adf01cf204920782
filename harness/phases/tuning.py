"""Tuning a target's TVM builds: every distinct task of the networks a run measures, one budget.

Contract
--------
:func:`tuning_modules` lists the networks TVM will build for ``models`` at ``input_size``: every
static workload (each route of a supernet, each width of a static model) and, where the run
measures the dynamic engine on TVM, every part of each supernet's dynamic engine (the head and each
segment, on the features the chain feeds it) and the widths of its static counterpart that Table
7's acceleration is measured against.
:func:`tuning_tasks` turns them into Relax and collects their distinct tasks; :func:`tune_tasks`
spends a budget on them (:func:`harness.backends.tvm_tuning.tune`) into the TVM backend's
database under the results folder, then reports how many tasks the database holds;
:func:`run_tuning` is the two in one, and notes in the database's ledger (``spent``) the budget
it spent on the tasks of one :func:`tuning_signature` (models, input size, the backend's settings,
the TVM target, the library versions and the ``dsnet`` sources): a later call with no larger a
budget would tune nothing, so it returns that note without the minutes of task extraction. Likewise
when the shipped records vouch for the run's :func:`task_signature` (``harness.tune --vouch``
checked that they cover every task and wrote it into their ``about.json``): beyond them there is
nothing to tune, and the run learns it without extracting. The TVM
backend applies that database to every later build (``harness.run``), so tuning is shared by all
routes and all phases. With ``beyond_shipped`` (``harness.run``'s tuning) the tasks the profile's
shipped records cover are left out: a fresh results folder builds from those records at once and
the run spends its budget only on what they lack; ``harness.tune`` tunes every task, shipped or
not, for this CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import dsnet
from harness.backends.tvm_tuning import SearchSettings, collect_tasks, tune
from harness.deploy.lut import route_segment_names
from harness.measure.pipeline import image_batch
from harness.phases.dynamic import ACCELERATION_WIDTHS
from harness.phases.static import reference_model, workloads
from harness.targets import Target


def tuning_modules(models: list[str], input_size: int,
                   dynamic: bool = True) -> Iterator[tuple[str, torch.nn.Module, torch.Tensor]]:
    """``(label, module, example input)`` for every network TVM builds for ``models`` (the dynamic
    engine's parts only with ``dynamic``)."""
    x = image_batch(1, input_size)
    for w in workloads(models, input_size):
        yield f"{w.model} {w.route}", w.build(), x
    for name in models if dynamic else ():
        if not dsnet.create_model(name).dynamic:
            continue
        counterpart = dsnet.static_counterpart(name)
        if counterpart and counterpart not in models:  # Table 7's acceleration builds its widths too
            for w in ACCELERATION_WIDTHS.values():
                yield f"{counterpart} x{w}", dsnet.materialize(reference_model(counterpart, width_mult=w)), x
        model = reference_model(name).eval()
        plan = dsnet.split(model)
        yield f"{name} head", plan.head, x
        seen = set()
        with torch.no_grad():
            head_feats = plan.head(x)[0]
            for route in model.routes(input_size):
                feats, prev = head_feats, None
                for k, (c, seg_name) in enumerate(zip(route, route_segment_names(route)[1:])):
                    segment = plan.stages[k][(prev, c)]
                    if seg_name not in seen:
                        seen.add(seg_name)
                        yield f"{name} {seg_name}", segment, feats
                    out = segment(feats)
                    feats, prev = (out[0] if isinstance(out, tuple) else out), c


def tuning_tasks(backend, target: Target, models: list[str], input_size: int,
                 progress_factory: Callable[[int, str], Callable[[str, str], None]] | None = None,
                 dynamic: bool | None = None) -> tuple[list, int]:
    """``(tasks, networks)``: the distinct MetaSchedule tasks of every network TVM builds for
    ``models`` on ``target`` (:func:`tuning_modules`; the dynamic engine's parts with ``dynamic``,
    by default when the profile measures it on TVM), and how many networks they came from."""

    mods, tvm_target = [], None
    modules = list(tuning_modules(models, input_size, _builds_dynamic(target, dynamic)))
    extract = progress_factory(len(modules), "tasks") if progress_factory else None
    for label, module, example in modules:
        mod, tvm_target = backend.relax_module(module, example, target, "fp32")
        mods.append(mod)
        if extract:
            extract(label, "extracted")
    return collect_tasks(mods, tvm_target), len(modules)


SPENT = "tasks not extracted again: this budget was spent on them before"
VOUCHED = ("tasks not extracted: the shipped records' about.json vouches that they cover every one of "
           "these networks' tasks, as the code and versions stand")


def _builds_dynamic(target: Target, dynamic: bool | None) -> bool:
    """Whether the run builds the dynamic engine's parts on TVM: ``dynamic`` when the run says
    (``harness.run --dynamic-backends``), else whether the profile's dynamic_backends hold TVM."""
    return "tvm" in (target.dynamic_backends or target.backends) if dynamic is None else dynamic


def _task_fields(backend, target: Target, models: list[str], input_size: int, dynamic: bool | None) -> dict:
    """What decides the tasks :func:`tuning_tasks` extracts, short of extracting them (the networks'
    code, the build settings, the library versions), leaving out the records and the host's CPU."""
    import tvm

    sources = hashlib.sha1()
    for path in sorted(Path(dsnet.__file__).parent.rglob("*.py")):
        sources.update(path.read_bytes())
    settings = {k: v for k, v in backend.cache_key().items() if k not in ("tuning_records", "shipped_records")}
    if isinstance(settings.get("target"), dict):  # the host's CPU ("mcpu": "auto" resolved) decides no task
        settings["target"] = {k: v for k, v in settings["target"].items() if k != "mcpu"}
    return {"models": sorted(models), "input_size": input_size, "dynamic": _builds_dynamic(target, dynamic),
            "backend": settings, "versions": [tvm.__version__, torch.__version__], "dsnet": sources.hexdigest()}


def _digest(key: dict) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_signature(backend, target: Target, models: list[str], input_size: int, dynamic: bool | None = None) -> str:
    """The tasks of ``models`` at ``input_size`` as a key (:func:`_task_fields`): what shipped records
    vouch for covering whole (``harness.tune --vouch``), so a run need not extract them to know."""
    return _digest(_task_fields(backend, target, models, input_size, dynamic))


def tuning_signature(backend, target: Target, models: list[str], input_size: int, dynamic: bool | None = None,
                     beyond_shipped: bool = False) -> str:
    """What decides the tasks :func:`tuning_tasks` would extract and which of them are tuned,
    short of extracting them."""
    key = _task_fields(backend, target, models, input_size, dynamic)
    key["backend"] = {k: v for k, v in backend.cache_key().items() if k != "tuning_records"}
    key["tvm_target"] = backend.tvm_target(target)
    if beyond_shipped:  # a budget spent on what the shipped records lack is not one spent on every task
        key["beyond_shipped"] = True
    return _digest(key)


def tune_tasks(backend, target: Target, tasks: list, budget_s: float,
               progress_factory: Callable[[int, str], Callable[[str, str], None]] | None = None,
               db=None, beyond=None) -> dict:
    """Spend ``budget_s`` seconds (in total over re-runs) tuning ``tasks`` into ``backend``'s
    database (its workdir; ``db`` when given) for ``target``, leaving out those ``beyond`` (a
    database: the shipped records) holds a record for; the tuning summary, the coverage of the
    tasks by either database (``tuned`` of ``tasks``) and how many ``beyond`` covers (``shipped``)."""

    db = db or backend.open_database(target)
    covered = {t.key for t in tasks if beyond is not None and beyond.best_ms(_mod(t)) is not None}
    search = SearchSettings()
    builder, runner = backend.search_builder_runner(search)
    summary = tune(db, [t for t in tasks if t.key not in covered], budget_s, search, builder, runner,
                   progress_factory)
    have = sum(1 for t in tasks if t.key in covered or db.best_ms(_mod(t)) is not None)
    return summary | {"tasks": len(tasks), "tuned": have, "shipped": len(covered), "database": str(db.directory)}


def _mod(task):
    """The workload a task's records are looked up by."""
    return task.extracted.dispatched[0]


def run_tuning(backend, target: Target, models: list[str], input_size: int, budget_s: float,
               progress_factory: Callable[[int, str], Callable[[str, str], None]] | None = None,
               dynamic: bool | None = None, beyond_shipped: bool = False,
               announce: Callable[[], None] | None = None) -> dict:
    """Tune the TVM tasks of ``models`` within ``budget_s`` seconds (in total over re-runs) with
    ``backend`` (the TVM backend, its workdir the database's folder) for ``target``: the summary
    of :func:`tune_tasks` and how many ``networks`` the tasks came from. ``dynamic``: whether the
    dynamic engine's parts are built on TVM (default: the profile's dynamic_backends say);
    ``beyond_shipped``: leave out the tasks the profile's applicable shipped records cover;
    ``announce``: called once before the tasks are extracted, never when the budget is already
    spent or the shipped records vouch for the run (nothing to say before the summary then)."""
    db = backend.open_database(target)
    why = db.foreign()  # refused before minutes of task extraction
    if why:
        raise ValueError(f"{why}: tune into another results folder, or move the folder away")
    shipped = backend.shipped(target) if beyond_shipped else None
    signature = tuning_signature(backend, target, models, input_size, dynamic, shipped is not None)
    spent = db.spent(signature)
    if spent and spent["budget_s"] >= budget_s:  # tune() would find the budget spent
        return {"tasks": spent["tasks"], "tuned": spent["tuned"], "shipped": spent.get("shipped", 0),
                "networks": spent["networks"], "tuned_now": 0, "trials_now": 0, "seconds_now": 0.0,
                "database": str(db.directory), "extracted": False}
    vouched = backend.shipped_vouch(task_signature(backend, target, models, input_size, dynamic)) \
        if shipped is not None else None
    if vouched:  # every task is the shipped records': beyond them there is nothing to tune
        n = vouched["tasks"]
        return {"tasks": n, "tuned": n, "shipped": n, "networks": vouched["networks"], "tuned_now": 0,
                "trials_now": 0, "seconds_now": 0.0, "database": str(db.directory), "extracted": False,
                "vouched": True}
    if announce is not None:
        announce()
    tasks, networks = tuning_tasks(backend, target, models, input_size, progress_factory, dynamic)
    summary = tune_tasks(backend, target, tasks, budget_s, progress_factory, db, shipped) | {"networks": networks}
    db.note_spent(signature, {"budget_s": budget_s, "tasks": summary["tasks"], "tuned": summary["tuned"],
                              "shipped": summary["shipped"], "networks": networks})
    return summary | {"extracted": True}


def vouch_shipped(backend, target: Target, models: list[str], input_size: int,
                  progress_factory: Callable[[int, str], Callable[[str, str], None]] | None = None) -> dict:
    """Extract the tasks of ``models`` at ``input_size`` (the dynamic engine's parts when the profile
    builds them on TVM), check that the profile's shipped records cover every one, and write so
    into their ``about.json`` (:meth:`~harness.backends.tvm_tuning.ShippedRecords.vouch`): the entry
    written. Raises ``ValueError`` (one line) when the records are refused here or miss a task."""
    shipped = backend.shipped(target)
    if shipped is None:
        raise ValueError(backend.shipped_refusal() or "the profile names no [tvm] shipped_records")
    tasks, networks = tuning_tasks(backend, target, models, input_size, progress_factory)
    missing = sum(1 for t in tasks if shipped.best_ms(_mod(t)) is None)
    if missing:
        raise ValueError(f"the shipped records miss {missing} of the {len(tasks)} tasks: not vouched "
                         "(tune them and ship again: python -m harness.tune --mcpu ... --ship ...)")
    entry = {"models": sorted(models), "input_size": input_size, "dynamic": _builds_dynamic(target, None),
             "signature": task_signature(backend, target, models, input_size), "tasks": len(tasks),
             "networks": networks}
    backend.shipped_records().vouch(entry)
    return entry

