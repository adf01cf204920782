"""Slimmable networks (Yu et al., ICLR 2019): shared weights run at a few widths, the deployer's pick.

A slimmable network is a supernet without a gate: its routing space has one entry, ``switch``,
whose choice ``i`` runs every layer at width multiplier ``width_mults[i]`` (the option also lists
``widths``, the output width of each stage). Layers keep their weights at the largest switch and
run the switch's slice (:mod:`dsnet.layers`); batch norm is switchable
(:class:`dsnet.layers.SwitchableBatchNorm2d`: private statistics and affine per switch). Channel
counts at a multiplier are those of the static baselines, so switch ``w`` materializes to the same
architecture as the static model at ``width_mult=w``: MobileNet v1 and ResNet-50 take
``int(c * w)``; MobileNet v2 rounds to multiples of 8 (never more than 10% down) and keeps its last
convolution 1280 wide at every switch, as the slimmable networks' code does.

Registered: ``s_mobilenet_v1`` [0.25, 0.5, 0.75, 1.0], ``s_mobilenet_v2`` [0.35, 0.5, 0.75, 1.0],
``s_resnet50`` [0.25, 0.5, 0.75, 1.0], and the static ``mobilenet_v2(width_mult)``. They are not
dynamic (``model.dynamic`` is False): no gate decides, so no dynamic engine and no gate training.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dsnet.layers import DynamicConv2d, DynamicLinear, GroupSlicedConv2d, SwitchableBatchNorm2d
from dsnet.models.mobilenet import MobileNetV1
from dsnet.models.resnet import Bottleneck, StaticStem, count_bottleneck
from dsnet.registry import register_model
from dsnet.routes import GateSpec, Route, RouteError, RoutingSpace
from dsnet.supernet import Classifier, CostCounter, StaticNetwork, Supernet, static_copy


def _conv(cins, couts, k: int, stride: int = 1, depthwise: bool = False) -> DynamicConv2d:
    conv = DynamicConv2d(max(cins), max(couts), k, stride, depthwise)
    conv.switch_widths = tuple(zip(cins, couts))
    return conv


def _linear(cins, couts) -> DynamicLinear:
    fc = DynamicLinear(max(cins), max(couts))
    fc.switch_widths = tuple(zip(cins, couts))
    return fc


def make_divisible(v: float, divisor: int = 8) -> int:
    """Nearest multiple of ``divisor`` not more than 10% below ``v`` (MobileNet v2's rounding)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class SlimmableNet(Supernet):
    """Base of the slimmable networks: one switch, every layer sliced to it."""

    def __init__(self, width_mults, num_classes: int):
        super().__init__()
        width_mults = tuple(float(w) for w in width_mults)
        if not width_mults or list(width_mults) != sorted(set(width_mults)) or width_mults[0] <= 0:
            raise ValueError(f"width_mults must be positive and increasing, got {width_mults}")
        self.width_mults = width_mults
        self.num_classes = num_classes

    @property
    def dynamic(self) -> bool:
        return False

    def _finish(self, features: nn.Sequential, stage_widths: list[list[int]]) -> None:
        """``stage_widths[s][i]``: output width of stage ``s`` at switch ``i``."""
        self.features = features
        options = tuple({"width_mult": w, "widths": tuple(sw[i] for sw in stage_widths)}
                        for i, w in enumerate(self.width_mults))
        self.routing_space = RoutingSpace((GateSpec("switch", options),))
        self.set_route(Route((len(self.width_mults) - 1,)))

    def switch(self, width_mult: float) -> Route:
        """The route of the switch at ``width_mult``."""
        try:
            return Route((self.width_mults.index(float(width_mult)),))
        except ValueError:
            raise RouteError(f"no switch at width {width_mult}; switches: {list(self.width_mults)}") from None

    def set_route(self, route, exec_mode: str = "slice") -> None:
        if route is None:
            raise RouteError(f"{self.model_name or type(self).__name__} is slimmable: no gate routes it; "
                             f"pick a switch ({self.routing_space.describe()})")
        super().set_route(route, exec_mode)

    def _apply_route(self, route: Route) -> None:
        i = route[0]
        for m in self.modules():
            if isinstance(m, SwitchableBatchNorm2d):
                m.switch, m.active_out = i, m.widths[i]
            elif hasattr(m, "switch_widths"):
                m.active_in, m.active_out = m.switch_widths[i]

    def forward(self, x):
        return self.features(x)

    def static_sequence(self, route: Route) -> nn.Module:
        return self._with_route(route, lambda: static_copy(self.features))

    def deployment_segments(self):
        raise ValueError(f"{self.model_name or type(self).__name__} is slimmable: it has no gate to split at")


# --------------------------------------------------------------------------------------------
# MobileNet v1

class SMobileNetV1(SlimmableNet):
    """Slimmable MobileNet v1: the static model's layers (:class:`MobileNetV1`), every width sliced."""

    def __init__(self, width_mults=(0.25, 0.5, 0.75, 1.0), num_classes: int = 1000):
        super().__init__(width_mults, num_classes)
        n = len(self.width_mults)

        def ws(c: int) -> list[int]:
            return [max(1, int(c * w)) for w in self.width_mults]

        stem = ws(32)
        layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(
            _conv([3] * n, stem, 3, 2), SwitchableBatchNorm2d(stem), nn.ReLU(inplace=True)))]
        cin, self.stage_widths = stem, [stem]
        for i, (c, stride) in enumerate(MobileNetV1.LAYERS):
            cout = ws(c)
            layers.append((f"block{i}", nn.Sequential(
                _conv(cin, cin, 3, stride, depthwise=True), SwitchableBatchNorm2d(cin), nn.ReLU(inplace=True),
                _conv(cin, cout, 1), SwitchableBatchNorm2d(cout), nn.ReLU(inplace=True))))
            cin = cout
            self.stage_widths.append(cout)
        layers.append(("classifier", Classifier(_linear(cin, [num_classes] * n))))
        self._finish(nn.Sequential(OrderedDict(layers)), [cin])

    def count(self, counter: CostCounter, route: Route) -> None:
        i = route[0]
        widths = [w[i] for w in self.stage_widths]
        counter.conv(3, widths[0], 3, 2)
        for (_, stride), cin, cout in zip(MobileNetV1.LAYERS, widths, widths[1:]):
            counter.conv(cin, cin, 3, stride, depthwise=True)
            counter.conv(cin, cout, 1)
        counter.linear(widths[-1], self.num_classes)


# --------------------------------------------------------------------------------------------
# MobileNet v2

MBV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))  # (expansion t, output channels c, repeats n, first stride s)
MBV2_LAST = 1280  # the last convolution's width at every multiplier <= 1


class InvertedResidual(nn.Module):
    """MobileNet v2 block: 1x1 expansion (unless t = 1), 3x3 depthwise, 1x1 linear projection, skip
    connection where the stride is 1 and the width unchanged."""

    def __init__(self, cins, couts, stride: int, t: int):
        super().__init__()
        mids = [c * t for c in cins]
        layers: list[nn.Module] = []
        if t != 1:
            layers += [_conv(cins, mids, 1), SwitchableBatchNorm2d(mids), nn.ReLU6(inplace=True)]
        layers += [_conv(mids, mids, 3, stride, depthwise=True), SwitchableBatchNorm2d(mids), nn.ReLU6(inplace=True),
                   _conv(mids, couts, 1), SwitchableBatchNorm2d(couts)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and list(cins) == list(couts)

    def forward(self, x):
        return self.body(x) + x if self.residual else self.body(x)


def _mbv2_plan(width_mults) -> tuple[list[int], list[tuple[list[int], list[int], int, int]]]:
    """Stem widths and ``(cins, couts, stride, t)`` per block, one entry per multiplier."""
    stem = [make_divisible(32 * w) for w in width_mults]
    blocks, cin = [], stem
    for t, c, n, s in MBV2_BLOCKS:
        cout = [make_divisible(c * w) for w in width_mults]
        for j in range(n):
            blocks.append((cin, cout, s if j == 0 else 1, t))
            cin = cout
    return stem, blocks


def _count_mbv2(counter: CostCounter, stem: int, blocks, num_classes: int) -> None:
    counter.conv(3, stem, 3, 2)
    cin = stem
    for cin, cout, stride, t in blocks:
        if t != 1:
            counter.conv(cin, cin * t, 1)
        counter.conv(cin * t, cin * t, 3, stride, depthwise=True)
        counter.conv(cin * t, cout, 1)
        cin = cout
    counter.conv(cin, MBV2_LAST, 1)
    counter.linear(MBV2_LAST, num_classes)


class SMobileNetV2(SlimmableNet):
    """Slimmable MobileNet v2 (Sandler et al. 2018): inverted residuals, ReLU6."""

    def __init__(self, width_mults=(0.35, 0.5, 0.75, 1.0), num_classes: int = 1000):
        super().__init__(width_mults, num_classes)
        if max(self.width_mults) > 1.0:
            raise ValueError(f"width multipliers above 1.0 widen the last convolution; got {self.width_mults}")
        n = len(self.width_mults)
        self.stem, self.blocks = _mbv2_plan(self.width_mults)
        layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(
            _conv([3] * n, self.stem, 3, 2), SwitchableBatchNorm2d(self.stem), nn.ReLU6(inplace=True)))]
        layers += [(f"block{i}", InvertedResidual(*b)) for i, b in enumerate(self.blocks)]
        last = self.blocks[-1][1]
        layers.append(("last", nn.Sequential(_conv(last, [MBV2_LAST] * n, 1), SwitchableBatchNorm2d([MBV2_LAST] * n),
                                             nn.ReLU6(inplace=True))))
        layers.append(("classifier", Classifier(_linear([MBV2_LAST] * n, [num_classes] * n))))
        self._finish(nn.Sequential(OrderedDict(layers)), [last])

    def count(self, counter: CostCounter, route: Route) -> None:
        i = route[0]
        _count_mbv2(counter, self.stem[i], [(b[0][i], b[1][i], b[2], b[3]) for b in self.blocks], self.num_classes)


class SingleSwitch(StaticNetwork):
    """A static model: one slimmable network's only switch, materialized (same layers, MAdds and
    params as that switch). ``count_plan(counter)`` counts it from plain widths, so no copy of the
    slimmable network is kept."""

    def __init__(self, slimmable: SlimmableNet, count_plan):
        super().__init__()
        self.width_mult, self.num_classes = slimmable.width_mults[0], slimmable.num_classes
        self.features = slimmable.static_sequence(Route((0,)))
        self._count_plan = count_plan

    def count(self, counter: CostCounter, route: Route) -> None:
        self._count_plan(counter)


class MobileNetV2(SingleSwitch):
    """Static MobileNet v2 at a width multiplier (<= 1)."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000):
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        stem, blocks = _mbv2_plan((width_mult,))
        plan = stem[0], [(b[0][0], b[1][0], b[2], b[3]) for b in blocks]
        super().__init__(SMobileNetV2((width_mult,), num_classes),
                         lambda counter: _count_mbv2(counter, *plan, num_classes))


# --------------------------------------------------------------------------------------------
# ResNet-50

class _SBottleneck(Bottleneck):
    """:class:`dsnet.models.resnet.Bottleneck` (its forward and layer names) with switch-sliced
    layers and switchable batch norm."""

    def __init__(self, cins, mids, couts, stride: int, project: bool):
        nn.Module.__init__(self)
        self.conv1, self.bn1 = _conv(cins, mids, 1), SwitchableBatchNorm2d(mids)
        self.conv2, self.bn2 = _conv(mids, mids, 3, stride), SwitchableBatchNorm2d(mids)
        self.conv3, self.bn3 = _conv(mids, couts, 1), SwitchableBatchNorm2d(couts)
        self.attn = None
        self.downsample = (nn.Sequential(_conv(cins, couts, 1, stride), SwitchableBatchNorm2d(couts))
                           if project else None)
        self.relu = nn.ReLU(inplace=True)


class SResNet50(SlimmableNet):
    """Slimmable ResNet-50 (v1.5, stride on the 3x3), every layer at the switch's width, stem included."""

    def __init__(self, width_mults=(0.25, 0.5, 0.75, 1.0), depths=(3, 4, 6, 3), num_classes: int = 1000,
                 base: int = 64):
        super().__init__(width_mults, num_classes)
        n, self.depths = len(self.width_mults), tuple(depths)
        self.stem = [max(1, int(base * w)) for w in self.width_mults]
        self.mids = [[max(1, int(base * 2 ** k * w)) for w in self.width_mults] for k in range(len(depths))]
        parts: list[tuple[str, nn.Module]] = [("stem", StaticStem(_conv([3] * n, self.stem, 7, 2),
                                                                   SwitchableBatchNorm2d(self.stem)))]
        cin = self.stem
        for k, (mid, depth) in enumerate(zip(self.mids, self.depths)):
            cout = [m * 4 for m in mid]
            blocks = [_SBottleneck(cin if bi == 0 else cout, mid, cout, 2 if (k and not bi) else 1, bi == 0)
                      for bi in range(depth)]
            parts.append((f"stage{k + 1}", nn.Sequential(*blocks)))
            cin = cout
        parts.append(("classifier", Classifier(_linear(cin, [num_classes] * n))))
        self._finish(nn.Sequential(OrderedDict(parts)), [[m * 4 for m in mid] for mid in self.mids])

    def count(self, counter: CostCounter, route: Route) -> None:
        i = route[0]
        counter.conv(3, self.stem[i], 7, 2)
        counter.pool(3, 2, 1)
        cin = self.stem[i]
        for k, (mid, depth) in enumerate(zip(self.mids, self.depths)):
            for bi in range(depth):
                count_bottleneck(counter, cin, mid[i], mid[i] * 4, 2 if (k and not bi) else 1, bi == 0, 0)
                cin = mid[i] * 4
        counter.linear(cin, self.num_classes)


# --------------------------------------------------------------------------------------------
# ShuffleNet v1

SHUFFLE_STAGES = ((240, 4), (480, 8), (960, 4))  # g = 3: output channels at x1.0, blocks per stage
SHUFFLE_STEM = 24


def _gconv(cins, couts, groups: int, k: int = 1, stride: int = 1, grouped_input: bool = True) -> GroupSlicedConv2d:
    conv = GroupSlicedConv2d(max(cins), max(couts), k, groups, stride, grouped_input)
    conv.switch_widths = tuple(zip(cins, couts))
    return conv


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: ``(g, c/g)`` channel blocks transposed (reshape and transpose
    only, so every backend exports it)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNet v1 unit: 1x1 group conv (dense after the stem), BN, ReLU, shuffle, 3x3 depthwise,
    BN, 1x1 group conv, BN; then the skip connection (stride 1) or, at stride 2, ReLU and the
    concatenation with the input's 3x3 average pool. The bottleneck is a quarter of the output."""

    def __init__(self, cins, couts, stride: int, groups: int, after_stem: bool):
        super().__init__()
        self.residual = stride == 1 and list(cins) == list(couts)
        branch = list(couts) if self.residual else [o - i for o, i in zip(couts, cins)]
        mids = [o // 4 for o in couts]
        self.compress = _gconv(cins, mids, groups, grouped_input=not after_stem)
        self.bn1 = SwitchableBatchNorm2d(mids)
        self.shuffle = ChannelShuffle(groups)
        self.dw = _conv(mids, mids, 3, stride, depthwise=True)
        self.bn2 = SwitchableBatchNorm2d(mids)
        self.expand = _gconv(mids, branch, groups)
        self.bn3 = SwitchableBatchNorm2d(branch)
        self.pool = None if self.residual else nn.AvgPool2d(3, 2, 1)

    def forward(self, x):
        y = self.shuffle(torch.relu(self.bn1(self.compress(x))))
        y = self.bn3(self.expand(self.bn2(self.dw(y))))
        if self.residual:
            return torch.relu(y + x)
        return torch.cat([torch.relu(y), self.pool(x)], 1)


def _shufflenet_plan(width_mults, groups: int = 3):
    """Stem widths and ``(cins, couts, stride)`` per unit, one entry per multiplier."""
    stem = [int(SHUFFLE_STEM * w) for w in width_mults]
    units, cin = [], stem
    for c, n in SHUFFLE_STAGES:
        cout = [int(c * w) for w in width_mults]
        for j in range(n):
            units.append((cin, cout, 2 if j == 0 else 1))
            cin = cout
    return stem, units


def _count_shufflenet(counter: CostCounter, stem: int, units, groups: int, num_classes: int) -> None:
    counter.conv(3, stem, 3, 2)
    counter.pool(3, 2, 1)
    for i, (cin, cout, stride) in enumerate(units):
        residual = stride == 1 and cin == cout
        mid, branch = cout // 4, cout if residual else cout - cin
        counter.conv(cin, mid, 1, groups=1 if i == 0 else groups)
        counter.conv(mid, mid, 3, stride, depthwise=True)
        counter.conv(mid, branch, 1, groups=groups)
    counter.linear(units[-1][1], num_classes)


class SShuffleNet(SlimmableNet):
    """Slimmable ShuffleNet v1 (Zhang et al. 2018), g = 3: a 3x3 stem and max pool, three stages of
    shuffle units; each group convolution sliced per group (:class:`dsnet.layers.GroupSlicedConv2d`),
    so only the ``slice`` execution mode exists."""

    def __init__(self, width_mults=(0.5, 1.0, 2.0), num_classes: int = 1000, groups: int = 3):
        super().__init__(width_mults, num_classes)
        n, self.groups = len(self.width_mults), groups
        self.stem, self.units = _shufflenet_plan(self.width_mults, groups)
        layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(
            _gconv([3] * n, self.stem, groups, 3, 2, grouped_input=False), SwitchableBatchNorm2d(self.stem),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)))]
        layers += [(f"unit{i}", ShuffleUnit(cin, cout, stride, groups, after_stem=i == 0))
                   for i, (cin, cout, stride) in enumerate(self.units)]
        last = self.units[-1][1]
        layers.append(("classifier", Classifier(_linear(last, [num_classes] * n))))
        ends = [sum(n for _, n in SHUFFLE_STAGES[: k + 1]) - 1 for k in range(len(SHUFFLE_STAGES))]
        self._finish(nn.Sequential(OrderedDict(layers)), [self.units[e][1] for e in ends])

    def count(self, counter: CostCounter, route: Route) -> None:
        i = route[0]
        _count_shufflenet(counter, self.stem[i], [(u[0][i], u[1][i], u[2]) for u in self.units], self.groups,
                          self.num_classes)


class ShuffleNet(SingleSwitch):
    """Static ShuffleNet v1 (g = 3) at a width multiplier."""

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, groups: int = 3):
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        stem, units = _shufflenet_plan((width_mult,), groups)
        plan = stem[0], [(u[0][0], u[1][0], u[2]) for u in units]
        super().__init__(SShuffleNet((width_mult,), num_classes, groups),
                         lambda counter: _count_shufflenet(counter, *plan, groups, num_classes))


# --------------------------------------------------------------------------------------------
# Registered configurations

@register_model
def s_mobilenet_v1(num_classes: int = 1000) -> SMobileNetV1:
    """Slimmable MobileNet v1 [0.25, 0.5, 0.75, 1.0] (slimmable networks Table 3)."""
    return SMobileNetV1((0.25, 0.5, 0.75, 1.0), num_classes)


@register_model
def s_mobilenet_v2(num_classes: int = 1000) -> SMobileNetV2:
    """Slimmable MobileNet v2 [0.35, 0.5, 0.75, 1.0] (slimmable networks Table 3)."""
    return SMobileNetV2((0.35, 0.5, 0.75, 1.0), num_classes)


@register_model
def s_resnet50(num_classes: int = 1000) -> SResNet50:
    """Slimmable ResNet-50 [0.25, 0.5, 0.75, 1.0] (slimmable networks Table 3; DS-Net++ Table 2's
    "ResNet-50 with 25% channels" is its 0.25 switch)."""
    return SResNet50((0.25, 0.5, 0.75, 1.0), num_classes=num_classes)


@register_model
def s_resnet50_tiny(num_classes: int = 10) -> SResNet50:
    """A few-channel slimmable ResNet for fast tests: same structure, one block per stage."""
    return SResNet50((0.25, 0.5, 0.75, 1.0), depths=(1, 1, 1, 1), num_classes=num_classes, base=16)


@register_model
def s_shufflenet(num_classes: int = 1000) -> SShuffleNet:
    """Slimmable ShuffleNet v1 (g = 3) [0.5, 1.0, 2.0] (slimmable networks Table 3)."""
    return SShuffleNet((0.5, 1.0, 2.0), num_classes)


@register_model
def shufflenet(width_mult: float = 1.0, num_classes: int = 1000) -> ShuffleNet:
    """Static ShuffleNet v1 (g = 3) at ``width_mult`` (slimmable Table 3's individual networks)."""
    return ShuffleNet(width_mult, num_classes)


@register_model
def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000) -> MobileNetV2:
    """Static MobileNet v2 at ``width_mult`` (slimmable Table 3's individual networks)."""
    return MobileNetV2(width_mult, num_classes)
