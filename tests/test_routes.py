"""Routes and the registry: valid values work, bad input raises one clear error."""

import pytest

import dsnet
from dsnet.routes import Route, RouteError


def test_registry_lists_every_model_and_builds_by_name():
    names = dsnet.list_models()
    assert {"ds_mbnet", "ds_resnet50", "mobilenet_v1", "resnet50", "ds_mbnet_tiny",
            "ds_resnet50_tiny"} <= set(names)
    for name in names:
        assert dsnet.create_model(name, num_classes=7).num_classes == 7


def test_unknown_model_names_valid_choices():
    with pytest.raises(ValueError, match=r"unknown model 'ds_vit'; valid models: ds_mbnet, "):
        dsnet.create_model("ds_vit")


def test_unknown_model_argument_names_valid_ones():
    with pytest.raises(ValueError, match=r"takes no argument\(s\) width_mult; valid: num_classes"):
        dsnet.create_model("ds_mbnet", width_mult=0.5)


@pytest.mark.parametrize("route,message", [
    ((14,), r"choice 14 is outside gate 'width', valid choices 0\.\.13"),
    (-1, r"choice -1 is outside gate 'width', valid choices 0\.\.13"),
    ((1, 2), r"has 2 choice\(s\), the model has 1 gate\(s\)"),
    ("3-x", r"malformed route '3-x'"),
    (("a",), r"malformed route"),
    ((1.5,), r"malformed route"),
    (object(), r"malformed route"),
])
def test_bad_routes_name_the_routing_space(route, message):
    model = dsnet.create_model("ds_mbnet")
    with pytest.raises(RouteError, match=message) as info:
        model.set_route(route)
    assert "\n" not in str(info.value)


def test_resnet_route_errors_name_every_gate():
    model = dsnet.create_model("ds_resnet50_tiny")
    with pytest.raises(RouteError, match=r"gate 'stage3'.*valid choices 0\.\.3") as info:
        dsnet.materialize(model, (0, 0, 4, 0))
    assert "gate 'stage1': choices 0..3" in str(info.value)


def test_route_text_round_trip_and_lookup():
    assert Route.parse(str(Route((0, 3, 1, 2)))) == Route((0, 3, 1, 2))
    model = dsnet.create_model("ds_resnet50")
    route = model.routing_space.route_for(stage1={"ratio": 0.25}, stage2={"ratio": 0.5},
                                          stage3={"ratio": 0.75}, stage4={"ratio": 1.0})
    assert route == Route((0, 1, 2, 3))
    assert model.route_widths(route) == [64, 256, 768, 2048]
    assert model.validate_route("0-1-2-3") == route


def test_bad_execution_mode_and_width_multiplier():
    with pytest.raises(ValueError, match="valid modes: slice, mask, index, full"):
        dsnet.create_model("ds_mbnet_tiny").set_route((0,), "gather")
    with pytest.raises(ValueError, match="width_mult must be positive"):
        dsnet.create_model("mobilenet_v1", width_mult=0)
