"""Where and in what precision a network runs, and the layout of its input.

``resolve_device`` and ``resolve_amp`` are the run-time halves of :mod:`stages.network.compute`
(which answers the same questions at plan time, for the version). ``normalize_images`` turns the
uint8 batches the loaders ship into the network's input.
"""
from __future__ import annotations

import warnings

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` if CUDA is available, else ``cpu``; else ``spec`` checked."""
    if spec == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return device


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: full precision). Off on the CPU whatever ``spec`` says."""
    if spec == "off" or device.type != "cuda":
        if spec in ("bf16", "fp16") and device.type != "cuda":
            warnings.warn(f"amp={spec!r} ignored on {device}: mixed precision is used on CUDA only")
        return None
    if spec == "fp16" or (spec == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def amp_name(dtype: torch.dtype | None) -> str:
    """``off``, ``bf16`` or ``fp16``: the name of an autocast dtype from ``resolve_amp``."""
    return {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32, scaled to [0, 1] and normalised with ImageNet mean/std.

    The result is in channels-last memory order, as the networks are (``to_channels_last``):
    oneDNN's CPU convolutions run 1.4-3x faster on it (dilated depthwise ones most), and CUDA
    autocast convolutions use tensor cores without layout conversions.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return ((images.float() / 255.0 - mean) / std).contiguous(memory_format=torch.channels_last)
