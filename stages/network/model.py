"""MaskContrast network: dilated backbone -> DeepLabv3 decoder (256-d trunk) -> two 1x1 heads.

Parameter names follow torchvision inside ``backbone`` (so ImageNet / MoCo state dicts load into
``model.backbone`` unchanged) and the reference implementation outside it (``decoder``, ``head``,
``classification_head``), so the authors' released checkpoints map onto this module by prefix.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from stages.network.backbones import build_backbone, frozen_modules

# Rates of the reference (DeepLabv3) for each output stride; the rates scale with the feature grid.
DEFAULT_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


class AtrousConv2d(nn.Conv2d):
    """A 3x3 dilated convolution that skips the kernel taps which can only read zero padding.

    With dilation d on an h x w grid, the taps at row offset +-d read inside the input only if
    d < h (columns: d < w). DeepLabv3's ASPP rates (12, 24, 36 at output stride 8) exceed the
    grid at small inputs (a 224 crop gives 28 x 28, a 96 crop 12 x 12), where those taps multiply
    zeros: dropping them gives the same output and the same gradients (the dropped weights get
    zero gradient either way) for up to 9x less work. Same parameters and state-dict keys as the
    ``nn.Conv2d`` it replaces.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B x C x h x w
        d_row, d_col = self.dilation
        keep_rows, keep_cols = d_row < x.shape[-2], d_col < x.shape[-1]
        if keep_rows and keep_cols:
            return super().forward(x)
        weight = self.weight[:, :, slice(None) if keep_rows else slice(1, 2), slice(None) if keep_cols else slice(1, 2)]
        padding = (d_row if keep_rows else 0, d_col if keep_cols else 0)
        return F.conv2d(x, weight, self.bias, self.stride, padding, self.dilation, self.groups)

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> AtrousConv2d:
        """The same convolution (sharing its parameters) as an ``AtrousConv2d``."""
        if conv.kernel_size != (3, 3) or conv.stride != (1, 1) or conv.padding != conv.dilation:
            raise ValueError(f"expected a stride-1 'same' 3x3 convolution, got {conv}")
        new = cls(conv.in_channels, conv.out_channels, 3, padding=conv.padding, dilation=conv.dilation,
                  groups=conv.groups, bias=conv.bias is not None)
        new.weight = conv.weight
        new.bias = conv.bias
        return new


class MaskContrastModel(nn.Module):
    """Backbone -> DeepLabv3 decoder (256-d trunk) -> 1x1 embedding head and 1x1 saliency head.

    Args:
        backbone: one of ``stages.network.backbones.BACKBONES``.
        output_stride: 8 (the reference) or 16 / 32, by dilating the later stages.
        embedding_dim: channels of the embedding head (32 in the reference).
        aspp_rates: ASPP atrous rates; default (12, 24, 36) at stride 8, (6, 12, 18) at 16.
        dropout: dropout after the ASPP projection (0.5 in the reference).
    """

    def __init__(
        self,
        backbone: str = "resnet50",
        output_stride: int = 8,
        embedding_dim: int = 32,
        aspp_rates: Sequence[int] | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.output_stride = output_stride
        self.embedding_dim = embedding_dim
        rates = tuple(aspp_rates) if aspp_rates is not None else DEFAULT_ASPP_RATES[output_stride]
        self.backbone, channels = build_backbone(backbone, output_stride)
        aspp = ASPP(channels, list(rates), out_channels=256)
        aspp.project[3] = nn.Dropout(dropout)
        for branch in aspp.convs[1:-1]:  # the atrous branches (ASPPConv: conv, BN, ReLU)
            branch[0] = AtrousConv2d.replacing(branch[0])
        self.decoder = nn.Sequential(
            aspp,
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
        )
        self.head = nn.Conv2d(256, embedding_dim, 1)  # embedding, with bias
        self.classification_head = nn.Conv2d(256, 1, 1, bias=False)  # saliency logit
        self.frozen: tuple[str, ...] = ()  # submodule names kept in eval mode, set by freeze_early

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 256-d decoder trunk at the backbone's stride: B x 256 x H/os x W/os."""
        return self.decoder(self.backbone(x))

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embedding (B x D x H x W, not normalised) and saliency logit (B x 1 x H x W) at input size.

        With ``return_features`` also the trunk (B x 256 x H/os x W/os).
        """
        size = x.shape[-2:]
        trunk = self.features(x)  # B x 256 x h x w
        embedding = F.interpolate(self.head(trunk), size=size, mode="bilinear", align_corners=False)
        saliency = F.interpolate(
            self.classification_head(trunk), size=size, mode="bilinear", align_corners=False
        )
        if return_features:
            return embedding, saliency, trunk
        return embedding, saliency

    def train(self, mode: bool = True) -> MaskContrastModel:
        """Set training mode, keeping the modules frozen by ``freeze_early`` in eval mode."""
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self


def freeze_early(model: MaskContrastModel, upto: str = "layer2") -> tuple[str, ...]:
    """Freeze the backbone up to and including ``upto``: no gradients, BatchNorm in eval mode.

    The reference freezes conv1, bn1, layer1, layer2 (``upto="layer2"``) in both encoders with the
    ImageNet-supervised init. For MobileNetV2 the stages map by resolution (see
    ``stages.network.backbones``): ``layer2`` freezes features.0-6. The frozen set is recorded on the
    model, so ``model.train()`` keeps it in eval mode. Returns the frozen module names.
    """
    names = frozen_modules(model.backbone_name, upto)
    for name in names:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(False)
    model.frozen = tuple(dict.fromkeys(model.frozen + names))
    model.train(model.training)
    return names
