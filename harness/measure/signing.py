"""Cached artifacts are loaded only if this installation built them.

Contract
--------
A results folder's ``cache/`` holds compiled code (shared libraries, serialized programs): loading
one runs it. Every artifact the pipeline builds is signed (:func:`sign`): an HMAC-SHA256 of its
bytes with a key of this user's, kept outside any results folder, written beside the artifact as
``<artifact>.hmac``; an artifact of several files (``Backend.artifact_files``: an ONNX model and its
weights file) has a tag per file. Before a cached artifact is loaded, :func:`untrusted_files` checks
every tag: a missing or wrong tag (an artifact copied from another machine or user, or planted, or
changed since) means it is rebuilt, never loaded, and the row's ``backend_details`` say why (``rebuilt``).

The key (:func:`installation_key`): 32 random bytes in ``$DSNET_HARNESS_KEY`` when set, else
``$XDG_CONFIG_HOME/dsnet-harness/artifact.key`` (``~/.config/...``), created on first use with
owner-only permissions (0600, its folder 0700). Sharing a results folder is safe for its CSVs,
tables, figures and ``env.json``; its ``cache/`` is rebuilt wherever the key differs. The TVM
tuning database (``tvm_tuning/``) holds JSON records that TVM parses, not code it loads.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

TAG_SUFFIX = ".hmac"
_KEY_BYTES = 32
_CHUNK = 1 << 20


def key_path() -> Path:
    """Where this user's key lives (see the module docstring)."""
    if os.environ.get("DSNET_HARNESS_KEY"):
        return Path(os.environ["DSNET_HARNESS_KEY"])
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "dsnet-harness" / "artifact.key"


def installation_key() -> bytes:
    """This user's signing key, created (owner-only) on first use. Raises ``OSError`` naming the
    file when it cannot be read or made, and ``ValueError`` when it is not a key."""
    path = key_path()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # written whole beside it, then linked into place: a process that starts at the same moment
        # finds either no key or the complete one, never an empty file
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".artifact.key.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(_KEY_BYTES) + "\n")
            os.link(tmp, path)
        except FileExistsError:  # another process made it first: its key is the key
            pass
        finally:
            os.unlink(tmp)
        return installation_key()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise ValueError(f"{path} is not a dsnet-harness artifact key ({_KEY_BYTES} bytes in hex); delete it to "
                         "make a new one (every cached artifact is then rebuilt)")
    return key


def _digest(path: Path) -> str:
    mac = hmac.new(installation_key(), digestmod=hashlib.sha256)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            mac.update(chunk)
    return mac.hexdigest()


def tag_path(artifact: Path) -> Path:
    return Path(artifact).with_name(Path(artifact).name + TAG_SUFFIX)


def sign(artifact: Path) -> None:
    """Write the artifact's tag (after it is built)."""
    tag = tag_path(artifact)
    tmp = tag.with_name(tag.name + ".tmp")
    tmp.write_text(_digest(Path(artifact)) + "\n")
    os.replace(tmp, tag)


def untrusted(artifact: Path) -> str | None:
    """Why the artifact must not be loaded (no tag, or a tag this installation did not write), or
    None when this installation built it as it is."""
    tag = tag_path(artifact)
    if not tag.is_file():
        return "it carries no tag of this installation (built elsewhere, or before artifacts were signed)"
    try:
        stored = tag.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return "its tag cannot be read"
    if not hmac.compare_digest(stored, _digest(Path(artifact))):
        return "its tag does not match: built by another installation (another user's key), or changed since"
    return None


def untrusted_files(files) -> str | None:
    """Why an artifact made of several ``files`` must not be loaded (the first file's reason,
    named), or None when this installation signed every one of them as it is."""
    for f in files:
        why = untrusted(f)
        if why is not None:
            return why if f == files[0] else f"{Path(f).name}: {why}"
    return None
