"""TVM's latency against its tuning minutes, beside ONNX Runtime and eager measured in the same rounds.

    python benchmarks/tvm_tuning_curve.py --target x86 --results results/x86-tuning-curve \\
        [--models ds_mbnet,mobilenet_v1] [--minutes 0,10,20,40,60] [--input-size 224]

Cold tuning (an empty database under ``--results``) of every TVM task of ``--models``, as
``python -m harness.tune`` collects them, in steps: at each budget of ``--minutes`` (cumulative;
0 = untuned) the database is tuned up to that budget, then MobileNetV1 x1.0 and the smallest and
largest DS-MBNet routes (each static model's x1.0 width, each supernet's smallest and largest
route by MAdds) are built on eager, ONNX Runtime and TVM and timed in one round phase, interleaved,
with the profile's protocol. One row per engine and budget goes to ``<results>/tuning_curve.csv``
(TVM's ratio to ONNX Runtime and to eager paired round by round), the figure to
``tuning_curve.png``. Resumable: budgets already in the CSV are not measured again, and the
database keeps every record measured before an interruption.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

from harness.cli import (  # noqa: E402
    DEFAULT_MODELS,
    MAX_INPUT_SIZE,
    Progress,
    UsageError,
    add_results_option,
    names_option,
    open_target,
    results_layout,
    run_main,
)

BACKENDS = ("eager", "onnxruntime", "tvm")
CSV, FIGURE = "tuning_curve.csv", "tuning_curve.png"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python benchmarks/tvm_tuning_curve.py", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="x86", help="a CPU target profile (default: x86)")
    p.add_argument("--models", help=f"comma-separated models to tune (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--minutes", default="0,10,20,40,60", help="cumulative tuning budgets to measure at")
    p.add_argument("--input-size", type=int, help="square input resolution (default: the profile's)")
    add_results_option(p)
    return p.parse_args(argv)


def measured_workloads(models: list[str], input_size: int):
    """Each static model at x1.0, each supernet's smallest and largest route by MAdds."""
    from harness.phases.static import workloads

    chosen = []
    for name in models:
        ws = workloads([name], input_size)
        static = [w for w in ws if w.route == "x1.0"]
        chosen += static or [min(ws, key=lambda w: w.madds), max(ws, key=lambda w: w.madds)]
    return chosen


def measure_step(ctx, chosen, input_size: int, progress) -> list[dict]:
    """Build ``chosen`` on every backend and time all engines in one round phase."""
    from harness.backends.base import one_line
    from harness.measure.protocol import measure_rounds, paired_ratio

    x = torch.randn(1, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    fns, rows = {}, {}
    for w in chosen:
        module = w.build()
        for b in BACKENDS:
            label = f"{w.model} {w.route} {b}"
            result = ctx.trial(w.model, w.route, b, "fp32", module, x)
            row = {"model": w.model, "route": w.route, "madds": w.madds, "backend": b, "status": result.status,
                   "error": result.error, "tuning": result.details.get("tuning", "") if result.ok else ""}
            if result.ok:
                try:
                    prepared = result.engine.prepare(x)
                    fns[label] = lambda e=result.engine, p=prepared: e.run(p)
                except Exception as e:
                    row |= {"status": "measure_failed", "error": one_line(e)}
            rows[label] = row
            progress(label, row["status"])
    res = measure_rounds(fns, ctx.protocol, ctx.timer(), seed=7,
                         on_round=lambda done, planned: progress(f"round {done}/{planned}", f"{len(fns)} engines"))
    for label, row in rows.items():
        if label not in fns:
            continue
        s = res[label].stats
        row |= {"latency_ms_p50": s.p50, "ci_low": s.ci_low, "ci_high": s.ci_high, "valid": s.valid}
        if row["backend"] == "tvm":
            for ref in ("onnxruntime", "eager"):
                other = label.rsplit(" ", 1)[0] + f" {ref}"
                if other in fns:
                    row[f"tvm_over_{ref}"] = paired_ratio(res[label], res[other])
    return list(rows.values())


def plot(frame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(dict.fromkeys(zip(frame.model, frame.route)))
    fig, axes = plt.subplots(2, len(cells), figsize=(4.2 * len(cells), 6.6), squeeze=False, sharex="col")
    for col, (model, route) in enumerate(cells):
        cell = frame[(frame.model == model) & (frame.route == route)]
        top, bottom = axes[0][col], axes[1][col]
        for backend, style in zip(BACKENDS, ("s--", "o--", "D-")):
            b = cell[cell.backend == backend].sort_values("tuning_minutes_spent")
            top.plot(b.tuning_minutes_spent, b.latency_ms_p50, style, label=backend)
        tvm = cell[cell.backend == "tvm"].sort_values("tuning_minutes_spent")
        for ref, style in (("onnxruntime", "o-"), ("eager", "s-")):
            if f"tvm_over_{ref}" in tvm:
                bottom.plot(tvm.tuning_minutes_spent, tvm[f"tvm_over_{ref}"], style, label=f"TVM / {ref}")
        bottom.axhline(1.5, color="grey", ls=":", label="1.5x (issue 16 goal vs ORT)")
        top.set_yscale("log")
        bottom.set_yscale("log")
        top.set_title(f"{model} {route}")
        top.set_ylabel("latency p50 (ms, log)")
        bottom.set_ylabel("TVM / reference, paired per round")
        bottom.set_xlabel("tuning minutes spent (cumulative)")
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
    axes[0][0].legend()
    axes[1][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _main(args) -> int:
    import pandas as pd

    import dsnet
    from harness.phases.context import RunContext
    from harness.phases.tuning import tune_tasks, tuning_tasks
    from harness.results.store import FolderLock, StoreError

    target = open_target(args.target)
    if target.device != "cpu":
        raise UsageError(f"target '{target.name}' is not a CPU profile: MetaSchedule tuning is for CPU targets")
    models = names_option("--models", args.models, dsnet.list_models(), list(DEFAULT_MODELS))
    input_size = args.input_size if args.input_size is not None else target.input_size
    if not 32 <= input_size <= MAX_INPUT_SIZE:
        raise UsageError(f"--input-size must be between 32 and {MAX_INPUT_SIZE}, got {input_size}")
    try:
        budgets = sorted({float(m) for m in args.minutes.split(",")})
    except ValueError:
        raise UsageError(f"--minutes takes comma-separated numbers, got {args.minutes!r}") from None
    if budgets[0] < 0:
        raise UsageError("--minutes must not be negative")
    layout = results_layout(args.results, target.name)
    csv = layout.root / CSV
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(layout.root).acquire()
    except (OSError, StoreError) as e:
        raise UsageError(f"results folder {layout.root}: {e}") from None
    try:
        ctx = RunContext(target, layout, target.protocol, None, "", False, "tuning-curve")
        backend = ctx.backend("tvm")
        why = backend.unavailable(target)
        if why:
            raise UsageError(f"tvm: {why}")
        done = pd.read_csv(csv) if csv.exists() else None
        db = backend.database(target)
        if done is None and db is not None and any(t["trials"] for t in db.ledger["tasks"].values()):
            raise UsageError(f"{db.directory} already holds tuning records: a cold curve needs an empty --results")
        print(f"tuning curve: {', '.join(models)} at {input_size}px for {target.name}, budgets "
              f"{', '.join(f'{b:g}' for b in budgets)} min, into {layout.root}", file=sys.stderr)
        tasks, networks = tuning_tasks(backend, target, models, input_size, lambda n, d: Progress(n, d))
        chosen = measured_workloads(models, input_size)
        for budget in budgets:
            if done is not None and (done.budget_minutes == budget).any():
                continue
            t0 = time.monotonic()
            summary = tune_tasks(backend, target, tasks, budget * 60, lambda n, d: Progress(n, d)) \
                if budget > 0 else {"tuned": 0}
            tune_s = time.monotonic() - t0
            ledger = backend.open_database(target).ledger["tasks"]
            spent = sum(ledger.get(t.key, {}).get("seconds", 0.0) for t in tasks)
            rows = measure_step(ctx, chosen, input_size, Progress(len(chosen) * len(BACKENDS) + target.protocol.repeat,
                                                                 f"measure at {budget:g} min"))
            stamp = {"budget_minutes": budget, "tuning_minutes_spent": spent / 60, "step_tuning_s": tune_s,
                     "tuned_tasks": summary["tuned"], "tasks": len(tasks), "networks": networks,
                     "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            new = pd.DataFrame([stamp | r for r in rows])
            done = new if done is None else pd.concat([done, new], ignore_index=True)
            done.to_csv(csv.with_suffix(".tmp"), index=False)
            csv.with_suffix(".tmp").replace(csv)  # a complete file or the previous one, never half
            plot(done, layout.root / FIGURE)
            tvm = new[new.backend == "tvm"]
            print(f"{budget:g} min ({spent / 60:.1f} spent, {summary['tuned']}/{len(tasks)} tasks tuned): "
                  + "; ".join(f"{r.model} {r.route} tvm {r.latency_ms_p50:.2f} ms, x{r.tvm_over_onnxruntime:.2f} "
                              f"of ORT, x{r.tvm_over_eager:.2f} of eager" for r in tvm.itertuples()
                              if r.status == "ok"))
    finally:
        lock.release()
    print(f"wrote {csv} and {layout.root / FIGURE}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_main(lambda: _main(args), "the tuning records and the budgets measured so far are kept; "
                                         "re-run to go on")


if __name__ == "__main__":
    sys.exit(main())
