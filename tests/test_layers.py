"""Slicing layers: the four execution modes, split BN statistics, static copies."""

import pytest
import torch
from torch import nn

from dsnet.gate import AttentionHead, Gate, delta, route_onehot
from dsnet.layers import DynamicConv2d, DynamicDepth, DynamicLinear, SplitBatchNorm2d, set_exec_mode
from dsnet.supernet import static_copy


def _run(layer, x, mode):
    layer.exec_mode = mode
    return layer(x)


@pytest.mark.parametrize("depthwise", [False, True])
def test_conv_modes_agree_on_active_channels(depthwise):
    torch.manual_seed(0)
    conv = DynamicConv2d(8, 8 if depthwise else 12, 3, stride=2, depthwise=depthwise, bias=True)
    cin, cout = (5, 5) if depthwise else (5, 7)
    conv.active_in, conv.active_out = cin, cout
    x = torch.randn(2, 8, 9, 9)
    x_full = x.clone()
    x_full[:, cin:] = 0  # what a mask-mode predecessor delivers
    sliced = _run(conv, x[:, :cin], "slice")
    assert sliced.shape[1] == cout
    assert torch.allclose(_run(conv, x[:, :cin], "index"), sliced, atol=1e-6)
    masked = _run(conv, x_full, "mask")
    assert torch.allclose(masked[:, :cout], sliced, atol=1e-6)
    assert masked[:, cout:].abs().max() == 0
    # plain full width is the unsliced layer
    assert torch.equal(_run(conv, x, "full"), nn.functional.conv2d(
        x, conv.weight, conv.bias, 2, 1, 1, conv.groups))
    # the static copy computes the slice and shares no storage
    static = conv.to_static()
    assert torch.allclose(static(x[:, :cin]), sliced, atol=1e-6)
    assert static.weight.data_ptr() != conv.weight.data_ptr()
    assert static.weight.is_contiguous()


def test_linear_modes_agree():
    torch.manual_seed(0)
    lin = DynamicLinear(10, 6)
    lin.active_in, lin.active_out = 4, 3
    x = torch.randn(5, 10)
    x[:, 4:] = 0
    sliced = _run(lin, x[:, :4], "slice")
    assert torch.allclose(_run(lin, x[:, :4], "index"), sliced, atol=1e-6)
    assert torch.allclose(_run(lin, x, "mask")[:, :3], sliced, atol=1e-6)
    assert torch.allclose(lin.to_static()(x[:, :4]), sliced, atol=1e-6)


def test_split_bn_keeps_statistics_per_width():
    bn = SplitBatchNorm2d((4, 8))
    bn.train()
    bn.active_out = 4
    x = torch.randn(16, 4, 5, 5) * 3 + 2
    bn(x)
    assert torch.allclose(bn.running_mean[0, :4], 0.1 * x.mean((0, 2, 3)), atol=1e-5)
    assert bn.num_batches_tracked.tolist() == [1, 0]
    assert torch.equal(bn.running_mean[1], torch.zeros(8))  # the other width is untouched
    bn.eval()
    bn.active_out = 8
    y = torch.randn(2, 8, 3, 3)
    ref = nn.functional.batch_norm(y, bn.running_mean[1], bn.running_var[1], bn.weight, bn.bias)
    assert torch.allclose(bn(y), ref)


def test_split_bn_modes_and_static_copy():
    bn = SplitBatchNorm2d((4, 6, 8)).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.active_out = 6
    x = torch.randn(2, 8, 3, 3)
    x[:, 6:] = 0
    sliced = _run(bn, x[:, :6], "slice")
    assert torch.allclose(_run(bn, x[:, :6], "index"), sliced, atol=1e-6)
    masked = _run(bn, x, "mask")
    assert torch.allclose(masked[:, :6], sliced, atol=1e-6) and masked[:, 6:].abs().max() == 0
    assert torch.allclose(bn.to_static()(x[:, :6]), sliced, atol=1e-6)


def test_split_bn_rejects_unknown_width_and_bad_widths():
    bn = SplitBatchNorm2d((4, 8))
    bn.active_out = 5
    with pytest.raises(ValueError, match=r"no statistics for width 5; widths: \[4, 8\]"):
        bn(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match="strictly increasing"):
        SplitBatchNorm2d((8, 4))


def test_inference_modes_refuse_training():
    bn = SplitBatchNorm2d((4, 8)).train()
    bn.exec_mode = "mask"
    with pytest.raises(RuntimeError, match="inference mode"):
        bn(torch.randn(2, 8, 2, 2))


def test_unknown_exec_mode_names_valid_modes():
    with pytest.raises(ValueError, match="slice, mask, index, full"):
        set_exec_mode(nn.Sequential(DynamicLinear(2, 2)), "sparse")


def test_attention_head_is_one_plus_tanh():
    torch.manual_seed(0)
    head = AttentionHead(6, 3)
    x = torch.randn(2, 6, 4, 4)
    h = torch.relu(head.fc1(x.mean((2, 3))))
    expected = x * (1 + torch.tanh(head.fc2(h)))[:, :, None, None]
    assert torch.allclose(head(x), expected)
    assert torch.allclose(delta(torch.tensor([0.0, 100.0, -100.0])), torch.tensor([1.0, 2.0, 0.0]))


def test_gate_shares_first_fc_and_routes():
    torch.manual_seed(0)
    gate = Gate(6, 3, num_choices=4)
    x = torch.randn(5, 6, 4, 4)
    attended, logits = gate(x)
    assert torch.allclose(attended, AttentionHead.forward(gate, x))
    assert torch.allclose(logits, gate.route(torch.relu(gate.fc1(x.mean((2, 3))))))
    # eval: deterministic argmax one-hot
    onehot = route_onehot(logits, training=False)
    assert torch.equal(onehot.argmax(-1), logits.argmax(-1)) and torch.equal(onehot.sum(-1), torch.ones(5))
    # training: straight-through Gumbel one-hot, hard forward, gradient to the logits
    logits = logits.detach().requires_grad_()
    onehot = route_onehot(logits, training=True)
    assert set(onehot.detach().unique().tolist()) <= {0.0, 1.0} and torch.equal(onehot.sum(-1).detach(),
                                                                               torch.ones(5))
    (onehot * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_a_kernel_sliced_conv_is_a_plain_conv_with_the_centre_cropped_weights(depthwise, stride):
    """DS-Net++ Fig. 4: kernel k of a 7x7 supernet conv is the centre k x k of its weights, with
    padding k // 2; slice, mask and index compute it, and the static copy is that plain conv."""
    conv = DynamicConv2d(8, 8, 7, stride, depthwise=depthwise).eval()
    x = torch.randn(2, 8, 13, 13)
    for k in (3, 5, 7):
        conv.active_kernel, conv.active_in, conv.active_out = k, 6, 6
        off = (7 - k) // 2
        w = conv.weight[:6, :1 if depthwise else 6, off:off + k, off:off + k]
        ref = nn.functional.conv2d(x[:, :6], w, None, stride, k // 2, 1, 6 if depthwise else 1)
        with torch.no_grad():
            for mode in ("slice", "index"):
                conv.exec_mode = mode
                torch.testing.assert_close(conv(x[:, :6]), ref, msg=f"k={k} {mode}")
            conv.exec_mode = "mask"  # full width in and out, the inactive channels zero
            masked = torch.cat([x[:, :6], torch.zeros_like(x[:, 6:])], 1)
            torch.testing.assert_close(conv(masked)[:, :6], ref, msg=f"k={k} mask")
            assert conv(masked)[:, 6:].abs().max() == 0
            conv.exec_mode = "slice"
            plain = conv.to_static()
            assert plain.kernel_size == (k, k) and plain.padding == (k // 2, k // 2)
            torch.testing.assert_close(plain(x[:, :6]), ref)
    conv.active_kernel = 4
    with pytest.raises(ValueError, match="active kernel 4 must be positive, at most 7 and of its parity"):
        conv(x[:, :6])


def test_dynamic_depth_runs_and_copies_only_the_first_blocks():
    blocks = [nn.Linear(4, 4) for _ in range(3)]
    stage = DynamicDepth(*blocks)
    x = torch.randn(2, 4)
    stage.active_depth = 2
    with torch.no_grad():
        ref = blocks[1](blocks[0](x))
        assert torch.equal(stage(x), ref)
        copy = static_copy(stage)
        assert type(copy) is nn.Sequential and len(copy) == 2 and torch.equal(copy(x), ref)
        stage.exec_mode = "full"
        assert torch.equal(stage(x), blocks[2](ref))
    stage.exec_mode, stage.active_depth = "slice", 4
    with pytest.raises(ValueError, match="active depth 4 outside 1..3"):
        stage(x)
