"""MaskContrast network: dilated backbone -> DeepLabv3 decoder (256-d trunk) -> two 1x1 heads.

Parameter names follow torchvision inside ``backbone`` (so ImageNet / MoCo state dicts load into
``model.backbone`` unchanged) and the reference implementation outside it (``decoder``, ``head``,
``classification_head``), so the authors' released checkpoints map onto this module by prefix.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

BACKBONES = ("resnet50", "resnet18", "mobilenet_v2")
OUTPUT_STRIDES = (8, 16, 32)
FREEZE_POINTS = ("stem", "layer1", "layer2", "layer3", "layer4")

# Rates of the reference (DeepLabv3) for each output stride; the rates scale with the feature grid.
DEFAULT_ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}

# MobileNetV2 blocks that play the role of ResNet's stem / layer1..4, chosen by the resolution at
# which they run in the undilated network: features.0 is the stride-2 stem conv; features.1-3 end
# at stride 4 (like layer1), features.4-6 at stride 8 (layer2), features.7-13 at stride 16 (layer3),
# features.14-18 at stride 32 (layer4, including the final 1x1 conv to 1280 channels).
_MOBILENET_STAGE_END = {"stem": 1, "layer1": 4, "layer2": 7, "layer3": 14, "layer4": 19}
_RESNET_STAGES = {
    "stem": ("conv1", "bn1"),
    "layer1": ("conv1", "bn1", "layer1"),
    "layer2": ("conv1", "bn1", "layer1", "layer2"),
    "layer3": ("conv1", "bn1", "layer1", "layer2", "layer3"),
    "layer4": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
}


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``: same attribute names, returns the layer4 grid."""

    def __init__(self, resnet: torchvision.models.ResNet) -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # B x 64 x H/4 x W/4
        x = self.layer2(self.layer1(x))  # B x C2 x H/8 x W/8
        return self.layer4(self.layer3(x))  # B x C x H/os x W/os


class MobileNetV2Backbone(nn.Module):
    """torchvision MobileNetV2 ``features`` (all 19 blocks, 1280 channels out), ``classifier`` dropped.

    The final 1x1 conv (features.18) is kept, as torchvision's DeepLabv3-MobileNetV3 keeps its own,
    so that an ImageNet state dict loads with only ``classifier.*`` left over.
    """

    def __init__(self, mobilenet: torchvision.models.MobileNetV2) -> None:
        super().__init__()
        self.features = mobilenet.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _set_conv3x3(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation, dilation)


def dilate_resnet_layer(layer: nn.Module, dilation: int) -> None:
    """Replace the stride-2 of a ResNet layer by dilation, in place (the reference's rule).

    The strided 3x3 conv gets stride 1 and dilation ``dilation // 2`` (the previous layer's
    dilation), every other 3x3 conv dilation ``dilation``; the 1x1 downsample conv gets stride 1.
    For Bottleneck layers this equals torchvision's ``replace_stride_with_dilation``; it also works
    for BasicBlock, which torchvision refuses to dilate. Parameter names and shapes are unchanged.
    """
    for module in layer.modules():
        if not isinstance(module, nn.Conv2d):
            continue
        if module.stride == (2, 2):
            if module.kernel_size == (3, 3):
                _set_conv3x3(module, 1, max(dilation // 2, 1))
            else:
                module.stride = (1, 1)
        elif module.kernel_size == (3, 3):
            _set_conv3x3(module, 1, dilation)


def dilate_mobilenet_v2(features: nn.Sequential, output_stride: int) -> None:
    """Stop MobileNetV2's downsampling at ``output_stride``, in place, as DeepLabv3-MobileNet does.

    Walking the blocks in order, a stride-2 3x3 conv that would exceed ``output_stride`` gets
    stride 1 and keeps the dilation in force so far (the first block of a stage sees the previous
    grid), after which the dilation doubles for all later 3x3 (depthwise) convs. No block changes
    its residual connection: the affected blocks (features.7, features.14) change width anyway.
    """
    current_stride, dilation = 1, 1
    for block in features:
        convs3 = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        for conv in convs3:  # one per block: the stem conv or the depthwise conv
            stride = conv.stride[0]
            if stride == 2 and current_stride * 2 > output_stride:
                _set_conv3x3(conv, 1, dilation)
                dilation *= 2
            else:
                current_stride *= stride
                _set_conv3x3(conv, stride, dilation)
        if hasattr(block, "stride") and convs3:
            block.stride = convs3[-1].stride[0]


def build_backbone(name: str, output_stride: int = 8) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision backbone with output stride ``output_stride``.

    Returns ``(module, out_channels)``; ``module(x)`` maps B x 3 x H x W to
    B x out_channels x ceil(H/os) x ceil(W/os). Parameter names are torchvision's.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}: expected one of {', '.join(BACKBONES)}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    if name == "resnet50":
        dilate = [False, output_stride == 8, output_stride <= 16]  # layer2, layer3, layer4
        return ResNetBackbone(torchvision.models.resnet50(replace_stride_with_dilation=dilate)), 2048
    if name == "resnet18":
        resnet = torchvision.models.resnet18()
        if output_stride == 8:
            dilate_resnet_layer(resnet.layer3, 2)
            dilate_resnet_layer(resnet.layer4, 4)
        elif output_stride == 16:
            dilate_resnet_layer(resnet.layer4, 2)
        return ResNetBackbone(resnet), 512
    mobilenet = torchvision.models.mobilenet_v2()
    dilate_mobilenet_v2(mobilenet.features, output_stride)
    return MobileNetV2Backbone(mobilenet), mobilenet.last_channel


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
        backbone: one of ``BACKBONES``.
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


def frozen_modules(backbone: str, upto: str) -> tuple[str, ...]:
    """Names (relative to the model) of the backbone modules that ``freeze_early`` freezes."""
    if upto not in FREEZE_POINTS:
        raise ValueError(f"freeze point {upto!r} unknown: expected one of {', '.join(FREEZE_POINTS)}")
    if backbone == "mobilenet_v2":
        return tuple(f"backbone.features.{i}" for i in range(_MOBILENET_STAGE_END[upto]))
    if backbone in ("resnet50", "resnet18"):
        return tuple(f"backbone.{name}" for name in _RESNET_STAGES[upto])
    raise ValueError(f"unknown backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")


def freeze_early(model: MaskContrastModel, upto: str = "layer2") -> tuple[str, ...]:
    """Freeze the backbone up to and including ``upto``: no gradients, BatchNorm in eval mode.

    The reference freezes conv1, bn1, layer1, layer2 (``upto="layer2"``) in both encoders with the
    ImageNet-supervised init. For MobileNetV2 the stages map by resolution (see
    ``_MOBILENET_STAGE_END``): ``layer2`` freezes features.0-6. The frozen set is recorded on the
    model, so ``model.train()`` keeps it in eval mode. Returns the frozen module names.
    """
    names = frozen_modules(model.backbone_name, upto)
    for name in names:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(False)
    model.frozen = tuple(dict.fromkeys(model.frozen + names))
    model.train(model.training)
    return names
