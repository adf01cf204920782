"""The whole dynamic network in one artifact: every forced route comes out of the one graph, on
eager, TorchScript and ONNX Runtime; the artifact reloads in a process that knows only its runtime."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dsnet
from conftest import randomize
from dsnet.gate import Gate
from dsnet.one_graph import OneGraph, input_for_route, one_graph
from harness.backends import get_backend
from harness.measure.pipeline import ArtifactKey, trial, weights_fingerprint
from harness.targets import load_target

ROOT = Path(__file__).resolve().parent.parent
X86 = load_target("x86").resolve()


def forced(model, route):
    """A copy of ``model`` whose gate ``k`` always chooses ``route[k]``: every hidden unit of the
    gate's shared FC is kept positive and only that choice's routing row reads it."""
    model = copy.deepcopy(model)
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert len(gates) == len(route)
    with torch.no_grad():
        for gate, c in zip(gates, route):
            gate.fc1.bias += 10.0
            gate.route.weight.zero_()
            gate.route.weight[c] = 1.0
    return model.eval()


def _expected(model, route, x):
    """The route's output as the static network of that route computes it."""
    with torch.no_grad():
        return dsnet.materialize(model, route)(x)


def _compiled(backend, graph, x, tmp_path):
    b = get_backend(backend, X86.options(backend))
    why = b.unavailable(X86)
    if why:
        pytest.skip(f"{backend} unavailable: {why}")
    key = ArtifactKey.of("one_graph", "all", b, X86, "fp32", x, weights_fingerprint(graph))
    result = trial(b, graph, x, X86, "fp32", key, tmp_path)
    assert result.ok, result
    return result.engine


def reachable(model):
    """Each gate's choice ``c`` reads its own hidden unit (or direction of units 0 and 1), which weigh the
    (non-negative) pooled features positively, so an input can favour any choice (random gates can
    leave a choice dominated, or a hidden unit dead, for every input)."""
    with torch.no_grad():
        for gate in [m for m in model.modules() if isinstance(m, Gate)]:
            gate.fc1.weight.abs_()
            gate.fc1.bias.zero_()
            gate.route.weight.zero_()
            n, hidden = gate.route.out_features, gate.route.in_features
            for c in range(n):
                if hidden >= n:  # choice c reads hidden unit c
                    gate.route.weight[c, c] = 1.0
                else:  # too few hidden units: choice c is a direction in the first quadrant of (h0, h1)
                    angle = torch.tensor(c / max(1, n - 1) * torch.pi / 2)
                    gate.route.weight[c, 0], gate.route.weight[c, 1] = torch.cos(angle), torch.sin(angle)
    return model


@pytest.fixture(scope="module")
def mbnet():
    return reachable(dsnet.reference_statistics(randomize(dsnet.create_model("ds_mbnet_tiny"))))


@pytest.mark.parametrize("backend", ["eager", "torchscript", "onnxruntime"])
def test_every_route_comes_out_of_one_artifact(backend, mbnet, tmp_path):
    """One compiled artifact; for every route an input crafted to take it (the artifact is not
    changed): the route taken is reported and the logits are that route's static network's."""
    x = torch.randn(1, 3, 32, 32)
    graph = one_graph(mbnet, x)
    engine = _compiled(backend, graph, x, tmp_path)
    plan = dsnet.split(mbnet)
    for route in mbnet.routes():
        xr = input_for_route(plan, route, x)
        logits, taken = engine(xr)
        assert taken.tolist() == [list(route)], backend
        assert (logits - _expected(mbnet, route, xr)).abs().max().item() <= 1e-5, (backend, route)


def test_forcing_the_gate_by_its_weights_gives_that_route(mbnet, tmp_path):
    """The other way to force a route: a gate patched to always choose it."""
    x = torch.randn(1, 3, 32, 32)
    route = mbnet.routes()[1]
    model = forced(mbnet, route)
    logits, taken = _compiled("torchscript", one_graph(model, x), x, tmp_path)(x)
    assert taken.tolist() == [list(route)]
    assert (logits - _expected(model, route, x)).abs().max().item() <= 1e-5


def _ds_resnet_tiny():
    """The tiny DS-ResNet (four gates) with reference statistics, an input and its routes."""
    model = dsnet.reference_statistics(randomize(dsnet.create_model("ds_resnet50_tiny")))
    return model, torch.randn(1, 3, 32, 32), model.routes()


def test_several_gates_are_flattened_and_every_sampled_route_comes_out(tmp_path):
    """DS-ResNet's four gates: one branch per (previous choice, choice) at each stage; sampled
    routes (gates patched to choose them) through the one graph in eager and TorchScript (ONNX
    Runtime: the next test, opt-in)."""
    model, x, routes = _ds_resnet_tiny()
    for route in (routes[len(routes) // 3],):  # one sampled route: a DS-ResNet graph costs ~35 s here
        m = forced(model, route)
        graph = one_graph(m, x)
        assert [len(s) for s in graph.stages] == [4] + [16] * (len(route) - 1)  # segments, not routes
        expected = _expected(m, route, x)
        for backend in ("eager", "torchscript"):
            logits, taken = _compiled(backend, graph, x, tmp_path / backend / str(route))(x)
            assert taken.tolist() == [list(route)], backend
            assert (logits - expected).abs().max().item() <= 1e-5, (backend, route)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("HARNESS_SLOW_EXPORTS") != "1",
                    reason="DS-ResNet's one graph to ONNX exports 53 parts (~75 s): HARNESS_SLOW_EXPORTS=1 runs it")
def test_a_sampled_ds_resnet_route_comes_out_of_one_onnx_session(tmp_path):
    """The flattened four gates as nested ``If`` nodes in one ONNX Runtime session (the export
    exports each of the 53 parts: over a minute, hence opt-in; the default suite composes a small
    two-gate network the same way, below)."""
    model, x, routes = _ds_resnet_tiny()
    route = routes[len(routes) // 3]
    m = forced(model, route)
    logits, taken = _compiled("onnxruntime", one_graph(m, x), x, tmp_path)(x)
    assert taken.tolist() == [list(route)]
    assert (logits - _expected(m, route, x)).abs().max().item() <= 1e-5


def test_the_exported_artifacts_run_with_their_runtime_alone(tmp_path):
    """``harness.export`` writes one file per backend; a fresh process that imports only torch,
    onnxruntime or tvm runs it and gets the route the gate picks and that route's logits."""
    from harness.phases.static import reference_model

    model = reference_model("ds_mbnet_tiny")
    x = torch.randn(1, 3, 32, 32)
    route = dsnet.split(model)(x)[1][0].tolist()  # the route the gate picks for x
    expected = _expected(model, route, x)
    np.save(tmp_path / "x.npy", x.numpy())
    outs = {}
    for backend, name in (("torchscript", "net.ts"), ("onnxruntime", "net.onnx"), ("tvm", "net.so")):
        proc = subprocess.run([sys.executable, "-m", "harness.export", "--model", "ds_mbnet_tiny", "--backend",
                               backend, "--out", str(tmp_path / name), "--input-size", "32", "--check-inputs", "2"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "routes taken" in proc.stdout and "load it with its runtime alone" in proc.stdout
        outs[backend] = tmp_path / name
    paths = json.dumps({k: str(v) for k, v in outs.items()})
    proc = subprocess.run([sys.executable, "-c", _LOAD, str(tmp_path), paths],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for backend in outs:
        logits = np.load(tmp_path / f"{backend}_logits.npy")
        taken = np.load(tmp_path / f"{backend}_route.npy")
        assert taken.tolist() == [list(route)], backend
        assert np.abs(logits - expected.numpy()).max() <= 1e-5, backend


# what a deployment engineer runs: the runtime alone, never dsnet or harness
_LOAD = """
import json, sys
import numpy as np
folder, paths = sys.argv[1], json.loads(sys.argv[2])
x = np.load(folder + "/x.npy")
import torch
net = torch.jit.load(paths["torchscript"])
logits, route = net(torch.from_numpy(x))
np.save(folder + "/torchscript_logits.npy", logits.numpy()); np.save(folder + "/torchscript_route.npy", route.numpy())
import onnxruntime as ort
net = ort.InferenceSession(paths["onnxruntime"])
logits, route = net.run(None, {net.get_inputs()[0].name: x})
np.save(folder + "/onnxruntime_logits.npy", logits); np.save(folder + "/onnxruntime_route.npy", route)
import tvm
from tvm import relax
net = relax.VirtualMachine(tvm.runtime.load_module(paths["tvm"]), tvm.cpu())["main"]
logits, route = net(tvm.runtime.tensor(x))
np.save(folder + "/tvm_logits.npy", logits.numpy()); np.save(folder + "/tvm_route.npy", route.numpy())
assert not any(m.split(".")[0] in ("dsnet", "harness") for m in sys.modules), "the runtime alone"
"""


@pytest.mark.parametrize("args,message", [
    (["--model", "mobilenet_v1", "--backend", "torchscript"], "mobilenet_v1 has no gate"),
    (["--model", "ds_mbnet_tiny", "--backend", "eager"], "eager cannot hold the one-graph network"),
    (["--model", "ds_mbnet_tiny", "--backend", "frobnicate"], "unknown backend 'frobnicate'"),
    (["--model", "nope", "--backend", "torchscript"], "unknown model 'nope'"),
])
def test_export_refuses_in_one_line(args, message, tmp_path, capsys):
    from harness import export

    assert export.main([*args, "--out", str(tmp_path / "a"), "--input-size", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "a").exists()


def test_onnx_branches_hold_their_own_weights(mbnet, tmp_path):
    """ONNX Runtime optimizes an ``If`` branch as a graph of its own and cannot fuse or pre-pack a
    weight of the outer graph: the written one artifact keeps in the outer graph only the weights
    its own nodes (the head and gate) read, every route's weights inside the branch that runs it."""
    onnx = pytest.importorskip("onnx")
    x = torch.randn(1, 3, 32, 32)
    _compiled("onnxruntime", one_graph(mbnet, x), x, tmp_path)
    (path,) = tmp_path.glob("onnxruntime/*/model.onnx")
    graph = onnx.load(str(path)).graph
    outer_reads = {name for node in graph.node for name in node.input}

    def branch_reads(g):
        out, weights = set(), 0
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    names, n = branch_reads(attr.g)
                    out |= names | {name for inner in attr.g.node for name in inner.input}
                    weights += n + len(attr.g.initializer)
        return out, weights

    inner_reads, branch_weights = branch_reads(graph)
    assert not {i.name for i in graph.initializer} & (inner_reads - outer_reads)
    assert branch_weights >= len(mbnet.routes())  # each route's convolutions at least


class _Head(torch.nn.Module):
    """Features: the image itself; scores: the first pixel of channels 0-2 (a test picks stage 0's
    choice by the image)."""

    def forward(self, x):
        return x * 1.0, x[:, 0:3, 0, 0]


class _Widen(torch.nn.Module):
    """Stage 0's choice: features of its own width; scores from pixel 0 of channels 3-4 (stage 1)."""

    def __init__(self, width):
        super().__init__()
        self.conv = torch.nn.Conv2d(5, width, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)), x[:, 3:5, 0, 0] * 2.0


class _Classify(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(width, 6, 1), torch.nn.Linear(6, 7)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class _TwoGatePlan(torch.nn.Module):
    """What :class:`dsnet.one_graph.OneGraph` reads of a plan: two gates, three choices of different
    widths then two, one segment per (previous choice, choice)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = _Head()
        widths = (2, 3, 4)
        self.stages = [torch.nn.ModuleDict({str(c): _Widen(w) for c, w in enumerate(widths)}),
                       torch.nn.ModuleDict({f"{p}{c}": _Classify(widths[p]) for p in range(3) for c in range(2)})]
        self.stages = [{(None, c): self.stages[0][str(c)] for c in range(3)},
                       {(p, c): self.stages[1][f"{p}{c}"] for p in range(3) for c in range(2)}]


def test_onnx_one_artifact_is_composed_from_its_parts_and_takes_every_route(tmp_path):
    """ONNX Runtime builds the one artifact from each part's own export joined by ``If`` nodes
    (:mod:`harness.backends.onnx_switch`): two gates (three choices of different widths, then two),
    features padded and sliced between them; for every route, an image that takes it gives the
    route and the logits of the module's own eager dispatch."""
    onnx = pytest.importorskip("onnx")
    x = torch.randn(1, 5, 8, 8)
    graph = OneGraph(_TwoGatePlan(), x).eval()
    engine = _compiled("onnxruntime", graph, x, tmp_path)
    (path,) = tmp_path.glob("onnxruntime/*/model.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert sum(node.op_type == "If" for node in model.graph.node) == 2  # one tree per gate at the top
    for c0 in range(3):
        for c1 in range(2):
            xr = x.clone()
            xr[0, :3, 0, 0], xr[0, 3:5, 0, 0] = -5.0, -5.0
            xr[0, c0, 0, 0], xr[0, 3 + c1, 0, 0] = 5.0, 5.0
            with torch.no_grad():
                ref, ref_route = graph(xr)
            logits, taken = engine(xr)
            assert ref_route.tolist() == taken.tolist() == [[c0, c1]]
            assert (logits - ref).abs().max().item() <= 1e-5, (c0, c1)
