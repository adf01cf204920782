"""Materialized routes and dynamic deployment equal the supernet."""

import warnings

import pytest
import torch

import dsnet
from conftest import randomize, routes_apart

TOL = 1e-5


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ["ds_mbnet_tiny", "ds_resnet50_tiny"])
def test_every_tiny_route_materializes_exactly(name, tiny_models):
    model = tiny_models[name]
    x = torch.randn(2, 3, 32, 32)
    for route in model.routes(32):
        static = dsnet.materialize(model, route)
        with torch.no_grad():
            model.set_route(route, "slice")
            ref = model(x)
            assert _max_diff(static(x), ref) <= TOL, route
            for mode in ("mask", "index"):
                model.set_route(route, mode)
                assert _max_diff(model(x), ref) <= TOL, (route, mode)


@pytest.mark.parametrize("name,routes", [
    ("ds_mbnet", [(0,), (6,), (13,)]),
    ("ds_resnet50", [(0, 0, 0, 0), (3, 3, 3, 3), (2, 0, 3, 1)]),
])
def test_sampled_full_routes_materialize_exactly(name, routes):
    model = randomize(dsnet.create_model(name))
    x = torch.randn(1, 3, 64, 64)
    for route in routes:
        static = dsnet.materialize(model, route)
        with torch.no_grad():
            model.set_route(route, "slice")
            ref = model(x)
            assert _max_diff(static(x), ref) <= TOL, route
            for mode in ("mask", "index"):
                model.set_route(route, mode)
                assert _max_diff(model(x), ref) <= TOL, (route, mode)


def test_full_mode_is_the_unsliced_largest_network(tiny_models):
    model = tiny_models["ds_mbnet_tiny"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_route(model.routes()[-1], "slice")
        largest = model(x)
        model.set_route(model.routes()[0], "full")
        assert _max_diff(model(x), largest) <= TOL


def test_materialized_module_is_standalone(tiny_models):
    model = tiny_models["ds_mbnet_tiny"]
    route = model.routes()[1]
    static = dsnet.materialize(model, route)
    x = torch.randn(1, 3, 32, 32)
    before = static(x)
    super_ptrs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    assert not super_ptrs & {t.data_ptr() for t in list(static.parameters()) + list(static.buffers())}
    assert all(t.is_contiguous() for t in static.parameters())
    # no dynamic layer, no routing head left
    kinds = {type(m).__name__ for m in static.modules()}
    assert not kinds & {"DynamicConv2d", "DynamicLinear", "SplitBatchNorm2d", "Gate", "StaticGate"}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert torch.equal(static(x), before)
    # the supernet's own route is restored after materializing
    assert model.active_route == model.routes()[-1]


def test_fold_bn_keeps_outputs_and_removes_bn(tiny_models):
    for model in tiny_models.values():
        route = model.routes()[len(model.routes()) // 2]
        plain, folded = dsnet.materialize(model, route), dsnet.materialize(model, route, fold_bn=True)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
        x = torch.randn(2, 3, 32, 32)
        assert _max_diff(plain(x), folded(x)) <= 1e-4


def test_materialized_routes_trace_with_torchscript(tiny_models):
    model = tiny_models["ds_resnet50_tiny"]
    static = dsnet.materialize(model, (1, 2, 0, 3))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still works
        traced = torch.jit.trace(static, x)
    assert _max_diff(traced(x), static(x)) <= TOL


@pytest.mark.parametrize("name,n_segments", [("ds_mbnet_tiny", 1 + 4), ("ds_resnet50_tiny", 1 + 4 + 3 * 16)])
@pytest.mark.parametrize("batch", [1, 4])
def test_split_equals_supernet_dynamic_forward(name, n_segments, batch, tiny_models):
    model = tiny_models[name]
    x = routes_apart(model, batch)  # adjusts the gates: split afterwards
    plan = dsnet.split(model)
    assert len(plan) == n_segments
    with torch.no_grad():
        model.set_route(None)
        ref, onehots, _ = model.forward_dynamic(x)
        out, choices = plan(x)
    assert _max_diff(out, ref) <= TOL
    expected = torch.stack([o.argmax(-1) for o in onehots], 1)
    assert torch.equal(choices, expected)
    if batch > 1:
        assert len({tuple(c) for c in choices.tolist()}) > 1  # really mixed routes


def test_split_head_returns_features_and_route_scores(tiny_models):
    model = tiny_models["ds_mbnet_tiny"]
    plan = dsnet.split(model)
    feats, scores = plan.head(torch.randn(2, 3, 32, 32))
    assert scores.shape == (2, len(model.routes()))
    assert feats.dim() == 4
    assert set(plan.stages[0]) == {(None, c) for c in range(4)}


def test_static_models_materialize_but_do_not_split():
    model = dsnet.create_model("mobilenet_v1", width_mult=0.25, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    assert _max_diff(dsnet.materialize(model)(x), model(x)) <= TOL
    with pytest.raises(ValueError, match="static"):
        dsnet.split(model)
    with pytest.raises(ValueError, match="dynamic: name a route"):
        dsnet.materialize(dsnet.create_model("ds_mbnet_tiny"))


def test_dynamic_training_forward_sends_gradient_to_the_gate(tiny_models):
    model = tiny_models["ds_mbnet_tiny"].train()
    model.set_route(None)
    torch.manual_seed(0)  # Gumbel noise; 64x64 keeps a one-sample route group above 1x1 for BN
    out = model.forward_dynamic(torch.randn(4, 3, 64, 64)).logits
    out.sum().backward()
    gate = model.blocks[model.gated_stage][0].attn
    assert gate.route.weight.grad is not None and gate.route.weight.grad.abs().sum() > 0
