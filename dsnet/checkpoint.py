"""Load checkpoints in the official DS-Net code's key layout (changlin31/DS-Net, ``dyn_slim``).

Contract
--------
``load_official_state_dict(model, state_dict)`` fills a ``ds_mbnet`` (or any
:class:`~dsnet.models.mobilenet.DSMobileNetV1`) from a state dict of the official
``slimmable_mbnet_v1_bn_uniform`` model. The official layout differs from ours:

- blocks are ``blocks.<stage>.first_block.*`` and ``blocks.<stage>.residual_blocks.<j>.*``;
- split BN keeps one ``nn.BatchNorm2d`` per width, ``<bn>.aux_bn.<i>``, the last holding the affine
  weights; its width list is read from the checkpoint itself;
- the attention and routing heads are 1x1 convolutions ``gate.conv_reduce``, ``gate.conv_expand``,
  ``gate.gate.0``;
- fixed-width layers are stored at the uniform-training maximum width, and DS-MBNet runs their
  first width: nested weights are sliced ``W[:c_out, :c_in]``.

A ``{"state_dict": ...}`` wrapper and a ``module.`` prefix are accepted. Any mismatch (missing or
unexpected keys, shapes that cannot hold the model's slice, a BN without the model's width) raises
one ``ValueError`` naming every offending key. Nothing is modified unless everything matches.
"""

from __future__ import annotations

import re

import torch

from dsnet.layers import SplitBatchNorm2d


def _unwrap(state_dict) -> dict[str, torch.Tensor]:
    if isinstance(state_dict, dict) and "state_dict" in state_dict and not any(
            isinstance(v, torch.Tensor) for v in state_dict.values()):
        state_dict = state_dict["state_dict"]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def _official_prefix(our_name: str) -> str:
    """``blocks.3.0.conv_dw`` -> ``blocks.3.first_block.conv_dw``; ``.2.`` -> ``residual_blocks.1``."""
    m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", our_name)
    if not m:
        return our_name
    stage, block, rest = int(m.group(1)), int(m.group(2)), m.group(3)
    where = "first_block" if block == 0 else f"residual_blocks.{block - 1}"
    rest = (rest.replace("attn.fc1", "gate.conv_reduce").replace("attn.fc2", "gate.conv_expand")
            .replace("attn.route", "gate.gate.0"))
    return f"blocks.{stage}.{where}.{rest}"


def load_official_state_dict(model, state_dict) -> None:
    sd = _unwrap(state_dict)
    used: set[str] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    assign: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination, source)

    def take(key: str, dest: torch.Tensor, slicer=None) -> None:
        if key not in sd:
            missing.append(key)
            return
        used.add(key)
        src = sd[key]
        if src.dim() == 4 and dest.dim() == 2:  # 1x1 conv stored for a linear layer
            src = src.flatten(1) if src.shape[2:] == (1, 1) else src
        if src.dim() != dest.dim() or any(s < d for s, d in zip(src.shape, dest.shape)):
            mismatched.append(f"{key}: checkpoint {tuple(src.shape)} cannot hold model "
                              f"{tuple(dest.shape)}")
            return
        assign.append((dest, src[tuple(slice(0, d) for d in dest.shape)]))

    for name, module in model.named_modules():
        if isinstance(module, SplitBatchNorm2d):
            off = _official_prefix(name)
            n_aux = 0
            while f"{off}.aux_bn.{n_aux}.running_mean" in sd:
                n_aux += 1
            if n_aux == 0:
                missing.append(f"{off}.aux_bn.*")
                continue
            widths = [sd[f"{off}.aux_bn.{i}.running_mean"].shape[0] for i in range(n_aux)]
            for j, w in enumerate(module.widths):
                if w not in widths:
                    mismatched.append(f"{off}.aux_bn: checkpoint widths {widths} lack model width {w}")
                    continue
                i = widths.index(w)
                take(f"{off}.aux_bn.{i}.running_mean", module.running_mean[j, :w])
                take(f"{off}.aux_bn.{i}.running_var", module.running_var[j, :w])
                take(f"{off}.aux_bn.{i}.num_batches_tracked", module.num_batches_tracked[j])
            take(f"{off}.aux_bn.{n_aux - 1}.weight", module.weight)
            take(f"{off}.aux_bn.{n_aux - 1}.bias", module.bias)
            # Statistics of widths the model does not run are expected and ignored.
            used.update(k for k in sd if k.startswith(f"{off}.aux_bn."))
            continue
        for pname, param in module.named_parameters(recurse=False):
            take(f"{_official_prefix(name)}.{pname}", param)

    unexpected = sorted(set(sd) - used)
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if mismatched:
        problems.append("shape mismatches: " + "; ".join(mismatched))
    if problems:
        raise ValueError(f"checkpoint does not match {model.model_name or type(model).__name__} "
                         "(official dyn_slim layout): " + " | ".join(problems))
    with torch.no_grad():
        for dest, src in assign:
            dest.copy_(src.reshape(dest.shape) if dest.dim() == 0 else src)
