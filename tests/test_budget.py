"""Latency budgets for the gate: the harder digits, budget parsing, the penalty's preference on a
LUT that disagrees with MAdds, and calibration to a budget (value and deployment)."""

from __future__ import annotations

import pytest
import torch

import dsnet
from dsnet.data import load_data, severity
from dsnet.training import ComplexityPenalty, calibrate_to_budget, evaluate_gate, route_probabilities, train_supernet
from harness.phases.retraining import Budget, RetrainingError, check_budgets, parse_budgets
from harness.phases.static import reference_model


def test_hard_digits_are_deterministic_and_mixed():
    a, b = load_data("digits-hard", 32), load_data("digits-hard", 32)
    assert a.source == "digits-hard"
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.val.tensors[0], b.val.tensors[0])
    clean = load_data("digits", 32)
    assert torch.equal(a.train.tensors[1], clean.train.tensors[1])  # same images, same split, same labels
    changed = (a.train.tensors[0] - clean.train.tensors[0]).flatten(1).abs().amax(1) > 1e-6
    sev = torch.tensor([severity(i) for i in range(1797)])
    # easy and hard images both: a third clean, the rest spread over (0, 1]
    assert 0.25 < (sev == 0).float().mean() < 0.42 and (sev > 0.7).float().mean() > 0.15
    assert 0.4 < changed.float().mean() < 0.8


def test_hard_digits_vary_in_difficulty_per_image():
    """The difficulty is real and per image (what a gate can route on): briefly trained, the
    supernet's routes classify the clean validation images far better than the most corrupted
    half of the corrupted ones."""
    splits, clean = load_data("digits-hard", 32), load_data("digits", 32)
    x, y = splits.val.tensors
    damage = (x - clean.val.tensors[0]).flatten(1).abs().mean(1)
    untouched = damage < 1e-6
    worst = damage >= damage[~untouched].median()
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_tiny", num_classes=10)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    train_supernet(model, loader, epochs=3, lr=0.1, seed=0)
    model.eval()
    routes = model.routes(32)
    with torch.no_grad():
        for r in (routes[0], routes[-1]):
            right = (model._with_route(r, lambda: model(x)).argmax(-1) == y).float()
            clean_acc, worst_acc = float(right[untouched].mean()), float(right[worst].mean())
            assert clean_acc > worst_acc + 0.3, (r, clean_acc, worst_acc)


def test_on_hard_digits_the_smallest_route_trails_the_largest():
    """Routing matters: briefly trained (4 epochs, ~15 s), the tiny DS-ResNet's smallest route
    (bottlenecks of 1-4 channels) classifies digits-hard clearly worse than its largest, by more
    than three binomial standard errors. (The tiny DS-MBNet's routes differ too little in capacity:
    on it the gap was 0-2 points, within the noise; on clean digits the tiny DS-ResNet's gap is
    there too: it comes from the route's capacity, the per-image difficulty from the data.)"""
    splits = load_data("digits-hard", 32)
    torch.manual_seed(0)
    model = dsnet.create_model("ds_resnet50_tiny", num_classes=10)
    model.init_for_training()
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    train_supernet(model, loader, epochs=4, lr=0.1, seed=0)
    model.eval()
    x, y = splits.val.tensors
    routes = model.routes(32)
    with torch.no_grad():
        small, large = (float((model._with_route(r, lambda: model(x)).argmax(-1) == y).float().mean())
                        for r in (routes[0], routes[-1]))
    se = (large * (1 - large) / len(y)) ** 0.5
    assert small < large - 3 * se, (small, large)


@pytest.mark.parametrize("text,expected", [
    ("0.6x", (Budget(0.6, "x"),)), ("3.0", (Budget(3.0, "ms"),)), ("3ms", (Budget(3.0, "ms"),)),
    ("0.4x, 2.5ms,1", (Budget(0.4, "x"), Budget(2.5, "ms"), Budget(1.0, "ms"))),
])
def test_budget_parsing(text, expected):
    assert parse_budgets(text) == expected
    assert Budget(0.6, "x").label == "0.6x" and Budget(3.0, "ms").label == "3ms"
    assert Budget(3.0, "ms").fraction(6.0) == pytest.approx(0.5) and Budget(0.6, "x").fraction(6.0) == 0.6


@pytest.mark.parametrize("text,pattern", [("fast", "'fast' is not a budget"), ("0x", "'0x' is not a budget"),
                                          ("-3ms", "not a budget"), ("1.5x", "more than the largest route"),
                                          ("0.5x,0.5x", "names a budget twice")])
def test_bad_budgets(text, pattern):
    with pytest.raises(RetrainingError, match=pattern):
        parse_budgets(text)


def test_a_budget_below_the_smallest_route_names_the_smallest_feasible_one():
    lut = [0.8, 1.0, 1.5, 2.0]
    check_budgets(parse_budgets("0.4x,0.8ms,2ms"), lut)  # feasible: nothing raised
    with pytest.raises(RetrainingError, match=r"0.3x \(0.600 ms\) is below the smallest route's deployed latency "
                                              r"on the LUT; the smallest feasible budget is 0.800 ms \(0.40x\)"):
        check_budgets(parse_budgets("0.3x"), lut)
    with pytest.raises(RetrainingError, match="smallest feasible budget is 0.800 ms"):
        check_budgets(parse_budgets("0.5ms"), lut)
    with pytest.raises(RetrainingError, match="above the largest route's deployed latency"):
        check_budgets(parse_budgets("2.5ms"), lut)


# a LUT on which latency and MAdds order the routes of ds_mbnet_tiny oppositely: the widest route
# is the fastest (as a launch-bound device can make it)
REVERSED_LUT = torch.tensor([4.0, 3.0, 2.0, 1.0])


def test_the_latency_penalty_favours_the_latency_cheaper_route_where_madds_disagree():
    model = dsnet.create_model("ds_mbnet_tiny")
    madds = ComplexityPenalty.madds(model, 32)
    assert madds.costs[0] < madds.costs[-1]  # MAdds: route 0 cheapest
    latency = ComplexityPenalty.latency(REVERSED_LUT, model)
    scores = torch.zeros(1, 4, requires_grad=True)
    p = torch.softmax(scores, -1)  # uniform over the 4 routes
    value = latency([p])
    assert value.item() == pytest.approx((2.5 / 4) ** 2)  # E = 2.5 ms, T = 4 ms
    value.backward()
    # dL/ds_k = 2 (E/T) / T * p_k (c_k - E): descent raises the latency-cheapest route's score most
    expected = 2 * (2.5 / 4) / 4 * 0.25 * (REVERSED_LUT - 2.5)
    assert torch.allclose(scores.grad[0], expected)
    assert int(scores.grad.argmin()) == 3
    scores.grad = None
    madds([torch.softmax(scores, -1)]).backward()
    assert int(scores.grad.argmin()) == 0  # the MAdds penalty prefers the opposite end


def _images(n=96, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) + torch.randn(n, 3, 1, 1, generator=g) * 2


@pytest.mark.parametrize("name", ["ds_mbnet_tiny", "ds_resnet50_tiny"])
def test_calibration_meets_the_budget_and_deploys(name):
    """The mean cost of the gate's eval-mode routes on the calibration images is at most the budget
    and the largest the bias reaches; the calibrated gate routes the same through ``dsnet.split``
    (the bias deploys as the routing FC's bias)."""
    model = reference_model(name).eval()
    n_routes = len(model.routing_space)
    costs = torch.linspace(1.0, 2.0, n_routes, dtype=torch.float64)
    x = _images()
    loader = [(x, torch.zeros(len(x), dtype=torch.long))]
    for budget in (1.25, 1.6):
        info = calibrate_to_budget(model, x, costs, budget)
        ev = evaluate_gate(model, loader, {"c": costs})
        assert ev.expected["c"] == pytest.approx(info["mean_cost"]) and info["mean_cost"] <= budget + 1e-9
        # and close to it: the bisection stops where one more image on a costlier route would break it
        assert info["mean_cost"] > budget - 0.1, info
        with torch.no_grad():
            _, choices = dsnet.split(model)(x)
            out = model.forward_dynamic(x)
        assert torch.equal(choices, torch.stack([o.argmax(-1) for o in out.onehots], 1))


def test_calibration_follows_the_lut_not_the_madds():
    """On the reversed LUT a tight latency budget sends the images to the widest route."""
    model = reference_model("ds_mbnet_tiny").eval()
    x = _images()
    info = calibrate_to_budget(model, x, REVERSED_LUT.double(), 1.0)
    assert info["mean_cost"] == pytest.approx(1.0)
    with torch.no_grad():
        out = model.forward_dynamic(x)
    assert route_probabilities(out.onehots).argmax(-1).eq(3).all()
    with pytest.raises(ValueError, match="cheapest allowed route costs 1"):
        calibrate_to_budget(model, x, REVERSED_LUT.double(), 0.5)
