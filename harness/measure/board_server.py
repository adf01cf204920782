"""The RPC server a board runs, with the board's own identity: TVM's ``rpc_server`` plus one function.

Contract
--------
Run on the board (or under an emulator) with the board's Python, which needs only ``apache-tvm``
(and ``cloudpickle``); this file imports nothing from ``harness`` or ``dsnet`` and may be copied
to a board on its own::

    python3 board_server.py --tracker HOST:PORT --key KEY [--host 127.0.0.1] [--port 9090]

It binds loopback unless ``--host`` names another address: the server runs whatever library it is
sent, so on any other address everyone who can reach it runs code on the board (a one-line warning
says so).

It serves exactly what ``python -m tvm.exec.rpc_server`` serves, and registers
``harness.board_info``, which returns a JSON object: ``machine`` (``platform.machine()``),
``emulated`` (true when the board is an emulator), ``emulator`` (what emulates it, or null),
``cpu`` (the CPU model the board sees) and ``tvm`` (its version). The harness
(:mod:`harness.measure.remote`) asks for it on every session and labels each row measured on an
emulated board as emulated. A board that runs plain ``tvm.exec.rpc_server`` has no such function
and is taken as a real device.

Emulation is known two ways: the launcher says so (``HARNESS_BOARD_EMULATOR``, set by
``python -m harness.emulate start``), or the board sees another architecture's CPU in
``/proc/cpuinfo`` (qemu-user passes the host's file through: an aarch64 process that reads an x86
``vendor_id`` runs under emulation).

Under qemu-user without binfmt_misc the kernel cannot execute an aarch64 binary, and TVM's server
starts its worker with ``sys.executable``: ``HARNESS_BOARD_EXECUTABLE`` names a wrapper (a shell
script that runs the emulator on the board's Python) to use instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

# an x86 /proc/cpuinfo has vendor_id and flags; an ARM one has "CPU implementer" and Features
_X86_MARKERS = ("vendor_id", "flags")
_ARM_MARKERS = ("CPU implementer", "Features")


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _field(text: str, *names: str) -> str | None:
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return None


def board_info() -> str:
    text, machine = _cpuinfo(), platform.machine()
    keys = {line.partition(":")[0].strip() for line in text.splitlines()}
    looks_x86 = all(k in keys for k in _X86_MARKERS)
    looks_arm = any(k in keys for k in _ARM_MARKERS)
    foreign = (machine in ("aarch64", "arm64", "armv7l") and looks_x86) or (machine == "x86_64" and looks_arm)
    guessed = f"unknown (an {machine} process reading another architecture's /proc/cpuinfo)" if foreign else None
    emulator = os.environ.get("HARNESS_BOARD_EMULATOR") or guessed
    import tvm

    return json.dumps({"machine": machine, "emulated": emulator is not None, "emulator": emulator,
                       "cpu": _field(text, "model name", "Model", "Hardware") or machine, "tvm": tvm.__version__})


def _register() -> None:
    """Runs in TVM's server worker (sent there by value: this module is ``__main__``)."""
    import tvm

    tvm.register_global_func("harness.board_info", board_info, override=True)


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    ap.add_argument("--key", required=True, help="the key the board registers under")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback: the server runs "
                                                        "whatever library it is sent)")
    ap.add_argument("--port", type=int, default=9090)
    ap.add_argument("--port-end", type=int, default=9199)
    args = ap.parse_args(argv)
    if not _loopback(args.host):
        print(f"warning: the board server listens on {args.host}: whoever can reach that address can run code on "
              "this board (it runs every library it is sent)", file=sys.stderr)
    if os.environ.get("HARNESS_BOARD_EXECUTABLE"):
        sys.executable = os.environ["HARNESS_BOARD_EXECUTABLE"]
    from tvm import rpc

    host, _, port = args.tracker.rpartition(":")
    server = rpc.Server(args.host, args.port, args.port_end, key=args.key, tracker_addr=(host, int(port)),
                        server_init_callback=_register)
    server.proc.join()


if __name__ == "__main__":
    main()
