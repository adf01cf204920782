"""The whole dynamic network as one graph: head, every gate's argmax and every route, batch 1.

Contract
--------
``one_graph(model_or_plan, example)`` returns an eval-mode :class:`OneGraph` whose ``forward(x)``
(``x`` of batch 1, shaped like ``example``) returns ``(logits, route)``: the same logits as the
plan's eager dynamic inference (:meth:`dsnet.DynamicPlan.forward`) and the route taken, an int64
tensor ``(1, n_gates)``. The choice of each gate is data-dependent control flow inside the module:

- ``forward`` selects the segment with ``torch.cond`` (a balanced tree of binary conditions), so
  ``torch.export`` captures every branch: AOTInductor compiles them, the ONNX exporter writes
  ``If`` nodes; run eagerly (not under ``torch.export`` or ``torch.compile``) it takes the chosen
  branch in Python, as eager ``torch.cond`` would only after compiling every branch with dynamo.
- :meth:`OneGraph.to_torchscript` returns a ScriptModule: every part traced (no control flow in a
  part), the dispatcher scripted with ``if`` chains. Tracing the whole module instead would record
  one route only.
- :meth:`OneGraph.switch_parts` returns the parts as plain static modules with an example input
  each (:class:`SwitchParts`) and the rule that picks a branch, for a backend that builds the
  switch itself from separately compiled parts (ONNX Runtime: ``If`` nodes around each part's own
  export, far quicker than exporting ``torch.cond``).

Several gates (DS-ResNet) are flattened rather than nested: the features a segment passes on are
zero-padded along the channel dimension to the widest choice of their stage, and every segment of
the next stage (keyed by the previous choice ``p`` and its own ``c``) first slices its input back to
``p``'s width. One branch per ``(p, c)`` at each stage, so the graph grows with the number of
segments, not with the number of routes (nested branches would repeat every later stage inside
every earlier choice: 4^4 copies for DS-ResNet's four 4-way gates).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsnet.deploy import DynamicPlan, split


class _Branch(nn.Module):
    """Segment ``(p, c)``: its input sliced to ``p``'s width; features padded to the stage's width."""

    def __init__(self, segment: nn.Module, in_width: int, out_width: int, last: bool):
        super().__init__()
        self.segment, self.in_width, self.out_width, self.last = segment, in_width, out_width, last

    def forward(self, x: torch.Tensor):
        x = x[:, :self.in_width]
        if self.last:
            return self.segment(x)
        feats, scores = self.segment(x)
        pad = [0, 0] * (feats.dim() - 2) + [0, self.out_width - feats.shape[1]]
        return F.pad(feats, pad), scores


def _select(index: torch.Tensor, branches: list, x: torch.Tensor, lo: int = 0):
    """``branches[index - lo](x)`` as a balanced tree of ``torch.cond``."""
    if len(branches) == 1:
        return branches[0](x)
    if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):  # eager torch.cond: dynamo per branch
        return branches[int(index) - lo](x)
    mid = len(branches) // 2
    return torch.cond(index < lo + mid,
                      lambda x: _select(index, branches[:mid], x, lo),
                      lambda x: _select(index, branches[mid:], x, lo + mid), (x,))


@dataclass
class SwitchParts:
    """The one-graph network as static parts and the rule joining them, each part with an example
    input shaped as it runs:

    ``feats, scores = head(x)``; then for each stage ``k``: ``c = argmax(scores[0])`` (the first
    of equal scores), ``index = c`` at stage 0, else ``previous c * n_choices[k] + c``, and
    ``stages[k][index](feats)`` returns ``(feats, scores)`` for the next stage, or the logits at
    the last. The route is the choices, an int64 tensor ``(1, n_gates)``. Every branch of a stage
    takes and returns the same shapes (features zero-padded to the stage's widest choice)."""

    head: nn.Module
    head_input: torch.Tensor
    stages: list[list[nn.Module]]  # per stage, its branches in index order
    stage_inputs: list[torch.Tensor]  # per stage, an example input of its branches
    n_choices: list[int]


class OneGraph(nn.Module):
    """See the module docstring."""

    def __init__(self, plan: DynamicPlan, example: torch.Tensor):
        super().__init__()
        if example.shape[0] != 1:
            raise ValueError(f"the one-graph network takes batch 1 (one route per call); got batch {example.shape[0]}")
        self.head = plan.head
        self.stages = nn.ModuleList()
        self.n_choices: list[int] = []
        with torch.no_grad():
            feats, scores = plan.head(example)
            inputs = {None: feats}  # an example input of each incoming choice
            for k, seg in enumerate(plan.stages):
                last = k == len(plan.stages) - 1
                n = scores.shape[-1]
                prevs = sorted({p for p, _ in seg}, key=lambda p: -1 if p is None else p)
                missing = [(p, c) for p in prevs for c in range(n) if (p, c) not in seg]
                if missing:
                    raise ValueError(f"stage {k} has no segment for {missing[:3]}: not a dense routing space")
                outputs = {c: seg[(prevs[0], c)](inputs[prevs[0]]) for c in range(n)}
                out_width = 0
                if not last:
                    shapes = {tuple(o[0].shape[2:]) for o in outputs.values()}
                    if len(shapes) != 1:
                        raise ValueError(f"stage {k}'s choices differ in more than width ({sorted(shapes)})")
                    out_width = max(o[0].shape[1] for o in outputs.values())
                self.stages.append(nn.ModuleList(
                    _Branch(seg[(p, c)], inputs[p].shape[1], out_width, last) for p in prevs for c in range(n)))
                self.n_choices.append(n)
                if not last:
                    inputs = {c: o[0] for c, o in outputs.items()}
                    scores = outputs[0][1]
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, scores = self.head(x)
        choices = []
        prev = None
        for k, branches in enumerate(self.stages):
            c = scores[0].argmax()
            index = c if prev is None else prev * self.n_choices[k] + c
            out = _select(index, list(branches), feats)
            choices.append(c)
            if k == len(self.stages) - 1:
                return out, torch.stack(choices).unsqueeze(0)
            feats, scores = out
            prev = c
        raise AssertionError("a plan has at least one stage")

    def switch_parts(self, example: torch.Tensor) -> SwitchParts:
        """The parts and the rule joining them (:class:`SwitchParts`); ``example`` as in
        :func:`one_graph`, in the dtype and on the device the parts are to run with."""
        inputs = []
        with torch.no_grad():
            feats, _ = self.head(example)
            for k, branches in enumerate(self.stages):
                inputs.append(feats)  # every branch of a stage takes the same (padded) shape: one example serves all
                if k < len(self.stages) - 1:
                    feats = branches[0](feats)[0]
        return SwitchParts(self.head, example, [list(b) for b in self.stages], inputs, list(self.n_choices))

    def to_torchscript(self, example: torch.Tensor) -> torch.jit.ScriptModule:
        """The same network as a ScriptModule (see the module docstring); ``example`` as in
        :func:`one_graph`, in the dtype and on the device the parts are traced with."""
        parts = self.switch_parts(example)
        with torch.no_grad():
            head = torch.jit.trace(parts.head, parts.head_input)
            stages = [[torch.jit.trace(_Uniform(b), x) for b in branches]
                      for branches, x in zip(parts.stages, parts.stage_inputs)]
        return torch.jit.script(_ScriptedOneGraph(head, stages, self.n_choices).eval())


class _Uniform(nn.Module):
    """A branch returning ``(tensor, tensor)`` at every stage (the last: logits and an empty tensor),
    so the scripted dispatcher has one type for every branch."""

    def __init__(self, branch: _Branch):
        super().__init__()
        self.branch = branch

    def forward(self, x: torch.Tensor):
        out = self.branch(x)
        return (out, out[:, :0]) if self.branch.last else out


class _ScriptedOneGraph(nn.Module):
    """The dispatcher in TorchScript: per stage, the branch whose index matches runs."""

    def __init__(self, head, stages: list[list], n_choices: list[int]):
        super().__init__()
        self.head = head
        self.stages = nn.ModuleList(nn.ModuleList(s) for s in stages)
        self.n_choices = list(n_choices)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, scores = self.head(x)
        choices: list[int] = []
        prev, k = 0, 0
        for stage in self.stages:
            c = int(scores[0].argmax())
            index = c if k == 0 else prev * self.n_choices[k] + c
            out_feats, out_scores = feats, scores
            for i, branch in enumerate(stage):
                if i == index:
                    out_feats, out_scores = branch(feats)
            feats, scores = out_feats, out_scores
            choices.append(c)
            prev, k = c, k + 1
        return feats, torch.tensor(choices, dtype=torch.long).unsqueeze(0)


def one_graph(model, example: torch.Tensor) -> OneGraph:
    """The one-graph network of a supernet (or of its :func:`dsnet.split` plan)."""
    plan = model if isinstance(model, DynamicPlan) else split(model)
    return OneGraph(plan.eval(), example)


STUCK_STEPS = 10  # steps without any gradient after which input_for_route gives up


def input_for_route(plan: DynamicPlan, route, example: torch.Tensor, steps: int = 200, seed: int = 0) -> torch.Tensor:
    """An input shaped like ``example`` that the plan's gates send down ``route`` (batch 1): found
    by gradient steps on the input, each gate's score for its choice pushed above the others by a
    margin. How a compiled one-graph network is made to take a given route without changing it
    (tests, per-route timing). Raises ``ValueError`` when the route is not reached."""
    route = [int(c) for c in route]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(example.shape, generator=g) * example.std().clamp_min(1e-3)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)

    def scores_along(x):
        feats, scores = plan.head(x)
        out, prev = [scores], None
        for k, c in enumerate(route[:-1]):
            feats, scores = plan.stages[k][(prev, c)](feats)
            out.append(scores)
            prev = c
        return out

    flat = 0  # consecutive steps with no gradient: the search is stuck (e.g. a gate's ReLU hidden all zero)
    for step in range(steps):
        all_scores = scores_along(x)
        margins = []
        for s, c in zip(all_scores, route):
            others = torch.cat([s[0, :c], s[0, c + 1:]])
            margins.append(others.max() - s[0, c])
        if all(m.item() < -1e-3 for m in margins):
            return x.detach()
        loss = sum(torch.relu(m + 1.0) for m in margins)
        opt.zero_grad()
        loss.backward()
        flat = flat + 1 if not bool(x.grad.abs().max() > 0) else 0
        if flat >= STUCK_STEPS:
            raise ValueError(f"no input found that takes route {route}: the gates' scores stopped depending on "
                             f"the input after {step + 1} steps")
        opt.step()
    raise ValueError(f"no input found that takes route {route} in {steps} steps")
