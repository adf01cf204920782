"""The TVM backend's Relax rewrites: constant folding gives TVM's ``FoldConstant`` constants without
building a kernel per constant."""

import numpy as np
import pytest
import torch
from torch import nn

tvm = pytest.importorskip("tvm")
from tvm import relax, topi  # noqa: E402

from harness.backends import tvm_relax  # noqa: E402


def _imported(net, x):
    """``net`` as Relax with batch norm folded into the convolutions (constants left unfolded)."""
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad():
        mod = from_exported_program(torch.export.export(net, (x,)), keep_params_as_input=False)
    return relax.transform.FoldBatchnormToConv2D()(mod)


def _clean(mod):
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))


def _constants(func) -> list[np.ndarray]:
    """The tensor constants ``func``'s calls take, in order (structural equality does not compare
    a constant's values)."""
    found = []

    @relax.expr_functor.visitor
    class Constants(relax.PyExprVisitor):
        def visit_call_(self, call):
            found.extend(arg.value.numpy() for arg in call.args
                         if isinstance(arg, tvm.ir.Constant) and hasattr(arg.value, "numpy"))
            super().visit_call_(call)

    Constants().visit_expr(func)
    return found


def _count_builds(monkeypatch):
    builds = []
    real = tvm.tirx.build

    def counted(*args, **kwargs):
        builds.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(tvm.tirx, "build", counted)
    return builds


def test_batch_norm_and_layout_constants_equal_fold_constants_without_a_build(monkeypatch):
    """What the backend folds: batch norm into the convolutions' weights and biases, then the
    weights' transposes to channels-last (each stage from TVM's own folding of the one before)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    for bn in (net[1], net[4]):  # statistics that are not the identity
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    batch_norm_folded = _imported(net, torch.randn(1, 3, 8, 8))
    assert "R.sqrt" in batch_norm_folded["main"].script()  # the folding's arithmetic, left to fold
    expected = relax.transform.FoldConstant()(batch_norm_folded)
    channels_last = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "OHWI"]})(expected)
    for mod in (batch_norm_folded, channels_last):
        expected = _clean(relax.transform.FoldConstant()(mod))
        builds = _count_builds(monkeypatch)
        folded = _clean(tvm_relax.fold_constants(mod))
        assert builds == []  # every constant computation here is NumPy's
        tvm.ir.assert_structural_equal(folded, expected)
        got, want = _constants(folded["main"]), _constants(expected["main"])
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)  # bit for bit (structural equality ignores values)


def test_call_tir_on_constants_runs_in_one_build(monkeypatch):
    """A layout rewrite's ``call_tir`` on constants (here TE functions, one with two outputs)
    becomes constants; all of them come from one library."""
    a = np.arange(24, dtype="float32").reshape(2, 3, 4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((3, 4, 2), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit_te(topi.transpose, relax.const(a), [1, 2, 0])
            pair = bb.emit_te(lambda t: [topi.add(t, 1.0), topi.multiply(t, 2.0)], relax.const(a))
            b = bb.emit(relax.TupleGetItem(pair, 1))
            y = bb.emit(relax.op.add(x, w))
            z = bb.emit_output(relax.op.multiply(y, relax.op.permute_dims(b, [1, 2, 0])))
        bb.emit_func_output(z)
    builds = _count_builds(monkeypatch)
    folded = _clean(tvm_relax.fold_constants(bb.get()))
    assert len(builds) == 1
    script = folded["main"].script()
    assert "call_tir" not in script, script
    consts = _constants(folded["main"])
    assert len(consts) == 2
    for want in (a.transpose(1, 2, 0), (a * 2).transpose(1, 2, 0)):
        assert any(np.array_equal(c, want) for c in consts), want


class _TwoWays(nn.Module):
    """One of two convolution + batch norm branches, by the sign of the input's mean (``torch.cond``,
    nested once, as :mod:`dsnet.one_graph` writes a gate's choice)."""

    def __init__(self):
        super().__init__()
        self.ways = nn.ModuleList(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                                nn.ReLU()) for _ in range(3))
        for way in self.ways:
            way[1].running_mean.uniform_(-1, 1), way[1].running_var.uniform_(0.5, 2)

    def forward(self, x):
        m = x.mean()
        inner = lambda x: torch.cond(m > 1.0, lambda x: self.ways[0](x), lambda x: self.ways[1](x), (x,))  # noqa: E731
        return torch.cond(m > 0.0, inner, lambda x: self.ways[2](x), (x,))


def test_branches_get_their_weights_as_constants_and_fuse_like_a_static_network():
    """The importer passes every weight a ``torch.cond`` branch reads as a parameter: without binding
    them, batch norm, the layout rewrite and fusion never reach the branch (each ran unfused, at a
    multiple of its route's static engine). After the backend's import every branch's batch norm is
    folded, its convolutions fused with their epilogues, no function takes a weight, and each branch
    computes what eager does."""
    from harness.backends import get_backend
    from harness.targets import load_target

    torch.manual_seed(0)
    net = _TwoWays().eval()
    x = torch.randn(1, 3, 8, 8)
    target = load_target("x86").resolve()
    backend = get_backend("tvm", {**target.options("tvm"), "tune_minutes": 0})
    mod, tvm_target = backend.relax_module(net, x, target, "fp32")
    functions = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, relax.Function)}
    assert len(functions) > 1  # the branches stay functions of their own
    for name, func in functions.items():
        weights = [p for p in func.params if len(p.ty.shape) == 4 and int(p.ty.shape[0]) == 8]
        assert not weights, f"{name} takes weights as parameters"
    script = mod.script()
    assert "batch_norm" not in script
    fused_convs = [gv.name_hint for gv, _ in mod.functions_items() if gv.name_hint.startswith("fused_conv2d")]
    assert fused_convs, "no branch convolution was fused with its epilogue"
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm_target), tvm.cpu())
    for shift in (2.0, 0.5, -1.0):  # the three ways
        xi = x - x.mean() + shift
        with torch.no_grad():
            want = net.ways[0 if shift > 1 else 1 if shift > 0 else 2](xi)
        got = vm["main"](tvm.runtime.from_dlpack(xi.contiguous()))
        got = got if hasattr(got, "numpy") else got[0]
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)
