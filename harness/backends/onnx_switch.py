"""A one-graph dynamic network in ONNX, composed from its parts' own exports with ``If`` nodes.

Contract
--------
``compose_switch(head, stages, n_choices) -> onnx.ModelProto`` joins separately exported static
parts into one model that runs as the one-graph network does (the rule of a module's
``switch_parts``; see :class:`dsnet.one_graph.SwitchParts`, which this module does not import):

- ``head``: a model with one input (the image) and two outputs, features and scores;
- ``stages[k]``: the models of stage ``k``'s branches in index order, each with one input (the
  features) and two outputs (features, scores), or one (the logits) at the last stage; the branches
  of a stage take and return the same shapes.

The model's input is the head's; its outputs are the logits and the route, int64 ``(1, n_gates)``.
Per stage the choice is ``ArgMax`` of the scores (the first of equal scores, as ``torch.argmax``),
the branch index ``c`` or ``previous c * n_choices[k] + c``, and the branch is picked by a balanced
tree of ``If`` nodes (``index < mid``), as the ``torch.cond`` tree of the module does. Each branch's
nodes and weights sit inside its ``If`` subgraph: ONNX Runtime optimizes a subgraph on its own and
folds and pre-packs only the weights it holds (see :mod:`harness.backends.onnxruntime`).

Why: exporting ``torch.cond`` re-traces every branch inside the whole graph (DS-MBNet at 224: 3.5
of the default run's 22.5 minutes; DS-ResNet-50: 11 minutes), where each part exports in seconds.
Names are made unique per part (``s{stage}b{branch}/``); the parts must share their opset.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, compose, helper


def compose_switch(head: onnx.ModelProto, stages: list[list[onnx.ModelProto]], n_choices: list[int]) -> onnx.ModelProto:
    if not stages or len(stages) != len(n_choices):
        raise ValueError(f"compose_switch: {len(stages)} stages for {len(n_choices)} gates")
    parts = [head, *(b for branches in stages for b in branches)]
    opsets = _shared_opsets(parts)
    head = compose.add_prefix(head, "head/")
    _expect_io(head.graph, 1, 2, "the head")
    nodes, inits, value_info = list(head.graph.node), list(head.graph.initializer), list(head.graph.value_info)
    functions = list(head.functions)
    feats, scores = (o.name for o in head.graph.output)
    choices, prev = [], None
    for k, (branches, n) in enumerate(zip(stages, n_choices)):
        last = k == len(stages) - 1
        expected = n if k == 0 else n_choices[k - 1] * n
        if len(branches) != expected:
            raise ValueError(f"compose_switch: stage {k} has {len(branches)} branches, its rule indexes {expected}")
        branches = [compose.add_prefix(b, f"s{k}b{i}/") for i, b in enumerate(branches)]
        for i, b in enumerate(branches):
            _expect_io(b.graph, 1, 1 if last else 2, f"stage {k}'s branch {i}")
            functions += b.functions
        c = f"s{k}/choice"
        nodes.append(helper.make_node("ArgMax", [scores], [c], axis=1, keepdims=0))
        index = c
        if prev is not None:
            nodes += [_constant(f"s{k}/n", n),
                      helper.make_node("Mul", [prev, f"s{k}/n"], [f"s{k}/scaled"]),
                      helper.make_node("Add", [f"s{k}/scaled", c], [f"s{k}/index"])]
            index = f"s{k}/index"
        outputs = _select(branches, 0, index, feats, f"s{k}", nodes, inits, value_info)
        choices.append(c)
        if last:
            logits, logits_type = outputs[0], branches[0].graph.output[0].type
        else:
            feats, scores = outputs
        prev = c
    nodes += [helper.make_node("Concat", choices, ["route/flat"], axis=0), _constant("route/axes", 0),
              helper.make_node("Unsqueeze", ["route/flat", "route/axes"], ["route"])]
    out_logits = onnx.ValueInfoProto(name=logits, type=logits_type)
    out_route = helper.make_tensor_value_info("route", TensorProto.INT64, [1, len(stages)])
    graph = helper.make_graph(nodes, "one_graph", list(head.graph.input), [out_logits, out_route], inits,
                              value_info=value_info)
    model = helper.make_model(graph, opset_imports=opsets, ir_version=max(p.ir_version for p in parts))
    model.functions.extend(functions)  # add_prefix renamed each part's own: no two share a name
    return model


def _select(branches, lo: int, index: str, feats: str, scope: str, nodes: list, inits: list,
            value_info: list) -> list[str]:
    """Nodes (appended to ``nodes``, weights to ``inits``) that compute ``branches[index - lo]`` on
    ``feats``; returns the names of its outputs."""
    if len(branches) == 1:
        g = branches[0].graph
        source = g.input[0].name
        for node in g.node:
            node.input[:] = [feats if name == source else name for name in node.input]
        nodes += g.node
        inits += g.initializer
        value_info += g.value_info
        outs = [o.name for o in g.output]
        if source in outs:  # a branch that passes its input on: its output is still made here
            nodes.append(helper.make_node("Identity", [feats], [f"{scope}/pass{lo}"]))
            outs = [f"{scope}/pass{lo}" if o == source else o for o in outs]
        return outs
    mid = len(branches) // 2
    tag = f"{scope}/{lo}-{lo + len(branches)}"
    cond = f"{tag}/cond"
    nodes += [_constant(f"{tag}/mid", lo + mid), helper.make_node("Less", [index, f"{tag}/mid"], [cond])]
    subgraphs = []
    for half, start, name in ((branches[:mid], lo, "then"), (branches[mid:], lo + mid, "else")):
        sub_nodes, sub_inits, sub_info = [], [], []
        outs = _select(half, start, index, feats, scope, sub_nodes, sub_inits, sub_info)
        typed = [onnx.ValueInfoProto(name=o, type=t.type) for o, t in zip(outs, branches[0].graph.output)]
        subgraphs.append(helper.make_graph(sub_nodes, f"{tag}/{name}", [], typed, sub_inits, value_info=sub_info))
    outs = [f"{tag}/out{j}" for j in range(len(branches[0].graph.output))]
    nodes.append(helper.make_node("If", [cond], outs, then_branch=subgraphs[0], else_branch=subgraphs[1]))
    return outs


def _constant(name: str, value: int) -> onnx.NodeProto:
    """An int64 constant of shape (1,) (as ``ArgMax`` with ``keepdims=0`` returns for a batch of one)."""
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [1], [value]))


def _expect_io(graph, inputs: int, outputs: int, what: str) -> None:
    if len(graph.input) != inputs or len(graph.output) != outputs:
        raise ValueError(f"compose_switch: {what} has {len(graph.input)} input(s) and {len(graph.output)} output(s), "
                         f"expected {inputs} and {outputs}")


def _shared_opsets(parts) -> list:
    """The parts' opset imports, which must agree (one exporter made them all)."""
    first = {(o.domain, o.version) for o in parts[0].opset_import}
    for p in parts[1:]:
        if {(o.domain, o.version) for o in p.opset_import} != first:
            raise ValueError("compose_switch: the parts were exported with different opsets")
    return list(parts[0].opset_import)
