"""Target profiles: named data files in ``targets/`` (TOML), validated on load.

Contract
--------
``load_target(name)`` reads ``targets/<name>.toml`` and returns a :class:`Target`. Every key is
checked against :data:`SCHEMA`: an unknown key or a wrong type raises :class:`TargetError` naming
the file and the key. ``known_targets()`` lists the names. Adding a device is adding a file.

A top-level table named after a backend (``[tvm]``, ``[onnxruntime]``, ...) holds that backend's
options; the backend owns their schema and meaning (``Backend.OPTIONS``) and checks them on load,
so the core never reads a backend's options. ``target.options(name)`` returns the table.

Values ``"auto"`` are resolved for the local machine by :meth:`Target.resolve`: the expected
device name (CPU model) and the thread count (``0``: all physical cores); a backend resolves its
own (e.g. TVM's ``mcpu``).
"""

from __future__ import annotations

import copy
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness import env
from harness.backends import backend_class, list_backends
from harness.measure.protocol import Protocol
from harness.schema import SchemaError, check_table, type_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

# key: (type(s), required). Nested tables have their own schema; a table named after a backend is
# checked by that backend.
SCHEMA = {
    "name": (str, True),
    "description": (str, False),
    "device": (str, True),              # "cpu" | "cuda"
    "arch": (str, False),               # machine the profile measures on: x86_64, aarch64
    "expected_device": (str, False),    # CPU model / GPU name, or "auto"
    "backends": (list, True),
    "dynamic_backends": (list, False),  # backends the dynamic engine is measured on (default: all)
    "precisions": (list, False),
    "batch_sizes": (list, False),
    "input_size": (int, False),
    "threads": (int, False),
    "protocol": (dict, False),
}
PROTOCOL_SCHEMA = {"warmup_calls": (int, False), "warmup_ms": ((int, float), False),
                   "repeat": (int, False), "min_repeat_ms": ((int, float), False),
                   "cuda_graphs": (bool, False), "max_ci_fraction": ((int, float), False),
                   "min_measured_ms": ((int, float), False), "budget_s": ((int, float), False)}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16")


class TargetError(ValueError):
    """An unknown or malformed target profile."""


def known_targets(directory: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


@dataclass
class Target:
    name: str
    device: str
    backends: list[str]
    path: str = ""
    description: str = ""
    arch: str = ""
    expected_device: str = "auto"
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    input_size: int = 224
    threads: int = 0
    backend_options: dict[str, dict] = field(default_factory=dict)  # {backend: its profile table}
    dynamic_backends: list[str] | None = None
    protocol: Protocol = field(default_factory=Protocol)

    def options(self, backend: str) -> dict:
        """The profile's table for ``backend`` (a copy; empty when the profile has none)."""
        return copy.deepcopy(self.backend_options.get(backend, {}))

    def resolve(self) -> Target:
        """A copy with the ``auto`` values filled in for this machine."""
        t = copy.deepcopy(self)
        if t.device == "cpu":
            if t.expected_device == "auto":
                t.expected_device = env.cpu_model()
            if t.threads <= 0:
                t.threads = env.physical_cores()
        logical = os.cpu_count() or 1
        if t.threads > logical:
            raise TargetError(f"{t.path}: key 'threads' is {t.threads}, more than this machine's {logical} logical "
                              "cores; 0 means all physical cores")
        return t

    def runs_here(self) -> tuple[bool, str]:
        """Whether this machine can measure the profile, and if not, why (one line)."""
        if self.device == "cuda":
            try:
                import torch

                ok = torch.cuda.is_available()
            except ImportError:
                ok = False
            if not ok:
                return False, "it needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False)"
        machine = platform.machine().lower()
        if self.arch and self.arch not in (machine, {"amd64": "x86_64", "arm64": "aarch64"}.get(machine)):
            return False, (f"it measures on {self.arch} and this machine is {machine}; measure on the board "
                           "through TVM's RPC tracker with --rpc-tracker HOST:PORT --rpc-key KEY")
        return True, ""


def load_target(name: str, directory: Path = TARGETS_DIR) -> Target:
    path = Path(name) if name.endswith(".toml") else directory / f"{name}.toml"
    if not path.is_file():
        raise TargetError(f"unknown target '{name}'; known targets: {', '.join(known_targets(directory))}")
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{where}: not valid TOML: {e}") from None

    backend_options = {k: data.pop(k) for k in list(data) if k in list_backends() and isinstance(data[k], dict)}
    try:
        check_table(data, SCHEMA, where)
        check_table(data.get("protocol", {}), PROTOCOL_SCHEMA, f"{where} [protocol]")
        for name, table in backend_options.items():
            check_table(table, backend_class(name).OPTIONS, f"{where} [{name}]")
            for key in backend_class(name).PATH_OPTIONS:  # relative to the profile, wherever the run starts
                if key in table:
                    table[key] = str((path.parent / table[key]).resolve())
    except SchemaError as e:
        raise TargetError(str(e)) from None
    if data["device"] not in DEVICES:
        raise TargetError(f"{where}: key 'device' must be one of {', '.join(DEVICES)}, got '{data['device']}'")
    names = tuple(list_backends())
    for key, kind, allowed in (("backends", str, names), ("dynamic_backends", str, names),
                               ("precisions", str, PRECISIONS),
                               ("batch_sizes", int, None)):
        if key in data and not data[key]:
            raise TargetError(f"{where}: key '{key}' is empty; leave it out for the default or name at least one")
        for v in data.get(key, []):
            if not isinstance(v, kind) or isinstance(v, bool) or (allowed and v not in allowed):
                valid = f"one of {', '.join(allowed)}" if allowed else type_name(kind)
                raise TargetError(f"{where}: key '{key}' holds {v!r}; each entry must be {valid}")
        twice = sorted({str(v) for v in data.get(key, []) if data[key].count(v) > 1})
        if twice:
            raise TargetError(f"{where}: key '{key}' names {', '.join(twice)} more than once")
    for key, least in (("threads", 0), ("input_size", 32)):
        if key in data and data[key] < least:
            raise TargetError(f"{where}: key '{key}' must be at least {least}, got {data[key]}")
    if any(b < 1 for b in data.get("batch_sizes", [])):
        raise TargetError(f"{where}: key 'batch_sizes' holds {min(data['batch_sizes'])}; each entry must be at least 1")
    if data["name"] != path.stem:
        raise TargetError(f"{where}: key 'name' is '{data['name']}' but the file is named '{path.stem}'")
    try:
        protocol = Protocol(**data.pop("protocol", {}))
    except ValueError as e:
        raise TargetError(f"{where} [protocol]: {e}") from None
    return Target(path=where, protocol=protocol, backend_options=backend_options, **data)
