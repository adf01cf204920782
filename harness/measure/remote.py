"""Remote boards through TVM's RPC tracker (``python -m tvm.exec.rpc_tracker`` / ``rpc_server``).

Contract
--------
``Farm.connect("HOST:PORT", key, wait_s)`` checks the tracker and the boards registered under
``key`` (waiting up to ``wait_s`` for one to be free); ``farm.acquire()`` takes a session on the
next free board for one task (the harness runs one task per board in parallel and gives each
session back at once). Each :class:`Board` is stamped with its identity (``key@host:port`` as the
tracker hands it out).
``board.load(artifact)`` uploads a TVM-built shared library and returns a :class:`RemoteModel`,
whose ``run(x)`` returns the outputs as torch tensors (for the check against eager) and
``measure(x, protocol)`` times it *on the board* with TVM's ``time_evaluator`` following the one
protocol: a warm-up of at least ``warmup_calls`` calls and ``warmup_ms``, then ``repeat``
samples of ``number`` calls, ``number`` grown until a sample lasts ``min_repeat_ms``; the samples
are summarized by :func:`harness.measure.protocol.summarize` like every other measurement.

The artifacts come from a backend's ``export`` (cross-compiled by ``harness.backends.tvm``).

A board that runs :mod:`harness.measure.board_server` says what it is (``board_info``): a board
that is an emulator (``python -m harness.emulate``) has ``emulated`` set, its identity says
``(emulated: ...)`` and every row it measures is stored with ``emulated = 1``; ``farm.info`` is
what the first board handed out said.

Every failure a user can meet is a :class:`RemoteError` with one line saying what to do: tracker
unreachable, no board under the key, no free board in time.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.backends.base import one_line
from harness.measure.pipeline import check_output
from harness.measure.protocol import Measurement, Protocol


class RemoteError(RuntimeError):
    """A remote set-up problem, one line with what to do."""


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RemoteError(f"--rpc-tracker takes HOST:PORT, got {text!r}")
    return host, int(port)


@dataclass
class Board:
    session: object
    identity: str
    info: dict = field(default_factory=dict)  # what the board says of itself (harness.board_info)

    @property
    def emulated(self) -> bool:
        return bool(self.info.get("emulated"))

    def close(self) -> None:
        # TVM closes the socket only when the session and everything remote made from it (module, VM,
        # device, tensors) are collected; some of those sit in reference cycles, which the cyclic
        # collector would free at some later time while the tracker still counts the board as busy
        self.session = None
        gc.collect()

    def load(self, artifact: Path) -> RemoteModel:
        from tvm import relax

        # a unique remote name per artifact: the board's dlopen would hand back a library already
        # loaded under the same path
        name = f"{Path(artifact).parent.name}-{Path(artifact).name}"
        self.session.upload(str(artifact), name)
        lib = self.session.load_module(name)
        dev = self.session.cpu(0)
        return RemoteModel(relax.VirtualMachine(lib, dev), dev)


class RemoteModel:
    """A Relax VM on a board, called through ``set_input``/``invoke_stateful`` (the RPC-safe path)."""

    def __init__(self, vm, dev):
        self.vm, self.dev = vm, dev

    def _set(self, x: torch.Tensor) -> None:
        import tvm

        self.vm.set_input("main", tvm.runtime.tensor(x.detach().cpu().numpy(), self.dev))

    def run(self, x: torch.Tensor):
        self._set(x)
        self.vm.invoke_stateful("main")
        out = self.vm.get_outputs("main")
        outs = [torch.from_numpy(np.asarray(o.numpy())) for o in (out if isinstance(out, (list, tuple)) else [out])]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def measure(self, x: torch.Tensor, protocol: Protocol) -> Measurement:
        self._set(x)
        warm = self.vm.time_evaluator("invoke_stateful", self.dev, number=protocol.warmup_calls, repeat=1,
                                      min_repeat_ms=int(protocol.warmup_ms))
        warm("main")
        timed = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=protocol.repeat,
                                       min_repeat_ms=int(protocol.min_repeat_ms))
        res = timed("main")
        # TVM grows ``number`` itself to reach min_repeat_ms; each result is the mean of one sample
        return Measurement([float(s) * 1e3 for s in res.results], number=0)


class Farm:
    """The boards under one key of a tracker. Sessions are taken per task and given back at once
    (:meth:`acquire`), so the tracker shares the boards with other clients, such as TVM's tuner."""

    def __init__(self, host: str, port: int, key: str, boards: list[str], info: dict | None = None):
        self.host, self.port, self.key, self.boards = host, port, key, boards
        self.info = info or {}  # what the first board handed out says of itself (board_info)

    @property
    def emulated(self) -> bool:
        return bool(self.info.get("emulated"))

    @property
    def tracker_addr(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def connect(cls, tracker: str, key: str, wait_s: float = 60.0) -> Farm:
        """Check the tracker answers and holds boards under ``key``, one of them free within ``wait_s``."""
        import socket

        from tvm import rpc

        host, port = parse_tracker(tracker)
        try:  # TVM's own connect retries for a minute; an address that refuses is known at once
            socket.create_connection((host, port), timeout=5).close()
            t = rpc.connect_tracker(host, port)
            summary = t.summary()
        except Exception as e:  # OSError, or TVM's RuntimeError after its retries
            raise RemoteError(f"RPC tracker {host}:{port} unreachable ({type(e).__name__}): start one with "
                              f"`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`") from None
        deadline = time.monotonic() + wait_s
        while True:
            q = summary.get("queue_info", {}).get(key)
            if q is None:
                keys = ", ".join(sorted(summary.get("queue_info", {}))) or "none"
                raise RemoteError(f"no board registered under key {key!r} at {host}:{port} (keys: {keys}): on the "
                                  f"board run `python -m tvm.exec.rpc_server --tracker {host}:{port} --key {key}`")
            if q.get("free", 0) > 0:
                break
            if time.monotonic() > deadline:
                raise RemoteError(f"no free board under key {key!r} at {host}:{port} after {wait_s:.0f} s "
                                  f"({q.get('pending', 0)} request(s) pending): wait, or add boards")
            time.sleep(1.0)
            summary = t.summary()
        boards = [f"{key}@{s['addr'][0]}:{s['addr'][1]}" for s in summary.get("server_info", [])
                  if s.get("key", "").split(":")[-1] == key]
        t.close()
        probe = _request(rpc.connect_tracker(host, port), key)  # is it a device or an emulator?
        probe.close()
        return cls(host, port, key, boards or [f"{key}@?"], probe.info)

    def acquire(self) -> Board:
        """A session on the next free board (blocks until the tracker hands one out)."""
        from tvm import rpc

        return _request(rpc.connect_tracker(self.host, self.port), self.key)


def _request(tracker, key: str) -> Board:
    """A session on one free board, with the board's address (TVM's ``TrackerSession.request``,
    keeping the address it hands out so every result can name its board)."""
    from tvm import rpc
    from tvm.rpc import base

    try:
        if tracker._sock is None:
            tracker._connect()
        base.sendjson(tracker._sock, [base.TrackerCode.REQUEST, key, "", 1])
        value = base.recvjson(tracker._sock)
        if value[0] != base.TrackerCode.SUCCESS:
            raise RemoteError(f"the tracker refused a session under key {key!r}: {value}")
        url, port, matchkey = value[1]
        session = rpc.connect(url, port, matchkey, session_timeout=0)
        info = board_info(session)
        emulated = f" (emulated: {info.get('emulator')})" if info.get("emulated") else ""
        return Board(session, f"{key}@{url}:{port}{emulated}", info)
    finally:
        tracker.close()


def board_info(session) -> dict:
    """What a board running :mod:`harness.measure.board_server` says of itself (machine, emulated,
    emulator, cpu, tvm); ``{}`` for a board running plain ``tvm.exec.rpc_server``."""
    import json

    try:
        return json.loads(session.get_function("harness.board_info")())
    except Exception:  # no such function on the board: a plain TVM server, taken as a real device
        return {}


ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}  # ELF e_machine


def elf_arch(path: Path) -> str | None:
    """The architecture a shared library was built for, from its ELF header (None: not ELF, or unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return ELF_MACHINES.get(int.from_bytes(head[18:20], "little" if head[5] == 1 else "big"))


def board_trial(board: Board, result, example: torch.Tensor, ref, precision: str, protocol: Protocol):
    """Check an exported artifact (a :class:`harness.measure.pipeline.Result` with ``artifact``)
    against eager's ``ref`` on ``board`` and time it there: the same statuses as a local trial."""
    built, board_arch = elf_arch(Path(result.artifact)), board.info.get("machine")
    if built and board_arch and built != board_arch:  # the board's loader would only say "cannot open"
        return result.replace(status="measure_failed",
                              error=f"the artifact is an {built} library and the board is {board_arch}: "
                                    "built for another target")
    try:
        model = board.load(result.artifact)
        problem = check_output(model.run(example), ref, precision)
        if problem:
            return result.replace(status="check_failed", error=problem)
        return result.replace(measurement=model.measure(example, protocol))
    except Exception as e:  # recorded; the sweep goes on
        return result.replace(status="measure_failed", error=one_line(e))
