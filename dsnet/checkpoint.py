"""Checkpoints: the project's own format, and the official DS-Net code's key layout.

Contract
--------
The project's format (:data:`CHECKPOINT_FORMAT`): ``save_checkpoint(path, model, model_kwargs,
**meta)`` writes the model's registry name, constructor arguments, weights, gate restriction and
``meta`` atomically (an interruption never leaves half a file); ``load_checkpoint(path)`` returns
``(model, meta)`` in eval mode. A file that cannot be read or does not fit raises
:class:`CheckpointError`; a readable PyTorch file in another format :class:`ForeignCheckpoint`
(a subclass: e.g. the official layout below, which the caller may try next).

Training state (resuming a stage after its last complete epoch): ``save_training_state(path,
state, settings)`` / ``load_training_state(path, settings)``, the state ``dsnet.training``'s loops
hand to ``on_epoch`` and take as ``resume``; ``None`` when absent, unreadable or made with other
settings.

The official DS-Net code's layout (changlin31/DS-Net, ``dyn_slim``):
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

import os
import re
from pathlib import Path

import torch

from dsnet.gate import model_gates
from dsnet.layers import SplitBatchNorm2d
from dsnet.registry import create_model

CHECKPOINT_FORMAT = "dsnet-harness/checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class ForeignCheckpoint(CheckpointError):
    """A readable PyTorch file that is not in the project's checkpoint format."""


def save_checkpoint(path, model, model_kwargs: dict | None = None, **meta) -> Path:
    """Write ``model`` (name, constructor arguments, weights, gate restriction) and ``meta``;
    atomically, so an interruption never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": CHECKPOINT_FORMAT, "model": model.model_name, "model_kwargs": model_kwargs or {},
           "num_allowed": [g.num_allowed for g in model_gates(model)],
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "meta": meta}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(doc, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path):
    """``(model, meta)`` from :func:`save_checkpoint`'s file, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise ForeignCheckpoint(f"{path} is not a dsnet-harness checkpoint (for the official DS-Net "
                                "layout use dsnet.load_official_state_dict)")
    model = create_model(doc["model"], **doc["model_kwargs"])
    try:
        missing, unexpected = model.load_state_dict(doc["state_dict"], strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit model {doc['model']}: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if not k.endswith("score_bias")]  # older checkpoints: uncalibrated gates
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit model {doc['model']}: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    for g, k in zip(model_gates(model), doc["num_allowed"]):
        g.restrict(k)
    return model.eval(), doc["meta"]


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


TRAINING_STATE_FORMAT = "dsnet-harness/training-state-1"


def save_training_state(path, state: dict, settings: dict) -> Path:
    """A stage's state after an epoch (``dsnet.training``'s ``on_epoch``) with the settings that
    made it, written atomically: what a re-run of the same command resumes from."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": TRAINING_STATE_FORMAT, "settings": settings, "state": state}, tmp)
    os.replace(tmp, path)
    return path


def load_training_state(path, settings: dict) -> dict | None:
    """The state :func:`save_training_state` kept at ``path`` for these ``settings``; None when there
    is none, it is unreadable (loaded without running code: tensors and plain values only) or it was
    made with other settings."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a truncated or foreign file: the stage starts over
        return None
    if not isinstance(doc, dict) or doc.get("format") != TRAINING_STATE_FORMAT or doc.get("settings") != settings:
        return None
    return doc["state"]
