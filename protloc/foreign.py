"""Backbones trained elsewhere, recognized by their keys and shapes and loaded without running code.

Formats:
- official DINO training checkpoints (`checkpoint.pth`: {"student", "teacher", "args", ...}, the
  student under `module.backbone.`, the teacher under `backbone.`): the teacher backbone is taken,
  as DINO's own evaluation does;
- DINO backbone-only files (`dino_deitsmall16_pretrain.pth`, ...): a plain state dict;
- DINO4Cells checkpoints: DINO training checkpoints whose patch embedding takes 4 channels
  (microtubules, protein, nucleus, ER for the HPA models), patch 8 or 16;
- timm-style ViT state dicts (also under "model" or "state_dict"); the classifier is dropped;
- any of these state dicts saved as .safetensors.

The architecture is read off the weights: embedding dimension -> vit_tiny / small / base, the
number of blocks, the patch size and input channels from the patch projection, the positional
grid from `pos_embed`. Heads are DINO's for each width (3, 6, 12): the weights cannot say.

Loading is safe: `torch.load(weights_only=True)` with `argparse.Namespace` (DINO stores its
arguments as one) as the only allowed class. A file that needs anything else is refused; nothing
in it runs.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings

import torch

from protloc.errors import ProtlocError
from protloc.model import ARCHS, PATCHES, ViTConfig

# the channels a foreign backbone saw, by input channel count, unless --model-channels names them:
# 3: ImageNet RGB read as fluorescence colours (red, green, blue); 4: DINO4Cells' HPA channel order
DEFAULT_CHANNELS = {3: ["microtubules", "protein", "nucleus"], 4: ["microtubules", "protein", "nucleus", "er"]}
PREFIXES = ("module.", "backbone.", "encoder.", "model.")
NOT_BACKBONE = re.compile(r"^(head|fc_norm|head_drop|pre_logits)\b")  # classifiers and projection heads


def read_weights_file(path) -> object:
    """The object stored in a .pth/.pt or .safetensors file, loaded without unpickling code."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu")
        except FileNotFoundError:
            raise ProtlocError(f"{path}: no such file") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise ProtlocError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals([argparse.Namespace]):
            warnings.simplefilter("ignore")  # torch warns about old pickle protocols; the verdict below says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ProtlocError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ProtlocError(f"{path}: is a directory, not a checkpoint") from None
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if refused:  # weights_only met a class or function: the file wants to run code
            raise ProtlocError(f"{path}: refused to load: it holds objects other than tensors and plain data "
                               f"({refused[:200]})") from None
        raise ProtlocError(f"{path}: not a readable torch checkpoint (corrupt pickle data)") from None
    except Exception as e:  # a torch file cut short or not a torch file at all fails in many ways
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ProtlocError(f"{path}: not a readable torch checkpoint ({reason[:200]})") from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def backbone_state(obj, path) -> tuple[dict, str]:
    """The ViT backbone's state dict inside a foreign checkpoint (prefixes stripped) and what it was."""
    if isinstance(obj, dict) and _is_state_dict(obj.get("teacher")):
        state, kind = obj["teacher"], "DINO training checkpoint (teacher)"
    elif isinstance(obj, dict) and any(_is_state_dict(obj.get(k)) for k in ("model", "state_dict", "module")):
        key = next(k for k in ("model", "state_dict", "module") if _is_state_dict(obj.get(k)))
        state, kind = obj[key], f"state dict under {key!r}"
    elif _is_state_dict(obj):
        state, kind = obj, "state dict"
    else:
        raise ProtlocError(f"{path}: no ViT weights found (expected a state dict, or a DINO checkpoint with 'teacher')")
    stripped = {}
    for key, tensor in state.items():
        while key.startswith(PREFIXES):
            key = key.split(".", 1)[1]
        if not NOT_BACKBONE.match(key):
            stripped[key] = tensor
    return stripped, kind


def infer_config(state: dict, path, channels: list[str] | None = None) -> ViTConfig:
    """The ViTConfig that these weights fit (fused layout)."""
    proj = state.get("patch_embed.proj.weight")
    pos = state.get("pos_embed")
    if proj is None or pos is None or proj.ndim != 4 or pos.ndim != 3:
        raise ProtlocError(f"{path}: not a ViT backbone (no patch_embed.proj.weight / pos_embed of the expected shape)")
    dim, in_chans, patch, _ = proj.shape
    arch = next((name for name, (d, _) in ARCHS.items() if d == dim), None)
    if arch is None:
        raise ProtlocError(f"{path}: embedding dimension {dim} matches no supported architecture "
                           f"({', '.join(f'{n} {d}' for n, (d, _) in ARCHS.items())})")
    if patch not in PATCHES:
        raise ProtlocError(f"{path}: patch size {patch} not supported ({' or '.join(map(str, PATCHES))})")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise ProtlocError(f"{path}: no transformer blocks (blocks.N.*) in the weights")
    grid = round((pos.shape[1] - 1) ** 0.5)
    if grid * grid != pos.shape[1] - 1:
        raise ProtlocError(f"{path}: pos_embed of {pos.shape[1]} positions is not a CLS token plus a square grid")
    if channels is None:
        channels = DEFAULT_CHANNELS.get(in_chans)
        if channels is None:
            raise ProtlocError(f"{path}: a {in_chans}-channel backbone: name its channels with --model-channels")
    if len(channels) != in_chans:
        raise ProtlocError(f"{path}: the backbone takes {in_chans} channel(s), not the {len(channels)} named: "
                           f"{', '.join(channels)}")
    return ViTConfig(arch=arch, patch=patch, layout="fused", channels=list(channels),
                     normalize="imagenet" if in_chans == 3 else "image", img_size=grid * patch,
                     depth=max(blocks) + 1)
