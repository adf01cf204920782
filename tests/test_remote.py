"""Remote measurement through TVM's RPC tracker: a tracker and two servers on 127.0.0.1 (key x86)."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.backends.tvm import CrossCompileError, cross_compiler
from harness.measure.remote import parse_tracker
from harness.targets import load_target

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (the test extra installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(*args):
    return subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # own process group: the servers fork workers


@pytest.fixture(scope="module")
def tracker():
    from tvm import rpc

    port = _free_port()
    procs = [_spawn("tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1))]
    try:
        for _ in range(2):
            p = _free_port()
            procs.append(_spawn("tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{port}", "--key", "x86",
                                "--host", "127.0.0.1", "--port", str(p), "--port-end", str(p + 1)))
        deadline = time.monotonic() + 60
        while True:
            try:
                if rpc.connect_tracker("127.0.0.1", port).summary()["queue_info"]["x86"]["free"] == 2:
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the local RPC tracker and servers did not come up in 60 s")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "harness.run", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_full_remote_path(tracker, tmp_path):
    """Compile here, upload, check against eager, time on the board, store with the board's identity."""
    r = cli("--target", "x86", "--rpc-tracker", tracker, "--rpc-key", "x86", "--models", "ds_mbnet_tiny",
            "--input-size", "32", "--tune-minutes", "0", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    env = json.loads((tmp_path / "env.json").read_text())
    boards = env["remote"]["boards"]
    assert len(boards) == 2 and all(b.startswith("x86@127.0.0.1:") for b in boards)
    db = sqlite3.connect(tmp_path / "results.sqlite")
    rows = db.execute("SELECT route, backend, status, device_name, latency_ms_p50, n FROM results").fetchall()
    assert sorted(r[0] for r in rows) == ["0", "1", "2", "3"]
    for _route, backend, status, device, p50, n in rows:
        assert backend == "tvm" and status == "ok" and device in boards and p50 > 0 and n == 30
    assert "onnxruntime" in env["skipped"] and "only tvm" in env["skipped"]["onnxruntime"]


@pytest.mark.parametrize("args,pattern", [
    (["--rpc-tracker", "127.0.0.1:{free}", "--rpc-key", "x86"], "unreachable"),
    (["--rpc-tracker", "{tracker}", "--rpc-key", "pi4"], "no board registered under key 'pi4'"),
    (["--rpc-tracker", "nohost", "--rpc-key", "x86"], "HOST:PORT"),
    (["--rpc-key", "x86"], "go together"),
])
def test_remote_errors_are_one_line(tracker, tmp_path, args, pattern):
    args = [a.format(free=_free_port(), tracker=tracker) for a in args]
    r = cli("--target", "x86", "--models", "ds_mbnet_tiny", "--out", str(tmp_path), *args, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], r.stderr


def test_missing_cross_compiler_says_what_to_install(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(CrossCompileError, match="apt-get install g\\+\\+-aarch64-linux-gnu"):
        cross_compiler({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert parse_tracker("10.0.0.2:9190") == ("10.0.0.2", 9190)


def test_cross_compiled_artifact_is_an_aarch64_elf(tmp_path):
    import shutil

    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("cross compiler aarch64-linux-gnu-g++ absent (apt-get install g++-aarch64-linux-gnu)")
    from harness.backends.tvm import TVMBackend

    target = load_target("arm-cortex-a72").resolve()
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    path = TVMBackend(target.options("tvm")).export(module, torch.randn(1, 3, 16, 16), target, "fp32", tmp_path).path
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and head[4] == 2  # 64-bit
    assert int.from_bytes(head[18:20], "little") == 183  # e_machine EM_AARCH64
