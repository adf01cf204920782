"""DS-ResNet-50 (DS-Net++ Table 5) and the static ResNet-50 baseline.

DS-ResNet: a fixed 7x7 stem (64 channels) and max pool, then four stages of bottlenecks
(ResNet v1.5: stride on the 3x3). Each stage begins with a double-headed gate on the stage input:
its routing head chooses the stage's slimming ratio in {0.25, 0.5, 0.75, 1.0}; its attention head
rescales the input. The first block's projection shortcut follows the stage's ratio; the other
blocks inherit it and carry an attention head on their residual branch (SE position). 4^4 = 256
routes. Deployment splits cleanly at the gates: a stem (ending in gate 1) and four stages, each
materialized per (incoming ratio, own ratio) and ending in the next gate.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from dsnet.gate import AttentionHead, Gate, HeadWithGate, route_onehot
from dsnet.layers import DynamicConv2d, DynamicDepth, DynamicLinear, SplitBatchNorm2d
from dsnet.registry import register_model
from dsnet.routes import GateSpec, Route, RoutingSpace, spread
from dsnet.supernet import Classifier, CostCounter, DynamicOutput, StaticNetwork, Supernet, dispatch, static_copy

RATIOS = (0.25, 0.5, 0.75, 1.0)


class Bottleneck(nn.Module):
    """ResNet bottleneck; dynamic layers in the supernet, plain ones after :func:`static_copy`."""

    def __init__(self, in_widths, mid_widths, out_widths, stride, project, attn_hidden=0):
        super().__init__()
        cin, mid, cout = in_widths[-1], mid_widths[-1], out_widths[-1]
        self.conv1 = DynamicConv2d(cin, mid, 1)
        self.bn1 = SplitBatchNorm2d(mid_widths)
        self.conv2 = DynamicConv2d(mid, mid, 3, stride)
        self.bn2 = SplitBatchNorm2d(mid_widths)
        self.conv3 = DynamicConv2d(mid, cout, 1)
        self.bn3 = SplitBatchNorm2d(out_widths)
        self.attn = AttentionHead(cout, attn_hidden) if attn_hidden else None
        self.downsample = (nn.Sequential(DynamicConv2d(cin, cout, 1, stride),
                                         SplitBatchNorm2d(out_widths)) if project else None)
        self.relu = nn.ReLU(inplace=True)

    def set_widths(self, cin: int, mid: int, cout: int) -> None:
        self.conv1.active_in, self.conv1.active_out = cin, mid
        self.bn1.active_out = mid
        self.conv2.active_in, self.conv2.active_out = mid, mid
        self.bn2.active_out = mid
        self.conv3.active_in, self.conv3.active_out = mid, cout
        self.bn3.active_out = cout
        if self.attn is not None:
            self.attn.set_width(cout)
        if self.downsample is not None:
            self.downsample[0].active_in, self.downsample[0].active_out = cin, cout
            self.downsample[1].active_out = cout

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.attn is not None:
            out = self.attn(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _residual_init(model: nn.Module) -> None:
    """The initialization the official DS-Net code trains from (its DS-MBNet: timm's
    ``efficientnet_init_weights`` and ``init_residual_norm``; its ResNet is not published): He-normal
    (fan-out) convolutions and each bottleneck's last BN scale at zero, so every residual branch
    starts as the identity. With PyTorch's default initialization a 16-block ResNet-50 supernet
    diverged in its first steps on digits (gradient norm ~300 at the stem)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


def count_bottleneck(counter: CostCounter, cin, mid, cout, stride, project, attn_hidden):
    """MAdds of one bottleneck (1x1, 3x3 at ``stride``, 1x1, optional attention, projected shortcut
    when ``project``); shared with the slimmable ResNet-50."""
    shortcut = counter.branch()
    counter.conv(cin, mid, 1)
    counter.conv(mid, mid, 3, stride)
    counter.conv(mid, cout, 1)
    if attn_hidden:
        counter.attention(cout, attn_hidden)
    if project:
        shortcut.conv(cin, cout, 1, stride)
        counter.merge(shortcut)


class StaticStem(nn.Module):
    """ResNet's stem as plain layers: conv 7x7/2, BN, ReLU, max-pool 3x3/2 (shared with the
    slimmable ResNet-50)."""

    def __init__(self, conv, bn):
        super().__init__()
        self.conv, self.bn = conv, bn

    def forward(self, x):
        return nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 3, 2, 1)


class _GateOutput(nn.Module):
    """Drops the route logits of a gate (a materialized route keeps only its attention)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)


class DSResNet(Supernet):
    """Dynamic slimmable ResNet with one gate per stage."""

    def __init__(self, stem: int = 64, mids=(64, 128, 256, 512), depths=(3, 4, 6, 3),
                 expansion: int = 4, ratios=RATIOS, num_classes: int = 1000,
                 attn_ratio: float = 0.25):
        super().__init__()
        self.ratios = tuple(ratios)
        self.num_classes = num_classes
        self.stem_width = stem
        self.depths = tuple(depths)
        self.mid_widths = [tuple(max(1, round(m * r)) for r in ratios) for m in mids]
        self.out_widths = [tuple(w * expansion for w in mw) for mw in self.mid_widths]
        self.strides = (1,) + (2,) * (len(mids) - 1)

        def hidden(c: int) -> int:
            return max(1, round(c * attn_ratio))

        self.conv_stem = DynamicConv2d(3, stem, 7, 2)
        self.bn_stem = SplitBatchNorm2d((stem,))
        self.gates = nn.ModuleList()
        self.stages = nn.ModuleList()
        in_widths = (stem,)
        for mw, ow, depth, stride in zip(self.mid_widths, self.out_widths, depths, self.strides):
            self.gates.append(Gate(in_widths[-1], hidden(in_widths[-1]), len(ratios)))
            blocks = [Bottleneck(in_widths, mw, ow, stride, project=True)]
            blocks += [Bottleneck(ow, mw, ow, 1, project=False, attn_hidden=hidden(ow[-1]))
                       for _ in range(depth - 1)]
            self.stages.append(nn.ModuleList(blocks))
            in_widths = ow
        self.fc = DynamicLinear(in_widths[-1], num_classes)

        gates = tuple(GateSpec(f"stage{i + 1}", tuple(
            {"ratio": r, "widths": (ow[j],)} for j, r in enumerate(ratios)))
            for i, ow in enumerate(self.out_widths))
        self.routing_space = RoutingSpace(gates)
        self.set_route(Route((len(ratios) - 1,) * len(mids)))

    def init_for_training(self) -> None:
        _residual_init(self)

    # -- routes -------------------------------------------------------------------------------
    def _set_stage(self, k: int, cin: int, choice: int) -> int:
        """Configure gate ``k`` (at width ``cin``) and stage ``k`` for ``choice``; returns its width."""
        self.gates[k].set_width(cin)
        mid, cout = self.mid_widths[k][choice], self.out_widths[k][choice]
        for block in self.stages[k]:
            block.set_widths(cin, mid, cout)
            cin = cout
        return cout

    def _apply_route(self, route: Route) -> None:
        cin = self.stem_width
        for k, choice in enumerate(route):
            cin = self._set_stage(k, cin, choice)
        self.fc.active_in = cin

    def count(self, counter: CostCounter, route: Route) -> None:
        counter.conv(3, self.stem_width, 7, 2)
        counter.pool(3, 2, 1)
        cin = self.stem_width
        for k, choice in enumerate(route):
            counter.attention(cin, self.gates[k].fc1.out_features)
            mid, cout = self.mid_widths[k][choice], self.out_widths[k][choice]
            for bi, block in enumerate(self.stages[k]):
                hid = block.attn.fc1.out_features if block.attn is not None else 0
                count_bottleneck(counter, cin, mid, cout, self.strides[k] if bi == 0 else 1,
                                  bi == 0, hid)
                cin = cout
        counter.linear(cin, self.num_classes)

    # -- forward ------------------------------------------------------------------------------
    def _stem(self, x):
        return nn.functional.max_pool2d(torch.relu(self.bn_stem(self.conv_stem(x))), 3, 2, 1)

    def _stage(self, k, x):
        for block in self.stages[k]:
            x = block(x)
        return x

    def _classify(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x):
        if self.active_route is None:
            return self.forward_dynamic(x)[0]
        x = self._stem(x)
        for k in range(len(self.stages)):
            x, _ = self.gates[k](x)
            x = self._stage(k, x)
        return self._classify(x)

    def forward_dynamic(self, x) -> DynamicOutput:
        """Gate-driven inference through :func:`dsnet.supernet.dispatch` (eval: argmax per gate,
        samples grouped by their choices; training: stage outputs weighted by the straight-through
        one-hot, so gradients reach every gate)."""

        def head(x):
            self.gates[0].set_width(self.stem_width)
            return self.gates[0](self._stem(x))

        def stage(k, key, feats, weight):
            prev, c = key
            cin = self.stem_width if prev is None else self.out_widths[k - 1][prev]
            cout = self._set_stage(k, cin, c)
            y = self._stage(k, feats)
            if weight is not None:
                y = y * weight.view(-1, 1, 1, 1)
            if k + 1 < len(self.stages):
                self.gates[k + 1].set_width(cout)
                return self.gates[k + 1](y)
            self.fc.active_in = cout
            return self._classify(y)

        return dispatch(x, head, stage, len(self.stages), lambda s: route_onehot(s, self.training),
                        self.training)

    # -- deployment ---------------------------------------------------------------------------
    def _static_stem(self) -> nn.Module:
        return StaticStem(static_copy(self.conv_stem), static_copy(self.bn_stem))

    def _static_stage(self, k: int) -> nn.Sequential:
        return nn.Sequential(*[static_copy(b) for b in self.stages[k]])

    def static_sequence(self, route: Route) -> nn.Module:
        def build():
            parts: list[tuple[str, nn.Module]] = [("stem", self._static_stem())]
            for k in range(len(self.stages)):
                parts.append((f"gate{k + 1}", _GateOutput(static_copy(self.gates[k]))))
                parts.append((f"stage{k + 1}", self._static_stage(k)))
            parts.append(("classifier", Classifier(static_copy(self.fc))))
            return nn.Sequential(OrderedDict(parts))

        return self._with_route(route, build)

    def deployment_segments(self):
        n_gates = len(self.stages)
        top = len(self.ratios) - 1

        def segment(k: int, prev: int | None, choice: int):
            # Widths of stage k depend on (prev, choice); later stages are irrelevant here.
            route = [top] * n_gates
            if prev is not None:
                route[k - 1] = prev
            route[k] = choice
            if k + 1 < n_gates:
                def build():
                    gate = self.gates[k + 1].to_static_gate()
                    return HeadWithGate(self._static_stage(k), gate)
            else:
                def build():
                    return nn.Sequential(self._static_stage(k),
                                         Classifier(static_copy(self.fc)))
            return self._with_route(Route(tuple(route)), build)

        head = self._with_route(Route((top,) * n_gates), lambda: HeadWithGate(
            self._static_stem(), self.gates[0].to_static_gate()))
        stages = [{(None, c): segment(0, None, c) for c in range(len(self.ratios))}]
        for k in range(1, n_gates):
            stages.append({(p, c): segment(k, p, c)
                           for p in range(len(self.ratios)) for c in range(len(self.ratios))})
        return head, stages


class ResNet(StaticNetwork):
    """Static ResNet-50 (v1.5) at a width multiplier applied to every layer, stem included."""

    def __init__(self, width_mult: float = 1.0, depths=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.width_mult = width_mult
        self.num_classes = num_classes
        self.depths = tuple(depths)
        self.stem_width = max(1, int(64 * width_mult))
        self.mids = [max(1, int(m * width_mult)) for m in (64, 128, 256, 512)]
        # The same bottleneck code, built at one width: every layer is then plain after copy.
        parts: list[tuple[str, nn.Module]] = []
        stem = nn.Sequential(DynamicConv2d(3, self.stem_width, 7, 2),
                             SplitBatchNorm2d((self.stem_width,)))
        parts.append(("stem", StaticStem(static_copy(stem[0]), static_copy(stem[1]))))
        cin = self.stem_width
        for k, (mid, depth) in enumerate(zip(self.mids, depths)):
            blocks = []
            for bi in range(depth):
                b = Bottleneck((cin,), (mid,), (mid * 4,), 2 if (k and not bi) else 1,
                               project=bi == 0)
                blocks.append(static_copy(b))
                cin = mid * 4
            parts.append((f"stage{k + 1}", nn.Sequential(*blocks)))
        parts.append(("classifier", Classifier(nn.Linear(cin, num_classes))))
        self.features = nn.Sequential(OrderedDict(parts))

    def count(self, counter: CostCounter, route: Route) -> None:
        counter.conv(3, self.stem_width, 7, 2)
        counter.pool(3, 2, 1)
        cin = self.stem_width
        for k, (mid, depth) in enumerate(zip(self.mids, self.depths)):
            for bi in range(depth):
                count_bottleneck(counter, cin, mid, mid * 4, 2 if (k and not bi) else 1,
                                  bi == 0, 0)
                cin = mid * 4
        counter.linear(cin, self.num_classes)


# DS-Net++ Table 5, lower half: per stage, the output widths and depths one gate chooses from
PP_STAGES = ((tuple(range(128, 257, 32)), (2, 3)), (tuple(range(256, 513, 32)), (2, 3, 4)),
             (tuple(range(512, 1025, 64)), (5, 6, 7, 8)), (tuple(range(1024, 2049, 128)), (2, 3)))


class DSResNetPP(Supernet):
    """DS-ResNet++ (DS-Net++ Table 5, lower half): one gate, on the stem's output at the start of
    the first residual block, picks the width and the depth of all four stages (9 routes).

    The table lists each stage's candidate output widths (five for the first stage, nine for the
    others) and depths, but not which route takes which: here route ``i`` of ``n`` takes, in every
    stage, the candidate nearest ``i / (n - 1)`` along its list (:func:`dsnet.routes.spread`), so widths and
    depths grow together and MAdds increase strictly with the route. Depth slicing runs a stage's
    first blocks (:class:`dsnet.layers.DynamicDepth`). As in DS-ResNet, every block after a
    stage's first carries an attention head, and the later stages' inputs an attention head (the
    double-headed gate with its routing head disabled); bottlenecks are a quarter of the output.
    """

    def __init__(self, stem: int = 64, stages=PP_STAGES, n_routes: int = 9, num_classes: int = 1000,
                 attn_ratio: float = 0.25):
        super().__init__()
        self.num_classes, self.stem_width = num_classes, stem
        self.widths = [spread(w, n_routes) for w, _ in stages]  # [stage][route]
        self.depths = [spread(d, n_routes) for _, d in stages]
        self.strides = (1,) + (2,) * (len(stages) - 1)

        def hidden(c: int) -> int:
            return max(1, round(c * attn_ratio))

        self.conv_stem = DynamicConv2d(3, stem, 7, 2)
        self.bn_stem = SplitBatchNorm2d((stem,))
        self.gate = Gate(stem, hidden(stem), n_routes)
        self.attns = nn.ModuleList()
        self.stages = nn.ModuleList()
        in_widths = (stem,)
        for k, ((outs, depths), stride) in enumerate(zip(stages, self.strides)):
            mids = tuple(o // 4 for o in outs)
            if k:
                self.attns.append(AttentionHead(in_widths[-1], hidden(in_widths[-1])))
            blocks = [Bottleneck(in_widths, mids, outs, stride, project=True)]
            blocks += [Bottleneck(outs, mids, outs, 1, project=False, attn_hidden=hidden(outs[-1]))
                       for _ in range(max(depths) - 1)]
            self.stages.append(DynamicDepth(*blocks))
            in_widths = outs
        self.fc = DynamicLinear(in_widths[-1], num_classes)
        options = tuple({"widths": tuple(w[i] for w in self.widths), "depths": tuple(d[i] for d in self.depths)}
                        for i in range(n_routes))
        self.routing_space = RoutingSpace((GateSpec("compound", options),))
        self.set_route(Route((n_routes - 1,)))

    # -- routes -------------------------------------------------------------------------------
    def init_for_training(self) -> None:
        _residual_init(self)

    def _apply_route(self, route: Route) -> None:
        i, cin = route[0], self.stem_width
        self.gate.set_width(cin)
        for k, stage in enumerate(self.stages):
            if k:
                self.attns[k - 1].set_width(cin)
            cout = self.widths[k][i]
            stage.active_depth = self.depths[k][i]
            for block in stage:
                block.set_widths(cin, cout // 4, cout)
                cin = cout
        self.fc.active_in = cin

    def count(self, counter: CostCounter, route: Route) -> None:
        i, cin = route[0], self.stem_width
        counter.conv(3, cin, 7, 2)
        counter.pool(3, 2, 1)
        counter.attention(cin, self.gate.fc1.out_features)
        for k, stage in enumerate(self.stages):
            if k:
                counter.attention(cin, self.attns[k - 1].fc1.out_features)
            cout = self.widths[k][i]
            for bi in range(self.depths[k][i]):
                hid = stage[bi].attn.fc1.out_features if stage[bi].attn is not None else 0
                count_bottleneck(counter, cin, cout // 4, cout, self.strides[k] if bi == 0 else 1, bi == 0, hid)
                cin = cout
        counter.linear(cin, self.num_classes)

    # -- forward ------------------------------------------------------------------------------
    def _stem(self, x):
        return nn.functional.max_pool2d(torch.relu(self.bn_stem(self.conv_stem(x))), 3, 2, 1)

    def _stages_and_classify(self, x):
        for k, stage in enumerate(self.stages):
            if k:
                x = self.attns[k - 1](x)
            x = stage(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    def forward(self, x):
        if self.active_route is None:
            return self.forward_dynamic(x)[0]
        x, _ = self.gate(self._stem(x))
        return self._stages_and_classify(x)

    def forward_dynamic(self, x) -> DynamicOutput:
        """Gate-driven inference through :func:`dsnet.supernet.dispatch` (one gate)."""

        def head(x):
            self.gate.set_width(self.stem_width)
            return self.gate(self._stem(x))

        def tail(k, key, feats, weight):
            self._apply_route(Route((key[1],)))
            y = self._stages_and_classify(feats)
            return y if weight is None else y * weight.view(-1, 1)

        return dispatch(x, head, tail, 1, lambda s: route_onehot(s, self.training), self.training)

    # -- deployment ---------------------------------------------------------------------------
    def _static_tail(self) -> nn.Sequential:
        parts: list[tuple[str, nn.Module]] = []
        for k, stage in enumerate(self.stages):
            if k:
                parts.append((f"attn{k + 1}", static_copy(self.attns[k - 1])))
            parts.append((f"stage{k + 1}", static_copy(stage)))
        parts.append(("classifier", Classifier(static_copy(self.fc))))
        return nn.Sequential(OrderedDict(parts))

    def _static_stem(self) -> nn.Module:
        return StaticStem(static_copy(self.conv_stem), static_copy(self.bn_stem))

    def static_sequence(self, route: Route) -> nn.Module:
        def build():
            return nn.Sequential(OrderedDict([("stem", self._static_stem()),
                                              ("gate", _GateOutput(static_copy(self.gate))),
                                              ("tail", self._static_tail())]))

        return self._with_route(route, build)

    def deployment_segments(self):
        n = len(self.routing_space.gates[0])
        head = self._with_route(Route((n - 1,)), lambda: HeadWithGate(self._static_stem(),
                                                                        self.gate.to_static_gate()))
        return head, [{(None, c): self._with_route(Route((c,)), self._static_tail) for c in range(n)}]


@register_model(static_counterpart="resnet50")
def ds_resnet50(num_classes: int = 1000) -> DSResNet:
    """DS-ResNet-50: Table 5 routing space, 4 gates x 4 ratios = 256 routes."""
    return DSResNet(num_classes=num_classes)


@register_model
def ds_resnet50_tiny(num_classes: int = 10) -> DSResNet:
    """A few-channel DS-ResNet for fast tests: same structure, 256 routes."""
    return DSResNet(stem=8, mids=(4, 8, 8, 16), depths=(1, 2, 1, 1), num_classes=num_classes)


@register_model
def ds_resnet50_pp(num_classes: int = 1000) -> DSResNetPP:
    """DS-ResNet++: Table 5 (lower half) compound routing space, one gate, 9 routes of width and depth."""
    return DSResNetPP(num_classes=num_classes)


@register_model
def ds_resnet50_pp_tiny(num_classes: int = 10) -> DSResNetPP:
    """A few-channel DS-ResNet++ for fast tests: same structure, 5 routes of width and depth."""
    stages = (((8, 12, 16), (1, 2)), ((16, 24, 32), (1, 2)), ((32, 40, 48), (1, 2, 3)), ((48, 64), (1, 2)))
    return DSResNetPP(stem=8, stages=stages, n_routes=5, num_classes=num_classes)


@register_model
def resnet50(width_mult: float = 1.0, num_classes: int = 1000) -> ResNet:
    """Static ResNet-50 at ``width_mult`` (the "ideal" network of DS-Net++ Table 2)."""
    return ResNet(width_mult, num_classes=num_classes)
