"""Parameters of the masks stage (``masks`` in ``pipeline.yaml``), declared once: the
post-processing of every estimator's map (``PostParams``, the keys at the top of ``masks``), the
object proposals (``ProposalParams``, also keys at the top of ``masks``), the hand-crafted priors
(``masks.priors``), the ONNX saliency model (``masks.model``), the bootstrapped saliency network
(``masks.bootstrap``) and the features estimator (``masks.features``). Keys the configuration gained
after artifacts existed are ``since_default``: left out of versions while at their default.
Torch- and numpy-free, so that reading a configuration stays light.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Literal, Union

from stages.network.choices import Backbone, FreezePoint, InitKind
from stages.params import ParamError, check_fields, in_range, opt


@dataclass(frozen=True)
class PostParams:
    """Soft map -> one binary mask (:func:`stages.masks.postprocess.postprocess`).

    threshold: foreground is ``soft > threshold`` (strict, as the reference).
    minmax: min-max normalise the map per image before thresholding (a constant map becomes 0).
    min_region: 8-connected foreground regions with fewer pixels than this fraction of the image
        are removed (0 keeps every region).
    min_fg, max_fg: the image is kept iff min_fg <= remaining foreground fraction <= max_fg.
    """

    threshold: float = opt(0.5, doc="binarisation threshold of the [0,1] map", check=in_range(0.0, 1.0))
    minmax: bool = opt(False, doc="min-max normalise each map before thresholding")
    min_region: float = opt(0.01, doc="drop connected regions smaller than this share of the image",
                            check=in_range(0.0, 1.0, hi_open=True))
    min_fg: float = opt(0.01, doc="drop the image when foreground is below this share", check=in_range(0.0, 1.0))
    max_fg: float = opt(0.99, doc="drop the image when foreground is above this share", check=in_range(0.0, 1.0))

    def __post_init__(self) -> None:
        check_fields(self)
        if self.min_fg >= self.max_fg:
            raise ParamError(f"min_fg ({self.min_fg}) must be below max_fg ({self.max_fg})", "min_fg")

    @classmethod
    def of(cls, section: Any) -> "PostParams":
        """The post-processing keys of ``section`` (the ``masks`` section, which declares them by
        inheriting this class), as a ``PostParams`` itself."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})


def _weights(w: tuple[float, ...]) -> str | None:
    if len(w) == 3 and min(w) >= 0 and sum(w) > 0:
        return None
    return "needs 3 non-negative weights (rbd, mbd, contrast), not all zero"


@dataclass(frozen=True)
class PriorParams:
    """Parameters of the hand-crafted priors (:mod:`stages.masks.priors`).

    ``weights`` are normalised to sum 1 in ``priors_saliency``. Equal weights: the best grid point
    differs between davis16-objects' splits ((1, 1, 2) on train, IoU 0.339; (1, 2, 1) on val, 0.313)
    and equal weights stay within 0.005 / 0.011 of both.
    """

    size: int = opt(256, doc="long side (px) the hand-crafted priors are computed at", check=in_range(32, 2048))
    n_segments: int = opt(300, doc="SLIC superpixels per image", check=in_range(8))
    compactness: float = opt(20.0, doc="SLIC compactness (Lab units)", check=in_range(0.0, lo_open=True))
    weights: tuple[float, ...] = opt((1.0, 1.0, 1.0), doc="fusion weights of (rbd, mbd, contrast)", check=_weights)
    rbd_geo_sigma: float = opt(7.0, doc="sigma (Lab units) turning geodesic distance into similarity (boundary connectivity)",
                               check=in_range(0.0, lo_open=True), since_default=True)
    rbd_bg_lambda: float = opt(5.0, doc="weight of RBD's background term against its foreground term (authors' code: 5)",
                               check=in_range(0.0), since_default=True)
    rbd_spatial_sigma: float = opt(0.25, doc="sigma of RBD's spatial weight in the background-weighted contrast (image sides)",
                                   check=in_range(0.0, lo_open=True), since_default=True)
    mbd_iterations: int = opt(3, doc="passes of the four directional FastMBD sweeps", check=in_range(1),
                              since_default=True)
    mbd_sigmoid: float = opt(10.0, doc="slope of MBD's contrast enhancement 1 / (1 + exp(-b (x - otsu))); 0 disables it",
                             check=in_range(0.0), since_default=True)
    contrast_spatial_sigma: float = opt(0.15, doc="sigma of the spatial weight of the colour uniqueness (image sides)",
                                        check=in_range(0.0, lo_open=True), since_default=True)
    centre_sigma: float = opt(0.3, doc="sigma of the Gaussian centre prior of the contrast cue (image sides)",
                              check=in_range(0.0, lo_open=True), since_default=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))  # lists from YAML
        check_fields(self)


def _three(v: tuple[float, ...]) -> str | None:
    return None if len(v) == 3 else f"needs 3 values (one per channel), got {len(v)}"


@dataclass(frozen=True)
class OnnxParams:
    """Pre- and post-processing of an ONNX saliency model (:mod:`stages.masks.onnx_model`).

    ``input_size`` must match a model with a fixed spatial input size; it is used as is when the
    model's spatial dims are dynamic. x = (pixel * scale - mean) / std per channel (in
    ``channel_order``). Without ``minmax`` the output is clipped to [0, 1], so it must already be a
    probability.
    """

    input_size: Union[tuple[int, ...], int] = opt(320, doc="input size of the ONNX model: a side (square) or [height, width]",
                                                   check=lambda v: in_range(8)(v) or (None if isinstance(v, int) or len(v) == 2
                                                                                     else "needs one side or [height, width]"))
    mean: tuple[float, ...] = opt((0.485, 0.456, 0.406), doc="per-channel mean after scaling to [0,1]", check=_three)
    std: tuple[float, ...] = opt((0.229, 0.224, 0.225), doc="per-channel std",
                                 check=lambda v: _three(v) or in_range(0.0, lo_open=True)(v))
    scale: float = opt(1.0 / 255.0, doc="factor from pixel values to the model's range", check=in_range(0.0, lo_open=True),
                       since_default=True)
    output_index: int = opt(0, doc="which model output is the saliency map", check=in_range(0))
    minmax: bool = opt(True, doc="min-max normalise the model's map per image (the U2-Net authors do)")
    channel_order: Literal["RGB", "BGR"] = opt("RGB", doc="channel order the model expects", since_default=True)
    threads: int = opt(1, doc="onnxruntime intra-op threads per worker", check=in_range(1))

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not isinstance(self.input_size, numbers.Integral):
            object.__setattr__(self, "input_size", tuple(self.input_size))
        check_fields(self)

    @property
    def size_hw(self) -> tuple[int, int]:
        s = self.input_size
        return (int(s), int(s)) if isinstance(s, numbers.Integral) else (int(s[0]), int(s[1]))


def _multiple_of_32(v: int) -> str | None:
    return None if v >= 32 and v % 32 == 0 else f"must be a multiple of 32, >= 32, got {v}"


@dataclass(frozen=True)
class BootstrapParams:
    """Parameters of the bootstrapped saliency network (:func:`stages.masks.bootstrap.fit_bootstrap`).

    Round 1 trains on the hard targets teacher > ``label_threshold``; their foreground share is the
    fit's. With ``calibrate``, later rounds threshold the refined pseudo-labels at the matching
    quantile and every round's output is shifted so that the same share exceeds 0.5; without it,
    targets and predictions shrink round after round. SGD (momentum 0.9, weight decay 1e-4), lr
    decayed by poly 0.9 within a round. ``freeze`` applies to a pretrained ``init`` only. ``crf``
    and ``teacher`` are not part of the fit's recorded parameters (the teacher is recorded as
    itself). ``seed`` seeds the initialisation, batch order and augmentations of each round.
    """

    backbone: Backbone = opt("mobilenet_v2", doc="saliency network encoder")
    init: str = opt("random", doc="'random', 'imagenet', 'moco_v2' (resnet50) or a checkpoint path for the encoder")
    teacher: Literal["priors", "features"] = opt(
        "priors", since_default=True,
        doc="first pseudo-labels: the hand-crafted priors or the features estimator (masks.features)")
    rounds: int = opt(3, doc="pseudo-label refinement rounds", check=in_range(1))
    epochs_per_round: int = opt(3, doc="training epochs per round", check=in_range(1))
    input_size: int = opt(224, doc="training/inference size (a multiple of 32)", check=_multiple_of_32)
    batch_size: int = opt(16, doc="images per step (>= 2 for BatchNorm)", check=in_range(2))
    lr: float = opt(0.01, doc="SGD learning rate, poly-decayed within a round", check=in_range(0.0, lo_open=True))
    ema: float = opt(0.7, doc="moving-average weight of the previous pseudo-label in refinement",
                     check=in_range(0.0, 1.0, hi_open=True))
    label_threshold: float = opt(0.5, doc="round 1 trains on teacher maps above this; their foreground share is kept",
                                 check=in_range(0.0, 1.0, lo_open=True, hi_open=True))
    calibrate: bool = opt(True, doc="keep round 1's foreground share in later rounds' targets and every round's output")
    iou_weight: float = opt(1.0, doc="weight of the soft-IoU term added to the BCE loss (0: off)", check=in_range(0.0))
    crop_scale: float = opt(0.5, doc="smallest area share of the random crops", check=in_range(0.0, 1.0, lo_open=True))
    decoder_channels: int = opt(64, doc="width of the FPN-lite decoder", check=in_range(1))
    freeze: Literal["none", FreezePoint] = opt(
        "layer2", doc="with a pretrained init, freeze the encoder up to this stage (ignored with random init)")
    crf: bool = opt(False, since_default=True,
                    doc="snap the fitted network's maps to colour edges with the features estimator's dense CRF "
                        "(not part of the fit)")
    seed: int = opt(0, doc="seeds the initialisation, batch order and augmentations")
    num_workers: int = opt(0, doc="processes computing the teacher maps (0: in this process)", check=in_range(0))
    device: str = opt("auto", doc="'auto', 'cpu', 'cuda' or 'cuda:N'")

    def __post_init__(self) -> None:
        check_fields(self)


def _weights_value(v: str) -> str | None:
    return "must be a weights name, 'random' or a checkpoint path" if not v else None


@dataclass(frozen=True)
class FeatureParams:
    """Settings of the ``features`` estimator (:mod:`stages.masks.features`). ``init`` names the
    weights the pipeline resolves to a file; ``init_kind`` is how that file is read."""

    backbone: Backbone = opt("mobilenet_v2", doc="pretrained encoder whose features are cut")
    init: str = opt("imagenet", doc="its weights: 'imagenet', 'moco_v2' (resnet50) or a checkpoint path",
                    check=_weights_value)
    init_kind: InitKind = opt("auto", doc="checkpoint key layout")
    size: int = opt(448, doc="long side (px) of the network input (stride-16 grid)", check=in_range(64, 4096))
    temperature: float = opt(0.1, doc="softmax temperature of the similarity behind the spread cue",
                             check=in_range(0.0, lo_open=True))
    seed_share: float = opt(0.03, doc="share of the patches taken as object seeds",
                            check=in_range(0.0, 0.5, lo_open=True, hi_open=True))
    bg_prototypes: int = opt(16, doc="k-means centroids of the background seeds", check=in_range(1))
    iterations: int = opt(2, doc="re-estimations of the object and background sets", check=in_range(0))
    sharpness: float = opt(0.05, doc="sigmoid scale of (object - background similarity)",
                           check=in_range(0.0, lo_open=True))
    crf: bool = opt(True, doc="refine with a two-label dense CRF on the image")
    crf_size: int = opt(256, doc="long side (px) of the CRF refinement", check=in_range(32, 4096))
    crf_iterations: int = opt(5, doc="mean-field iterations of the refinement", check=in_range(0))
    crf_sxy: float = opt(20.0, doc="bilateral kernel width (px at crf_size)", check=in_range(0.0, lo_open=True))
    crf_srgb: float = opt(10.0, doc="bilateral colour width (0..255)", check=in_range(0.0, lo_open=True))
    crf_compat: float = opt(5.0, doc="bilateral Potts weight", check=in_range(0.0))
    max_objects: int = opt(3, doc="objects a repeated cut looks for (several proposals per image)", check=in_range(1))
    min_object_score: float = opt(0.5, doc="a further object's seed score relative to the first's",
                                  check=in_range(0.0, 1.0))
    class_prior: float = opt(0.25, doc="exponent of the ImageNet classifier's class-activation map in the seed score "
                                       "(0: off; needs weights with a classifier, not MoCo)", check=in_range(0.0, 4.0))
    threads: int = opt(1, doc="torch threads per worker", check=in_range(1))

    def __post_init__(self) -> None:
        check_fields(self)

    def crf_params(self) -> Any:
        """The refinement's :class:`stages.evaluate.crf.CRFParams`."""
        from stages.evaluate.crf import CRFParams

        return CRFParams(iterations=self.crf_iterations, bilateral_sxy=self.crf_sxy,
                         bilateral_srgb=self.crf_srgb, bilateral_compat=self.crf_compat)


PROPOSAL_METHODS = ("single", "components", "cuts")


class ProposalsError(ParamError):
    """Impossible proposal settings."""


def _count(v) -> str | None:
    ok = isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1
    return None if ok else f"must be an int >= 1, got {v!r}"


def _share(v) -> str | None:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1
    return None if ok else f"must be a number in [0, 1), got {v!r}"


@dataclass(frozen=True)
class ProposalParams:
    """How an image's object proposals are chosen (the methods: :mod:`stages.masks.proposals`).
    The ``masks`` section declares these keys by inheriting this class; with ``single`` (the
    default) the other two do not apply, and none of the three enters a version."""

    proposals: Literal["single", "components", "cuts"] = opt(
        "single", since_default=True,
        doc="object proposals per image: single (the binary mask), components (its connected components), "
            "cuts (the features estimator's repeated cuts); not single writes mask shards of schema version 2")
    max_proposals: int = opt(3, doc="at most this many proposals per image (components, cuts)", check=_count,
                             since_default=True)
    min_proposal: float = opt(0.01, doc="a proposal covers at least this share of the image (components, cuts)",
                              check=_share, since_default=True)

    def __post_init__(self) -> None:
        check_fields(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the masks section's other bases
            parent()

    @property
    def multiple(self) -> bool:
        """Whether the method can give more than one proposal per image (what makes the masks
        stage write mask shards of schema version 2)."""
        return self.proposals != "single"

    @classmethod
    def of(cls, section: Any) -> "ProposalParams":
        """The proposal keys of ``section`` (the ``masks`` section) as a ``ProposalParams``."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})
