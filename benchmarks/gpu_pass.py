"""The GPU pass: one prepared command for a short GPU window (about 15 minutes of machine time, start-up included).

    python benchmarks/gpu_pass.py --target h100 [--results results/h100] [--budget-min 8]
    python benchmarks/gpu_pass.py --target h100 --dry-run --results /tmp/dry     # the same steps, on this CPU
    python benchmarks/gpu_pass.py --prepare-carry .carry                          # what the GPU machine lacks

On the GPU machine (torch 2.11 + CUDA on Python 3.12, no apache-tvm), after ``--prepare-carry`` here::

    mkdir -p /tmp/site && tar xJf .carry/site.tar.xz -C /tmp/site && \\
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 benchmarks/gpu_pass.py --target h100

Steps, each ``python -m harness.run`` (or the report, or pytest) in a child process with a deadline
cut from ``--budget-min`` (a step that fails or runs out is recorded and the pass goes on; what a
step stored stays: the store commits each model's round phase as it ends):

1. ``static-mobilenet``, ``static-dsmbnet``: MobileNetV1 (4 widths), then DS-MBNet (14 routes) at
   the profile's input size, batch 1, fp32 and fp16, on eager and TorchScript, each plain and as the
   replay of a captured CUDA graph (``eager+graphs``, ``torchscript+graphs``: the same artifacts, one
   row each); one step per model, so that a deadline in DS-MBNet's rounds keeps MobileNetV1's;
2. ``static-tvm`` (DLight's GPU schedules, fp32) on a spread subset: DS-MBNet routes 0, 6, 13 and
   MobileNetV1 x1.0, x0.5;
3. ``dynamic``: the deployed DS-MBNet on the fastest plain torch backend of step 1 (plain calls: a
   graph would freeze the route), fp32 and fp16: its LUT against the deployed path, the dispatch
   cost, and Table 7's acceleration against MobileNetV1 x1.0 and x0.5;
4. ``table2``: DS-Net++ Table 2 on the slimmable ResNet-50 at 25% channels, on the fastest backend of
   step 1 (graphs included);
5. ``pytest``: ``pytest -m gpu`` but AOTInductor's (every GPU test passes or skips with its reason);
6. ``static-inductor`` (AOTInductor, plain and graphs, fp32 and fp16) on DS-MBNet route 0 and
   MobileNetV1 x1.0: its GPU builds are the slowest of the pass, so it comes last with what is left;
7. ``report``: ``harness.report`` (Table 2, Table 7, the figures) beside the paper's RTX 2080 Ti columns;
8. ``pytest-inductor``: AOTInductor's GPU tests.

A step's deadline is its share of what is left: time a step leaves unused goes to those after it.
The shares come from the first pass on an H200 (docs/gpu.md), which did not fit its window: its
measurements were completed by a second, shorter command.

``gpu_pass.json`` in the results folder records each step: its command, exit status, wall time, and
the end of its output; ``gpu_pass_logs/<step>.log`` holds the whole output. TensorRT and
onnxruntime-gpu cannot be had on the lent machines: their backends are listed in step 1 and
skipped with the reason, which env.json and the tables' notes carry.

``--dry-run`` runs the same steps on this machine's CPU, the profile's device swapped for the CPU
and the timing shortened (32 px, fp32, the tiny DS-MBNet, a few routes, three rounds; AOTInductor's
steps left out, its CPU builds take ~40 s each here and tests/test_dynamic.py covers them; the
dynamic phase and Table 2 on eager, whose parts need no build), so that no GPU minute is spent on a
Python error, a missing file or a wrong column; tests/test_gpu_pass.py runs it. It cannot find what
only a GPU shows (the first pass found a device mismatch in the dynamic phase's batch check).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

TORCH_STREAM = ["eager", "eager+graphs", "torchscript", "torchscript+graphs"]
UNAVAILABLE_HERE = ["tensorrt", "onnxruntime"]  # listed so the run says why they are not measured
COMPILER_ROUTES = "0,6,13,x1.0,x0.5"
INDUCTOR_ROUTES = "0,x1.0"  # AOTInductor builds for minutes on a GPU: two networks
CARRY_LIMIT_MB = 60  # the device tool moves 64 MiB a call, the repository included
CARRIED = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1")
# left out of the carry: CUTLASS's headers (26 MB, only for TVM's CUTLASS offload, which the harness never
# asks for) and the WebGPU runtime; with them the archive is 62.5 MiB, over what a call can move
NOT_CARRIED = ("tvm/3rdparty/cutlass", "tvm/web")


@dataclass
class Step:
    name: str
    args: list[str]  # after `python`
    share: float  # of the budget
    picks_backend: bool = False  # its backend is chosen from step 1's results
    record: dict = field(default_factory=dict)


def pass_profile(target: str, out: Path, dry_run: bool, dynamic: list[str] | None = None) -> Path:
    """The profile the pass measures with: ``target``'s, its timing fitted to a short window (and, in
    a dry run, its device swapped for this CPU); written to ``out`` under the profile's own name."""
    from harness.targets import load_target

    t = load_target(target)
    lines = [f'name = "{t.name}"', f'description = "{t.description} (GPU pass)"']
    if dry_run:
        lines += ['device = "cpu"', 'expected_device = "auto"', 'precisions = ["fp32"]', "input_size = 32",
                  "threads = 0"]
        protocol = {"warmup_calls": 1, "warmup_ms": 0, "repeat": 3, "min_repeat_ms": 0, "budget_s": 0}
    else:
        lines += [f'device = "{t.device}"', f'expected_device = "{t.expected_device}"',
                  f"precisions = {json.dumps(list(t.precisions))}", f"input_size = {t.input_size}",
                  f"threads = {t.threads}"]
        # CUDA events; 40 rounds of >= 10 ms samples: enough for the 5% interval once graphs calm the jitter
        protocol = {"warmup_calls": 10, "warmup_ms": 100, "repeat": 40, "min_repeat_ms": 10,
                    "min_measured_ms": 300, "max_ci_fraction": 0.05, "budget_s": 10}
    if t.arch:
        lines.append(f'arch = "{t.arch}"')
    backends = list(dict.fromkeys([*t.backends, *TORCH_STREAM, "inductor+graphs"]))
    lines += [f"backends = {json.dumps(backends)}", "batch_sizes = [1]",
              f"dynamic_backends = {json.dumps(dynamic or list(t.dynamic_backends))}", "", "[protocol]"]
    lines += [f"{k} = {v}" for k, v in protocol.items()]
    for name, table in t.backend_options.items():
        if dry_run and name == "tvm":  # the GPU's TVM target on a CPU: the profile's own for this machine
            table = load_target("x86").options("tvm") | {"tune_minutes": 0}
        lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in table.items()]
    path = out / f"{t.name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(x)}' for k, x in v.items()) + " }"
    return json.dumps(v)


def steps(profile: Path, results: Path, dry_run: bool) -> list[Step]:
    run = ["-m", "harness.run", "--target", str(profile), "--results", str(results), "--tune-minutes", "0"]
    static = [*run, "--phases", "static"]
    # a dry run: the tiny DS-MBNet (the full one's reference statistics alone take ~20 s to estimate)
    dsmbnet = "ds_mbnet_tiny" if dry_run else "ds_mbnet"
    models = f"{dsmbnet},mobilenet_v1"
    listed = ",".join(TORCH_STREAM + ([] if dry_run else UNAVAILABLE_HERE))
    # no log capture: a failed test's captured torch DEBUG lines filled the first pass's output tail
    pytest = ["-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider", "-p", "no:logging",
              str(REPO / "tests")]
    # Shares from the first pass on an H200 (2026-12-04, ~1 s per torch engine to build, check, warm
    # up and capture): MobileNetV1's 32 engines took 38 s, DS-MBNet's 112 ~160 s (a model's round
    # phase is stored when it ends, so each model is its own step), TVM's 5 networks ~60 s, the
    # dynamic phase on eager fp32 35 s, Table 2 22 s, the report 5 s, `pytest -m gpu` without
    # AOTInductor 46 s. AOTInductor built none of its 5 networks in 90 s: last, on two networks.
    out = [Step("static-mobilenet", [*static, "--models", "mobilenet_v1", *(["--routes", "x1.0,x0.5"] if dry_run
                                                                             else []), "--backends", listed], 0.10),
           Step("static-dsmbnet", [*static, "--models", dsmbnet, *(["--routes", "0,3"] if dry_run else []),
                                   "--backends", listed], 0.36),
           Step("static-tvm", [*static, "--models", models, "--routes", "0,x1.0" if dry_run else COMPILER_ROUTES,
                               "--backends", "tvm"], 0.13),
           Step("dynamic", [*run, "--models", models, "--routes", "x1.0,x0.5", "--phases", "dynamic"], 0.14,
                picks_backend=True),
           Step("table2", [*run, "--models", "s_resnet50", "--phases", "table2"], 0.05, picks_backend=True),
           Step("pytest", [*pytest, "-k", "not inductor"], 0.12)]
    if not dry_run:  # AOTInductor's CPU builds take ~40 s each here; tests/test_dynamic.py covers them
        out.append(Step("static-inductor", [*static, "--models", models, "--routes", INDUCTOR_ROUTES,
                                            "--backends", "inductor,inductor+graphs"], 0.05))
    out.append(Step("report", ["-m", "harness.report", "--target", str(profile), "--results", str(results)], 0.02))
    if not dry_run:
        out.append(Step("pytest-inductor", [*pytest, "-k", "inductor"], 0.03))
    return out


def fastest(results: Path, candidates: list[str], model: str = "ds_mbnet") -> str:
    """Among ``candidates``, the backend with the lowest median p50 over ``model``'s fp32 rows of
    ``lut.csv`` (the first candidate when none was measured)."""
    import pandas as pd

    from harness.results.layout import Layout, read_csv

    path = Layout(results).lut_csv
    if not path.is_file():
        return candidates[0]
    df = read_csv(path)
    df = df[(df.model == model) & (df.precision == "fp32") & (df.status == "ok") & df.backend.isin(candidates)]
    if df.empty:
        return candidates[0]
    med = pd.to_numeric(df.latency_ms_p50).groupby(df.backend).median()
    return str(med.idxmin())


def cuda_library_dirs() -> list[str]:
    """The folders of the CUDA runtime that torch's wheels install (``nvidia/**/lib``): TVM's CUDA
    runtime (libtvm_runtime_cuda.so) links libcudart by name and finds it only on the loader's path."""
    import glob

    found = []
    for entry in sys.path:
        found += glob.glob(os.path.join(entry, "nvidia", "**", "libcudart.so*"), recursive=True)
    return sorted({os.path.dirname(f) for f in found})


def run_step(step: Step, timeout_s: float, env: dict, log: Path) -> dict:
    """Run one step with a deadline: SIGINT at the deadline (harness.run stores what it measured and
    exits 130), SIGKILL 30 s later. Returns its record."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, *step.args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout_s))
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        status = "out of time"
    log.parent.mkdir(parents=True, exist_ok=True)  # the whole output: a failure's reason is often above the tail
    log.write_text(out or "")
    tail = "\n".join((out or "").splitlines()[-25:])
    return {"status": status, "exit_code": proc.returncode, "wall_s": round(time.monotonic() - t0, 1),
            "deadline_s": round(timeout_s, 1), "command": " ".join(["python", *step.args]), "output_tail": tail}


def gpu_pass(target: str, results: Path, budget_s: float, dry_run: bool) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    libs = os.pathsep.join([*cuda_library_dirs(), os.environ.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    if libs:
        env["LD_LIBRARY_PATH"] = libs
    doc = {"target": target, "dry_run": dry_run, "budget_s": budget_s, "started_utc":
           time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": []}
    manifest = results / "gpu_pass.json"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        plan = steps(pass_profile(target, Path(tmp), dry_run), results, dry_run)
        for step in plan:
            left = budget_s - (time.monotonic() - t0)
            if step.picks_backend:  # (a dry run: eager, whose parts need no build)
                best = "eager" if dry_run else fastest(results, ["eager", "torchscript"]) if step.name == "dynamic" \
                    else fastest(results, TORCH_STREAM)
                profile = pass_profile(target, Path(tmp), dry_run, dynamic=[best])
                step.args[step.args.index("--target") + 1] = str(profile)
                step.args += ["--backends", best]
                if step.name == "dynamic":
                    step.args += ["--dynamic-backends", best]
            if left < 5:
                record = {"status": "not run: the budget was spent", "command": " ".join(["python", *step.args])}
            else:
                # a step may use its share and what the steps before it left unused
                remaining = sum(s.share for s in plan[plan.index(step):])
                log = results / "gpu_pass_logs" / f"{step.name}.log"
                record = run_step(step, left * step.share / remaining, env, log)
            doc["steps"].append({"name": step.name, **record})
            print(f"gpu pass: {step.name}: {record['status']} ({record.get('wall_s', 0)} s)", file=sys.stderr)
            manifest.write_text(json.dumps(doc, indent=1))
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    manifest.write_text(json.dumps(doc, indent=1))
    return doc


def prepare_carry(folder: Path) -> Path:
    """What the GPU machine lacks for the pass (apache-tvm and apache-tvm-ffi for its Python 3.12),
    installed into one folder and packed as ``site.tar.xz`` (the wheel alone is ~100 MB; the device
    tool moves 64 MiB a call). Raises when the archive would not fit."""
    import lzma
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
               "manylinux_2_27_x86_64", "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--target", str(site), *CARRIED]
        subprocess.run(cmd, check=True)
        for junk in [*site.rglob("__pycache__"), *(site / p for p in NOT_CARRIED)]:
            shutil.rmtree(junk, ignore_errors=True)
        archive = folder / "site.tar.xz"
        # xz's x86 filter before LZMA2 (``tar xJf`` reads it): libtvm_compiler.so, 248 MB of machine
        # code, is most of the archive, and plain LZMA2 left it over the limit
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
        with lzma.open(archive, "wb", format=lzma.FORMAT_XZ, filters=filters) as xz, \
                tarfile.open(fileobj=xz, mode="w") as tar:
            for p in sorted(site.iterdir()):
                tar.add(p, arcname=p.name)
    mb = archive.stat().st_size / 2**20
    if mb > CARRY_LIMIT_MB:
        raise SystemExit(f"error: {archive} is {mb:.1f} MiB, over the {CARRY_LIMIT_MB} MiB a call can carry")
    print(f"{archive}: {mb:.1f} MiB ({', '.join(CARRIED)})")
    return archive


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_pass.py", description=__doc__.split("\n")[0])
    p.add_argument("--target", default="h100", help="a GPU profile (h100, h200, rtx2080ti)")
    p.add_argument("--results", help="results folder (default: results/<target>)")
    p.add_argument("--budget-min", type=float, default=8.0, help="wall time for all steps (default 8)")
    p.add_argument("--dry-run", action="store_true", help="the same steps on this CPU, timing shortened")
    p.add_argument("--prepare-carry", metavar="DIR", help="pack what the GPU machine lacks into DIR and exit")
    args = p.parse_args(argv)
    if args.prepare_carry:
        prepare_carry(Path(args.prepare_carry))
        return 0
    from harness.cli import UsageError, run_main
    from harness.targets import TargetError, load_target

    def checked_target():
        if not args.budget_min > 0:
            raise UsageError(f"--budget-min must be > 0, got {args.budget_min}")
        try:
            t = load_target(args.target)
        except TargetError as e:
            raise UsageError(str(e)) from None
        if t.device != "cuda":
            raise UsageError(f"{args.target} is not a GPU profile (device {t.device}); the pass measures a GPU "
                             "(--dry-run swaps its device for this CPU)")
        return t

    return run_main(lambda: _run_pass(args, checked_target()), "gpu pass interrupted: gpu_pass.json has the steps run")


def _run_pass(args, t) -> int:
    results = Path(args.results) if args.results else REPO / "results" / t.name
    doc = gpu_pass(args.target, results, args.budget_min * 60, args.dry_run)
    failed = [s["name"] for s in doc["steps"] if s["status"] != "ok"]
    print(f"gpu pass: {len(doc['steps']) - len(failed)}/{len(doc['steps'])} steps ok in {doc['wall_s']} s"
          + (f"; not ok: {', '.join(failed)}" if failed else "") + f"; {results / 'gpu_pass.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
