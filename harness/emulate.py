"""``python -m harness.emulate``: an emulated aarch64 board on this x86 machine, behind TVM's RPC tracker.

Contract
--------
``setup`` (idempotent: each step is skipped when its result is there and current) builds, under
``--dir`` (default ``$XDG_CACHE_HOME/dsnet-harness/emu-aarch64``):

1. the host tools, from Debian's packages when missing (needs root and apt-get; otherwise one
   line naming the packages): ``qemu-user-static`` (the user-mode emulator), ``debootstrap``, and
   ``g++-aarch64-linux-gnu`` (the cross compiler TVM links the boards' libraries with);
2. ``sysroot/``: Debian's arm64 packages of a minimal system with Python 3 (``debootstrap
   --foreign``, every downloaded package unpacked; nothing runs as root inside it);
3. ``sysroot/opt/board-site``: the aarch64 wheels of the TVM this machine compiles with (the same
   ``apache-tvm`` and ``apache-tvm-ffi`` versions, and numpy, ml_dtypes, cloudpickle), from PyPI;
4. ``board-python``: a wrapper that runs the board's Python under ``qemu-aarch64-static -L
   sysroot``, checked by importing TVM on it.

``start --tracker HOST:PORT [--key emu-aarch64]`` starts a tracker there if none answers (with
``--start-tracker``, the default for 127.0.0.1) and the board's RPC server
(:mod:`harness.measure.board_server`, which tells the harness it is emulated), in the background,
and returns once the tracker lists the board; ``stop`` ends what ``start`` started; ``status``
says what is set up and running. Then::

    python -m harness.run --target arm-cortex-a72 --rpc-tracker 127.0.0.1:9190 --rpc-key emu-aarch64

An emulated board proves that the aarch64 artifacts load, run and give eager's outputs; its
latency is qemu's on this machine, and every row it measures says ``emulated = 1``. Errors are
one line (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from harness.cli import UsageError, run_main
from harness.env import cpu_model  # the host's CPU, named in the emulator's description
from harness.measure.remote import parse_tracker

DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
                 "dpkg-deb": "dpkg", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
BOARD_WHEELS = ("numpy", "ml_dtypes", "typing_extensions", "cloudpickle", "psutil")
SITE = "opt/board-site"  # inside the sysroot; the board's PYTHONPATH (qemu -L maps / to the sysroot)
READY_S = 180  # the emulated server imports TVM (~10 s) and its worker does again


def default_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "dsnet-harness" / "emu-aarch64"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: list[str], what: str, log: Path | None = None, **kw) -> str:
    """Run ``cmd``; a failure is one line with the end of its output (the whole kept in ``log``)."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if log is not None:
        log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise UsageError(f"{what} failed (exit {p.returncode}): {tail}" + (f"; full output in {log}" if log else ""))
    return p.stdout


# -- setup ------------------------------------------------------------------------------------------

def host_tools() -> None:
    missing = sorted({pkg for tool, pkg in HOST_PACKAGES.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise UsageError(f"missing host tools: install Debian's {' '.join(missing)} "
                         f"(apt-get install {' '.join(missing)}), then re-run setup")
    _say(f"emulate: installing {' '.join(missing)} (apt-get)")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:  # stale package lists
        _run(["apt-get", "update", "-q"], "apt-get update", env=env)
        _run(cmd, "apt-get install", env=env)


def sysroot(root: Path, suite: str, mirror: str) -> Path:
    sysroot = root / "sysroot"
    done = root / "sysroot.json"
    if done.exists() and json.loads(done.read_text()).get("suite") == suite and _board_python_version(sysroot):
        return sysroot
    if os.geteuid() != 0:
        raise UsageError("debootstrap needs root to unpack Debian's arm64 packages: run setup as root")
    shutil.rmtree(sysroot, ignore_errors=True)
    _say(f"emulate: Debian {suite} arm64 with Python 3 into {sysroot} (debootstrap, ~1 min)")
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3,libstdc++6",
          suite, str(sysroot), mirror], "debootstrap", log=root / "debootstrap.log")
    # --foreign unpacks only the base; the rest lies downloaded: unpack it all (nothing is configured,
    # nothing needs to be: the board runs Python, which needs its files only)
    for deb in sorted((sysroot / "var/cache/apt/archives").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(sysroot)], f"unpacking {deb.name}")
    if not _board_python_version(sysroot):
        raise UsageError(f"no python3 in {sysroot} after unpacking Debian's packages")
    done.write_text(json.dumps({"suite": suite, "mirror": mirror}))
    return sysroot


def _board_python_version(sysroot: Path) -> str | None:
    """``"3.11"`` from the sysroot's ``usr/bin/python3`` link, None if it has no Python."""
    link = sysroot / "usr/bin/python3"
    if not link.is_symlink() and not link.exists():
        return None
    name = os.readlink(link) if link.is_symlink() else link.name
    return name.removeprefix("python") or None


def _host_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        raise UsageError(f"{dist} is not installed here: pip install -e . first") from None


def board_site(root: Path, sysroot: Path) -> Path:
    """The board's TVM: the same versions as this machine's, so the artifacts and the RPC protocol match."""
    pyver = _board_python_version(sysroot)
    want = {"python": pyver, "apache-tvm": _host_version("apache-tvm"),
            "apache-tvm-ffi": _host_version("apache-tvm-ffi")}
    done = root / "board-site.json"
    site = sysroot / SITE
    if done.exists() and json.loads(done.read_text()) == want and (site / "tvm").is_dir():
        return site
    wheels = root / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    shutil.rmtree(site, ignore_errors=True)
    plat = ["--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
            "--platform", "manylinux2014_aarch64", "--python-version", pyver, "--implementation", "cp",
            "--only-binary=:all:"]
    specs = [f"apache-tvm=={want['apache-tvm']}", f"apache-tvm-ffi=={want['apache-tvm-ffi']}", *BOARD_WHEELS]
    _say(f"emulate: aarch64 wheels for Python {pyver}: {', '.join(specs)}")
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    _run([*pip, "download", "-d", str(wheels), *plat, *specs], "pip download (aarch64 wheels)",
         log=root / "pip.log")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), *plat,
          *map(str, sorted(wheels.glob("*.whl")))], "pip install --target (aarch64 wheels)", log=root / "pip.log")
    done.write_text(json.dumps(want))
    return site


def board_python(root: Path, sysroot: Path) -> Path:
    """A host shell script that runs the board's Python under the emulator (what TVM's server uses
    as ``sys.executable`` for its worker: without binfmt_misc the kernel cannot start an aarch64 file)."""
    qemu = shutil.which("qemu-aarch64-static")
    pyver = _board_python_version(sysroot)
    wrapper = root / "board-python"
    wrapper.write_text(f'#!/bin/sh\nexec "{qemu}" -L "{sysroot}" "{sysroot}/usr/bin/python{pyver}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def board_env(root: Path) -> dict:
    qemu = _run([shutil.which("qemu-aarch64-static") or "qemu-aarch64-static", "--version"],
                "qemu-aarch64-static --version").splitlines()[0]
    cpu = cpu_model()
    words = qemu.split()  # "qemu-aarch64 version 7.2.22 (Debian ...)"
    name = " ".join(words[:1] + words[2:3]) if len(words) > 2 and words[1] == "version" else qemu.strip()
    return os.environ | {"PYTHONPATH": f"/{SITE}", "HARNESS_BOARD_EXECUTABLE": str(root / "board-python"),
                         "HARNESS_BOARD_EMULATOR": f"{name}, user mode, on {cpu}"}


def setup(root: Path, suite: str, mirror: str) -> None:
    t0 = time.monotonic()
    root.mkdir(parents=True, exist_ok=True)
    host_tools()
    sr = sysroot(root, suite, mirror)
    board_site(root, sr)
    wrapper = board_python(root, sr)
    got = _run([str(wrapper), "-c", "import platform, tvm; print(platform.machine(), tvm.__version__)"],
               "importing TVM on the emulated board", env=board_env(root)).split()
    if got != ["aarch64", _host_version("apache-tvm")]:
        raise UsageError(f"the emulated board reports {' '.join(got)!r}, expected aarch64 with TVM "
                         f"{_host_version('apache-tvm')}")
    _say(f"emulate: ready in {root} ({time.monotonic() - t0:.0f} s): aarch64 Python with TVM {got[1]}; "
         f"next: python -m harness.emulate start --tracker 127.0.0.1:9190")


# -- start / stop / status ------------------------------------------------------------------------

def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def _spawn(cmd: list[str], log: Path, pidfile: Path, env=None) -> subprocess.Popen:
    """A detached background process (its own session, so ``stop`` ends it and its workers); the
    pid file records its pid and command line, so ``stop`` ends it only while that pid still runs it."""
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env=env, start_new_session=True)
    pidfile.write_text(json.dumps({"pid": p.pid, "cmdline": [str(c) for c in cmd]}))
    return p


def _record(pidfile: Path) -> tuple[int | None, list[str] | None]:
    """``(pid, command line)`` from a pid file; ``(pid, None)`` for an older file of a bare pid."""
    try:
        text = pidfile.read_text()
        doc = json.loads(text)
    except (OSError, ValueError):
        return None, None
    if isinstance(doc, int):
        return doc, None
    if isinstance(doc, dict) and isinstance(doc.get("pid"), int) and isinstance(doc.get("cmdline"), list):
        return doc["pid"], [str(c) for c in doc["cmdline"]]
    return None, None


def _runs(pid: int, cmdline: list[str]) -> bool:
    """Whether process ``pid`` runs ``cmdline`` (its arguments after the program, in order: a script
    started through an interpreter or an emulator has those in front)."""
    try:
        actual = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    want = cmdline[1:]
    return any(actual[i:i + len(want)] == want for i in range(len(actual) - len(want) + 1))


def _alive(pidfile: Path) -> int | None:
    """The pid of the process the pid file describes, when that process still runs what was started."""
    pid, cmdline = _record(pidfile)
    if pid is None or cmdline is None:
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid if _runs(pid, cmdline) else None


def _free_boards(host: str, port: int, key: str) -> int:
    from tvm import rpc

    t = rpc.connect_tracker(host, port)
    try:
        return t.summary().get("queue_info", {}).get(key, {}).get("free", 0)
    finally:
        t.close()


def is_set_up(root: Path) -> bool:
    return (root / "board-python").exists() and (root / "board-site.json").exists()


def start(root: Path, tracker: str, key: str, start_tracker: bool | None) -> None:
    host, port = parse_tracker(tracker)
    if not is_set_up(root):
        raise UsageError(f"no emulated board set up in {root}: run python -m harness.emulate setup first")
    run = root / "run"
    run.mkdir(exist_ok=True)
    if not _answers(host, port):
        if start_tracker is False or (start_tracker is None and host not in ("127.0.0.1", "localhost")):
            raise UsageError(f"no RPC tracker answers at {host}:{port}: start one (python -m tvm.exec.rpc_tracker "
                             f"--host {host} --port {port}) or pass --start-tracker")
        proc = _spawn([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
                       "--port-end", str(port + 1)], run / f"tracker-{port}.log", run / f"tracker-{port}.pid")
        for _ in range(150):
            if _answers(host, port) or proc.poll() is not None:
                break
            time.sleep(0.2)
        if not _answers(host, port):
            raise UsageError(f"the RPC tracker did not come up at {host}:{port}; see {run / f'tracker-{port}.log'}")
        _say(f"emulate: RPC tracker at {host}:{port} (pid {_alive(run / f'tracker-{port}.pid')})")
    pidfile = run / f"server-{key}.pid"
    if _alive(pidfile):
        _say(f"emulate: board {key!r} already running (pid {_alive(pidfile)})")
        return
    server = Path(__file__).resolve().parent / "measure" / "board_server.py"
    log = run / f"server-{key}.log"
    proc = _spawn([str(root / "board-python"), str(server), "--tracker", f"{host}:{port}", "--key", key,
            "--host", "127.0.0.1"], log, pidfile, env=board_env(root))
    _say(f"emulate: starting the emulated board {key!r} (importing TVM under qemu takes ~20 s)")
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = " | ".join(log.read_text().strip().splitlines()[-3:])
            raise UsageError(f"the emulated board exited at start: {tail} (log {log})")
        if _free_boards(host, port, key) > 0:
            _say(f"emulate: board {key!r} registered at {host}:{port}; measure with: python -m harness.run "
                 f"--target arm-cortex-a72 --rpc-tracker {host}:{port} --rpc-key {key}")
            return
        time.sleep(1.0)
    raise UsageError(f"the emulated board did not register with {host}:{port} within {READY_S} s (log {log})")


def _reap(pid: int, wait_s: float = 5.0) -> None:
    """Collect a stopped child of this process (started by :func:`start` here), so it leaves no zombie."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # started by another process: its parent reaps it
            return
        time.sleep(0.1)


def stop(root: Path, names: list[str] | None = None) -> None:
    """End what ``start`` started: every process, or those named (``server-KEY``, ``tracker-PORT``)."""
    run = root / "run"
    stopped = []
    for pidfile in sorted(run.glob("*.pid")) if run.is_dir() else []:
        if names is not None and pidfile.stem not in names:
            continue
        pid, cmdline = _record(pidfile)
        if pid is not None and _alive(pidfile) is None:
            try:
                os.kill(pid, 0)
                _say(f"emulate: not ending pid {pid} ({pidfile.stem}): it no longer runs what was started "
                     f"({'an older pid file without its command line' if cmdline is None else ' '.join(cmdline)})")
            except OSError:
                pass
            pid = None
        if pid:
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                os.kill(pid, signal.SIGTERM)
            stopped.append(f"{pidfile.stem} (pid {pid})")
            _reap(pid)
        pidfile.unlink()
    _say("emulate: stopped " + (", ".join(stopped) if stopped else "nothing (none running)"))


def status(root: Path) -> None:
    print(f"directory: {root}")
    print(f"set up: {'yes' if is_set_up(root) else 'no (python -m harness.emulate setup)'}")
    if (root / "board-site.json").exists():
        print(f"board: {json.loads((root / 'board-site.json').read_text())}")
    run = root / "run"
    for pidfile in sorted(run.glob("*.pid")) if run.is_dir() else []:
        pid = _alive(pidfile)
        print(f"{pidfile.stem}: {'running, pid ' + str(pid) if pid else 'not running'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.emulate", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=None, help=f"where the board lives (default {default_dir()})")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="install the emulator, an arm64 Python and TVM's aarch64 wheels (idempotent)")
    s.add_argument("--suite", default="bookworm", help="Debian release of the board's system (default bookworm)")
    s.add_argument("--mirror", default=DEBIAN_MIRROR)
    s = sub.add_parser("start", help="start the board (and a tracker) in the background")
    s.add_argument("--tracker", default="127.0.0.1:9190", help="HOST:PORT of the RPC tracker (default 127.0.0.1:9190)")
    s.add_argument("--key", default="emu-aarch64", help="the key the board registers under (default emu-aarch64)")
    s.add_argument("--start-tracker", action=argparse.BooleanOptionalAction, default=None,
                   help="start a tracker if none answers (default: yes on 127.0.0.1)")
    s = sub.add_parser("stop", help="stop what start started")
    s.add_argument("--only", help="comma-separated: server-KEY, tracker-PORT (default: everything)")
    sub.add_parser("status", help="what is set up and running")
    args = ap.parse_args(argv)

    def job():
        root = (args.dir or default_dir()).resolve()
        if args.cmd == "setup":
            setup(root, args.suite, args.mirror)
        elif args.cmd == "start":
            start(root, args.tracker, args.key, args.start_tracker)
        elif args.cmd == "stop":
            stop(root, args.only.split(",") if args.only else None)
        else:
            status(root)
        return 0

    return run_main(job, "the set-up resumes where it stopped when run again")


if __name__ == "__main__":
    sys.exit(main())
