"""Backbones: torchvision ResNet-50 / ResNet-18 / MobileNetV2 without their classifiers, dilated
to an output stride of 8, 16 or 32, and the names of their early stages (what ``freeze`` settings
refer to).

Parameter names are torchvision's, so ImageNet / MoCo state dicts load into a backbone unchanged
(:mod:`stages.network.init`).
"""
from __future__ import annotations

import torchvision
from torch import nn

from stages.network.choices import BACKBONES, FREEZE_POINTS, OUTPUT_STRIDES


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


def frozen_modules(backbone: str, upto: str) -> tuple[str, ...]:
    """Names (relative to the model) of the backbone modules that ``freeze_early`` freezes."""
    if upto not in FREEZE_POINTS:
        raise ValueError(f"freeze point {upto!r} unknown: expected one of {', '.join(FREEZE_POINTS)}")
    if backbone == "mobilenet_v2":
        return tuple(f"backbone.features.{i}" for i in range(_MOBILENET_STAGE_END[upto]))
    if backbone in ("resnet50", "resnet18"):
        return tuple(f"backbone.{name}" for name in _RESNET_STAGES[upto])
    raise ValueError(f"unknown backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
