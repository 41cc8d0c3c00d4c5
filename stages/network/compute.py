"""Where and in what precision a stage's network runs, resolved as the stage will resolve it.

The device type and the precision change float results (CUDA kernels, bf16 or fp16 autocast), so
they enter the train and extract versions; the device index (``cuda:0`` or ``cuda:1``) and the
``device`` spelling do not (``auto`` and ``cpu`` on a machine without CUDA name one artifact).
torch is imported only when the answer depends on it (``auto``), so planning a CPU run stays light.
"""
from __future__ import annotations


def device_type(spec: str) -> str:
    """``cpu`` or ``cuda`` for a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    if spec == "cpu":
        return "cpu"
    if spec == "cuda" or spec.startswith("cuda:"):
        return "cuda"
    if spec == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


def precision(amp: str, device: str) -> str:
    """``float32``, ``bf16`` or ``fp16``: what ``stages.network.runtime.resolve_amp`` will choose."""
    if device != "cuda" or amp == "off":
        return "float32"
    if amp in ("bf16", "fp16"):
        return amp
    import torch

    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolved_compute(device: str, amp: str) -> dict[str, str]:
    kind = device_type(device)
    return {"device_type": kind, "precision": precision(amp, kind)}
