"""Bootstrapped saliency: a network trained on hand-crafted prior maps as noisy pseudo-labels.

The idea of DeepUSPS (Nguyen et al., "DeepUSPS: Deep Robust Unsupervised Saliency Prediction With
Self-Supervision", NeurIPS 2019): no saliency ground truth anywhere; the pseudo-labels start as
the hand-crafted priors (``priors_saliency``) and are refined across rounds. Each round trains a
fresh encoder-decoder (``SaliencyNet``) on hard targets taken from the current pseudo-labels,
predicts every image (flip test-time augmentation) and moves the pseudo-labels towards the
prediction (DeepUSPS's moving average):

    label_{r+1} = ema * label_r + (1 - ema) * prediction_r          (``refine_labels``)

A network trained for a few epochs on noisy targets fits what the images have in common (objects
standing out from their surroundings) before it memorises per-image noise, so its predictions
rank pixels better than the targets it was trained on. Self-training of this kind also shrinks the
minority class: pixels the network is unsure about fall under 0.5, become background targets in
the next round, and so on. Like class-balanced self-training (Zou et al., ECCV 2018), the fit
therefore keeps the foreground fraction of the first round's targets (prior > label_threshold,
over all images): later rounds threshold the pseudo-labels at the matching quantile, and each
round's network output is shifted in logit space so that the same share of pixels exceeds 0.5
(``calibrate``; the shift is stored in the checkpoint). Measured on davis16-objects in
``benchmarks/bench_bootstrap.py``; the choices above (hard targets, calibration, ema, size,
frozen early stages) are the ones that measured best there.

On disk (``work_dir``): ``priors-<key>.npz`` (prior maps at the input size, uint8, computed once),
``labels-<r>.npz`` (pseudo-labels after round r), ``round-<r>.pt`` (network after round r: state
dict, calibration, config), ``fit.json`` (the parameters) and ``skipped.json`` (unreadable images).
All are written atomically; a rerun continues after the last finished round.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from artifacts.atomic import atomic_path, atomic_write_json, sha256_file
from stages.common.weights import resolve_init
from stages.data import BadInputError, Sample, load_image
from stages.masks.features import crf_refine
from stages.masks.params import BootstrapParams, FeatureParams
from stages.masks.priors import PriorParams, priors_saliency
from stages.network.init import load_init
from stages.network.backbones import build_backbone, frozen_modules
from stages.network.runtime import IMAGENET_MEAN, IMAGENET_STD, resolve_device

__all__ = [
    "BootstrapParams",
    "BootstrapError",
    "SaliencyNet",
    "fit_bootstrap",
    "refine_labels",
    "calibrate",
    "fraction_threshold",
    "BootstrapEstimator",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "maskcontrast/bootstrap"
CHECKPOINT_VERSION = 1
BOOTSTRAP_CRF = FeatureParams().crf_params()  # masks.bootstrap.crf: the features estimator's CRF
PROB_SCALE = 65535.0  # predictions held as uint16 during a fit
FIT_FILE = "fit.json"
SKIPPED_FILE = "skipped.json"

# Channels of the four pyramid levels (strides 4, 8, 16, 32) of each backbone (see ``_pyramid``).
_PYRAMID_CHANNELS = {
    "mobilenet_v2": (24, 32, 96, 1280),
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}
# Last MobileNetV2 block of each pyramid level (features.0-3: stride 4, 4-6: 8, 7-13: 16, 14-18: 32).
_MOBILENET_LEVEL_END = (3, 6, 13, 18)


class BootstrapError(ValueError):
    """A fit that cannot run or continue: no usable image, a foreign work_dir, not a checkpoint."""


# ----------------------------------------------------------------------------------------------
# pure pieces


def refine_labels(previous: np.ndarray, prediction: np.ndarray, ema: float) -> np.ndarray:
    """DeepUSPS-style moving average: ``ema * previous + (1 - ema) * prediction``, float32.

    previous, prediction: (..., H, W) maps in [0, 1] of the same shape.
    """
    previous = np.asarray(previous, np.float32)
    prediction = np.asarray(prediction, np.float32)
    if previous.shape != prediction.shape:
        raise ValueError(f"refine_labels: shapes differ: previous {previous.shape}, prediction {prediction.shape}")
    return (np.float32(ema) * previous + np.float32(1.0 - ema) * prediction).astype(np.float32)


def to_u8(maps: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] -> uint8 0..255 (rounded): the storage form of priors and pseudo-labels."""
    return np.round(np.clip(maps, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an image or map to size x size (aspect not kept): area averaging when shrinking."""
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if size <= min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def fraction_threshold(values: np.ndarray, fraction: float) -> float:
    """The value t with a share ``fraction`` of ``values`` above it: their (1 - fraction)-quantile."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction_threshold: fraction must be in (0, 1), got {fraction}")
    return float(np.quantile(np.asarray(values).ravel(), 1.0 - fraction))


def calibrate(prob: np.ndarray, threshold: float, eps: float = 1e-6) -> np.ndarray:
    """Shift probabilities in logit space so that ``threshold`` maps to 0.5: sigmoid(logit p - logit t).

    Monotone (rankings, hence F-measure curves, are kept); the identity for threshold 0.5.
    """
    p = np.clip(np.asarray(prob, np.float64), eps, 1.0 - eps)
    t = min(max(float(threshold), eps), 1.0 - eps)
    shift = math.log(t) - math.log1p(-t)
    return (1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p) - shift)))).astype(np.float32)


def soft_iou_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - sum(p t) / sum(p + t - p t): prob, target B x 1 x H x W in [0, 1]."""
    inter = (prob * target).flatten(1).sum(1)
    union = (prob + target - prob * target).flatten(1).sum(1)
    return (1.0 - (inter + eps) / (union + eps)).mean()


# ----------------------------------------------------------------------------------------------
# network


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


def _to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float in [0, 1]."""
    return images_u8.permute(0, 3, 1, 2).float().div_(255.0)


def _normalise(images_u8: torch.Tensor) -> torch.Tensor:
    """B x H x W x 3 uint8 -> B x 3 x H x W float, ImageNet mean/std."""
    return _standardise(_to_float(images_u8))


def _standardise(x: torch.Tensor) -> torch.Tensor:
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


# ----------------------------------------------------------------------------------------------
# data: prior maps and images at the input size


Teacher = Union[PriorParams, Callable[[np.ndarray], np.ndarray]]


def teacher_map(teacher: Teacher, img: np.ndarray) -> np.ndarray:
    """The first pseudo-label of an image: the hand-crafted priors, or another estimator's map."""
    if isinstance(teacher, PriorParams):
        return priors_saliency(img, teacher)
    return np.clip(np.asarray(teacher(img), dtype=np.float32), 0.0, 1.0)


def teacher_config(teacher: Teacher) -> dict[str, Any]:
    """What names a teacher in the fit file and the cache key (the priors' parameters as before)."""
    return asdict(teacher) if isinstance(teacher, PriorParams) else {"teacher": teacher.describe()}


def _prepare_one(task: tuple[str, str, int, Teacher]) -> tuple[str, np.ndarray | None, np.ndarray | None, str]:
    """(id, image path, size, teacher) -> (id, teacher map u8 S x S, image u8 S x S x 3, error)."""
    sample_id, path, size, prior_params = task
    try:
        img = load_image(path)
        prior = teacher_map(prior_params, img)  # H x W in [0, 1]
    except (BadInputError, ValueError) as exc:
        return sample_id, None, None, str(exc)
    return sample_id, to_u8(resize_square(prior, size)), resize_square(img, size), ""


def _load_one(task: tuple[str, str, int]) -> tuple[str, np.ndarray | None, str]:
    """(id, image path, size) -> (id, image u8 S x S x 3, error)."""
    sample_id, path, size = task
    try:
        return sample_id, resize_square(load_image(path), size), ""
    except BadInputError as exc:
        return sample_id, None, str(exc)


def _map(fn, tasks: list, workers: int, progress: bool, what: str) -> list:
    """Ordered results of ``fn`` over ``tasks``, in this process or in ``workers`` spawned processes."""
    t0 = time.perf_counter()
    out = []
    pool = get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(fn, tasks, chunksize=4) if pool else map(fn, tasks)
        for i, res in enumerate(results, 1):
            out.append(res)
            if progress and (i % 100 == 0 or i == len(tasks)):
                print(f"bootstrap: {what} {i}/{len(tasks)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    return out


def _priors_key(samples: list[Sample], prior_params: Teacher, size: int) -> str:
    """Short hash naming the prior cache: the images, the teacher and the size."""
    h = hashlib.sha256(json.dumps([teacher_config(prior_params), size], sort_keys=True).encode())
    for s in samples:
        h.update(f"{s.id}\0{s.image}\n".encode())
    return h.hexdigest()[:16]


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _prepare_data(
    samples: list[Sample], prior_params: Teacher, size: int, work_dir: Path, workers: int, progress: bool
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    """(kept ids, images N x S x S x 3 u8, prior maps N x S x S u8, skipped id -> reason).

    The prior maps are cached in ``work_dir``; the images are decoded again on every call (they
    are not copied into the artifact store) and held in memory: N x S x S x 3 bytes.
    """
    cache = work_dir / f"priors-{_priors_key(samples, prior_params, size)}.npz"
    if cache.exists():
        with np.load(cache) as z:
            ids, priors = [str(i) for i in z["ids"]], z["maps"]
            skipped = dict(zip((str(i) for i in z["skipped_ids"]), (str(r) for r in z["skipped_reasons"])))
        by_id = {s.id: s for s in samples}
        loaded = _map(_load_one, [(i, str(by_id[i].image), size) for i in ids], workers, progress, "images")
        bad = {i: err for i, _, err in loaded if err}
        if bad:  # readable when the priors were computed, not any more
            raise BootstrapError(f"{work_dir}: images became unreadable since the priors were cached: {bad}")
        return ids, np.stack([img for _, img, _ in loaded]), priors, skipped
    tasks = [(s.id, str(s.image), size, prior_params) for s in samples]
    results = _map(_prepare_one, tasks, workers, progress, "priors")
    skipped = {i: err for i, _, _, err in results if err}
    kept = [(i, p, img) for i, p, img, err in results if not err]
    if not kept:
        raise BootstrapError(f"no readable image among the {len(samples)} samples (first error: {next(iter(skipped.values()), '')})")
    ids = [i for i, _, _ in kept]
    priors = np.stack([p for _, p, _ in kept])
    _save_npz(cache, ids=np.array(ids), maps=priors, skipped_ids=np.array(list(skipped), dtype=str),
              skipped_reasons=np.array(list(skipped.values()), dtype=str))
    return ids, np.stack([img for _, _, img in kept]), priors, skipped


# ----------------------------------------------------------------------------------------------
# training


def _crop_boxes(n: int, size: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    """n random crop boxes (x1, y1, x2, y2) in pixels: area fraction in [scale, 1], aspect 3/4-4/3."""
    area = scale + (1.0 - scale) * torch.rand(n, generator=gen, dtype=torch.float64)
    log_ratio = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * math.log(4 / 3)
    ratio = torch.exp(log_ratio)
    w = torch.clamp(torch.sqrt(area * ratio), max=1.0) * size
    h = torch.clamp(torch.sqrt(area / ratio), max=1.0) * size
    x1 = torch.rand(n, generator=gen, dtype=torch.float64) * (size - w)
    y1 = torch.rand(n, generator=gen, dtype=torch.float64) * (size - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1).float()


def _augment(x: torch.Tensor, y: torch.Tensor, scale: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint random crop-resize (bilinear) and horizontal flip of images x (B x 3 x S x S) and labels y (B x 1 x S x S)."""
    b, _, size, _ = x.shape
    boxes = _crop_boxes(b, size, scale, gen).to(x.device)
    rois = torch.cat([torch.arange(b, dtype=torch.float32, device=x.device)[:, None], boxes], 1)  # B x 5
    both = roi_align(torch.cat([x, y], 1), rois, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)
    both = torch.where(flip[:, None, None, None], both.flip(-1), both)
    return both[:, :3], both[:, 3:]


def _build_net(params: BootstrapParams, round_: int) -> tuple[SaliencyNet, dict | None]:
    """A fresh network, seeded by (seed, round), its encoder loaded from ``params.init`` if not random."""
    torch.manual_seed(params.seed * 1000 + round_)
    net = SaliencyNet(params.backbone, params.decoder_channels, "none" if params.init == "random" else params.freeze)
    info = None if params.init == "random" else load_init(net.backbone, resolve_init(params.init, params.backbone), "auto")
    return net, info


def _train_round(
    net: SaliencyNet, images: np.ndarray, labels: np.ndarray, level: float, params: BootstrapParams, round_: int,
    device: torch.device, progress: bool,
) -> list[float]:
    """Train ``net`` in place for ``epochs_per_round`` epochs; returns the mean loss of each epoch.

    images: N x S x S x 3 uint8; labels: N x S x S uint8 (pseudo-labels x 255), targets labels > level.
    """
    gen = torch.Generator().manual_seed(params.seed * 1000 + round_)
    net.to(device, memory_format=torch.channels_last).train()  # channels_last: ~1.5x faster on CPU
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=params.lr, momentum=0.9, weight_decay=1e-4)
    n = len(images)
    per_epoch = n // params.batch_size if n >= params.batch_size else 1
    total = per_epoch * params.epochs_per_round
    images_t = torch.from_numpy(images)
    labels_t = torch.from_numpy(labels)
    losses, step, t0 = [], 0, time.perf_counter()
    for epoch in range(params.epochs_per_round):
        order = torch.randperm(n, generator=gen)
        running = 0.0
        for b in range(per_epoch):
            idx = order[b * params.batch_size: (b + 1) * params.batch_size]  # drop the last partial batch
            x = _to_float(images_t[idx].to(device))  # B x 3 x S x S in [0, 1]
            y = (labels_t[idx].to(device) > level).float()[:, None]  # B x 1 x S x S hard targets
            x, y = _augment(x, y, params.crop_scale, gen)
            x = _standardise(x).contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = params.lr * (1.0 - step / total) ** 0.9
            logits = net(x)
            loss = F.binary_cross_entropy_with_logits(logits, y)
            if params.iou_weight > 0:
                loss = loss + params.iou_weight * soft_iou_loss(torch.sigmoid(logits), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach())
            step += 1
        losses.append(running / per_epoch)
        if progress:
            print(f"bootstrap: round {round_} epoch {epoch + 1}/{params.epochs_per_round} loss {losses[-1]:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return losses


def _predict_all(net: SaliencyNet, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """Flip-TTA probabilities of every image, as uint16 (probability x PROB_SCALE): N x S x S.

    16 bits rather than float32 halve the memory at 10k-image scale and resolve 1.5e-5.
    """
    net.to(device, memory_format=torch.channels_last).eval()
    out = np.empty(images.shape[:3], np.uint16)
    for i in range(0, len(images), batch_size):
        x = _normalise(torch.from_numpy(images[i: i + batch_size]).to(device)).contiguous(memory_format=torch.channels_last)
        out[i: i + batch_size] = torch.round(predict_tta(net, x) * PROB_SCALE).cpu().numpy()
    return out


def _refine_all(labels: np.ndarray, raw: np.ndarray, threshold: float, ema: float, chunk: int = 64) -> np.ndarray:
    """New uint8 pseudo-labels from uint8 ``labels`` and uint16 predictions ``raw`` (N x S x S each),
    calibrated at ``threshold``; in chunks of images so that float temporaries stay small."""
    out = np.empty_like(labels)
    for i in range(0, len(labels), chunk):
        prediction = calibrate(raw[i: i + chunk] / PROB_SCALE, threshold)
        out[i: i + chunk] = to_u8(refine_labels(labels[i: i + chunk] / 255.0, prediction, ema))
    return out


def _config(params: BootstrapParams, prior_params: Teacher) -> dict[str, Any]:
    fields = asdict(params)
    del fields["crf"]  # the estimator's post-processing, not the fit's
    del fields["teacher"]  # recorded as itself, under prior_params
    return {"params": fields, "prior_params": teacher_config(prior_params)}


def _check_fit_file(work_dir: Path, config: dict[str, Any]) -> None:
    """Record the fit's parameters; refuse a work_dir that holds a fit with other parameters."""
    path = work_dir / FIT_FILE
    if path.exists():
        found = json.loads(path.read_text())
        if found != json.loads(json.dumps(config)):
            raise BootstrapError(
                f"{path}: this work_dir holds a bootstrap fit with other parameters ({found}); "
                f"expected {config}: use another work_dir")
    else:
        atomic_write_json(path, config)


def round_checkpoint(work_dir: Path, round_: int) -> Path:
    """Path of the network checkpoint written after round ``round_`` (1-based)."""
    return Path(work_dir) / f"round-{round_}.pt"


def round_labels(work_dir: Path, round_: int) -> Path:
    """Path of the pseudo-labels after round ``round_`` (round 0: the prior maps' copy is not written)."""
    return Path(work_dir) / f"labels-{round_}.npz"


def fit_bootstrap(
    samples: list[Sample], prior_params: Teacher, params: BootstrapParams, work_dir: Path, *, progress: bool = True
) -> Path:
    """Fit the bootstrapped saliency network on ``samples`` (no ground truth); return the final checkpoint.

    ``prior_params`` is the teacher: ``PriorParams`` for the hand-crafted priors, or a picklable
    estimator ``img -> map in [0, 1]`` with ``describe()`` (``masks.bootstrap.teacher: features``).
    1) teacher maps of every image at input_size (cached in work_dir; unreadable images skipped and
       listed in work_dir/skipped.json); 2) ``rounds`` times: train a fresh ``SaliencyNet`` on the
       current pseudo-labels, checkpoint it, predict every image with flip TTA and refine the
       pseudo-labels by ``refine_labels`` (not after the last round: nothing would use them).
    A finished round (checkpoint and, but for the last, its refined labels on disk) is never
    redone: an interrupted fit continues at the next round with the same result as an
    uninterrupted one (each round is seeded by (seed, round) alone).

    Memory: the images, priors, pseudo-labels and predictions at the input size are held in
    memory, 7 bytes per pixel: 0.35 MB per image at 224 (180 MB for 519 images, 3.7 GB for 10k).
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    config = _config(params, prior_params)
    _check_fit_file(work_dir, config)
    device = resolve_device(params.device)

    final = round_checkpoint(work_dir, params.rounds)
    if final.exists():
        return final
    ids, images, priors, skipped = _prepare_data(
        samples, prior_params, params.input_size, work_dir, params.num_workers, progress)
    if skipped:
        atomic_write_json(work_dir / SKIPPED_FILE, dict(sorted(skipped.items())))
        log.warning("bootstrap: %d unreadable image(s) skipped, listed in %s", len(skipped), work_dir / SKIPPED_FILE)
        if progress:
            print(f"bootstrap: {len(skipped)} unreadable image(s) skipped (see {work_dir / SKIPPED_FILE})",
                  file=sys.stderr, flush=True)

    fg_fraction = float(np.mean(priors > params.label_threshold * 255.0))  # of the round-1 hard targets
    if not 0.0 < fg_fraction < 1.0:
        raise BootstrapError(f"the priors leave no foreground or no background above {params.label_threshold}")

    # Resume after the last round whose outputs are all on disk.
    start, labels = 1, priors
    for r in range(params.rounds - 1, 0, -1):
        if round_checkpoint(work_dir, r).exists() and round_labels(work_dir, r).exists():
            with np.load(round_labels(work_dir, r)) as z:
                if [str(i) for i in z["ids"]] != ids:
                    raise BootstrapError(f"{round_labels(work_dir, r)}: ids differ from the samples being fitted")
                labels = z["labels"]
            start = r + 1
            break

    for r in range(start, params.rounds + 1):
        t0 = time.perf_counter()
        use_fraction = params.calibrate and r > 1
        level = fraction_threshold(labels, fg_fraction) if use_fraction else params.label_threshold * 255.0
        net, init_info = _build_net(params, r)
        losses = _train_round(net, images, labels, level, params, r, device, progress)
        raw = _predict_all(net, images, params.batch_size, device)
        threshold = fraction_threshold(raw, fg_fraction) / PROB_SCALE if params.calibrate else 0.5
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "round": r,
            "backbone": params.backbone,
            "decoder_channels": params.decoder_channels,
            "input_size": params.input_size,
            "config": config,
            "init_sha256": None if init_info is None else init_info["sha256"],
            "losses": losses,
            "fg_fraction": fg_fraction,
            "target_level": level,
            "threshold": threshold,
            "num_images": len(ids),
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        }
        if r < params.rounds:
            labels = _refine_all(labels, raw, threshold, params.ema)
            _save_npz(round_labels(work_dir, r), ids=np.array(ids), labels=labels)
        with atomic_path(round_checkpoint(work_dir, r), suffix=".pt") as tmp:
            torch.save(ckpt, tmp)
        if progress:
            print(f"bootstrap: round {r}/{params.rounds} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
    return final


# ----------------------------------------------------------------------------------------------
# inference


class BootstrapEstimator:
    """Saliency from a ``fit_bootstrap`` checkpoint: uint8 RGB (H, W, 3) -> float32 (H, W) in [0, 1].

    Picklable: holds the checkpoint path and device; the network is loaded lazily, once per process.
    """

    name = "bootstrap"

    def __init__(self, checkpoint: Path, device: str = "cpu", crf: bool = False) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.crf = crf
        self._net: SaliencyNet | None = None
        self._ckpt: dict | None = None
        self._sha256: str | None = None

    def __getstate__(self) -> dict:
        return {"checkpoint": self.checkpoint, "device": self.device, "crf": self.crf}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["checkpoint"], state["device"], state.get("crf", False))

    def _load(self) -> SaliencyNet:
        if self._net is None:
            if not self.checkpoint.is_file():
                raise BootstrapError(f"{self.checkpoint}: bootstrap checkpoint not found")
            ckpt = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
                raise BootstrapError(f"{self.checkpoint}: not a bootstrap checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
            net = SaliencyNet(ckpt["backbone"], ckpt["decoder_channels"])
            net.load_state_dict(ckpt["state_dict"])
            self._net = net.to(resolve_device(self.device), memory_format=torch.channels_last).eval()
            self._ckpt = ckpt
        return self._net

    def describe(self) -> dict[str, Any]:
        self._load()
        if self._sha256 is None:
            self._sha256 = sha256_file(self.checkpoint)
        config = self._ckpt["config"]
        return {"estimator": self.name, "checkpoint_sha256": self._sha256, "estimator_params": {
            **config["params"], "round": self._ckpt["round"], "prior_params": config["prior_params"],
            **({"crf": True} if self.crf else {})}}

    def __call__(self, img: np.ndarray, sample: Sample | None = None) -> np.ndarray:
        net = self._load()
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image of shape (H, W, 3), got {img.dtype} {img.shape}")
        h, w = img.shape[:2]
        small = resize_square(img, self._ckpt["input_size"])
        device = next(net.parameters()).device
        x = _normalise(torch.from_numpy(small[None]).to(device)).contiguous(memory_format=torch.channels_last)
        prob = calibrate(predict_tta(net, x)[0].cpu().numpy(), self._ckpt["threshold"])  # S x S
        if self.crf:
            out = crf_refine(img, prob, BOOTSTRAP_CRF, FeatureParams.crf_size)
        else:
            out = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(out, 0.0, 1.0).astype(np.float32)
