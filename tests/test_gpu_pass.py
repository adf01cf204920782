"""The GPU pass's dry run: every step of benchmarks/gpu_pass.py on this CPU, so that no GPU minute is
spent on a Python error, a missing file or a wrong column."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from harness.results.layout import DYNAMIC_COLUMNS, LUT_COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_pass_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "h100"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_pass.py"), "--target", "h100", "--dry-run",
                        "--results", str(out), "--budget-min", "10"], cwd=ROOT, capture_output=True, text=True)
    doc = json.loads((out / "gpu_pass.json").read_text())
    assert r.returncode == 0, [(s["name"], s["status"], s.get("output_tail", "")[-800:]) for s in doc["steps"]]
    assert [s["name"] for s in doc["steps"]] == ["static-mobilenet", "static-dsmbnet", "static-tvm", "dynamic",
                                                 "table2", "pytest", "report"]
    lut = pd.read_csv(out / "lut.csv", dtype={"route": str})
    assert list(lut.columns) == LUT_COLUMNS and (lut.status == "ok").all()
    # every torch-stream backend plain and as a graph's replay (here a CPU: said, and timed plainly)
    assert {"eager", "eager+graphs", "torchscript", "torchscript+graphs", "tvm"} <= set(lut.backend)
    graphs = lut[lut.backend.str.endswith("+graphs")]
    assert graphs.backend_details.str.contains("not captured: the target is not a GPU").all()
    dyn = pd.read_csv(out / "dynamic.csv", dtype={"name": str})
    assert list(dyn.columns) == DYNAMIC_COLUMNS
    assert {"segment", "dispatch", "route", "deployed", "table2"} <= set(dyn.kind)
    assert (out / "tables" / "table2.md").is_file()
    tail = next(s["output_tail"] for s in doc["steps"] if s["name"] == "pytest")
    # each step's whole output beside the manifest
    assert {p.stem for p in (out / "gpu_pass_logs").iterdir()} == {s["name"] for s in doc["steps"]}
    assert "passed" in tail or "skipped" in tail
    env = json.loads((out / "env.json").read_text())
    assert env["target"] == "h100"
