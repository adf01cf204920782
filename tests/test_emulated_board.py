"""The emulated aarch64 board (``python -m harness.emulate``) and how its rows are labelled.

The first tests need nothing: how a board says it is emulated, how its rows and tables say so.
The ``emulator`` tests run the aarch64 artifacts for real under qemu-user behind a local tracker;
they skip (saying how to set the board up) where ``python -m harness.emulate setup`` has not run.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from harness import emulate
from harness.measure import board_server
from harness.reporting.common import EMULATED_NOTE, cell_notes
from harness.reporting.tables import _latency, env_line

ROOT = Path(__file__).resolve().parent.parent
X86_CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2\n"
ARM_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
               "Model\t: Raspberry Pi 4\n")


@pytest.mark.parametrize("machine,cpuinfo,env,emulated", [
    ("aarch64", X86_CPUINFO, None, True),  # qemu-user passes the host's /proc/cpuinfo through
    ("aarch64", ARM_CPUINFO, None, False),  # a real board
    ("aarch64", ARM_CPUINFO, "qemu-aarch64 7.2, user mode", True),  # the launcher says so
    ("x86_64", X86_CPUINFO, None, False),
])
def test_board_says_whether_it_is_emulated(monkeypatch, machine, cpuinfo, env, emulated):
    monkeypatch.setattr(board_server.platform, "machine", lambda: machine)
    monkeypatch.setattr(board_server, "_cpuinfo", lambda: cpuinfo)
    monkeypatch.delenv("HARNESS_BOARD_EMULATOR", raising=False)
    if env:
        monkeypatch.setenv("HARNESS_BOARD_EMULATOR", env)
    info = json.loads(board_server.board_info())
    assert info["machine"] == machine and info["emulated"] is emulated
    assert (info["emulator"] is not None) is emulated
    if env:
        assert info["emulator"] == env
    assert info["cpu"] == ("Raspberry Pi 4" if cpuinfo is ARM_CPUINFO else "AMD EPYC")


def test_emulated_rows_are_marked_in_tables_and_environment():
    rows = pd.DataFrame({"latency_ms_p50": [9.0, 4.0], "valid": [1, 0], "emulated": [1, 0],
                         "backend_details": ["{}", "{}"]}, index=["x0.25", "x0.5"])
    assert _latency(rows, "x0.25") == "9.000§" and _latency(rows, "x0.5") == "4.000*"
    assert cell_notes(pd.DataFrame({"tvm p50 (ms)": ["9.000§"]})) == [EMULATED_NOTE]
    assert cell_notes(pd.DataFrame({"tvm p50 (ms)": ["9.000"]})) == []
    line = env_line({"device_name": "emu@127.0.0.1:9090", "remote": {"emulated": True}})
    assert line.startswith("Environment: EMULATED board (not the device")
    assert "EMULATED" not in env_line({"device_name": "pi4@10.0.0.2:9090", "remote": {"emulated": False}})


def test_emulate_without_setup_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness.emulate", "--dir", str(tmp_path / "none"), "start",
                        "--tracker", "127.0.0.1:1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: no emulated board set up in {tmp_path / 'none'}: "
                                             "run python -m harness.emulate setup first"]


# -- on the emulated board ------------------------------------------------------------------------

BOARD_DIR = Path(os.environ.get("HARNESS_EMU_DIR") or emulate.default_dir())
needs_board = pytest.mark.skipif(
    not emulate.is_set_up(BOARD_DIR),
    reason=f"no emulated aarch64 board in {BOARD_DIR}: python -m harness.emulate setup (root, Debian)")


@pytest.fixture(scope="module")
def board():
    """A tracker and the emulated board on free ports, stopped afterwards (only those)."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (the test extra installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = f"emu-test-{os.getpid()}"
    try:
        emulate.start(BOARD_DIR, f"127.0.0.1:{port}", key, start_tracker=True)
        yield f"127.0.0.1:{port}", key
    finally:
        emulate.stop(BOARD_DIR, [f"server-{key}", f"tracker-{port}"])


@pytest.mark.emulator
@needs_board
def test_every_tiny_route_runs_on_the_emulated_board(board, tmp_path):
    """Cross-compiled here, uploaded, run under qemu, checked against eager, timed, labelled emulated."""
    tracker, key = board
    r = subprocess.run([sys.executable, "-m", "harness.run", "--target", "arm-cortex-a72", "--rpc-tracker", tracker,
                        "--rpc-key", key, "--models", "ds_mbnet_tiny,mobilenet_v1", "--routes", "0,1,2,3,x0.25",
                        "--input-size", "32", "--results", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = sqlite3.connect(tmp_path / "results.sqlite").execute(
        "SELECT model, route, status, error, emulated, device_mismatch, device_name, latency_ms_p50 "
        "FROM results").fetchall()
    assert sorted((m, route) for m, route, *_ in rows) == [("ds_mbnet_tiny", "0"), ("ds_mbnet_tiny", "1"),
                                                             ("ds_mbnet_tiny", "2"), ("ds_mbnet_tiny", "3"),
                                                             ("mobilenet_v1", "x0.25")]
    for _m, _route, status, error, emulated, mismatch, device, p50 in rows:
        assert status == "ok", error  # ok means: ran on the board and matched eager within fp32 tolerance
        assert emulated == 1 and mismatch == 1 and "(emulated: qemu-aarch64" in device and p50 > 0
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["remote"]["emulated"] is True and env["remote"]["board_info"]["machine"] == "aarch64"
    assert "is emulated" in r.stdout + r.stderr
    table = (tmp_path / "tables" / "slimmable_table3.md").read_text()
    assert "§" in table and EMULATED_NOTE in table and "EMULATED board" in table


@pytest.mark.emulator
@needs_board
def test_an_x86_library_on_the_aarch64_board_is_a_failed_row(board, tmp_path):
    """The wrong artifact fails in one line, and the board still takes the next one."""
    from harness.backends.tvm import TVMBackend
    from harness.measure.pipeline import Result
    from harness.measure.protocol import Protocol
    from harness.measure.remote import Farm, board_trial
    from harness.targets import load_target

    tracker, key = board
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 16, 16)
    ref = module(x)
    artifacts = {}
    for name in ("x86", "arm-cortex-a72"):
        target = load_target(name).resolve()
        (tmp_path / name).mkdir()
        out = TVMBackend(target.options("tvm")).export(module, x, target, "fp32", tmp_path / name)
        artifacts[name] = Result("ok", artifact=out.path)
    farm = Farm.connect(tracker, key)
    assert farm.emulated
    protocol = Protocol(warmup_calls=1, warmup_ms=1, repeat=3, min_repeat_ms=1)
    results = []
    for name in ("x86", "arm-cortex-a72"):
        b = farm.acquire()
        try:
            results.append(board_trial(b, artifacts[name], x, ref, "fp32", protocol))
        finally:
            b.close()
    wrong, right = results
    print(f"the x86 library on the board: {wrong.status}: {wrong.error}")  # shown with -s
    assert wrong.status == "measure_failed" and "\n" not in wrong.error
    assert "an x86_64 library and the board is aarch64" in wrong.error
    assert right.status == "ok" and right.measurement is not None


def test_an_artifacts_architecture_is_read_from_its_elf_header(tmp_path):
    """What board_trial compares with the board's machine before uploading."""
    import platform

    from harness.measure.remote import elf_arch

    assert elf_arch(Path(sys.executable).resolve()) == platform.machine()
    (tmp_path / "model.so").write_bytes(b"not an ELF file at all")
    assert elf_arch(tmp_path / "model.so") is None and elf_arch(tmp_path / "missing.so") is None
