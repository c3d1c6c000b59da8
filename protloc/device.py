"""`--device auto|cpu|cuda[:N]` -> a torch.device, with a clear error when it is not there; and
the precision a model runs at there."""

import contextlib

import torch

from protloc.errors import ProtlocError


def resolve_device(spec: str) -> torch.device:
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ProtlocError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ProtlocError(f"--device {spec}: no CUDA GPU is available to this torch build")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ProtlocError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu":
        raise ProtlocError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device


def autocast(device: torch.device):
    """The context a model runs in on `device`: bf16 autocast on a GPU, float32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
