"""protloc checkpoints: plain tensors and a JSON-able config, saved atomically, loaded safely.

A checkpoint is a dict {"format": "protloc", "version": 1, "config": {...}, "model": state_dict,
...}: training adds "teacher", "student", "optimizer", "step" and RNG states. Only tensors,
numbers, strings, lists and dicts are stored, so it loads with `torch.load(weights_only=True)`
and nothing in it can run code. `model_from_checkpoint` also takes foreign backbones (foreign.py).
"""

from __future__ import annotations

import hashlib

import torch

from protloc.errors import ProtlocError
from protloc.foreign import backbone_state, infer_config, read_weights_file
from protloc.model import ViTConfig, VisionTransformer
from protloc.output import atomic_path

FORMAT = "protloc"
VERSION = 1


def save_checkpoint(path, config: ViTConfig, model_state: dict, **extra) -> None:
    """Write a checkpoint atomically: a crash mid-write leaves the previous file intact."""
    payload = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
               "model": {k: v.detach().cpu() for k, v in model_state.items()}, **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path) -> dict:
    """Load a protloc checkpoint onto the CPU without unpickling anything but plain data."""
    ckpt = read_weights_file(path)
    if not is_protloc(ckpt):
        raise ProtlocError(f"{path}: not a protloc checkpoint (no 'format': 'protloc' entry)")
    return _check_version(ckpt, path)


def is_protloc(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def _check_version(ckpt: dict, path) -> dict:
    if ckpt.get("version", 0) > VERSION:
        raise ProtlocError(f"{path}: checkpoint version {ckpt['version']} is newer than this protloc reads ({VERSION})")
    return ckpt


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a state dict strictly; a mismatch names the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or misshaped:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
        if misshaped:
            shown = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in misshaped[:3])
            parts.append(f"{len(misshaped)} mis-shaped ({shown}{', ...' if len(misshaped) > 3 else ''})")
        raise ProtlocError(f"{source}: weights do not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state)


def model_from_checkpoint(path, model_channels: list[str] | None = None) -> tuple[VisionTransformer, dict]:
    """The backbone stored in a checkpoint (the teacher's, for a pretraining run) and the checkpoint.

    Foreign checkpoints (DINO, DINO4Cells, timm-style, safetensors; protloc.foreign) load too: their
    architecture is read off the weights and the returned dict is {"foreign": what it was}.
    `model_channels` names (or renames) a fused model's input channels."""
    obj = read_weights_file(path)
    if is_protloc(obj):
        ckpt = _check_version(obj, path)
        if "model" not in ckpt:  # e.g. a classification head trained on an embeddings file
            raise ProtlocError(f"{path}: holds no backbone weights")
        try:
            config = ViTConfig.from_dict(ckpt["config"])
        except (KeyError, TypeError) as e:
            raise ProtlocError(f"{path}: checkpoint config is unusable ({e})") from None
        state = ckpt["model"]
        if model_channels is not None and config.layout == "fused":
            if len(model_channels) != len(config.channels):
                raise ProtlocError(f"{path}: the backbone takes {len(config.channels)} channel(s) "
                                   f"({', '.join(config.channels)}), not the {len(model_channels)} named: "
                                   f"{', '.join(model_channels)}")
            config.channels = list(model_channels)
    else:
        state, kind = backbone_state(obj, path)
        config = infer_config(state, path, list(model_channels) if model_channels else None)
        ckpt = {"foreign": kind}
    model = VisionTransformer(config)
    load_weights(model, state, str(path))
    return model, ckpt


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
