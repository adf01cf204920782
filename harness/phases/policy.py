"""Which work a run does: the decisions ``harness.run`` takes from the profile and its options, kept
apart from the command so that the command only parses, orders the phases and reports.

Contract
--------
Every function takes the run's :class:`~harness.phases.context.RunContext` (or plain values); those
that leave something out fill a ``skipped`` dict with ``{backend or phase: why}``. None exits; only
the tuning prints (one line, before a long wait), its progress through a factory
``progress(total, description)``.

- :func:`quick_routes`: ``--quick``'s networks (smallest, middle and largest route of each
  supernet; x1.0 and x0.5 of the slimmable and static ones).
- :func:`static_tasks`: every workload x backend x precision x batch size the store lacks.
- :func:`dynamic_backends`: the backends the dynamic engine is measured on (named ones among the
  active, else the profile's ``dynamic_backends``); :func:`table2_models` the supernets of Table 2.
- :func:`dynamic_runs`: (model, backend, precision) of the dynamic phase and Table 2, the
  unsupported precisions left out.
- :func:`tune_before_measuring`: TVM tuned within the budget before any TVM build, so that every
  route applies one database; returns the run's notes with TVM's brought up to date.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import dsnet
from harness.backends.base import one_line
from harness.phases.context import RunContext
from harness.phases.static import Task, Workload
from harness.phases.table2 import TABLE2_MODELS
from harness.phases.tuning import SPENT, VOUCHED, run_tuning

ProgressFactory = Callable[[int, str], object]  # (total, description) -> a progress callback


def quick_routes(workloads: list[Workload]) -> list[Workload]:
    """``--quick``: the smallest, middle and largest route of each supernet; x1.0 and x0.5 of the
    slimmable and static models."""
    by_model: dict[str, list[Workload]] = {}
    for w in workloads:
        by_model.setdefault(w.model, []).append(w)
    keep = []
    for ws in by_model.values():
        if ws[0].route.startswith("x"):
            keep += [w for w in ws if w.route in ("x1.0", "x0.5")]
        else:
            keep += [ws[0], ws[len(ws) // 2], ws[-1]]
    return keep


def static_tasks(ctx: RunContext, workloads: list[Workload], backends: list[str], batch_sizes: list[int],
                 input_size: int, retry_failed: bool, skipped: dict) -> tuple[list[Task], int]:
    """The static sweep's tasks the store lacks (with ``retry_failed``, failures count as lacking),
    and how many the store holds."""
    done = ctx.store.done_keys(("ok",)) if retry_failed else ctx.store.done_keys()
    tasks = []
    for w in workloads:
        for b in backends:
            for precision in ctx.target.precisions:
                why = ctx.backend(b).unsupported(ctx.target, precision)
                if why:
                    skipped[f"{b}/{precision}"] = why
                    continue
                tasks += [t for t in (Task(w, b, precision, bs, input_size) for bs in batch_sizes)
                          if t.key not in done]
    return tasks, len(done)


def dynamic_backends(ctx: RunContext, active: list[str], named: list[str] | None, run_backends: list[str],
                     skipped: dict) -> list[str]:
    """The backends the dynamic engine is measured on: ``named`` (``--dynamic-backends``) among the
    ``active`` ones; without it the profile's ``dynamic_backends`` among the active ones (among
    ``run_backends``, ``--backends``, when given)."""
    if named is not None:
        for b in named:
            if b not in active:
                skipped.setdefault(f"{b} (dynamic)", "named in --dynamic-backends but not measured in this run "
                                                     "(not in --backends, or unavailable)")
        return [b for b in named if b in active]
    return profile_dynamic_backends(ctx, active, run_backends, skipped)


def profile_dynamic_backends(ctx: RunContext, active: list[str], run_backends: list[str], skipped: dict) -> list[str]:
    """The profile's ``dynamic_backends`` among the ``active`` ones (those of ``run_backends`` when given)."""
    wanted = run_backends or ctx.target.dynamic_backends or ctx.target.backends
    backends = [b for b in wanted if b in active and b in (ctx.target.dynamic_backends or wanted)]
    for b in active:
        if b not in backends and b != "noop":
            skipped.setdefault(f"{b} (dynamic)", "not in the profile's dynamic_backends")
    return backends


def table2_models(models: list[str], default_models: bool) -> list[str]:
    """Table 2's supernets among ``models``; the default run measures the paper's (``s_resnet50``)."""
    return [m for m in TABLE2_MODELS if m in models] or (list(TABLE2_MODELS[:1]) if default_models else [])


def dynamic_runs(ctx: RunContext, models: list[str], backends: list[str]) -> list[tuple[str, str, str]]:
    """(model, backend, precision) for every model x backend x the profile's precisions the backend runs."""
    return [(m, b, p) for m in models for b in backends for p in ctx.target.precisions
            if not ctx.backend(b).unsupported(ctx.target, p)]


def supernets(models: list[str]) -> list[str]:
    """The dynamic models among ``models`` (those with gates: slimmable networks have none)."""
    return [m for m in models if dsnet.create_model(m).dynamic]


def tune_before_measuring(ctx: RunContext, backends: list[str], models: list[str], input_size: int,
                          minutes: float | None, quick: bool, progress: ProgressFactory, notes: list[str],
                          dynamic: bool | None = None) -> list[str]:
    """TVM tuned within ``minutes`` (default: the profile's ``[tvm] tune_minutes``; a budget over
    re-runs: a tuned database tunes nothing) before any TVM build. Left out by ``--quick`` and when
    TVM is not measured or not on a CPU. Returns ``notes`` (the run's) with TVM's brought up to
    date; a tuning that fails is a note, never a failed run (TVM is measured with what the database
    holds). ``dynamic``: whether the run measures the dynamic engine on TVM (its parts' tasks tuned
    too; default: the profile's dynamic_backends say)."""
    if "tvm" not in backends or ctx.target.device != "cpu":
        return notes
    budget_from = "--tune-minutes" if minutes is not None else "the profile's [tvm] tune_minutes"
    if minutes is None:
        minutes = float(ctx.target.options("tvm").get("tune_minutes", 0))
    if quick or minutes <= 0:
        if quick and minutes > 0:
            return notes + [f"--quick leaves TVM tuning out: tvm uses what {ctx.layout.tuning_dir('tvm')} holds"]
        return notes
    tvm = ctx.backend("tvm")
    stale = tvm.notes(ctx.target)  # e.g. "untuned": said before the database grew
    shipped = tvm.shipped(ctx.target) is not None

    def announce():  # only when there is work: a vouched or spent budget returns at once
        print(f"tvm: tuning {', '.join(models)} at {input_size}px within {minutes:g} min ({budget_from}"
              + ("; tasks the shipped records cover are left out" if shipped else "")
              + "; python -m harness.tune tunes more)", file=sys.stderr)

    try:
        summary = run_tuning(tvm, ctx.target, models, input_size, minutes * 60, progress, dynamic,
                             beyond_shipped=True, announce=announce)
    except ValueError as e:  # a database for another target: measured untuned, said so
        return notes + [f"tvm tuning skipped: {e}"]
    except Exception as e:  # tuning is optional: the run measures with what the database holds
        return notes + [f"tvm tuning failed ({one_line(e)}); tvm measured with what the database holds"]
    from_shipped = f", {summary['shipped']} of them from the shipped records" if summary.get("shipped") else ""
    return [n for n in notes if n not in stale] + tvm.notes(ctx.target) + [
        f"tvm: records cover {summary['tuned']} of the {summary['tasks']} tasks{from_shipped} "
        f"({summary['trials_now']} trials tuned in this run"
        + (")" if summary["extracted"] else f"; {VOUCHED if summary.get('vouched') else SPENT})")]
