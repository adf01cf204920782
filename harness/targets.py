"""Target profiles: named data files in ``targets/`` (TOML), validated on load.

Contract
--------
``load_target(name)`` reads ``targets/<name>.toml`` and returns a :class:`Target`. Every key is
checked against :data:`SCHEMA`: an unknown key or a wrong type raises :class:`TargetError` naming
the file and the key. ``known_targets()`` lists the names. Adding a device is adding a file.

Values ``"auto"`` are resolved for the local machine by :meth:`Target.resolve`: the expected
device name (CPU model), the thread count (``0``: all physical cores) and TVM's ``mcpu`` (the host
CPU as LLVM names it).
"""

from __future__ import annotations

import copy
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.measure import Protocol

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"

# key: (type(s), required). Nested tables have their own schema.
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
    "tvm": (dict, False),
    "protocol": (dict, False),
}
TVM_SCHEMA = {"target": (dict, True), "tune_trials": (int, False), "host": (dict, False)}
PROTOCOL_SCHEMA = {"warmup_calls": (int, False), "warmup_ms": ((int, float), False),
                   "repeat": (int, False), "min_repeat_ms": ((int, float), False),
                   "cuda_graphs": (bool, False)}
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "fp16")


class TargetError(ValueError):
    """An unknown or malformed target profile."""


def known_targets(directory: Path = TARGETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def _check(table: dict, schema: dict, where: str) -> None:
    for key, value in table.items():
        if key not in schema:
            raise TargetError(f"{where}: unknown key '{key}' (valid: {', '.join(schema)})")
        types = schema[key][0]
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(value, bool) and bool not in types:  # bool is an int in Python, not here
            raise TargetError(f"{where}: key '{key}' must be {_type_name(types)}, got bool")
        if not isinstance(value, types):
            raise TargetError(f"{where}: key '{key}' must be {_type_name(types)}, "
                              f"got {type(value).__name__}")
    for key, (_, required) in schema.items():
        if required and key not in table:
            raise TargetError(f"{where}: missing required key '{key}'")


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    names = {"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
             "dict": "a table", "bool": "true or false"}
    return " or ".join(names.get(t.__name__, t.__name__) for t in types)


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
    tvm: dict = field(default_factory=dict)
    dynamic_backends: list[str] | None = None
    protocol: Protocol = field(default_factory=Protocol)

    def resolve(self) -> Target:
        """A copy with the ``auto`` values filled in for this machine."""
        from harness import env

        t = copy.deepcopy(self)
        if t.device == "cpu":
            if t.expected_device == "auto":
                t.expected_device = env.cpu_model()
            if t.threads <= 0:
                t.threads = env.physical_cores()
        tvm_target = t.tvm.get("target")
        if tvm_target is not None:
            if tvm_target.get("mcpu") == "auto":
                tvm_target["mcpu"] = _host_llvm_cpu()
            if tvm_target.get("num-cores") == 0:
                tvm_target["num-cores"] = t.threads or env.physical_cores()
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


def _host_llvm_cpu() -> str:
    try:
        import tvm

        return str(tvm.get_global_func("target.llvm_get_system_cpu")())
    except Exception:  # TVM missing: the TVM backend reports that itself
        return "generic"


def load_target(name: str, directory: Path = TARGETS_DIR) -> Target:
    path = Path(name) if name.endswith(".toml") else directory / f"{name}.toml"
    if not path.is_file():
        raise TargetError(f"unknown target '{name}'; known targets: {', '.join(known_targets(directory))}")
    where = str(path)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TargetError(f"{where}: not valid TOML: {e}") from None
    _check(data, SCHEMA, where)
    if "tvm" in data:  # optional table; its own keys are checked when present
        _check(data["tvm"], TVM_SCHEMA, f"{where} [tvm]")
    _check(data.get("protocol", {}), PROTOCOL_SCHEMA, f"{where} [protocol]")
    if data["device"] not in DEVICES:
        raise TargetError(f"{where}: key 'device' must be one of {', '.join(DEVICES)}, got '{data['device']}'")
    for key, kind, allowed in (("backends", str, None), ("dynamic_backends", str, None),
                               ("precisions", str, PRECISIONS),
                               ("batch_sizes", int, None)):
        for v in data.get(key, []):
            if not isinstance(v, kind) or isinstance(v, bool) or (allowed and v not in allowed):
                valid = f"one of {', '.join(allowed)}" if allowed else _type_name(kind)
                raise TargetError(f"{where}: key '{key}' holds {v!r}; each entry must be {valid}")
    if data["name"] != path.stem:
        raise TargetError(f"{where}: key 'name' is '{data['name']}' but the file is named '{path.stem}'")
    try:
        protocol = Protocol(**data.pop("protocol", {}))
    except ValueError as e:
        raise TargetError(f"{where} [protocol]: {e}") from None
    return Target(path=where, protocol=protocol, **data)
