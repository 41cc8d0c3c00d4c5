"""False negatives out, semantic positives in: the prototype columns each image's anchors see.

Today's loss (``loss.contrastive_loss``) is instance discrimination of object prototypes: every
other prototype of the batch and the queue is a negative, also the other images of the anchor's
class (and, on video data, the other frames of its own sequence), and nothing pulls same-class
objects together. Two standard fixes, both decided per image from its own key prototype ``p_b``
(the positive column) and its cosine similarity to the other columns ``[prototypes; queue]``:

- **false negatives out** (false-negative elimination): columns with ``p_b . c > fn_threshold``,
  and/or the ``fn_topk`` columns most similar to ``p_b``, leave image b's softmax (masked out);
- **semantic positives in** (NNCLR-style): the ``nn_topk`` columns most similar to ``p_b`` become
  extra targets of image b's anchors with total weight ``nn_weight`` (``nn_weight / nn_topk``
  each), beside the own prototype's weight 1. A positive is always kept in the softmax.

The loss with a column mask and soft targets, per anchor ``a`` of image ``b``::

    loss_a = sum_j t_bj * (logsumexp_{j' kept for b} l_aj' - l_aj),   l_aj = a . c_j / tau

weighted per image as today (``w_b = 1 / ln(1.02 + share of anchors from b)``, normalised by the
sum of the anchors' weights). With every column kept and ``t_b`` one-hot at b it is today's loss.

``contrastive_loss_targets_naive`` materialises anchors x columns (the reference);
``contrastive_loss_targets`` computes the same value and gradients block by block (memory as
``loss.contrastive_loss``). ``select_columns`` is the pure selection rule.

Similarity space. By default the cosines are those of the loss's own prototypes (the 32-d head,
random at the start of training). ``space="backbone"`` measures them instead between mask-pooled
features of the key encoder's backbone (``pooled_features``; from an ImageNet init this is close
to the initial feature space, in which same-class objects are already near each other), kept in a
queue of their own beside the prototype queue, row for row. ``space="init"`` uses one fixed row
per training image: the *initial* network's backbone features of the whole image pooled over its
mask (``initial_features``, computed once before training), looked up by the image each column
came from (the queue then remembers its rows' images).

Groups of near-duplicates. On video data an image's nearest neighbours are frames of its own
video, so "semantic" positives are the same object and dropped "false negatives" its own frames.
Over-clustering the initial features (``near_duplicate_groups``: k-means with many more groups than
classes, in the PCA-whitened space) finds those near-duplicate groups (on davis16-objects 24
groups are 93 % video-pure and hold 90 % of the same-video pairs, where no cosine threshold
separates them). With groups, ``fn_topk`` and ``nn_topk`` pick among the columns of *other*
groups, and ``same_group`` decides the own group's columns: ``keep`` (negatives, as today),
``drop`` (out of the softmax: they are the same object) or ``positive`` (extra targets with total
weight ``group_weight``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.data import BadInputError
from stages.network.runtime import normalize_images

from .data import TrainDataError
from .loss import DEFAULT_CHUNK_SIZE, _anchor_mask, _check_shapes

SPACES = ("head", "backbone", "init")
SAME_GROUP = ("keep", "drop", "positive")
_NEG = -1e4  # a masked logit: exp(-1e4 / 1) underflows to exactly 0 next to any kept column


@dataclass(frozen=True)
class ColumnRule:
    """Which columns an image's anchors see, and which are its extra positives.

    ``fn_threshold``: drop columns whose cosine to the image's own key prototype is above it
    (None: no threshold). ``fn_topk``: drop that many most similar columns. ``nn_topk``: that many
    most similar columns become positives with total weight ``nn_weight``. Zero columns (empty
    masks) are never selected. All off (the defaults): today's loss.
    """

    fn_threshold: float | None = None
    fn_topk: int = 0
    nn_topk: int = 0
    nn_weight: float = 0.0
    space: str = "head"
    same_group: str = "keep"
    group_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.fn_threshold is not None and not -1.0 <= self.fn_threshold <= 1.0:
            raise ValueError(f"fn_threshold must be a cosine in [-1, 1], got {self.fn_threshold}")
        if self.fn_topk < 0 or self.nn_topk < 0:
            raise ValueError(f"fn_topk and nn_topk must be >= 0, got {self.fn_topk}, {self.nn_topk}")
        if self.nn_weight < 0:
            raise ValueError(f"nn_weight must be >= 0, got {self.nn_weight}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        if self.same_group not in SAME_GROUP:
            raise ValueError(f"same_group must be one of {', '.join(SAME_GROUP)}, got {self.same_group!r}")
        if self.group_weight < 0:
            raise ValueError(f"group_weight must be >= 0, got {self.group_weight}")

    @property
    def active(self) -> bool:
        return (self.fn_threshold is not None or self.fn_topk > 0 or (self.nn_topk > 0 and self.nn_weight > 0)
                or self.same_group != "keep")


def _topk_mask(sim: torch.Tensor, k: int) -> torch.Tensor:
    """B x N bool: the ``k`` largest finite entries of each row (fewer if fewer are finite)."""
    out = torch.zeros_like(sim, dtype=torch.bool)
    k = min(k, sim.shape[1])
    if k == 0:
        return out
    values, index = sim.topk(k, dim=1)
    out.scatter_(1, index, torch.isfinite(values))
    return out


@torch.no_grad()
def pooled_features(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """B x C unit rows: the mean of a feature grid (B x C x h x w) over each image's mask
    (B x H x W, resized to h x w by area: the share of each cell inside the mask); zero rows for
    empty masks."""
    weight = F.interpolate(masks[:, None].float(), size=features.shape[-2:], mode="area")  # B x 1 x h x w
    summed = (features.float() * weight).sum((2, 3))  # B x C
    norm = summed.norm(dim=1, keepdim=True)
    return torch.where(norm > eps, summed / norm.clamp_min(eps), torch.zeros_like(summed))


@torch.no_grad()
def select_columns(
    prototypes: torch.Tensor, queue: torch.Tensor, rule: ColumnRule,
    space: tuple[torch.Tensor, torch.Tensor] | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns each image keeps and its targets, from the key prototypes.

    Args:
        prototypes: B x D key prototypes (unit rows, zero rows where invalid); column b of image b.
        queue: K x D earlier prototypes (columns B..B+K-1).
        rule: the selection.
        space: (B x C, K x C) unit rows in which to measure the cosines instead, row for row with
            ``prototypes`` and ``queue`` (``rule.space`` backbone or init); None: the prototypes'.
        groups: (B, K) int64 group of each column's image (-1: none); the top-k picks skip the own
            group, whose columns ``rule.same_group`` keeps, drops or makes positives.
    Returns:
        keep B x (B + K) bool (own column always True) and targets B x (B + K) float32:
        1 at the own column, ``nn_weight / nn_topk`` at each selected neighbour,
        ``group_weight / n`` at each of the n own-group columns (``same_group: positive``), else 0.
    """
    b = prototypes.shape[0]
    if space is not None:
        if space[0].shape[0] != b or space[1].shape[0] != queue.shape[0]:
            raise ValueError(f"space rows ({space[0].shape[0]}, {space[1].shape[0]}) must match the "
                             f"prototypes and queue ({b}, {queue.shape[0]})")
        valid = prototypes.norm(dim=1) > 0
        prototypes = space[0].float() * valid[:, None]  # an invalid prototype selects nothing
        queue = space[1]
    columns = torch.cat([prototypes.float(), queue.float()], dim=0)  # N x D
    n = columns.shape[0]
    sim = prototypes.float() @ columns.t()  # B x N cosines
    own = torch.zeros(b, n, dtype=torch.bool, device=sim.device)
    own[torch.arange(b), torch.arange(b)] = True
    usable = (columns.norm(dim=1) > 0)[None, :] & (prototypes.norm(dim=1) > 0)[:, None] & ~own  # B x N
    same = torch.zeros_like(own)
    if groups is not None:
        if groups[0].shape[0] != b or groups[1].shape[0] != queue.shape[0]:
            raise ValueError(f"group rows ({groups[0].shape[0]}, {groups[1].shape[0]}) must match the "
                             f"prototypes and queue ({b}, {queue.shape[0]})")
        mine = groups[0].to(sim.device)
        col_groups = torch.cat([mine, groups[1].to(sim.device)])
        same = usable & (mine[:, None] == col_groups[None, :]) & (mine[:, None] >= 0)
    candidates = sim.masked_fill(~usable | same, float("-inf"))
    drop = torch.zeros_like(own)
    if rule.fn_threshold is not None:
        drop |= usable & ~same & (sim > rule.fn_threshold)
    if rule.fn_topk:
        drop |= _topk_mask(candidates, rule.fn_topk)
    targets = own.float()
    if rule.nn_topk and rule.nn_weight > 0:
        positive = _topk_mask(candidates, rule.nn_topk)
        targets = targets + positive.float() * (rule.nn_weight / rule.nn_topk)
        drop &= ~positive
    if rule.same_group == "drop":
        drop |= same
    elif rule.same_group == "positive" and rule.group_weight > 0:
        n_same = same.sum(1, keepdim=True).clamp_min(1).float()
        targets = targets + same.float() * (rule.group_weight / n_same)
    return ~drop, targets


@torch.no_grad()
def initial_features(backbone: torch.nn.Module, load, n: int, size: int, device: torch.device,
                     progress: bool = False) -> torch.Tensor:
    """N x C unit rows: ``backbone``'s features of each whole image pooled over its mask
    (``pooled_features``), the fixed similarity space of ``space: init``.

    ``load(i)`` gives image ``i`` (H x W x 3 uint8) and its mask (H x W bool), or raises
    ``BadInputError`` (that image gets a zero row: it selects and is selected by nothing). Each
    image is resized so that its shorter side is ``size``. The backbone should be in eval mode.
    """
    rows: list[torch.Tensor] = []
    for i in tqdm(range(n), desc="initial features", unit="img", disable=not progress, dynamic_ncols=True):
        try:
            image, mask = load(i)
        except BadInputError:
            rows.append(None)
            continue
        h, w = mask.shape
        scale = size / min(h, w)
        hw = (max(1, round(h * scale)), max(1, round(w * scale)))
        img = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None].to(device)
        img = F.interpolate(img.float(), size=hw, mode="bilinear", antialias=True, align_corners=False)
        img = img.round().clamp(0, 255).to(torch.uint8)
        m = torch.from_numpy(np.array(mask, dtype=np.float32))[None, None].to(device)
        m = F.interpolate(m, size=hw, mode="area")[:, 0]
        rows.append(pooled_features(backbone(normalize_images(img)), m > 0.5)[0].cpu())
    width = next((r.shape[0] for r in rows if r is not None), 0)
    return torch.stack([r if r is not None else torch.zeros(width) for r in rows]) if rows else torch.zeros(0, 0)


def near_duplicate_groups(features: torch.Tensor, n_groups: int, seed: int, pca_dim: int = 32) -> torch.Tensor:
    """(N,) int64 group of each row of ``features``: ``stages.evaluate.kmeans.over_cluster`` (the
    groups its discriminant space is fitted on) of the usable rows; -1 for zero rows. Raises
    TrainDataError when fewer usable rows than groups."""
    from stages.evaluate.kmeans import over_cluster  # faiss: loaded only with groups

    x = features.double().numpy()
    valid = np.linalg.norm(x, axis=1) > 0
    if valid.sum() < n_groups:
        raise TrainDataError(f"train.contrast.groups: {n_groups} groups need at least as many training images "
                             f"with a usable mask, got {int(valid.sum())}")
    out = np.full(len(x), -1, dtype=np.int64)
    out[valid] = over_cluster(x[valid], n_groups, pca_dim=pca_dim, seed=seed)
    return torch.from_numpy(out)


def _anchor_weights(index: torch.Tensor, b: int, hw: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(index // hw, minlength=b).to(dtype)  # B
    class_weight = 1.0 / torch.log(1.02 + counts / index.numel())  # B
    return class_weight, (class_weight * counts).sum()


def contrastive_loss_targets_naive(
    q_emb: torch.Tensor, masks_q: torch.Tensor, prototypes: torch.Tensor, queue: torch.Tensor,
    temperature: float, keep: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of the module docstring with the full anchors x (B + K) logit matrix (reference)."""
    _check_shapes(q_emb, masks_q, prototypes, queue)
    b, d, h, w = q_emb.shape
    anchor_mask = _anchor_mask(masks_q, valid)
    q = F.normalize(q_emb, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # BHW x D
    anchors = q[anchor_mask.reshape(-1)]  # A x D
    img = torch.arange(b, device=q_emb.device).view(b, 1, 1).expand(b, h, w)[anchor_mask]  # A
    if img.numel() == 0:
        return q_emb.sum() * 0.0
    columns = torch.cat([prototypes, queue], dim=0).to(anchors.dtype)  # N x D
    logits = anchors @ columns.t() / temperature  # A x N
    logits = logits.masked_fill(~keep[img], float("-inf"))
    log_p = torch.log_softmax(logits, dim=1)
    t = targets[img].to(logits.dtype)  # A x N
    nll = -(t * log_p.masked_fill(~keep[img], 0.0)).sum(1)  # A
    share = torch.bincount(img, minlength=b).to(logits.dtype) / img.numel()
    weight = (1.0 / torch.log(1.02 + share))[img]  # A
    return (weight * nll).sum() / weight.sum()


class _ChunkedTargetContrast(torch.autograd.Function):
    """``contrastive_loss_targets_naive`` image by image and block by block of anchors.

    Anchors come sorted by image (flat positions), so each image's anchors are one run: its
    kept columns are gathered once (no masking) and its target term is one vector,
    ``sum_j t_bj l_aj = a . (sum_j t_bj c_j) / tau``. Memory as ``loss._ChunkedPixelContrast``.
    """

    @staticmethod
    def _runs(index, hw, b):
        counts = torch.bincount(index // hw, minlength=b).tolist()
        start = 0
        for img, n in enumerate(counts):
            if n:
                yield img, start, start + n
            start += n

    @staticmethod
    def forward(ctx, q_emb, index, columns, keep, targets, class_weight, weight_sum, temperature, chunk_size):
        b, d, h, w = q_emb.shape
        dtype = torch.promote_types(q_emb.dtype, torch.float32)
        q_flat = q_emb.reshape(b, d, h * w)
        total = torch.zeros((), dtype=dtype, device=q_emb.device)
        with torch.autocast(q_emb.device.type, enabled=False):
            cols = columns.to(dtype) / temperature  # N x D
            for img, lo, hi in _ChunkedTargetContrast._runs(index, h * w, b):
                kept = keep[img].nonzero().squeeze(1)
                cols_b, t_b = cols[kept], targets[img, kept].to(dtype)  # n_b x D, n_b
                v_b, t_sum = t_b @ cols_b, t_b.sum()  # D, scalar
                for start in range(lo, hi, chunk_size):
                    pix = index[start: min(start + chunk_size, hi)] % (h * w)
                    y = F.normalize(q_flat[img, :, pix].t().to(dtype), dim=1)  # c x D
                    nll = t_sum * torch.logsumexp(y @ cols_b.t(), dim=1) - y @ v_b  # c
                    total += class_weight[img].to(dtype) * nll.sum()
        ctx.save_for_backward(q_emb, index, columns, keep, targets, class_weight, weight_sum)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return total / weight_sum.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q_emb, index, columns, keep, targets, class_weight, weight_sum = ctx.saved_tensors
        need_q, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        b, d, h, w = q_emb.shape
        dtype = torch.promote_types(q_emb.dtype, torch.float32)
        q_flat = q_emb.reshape(b, d, h * w)
        grad_q = torch.zeros_like(q_flat) if need_q else None
        grad_cols = torch.zeros(columns.shape, dtype=dtype, device=columns.device) if need_cols else None
        scale = grad_out.to(dtype) / weight_sum.to(dtype)
        eps = 1e-12
        with torch.autocast(q_emb.device.type, enabled=False):
            cols = columns.to(dtype) / ctx.temperature
            for img, lo, hi in _ChunkedTargetContrast._runs(index, h * w, b):
                kept = keep[img].nonzero().squeeze(1)
                cols_b, t_b = cols[kept], targets[img, kept].to(dtype)
                t_sum, w_b = t_b.sum(), class_weight[img].to(dtype) * scale
                for start in range(lo, hi, ctx.chunk_size):
                    pix = index[start: min(start + ctx.chunk_size, hi)] % (h * w)
                    x = q_flat[img, :, pix].t().to(dtype)  # c x D
                    norm = x.norm(dim=1, keepdim=True)
                    y = x / norm.clamp_min(eps)
                    # d(loss)/d(logits) = w_b * (sum(t) * softmax - t) * grad_out / sum(w)
                    g = torch.softmax(y @ cols_b.t(), dim=1).mul_(t_sum).sub_(t_b).mul_(w_b)  # c x n_b
                    if need_cols:
                        grad_cols[kept] += g.t() @ y / ctx.temperature
                    if need_q:
                        gy = g @ cols_b
                        gx = torch.where(norm > eps, (gy - y * (y * gy).sum(1, keepdim=True)) / norm, gy / eps)
                        grad_q[img, :, pix] = gx.t().to(grad_q.dtype)
        grad_q = grad_q.reshape(q_emb.shape) if need_q else None
        grad_cols = grad_cols.to(columns.dtype) if need_cols else None
        return grad_q, None, grad_cols, None, None, None, None, None, None


def contrastive_loss_targets(
    q_emb: torch.Tensor, masks_q: torch.Tensor, prototypes: torch.Tensor, queue: torch.Tensor,
    temperature: float, keep: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``contrastive_loss_targets_naive``'s value and gradients, ``chunk_size`` anchors at a time.

    Args (beyond ``loss.contrastive_loss``'s): ``keep`` B x (B + K) bool and ``targets``
    B x (B + K) float from ``select_columns``; a target must sit on a kept column.
    """
    _check_shapes(q_emb, masks_q, prototypes, queue)
    b, n = q_emb.shape[0], prototypes.shape[0] + queue.shape[0]
    if tuple(keep.shape) != (b, n) or tuple(targets.shape) != (b, n):
        raise ValueError(f"keep and targets must be {(b, n)}, got {tuple(keep.shape)} and {tuple(targets.shape)}")
    if bool(((targets != 0) & ~keep).any()):
        raise ValueError("a target column is masked out: positives must be kept")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    hw = q_emb.shape[2] * q_emb.shape[3]
    index = _anchor_mask(masks_q, valid).reshape(-1).nonzero().squeeze(1)  # A
    if index.numel() == 0:
        return q_emb.sum().float() * 0.0
    dtype = torch.promote_types(q_emb.dtype, torch.float32)
    class_weight, weight_sum = _anchor_weights(index, b, hw, dtype)
    columns = torch.cat([prototypes.to(dtype), queue.to(dtype)], dim=0)
    return _ChunkedTargetContrast.apply(q_emb, index, columns, keep, targets, class_weight, weight_sum,
                                        float(temperature), int(chunk_size))
