"""Shared test helpers: randomized BN statistics and gates that route samples apart."""

from __future__ import annotations

import os

# Idle threads sleep rather than spin, here and in every process a test starts (set before torch
# loads OpenMP; a value already in the environment wins). The suite runs two workers on two cores
# and many tests start processes of their own (CLIs, torchrun's ranks, TVM's builders): spinning
# OpenMP and TVM pools then spend each other's cores (the README's test command on the 2-core VM:
# 12.2 min with the default policies, 10.0 min with these; torchrun's test 105 s against 25 s).
# Only timings change, and no test checks one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

import dsnet  # noqa: E402
from dsnet.gate import Gate  # noqa: E402
from dsnet.layers import SplitBatchNorm2d  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global RNG state (weights' default initialization), so a
    failure in CI is a failure here too, whatever ran before it; and on one intra-op thread: the
    tests' tensors are small, and with another CPU-heavy process on a 2-core machine torch's second
    thread waits on the first (a tiny DS-ResNet's 4 epochs: 51 s on one thread, 135 s on two; 34 s
    and 36 s on an idle machine). Timing tests set the threads their profile names."""
    torch.manual_seed(0)
    torch.set_num_threads(1)


def randomize(model, seed: int = 0):
    """Give every BN statistics slot and affine its own random values, so that reading the wrong
    slot or slice changes the output; make gates route different inputs to different choices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SplitBatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            if isinstance(m, Gate):
                # large input weights, no bias: the scores follow the input, not a constant
                m.fc1.weight.copy_(torch.randn(m.fc1.weight.shape, generator=g) * 10)
                m.fc1.bias.zero_()
                m.route.weight.copy_(torch.randn(m.route.weight.shape, generator=g))
    return model.eval()


@pytest.fixture
def tiny_models():
    return {name: randomize(dsnet.create_model(name)) for name in ("ds_mbnet_tiny", "ds_resnet50_tiny")}


def routes_apart(model, n: int, size: int = 32, tries: int = 50, seed: int = 0):
    """A batch of ``n`` inputs whose dynamic routes are not all the same."""
    g = torch.Generator().manual_seed(seed)
    model.set_route(None)
    _center_gates(model, torch.randn(16, 3, size, size, generator=g)
                  + torch.randn(16, 3, 1, 1, generator=g) * 3)
    for _ in range(tries):
        x = torch.randn(n, 3, size, size, generator=g) + torch.randn(n, 3, 1, 1, generator=g) * 3
        oh = torch.cat(model.forward_dynamic(x).onehots, 1)
        if n == 1 or len({tuple(r.tolist()) for r in oh}) > 1:
            return x
    raise AssertionError("could not find inputs that the gate routes apart")


@torch.no_grad()
def _center_gates(model, x):
    """Shift each gate's first-FC bias so its hidden units are active for about half the inputs:
    random weights otherwise leave a small gate's hidden units dead for every input."""
    for gate in [m for m in model.modules() if isinstance(m, Gate)]:
        outs = []
        h = gate.fc1.register_forward_hook(lambda m, i, o, outs=outs: outs.append(o))
        model.forward_dynamic(x)
        h.remove()
        gate.fc1.bias -= torch.cat(outs).mean(0)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, saying why, where torch sees no CUDA device; ``browser`` tests are
    opt-in: they run only when ``-m`` names them (a real browser, Debian's chromium)."""
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    if "browser" not in (config.option.markexpr or ""):
        skips["browser"] = pytest.mark.skip(reason="opt-in: python -m pytest -m browser (needs Debian's chromium)")
    for item in items:
        for marker, skip in skips.items():
            if marker in item.keywords:
                item.add_marker(skip)
