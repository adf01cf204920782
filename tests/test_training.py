"""Two-stage training: SGS targets, the complexity penalty, stage II's frozen supernet, checkpoints."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import dsnet
from conftest import randomize
from dsnet.checkpoint import CheckpointError, ForeignCheckpoint, load_checkpoint, save_checkpoint
from dsnet.data import DataError, digits, load_data
from dsnet.training import (
    ComplexityPenalty,
    evaluate_gate,
    gate_parameters,
    gates,
    restrict_routes,
    route_probabilities,
    sandwich_routes,
    sgs_targets,
    train_gate,
    train_supernet,
)
from harness.deploy.lut import LatencyLUT, LUTError


@pytest.fixture(scope="module")
def demo():
    """Digits at 32x32: a small real data set, and loaders over a few batches of it."""
    splits = digits(32)
    sub = torch.utils.data.Subset(splits.train, range(96))
    train = torch.utils.data.DataLoader(sub, batch_size=32, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(torch.utils.data.Subset(splits.val, range(64)), batch_size=64)
    return splits, train, val


@pytest.mark.parametrize("name", ["ds_mbnet_tiny", "ds_resnet50_tiny"])
def test_sgs_targets_try_best(name):
    model = randomize(dsnet.create_model(name), seed=1)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    smallest = dsnet.Route(tuple(0 for _ in gates(model)))
    with torch.no_grad():
        model.set_route(smallest)
        pred = model(x).argmax(-1)
        model.set_route(None)
    right = torch.tensor([True, False, True, True, False, False, True, False])
    labels = torch.where(right, pred, (pred + 1) % 10)  # crafted: the smallest route is right where `right`
    targets = sgs_targets(model, x, labels)
    assert len(targets) == len(gates(model))
    for g, t in zip(gates(model), targets):
        assert t.tolist() == [0 if r else g.num_choices - 1 for r in right.tolist()]
    restrict_routes(model, 2)  # "largest" becomes the last allowed choice
    for t in sgs_targets(model, x, labels):
        assert t.tolist() == [0 if r else 1 for r in right.tolist()]


def test_penalty_value_and_gradient_on_a_hand_made_lut():
    model = dsnet.create_model("ds_mbnet_tiny")  # one gate, 4 routes
    lut_ms = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cp = ComplexityPenalty.latency(lut_ms, model)
    onehot = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1.0]], requires_grad=True)
    value = cp([onehot])
    # mean cost (1 + 4) / 2 = 2.5 ms, T = 4 ms (the largest route): (2.5 / 4)^2
    assert value.item() == pytest.approx((2.5 / 4) ** 2)
    value.backward()
    # d/dp_nk = 2 (E / T) (c_k / T) / N
    expected = 2 * (2.5 / 4) * (lut_ms / 4) / 2
    assert torch.allclose(onehot.grad, expected.expand(2, 4))
    with_target = ComplexityPenalty.latency(lut_ms, model, target_ms=2.0)
    assert with_target([onehot.detach()]).item() == pytest.approx(((2.5 - 2.0) / 4) ** 2)
    # a target as a fraction of the largest route reads only the LUT's ratios: scaling the LUT
    # (a machine running 1.7x slower) leaves the penalty unchanged
    for scale in (1.0, 1.7):
        rel = ComplexityPenalty.latency(lut_ms * scale, model, target_fraction=0.5)
        assert rel([onehot.detach()]).item() == pytest.approx(((2.5 - 2.0) / 4) ** 2)
    with pytest.raises(ValueError, match="not both"):
        ComplexityPenalty.latency(lut_ms, model, target_ms=2.0, target_fraction=0.5)


def test_penalty_from_a_lut_frame_and_route_order():
    # DS-ResNet tiny: 4 gates; the joint one-hot is the product of the gates', lexicographic order
    model = dsnet.create_model("ds_resnet50_tiny")
    oh = [torch.tensor([[0.0, 1, 0, 0]]), torch.tensor([[0.0, 0, 1, 0]]),
          torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0.0, 0, 0, 1]])]
    p = route_probabilities(oh)
    routes = model.routing_space.all_routes()
    assert p.shape == (1, 256) and p.sum() == 1
    assert routes[int(p.argmax())] == dsnet.Route((1, 2, 0, 3))
    # a hand-made compositional LUT: head 1 ms, every segment 0.1 ms x (choice + 1)
    rows = [{"model": "ds_resnet50_tiny", "backend": "b", "precision": "fp32", "batch_size": 1, "input_size": 32,
             "kind": "segment", "name": "head", "latency_ms_p50": 1.0, "status": "ok", "error": ""}]
    for k in range(4):
        for prev in ([None] if k == 0 else range(4)):
            for c in range(4):
                rows.append(rows[0] | {"name": dsnet.DynamicPlan.segment_name(k, (prev, c)),
                                       "latency_ms_p50": 0.1 * (c + 1)})
    lut = LatencyLUT.from_frame(pd.DataFrame(rows), "ds_resnet50_tiny", "b")
    cp = ComplexityPenalty.latency(lut.tensor(model), model)
    assert cp.expected(oh).item() == pytest.approx(1.0 + 0.1 * (2 + 3 + 1 + 4))
    assert cp.normalizer == pytest.approx(1.0 + 0.1 * 16)
    # a LUT for a model with other routes is refused, naming what is missing
    with pytest.raises(LUTError, match="lacks"):
        LatencyLUT.from_frame(pd.DataFrame(rows[:10]), "ds_resnet50_tiny", "b").tensor(model)
    with pytest.raises(ValueError, match="prices 4 routes, the model has 256"):
        ComplexityPenalty.latency(torch.ones(4), model)


def test_madds_penalty_uses_the_computed_madds():
    model = dsnet.create_model("ds_mbnet_tiny")
    cp = ComplexityPenalty.madds(model, 32)
    assert cp.costs.tolist() == [float(dsnet.profile(model, r, 32).madds) for r in model.routing_space.all_routes()]
    assert cp.normalizer == max(cp.costs.tolist())


@pytest.mark.parametrize("name", ["ds_mbnet_tiny", "ds_resnet50_tiny"])
def test_stage_two_changes_only_the_routing_heads(name, demo):
    _, train, _ = demo
    torch.manual_seed(0)
    model = dsnet.create_model(name, num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train_gate(model, train, ComplexityPenalty.madds(model, 32), epochs=1)
    assert len(history) == 1 and torch.isfinite(torch.tensor(history[0]["loss"]))
    after = model.state_dict()
    heads = {n for n, p in model.named_parameters() if any(p is q for q in gate_parameters(model))}
    assert heads and all(n.endswith("route.weight") for n in heads)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == heads  # BN statistics, attention heads and every other weight unchanged
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_restricted_gate_never_routes_beyond_its_choices():
    model = randomize(dsnet.create_model("ds_mbnet_tiny"))
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 3
    restrict_routes(model, 2)
    with torch.no_grad():
        choices = model.forward_dynamic(x).onehots[0].argmax(-1)
        _, deployed = dsnet.split(model)(x)
    assert choices.max() <= 1 and torch.equal(deployed[:, 0], choices)
    with pytest.raises(ValueError, match="cannot allow 5"):
        restrict_routes(model, 5)


def test_stage_one_sandwich_and_calibration(demo):
    _, train, val = demo
    torch.manual_seed(0)
    model = dsnet.create_model("ds_mbnet_tiny", num_classes=10)
    routes = sandwich_routes(model, 2, torch.Generator().manual_seed(0))
    assert routes[0] == model.routes()[-1] and routes[1] == model.routes()[0] and len(routes) == 4
    w0 = model.classifier.weight.clone()
    out = train_supernet(model, train, epochs=1, ema_decay=0.9)
    assert torch.isfinite(torch.tensor(out["loss"])) and not torch.equal(w0, model.classifier.weight)
    e = evaluate_gate(model, val, {"madds": ComplexityPenalty.madds(model, 32).costs})
    assert e.n == 64 and sum(e.route_counts.values()) == 64 and 0 <= e.accuracy <= 1


@pytest.mark.parametrize("name", ["ds_resnet50_tiny", "ds_resnet50_pp_tiny"])
def test_resnets_start_training_with_identity_residual_branches(name):
    from dsnet.models.resnet import Bottleneck

    torch.manual_seed(0)
    model = dsnet.create_model(name, num_classes=10)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert blocks and all(b.bn3.weight.abs().sum() > 0 for b in blocks)  # created with PyTorch's init
    model.init_for_training()
    model.eval()
    block = next(b for b in blocks if b.downsample is None)
    x = torch.randn(2, block.conv1.in_channels, 8, 8).relu()
    block.set_widths(x.shape[1], block.conv1.out_channels, x.shape[1])
    with torch.no_grad():  # a block without projection is the identity on a non-negative input
        assert torch.equal(block(x), x)
    assert all(torch.equal(b.bn3.weight, torch.zeros_like(b.bn3.weight)) for b in blocks)
    ds_mbnet = dsnet.create_model("ds_mbnet_tiny")
    before = {k: v.clone() for k, v in ds_mbnet.state_dict().items()}
    ds_mbnet.init_for_training()  # the default: PyTorch's initialization kept
    assert all(torch.equal(v, before[k]) for k, v in ds_mbnet.state_dict().items())


def test_checkpoint_round_trip(tmp_path):
    model = randomize(dsnet.create_model("ds_mbnet_tiny", num_classes=7))
    restrict_routes(model, 3)
    path = save_checkpoint(tmp_path / "g.pt", model, {"num_classes": 7}, note="x")
    loaded, meta = load_checkpoint(path)
    assert meta == {"note": "x"} and [g.num_allowed for g in gates(loaded)] == [3]
    x = torch.randn(4, 3, 32, 32) * 3
    for m in (model, loaded):
        m.set_route(None)  # gate-driven: the routing head and its restriction are part of the output
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ForeignCheckpoint, match="not a dsnet-harness checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_data_sources(tmp_path):
    splits = digits(32)
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and len(splits.classes) == 10
    assert len(splits.train) + len(splits.val) == 1797
    with pytest.raises(DataError, match="does not exist"):
        load_data(tmp_path / "nowhere", 32)
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (50, 40), (10, 20, 30)).save(tmp_path / split / c / "a.png")
    folder = load_data(tmp_path, 32)
    assert folder.classes == ["cat", "dog"] and len(folder.train) == 2
    assert folder.val[1][0].shape == (3, 32, 32) and folder.val[1][1] == 1
    # training images: a random-resized crop and a flip, different draws; validation: the same every time
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        tmp_path / "train" / "cat" / "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
        tmp_path / "val" / "cat" / "a.png")
    folder = load_data(tmp_path, 32)
    torch.manual_seed(0)
    draws = [folder.train[0][0] for _ in range(4)]
    assert all(d.shape == (3, 32, 32) for d in draws)
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(folder.val[0][0], folder.val[0][0])


def test_the_penalty_is_computed_in_float32_whatever_the_autocast():
    """Under float16 autocast the gates' one-hots come in float16; per-route MAdds (~1e8) would
    overflow float16 (max 65504) in the product, so the penalty casts to float32 first."""
    model = dsnet.create_model("ds_mbnet_tiny", num_classes=10)
    penalty = ComplexityPenalty.madds(model, 224)
    assert float(penalty.costs.max()) > 65504
    onehots = [torch.eye(len(penalty.costs))[[0, len(penalty.costs) - 1]]]
    exact = penalty.expected(onehots)
    half = penalty.expected([o.half() for o in onehots])
    assert half.dtype == torch.float32 and torch.equal(half, exact)
    assert torch.isfinite(penalty([o.half() for o in onehots]))


def test_mixed_precision_trains_both_stages_on_the_cpu(demo):
    """``amp`` on the CPU: bfloat16 autocast (no loss scale). Both stages train, the weights stay
    float32, and the loss is the float32 run's within bfloat16's rounding but not equal to it (the
    autocast did run)."""
    _, train, val = demo
    losses = {}
    for amp in (False, True):
        torch.manual_seed(0)
        model = dsnet.create_model("ds_mbnet_tiny", num_classes=10)
        losses[amp] = train_supernet(model, train, epochs=1, amp=amp, seed=0)["loss"]
        history = train_gate(model, train, ComplexityPenalty.madds(model, 32), epochs=1, amp=amp)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert np.isfinite(history[0]["loss"]) and np.isfinite(history[0]["cost"])
        assert evaluate_gate(model, val).n == 64
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=0.05)
