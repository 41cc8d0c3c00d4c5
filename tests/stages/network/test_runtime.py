"""Device, precision and input layout of a network: what ``auto`` means, what is refused, ImageNet
normalisation."""
from __future__ import annotations

import pytest
import torch

from stages.network.runtime import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    amp_name,
    normalize_images,
    resolve_amp,
    resolve_device,
)


def test_normalize_images_uses_imagenet_mean_and_std() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = normalize_images(images)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c], rel=1e-6)
        assert out[1, c, 0, 0].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c], rel=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_resolve_device_checks_the_spelling() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="got 'meta'"):
        resolve_device("meta")


def test_resolve_amp_is_off_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    with pytest.warns(UserWarning, match="amp='bf16' ignored on cpu"):
        assert resolve_amp("bf16", cpu) is None
    assert [amp_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["off", "bf16", "fp16"]
