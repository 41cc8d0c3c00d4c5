"""Linear probe on cached decoder features: a 1x1 conv 256 -> n_cls trained with SGD.

The reference reruns the frozen network for all 60 epochs; here the frozen part has run once
(the `extract` stage caches the 256-d trunk at low resolution) and only the probe trains. A 1x1
conv commutes with bilinear upsampling (both are linear, and bilinear weights sum to 1 so the
bias passes through), so logits computed on the cached low-resolution features and then upsampled
to the label size equal the reference's "upsample, then classify" exactly, at a fraction of the
cost.

Inputs are samples (features (C, h, w), float16 or float32, numpy or torch; label (H, W) uint8)
whose sizes may vary per image. A batch is not padded: images are grouped by (feature size,
label size), each group runs as one tensor, and the loss is the sum of per-pixel cross-entropies
over the batch divided by the batch's number of non-ignored pixels, which is exactly
`nn.CrossEntropyLoss(ignore_index=255)` on the batch padded with ignore labels.

Not reproduced: the reference's train-time augmentation (flip, scale, rotation of the input
image) has no exact counterpart on cached features; feed augmented cached features if wanted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import confusion_matrix, segmentation_scores

IGNORE_INDEX = 255
Sample = tuple[Any, Any]  # (features (C, h, w) array/tensor, label (H, W) uint8 array/tensor)


class LinearProbeError(ValueError):
    """Bad input to the linear probe."""


def make_linear_head(in_dim: int, n_cls: int, seed: int) -> nn.Conv2d:
    """The probe: 1x1 conv in_dim -> n_cls, weights N(0, 0.01), bias 0 (as the reference)."""
    head = nn.Conv2d(in_dim, n_cls, kernel_size=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.01, generator=gen)
        head.bias.zero_()
    return head


def upsampled_logits(head: nn.Conv2d, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits (B, n_cls, H, W): the head on features (B, C, h, w), then bilinear upsampling
    (align_corners=False) to `size`."""
    if feats.shape[1] != head.in_channels:
        raise LinearProbeError(f"linear probe: features have {feats.shape[1]} channels, the head expects {head.in_channels}")
    return F.interpolate(head(feats), size=size, mode="bilinear", align_corners=False)


def _as_feature(feat, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(feat)
    if t.ndim != 3:
        raise LinearProbeError(f"linear probe: expected features (C, h, w), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


def _as_label(label, device: torch.device) -> torch.Tensor:
    t = label if isinstance(label, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(label))
    if t.ndim != 2:
        raise LinearProbeError(f"linear probe: expected a label (H, W), got shape {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.long, non_blocking=True)


def _groups(batch: Sequence[Sample], device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (features (B_g, C, h, w), labels (B_g, H, W)) per group of equal sizes in a batch."""
    feats = [_as_feature(f, device) for f, _ in batch]
    labels = [_as_label(lbl, device) for _, lbl in batch]
    keys: dict[tuple, list[int]] = {}
    for i, (f, lbl) in enumerate(zip(feats, labels)):
        keys.setdefault((tuple(f.shape), tuple(lbl.shape)), []).append(i)
    for idx in keys.values():
        yield torch.stack([feats[i] for i in idx]), torch.stack([labels[i] for i in idx])


def batch_loss(head: nn.Conv2d, batch: Sequence[Sample], ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, int]:
    """(sum of per-pixel cross-entropies over the batch, number of non-ignored pixels), on the
    head's device."""
    device = head.weight.device
    total = torch.zeros((), device=device)
    n_valid = 0
    for feats, labels in _groups(batch, device):
        logits = upsampled_logits(head, feats, tuple(labels.shape[-2:]))
        total = total + F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
        n_valid += int((labels != ignore_index).sum())
    return total, n_valid


def _batches(samples: Iterable[Sample], batch_size: int) -> Iterator[list[Sample]]:
    batch: list[Sample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def predict_linear(head: nn.Conv2d, feats, size: tuple[int, int]) -> np.ndarray:
    """Class map (H, W) int64 of one image's features (C, h, w) at the label size `size`,
    computed on the head's device."""
    device = head.weight.device
    logits = upsampled_logits(head, _as_feature(feats, device)[None], tuple(size))
    return logits[0].max(dim=0).indices.cpu().numpy()  # = argmax(dim=0) (first maximum), 7x faster on CPU


@torch.no_grad()
def linear_confusion(head: nn.Conv2d, samples: Iterable[Sample], n_cls: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Confusion (n_cls, n_cls) of the probe's predictions over samples (features, label)."""
    was_training = head.training
    head.eval()
    conf = np.zeros((n_cls, n_cls), dtype=np.int64)
    for feats, label in samples:
        label = np.asarray(label.cpu() if isinstance(label, torch.Tensor) else label)
        conf += confusion_matrix(predict_linear(head, feats, label.shape), label, n_cls, n_cls, ignore_index)
    head.train(was_training)
    return conf


@dataclass
class EpochLog:
    """One epoch of probe training; val_miou in percent (None without a val set)."""

    epoch: int
    lr: float
    train_loss: float  # mean cross-entropy per non-ignored training pixel
    val_miou: float | None = None
    val_per_class_iou: list[float] | None = None


@dataclass
class LinearProbeResult:
    """The trained probe. `head` is the last epoch's ("last", the honest figure); the best val
    epoch is reported beside it, labelled, since the reference keeps the best epoch of a val
    split that is also its test split."""

    head: nn.Conv2d
    seed: int
    history: list[EpochLog]
    best_epoch: int | None = None
    best_val_miou: float | None = None
    best_state: dict | None = field(default=None, repr=False)  # head state_dict at best_epoch (CPU)

    @property
    def last_val_miou(self) -> float | None:
        return self.history[-1].val_miou if self.history else None

    def metrics(self) -> dict:
        """JSON-ready figures: `miou` / `per_class_iou` are the last epoch's, the best val epoch's
        are beside them under `*_best_on_val` (None without a val set)."""
        last = self.history[-1] if self.history else None
        best = self.history[self.best_epoch] if self.best_epoch is not None else None
        return {
            "miou": self.last_val_miou, "miou_std": 0.0,
            "per_class_iou": last.val_per_class_iou if last else None, "seeds": [self.seed],
            "miou_best_on_val": self.best_val_miou, "best_epoch": self.best_epoch,
            "per_class_iou_best_on_val": best.val_per_class_iou if best else None,
            "history": [vars(h) for h in self.history],
        }


def train_linear_probe(
    train_iter_fn: Callable[[int], Iterable[Sample]],
    n_cls: int,
    in_dim: int = 256,
    epochs: int = 60,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 16,
    lr_drop_epoch: int = 25,
    lr_drop_factor: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    val_iter_fn: Callable[[], Iterable[Sample]] | None = None,
    on_epoch_end: Callable[[EpochLog], None] | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> LinearProbeResult:
    """Train a 1x1-conv probe on cached features with the reference's recipe.

    train_iter_fn(epoch) yields the epoch's samples (features (C, h, w), label (H, W)) in the
    order to train on: shuffle there, e.g. with np.random.default_rng((seed, epoch)).permutation.
    Consecutive samples form batches of `batch_size` (>= 1, checked by the ``evaluate.linear``
    parameters; the last may be smaller). SGD with
    momentum and weight decay; lr drops by lr_drop_factor from epoch index lr_drop_epoch on
    (0-based). With val_iter_fn, val mIoU is computed after every epoch and the best epoch's
    weights are kept beside the last. on_epoch_end receives each EpochLog (for logging).
    """
    if epochs < 1:
        raise LinearProbeError(f"train_linear_probe: epochs must be >= 1, got {epochs}")
    device = torch.device(device)
    head = make_linear_head(in_dim, n_cls, seed).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    result = LinearProbeResult(head=head, seed=seed, history=[])
    for epoch in range(epochs):
        epoch_lr = lr * (lr_drop_factor if epoch >= lr_drop_epoch else 1.0)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr
        head.train()
        loss_sum, pixels = 0.0, 0
        for batch in _batches(train_iter_fn(epoch), batch_size):
            total, n_valid = batch_loss(head, batch, ignore_index)
            if n_valid == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            (total / n_valid).backward()
            optimizer.step()
            loss_sum += float(total.detach())
            pixels += n_valid
        if pixels == 0:
            raise LinearProbeError(f"train_linear_probe: epoch {epoch} had no labelled pixel (empty or all ignore)")
        log = EpochLog(epoch=epoch, lr=epoch_lr, train_loss=loss_sum / pixels)
        if val_iter_fn is not None:
            conf = linear_confusion(head, val_iter_fn(), n_cls, ignore_index)
            scores = segmentation_scores(conf)
            log.val_miou = 100.0 * scores.miou
            log.val_per_class_iou = (100.0 * scores.per_class_iou).tolist()
            if result.best_val_miou is None or log.val_miou > result.best_val_miou:
                result.best_epoch, result.best_val_miou = epoch, log.val_miou
                result.best_state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        result.history.append(log)
        if on_epoch_end is not None:
            on_epoch_end(log)
    return result


def head_from_state(state: dict, device: torch.device | str = "cpu") -> nn.Conv2d:
    """Rebuild a probe head from a state_dict (e.g. LinearProbeResult.best_state)."""
    n_cls, in_dim = state["weight"].shape[:2]
    head = nn.Conv2d(in_dim, n_cls, kernel_size=1)
    head.load_state_dict(state)
    return head.to(device)
