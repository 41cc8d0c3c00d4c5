"""The train stage's parameters (the ``train`` section of ``pipeline.yaml``), declared once.

Defaults are the reference's supervised-mask configuration. ``batch_size`` is the global batch
(per process: ``batch_size / world_size``); ``queue_size`` (K, 0 for no queue) must be a multiple
of it. ``amp``: mixed precision on CUDA (``auto``: bf16 where supported, else fp16 with a
GradScaler); always off on the CPU. ``min_fg``, ``max_fg``, ``redraws``: view-pair acceptance
(see :mod:`stages.train.data`). Torch-free, so that reading a configuration stays light.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Optional

from stages.network.choices import Amp, Backbone, InitKind
from stages.params import ParamError, check_fields, in_range, nested, opt


def _crop_scale(v: tuple[float, ...]) -> str | None:
    if len(v) == 2 and 0.0 < v[0] <= v[1] <= 1.0:
        return None
    return "needs [min, max] area fractions with 0 < min <= max <= 1"


def _jitter(v: tuple[float, ...]) -> str | None:
    if len(v) == 4 and min(v) >= 0.0 and v[3] <= 0.5:
        return None
    return "needs [brightness, contrast, saturation, hue], all >= 0 and hue <= 0.5"


@dataclass(frozen=True)
class AugmentParams:
    """View augmentation (defaults: the reference's). Stronger colour augmentation removes colour
    as a cue for telling images apart, which matters when training from random weights."""
    crop_scale: tuple[float, ...] = opt((0.2, 1.0), doc="RandomResizedCrop area range", check=_crop_scale)
    jitter: tuple[float, ...] = opt((0.4, 0.4, 0.4, 0.1), doc="ColorJitter brightness, contrast, saturation, hue",
                                    check=_jitter)
    jitter_p: float = opt(0.8, doc="probability of the colour jitter", check=in_range(0.0, 1.0))
    gray_p: float = opt(0.2, doc="probability of grayscale", check=in_range(0.0, 1.0))
    flip_p: float = opt(0.5, doc="probability of a horizontal flip", check=in_range(0.0, 1.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        object.__setattr__(self, "jitter", tuple(self.jitter))
        check_fields(self)


@dataclass(frozen=True)
class ContrastParams:
    """Which prototype columns each image's anchors see (:mod:`stages.train.neighbours`; defaults:
    all, with the own prototype as the only positive: the reference's loss). Without them every
    other image of an object's class is a negative (false negatives) and nothing pulls same-class
    objects together. Cosines are measured between key prototypes (``space``)."""
    fn_threshold: Optional[float] = opt(None, doc="drop negatives whose cosine to the own key prototype is above this",
                                        check=in_range(-1.0, 1.0))
    fn_topk: int = opt(0, doc="drop the negatives most similar to the own key prototype", check=in_range(0))
    nn_topk: int = opt(0, doc="the columns most similar to the own key prototype become extra positives (NNCLR-style)",
                       check=in_range(0))
    nn_weight: float = opt(1.0, doc="total weight of those extra positives (the own prototype's: 1)", check=in_range(0.0))
    space: Literal["head", "backbone", "init"] = opt(
        "head", doc="cosines between the prototypes themselves, between mask-pooled key backbone features, or "
                    "between the initial network's mask-pooled backbone features of the whole images (fixed)")
    warmup_epochs: int = opt(0, doc="epochs of the plain loss before the rules above apply", check=in_range(0))
    groups: int = opt(0, doc="over-cluster the images' initial features into this many groups of near-duplicates "
                             "(e.g. one video's frames; space: init); neighbours come from other groups",
                      check=in_range(0), since_default=True)
    same_group: Literal["keep", "drop", "positive"] = opt(
        "keep", doc="columns of the image's own group: negatives as today, out of the softmax, or positives",
        since_default=True)
    group_weight: float = opt(1.0, doc="total weight of the own group's positives (same_group: positive)",
                              check=in_range(0.0), since_default=True)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.groups and self.space != "init":
            raise ParamError(f"needs space: init (groups are made in the initial network's space), got space "
                             f"{self.space!r}", "groups")
        if self.groups == 1:
            raise ParamError("must be 0 (off) or at least 2", "groups")
        if self.same_group != "keep" and not self.groups:
            raise ParamError(f"{self.same_group!r} needs groups > 0", "same_group")


@dataclass(frozen=True)
class TrainParams:
    backbone: Backbone = opt("resnet50", doc="encoder")
    output_stride: Literal[8, 16] = opt(8, doc="encoder output stride (dilated)")
    init: str = opt("random", doc="'random', 'imagenet', 'moco_v2' (resnet50) or a checkpoint path (MoCo v2 or torchvision state dict)")
    init_kind: InitKind = opt("auto", doc="checkpoint key layout")
    freeze_early: bool = opt(False, doc="freeze the first blocks (the reference does for ImageNet-supervised init)")
    epochs: int = opt(40, doc="0 = no training: the artifact holds the initialisation alone", check=in_range(0))
    batch_size: int = opt(64, doc="global batch size", check=in_range(1))
    queue_size: int = opt(128, doc="prototype queue K (a multiple of the global batch)", check=in_range(0))
    temperature: float = opt(0.5, check=in_range(0.0, lo_open=True))
    key_momentum: float = opt(0.999, check=in_range(0.0, 1.0))
    lr: float = opt(0.004, check=in_range(0.0, lo_open=True))
    momentum: float = opt(0.9, check=in_range(0.0, 1.0))
    weight_decay: float = opt(1e-4, check=in_range(0.0))
    crop_size: int = opt(224, check=in_range(16))
    augment: AugmentParams = opt(default_factory=AugmentParams, since_default=True)
    contrast: ContrastParams = opt(default_factory=ContrastParams, since_default=True)
    embedding_dim: int = opt(32, check=in_range(1))
    seed: int = opt(0, doc="seed for Python, numpy and torch (recorded in the manifest)")
    amp: Amp = opt("auto", doc="mixed precision on GPU")
    keep_last: int = opt(2, doc="epoch checkpoints kept besides the final one", check=in_range(1))
    num_workers: int = opt(2, doc="data-loader worker processes", check=in_range(0))
    device: str = opt("auto", doc="'auto', 'cpu', 'cuda' or 'cuda:N'")
    min_fg: float = opt(0.01, doc="a view pair needs more foreground than this share in both crops",
                        check=in_range(0.0, 1.0), since_default=True)
    max_fg: float = opt(0.99, doc="a view pair needs less foreground than this share in both crops",
                        check=in_range(0.0, 1.0), since_default=True)
    redraws: int = opt(3, doc="crop draws per image before another image replaces it", check=in_range(1),
                       since_default=True)

    def __post_init__(self) -> None:
        if isinstance(self.augment, Mapping):  # some keys, as checkpoints and Python callers give them
            object.__setattr__(self, "augment", nested(AugmentParams, self.augment, "augment"))
        if isinstance(self.contrast, Mapping):
            object.__setattr__(self, "contrast", nested(ContrastParams, self.contrast, "contrast"))
        check_fields(self)
        if self.queue_size % self.batch_size:
            raise ParamError(f"must be a multiple of batch_size ({self.batch_size}), got {self.queue_size}",
                             "queue_size")
        if self.min_fg >= self.max_fg:
            raise ParamError(f"must be below max_fg ({self.max_fg}), got {self.min_fg}", "min_fg")
