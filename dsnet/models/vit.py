"""DS-ViT++ (DS-Net++ section 3.4, Tables 3 and 6): a vision transformer sliced in every dimension.

An efficient stem (Table 3, "ours": 7x7 conv stride 2 to 24 channels, two 3x3 depthwise-separable
blocks) feeds the one routing gate; the route then sets the patch projection's output (the
embedding dim ``d_e``, an 8x8 stride-8 convolution: 16x16 pixels per patch), the Q-K-V dim ``d_a``
and the head count (``d_a / h`` = 48 channels per head throughout Table 6), the MLP ratio and the
depth. Slicing keeps the first ``d_e`` channels, the first heads, the first MLP units and the
first blocks (eq. 15-19). Table 6 lists each dimension's candidates (d_e [192:416:32], d_a
[192:384:48], h [4:8], MLP ratio [3:4:0.5], depth [12:14]) but not which route takes which: route
``i`` of 8 takes, in every dimension, the candidate nearest ``i / 7`` along its list
(:func:`dsnet.routes.spread`), so all grow together and MAdds increase with the route.

Layer norm and attention take statistics over the channels, so only the ``slice`` execution mode
exists here (``mask`` would average zeros in). MAdds count the linear layers once per token
(the class token included) and the convolutions; the attention product is not counted (the
convention of :mod:`dsnet.supernet`). Position embeddings are learned for the 224x224 grid and
interpolated for other input sizes.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.gate import Gate, HeadWithGate, route_onehot
from dsnet.layers import DynamicConv2d, DynamicDepth, DynamicLinear, SplitBatchNorm2d, _Dynamic
from dsnet.registry import register_model
from dsnet.routes import GateSpec, Route, RoutingSpace, spread
from dsnet.supernet import CostCounter, DynamicOutput, Supernet, dispatch, static_copy

PATCH = 16  # pixels per patch side: stem stride 2 x projection stride 8


def _slice_only(layer) -> None:
    if layer.exec_mode not in ("slice", "full"):
        raise ValueError(f"execution mode {layer.exec_mode!r} is not defined for a transformer's "
                         f"{type(layer).__name__}: it takes statistics over the channels")


class DynamicLayerNorm(nn.LayerNorm, _Dynamic):
    """Layer norm over the first ``active_out`` channels (the slice of its affine)."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.active_in = self.active_out = dim

    def forward(self, x):
        _slice_only(self)
        d = self.normalized_shape[0] if self.exec_mode == "full" else self.active_out
        return F.layer_norm(x, (d,), self.weight[:d], self.bias[:d], self.eps)

    def to_static(self) -> nn.LayerNorm:
        norm = nn.LayerNorm(self.active_out, eps=self.eps)
        with torch.no_grad():
            norm.weight.copy_(self.weight[: self.active_out])
            norm.bias.copy_(self.bias[: self.active_out])
        return norm


class Attention(nn.Module):
    """Multi-head self attention: Q, K, V each a sliced linear (``d_a`` of them, ``heads`` heads),
    then the sliced projection back to ``d_e`` (eq. 16-18)."""

    def __init__(self, dim: int, qkv_dim: int, heads: int):
        super().__init__()
        self.q, self.k, self.v = (DynamicLinear(dim, qkv_dim) for _ in range(3))
        self.proj = DynamicLinear(qkv_dim, dim)
        self.heads = heads

    def set_dims(self, dim: int, qkv_dim: int, heads: int) -> None:
        for fc in (self.q, self.k, self.v):
            fc.active_in, fc.active_out = dim, qkv_dim
        self.proj.active_in, self.proj.active_out = qkv_dim, dim
        self.heads = heads

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = (fc(x).reshape(n, t, self.heads, -1).transpose(1, 2) for fc in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(n, t, -1))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (GELU)."""

    def __init__(self, dim: int, qkv_dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1, self.attn = DynamicLayerNorm(dim), Attention(dim, qkv_dim, heads)
        self.norm2 = DynamicLayerNorm(dim)
        self.fc1, self.fc2 = DynamicLinear(dim, hidden), DynamicLinear(hidden, dim)

    def set_dims(self, dim: int, qkv_dim: int, heads: int, hidden: int) -> None:
        self.norm1.active_out = self.norm2.active_out = dim
        self.attn.set_dims(dim, qkv_dim, heads)
        self.fc1.active_in, self.fc1.active_out = dim, hidden
        self.fc2.active_in, self.fc2.active_out = hidden, dim

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Tokens(nn.Module, _Dynamic):
    """Patch features (N, d_e, h, w) -> the token sequence: class token first, plus the position
    embedding (learned for ``grid`` x ``grid``, interpolated for other grids); sliced to ``d_e``."""

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, grid * grid + 1, dim) * 0.02)
        self.grid = grid
        self.active_in = self.active_out = dim

    def _sliced(self):
        d = self.pos.shape[-1] if self.exec_mode == "full" else self.active_out
        return self.cls[..., :d], self.pos[..., :d]

    def forward(self, x):
        _slice_only(self)
        cls, pos = self._sliced()
        n, d, h, w = x.shape
        if (h, w) != (self.grid, self.grid):
            grid = pos[:, 1:].reshape(1, self.grid, self.grid, d).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], 1)
        return torch.cat([cls.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], 1) + pos

    def to_static(self) -> Tokens:
        cls, pos = self._sliced()
        static = Tokens(cls.shape[-1], self.grid)
        with torch.no_grad():
            static.cls.copy_(cls)
            static.pos.copy_(pos)
        return static


class _Stem(nn.Module):
    """Table 3's efficient stem before the gate: 7x7 conv stride 2, then two 3x3 depthwise-separable blocks."""

    def __init__(self, width: int):
        super().__init__()
        layers = [DynamicConv2d(3, width, 7, 2), SplitBatchNorm2d((width,)), nn.ReLU(inplace=True)]
        for _ in range(2):
            layers += [DynamicConv2d(width, width, 3, depthwise=True), SplitBatchNorm2d((width,)),
                       nn.ReLU(inplace=True), DynamicConv2d(width, width, 1), SplitBatchNorm2d((width,)),
                       nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class _Tail(nn.Module):
    """Everything after the gate: patch projection, tokens, blocks, final norm, class-token head."""

    def __init__(self, embed, tokens, blocks, norm, head):
        super().__init__()
        self.embed, self.tokens, self.blocks, self.norm, self.head = embed, tokens, blocks, norm, head

    def forward(self, x):
        x = self.blocks(self.tokens(self.embed(x)))
        return self.head(self.norm(x)[:, 0])


class DSViTPP(Supernet):
    """DS-ViT++: efficient stem, one gate, a transformer sliced in every dimension (module docstring)."""

    def __init__(self, stem: int = 24, embed=tuple(range(192, 417, 32)), qkv=tuple(range(192, 385, 48)),
                 heads=(4, 5, 6, 7, 8), mlp_ratios=(3.0, 3.5, 4.0), depths=(12, 13, 14), n_routes: int = 8,
                 num_classes: int = 1000, img_size: int = 224, attn_ratio: float = 0.25):
        super().__init__()
        self.num_classes, self.stem_width = num_classes, stem
        self.embed_dims, self.qkv_dims = spread(embed, n_routes), spread(qkv, n_routes)
        self.head_counts, self.mlp_ratios = spread(heads, n_routes), spread(mlp_ratios, n_routes)
        self.depths = spread(depths, n_routes)
        for d, h in zip(self.qkv_dims, self.head_counts):
            if d % h:
                raise ValueError(f"Q-K-V dim {d} does not split into {h} heads")
        de, da = max(embed), max(qkv)
        hidden = int(max(mlp_ratios) * de)
        self.stem = _Stem(stem)
        self.gate = Gate(stem, max(1, round(stem * attn_ratio)), n_routes)
        self.tail = _Tail(DynamicConv2d(stem, de, 8, 8, bias=True, padding=0), Tokens(de, img_size // PATCH),
                          DynamicDepth(*(Block(de, da, max(heads), hidden) for _ in range(max(depths)))),
                          DynamicLayerNorm(de), DynamicLinear(de, num_classes))
        options = tuple({"widths": (self.embed_dims[i],), "embed_dim": self.embed_dims[i],
                         "qkv_dim": self.qkv_dims[i], "heads": self.head_counts[i],
                         "mlp_ratio": self.mlp_ratios[i], "depths": (self.depths[i],)} for i in range(n_routes))
        self.routing_space = RoutingSpace((GateSpec("compound", options),))
        self.set_route(Route((n_routes - 1,)))

    # -- routes -------------------------------------------------------------------------------
    def _dims(self, route: Route):
        i = route[0]
        de = self.embed_dims[i]
        return de, self.qkv_dims[i], self.head_counts[i], int(self.mlp_ratios[i] * de), self.depths[i]

    def _apply_route(self, route: Route) -> None:
        de, da, h, hidden, depth = self._dims(route)
        self.gate.set_width(self.stem_width)
        self.tail.embed.active_out = self.tail.tokens.active_out = self.tail.norm.active_out = de
        self.tail.blocks.active_depth = depth
        for block in self.tail.blocks:
            block.set_dims(de, da, h, hidden)
        self.tail.head.active_in = de

    def count(self, counter: CostCounter, route: Route) -> None:
        de, da, _, hidden, depth = self._dims(route)
        c = self.stem_width
        counter.conv(3, c, 7, 2)
        for _ in range(2):
            counter.conv(c, c, 3, depthwise=True)
            counter.conv(c, c, 1)
        counter.attention(c, self.gate.fc1.out_features)
        counter.conv(c, de, 8, 8, bn=False, bias=True, padding=0)  # non-overlapping 8x8 patches
        tokens = counter.hw[0] * counter.hw[1] + 1
        grid = self.tail.tokens.grid
        counter.params += de + (grid * grid + 1) * de  # class token, position embedding (learned at 224)
        for _ in range(depth):
            counter.params += 4 * de  # two layer norms
            for _ in range(3):
                counter.linear(de, da, tokens=tokens)
            counter.linear(da, de, tokens=tokens)
            counter.linear(de, hidden, tokens=tokens)
            counter.linear(hidden, de, tokens=tokens)
        counter.params += 2 * de
        counter.linear(de, self.num_classes)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x):
        if self.active_route is None:
            return self.forward_dynamic(x)[0]
        feats, _ = self.gate(self.stem(x))
        return self.tail(feats)

    def forward_dynamic(self, x) -> DynamicOutput:
        """Gate-driven inference (one gate) through :func:`dsnet.supernet.dispatch`."""

        def head(x):
            self.gate.set_width(self.stem_width)
            return self.gate(self.stem(x))

        def tail(k, key, feats, weight):
            self._apply_route(Route((key[1],)))
            y = self.tail(feats)
            return y if weight is None else y * weight.view(-1, 1)

        return dispatch(x, head, tail, 1, lambda s: route_onehot(s, self.training), self.training)

    # -- deployment ---------------------------------------------------------------------------
    def static_sequence(self, route: Route) -> nn.Module:
        return self._with_route(route, lambda: nn.Sequential(OrderedDict([
            ("stem", static_copy(self.stem)), ("attn", static_copy(self.gate)), ("tail", static_copy(self.tail))])))

    def deployment_segments(self):
        n = len(self.routing_space.gates[0])
        head = self._with_route(Route((0,)), lambda: HeadWithGate(static_copy(self.stem), self.gate.to_static_gate()))
        return head, [{(None, c): self._with_route(Route((c,)), lambda: static_copy(self.tail)) for c in range(n)}]


@register_model
def ds_vit_pp(num_classes: int = 1000) -> DSViTPP:
    """DS-ViT++: Table 6 routing space (embedding, Q-K-V dim, heads, MLP ratio, depth), 8 routes."""
    return DSViTPP(num_classes=num_classes)


@register_model
def ds_vit_pp_tiny(num_classes: int = 10) -> DSViTPP:
    """A few-channel DS-ViT++ for fast tests: same structure, 4 routes."""
    return DSViTPP(stem=8, embed=(16, 24, 32), qkv=(16, 24, 32), heads=(2, 3, 4), mlp_ratios=(1.0, 2.0),
                   depths=(1, 2), n_routes=4, num_classes=num_classes)


