"""The names a configuration may choose for a network, importable without torch: backbones,
output strides, freeze points, checkpoint layouts and precisions. Parameter classes type their
fields with these ``Literal`` types; the network code checks against the same tuples."""
from __future__ import annotations

from typing import Literal, get_args

Backbone = Literal["resnet50", "resnet18", "mobilenet_v2"]
FreezePoint = Literal["stem", "layer1", "layer2", "layer3", "layer4"]
InitKind = Literal["moco", "torchvision", "auto"]
Amp = Literal["auto", "off", "bf16", "fp16"]

BACKBONES: tuple[str, ...] = get_args(Backbone)
OUTPUT_STRIDES = (8, 16, 32)
FREEZE_POINTS: tuple[str, ...] = get_args(FreezePoint)
INIT_KINDS: tuple[str, ...] = get_args(InitKind)
AMP_MODES: tuple[str, ...] = get_args(Amp)
