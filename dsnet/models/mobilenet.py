"""DS-MBNet (DS-Net++ Table 4) and the static MobileNetV1 baseline.

DS-MBNet follows the official code (changlin31/DS-Net, ``slimmable_mbnet_v1_bn_uniform``): a
3x3 stem, depthwise-separable blocks without skip connections, a channel-attention head in every
block after its depthwise convolution, and one routing gate in the first block of the first
sliced stage (after the fifth block's output and that block's depthwise convolution). The two
sliced stages share one width index: route ``i`` runs widths ``(224 + 32 i, 736 + 32 i)``.

Attention hidden sizes are a quarter of the widths the official checkpoint stores for each block's
input (its uniform-training maxima ``ref``), so official weights load one to one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from dsnet.gate import AttentionHead, Gate, HeadWithGate, route_onehot
from dsnet.layers import DynamicConv2d, DynamicLinear, SplitBatchNorm2d
from dsnet.registry import register_model
from dsnet.routes import GateSpec, Route, RoutingSpace, spread
from dsnet.supernet import Classifier, CostCounter, DynamicOutput, StaticNetwork, Supernet, dispatch, static_copy

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU}


def make_act(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name](inplace=True)
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


@dataclass(frozen=True)
class MBStage:
    """A stage of depthwise-separable blocks.

    ``widths``: candidate output widths (one entry: fixed width). ``ref``: width the official
    checkpoint stores for this stage's output (sets the attention hidden size of the blocks that
    take it as input); defaults to the largest width.
    """

    widths: tuple[int, ...]
    n: int
    stride: int
    ref: int | None = None

    @property
    def ref_width(self) -> int:
        return self.ref or self.widths[-1]


class DSBlock(nn.Module):
    """Depthwise-separable block: dw conv, BN, act, attention (or gate), pw conv, BN, act.

    Works with dynamic layers (supernet) and, after :func:`static_copy`, with plain ones.
    """

    def __init__(self, in_widths, out_widths, stride, hidden, act, gate_choices=0, kernel: int = 3):
        super().__init__()
        cin, cout = in_widths[-1], out_widths[-1]
        self.conv_dw = DynamicConv2d(cin, cin, kernel, stride, depthwise=True)
        self.bn1 = SplitBatchNorm2d(in_widths)
        self.act1 = make_act(act)
        self.attn = Gate(cin, hidden, gate_choices) if gate_choices else AttentionHead(cin, hidden)
        self.conv_pw = DynamicConv2d(cin, cout, 1)
        self.bn2 = SplitBatchNorm2d(out_widths)
        self.act2 = make_act(act)

    def set_widths(self, cin: int, cout: int) -> None:
        self.conv_dw.active_out = cin
        self.bn1.active_out = cin
        self.attn.set_width(cin)
        self.conv_pw.active_in, self.conv_pw.active_out = cin, cout
        self.bn2.active_out = cout

    def pre(self, x):
        return self.act1(self.bn1(self.conv_dw(x)))

    def post(self, x):
        return self.act2(self.bn2(self.conv_pw(x)))

    def forward(self, x):
        h = self.attn(self.pre(x))
        if isinstance(h, tuple):  # a gate: its route scores are used by the supernet, not here
            h = h[0]
        return self.post(h)


class _Pre(nn.Module):
    """The part of a block before its attention head (for deployment heads)."""

    def __init__(self, block: DSBlock):
        super().__init__()
        self.conv_dw, self.bn1, self.act1 = block.conv_dw, block.bn1, block.act1

    def forward(self, x):
        return self.act1(self.bn1(self.conv_dw(x)))


class _Post(nn.Module):
    def __init__(self, block: DSBlock):
        super().__init__()
        self.conv_pw, self.bn2, self.act2 = block.conv_pw, block.bn2, block.act2

    def forward(self, x):
        return self.act2(self.bn2(self.conv_pw(x)))


class DSMobileNetV1(Supernet):
    """Dynamic slimmable MobileNetV1 with one routing gate."""

    def __init__(self, stem: int = 16, stem_ref: int | None = 24,
                 stages: tuple[MBStage, ...] = (), gated_stage: int = 3,
                 num_classes: int = 1000, act: str = "silu", attn_ratio: float = 0.25):
        super().__init__()
        if not 0 <= gated_stage < len(stages):
            raise ValueError(f"gated_stage {gated_stage} out of range for {len(stages)} stages")
        n_choices = len(stages[gated_stage].widths)
        for s in stages[gated_stage:]:
            if len(s.widths) != n_choices:
                raise ValueError("the sliced stages share one width index: give them equally many "
                                 f"widths (got {[len(s.widths) for s in stages[gated_stage:]]})")
        for s in stages[:gated_stage]:
            if len(s.widths) != 1:
                raise ValueError("stages before the gate have a fixed width")
        self.stages_cfg = stages
        self.gated_stage = gated_stage
        self.num_classes = num_classes
        self.act = act

        def hidden(ref: int) -> int:
            return max(1, round(ref * attn_ratio))

        self.conv_stem = DynamicConv2d(3, stem, 3, 2)
        self.bn1 = SplitBatchNorm2d((stem,))
        self.act1 = make_act(act)
        self.blocks = nn.ModuleList()
        in_widths, in_ref = (stem,), stem_ref or stem
        for si, s in enumerate(stages):
            stage = nn.ModuleList()
            for bi in range(s.n):
                gate = n_choices if (si == gated_stage and bi == 0) else 0
                stage.append(DSBlock(in_widths, s.widths, s.stride if bi == 0 else 1,
                                     hidden(in_ref), act, gate_choices=gate))
                in_widths, in_ref = s.widths, s.ref_width
            self.blocks.append(stage)
        self.classifier = DynamicLinear(in_widths[-1], num_classes)

        options = tuple({"widths": tuple(s.widths[i] for s in stages[gated_stage:])}
                        for i in range(n_choices))
        self.routing_space = RoutingSpace((GateSpec("width", options),))
        self.set_route(Route((n_choices - 1,)))

    # -- routes -------------------------------------------------------------------------------
    def _stage_widths(self, route: Route) -> list[int]:
        return [s.widths[0] if si < self.gated_stage else s.widths[route[0]]
                for si, s in enumerate(self.stages_cfg)]

    def _apply_route(self, route: Route) -> None:
        cin = self.conv_stem.out_channels
        for stage, cout in zip(self.blocks, self._stage_widths(route)):
            for block in stage:
                block.set_widths(cin, cout)
                cin = cout
        self.classifier.active_in = cin

    def count(self, counter: CostCounter, route: Route) -> None:
        stem = self.conv_stem.out_channels
        counter.conv(3, stem, 3, 2)
        cin = stem
        for stage, cout in zip(self.blocks, self._stage_widths(route)):
            for block in stage:
                counter.conv(cin, cin, 3, block.conv_dw.stride[0], depthwise=True)
                counter.attention(cin, block.attn.fc1.out_features)
                counter.conv(cin, cout, 1)
                cin = cout
        counter.linear(cin, self.num_classes)

    # -- forward ------------------------------------------------------------------------------
    def _stem(self, x):
        return self.act1(self.bn1(self.conv_stem(x)))

    def _gate_block(self) -> DSBlock:
        return self.blocks[self.gated_stage][0]

    def _head(self, x):
        """Fixed layers up to the gate: returns (attended features, route logits)."""
        x = self._stem(x)
        for stage in self.blocks[: self.gated_stage]:
            for block in stage:
                x = block(x)
        return self._gate_block().attn(self._gate_block().pre(x))

    def _tail(self, x):
        x = self._gate_block().post(x)
        for bi, stage in enumerate(self.blocks[self.gated_stage:]):
            for block in (stage[1:] if bi == 0 else stage):
                x = block(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x):
        if self.active_route is not None:
            feats, _ = self._head(x)
            return self._tail(feats)
        return self.forward_dynamic(x)[0]

    def forward_dynamic(self, x) -> DynamicOutput:
        """Gate-driven inference (one gate), through :func:`dsnet.supernet.dispatch`.

        Eval: argmax route per sample; samples are grouped by route and each group runs its
        route's slice. Training (stage II) is differentiable: each route's tail runs in slice
        mode and the outputs are mixed by the straight-through one-hot.
        """
        self._apply_route(Route((0,)))  # the head's widths do not depend on the route

        def tail(k, key, feats, weight):
            self._apply_route(Route((key[1],)))
            y = self._tail(feats)
            return y if weight is None else y * weight.view(-1, 1)  # gradient reaches the gate

        return dispatch(x, self._head, tail, 1, lambda s: route_onehot(s, self.training), self.training)

    # -- deployment ---------------------------------------------------------------------------
    def _static_head_body(self) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(static_copy(self.conv_stem), static_copy(self.bn1),
                                   static_copy(self.act1)))]
        for si, stage in enumerate(self.blocks[: self.gated_stage]):
            for bi, block in enumerate(stage):
                parts.append((f"block{si}_{bi}", static_copy(block)))
        parts.append((f"block{self.gated_stage}_0_pre", static_copy(_Pre(self._gate_block()))))
        return nn.Sequential(OrderedDict(parts))

    def _static_tail(self) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = [
            (f"block{self.gated_stage}_0_post", static_copy(_Post(self._gate_block())))]
        for si, stage in enumerate(self.blocks[self.gated_stage:], start=self.gated_stage):
            for bi, block in enumerate(stage):
                if si == self.gated_stage and bi == 0:
                    continue
                parts.append((f"block{si}_{bi}", static_copy(block)))
        parts.append(("classifier", Classifier(static_copy(self.classifier))))
        return nn.Sequential(OrderedDict(parts))

    def static_sequence(self, route: Route) -> nn.Module:
        def build():
            body = self._static_head_body()
            attn = static_copy(self._gate_block().attn)  # attention head only
            return nn.Sequential(OrderedDict([("head", body), ("attn", attn),
                                              ("tail", self._static_tail())]))

        return self._with_route(route, build)

    def deployment_segments(self):
        head = self._with_route(Route((0,)), lambda: HeadWithGate(
            self._static_head_body(), self._gate_block().attn.to_static_gate()))
        tails = {(None, c): self._with_route(Route((c,)), self._static_tail)
                 for c in range(len(self.routing_space.gates[0]))}
        return head, [tails]


class DSMobileNetPP(Supernet):
    """DS-MBNet++ (DS-Net++ Table 4, lower half): DS-MBNet's layers with 5x5 depthwise kernels in
    the fixed blocks and one gate, on the fifth block's output, that picks the width and the kernel
    size of the eight blocks after it (12 routes).

    The gate sits *before* the sixth block (DS-MBNet's sits after that block's depthwise conv,
    whose kernel the route now chooses). Table 4 lists the candidate widths ([288:640:32] and
    [800:1152:32], one index shared as in DS-MBNet) and kernels {3, 5, 7} but not which route takes
    which kernel: route ``i`` takes the ``i``-th widths and the kernel nearest ``i / 11`` along
    (3, 5, 7) (:func:`dsnet.routes.spread`: 3 for routes 0-2, 5 for 3-8, 7 for 9-11), padding
    ``k // 2``; MAdds increase with the route. Every block keeps its attention head.
    """

    def __init__(self, stem: int = 16, fixed: tuple[MBStage, ...] = (), gated: tuple[MBStage, ...] = (),
                 fixed_kernel: int = 5, kernels=(3, 5, 7), num_classes: int = 1000, act: str = "silu",
                 attn_ratio: float = 0.25):
        super().__init__()
        n = len(gated[0].widths)
        if any(len(s.widths) != n for s in gated) or any(len(s.widths) != 1 for s in fixed):
            raise ValueError("the gated stages share one width index; the fixed stages have one width")
        self.num_classes, self.act = num_classes, act
        self.stages_cfg, self.n_fixed = fixed + gated, len(fixed)
        self.kernels = spread(tuple(kernels), n)

        def hidden(c: int) -> int:
            return max(1, round(c * attn_ratio))

        self.conv_stem = DynamicConv2d(3, stem, 3, 2)
        self.bn1 = SplitBatchNorm2d((stem,))
        self.act1 = make_act(act)
        self.blocks = nn.ModuleList()
        in_widths = (stem,)
        for si, s in enumerate(self.stages_cfg):
            if si == self.n_fixed:
                self.gate = Gate(in_widths[-1], hidden(in_widths[-1]), n)
            kernel = fixed_kernel if si < self.n_fixed else max(kernels)
            for bi in range(s.n):
                self.blocks.append(DSBlock(in_widths, s.widths, s.stride if bi == 0 else 1, hidden(in_widths[-1]),
                                           act, kernel=kernel))
                in_widths = s.widths
        self.n_head_blocks = sum(s.n for s in fixed)
        self.classifier = DynamicLinear(in_widths[-1], num_classes)
        options = tuple({"widths": tuple(s.widths[i] for s in gated), "kernel": self.kernels[i]} for i in range(n))
        self.routing_space = RoutingSpace((GateSpec("compound", options),))
        self.set_route(Route((n - 1,)))

    # -- routes -------------------------------------------------------------------------------
    def _block_plan(self, route: Route):
        """``(cin, cout, kernel, stride)`` of every block on ``route``."""
        i, cin, plan = route[0], self.conv_stem.out_channels, []
        for si, s in enumerate(self.stages_cfg):
            cout = s.widths[0] if si < self.n_fixed else s.widths[i]
            for block in self.blocks[len(plan): len(plan) + s.n]:
                kernel = block.conv_dw.kernel_size[0] if si < self.n_fixed else self.kernels[i]
                plan.append((cin, cout, kernel, block.conv_dw.stride[0]))
                cin = cout
        return plan

    def _apply_route(self, route: Route) -> None:
        plan = self._block_plan(route)
        for block, (cin, cout, kernel, _) in zip(self.blocks, plan):
            block.set_widths(cin, cout)
            block.conv_dw.active_kernel = kernel
        self.gate.set_width(self.blocks[self.n_head_blocks].conv_dw.in_channels)
        self.classifier.active_in = plan[-1][1]

    def count(self, counter: CostCounter, route: Route) -> None:
        counter.conv(3, self.conv_stem.out_channels, 3, 2)
        plan = self._block_plan(route)
        for bi, (cin, cout, kernel, stride) in enumerate(plan):
            if bi == self.n_head_blocks:
                counter.attention(cin, self.gate.fc1.out_features)
            counter.conv(cin, cin, kernel, stride, depthwise=True)
            counter.attention(cin, self.blocks[bi].attn.fc1.out_features)
            counter.conv(cin, cout, 1)
        counter.linear(plan[-1][1], self.num_classes)

    # -- forward ------------------------------------------------------------------------------
    def _head(self, x):
        x = self.act1(self.bn1(self.conv_stem(x)))
        for block in self.blocks[: self.n_head_blocks]:
            x = block(x)
        return self.gate(x)

    def _tail(self, x):
        for block in self.blocks[self.n_head_blocks:]:
            x = block(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x):
        if self.active_route is None:
            return self.forward_dynamic(x)[0]
        return self._tail(self._head(x)[0])

    def forward_dynamic(self, x) -> DynamicOutput:
        """Gate-driven inference (one gate) through :func:`dsnet.supernet.dispatch`."""

        def tail(k, key, feats, weight):
            self._apply_route(Route((key[1],)))
            y = self._tail(feats)
            return y if weight is None else y * weight.view(-1, 1)

        return dispatch(x, self._head, tail, 1, lambda s: route_onehot(s, self.training), self.training)

    # -- deployment ---------------------------------------------------------------------------
    def _static_head_body(self) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(static_copy(self.conv_stem), static_copy(self.bn1), static_copy(self.act1)))]
        parts += [(f"block{bi}", static_copy(b)) for bi, b in enumerate(self.blocks[: self.n_head_blocks])]
        return nn.Sequential(OrderedDict(parts))

    def _static_tail(self) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = [
            (f"block{bi}", static_copy(b)) for bi, b in enumerate(self.blocks) if bi >= self.n_head_blocks]
        parts.append(("classifier", Classifier(static_copy(self.classifier))))
        return nn.Sequential(OrderedDict(parts))

    def static_sequence(self, route: Route) -> nn.Module:
        def build():
            return nn.Sequential(OrderedDict([("head", self._static_head_body()), ("attn", static_copy(self.gate)),
                                              ("tail", self._static_tail())]))

        return self._with_route(route, build)

    def deployment_segments(self):
        n = len(self.routing_space.gates[0])
        head = self._with_route(Route((0,)), lambda: HeadWithGate(self._static_head_body(),
                                                                  self.gate.to_static_gate()))
        return head, [{(None, c): self._with_route(Route((c,)), self._static_tail) for c in range(n)}]


class MobileNetV1(StaticNetwork):
    """Static MobileNetV1 (Howard et al. 2017) at a width multiplier; ReLU, no attention."""

    # (output channels at width 1.0, stride)
    LAYERS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.width_mult = width_mult
        self.num_classes = num_classes

        def w(c: int) -> int:
            return max(1, int(c * width_mult))

        self.widths = [w(32)] + [w(c) for c, _ in self.LAYERS]
        layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(
            nn.Conv2d(3, self.widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(self.widths[0]),
            nn.ReLU(inplace=True)))]
        cin = self.widths[0]
        for i, ((_, stride), cout) in enumerate(zip(self.LAYERS, self.widths[1:])):
            layers.append((f"block{i}", nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True))))
            cin = cout
        layers.append(("classifier", Classifier(nn.Linear(cin, num_classes))))
        self.features = nn.Sequential(OrderedDict(layers))

    def count(self, counter: CostCounter, route: Route) -> None:
        counter.conv(3, self.widths[0], 3, 2)
        cin = self.widths[0]
        for (_, stride), cout in zip(self.LAYERS, self.widths[1:]):
            counter.conv(cin, cin, 3, stride, depthwise=True)
            counter.conv(cin, cout, 1)
            cin = cout
        counter.linear(cin, self.num_classes)


# --------------------------------------------------------------------------------------------
# Registered configurations

def _ds_mbnet_stages() -> tuple[MBStage, ...]:
    # DS-Net++ Table 4; ``ref``: the official checkpoint's stored widths (88/168/264).
    return (MBStage((32,), 1, 1, ref=88), MBStage((48,), 2, 2, ref=168),
            MBStage((96,), 2, 2, ref=264), MBStage(tuple(range(224, 641, 32)), 6, 2),
            MBStage(tuple(range(736, 1153, 32)), 2, 2))


@register_model(static_counterpart="mobilenet_v1")
def ds_mbnet(num_classes: int = 1000, act: str = "silu") -> DSMobileNetV1:
    """DS-MBNet: Table 4 routing space, 14 routes."""
    return DSMobileNetV1(16, 24, _ds_mbnet_stages(), 3, num_classes, act)


@register_model
def ds_mbnet_tiny(num_classes: int = 10, act: str = "silu") -> DSMobileNetV1:
    """A few-channel DS-MBNet for fast tests: same structure, 4 routes."""
    stages = (MBStage((8,), 1, 1), MBStage((12,), 1, 2), MBStage((16,), 1, 2),
              MBStage((16, 20, 24, 32), 2, 2), MBStage((24, 32, 40, 48), 1, 2))
    return DSMobileNetV1(8, None, stages, 3, num_classes, act)


@register_model
def ds_mbnet_pp(num_classes: int = 1000, act: str = "silu") -> DSMobileNetPP:
    """DS-MBNet++: Table 4 (lower half) compound routing space, 12 routes of width and kernel size."""
    fixed = (MBStage((32,), 1, 1), MBStage((48,), 2, 2), MBStage((96,), 2, 2))
    gated = (MBStage(tuple(range(288, 641, 32)), 6, 2), MBStage(tuple(range(800, 1153, 32)), 2, 2))
    return DSMobileNetPP(16, fixed, gated, 5, (3, 5, 7), num_classes, act)


@register_model
def ds_mbnet_pp_tiny(num_classes: int = 10, act: str = "silu") -> DSMobileNetPP:
    """A few-channel DS-MBNet++ for fast tests: same structure, 4 routes over kernels {3, 5, 7}."""
    fixed = (MBStage((8,), 1, 1), MBStage((12,), 1, 2), MBStage((16,), 1, 2))
    gated = (MBStage((16, 20, 24, 32), 2, 2), MBStage((24, 32, 40, 48), 1, 2))
    return DSMobileNetPP(8, fixed, gated, 5, (3, 5, 7), num_classes, act)


@register_model
def mobilenet_v1(width_mult: float = 1.0, num_classes: int = 1000) -> MobileNetV1:
    """Static MobileNetV1 at ``width_mult`` (Table 7 MBNetV1 rows, slimmable Table 3)."""
    return MobileNetV1(width_mult, num_classes)
