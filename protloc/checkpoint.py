"""protloc checkpoints: plain tensors and a JSON-able config, saved atomically, loaded safely.

A checkpoint is a dict {"format": "protloc", "version": 1, "config": {...}, "model": state_dict,
...}: training adds "teacher", "student", "optimizer", "step" and RNG states. Only tensors,
numbers, strings, lists and dicts are stored, so it loads with `torch.load(weights_only=True)`
and nothing in it can run code.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings

import torch

from protloc.errors import ProtlocError
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
    try:
        with warnings.catch_warnings():  # torch warns about old pickle protocols; the verdict below says enough
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ProtlocError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProtlocError(f"{path}: is a directory, not a checkpoint") from None
    except pickle.UnpicklingError as e:  # weights_only refused a global: the file wants to run code
        reason = str(e).splitlines()[0] if str(e) else "unsupported object"
        raise ProtlocError(f"{path}: refused to load: it holds objects other than tensors and plain data ({reason})") from None
    except Exception as e:  # a torch file cut short or not a torch file at all fails in many ways
        raise ProtlocError(f"{path}: not a readable torch checkpoint ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ProtlocError(f"{path}: not a protloc checkpoint (no 'format': 'protloc' entry)")
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


def model_from_checkpoint(path) -> tuple[VisionTransformer, dict]:
    """The backbone stored in a checkpoint (the teacher's, for a pretraining run) and the checkpoint."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt:  # e.g. a classification head trained on an embeddings file
        raise ProtlocError(f"{path}: holds no backbone weights")
    try:
        config = ViTConfig.from_dict(ckpt["config"])
    except (KeyError, TypeError) as e:
        raise ProtlocError(f"{path}: checkpoint config is unusable ({e})") from None
    model = VisionTransformer(config)
    load_weights(model, ckpt["model"], str(path))
    return model, ckpt


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
