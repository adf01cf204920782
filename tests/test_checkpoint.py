"""Official DS-Net checkpoints (changlin31/DS-Net, ``dyn_slim``) load into ds_mbnet.

The state dict is built here from the official model's description, independently of the loader:
``slimmable_mbnet_v1_bn_uniform`` stores the stem at widths [16, 24], the fixed stages at
[32, 88], [48, 168], [96, 264], the sliced ones at 224..640 and 736..1152 (step 32); split BN is
``aux_bn.<i>`` per width (affine on the last); attention/routing heads are 1x1 convs
``gate.conv_reduce`` / ``gate.conv_expand`` / ``gate.gate.0`` with a quarter of the block's
largest input width as hidden size.
"""

import pytest
import torch

import dsnet

STEM = [16, 24]
STAGES = [([32, 88], 1), ([48, 168], 2), ([96, 264], 2), (list(range(224, 641, 32)), 6),
          (list(range(736, 1153, 32)), 2)]
GATED_STAGE = 3


def _bn(sd, prefix, widths, g):
    for i, w in enumerate(widths):
        sd[f"{prefix}.aux_bn.{i}.running_mean"] = torch.randn(w, generator=g)
        sd[f"{prefix}.aux_bn.{i}.running_var"] = torch.rand(w, generator=g) + 0.5
        sd[f"{prefix}.aux_bn.{i}.num_batches_tracked"] = torch.tensor(i + 1)
    sd[f"{prefix}.aux_bn.{len(widths) - 1}.weight"] = torch.randn(widths[-1], generator=g)
    sd[f"{prefix}.aux_bn.{len(widths) - 1}.bias"] = torch.randn(widths[-1], generator=g)


def official_mbnet_state_dict(gate_choices=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {"conv_stem.weight": torch.randn(STEM[-1], 3, 3, 3, generator=g)}
    _bn(sd, "bn1", STEM, g)
    in_list = STEM
    for s, (out_list, n) in enumerate(STAGES):
        for b in range(n):
            p = f"blocks.{s}." + ("first_block" if b == 0 else f"residual_blocks.{b - 1}")
            cin, cout, r = in_list[-1], out_list[-1], round(in_list[-1] * 0.25)
            sd[f"{p}.conv_dw.weight"] = torch.randn(cin, 1, 3, 3, generator=g)
            _bn(sd, f"{p}.bn1", in_list, g)
            sd[f"{p}.gate.conv_reduce.weight"] = torch.randn(r, cin, 1, 1, generator=g)
            sd[f"{p}.gate.conv_reduce.bias"] = torch.randn(r, generator=g)
            sd[f"{p}.gate.conv_expand.weight"] = torch.randn(cin, r, 1, 1, generator=g)
            sd[f"{p}.gate.conv_expand.bias"] = torch.randn(cin, generator=g)
            if s == GATED_STAGE and b == 0:
                sd[f"{p}.gate.gate.0.weight"] = torch.randn(gate_choices, r, 1, 1, generator=g)
            sd[f"{p}.conv_pw.weight"] = torch.randn(cout, cin, 1, 1, generator=g)
            _bn(sd, f"{p}.bn2", out_list, g)
            in_list = out_list
    sd["classifier.weight"] = torch.randn(1000, in_list[-1], generator=g)
    sd["classifier.bias"] = torch.randn(1000, generator=g)
    return sd


def test_official_layout_loads_and_maps_each_tensor():
    sd = official_mbnet_state_dict()
    model = dsnet.create_model("ds_mbnet")
    dsnet.load_official_state_dict(model, {"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    # fixed layers run the first stored width
    assert torch.equal(model.conv_stem.weight, sd["conv_stem.weight"][:16])
    assert torch.equal(model.bn1.running_mean[0], sd["bn1.aux_bn.0.running_mean"])
    assert torch.equal(model.bn1.weight, sd["bn1.aux_bn.1.weight"][:16])
    gb = model.blocks[3][0]  # the gated block: input fixed at 96, output sliced
    assert torch.equal(gb.conv_dw.weight, sd["blocks.3.first_block.conv_dw.weight"][:96])
    assert torch.equal(gb.attn.fc1.weight, sd["blocks.3.first_block.gate.conv_reduce.weight"][:, :96, 0, 0])
    assert torch.equal(gb.attn.route.weight, sd["blocks.3.first_block.gate.gate.0.weight"][:, :, 0, 0])
    assert torch.equal(gb.conv_pw.weight, sd["blocks.3.first_block.conv_pw.weight"][:, :96])
    # sliced layers: one statistics slot per width
    assert torch.equal(gb.bn2.running_mean[5, :384], sd["blocks.3.first_block.bn2.aux_bn.5.running_mean"])
    blk = model.blocks[4][1]
    assert torch.equal(blk.bn1.running_var[13], sd["blocks.4.residual_blocks.0.bn1.aux_bn.13.running_var"])
    assert torch.equal(model.classifier.weight, sd["classifier.weight"])


def _official_forward(sd, x, choice):
    """DS-MBNet inference on one route, written directly against the official tensors."""
    f = torch.nn.functional

    def bn(h, prefix, widths):
        c, last = h.shape[1], len(widths) - 1
        i = widths.index(c)
        return f.batch_norm(h, sd[f"{prefix}.aux_bn.{i}.running_mean"],
                            sd[f"{prefix}.aux_bn.{i}.running_var"],
                            sd[f"{prefix}.aux_bn.{last}.weight"][:c], sd[f"{prefix}.aux_bn.{last}.bias"][:c])

    h = f.silu(bn(f.conv2d(x, sd["conv_stem.weight"][:16], stride=2, padding=1), "bn1", STEM))
    in_list = STEM
    for s, (out_list, n) in enumerate(STAGES):
        cout = out_list[choice if s >= GATED_STAGE else 0]
        for b in range(n):
            p = f"blocks.{s}." + ("first_block" if b == 0 else f"residual_blocks.{b - 1}")
            cin = h.shape[1]
            h = f.conv2d(h, sd[f"{p}.conv_dw.weight"][:cin], stride=2 if (b == 0 and s > 0) else 1,
                         padding=1, groups=cin)
            h = f.silu(bn(h, f"{p}.bn1", in_list))
            z = f.relu(f.conv2d(h.mean((2, 3), keepdim=True), sd[f"{p}.gate.conv_reduce.weight"][:, :cin],
                                sd[f"{p}.gate.conv_reduce.bias"]))
            z = f.conv2d(z, sd[f"{p}.gate.conv_expand.weight"][:cin], sd[f"{p}.gate.conv_expand.bias"][:cin])
            h = h * (1 + torch.tanh(z))
            h = f.silu(bn(f.conv2d(h, sd[f"{p}.conv_pw.weight"][:cout, :cin]), f"{p}.bn2", out_list))
            in_list = out_list
    return f.linear(h.mean((2, 3)), sd["classifier.weight"][:, : h.shape[1]], sd["classifier.bias"])


@pytest.mark.parametrize("choice", [0, 9])
def test_loaded_route_equals_a_forward_written_against_the_official_tensors(choice):
    sd = official_mbnet_state_dict(seed=1)
    with torch.no_grad():  # tame the random weights so activations stay in range
        for k, v in sd.items():
            if k.endswith(".weight") and v.dim() == 4:
                v /= (v[0].numel() ** 0.5)
    model = dsnet.create_model("ds_mbnet")
    dsnet.load_official_state_dict(model, sd)
    model.eval().set_route((choice,))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = _official_forward(sd, x, choice)
        assert torch.allclose(model(x), ref, atol=1e-4, rtol=1e-4)
        assert torch.allclose(dsnet.materialize(model, (choice,))(x), ref, atol=1e-4, rtol=1e-4)


def test_mismatches_name_the_offending_keys():
    model = dsnet.create_model("ds_mbnet")
    before = model.conv_stem.weight.clone()
    sd = official_mbnet_state_dict()
    del sd["blocks.2.residual_blocks.0.conv_pw.weight"]
    sd["blocks.9.first_block.conv_dw.weight"] = torch.zeros(1)
    sd["classifier.weight"] = torch.zeros(1000, 512)
    with pytest.raises(ValueError) as info:
        dsnet.load_official_state_dict(model, sd)
    msg = str(info.value)
    assert "missing keys: blocks.2.residual_blocks.0.conv_pw.weight" in msg
    assert "unexpected keys: blocks.9.first_block.conv_dw.weight" in msg
    assert "classifier.weight: checkpoint (1000, 512) cannot hold model (1000, 1152)" in msg
    assert torch.equal(model.conv_stem.weight, before)  # nothing loaded on error


def test_released_four_choice_gate_is_reported_not_truncated():
    # The released code builds its routing head with 4 outputs; ds_mbnet routes over 14.
    with pytest.raises(ValueError, match=r"gate\.gate\.0\.weight: checkpoint \(4, 66\) cannot hold "
                                         r"model \(14, 66\)"):
        dsnet.load_official_state_dict(dsnet.create_model("ds_mbnet"), official_mbnet_state_dict(4))
