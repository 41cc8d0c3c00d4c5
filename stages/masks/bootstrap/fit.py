"""The bootstrap fit: ``rounds`` times, train a fresh ``SaliencyNet`` on hard targets from the
current pseudo-labels, checkpoint it, predict every image and refine the pseudo-labels; a rerun
continues after the last finished round (see the package docstring)."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from artifacts.atomic import atomic_path, atomic_write_json
from stages.common.weights import resolve_init
from stages.data import Sample
from stages.masks.params import BootstrapParams
from stages.network.init import load_init
from stages.network.runtime import resolve_device

from .maps import calibrate, fraction_threshold, refine_labels, to_u8
from .net import SaliencyNet, normalise, predict_tta, standardise, to_float
from .teacher import Teacher, prepare_data, teacher_config
from .workdir import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    FIT_FILE,
    SKIPPED_FILE,
    BootstrapError,
    round_checkpoint,
    round_labels,
    save_npz,
)

log = logging.getLogger(__name__)

PROB_SCALE = 65535.0  # predictions held as uint16 during a fit


def soft_iou_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over images of 1 - sum(p t) / sum(p + t - p t): prob, target B x 1 x H x W in [0, 1]."""
    inter = (prob * target).flatten(1).sum(1)
    union = (prob + target - prob * target).flatten(1).sum(1)
    return (1.0 - (inter + eps) / (union + eps)).mean()


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
            x = to_float(images_t[idx].to(device))  # B x 3 x S x S in [0, 1]
            y = (labels_t[idx].to(device) > level).float()[:, None]  # B x 1 x S x S hard targets
            x, y = _augment(x, y, params.crop_scale, gen)
            x = standardise(x).contiguous(memory_format=torch.channels_last)
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
        x = normalise(torch.from_numpy(images[i: i + batch_size]).to(device)).contiguous(memory_format=torch.channels_last)
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
    ids, images, priors, skipped = prepare_data(
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
            save_npz(round_labels(work_dir, r), ids=np.array(ids), labels=labels)
        with atomic_path(round_checkpoint(work_dir, r), suffix=".pt") as tmp:
            torch.save(ckpt, tmp)
        if progress:
            print(f"bootstrap: round {r}/{params.rounds} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
    return final
