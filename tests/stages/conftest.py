"""Shared fixtures of the stage tests."""
from __future__ import annotations

import functools

import pytest


@functools.cache
def _stub_model_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class StubModel(nn.Module):
        """MaskContrastModel's interface, tiny, with a saliency logit that is a known function of
        the image: its normalised red channel, so bright red pixels (> ~153) are salient (> 0.5).

        - default: seeded random convolutions (backbone stride 4 to 5 channels, a 256-channel
          decoder trunk, a 3-d embedding head), embedding upsampled to the image;
        - ``image_embedding=True``: the embedding is the normalised image itself, the backbone the
          identity and the trunk the image average-pooled by 4.

        ``images_seen`` counts the images forwarded."""

        backbone_name, output_stride, embedding_dim = "stub", 4, 3

        def __init__(self, image_embedding: bool = False) -> None:
            super().__init__()
            self.image_embedding = image_embedding
            self.images_seen = 0
            if image_embedding:
                self.backbone = nn.Identity()
                return
            gen = torch.Generator().manual_seed(0)
            self.backbone = nn.Conv2d(3, 5, 3, stride=4, padding=1)
            self.decoder = nn.Sequential(nn.Conv2d(5, 256, 1), nn.ReLU())
            self.head = nn.Conv2d(256, 3, 1)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

        def forward(self, x, return_features=False):
            self.images_seen += x.shape[0]
            if self.image_embedding:
                trunk = F.avg_pool2d(self.backbone(x), 4)
                emb = x.clone()
            else:
                trunk = self.decoder(self.backbone(x))  # B x 256 x h x w
                emb = F.interpolate(self.head(trunk), size=x.shape[-2:], mode="bilinear", align_corners=False)
            sal = x[:, :1].clone()
            return (emb, sal, trunk) if return_features else (emb, sal)

    return StubModel


@pytest.fixture
def stub_model() -> type:
    """The class of a tiny stand-in for MaskContrastModel (see ``_stub_model_class``)."""
    return _stub_model_class()
