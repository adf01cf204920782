"""Split-BN re-calibration: each width's statistics become the data's statistics."""

import pytest
import torch

import dsnet


def _loader(n_batches=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, size, size, generator=g) * 2 + 1, torch.zeros(4)) for _ in range(n_batches)]


def test_recalibration_sets_each_slot_to_the_data_mean():
    model = dsnet.create_model("ds_mbnet_tiny")
    loader = _loader()
    dsnet.recalibrate_bn(model, loader, routes=[(0,), (3,)])
    # the stem BN serves both routes: its mean is the average batch mean over both passes
    with torch.no_grad():
        means = [model.conv_stem(x).mean((0, 2, 3)) for x, _ in loader]
    assert torch.allclose(model.bn1.running_mean[0], torch.stack(means).mean(0), atol=1e-5)
    # a sliced layer: routes 0 and 3 filled their own slots, routes 1 and 2 stayed reset
    bn = model.blocks[4][0].bn2
    assert bn.num_batches_tracked.tolist() == [3, 0, 0, 3]
    assert bn.running_mean[0, : bn.widths[0]].abs().sum() > 0
    assert torch.equal(bn.running_mean[1], torch.zeros(bn.num_features))
    assert model.training  # mode restored
    assert bn.momentum == 0.1


def test_recalibration_changes_statistics_only():
    model = dsnet.create_model("ds_resnet50_tiny")
    weights = {k: v.clone() for k, v in model.named_parameters()}
    dsnet.recalibrate_bn(model.eval(), _loader(1), routes=[(0, 1, 2, 3)])
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert not model.training


def test_recalibration_needs_data_and_split_bn():
    with pytest.raises(ValueError, match="yielded no batch"):
        dsnet.recalibrate_bn(dsnet.create_model("ds_mbnet_tiny"), [])
    with pytest.raises(ValueError, match="no split batch norm"):
        dsnet.recalibrate_bn(dsnet.create_model("mobilenet_v1", width_mult=0.25), _loader(1))


def test_calibration_routes_cover_every_slot_of_a_large_space():
    small = dsnet.create_model("ds_mbnet_tiny")
    assert dsnet.calibration_routes(small) == small.routes()  # a small space: every route
    model = dsnet.create_model("ds_resnet50_tiny")  # 4 gates x 4 choices: 256 routes
    picked = [tuple(r) for r in dsnet.calibration_routes(model, k=32)]
    assert len(picked) == len(set(picked)) == 32
    order = [tuple(r) for r in model.routes()]
    assert [order.index(r) for r in picked] == sorted(order.index(r) for r in picked)  # MAdds order
    assert picked[0] == (0, 0, 0, 0) and picked[-1] == (3, 3, 3, 3)
    assert all({r[k] for r in picked} == {0, 1, 2, 3} for k in range(4))  # every (gate, choice) slot
    assert picked == [tuple(r) for r in dsnet.calibration_routes(model, k=32)]  # seeded
    assert picked != [tuple(r) for r in dsnet.calibration_routes(model, k=32, seed=1)]
