"""MAdds and params: the papers' reference figures, and analytic == hook count."""

import pytest
import torch

import dsnet
from dsnet.profile import count_by_hooks, profile


def test_ds_mbnet_has_14_routes_from_133M_to_565M():
    model = dsnet.create_model("ds_mbnet")
    routes = model.routes()
    assert len(routes) == 14
    madds = [profile(model, r).madds for r in routes]
    assert all(a < b for a, b in zip(madds, madds[1:])), madds
    assert madds[0] == pytest.approx(133e6, rel=0.01)
    assert madds[-1] == pytest.approx(565e6, rel=0.01)
    # route order is the width order of the single gate
    assert [model.route_widths(r) for r in routes][0] == [224, 736]
    assert [model.route_widths(r) for r in routes][-1] == [640, 1152]


@pytest.mark.parametrize("width,expected,rel", [(1.0, 569e6, 0.01), (0.5, 150e6, 0.03),
                                                (0.25, 41e6, 0.03)])
def test_mobilenet_v1_madds(width, expected, rel):
    assert profile(dsnet.create_model("mobilenet_v1", width_mult=width)).madds == pytest.approx(
        expected, rel=rel)


def test_mobilenet_v1_x075_in_reported_range():
    madds = profile(dsnet.create_model("mobilenet_v1", width_mult=0.75)).madds
    assert 317e6 * 0.99 <= madds <= 325e6 * 1.01


@pytest.mark.parametrize("width,expected", [(1.0, 4.1e9), (0.25, 278e6)])
def test_resnet50_madds(width, expected):
    assert profile(dsnet.create_model("resnet50", width_mult=width)).madds == pytest.approx(
        expected, rel=0.03)


def test_ds_resnet50_has_256_routes_sorted_by_madds():
    model = dsnet.create_model("ds_resnet50")
    routes = model.routes()
    assert len(routes) == 256 and len(set(routes)) == 256
    madds = [profile(model, r).madds for r in routes]
    assert madds == sorted(madds)
    assert routes[0] == dsnet.Route((0, 0, 0, 0)) and routes[-1] == dsnet.Route((3, 3, 3, 3))
    # the largest route is a full-width ResNet-50 plus the attention heads
    assert madds[-1] == pytest.approx(profile(dsnet.create_model("resnet50")).madds, rel=0.01)


@pytest.mark.parametrize("name,size", [("ds_mbnet_tiny", 32), ("ds_resnet50_tiny", 32)])
def test_analytic_profile_equals_hook_count_for_every_tiny_route(name, size):
    model = dsnet.create_model(name)
    for route in model.routes(size):
        assert count_by_hooks(dsnet.materialize(model, route), size) == profile(model, route, size)


@pytest.mark.parametrize("name,route", [("ds_mbnet", (0,)), ("ds_mbnet", (13,)),
                                        ("ds_resnet50", (0, 0, 0, 0)), ("ds_resnet50", (3, 1, 2, 0)),
                                        ("mobilenet_v1", ()), ("resnet50", ())])
def test_analytic_profile_equals_hook_count_at_224(name, route):
    model = dsnet.create_model(name)
    assert count_by_hooks(dsnet.materialize(model, route), 224) == profile(model, route, 224)


def test_profile_depends_on_input_size():
    model = dsnet.create_model("ds_mbnet")
    small, large = profile(model, (5,), 112), profile(model, (5,), 224)
    assert small.params == large.params
    assert small.madds < large.madds / 3
    with torch.no_grad():  # every model runs at a non-square-friendly, odd resolution
        for name in dsnet.list_models():
            m = dsnet.create_model(name).eval()
            assert m(torch.zeros(1, 3, 57, 57)).shape[1] == m.num_classes
