"""The double-headed dynamic gate of DS-Net++ (section 3.5).

Contract
--------
``AttentionHead(channels, hidden)``: average-pool encoder, shared first FC + ReLU, attention FC,
``x * delta(.)`` with ``delta(x) = 1 + tanh(x)`` (eq. 21-23). Its FCs are dynamic, so the head
runs at the block's active width.

``Gate(channels, hidden, num_choices)``: an attention head plus a routing head (FC from the
shared hidden vector to one score per choice, eq. 22). ``forward(x)`` returns
``(attended_x, logits)``. :func:`route_onehot` turns the logits into the one-hot route:
straight-through Gumbel-softmax in training, deterministic argmax in eval.

``gate.num_allowed`` restricts the routing space to the first choices (the paper trains its -S
gate on the first routes only): the other choices score ``-inf``, in training, in eval and in the
deployed ``StaticGate``. The routing head (``gate.route``) is what stage II trains; the attention
head and the shared first FC belong to the supernet (stage I). ``gate.score_bias`` (a buffer, zero
unless a budget calibration set it: ``dsnet.training.calibrate_to_budget``) is added to the
routing scores; the deployed gate carries it as its routing FC's bias.

``to_static()`` gives the attention head alone as plain layers (the routing head is dropped: a
materialized route has no gate); ``to_static_gate()`` keeps both heads, for a deployment segment
that must emit route scores (``dsnet.split``). ``HeadWithGate(body, gate)`` is such a segment:
plain layers, then the static gate; it returns ``(features, route_logits)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.layers import DynamicLinear


def delta(x: torch.Tensor) -> torch.Tensor:
    """The attention activation of DS-Net++ eq. 23."""
    return 1.0 + torch.tanh(x)


class StaticAttention(nn.Module):
    """Plain-layer attention head: ``x * (1 + tanh(fc2(relu(fc1(avgpool(x))))))``."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear):
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x.mean((2, 3))))
        return x * delta(self.fc2(h))[:, :, None, None]


def restrict_scores(scores: torch.Tensor, num_allowed: int) -> torch.Tensor:
    """Scores with every choice from ``num_allowed`` on set to ``-inf`` (never chosen)."""
    if num_allowed >= scores.shape[-1]:
        return scores
    keep = torch.arange(scores.shape[-1], device=scores.device) < num_allowed
    return scores.masked_fill(~keep, float("-inf"))


class StaticGate(nn.Module):
    """Plain-layer double-headed gate: returns ``(attended_x, route_logits)``."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, route: nn.Linear, num_allowed: int | None = None):
        super().__init__()
        self.fc1, self.fc2, self.route = fc1, fc2, route
        self.num_allowed = route.out_features if num_allowed is None else num_allowed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.mean((2, 3))))
        return x * delta(self.fc2(h))[:, :, None, None], restrict_scores(self.route(h), self.num_allowed)


class AttentionHead(nn.Module):
    """Channel attention head (soft head of the double-headed gate)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = DynamicLinear(channels, hidden)  # shared first FC (W1)
        self.fc2 = DynamicLinear(hidden, channels)  # attention FC (W3)

    def set_width(self, c: int) -> None:
        self.fc1.active_in = c
        self.fc2.active_out = c

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc1(x.mean((2, 3))))

    def _attend(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return x * delta(self.fc2(h))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x, self._hidden(x))

    def to_static(self) -> StaticAttention:
        return StaticAttention(self.fc1.to_static(), self.fc2.to_static())


class Gate(AttentionHead):
    """Double-headed gate: attention head and routing head sharing the first FC."""

    def __init__(self, channels: int, hidden: int, num_choices: int):
        super().__init__(channels, hidden)
        self.num_choices = num_choices
        self.num_allowed = num_choices
        self.route = nn.Linear(hidden, num_choices, bias=False)  # routing head (W2)
        self.register_buffer("score_bias", torch.zeros(num_choices))  # budget calibration, not the paper's

    def restrict(self, num_allowed: int | None) -> None:
        """Allow only choices ``0 .. num_allowed - 1`` (``None``: all)."""
        n = self.num_choices if num_allowed is None else int(num_allowed)
        if not 1 <= n <= self.num_choices:
            raise ValueError(f"a gate with {self.num_choices} choices cannot allow {num_allowed}")
        self.num_allowed = n

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        h = self._hidden(x)
        return self._attend(x, h), restrict_scores(self.route(h) + self.score_bias, self.num_allowed)

    def to_static(self) -> StaticAttention:
        return StaticAttention(self.fc1.to_static(), self.fc2.to_static())

    def to_static_gate(self) -> StaticGate:
        calibrated = bool(self.score_bias.any())  # an uncalibrated gate deploys exactly as before
        route = nn.Linear(self.route.in_features, self.num_choices, bias=calibrated)
        with torch.no_grad():
            route.weight.copy_(self.route.weight)
            if calibrated:
                route.bias.copy_(self.score_bias)
        return StaticGate(self.fc1.to_static(), self.fc2.to_static(), route, self.num_allowed)


def model_gates(model: nn.Module) -> list[Gate]:
    """A model's routing gates, in network order."""
    return [m for m in model.modules() if isinstance(m, Gate)]


def route_onehot(logits: torch.Tensor, training: bool, tau: float = 1.0) -> torch.Tensor:
    """One-hot route per sample: straight-through Gumbel-softmax in training, argmax in eval."""
    if training:
        return F.gumbel_softmax(logits, tau=tau, hard=True, dim=-1)
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)


class HeadWithGate(nn.Module):
    """A deployment segment ending in a gate: ``body`` (plain layers), then the static gate;
    returns ``(features, route_logits)``."""

    def __init__(self, body: nn.Module, gate: nn.Module):
        super().__init__()
        self.body, self.gate = body, gate

    def forward(self, x):
        return self.gate(self.body(x))
