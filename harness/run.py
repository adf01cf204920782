"""``python -m harness.run --target NAME``: compile and measure every route on a target profile.

Writes ``<out>/results.sqlite`` (every result, the moment it is taken), ``<out>/lut.csv`` and
``<out>/env.json``; ``<out>`` defaults to ``results/<target>`` (``results/<target>/quick`` with
``--quick``). A re-run resumes: what the store holds is skipped (``--retry-failed`` retries
failures). Exit codes: 0 done; 2 bad input or a target this machine cannot run (one line on
stderr); 3 machine busy under ``--strict``; 130 interrupted (what was measured is kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
import warnings
from pathlib import Path

from harness import env as envmod
from harness.targets import TargetError, known_targets, load_target

DEFAULT_MODELS = ("ds_mbnet", "mobilenet_v1")
QUICK_INPUT_SIZE = 64
QUICK_SLOW_BACKENDS = ("inductor",)  # ~40 s of C++ compile per route on 2 cores
RESULTS_DIR = Path("results")


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m harness.run", description=__doc__.split("\n")[0])
    p.add_argument("--target", required=True, help=f"target profile: {', '.join(known_targets())}")
    p.add_argument("--backends", help="comma-separated subset of the profile's backends (or others, "
                                      "e.g. noop for the harness overhead)")
    p.add_argument("--models", help=f"comma-separated models (default: {','.join(DEFAULT_MODELS)})")
    p.add_argument("--routes", help="comma-separated route labels to keep, e.g. 0,13 or x1.0,x0.5")
    p.add_argument("--batch-size", help="comma-separated batch sizes (default: the profile's)")
    p.add_argument("--input-size", type=int, help="square input resolution (default: the profile's)")
    p.add_argument("--out", type=Path, help="results folder (default: results/<target>)")
    p.add_argument("--strict", action="store_true", help="refuse to measure on a busy machine")
    p.add_argument("--quick", action="store_true",
                   help=f"input {QUICK_INPUT_SIZE}, 3 DS-MBNet routes and 2 widths, few repeats; "
                        f"leaves out {', '.join(QUICK_SLOW_BACKENDS)} unless --backends names it")
    p.add_argument("--retry-failed", action="store_true", help="re-measure results stored as failed")
    p.add_argument("--rpc-tracker", metavar="HOST:PORT",
                   help="measure on remote boards through TVM's RPC tracker (tvm backend; built here)")
    p.add_argument("--rpc-key", help="the boards' key at the tracker (with --rpc-tracker)")
    p.add_argument("--rpc-wait", type=float, default=60.0, help="seconds to wait for a free board (default 60)")
    return p.parse_args(argv)


def open_target(name: str, remote: bool = False):
    """The resolved profile ``name``, threads configured; :class:`UsageError` for an unknown or
    malformed profile, or one this machine cannot run (naming the profiles that can). ``remote``:
    measured on boards through an RPC tracker, so the profile's architecture need not be this one's."""
    try:
        target = load_target(name)
    except TargetError as e:
        raise UsageError(str(e)) from None
    if remote and target.device != "cpu":
        raise UsageError(f"--rpc-tracker measures CPU boards; profile '{target.name}' is a {target.device} profile")
    runnable, why = (True, "") if remote else target.runs_here()
    if not runnable:
        here = [n for n in known_targets() if _runs_here_quietly(n)]
        raise UsageError(f"target '{target.name}' cannot run on this machine: {why}. "
                         f"Profiles that can run here: {', '.join(here) or 'none'}")
    target = target.resolve()
    envmod.configure_threads(target.threads)  # before any backend library loads
    return target


def capture_machine(target, strict: bool = False):
    """``(env, device name, device mismatch)``, warning on stderr about a mismatched device or a
    busy machine (an error line under ``strict``: the caller exits 3)."""
    env = envmod.capture(target.device)
    device_name = env.get("gpu_name") if target.device == "cuda" else env["cpu_model"]
    device_mismatch = bool(target.expected_device) and target.expected_device not in (device_name or "")
    if device_mismatch:
        print(f"warning: profile '{target.name}' expects '{target.expected_device}' but this is "
              f"'{device_name}'; results are recorded with device_mismatch=1", file=sys.stderr)
    if env["busy"]:
        msg = (f"machine busy: other processes use {env['other_processes_cpu_percent']:.0f}% of a core "
               f"(load average {env['load_average'][0]}); timings may be inflated")
        if strict:
            print(f"error: {msg}; refusing under --strict", file=sys.stderr)
        else:
            print(f"warning: {msg}; the run is flagged busy in env.json", file=sys.stderr)
    return env, device_name, device_mismatch


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def plan(args, target):
    """Resolve options against the profile: (backends, skipped {backend: reason}, models, routes,
    batch sizes, input size, protocol, out dir)."""
    import dsnet
    from harness.backends import list_backends

    backends = _csv(args.backends) or list(target.backends)
    unknown = [b for b in backends if b not in list_backends()]
    if unknown:
        raise UsageError(f"unknown backend(s) {', '.join(unknown)}; valid: {', '.join(list_backends())}")
    models = _csv(args.models) or list(DEFAULT_MODELS)
    bad = [m for m in models if m not in dsnet.list_models()]
    if bad:
        raise UsageError(f"unknown model(s) {', '.join(bad)}; valid: {', '.join(dsnet.list_models())}")
    try:
        batches = [int(b) for b in _csv(args.batch_size)] if args.batch_size else list(target.batch_sizes)
    except ValueError:
        raise UsageError(f"--batch-size takes integers, got '{args.batch_size}'") from None
    if any(b < 1 for b in batches):
        raise UsageError("--batch-size values must be at least 1")
    input_size = args.input_size or (QUICK_INPUT_SIZE if args.quick else target.input_size)
    if input_size < 32:
        raise UsageError(f"--input-size must be at least 32, got {input_size}")
    protocol = target.protocol
    routes = set(_csv(args.routes)) if args.routes else None
    skipped: dict[str, str] = {}
    if args.quick:
        protocol = protocol.replace(warmup_calls=3, warmup_ms=20, repeat=5, min_repeat_ms=10)
        if not args.backends:
            for b in QUICK_SLOW_BACKENDS:
                if b in backends:
                    backends.remove(b)
                    skipped[b] = "left out by --quick (slow compile); name it in --backends to include"
    out = args.out or RESULTS_DIR / target.name / ("quick" if args.quick else "")
    return backends, skipped, models, routes, batches, input_size, protocol, Path(out)


def _quick_routes(all_workloads):
    """--quick: smallest, middle and largest route of each supernet; x1.0 and x0.5 of statics."""
    keep = []
    by_model: dict[str, list] = {}
    for w in all_workloads:
        by_model.setdefault(w.model, []).append(w)
    for ws in by_model.values():
        if ws[0].route.startswith("x"):
            keep += [w for w in ws if w.route in ("x1.0", "x0.5")]
        else:
            keep += [ws[0], ws[len(ws) // 2], ws[-1]]
    return keep


def _ms(v: float) -> str:
    if v != v:  # NaN: not measured
        return "-"
    return f"{v:.3f}" if v >= 0.01 else f"{v:.2e}"


def summary_table(df, skipped: dict[str, str], notes: list[str] = ()) -> str:
    """p50 per backend (ms) for each model/route, with the failures, skipped backends and notes."""
    lines = []
    ok = df[df.status == "ok"]
    if len(ok):
        pivot = ok.pivot_table(index=["model", "route", "madds"], columns=["backend", "precision", "batch_size"],
                               values="latency_ms_p50").sort_index(level=["model", "madds"])
        cols = [f"{b}/{p}/b{n}" for b, p, n in pivot.columns]
        header = ["model", "route", "MAdds(M)"] + cols
        body = [[m, r, f"{madds / 1e6:.1f}"] + [_ms(v) for v in vals]
                for (m, r, madds), vals in zip(pivot.index, pivot.values)]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        fmt = lambda row: "  ".join(str(v).rjust(w) for v, w in zip(row, widths))  # noqa: E731
        lines += ["latency p50 (ms)", fmt(header)] + [fmt(b) for b in body]
    failed = df[df.status != "ok"]
    for _, r in failed.iterrows():
        lines.append(f"FAILED {r.model} {r.route} {r.backend} {r.precision} b{r.batch_size}: "
                     f"{r.status}: {r.error}")
    for b, why in skipped.items():
        lines.append(f"skipped backend {b}: {why}")
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if bool(args.rpc_tracker) != bool(args.rpc_key):
            raise UsageError("--rpc-tracker and --rpc-key go together")
        target = open_target(args.target, remote=bool(args.rpc_tracker))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from harness.store import ResultStore
    from harness.sweep import Progress, Sweep, Task, workloads

    try:
        backends, skipped, models, routes, batches, input_size, protocol, out = plan(args, target)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    env, device_name, device_mismatch = capture_machine(target, args.strict)
    if env["busy"] and args.strict:
        return 3

    from harness.backends import get_backend

    farm = None
    if args.rpc_tracker:
        for b in [b for b in backends if b != "tvm"]:
            backends.remove(b)
            skipped[b] = "runs on this machine only: through --rpc-tracker only tvm is measured on the boards"
        from harness.remote import Farm, RemoteError, cross_compiler

        try:
            cross_compiler(target.tvm.get("target", {}))  # before connecting: fail fast, say what to install
            farm = Farm.connect(args.rpc_tracker, args.rpc_key, args.rpc_wait)
        except RemoteError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        device_name, device_mismatch = ", ".join(farm.boards), False
        print(f"{len(farm.boards)} board(s) under key {args.rpc_key!r}: {device_name}", file=sys.stderr)

    active = []
    for b in backends:
        reason = get_backend(b).unavailable(target)
        if reason:
            skipped[b] = reason
        else:
            active.append(b)

    all_workloads = workloads(models, input_size, routes)
    if args.quick and routes is None:
        all_workloads = _quick_routes(all_workloads)
    if not all_workloads:
        print("error: no route matches --routes among the models' routes", file=sys.stderr)
        return 2
    store = ResultStore(out / "results.sqlite")
    done = store.done_keys(("ok",)) if args.retry_failed else store.done_keys()
    tasks, unsupported = [], {}
    for w in all_workloads:
        for b in active:
            for prec in target.precisions:
                why = get_backend(b).unsupported(target, prec)
                if why:
                    unsupported[f"{b}/{prec}"] = why
                    continue
                for bs in batches:
                    t = Task(w, b, prec, bs, input_size)
                    if t.key not in done:
                        tasks.append(t)
    skipped.update(unsupported)

    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    env_doc = {"run_id": run_id, "target": target.name, "profile_path": target.path,
               "device_name": device_name, "expected_device": target.expected_device,
               "device_mismatch": device_mismatch, "quick": args.quick, "threads": target.threads,
               "tvm_target": target.tvm.get("target"), "tvm_tune_trials": target.tvm.get("tune_trials", 0),
               "protocol": protocol.__dict__, "backends": active, "skipped": skipped, "env": env,
               "remote": None if farm is None else {"tracker": farm.tracker_addr, "key": farm.key,
                                                    "boards": farm.boards}}
    store.record_run(run_id, env_doc)
    print(f"{target.name}: {len(all_workloads)} networks x {len(active)} backend(s); "
          f"{len(tasks)} to measure, {len(done)} already stored in {out}", file=sys.stderr)

    t0 = time.monotonic()
    sweep = Sweep(target, out, protocol, store, device_name, device_mismatch, run_id, farm=farm)
    status = 0
    try:
        sweep.run(tasks, Progress(len(tasks)))
        if farm is not None:
            skipped["dynamic engine, Table 2"] = "measured on this machine only, not through --rpc-tracker"
        else:
            dyn_backends = run_dynamic(sweep, target, models, active, input_size, args, skipped)
            if args.models is None or "ds_resnet50" in models:
                run_table2(sweep, target, dyn_backends, input_size)
    except KeyboardInterrupt:
        status = 130
        print("\ninterrupted: results measured so far are stored; re-run the same command to resume",
              file=sys.stderr)
    finally:
        df = store.export_lut(out / "lut.csv")
        dyn = store.export_dynamic(out / "dynamic.csv")
        env_doc["wall_time_s"] = round(time.monotonic() - t0, 1)
        # the stored results may come from several runs (a resumed run measures only what is missing)
        env_doc["earlier_runs"] = [
            {"run_id": d.get("run_id"), "time_utc": d.get("env", {}).get("time_utc"),
             "busy": d.get("env", {}).get("busy"), "cpu_steal_percent": d.get("env", {}).get("cpu_steal_percent"),
             "device_name": d.get("device_name")}
            for d in store.runs() if d.get("run_id") != run_id]
        with open(out / "env.json", "w") as f:
            json.dump(env_doc, f, indent=1)
        store.close()
    scope = df[df.model.isin(models) & (df.input_size == input_size)]
    notes = []
    if "tvm" in active and target.device == "cpu" and not target.tvm.get("tune_trials", 0):
        notes.append("tvm is untuned (tune_trials = 0 in the profile): untuned CPU convolutions are "
                     "far slower than tuned ones; set [tvm] tune_trials to tune")
    print(summary_table(scope, skipped, notes))
    dyn_scope = dyn[dyn.model.isin(models) & (dyn.input_size == input_size)]
    if len(dyn_scope):
        print(dynamic_summary(dyn_scope))
    print(f"wrote {out / 'lut.csv'}, {out / 'dynamic.csv'} and {out / 'env.json'} ({env_doc['wall_time_s']} s)")
    from harness import report

    try:
        written, _ = report.build(out, input_size)
        print(f"tables and figures: {len(written)} files under {out / 'tables'} and {out / 'figures'} "
              f"(rebuild with python -m harness.report --target {target.name})")
    except report.ReportError as e:
        print(f"tables and figures: none ({e})")
    return status


def run_dynamic(sweep, target, models, active, input_size, args, skipped) -> list[str]:
    """The dynamic engine of every supernet among ``models`` on the profile's dynamic backends
    (returned)."""
    import dsnet
    from harness.backends.base import one_line
    from harness.sweep import DynamicSweep, Progress, validation_routes

    wanted = _csv(args.backends) or target.dynamic_backends or target.backends
    backends = [b for b in wanted if b in active and b in (target.dynamic_backends or wanted)]
    for b in active:
        if b not in backends and b != "noop":
            skipped.setdefault(f"{b} (dynamic)", "not in the profile's dynamic_backends")
    supernets = [m for m in models if len(dsnet.create_model(m).routing_space.gates)]
    for model in supernets:
        for backend in backends:
            for precision in target.precisions:
                if sweep.backend(backend).unsupported(target, precision):
                    continue
                try:
                    ds = DynamicSweep(sweep, model, backend, precision, input_size)
                except Exception as e:  # a segment that does not compile: recorded, the run goes on
                    sweep.store.record_dynamic({"model": model, "backend": backend, "precision": precision,
                                                "batch_size": 1, "input_size": input_size, "kind": "engine",
                                                "name": "build", "status": "compile_failed",
                                                "error": one_line(e), "run_id": sweep.run_id})
                    continue
                n = len(ds.plan) + len(validation_routes(ds.model.routes(input_size))) + 2
                ds.run(Progress(n).update)
    return backends


def run_table2(sweep, target, backends, input_size) -> None:
    """DS-Net++ Table 2 (ResNet-50 at 25% channels: full, masking, indexing, slicing, materialized,
    ideal) on the dynamic backends, interleaved per backend."""
    from harness.modes import TABLE2_WAYS, measure_table2
    from harness.sweep import Progress

    for backend in backends:
        for precision in target.precisions:
            if not sweep.backend(backend).unsupported(target, precision):
                measure_table2(sweep, backend, precision, input_size, Progress(len(TABLE2_WAYS)).update)


def dynamic_summary(dyn) -> str:
    """Per model and backend: LUT error, dispatch overhead, stream error, realized vs ideal speed-up."""
    lines = ["dynamic engine (LUT = sum of measured segments; error = (LUT - end to end) / end to end)"]
    for (model, backend, precision), g in dyn.groupby(["model", "backend", "precision"]):
        bad = g[g.status != "ok"]
        if len(bad):
            lines.append(f"  {model} {backend} {precision}: FAILED {bad.iloc[0].error}")
            continue
        routes, stored = g[g.kind == "route"], g[g.kind == "route_lut"]
        parts = [f"  {model} {backend} {precision}:"]
        if len(routes):
            err = routes.rel_error.abs() * 100
            lut_err = stored.rel_error.abs() * 100
            overhead = routes.latency_ms_p50 - routes.predicted_ms
            smallest = routes.sort_values("madds").iloc[0]
            parts.append(f"parts vs end to end (same run) median {err.median():.1f}% max {err.max():.1f}%; "
                         f"stored LUT vs end to end median {lut_err.median():.1f}% max {lut_err.max():.1f}% "
                         f"over {len(routes)} routes; dispatch median {overhead.median() * 1e3:.0f} us "
                         f"({100 * overhead.median() / smallest.latency_ms_p50:.1f}% of the smallest route);")
        st = g[g.kind == "stream"]
        if len(st):
            parts.append(f"uniform stream error {100 * st.rel_error.iloc[0]:+.1f}%;")
        acc = g[g.kind == "acceleration"].set_index("name")
        if {"largest", "matched", "dynamic"} <= set(acc.index):
            t = acc.latency_ms_mean
            ideal, realized = t["largest"] / t["matched"], t["largest"] / t["dynamic"]
            parts.append(f"speed-up over x1.0: realized {realized:.2f}x vs ideal {ideal:.2f}x "
                         f"({realized / ideal:.2f} of ideal)")
        lines.append(" ".join(parts))
    return "\n".join(lines)


def _runs_here_quietly(name: str) -> bool:
    try:
        return load_target(name).runs_here()[0]
    except TargetError:
        return False


if __name__ == "__main__":
    # Deprecation notices of TorchScript / torch.export internals are not the user's business here.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
