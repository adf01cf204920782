"""Cached artifacts load only if this installation built them: a planted or copied library is rebuilt,
never loaded, and the row says why."""

import os
import shutil
import stat
import subprocess

import pytest
import torch

import dsnet
from conftest import randomize
from harness.backends import get_backend
from harness.measure.pipeline import ArtifactKey, exported, trial, weights_fingerprint
from harness.measure.signing import installation_key, key_path, sign, tag_path, untrusted
from harness.targets import load_target

X86 = load_target("x86").resolve()

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARK"), "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture
def key(tmp_path, monkeypatch):
    """A key of this test's own (as another user's would be)."""
    path = tmp_path / "keys" / "a.key"
    monkeypatch.setenv("DSNET_HARNESS_KEY", str(path))
    return path


@pytest.fixture(scope="module")
def route():
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny")))
    return dsnet.materialize(model, model.routes()[-1])


def _key(backend, module, x):
    return ArtifactKey.of("ds_mbnet_tiny", "3", backend, X86, "fp32", x, weights_fingerprint(module))


def test_the_key_is_made_once_for_the_owner_alone(key):
    first = installation_key()
    assert installation_key() == first and len(first) == 32
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and stat.S_IMODE(os.stat(key.parent).st_mode) == 0o700
    assert key_path() == key
    key.write_text("not a key\n")
    with pytest.raises(ValueError, match="is not a dsnet-harness artifact key"):
        installation_key()


def test_a_tag_holds_for_the_bytes_it_signed_and_the_key_that_signed_them(key, tmp_path, monkeypatch):
    art = tmp_path / "model.bin"
    art.write_bytes(b"compiled code")
    assert "no tag" in untrusted(art)
    sign(art)
    assert untrusted(art) is None and tag_path(art).name == "model.bin.hmac"
    art.write_bytes(b"compiled code, changed")
    assert "does not match" in untrusted(art)
    sign(art)
    monkeypatch.setenv("DSNET_HARNESS_KEY", str(tmp_path / "keys" / "b.key"))  # another installation
    assert "does not match" in untrusted(art)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the planted library")
def test_a_planted_library_in_a_cache_slot_is_rebuilt_and_never_loaded(key, route, tmp_path, monkeypatch):
    b = get_backend("tvm", X86.options("tvm"))
    if b.unavailable(X86):
        pytest.skip(f"tvm unavailable: {b.unavailable(X86)}")
    x = torch.randn(1, 3, 32, 32)
    k = _key(b, route, x)
    slot = k.directory(tmp_path / "cache")
    slot.mkdir(parents=True)
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(slot / b.artifact), str(src)], check=True)
    mark = tmp_path / "planted-ran"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    for forged in (False, True):  # no tag; then a tag made with another key
        if forged:
            subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(slot / b.artifact), str(src)], check=True)
            monkeypatch.setenv("DSNET_HARNESS_KEY", str(tmp_path / "keys" / "attacker.key"))
            sign(slot / b.artifact)
            monkeypatch.setenv("DSNET_HARNESS_KEY", str(key))
        result = trial(b, route, x, X86, "fp32", k, tmp_path / "cache")
        assert result.ok and not result.details["cached"], result.error
        assert "the cached artifact was not loaded" in result.details["rebuilt"]
        assert not mark.exists(), "the planted library's constructor ran"
        assert untrusted(slot / b.artifact) is None  # the rebuild is signed
    # and a board is never sent one either
    (slot / b.artifact).write_bytes(b"\x7fELF planted")
    sent = exported(b, route, x, X86, "fp32", k, tmp_path / "cache")
    assert sent.ok and "was not sent" in sent.details["rebuilt"] and untrusted(sent.artifact) is None


def test_a_results_folder_copied_from_another_key_is_rebuilt(route, tmp_path, monkeypatch):
    b = get_backend("torchscript")
    x = torch.randn(1, 3, 32, 32)
    k = _key(b, route, x)
    monkeypatch.setenv("DSNET_HARNESS_KEY", str(tmp_path / "theirs.key"))
    theirs = trial(b, route, x, X86, "fp32", k, tmp_path / "cache")
    assert theirs.ok and not theirs.details["cached"]
    assert trial(b, route, x, X86, "fp32", k, tmp_path / "cache").details["cached"]  # their own: loaded
    monkeypatch.setenv("DSNET_HARNESS_KEY", str(tmp_path / "mine.key"))
    mine = trial(b, route, x, X86, "fp32", k, tmp_path / "cache")
    assert mine.ok and not mine.details["cached"] and "tag does not match" in mine.details["rebuilt"]
    again = trial(b, route, x, X86, "fp32", k, tmp_path / "cache")
    assert again.details["cached"] and "rebuilt" not in again.details


def test_an_onnx_model_with_its_weights_beside_it_is_signed_and_checked_whole(key, route, tmp_path, monkeypatch):
    """Over protobuf's 2 GiB an ONNX model keeps its weights in a file beside it (the flattened one-graph
    DS-ResNet-50): both files are signed, a changed weights file means a rebuild, and an export copies
    both under the new name, loadable with ONNX Runtime alone."""
    import harness.backends.onnxruntime as ortb

    b = get_backend("onnxruntime")
    if b.unavailable(X86):
        pytest.skip(f"onnxruntime unavailable: {b.unavailable(X86)}")
    monkeypatch.setattr(ortb, "ONE_FILE_WEIGHTS", 1024)  # this small route counts as large
    x = torch.randn(1, 3, 32, 32)
    k = _key(b, route, x)
    built = trial(b, route, x, X86, "fp32", k, tmp_path / "cache")
    slot = k.directory(tmp_path / "cache")
    assert built.ok, built.error
    assert [f.name for f in b.artifact_files(slot)] == ["model.onnx", ortb.WEIGHTS]
    assert (slot / ortb.WEIGHTS).stat().st_size > 0
    assert all(untrusted(f) is None for f in b.artifact_files(slot))
    assert trial(b, route, x, X86, "fp32", k, tmp_path / "cache").details["cached"]
    data = bytearray((slot / ortb.WEIGHTS).read_bytes())
    data[0] ^= 0xFF  # the weights changed after the build
    (slot / ortb.WEIGHTS).write_bytes(bytes(data))
    again = trial(b, route, x, X86, "fp32", k, tmp_path / "cache")
    assert again.ok and not again.details["cached"] and f"{ortb.WEIGHTS}: its tag does not match" in \
        again.details["rebuilt"]
    out = tmp_path / "export" / "net.onnx"
    out.parent.mkdir()
    assert b.copy_artifact(slot, out) == [out, out.with_name("net.onnx.data")]
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), route(x), atol=1e-4)
