"""Slimmable networks: Table 3's MAdds and params, switch == static model, exact slicing, no gate."""

import pytest
import torch

import dsnet
from conftest import randomize
from dsnet.layers import SwitchableBatchNorm2d
from dsnet.profile import count_by_hooks, profile

# Slimmable networks (Yu et al. 2019) Table 3 as printed: {width: (FLOPs (MAdds), params)}
PAPER_TABLE3 = {
    "s_mobilenet_v1": {1.0: ("569M", "4.2M"), 0.75: ("317M", "2.6M"), 0.5: ("150M", "1.3M"), 0.25: ("41M", "0.5M")},
    "s_mobilenet_v2": {1.0: ("301M", "3.5M"), 0.75: ("209M", "2.6M"), 0.5: ("97M", "2.0M"), 0.35: ("59M", "1.7M")},
    "s_resnet50": {1.0: ("4.1G", "25.5M"), 0.75: ("2.3G", "14.7M"), 0.5: ("1.1G", "6.9M"), 0.25: ("278M", "2.0M")},
    "s_shufflenet": {2.0: ("524M", "5.4M"), 1.0: ("138M", "1.8M"), 0.5: ("38M", "0.7M")},
}
STATIC = {"s_mobilenet_v1": "mobilenet_v1", "s_mobilenet_v2": "mobilenet_v2", "s_resnet50": "resnet50",
          "s_shufflenet": "shufflenet"}
# ShuffleNet's individual params read as truncated, not rounded: 5.45M is printed 5.4M (its slimmable
# twin, the same weights plus private BNs, 5.5M), and 1.87M 1.8M
TRUNCATED = {("s_shufflenet", 1.0, "params"), ("s_shufflenet", 2.0, "params")}


def _close_to_printed(ours: float, printed: str, rel: float = 0.03, truncated: bool = False) -> bool:
    """Within ``rel`` of the paper's figure, or within the rounding of its printing (half a unit
    of its last digit: "1.1G" covers 1.05G..1.15G, "0.5M" 0.45M..0.55M; truncated: "1.8M" covers
    1.8M..1.9M)."""
    scale = {"M": 1e6, "G": 1e9}[printed[-1]]
    digits = printed[:-1]
    unit = scale * 10 ** -(len(digits.split(".")[1]) if "." in digits else 0)
    value = float(digits) * scale
    if truncated and value <= ours < value + unit:
        return True
    return abs(ours - value) <= max(rel * value, unit / 2)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE3))
def test_every_switch_matches_table3_and_the_static_model_at_its_width(name):
    model = dsnet.create_model(name)
    assert sorted(PAPER_TABLE3[name]) == list(model.width_mults)
    madds = []
    for w, (paper_madds, paper_params) in sorted(PAPER_TABLE3[name].items()):
        p = profile(model, model.switch(w))
        assert _close_to_printed(p.madds, paper_madds), (w, p.madds, paper_madds)
        assert _close_to_printed(p.params, paper_params, truncated=(name, w, "params") in TRUNCATED), \
            (w, p.params, paper_params)
        assert p == profile(dsnet.create_model(STATIC[name], width_mult=w)), w  # the same network
        madds.append(p.madds)
    assert madds == sorted(madds) and len(set(madds)) == len(madds)


def test_the_mobilenet_v1_x075_switch_is_in_the_reported_range():
    # Table 3 prints 317M; MobileNet v1's own paper 325M for int(c * 0.75) channels
    m = dsnet.create_model("s_mobilenet_v1")
    assert 317e6 * 0.99 <= profile(m, m.switch(0.75)).madds <= 325e6 * 1.01


@pytest.mark.parametrize("name,size", [("s_mobilenet_v1", 32), ("s_mobilenet_v2", 32), ("s_resnet50_tiny", 32),
                                       ("s_resnet50", 64), ("s_shufflenet", 64)])
def test_every_switch_materializes_exactly_and_counts_as_its_hooks(name, size):
    model = randomize(dsnet.create_model(name, num_classes=10))
    x = torch.randn(2, 3, size, size)
    for route in model.routes(size):
        static = dsnet.materialize(model, route)
        assert count_by_hooks(static, size) == profile(model, route, size), route
        assert not any(isinstance(m, SwitchableBatchNorm2d) for m in static.modules())
        with torch.no_grad():
            model.set_route(route, "slice")
            ref = model(x)
            torch.testing.assert_close(static(x), ref, rtol=1e-4, atol=1e-5)
            for mode in ("mask", "index") if name != "s_shufflenet" else ():  # see the next test
                model.set_route(route, mode)
                torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5, msg=f"{route} {mode}")


def test_shufflenet_slices_each_group_and_refuses_prefix_modes():
    """A group convolution at a narrower switch keeps a prefix of each group (as one slimmable conv
    per group does), so its weights are the per-group prefixes; mask/index would keep a tensor prefix."""
    model = dsnet.create_model("s_shufflenet", num_classes=10)
    unit = model.features.unit1  # stride 1, grouped input
    small = dsnet.materialize(model, model.switch(0.5)).unit1.expand
    w = unit.expand.weight.view(3, unit.expand.out_channels // 3, unit.expand.weight.shape[1], 1, 1)
    cout, cin = small.out_channels // 3, small.in_channels // 3
    assert small.groups == 3
    assert torch.equal(small.weight, w[:, :cout, :cin].reshape(3 * cout, cin, 1, 1))
    model.set_route(model.switch(0.5), "mask")
    with pytest.raises(ValueError, match="not defined for a group-sliced convolution"):
        model(torch.randn(1, 3, 32, 32))


def test_switches_keep_private_batch_norm_even_at_equal_widths():
    """MobileNet v2's stem is 16 wide at x0.35 and at x0.5: two switches, two BNs."""
    model = dsnet.create_model("s_mobilenet_v2", num_classes=10)
    bn = model.features.stem[1]
    assert bn.widths[:2] == (16, 16)
    with torch.no_grad():
        bn.weight[0].fill_(1.0)
        bn.weight[1].fill_(3.0)
    a = dsnet.materialize(model, model.switch(0.35)).stem[1]
    b = dsnet.materialize(model, model.switch(0.5)).stem[1]
    assert a.weight.shape == b.weight.shape == (16,)
    assert torch.all(a.weight == 1.0) and torch.all(b.weight == 3.0)


def test_statistics_are_calibrated_per_switch():
    model = dsnet.reference_statistics(dsnet.create_model("s_resnet50_tiny"), input_size=32)
    bn = model.features.stage2[0].bn1  # its input is wider at wider switches
    assert all(bn.num_batches_tracked > 0)
    means = bn.running_mean[:, : bn.widths[0]]
    assert not torch.allclose(means[0], means[-1])  # each switch saw its own statistics


def test_a_slimmable_network_has_routes_but_no_gate():
    model = dsnet.create_model("s_mobilenet_v1")
    assert not model.dynamic and dsnet.create_model("ds_mbnet").dynamic
    assert [model.routing_space.options(r)[0]["width_mult"] for r in model.routes()] == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(dsnet.RouteError, match="slimmable: no gate routes it; pick a switch"):
        model.set_route(None)
    with pytest.raises(ValueError, match="no gates to split at"):
        dsnet.split(model)
    with pytest.raises(dsnet.RouteError, match=r"no switch at width 0.3; switches: \[0.25, 0.5, 0.75, 1.0\]"):
        model.switch(0.3)
    with pytest.raises(ValueError, match="slimmable: name a switch"):  # the deployer must pick
        dsnet.materialize(model)


def test_the_harness_measures_switches_like_widths_without_a_dynamic_engine(tmp_path):
    """``harness.run --models s_resnet50_tiny``: one row per switch labelled by its width, checked
    against eager on torchscript, and no dynamic engine (no gate to dispatch)."""
    import pandas as pd

    from harness import run as runmod

    target_file = tmp_path / "cpu-test.toml"
    target_file.write_text('name = "cpu-test"\ndevice = "cpu"\nbackends = ["torchscript"]\ninput_size = 32\n'
                       '[protocol]\nwarmup_calls = 2\nwarmup_ms = 10\nrepeat = 3\nmin_repeat_ms = 5\n')
    out = tmp_path / "out"
    assert runmod.main(["--target", str(target_file), "--models", "s_resnet50_tiny", "--out", str(out)]) == 0
    lut = pd.read_csv(out / "lut.csv")
    assert sorted(lut.route) == ["x0.25", "x0.5", "x0.75", "x1.0"] and set(lut.status) == {"ok"}
    model = dsnet.create_model("s_resnet50_tiny")
    by_route = lut.set_index("route")
    for w in model.width_mults:
        assert by_route.madds[f"x{w}"] == profile(model, model.switch(w), 32).madds
    assert pd.read_csv(out / "dynamic.csv").empty
