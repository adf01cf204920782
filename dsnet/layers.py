"""Slicing layers: convolution, linear and split batch norm that run any narrower width.

Contract
--------
Every dynamic layer stores its weights at the largest width and executes the *active* width,
set by its owner (the supernet) through ``active_in`` / ``active_out`` (channel counts) and,
for :class:`SplitBatchNorm2d`, the statistics slot of that width. How a narrower width is
executed is the layer's ``exec_mode``, the four ways DS-Net++ Table 2 compares:

``slice``  weight views ``W[:c_out, :c_in]`` at run time; activations carry ``c`` channels.
``mask``   full-width compute, channels ``>= c_out`` zeroed; activations carry all channels.
``index``  kept channels' weights gathered with an index tensor at run time (``index_select``).
``full``   the whole layer, ignoring the active width (the unsliced supernet).

``slice``, ``mask`` and ``index`` compute the same numbers for the active channels. ``mask`` and
``index`` are inference modes; training uses ``slice``.

``to_static()`` returns a plain ``torch.nn`` layer holding contiguous *copies* of the active
slice: nothing is shared with the supernet.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

EXEC_MODES = ("slice", "mask", "index", "full")


def check_exec_mode(mode: str) -> str:
    if mode not in EXEC_MODES:
        raise ValueError(f"unknown execution mode {mode!r}; valid modes: {', '.join(EXEC_MODES)}")
    return mode


def _zero_channels_from(x: torch.Tensor, c: int) -> torch.Tensor:
    """Zero channels ``c:`` of an (N, C, ...) tensor (the ``mask`` execution mode)."""
    if c >= x.shape[1]:
        return x
    mask = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    mask[:c] = 1
    return x * mask.view(1, -1, *([1] * (x.dim() - 2)))


class _Dynamic:
    """Shared state of dynamic layers: active widths and execution mode."""

    exec_mode: str = "slice"
    active_in: int
    active_out: int

    def _index(self, c: int, device: torch.device) -> torch.Tensor:
        # Built per call on purpose: the ``index`` mode measures run-time gathering.
        return torch.arange(c, device=device)


class DynamicConv2d(nn.Conv2d, _Dynamic):
    """Conv2d (regular, or depthwise when ``depthwise=True``) that runs any narrower width and, for
    DS-Net++'s compound routing, any smaller odd kernel (``active_kernel``).

    Padding is ``k // 2`` for the active kernel ``k`` (same-size for stride 1), as in MobileNet and
    ResNet, unless ``padding`` fixes it (a transformer's non-overlapping patch projection: 0). A
    smaller kernel is the centre ``k x k`` crop of the stored largest kernel (DS-Net++ Fig. 4):
    ``slice`` takes a view of it, ``index`` gathers its rows and columns at run time and
    ``mask`` runs the largest kernel with the outer ring zeroed (the same numbers).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 depthwise: bool = False, bias: bool = False, padding: int | None = None):
        if depthwise and in_channels != out_channels:
            raise ValueError("a depthwise convolution has as many outputs as inputs")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2 if padding is None else padding,
                         groups=in_channels if depthwise else 1, bias=bias)
        self.same_padding = padding is None  # padding k // 2 of the active kernel, else fixed
        self.depthwise = depthwise
        self.active_in = in_channels
        self.active_out = out_channels
        self.active_kernel = kernel_size

    def _check_kernel(self) -> tuple[int, int]:
        """``(k, offset)`` of the active kernel inside the stored one."""
        k, big = self.active_kernel, self.kernel_size[0]
        if not (0 < k <= big and k % 2 == big % 2):
            raise ValueError(f"active kernel {k} must be positive, at most {big} and of its parity")
        return k, (big - k) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.exec_mode
        if mode == "full":
            return super().forward(x)
        k, off = self._check_kernel()
        if mode == "mask":
            w = self.weight
            if off:
                ring = torch.zeros_like(w[:1, :1])
                ring[..., off:off + k, off:off + k] = 1
                w = w * ring
            out = F.conv2d(x, w, self.bias, self.stride, self.padding, 1, self.groups)
            return _zero_channels_from(out, self.active_out)
        cout = self.active_out
        cin = cout if self.depthwise else self.active_in
        if mode == "slice":
            w = self.weight[:cout] if self.depthwise else self.weight[:cout, :cin]
            w = w[..., off:off + k, off:off + k] if off else w
            b = self.bias[:cout] if self.bias is not None else None
        else:  # index
            idx_out = self._index(cout, x.device)
            w = self.weight.index_select(0, idx_out)
            if not self.depthwise:
                w = w.index_select(1, self._index(cin, x.device))
            if off:
                taps = self._index(k, x.device) + off
                w = w.index_select(2, taps).index_select(3, taps)
            b = self.bias.index_select(0, idx_out) if self.bias is not None else None
        return F.conv2d(x, w, b, self.stride, self._padding(k), 1, cout if self.depthwise else 1)

    def _padding(self, k: int) -> int:
        return k // 2 if self.same_padding else self.padding[0]

    def to_static(self) -> nn.Conv2d:
        k, off = self._check_kernel()
        cout = self.active_out
        cin = cout if self.depthwise else self.active_in
        conv = nn.Conv2d(cin, cout, k, self.stride, self._padding(k),
                         groups=cout if self.depthwise else 1, bias=self.bias is not None)
        with torch.no_grad():
            w = self.weight[:cout] if self.depthwise else self.weight[:cout, :cin]
            conv.weight.copy_(w[..., off:off + k, off:off + k])
            if self.bias is not None:
                conv.bias.copy_(self.bias[:cout])
        return conv


class GroupSlicedConv2d(nn.Conv2d, _Dynamic):
    """Convolution whose output channels form ``groups`` blocks, each run at a prefix of its width
    (ShuffleNet's group convolutions, as slimmable networks slice them: one slimmable conv per group).

    ``grouped_input``: the input is split into the same blocks and each block sees only its own
    (``groups=groups``); otherwise every block sees the whole (prefix-sliced) input. ``active_in`` and
    ``active_out`` are totals (divisible by ``groups``). Only ``slice`` and ``full`` execution exist:
    the kept channels are a prefix of each block, not of the tensor, so ``mask`` and ``index`` (which
    keep a prefix) are refused.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, groups: int, stride: int = 1,
                 grouped_input: bool = True):
        if out_channels % groups or (grouped_input and in_channels % groups):
            raise ValueError(f"{in_channels} -> {out_channels} channels do not split into {groups} groups")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                         groups=groups if grouped_input else 1, bias=False)
        self.blocks, self.grouped_input = groups, grouped_input
        self.active_in, self.active_out = in_channels, out_channels

    def _sliced(self) -> torch.Tensor:
        g, k = self.blocks, self.kernel_size
        cin = self.active_in // g if self.grouped_input else self.active_in
        w = self.weight.view(g, self.out_channels // g, self.weight.shape[1], *k)
        return w[:, : self.active_out // g, :cin].reshape(self.active_out, cin, *k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exec_mode == "full":
            return super().forward(x)
        if self.exec_mode != "slice":
            raise ValueError(f"execution mode {self.exec_mode!r} is not defined for a group-sliced convolution "
                             "(ShuffleNet): its kept channels are a prefix of each group, not of the tensor")
        return F.conv2d(x, self._sliced(), None, self.stride, self.padding, 1, self.groups)

    def to_static(self) -> nn.Conv2d:
        w = self._sliced()
        conv = nn.Conv2d(w.shape[1] * self.groups, self.active_out, self.kernel_size, self.stride, self.padding,
                         groups=self.groups, bias=False)
        with torch.no_grad():
            conv.weight.copy_(w)
        return conv


class DynamicLinear(nn.Linear, _Dynamic):
    """Linear layer that runs any narrower input and/or output width."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.active_in = in_features
        self.active_out = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.exec_mode
        if mode == "full":
            return super().forward(x)
        if mode == "mask":
            return _zero_channels_from(super().forward(x), self.active_out)
        cin, cout = self.active_in, self.active_out
        if mode == "slice":
            w = self.weight[:cout, :cin]
            b = self.bias[:cout] if self.bias is not None else None
        else:  # index
            idx_out = self._index(cout, x.device)
            w = self.weight.index_select(0, idx_out).index_select(1, self._index(cin, x.device))
            b = self.bias.index_select(0, idx_out) if self.bias is not None else None
        return F.linear(x, w, b)

    def to_static(self) -> nn.Linear:
        lin = nn.Linear(self.active_in, self.active_out, bias=self.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(self.weight[: self.active_out, : self.active_in])
            if self.bias is not None:
                lin.bias.copy_(self.bias[: self.active_out])
        return lin


class SplitBatchNorm2d(nn.Module, _Dynamic):
    """Batch norm with one set of running statistics per width (split BN, DS-Net++ eq. 14).

    ``widths`` lists the widths the layer can run; statistics slot ``i`` belongs to ``widths[i]``
    and the affine ``weight``/``bias`` are shared (sliced), or with ``private_affine`` one per slot,
    shape ``(len(widths), max(widths))`` (slimmable networks' switchable BN privatizes both).
    Running statistics are stored padded in ``running_mean``/``running_var`` of shape
    ``(len(widths), max(widths))``.

    ``momentum=None`` gives a cumulative average, the re-calibration setting
    (:func:`dsnet.recalibrate_bn`).
    """

    def __init__(self, widths: Sequence[int], eps: float = 1e-5, momentum: float | None = 0.1,
                 private_affine: bool = False):
        super().__init__()
        self.widths = widths = self._checked(widths)
        c = widths[-1]
        self.num_features = c
        self.eps = eps
        self.momentum = momentum
        self.private_affine = private_affine
        shape = (len(widths), c) if private_affine else (c,)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("running_mean", torch.zeros(len(widths), c))
        self.register_buffer("running_var", torch.ones(len(widths), c))
        self.register_buffer("num_batches_tracked", torch.zeros(len(widths), dtype=torch.long))
        self.active_out = c

    @staticmethod
    def _checked(widths: Sequence[int]) -> tuple[int, ...]:
        widths = tuple(int(w) for w in widths)
        if not widths or list(widths) != sorted(set(widths)):
            raise ValueError(f"widths must be strictly increasing, got {widths}")
        return widths

    @property
    def active_in(self) -> int:  # a norm layer keeps its width
        return self.active_out

    @active_in.setter
    def active_in(self, value: int) -> None:
        self.active_out = value

    @property
    def slot(self) -> int:
        try:
            return self.widths.index(self.active_out)
        except ValueError:
            raise ValueError(f"SplitBatchNorm2d has no statistics for width {self.active_out}; "
                             f"widths: {list(self.widths)}") from None

    def _affine(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-width affine vectors that slot ``slot`` uses."""
        if self.private_affine:
            return self.weight[slot], self.bias[slot]
        return self.weight, self.bias

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def _momentum(self, slot: int) -> float:
        if not self.training:
            return 0.0
        self.num_batches_tracked[slot] += 1
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked[slot])
        return self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = self.exec_mode
        if mode == "full":
            slot, c = len(self.widths) - 1, self.num_features
        else:
            slot, c = self.slot, self.active_out
        weight, bias = self._affine(slot)
        if mode in ("mask", "full"):
            # Full-width compute with the slot's (padded) statistics.
            if self.training and mode == "mask":
                raise RuntimeError("mask execution is an inference mode; train in slice mode")
            out = F.batch_norm(x, self.running_mean[slot], self.running_var[slot], weight,
                               bias, self.training, self._momentum(slot), self.eps)
            return out if mode == "full" else _zero_channels_from(out, c)
        if mode == "index":
            if self.training:
                raise RuntimeError("index execution is an inference mode; train in slice mode")
            idx = self._index(c, x.device)
            return F.batch_norm(x, self.running_mean[slot].index_select(0, idx),
                                self.running_var[slot].index_select(0, idx),
                                weight.index_select(0, idx), bias.index_select(0, idx),
                                False, 0.0, self.eps)
        # slice: the views share storage, so training updates the slot's statistics in place.
        return F.batch_norm(x, self.running_mean[slot, :c], self.running_var[slot, :c],
                            weight[:c], bias[:c], self.training,
                            self._momentum(slot), self.eps)

    def to_static(self) -> nn.BatchNorm2d:
        slot, c = self.slot, self.active_out
        bn = nn.BatchNorm2d(c, eps=self.eps)
        weight, bias = self._affine(slot)
        with torch.no_grad():
            bn.weight.copy_(weight[:c])
            bn.bias.copy_(bias[:c])
            bn.running_mean.copy_(self.running_mean[slot, :c])
            bn.running_var.copy_(self.running_var[slot, :c])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[slot])
        return bn.train(self.training)

    def extra_repr(self) -> str:
        private = ", private_affine=True" if self.private_affine else ""
        return f"widths={list(self.widths)}, eps={self.eps}, momentum={self.momentum}{private}"


class SwitchableBatchNorm2d(SplitBatchNorm2d):
    """Slimmable networks' switchable BN: one private batch norm (statistics and affine) per switch.

    ``widths[i]`` is the width at switch ``i``; widths may repeat (MobileNet v2's stem is 16 wide at
    both x0.35 and x0.5), so the slot is the switch the owner sets (``switch``), not the width.
    """

    def __init__(self, widths: Sequence[int], eps: float = 1e-5, momentum: float | None = 0.1):
        super().__init__(widths, eps, momentum, private_affine=True)
        self.switch = len(self.widths) - 1

    @staticmethod
    def _checked(widths: Sequence[int]) -> tuple[int, ...]:
        widths = tuple(int(w) for w in widths)
        if not widths or widths[0] < 1 or any(b < a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"widths must be positive and non-decreasing, got {widths}")
        return widths

    @property
    def slot(self) -> int:
        if self.widths[self.switch] != self.active_out:
            raise ValueError(f"SwitchableBatchNorm2d: switch {self.switch} is {self.widths[self.switch]} wide, "
                             f"not {self.active_out}")
        return self.switch


class DynamicDepth(nn.Sequential, _Dynamic):
    """A stage of blocks of which the first ``active_depth`` run (DS-Net++'s dynamic depth: the
    later blocks are skipped, as residual stages allow). ``full`` runs every block;
    :func:`dsnet.supernet.static_copy` keeps only the active ones."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.active_depth = len(blocks)

    @property
    def active_blocks(self) -> list[nn.Module]:
        if not 1 <= self.active_depth <= len(self):
            raise ValueError(f"active depth {self.active_depth} outside 1..{len(self)}")
        return list(self)[: self.active_depth]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (list(self) if self.exec_mode == "full" else self.active_blocks):
            x = block(x)
        return x


def dynamic_layers(module: nn.Module):
    """Every dynamic layer inside ``module``."""
    return [m for m in module.modules() if isinstance(m, _Dynamic)]


def set_exec_mode(module: nn.Module, mode: str) -> None:
    check_exec_mode(mode)
    for m in dynamic_layers(module):
        m.exec_mode = mode


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new conv computing ``bn(conv(x))`` in eval mode (BN folded into weight and bias)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      conv.padding, conv.dilation, conv.groups, bias=True)
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((b - bn.running_mean) * scale + bn.bias)
    return fused
