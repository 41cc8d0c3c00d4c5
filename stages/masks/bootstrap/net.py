"""The bootstrap's saliency network (``SaliencyNet``: backbone + FPN-lite decoder -> one logit),
its input normalisation and its flip test-time-augmented prediction."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.network.backbones import build_backbone, frozen_modules
from stages.network.runtime import IMAGENET_MEAN, IMAGENET_STD

# Channels of the four pyramid levels (strides 4, 8, 16, 32) of each backbone (see ``_pyramid``).
_PYRAMID_CHANNELS = {
    "mobilenet_v2": (24, 32, 96, 1280),
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}
# Last MobileNetV2 block of each pyramid level (features.0-3: stride 4, 4-6: 8, 7-13: 16, 14-18: 32).
_MOBILENET_LEVEL_END = (3, 6, 13, 18)


def _pyramid(backbone: nn.Module, name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Features at strides 4, 8, 16, 32 of a ``build_backbone(name, 32)`` module."""
    if name == "mobilenet_v2":
        out = []
        for i, block in enumerate(backbone.features):
            x = block(x)
            if i in _MOBILENET_LEVEL_END:
                out.append(x)
        return out
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x))))
    c1 = backbone.layer1(x)
    c2 = backbone.layer2(c1)
    c3 = backbone.layer3(c2)
    return [c1, c2, c3, backbone.layer4(c3)]


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SaliencyNet(nn.Module):
    """Backbone (torchvision names, output stride 32) + FPN-lite decoder -> one saliency logit.

    Decoder: a 1x1 lateral conv to ``channels`` at each of the strides 32, 16, 8, 4; top-down, the
    coarser level is upsampled (bilinear) and added, then a 3x3 conv + BN + ReLU; a 1x1 conv gives
    the logit at stride 4, upsampled bilinearly to the input size.
    """

    def __init__(self, backbone: str = "mobilenet_v2", channels: int = 64, freeze: str = "none") -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone, _ = build_backbone(backbone, 32)
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in _PYRAMID_CHANNELS[backbone])
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in _PYRAMID_CHANNELS[backbone])
        self.head = nn.Conv2d(channels, 1, 1)
        self.frozen = () if freeze == "none" else frozen_modules(backbone, freeze)
        for name in self.frozen:
            for parameter in self.get_submodule(name).parameters():
                parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> SaliencyNet:
        """Set training mode, keeping the frozen backbone modules (BatchNorm statistics) in eval mode."""
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x 3 x H x W (ImageNet-normalised) -> logits B x 1 x H x W."""
        feats = _pyramid(self.backbone, self.backbone_name, x)  # strides 4, 8, 16, 32
        p = self.smooth[3](self.lateral[3](feats[3]))
        for level in (2, 1, 0):
            lat = self.lateral[level](feats[level])
            p = lat + F.interpolate(p, size=lat.shape[-2:], mode="bilinear", align_corners=False)
            p = self.smooth[level](p)
        return F.interpolate(self.head(p), size=x.shape[-2:], mode="bilinear", align_corners=False)


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float, ImageNet mean/std."""
    return standardise(to_float(images_u8))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W in [0, 1] -> ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def predict_tta(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Saliency probabilities with flip test-time augmentation: mean of the image and its mirror.

    x: B x 3 x H x W normalised -> B x H x W in [0, 1]. The network must be in eval mode.
    """
    prob = torch.sigmoid(net(x))
    prob_flip = torch.sigmoid(net(x.flip(-1))).flip(-1)
    return (0.5 * (prob + prob_flip))[:, 0]
