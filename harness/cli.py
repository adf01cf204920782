"""What the command-line tools share: options, profile opening, machine capture, progress, exit codes.

Contract
--------
No CLI imports another CLI; each imports this module for:

- :class:`UsageError`: bad input, printed as one line ``error: ...`` with exit code 2 by
  :func:`run_main`, which also turns Ctrl-C into exit 130 with a line saying what was kept;
- :func:`add_results_option`: ``--results DIR`` (alias ``--out``), the results folder in every CLI;
  :func:`open_results`: the folder created, checked writable, locked against a second run, and
  its store opened (a corrupt store is one line saying what to do);
- :func:`open_target`: a resolved profile, threads configured, or a :class:`UsageError` naming
  the profiles this machine can run;
- :func:`capture_machine`: the environment, the device name and a mismatch flag, with warnings;
- :func:`csv_list`, :func:`new_run_id`;
- :class:`Progress`: a tqdm bar on a terminal, rate-limited plain lines (tqdm's meter) otherwise;
  called as ``progress(label, text)`` once per step.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from harness import env as envmod
from harness import interrupts
from harness.results.layout import Layout
from harness.results.store import FolderLock, ResultStore, StoreError
from harness.targets import Target, TargetError, known_targets, load_target

DEFAULT_MODELS = ("ds_mbnet", "mobilenet_v1")  # what harness.run measures and harness.tune tunes by default
MAX_INPUT_SIZE = 4096


# what an output that cannot be written raises: no space, a quota, a read-only file system, no permission
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class UsageError(Exception):
    """Bad input: printed as one line, exit code 2."""


def add_results_option(parser: argparse.ArgumentParser, default_help: str = "results/<target>") -> None:
    parser.add_argument("--results", "--out", dest="results", type=Path, metavar="DIR",
                        help=f"results folder (default: {default_help}); --out is an alias")


def results_layout(results: Path | None, target_name: str, quick: bool = False) -> Layout:
    return Layout(results) if results is not None else Layout.default(target_name, quick)


def open_results(layout: Layout):
    """Create the results folder, check it is writable, take its lock and open its store:
    ``(lock, store)``. A file in the way, no permission, a corrupt store or another run on the same
    folder is a :class:`UsageError` (one line)."""
    root = layout.root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UsageError(f"results folder {root} cannot be created: it or a folder above it is a file") from None
    except PermissionError:
        raise UsageError(f"results folder {root} cannot be created: permission denied") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"results folder {root} is not writable")
    try:
        lock = FolderLock(root).acquire()
        return lock, ResultStore(layout.store)
    except StoreError as e:
        raise UsageError(str(e)) from None


def csv_list(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def names_option(option: str, text: str | None, valid: list[str], default: list[str]) -> list[str]:
    """A comma-separated option: the default when absent; an empty list, a duplicate or an unknown
    name is a :class:`UsageError`."""
    names = csv_list(text)
    if names is None:
        return list(default)
    if not names:
        raise UsageError(f"{option} names nothing; valid: {', '.join(valid)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"{option} names {', '.join(dupes)} more than once")
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise UsageError(f"unknown {option.lstrip('-').rstrip('s')}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return names


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _runs_here_quietly(name: str) -> bool:
    try:
        return load_target(name).runs_here()[0]
    except TargetError:
        return False


def open_target(name: str, remote: bool = False, threads: int | None = None):
    """The resolved profile ``name``, threads configured; :class:`UsageError` for an unknown or
    malformed profile, or one this machine cannot run (naming the profiles that can). ``remote``:
    measured on boards through an RPC tracker, so the profile's architecture need not be this one's.
    ``threads``: the profile's thread count overridden (``--threads``; 0: all physical cores)."""
    try:
        target = load_target(name)
    except TargetError as e:
        raise UsageError(str(e)) from None
    if threads is not None:
        logical = os.cpu_count() or 1
        if not 0 <= threads <= logical:
            raise UsageError(f"--threads must be 0 (all physical cores) to {logical} (this machine's logical cores), "
                             f"got {threads}")
        target = dataclasses.replace(target, threads=threads)
    if remote and target.device != "cpu":
        raise UsageError(f"--rpc-tracker measures CPU boards; profile '{target.name}' is a {target.device} profile")
    runnable, why = (True, "") if remote else target.runs_here()
    if not runnable:
        here = [n for n in known_targets() if _runs_here_quietly(n)]
        raise UsageError(f"target '{target.name}' cannot run on this machine: {why}. "
                         f"Profiles that can run here: {', '.join(here) or 'none'}")
    try:
        target = target.resolve()
    except TargetError as e:  # e.g. more threads than this machine has
        raise UsageError(str(e)) from None
    envmod.configure_process(target.threads, target.device)  # before any backend library loads
    return target


def capture_machine(target: Target, strict: bool = False, local_device: bool = True):
    """``(env, device name, device mismatch)``, warning on stderr about a mismatched device or a
    busy machine (an error line under ``strict``: the caller exits 3). ``local_device=False`` when
    the target's device is elsewhere (boards through a tracker): this machine is not checked against it."""
    env = envmod.capture(target.device)
    device_name = env.get("gpu_name") if target.device == "cuda" else env["cpu_model"]
    device_mismatch = bool(target.expected_device) and target.expected_device not in (device_name or "")
    if device_mismatch and local_device:
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


class Progress:
    """Progress of ``total`` steps on stderr: a tqdm bar on a terminal; elsewhere (a log file, CI)
    one plain line with tqdm's meter per step, at most one per ``every_s`` seconds (and the last)."""

    def __init__(self, total: int, desc: str = "", every_s: float = 0.0, stream=None):
        from tqdm import tqdm

        self.stream = stream or sys.stderr  # looked up now, so a replaced stderr is honoured
        self.total, self.desc, self.every_s = total, desc, every_s
        self.tty = self.stream.isatty()
        self.done, self.start, self.last = 0, time.monotonic(), -float("inf")
        self.bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=True) if self.tty else None

    def note(self, text: str) -> None:
        """One line about long work between steps (a build of minutes), without advancing."""
        if self.bar is not None:
            self.bar.write(f"{self.desc}: {text}", file=self.stream)
            return
        self.stream.write(f"{self.desc} [{time.monotonic() - self.start:.0f} s]: {text}\n")
        self.stream.flush()

    def __call__(self, label: str, text: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{label}: {text}"[:100], refresh=False)
            self.bar.update(1)
            if self.done >= self.total:
                self.bar.close()
            return
        now = time.monotonic()
        if self.done < self.total and now - self.last < self.every_s:
            return
        self.last = now
        from tqdm import tqdm

        meter = tqdm.format_meter(self.done, self.total, now - self.start, ncols=60, prefix=self.desc)
        self.stream.write(f"{meter}  {label}: {text}\n")
        self.stream.flush()


def run_main(main: Callable[[], int], interrupted: str) -> int:
    """Run a CLI's body: :class:`UsageError` -> one line and exit 2; Ctrl-C -> ``interrupted`` and
    exit 130. TorchScript's and torch.export's deprecation notices are not the user's business."""
    envmod.quiet_library_warnings()
    interrupts.install()
    try:
        return main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only or forbidden output: one line, what is kept
        if e.errno not in WRITE_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot write{where}: {e.strerror or e} ({interrupted})", file=sys.stderr)
        return 2
    except sqlite3.OperationalError as e:  # the store on a full or read-only disk
        if not any(s in str(e) for s in ("disk is full", "readonly", "disk I/O error")):
            raise
        print(f"error: the results store cannot be written: {e} ({interrupted})", file=sys.stderr)
        return 2
