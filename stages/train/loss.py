"""MaskContrast losses: the prototype queue, the pixel-to-prototype contrastive loss (a
straightforward reference version and a chunked, memory-bounded one) and balanced BCE. The key
prototypes come from :func:`stages.common.prototypes.mask_prototypes`.

Conventions: ``q_emb`` is the query network's raw embedding (B x D x H x W, normalised here per
pixel); ``masks`` are B x H x W (bool, or float where > 0.5 is foreground for anchors);
``prototypes`` are B x D and ``queue`` K x D, both unit rows (or zero rows, see below).
With several proposals per image (:func:`proposal_contrastive_loss`) the query view carries
integer label maps (proposal l of an image is label l), ``prototypes`` are P x D, one per
proposal of the batch, and ``column_of`` (B x L) maps each image's proposal to its row;
:func:`contrastive_loss` is the case of one proposal per image.

Empty masks: an image whose key mask is empty (or whose summed key embeddings cancel) gets a zero
prototype and ``valid = False``. The loss then drops that image's query anchors (they have no
positive); its zero prototype stays a column: logit 0 for every anchor, no gradient to the
anchors. Enqueued, it is a zero negative of the same kind. The training data keeps views whose
foreground fraction lies in (0.01, 0.99), so this is a defined edge case, not a regime.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHUNK_SIZE = 8192  # anchors per block: 8192 x (B + K) float32 logits, 4.5 MiB at B+K=136


def _foreground(masks: torch.Tensor) -> torch.Tensor:
    """Bool foreground of a bool / 0-1 mask (float masks: > 0.5)."""
    return masks if masks.dtype == torch.bool else masks > 0.5


def _check_shapes(
    q_emb: torch.Tensor, masks_q: torch.Tensor, prototypes: torch.Tensor, queue: torch.Tensor
) -> None:
    if q_emb.dim() != 4:
        raise ValueError(f"q_emb must be B x D x H x W, got shape {tuple(q_emb.shape)}")
    b, d, h, w = q_emb.shape
    if tuple(masks_q.shape) != (b, h, w):
        raise ValueError(f"masks_q must be {(b, h, w)} to match q_emb, got {tuple(masks_q.shape)}")
    if tuple(prototypes.shape) != (b, d):
        raise ValueError(f"prototypes must be {(b, d)} (one per image), got {tuple(prototypes.shape)}")
    if queue.dim() != 2 or queue.shape[1] != d:
        raise ValueError(f"queue must be K x {d}, got shape {tuple(queue.shape)}")


def _anchor_mask(masks_q: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """B x H x W bool: query foreground pixels of images whose prototype is valid."""
    fg = _foreground(masks_q)
    if valid is not None:
        fg = fg & valid.to(device=fg.device, dtype=torch.bool).view(-1, 1, 1)
    return fg


class PrototypeQueue(nn.Module):
    """FIFO memory of the K most recent prototypes, the loss's extra negatives (MoCo's queue).

    State (registered buffers, so it follows ``.to()`` and checkpoints): ``queue`` K x D, ``ptr``
    (next row to write) and ``filled`` (rows written so far, at most K). Unlike the reference,
    which starts from random unit vectors, the queue starts empty and ``negatives()`` returns only
    the written rows: random directions are not negatives of anything, and a count keeps the first
    steps exact and resumable. With K = 2 x batch the two differ for the first two steps only.

    Args:
        size: K, number of stored prototypes; every enqueued batch must divide it.
        dim: D, prototype dimension.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.size = size
        self.dim = dim
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}"

    def negatives(self) -> torch.Tensor:
        """A copy of the filled rows in storage order, filled x D (later enqueues must not alter it)."""
        return self.queue[: int(self.filled)].clone()

    @torch.no_grad()
    def enqueue(self, prototypes: torch.Tensor, any_count: bool = False) -> None:
        """Write a batch of prototypes (n x D) over the oldest rows; K must be a multiple of n.

        ``any_count``: the rule with several proposals per image, whose number varies from step
        to step: any n is written (the last K of them when n > K), wrapping around the ring, so
        the queue holds the K most recent proposals."""
        if prototypes.dim() != 2 or prototypes.shape[1] != self.dim:
            raise ValueError(f"prototypes must be n x {self.dim}, got shape {tuple(prototypes.shape)}")
        if any_count:
            prototypes = prototypes[-self.size:]
            if prototypes.shape[0] == 0:
                return
        n = prototypes.shape[0]
        if not any_count and (n == 0 or self.size % n != 0):
            raise ValueError(
                f"queue size {self.size} is not a multiple of the batch of {n} prototypes it received;"
                " choose K as a multiple of the (global) batch size"
            )
        rows = (self.ptr + torch.arange(n, device=self.queue.device)) % self.size  # n
        self.queue[rows] = prototypes.detach().to(self.queue.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))


def contrastive_loss_naive(
    q_emb: torch.Tensor,
    masks_q: torch.Tensor,
    prototypes: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference loss, materialising the full anchors x (B + K) logit matrix.

    Anchors are the query foreground pixels (L2-normalised), logits [anchor . prototypes,
    anchor . queue] / temperature, target the own image's prototype; cross-entropy with class
    weights w_c = 1 / ln(1.02 + share of anchors with target c), averaged with those weights.
    Anchors of images with ``valid`` False are dropped. Zero anchors give a zero loss.
    """
    _check_shapes(q_emb, masks_q, prototypes, queue)
    b, d, h, w = q_emb.shape
    anchor_mask = _anchor_mask(masks_q, valid)  # B x H x W
    q = F.normalize(q_emb, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # BHW x D
    anchors = q[anchor_mask.reshape(-1)]  # A x D
    target = torch.arange(b, device=q_emb.device).view(b, 1, 1).expand(b, h, w)[anchor_mask]  # A
    if target.numel() == 0:
        return q_emb.sum() * 0.0
    l_batch = anchors @ prototypes.to(anchors.dtype).t()  # A x B
    l_mem = anchors @ queue.to(anchors.dtype).t()  # A x K
    logits = torch.cat([l_batch, l_mem], dim=1) / temperature  # A x (B + K)
    share = torch.bincount(target, minlength=logits.shape[1]).to(logits.dtype) / target.numel()
    class_weight = 1.0 / torch.log(1.02 + share)  # B + K
    return F.cross_entropy(logits, target, weight=class_weight)


class _ChunkedPixelContrast(torch.autograd.Function):
    """Weighted pixel-to-prototype cross-entropy, evaluated block by block of anchors.

    Forward keeps only a running sum; backward recomputes each block's softmax. Saved: the inputs
    (q_emb, anchor indices, columns, class weights). Peak extra memory: one block of logits
    (chunk x N) and its few temporaries, plus the gradient of q_emb itself.
    """

    @staticmethod
    def forward(
        ctx,
        q_emb: torch.Tensor,  # B x D x H x W, raw
        index: torch.Tensor,  # A, flat anchor positions b * HW + p
        target: torch.Tensor,  # A, the column of each anchor's own prototype
        columns: torch.Tensor,  # N x D, [prototypes; queue]
        class_weight: torch.Tensor,  # P, weight of an anchor by its target column
        weight_sum: torch.Tensor,  # scalar, sum of the anchors' weights
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        b, d, h, w = q_emb.shape
        dtype = torch.promote_types(q_emb.dtype, torch.float32)
        q_flat = q_emb.reshape(b, d, h * w)
        total = torch.zeros((), dtype=dtype, device=q_emb.device)
        with torch.autocast(q_emb.device.type, enabled=False):
            cols = columns.to(dtype) / temperature  # N x D
            for start in range(0, index.numel(), chunk_size):
                idx = index[start : start + chunk_size]
                tgt = target[start : start + chunk_size]
                img, pix = idx // (h * w), idx % (h * w)
                y = F.normalize(q_flat[img, :, pix].to(dtype), dim=1)  # c x D
                logits = y @ cols.t()  # c x N
                nll = torch.logsumexp(logits, dim=1) - logits.gather(1, tgt[:, None]).squeeze(1)
                total += (class_weight[tgt].to(dtype) * nll).sum()
        ctx.save_for_backward(q_emb, index, target, columns, class_weight, weight_sum)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return total / weight_sum.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        q_emb, index, target, columns, class_weight, weight_sum = ctx.saved_tensors
        need_q, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        b, d, h, w = q_emb.shape
        dtype = torch.promote_types(q_emb.dtype, torch.float32)
        q_flat = q_emb.reshape(b, d, h * w)
        grad_q = torch.zeros_like(q_flat) if need_q else None  # B x D x HW
        grad_cols = torch.zeros(columns.shape, dtype=dtype, device=columns.device) if need_cols else None
        scale = grad_out.to(dtype) / weight_sum.to(dtype)
        eps = 1e-12  # F.normalize's
        with torch.autocast(q_emb.device.type, enabled=False):
            cols = columns.to(dtype) / ctx.temperature  # N x D
            for start in range(0, index.numel(), ctx.chunk_size):
                idx = index[start : start + ctx.chunk_size]
                tgt = target[start : start + ctx.chunk_size]
                img, pix = idx // (h * w), idx % (h * w)
                x = q_flat[img, :, pix].to(dtype)  # c x D
                norm = x.norm(dim=1, keepdim=True)  # c x 1
                y = x / norm.clamp_min(eps)
                # d(loss)/d(logits) = w_tgt * (softmax - onehot(tgt)) * grad_out / sum(w)
                g = y @ cols.t()  # c x N logits, turned into the softmax in place (one block)
                g.sub_(g.amax(dim=1, keepdim=True)).exp_()
                g.div_(g.sum(dim=1, keepdim=True))
                g[torch.arange(idx.numel(), device=g.device), tgt] -= 1.0
                g *= (class_weight[tgt].to(dtype) * scale)[:, None]
                if need_cols:
                    grad_cols += g.t() @ y / ctx.temperature
                if need_q:
                    gy = g @ cols  # c x D
                    gx = torch.where(
                        norm > eps, (gy - y * (y * gy).sum(1, keepdim=True)) / norm, gy / eps
                    )
                    grad_q[img, :, pix] = gx.to(grad_q.dtype)
        grad_q = grad_q.reshape(q_emb.shape) if need_q else None
        grad_cols = grad_cols.to(columns.dtype) if need_cols else None
        return grad_q, None, None, grad_cols, None, None, None, None


def contrastive_loss(
    q_emb: torch.Tensor,
    masks_q: torch.Tensor,
    prototypes: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``contrastive_loss_naive``'s value and gradients without the anchors x (B + K) matrix.

    Anchors are processed ``chunk_size`` at a time inside one autograd Function; normalisation
    and gathering of the anchors happen per block too, so the extra memory is one block plus the
    gradient of ``q_emb``. Computed in float32 (or float64 for float64 inputs), autocast off, so
    it is safe under mixed precision; the gradient comes back in ``q_emb``'s dtype. Gradients
    reach ``prototypes`` / ``queue`` only if they require grad (they normally do not).
    It is :func:`proposal_contrastive_loss` with one proposal per image, the image's mask.

    Args:
        q_emb: B x D x H x W raw query embedding.
        masks_q: B x H x W query masks; anchors are their foreground pixels.
        prototypes: B x D key prototypes (``stages.common.prototypes.mask_prototypes``), the positives.
        queue: K x D earlier prototypes (``PrototypeQueue.negatives()``), K may be 0.
        temperature: tau, logits are cosine / tau.
        valid: B bool from ``mask_prototypes``; anchors of invalid images are dropped.
        chunk_size: anchors per block.
    Returns:
        scalar loss (float32 or float64); zero, still attached to ``q_emb``, without anchors.
    """
    _check_shapes(q_emb, masks_q, prototypes, queue)
    b = q_emb.shape[0]
    labels = _foreground(masks_q).to(torch.uint8)  # B x H x W: the mask is proposal 1
    column_of = torch.arange(b, device=q_emb.device).view(b, 1)  # image i's proposal is column i
    return proposal_contrastive_loss(q_emb, labels, column_of, prototypes, queue, temperature, valid, chunk_size)


def _check_proposals(q_emb: torch.Tensor, labels_q: torch.Tensor, column_of: torch.Tensor,
                     prototypes: torch.Tensor, queue: torch.Tensor) -> None:
    if q_emb.dim() != 4:
        raise ValueError(f"q_emb must be B x D x H x W, got shape {tuple(q_emb.shape)}")
    b, d, h, w = q_emb.shape
    if tuple(labels_q.shape) != (b, h, w) or labels_q.dtype.is_floating_point or labels_q.dtype == torch.bool:
        raise ValueError(f"labels_q must be integer {(b, h, w)} to match q_emb, got {labels_q.dtype} "
                         f"{tuple(labels_q.shape)}")
    if column_of.dim() != 2 or column_of.shape[0] != b:
        raise ValueError(f"column_of must be {b} x L (a column per image and proposal slot), "
                         f"got shape {tuple(column_of.shape)}")
    if prototypes.dim() != 2 or prototypes.shape[1] != d:
        raise ValueError(f"prototypes must be P x {d} (one per proposal), got shape {tuple(prototypes.shape)}")
    if column_of.numel() and int(column_of.max()) >= prototypes.shape[0]:
        raise ValueError(f"column_of names a column beyond the {prototypes.shape[0]} prototypes")
    if queue.dim() != 2 or queue.shape[1] != d:
        raise ValueError(f"queue must be K x {d}, got shape {tuple(queue.shape)}")


def _proposal_anchors(labels_q: torch.Tensor, column_of: torch.Tensor,
                      valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat anchor positions b * HW + p, A; their target columns, A): the pixels whose label
    l in 1..L names a slot with a column (``column_of[b, l - 1] >= 0``) whose prototype is valid."""
    b, n_slots = column_of.shape
    hw = labels_q.shape[1] * labels_q.shape[2]
    lab = labels_q.reshape(-1).long()  # BHW
    in_slot = (lab >= 1) & (lab <= n_slots)
    index = in_slot.nonzero().squeeze(1)  # candidate anchors, in pixel order
    target = column_of.to(index.device)[index // hw, lab[index] - 1]  # A
    keep = target >= 0
    if valid is not None:
        keep &= valid.to(device=index.device, dtype=torch.bool)[target.clamp_min(0)]
    return index[keep], target[keep]


def proposal_contrastive_loss(
    q_emb: torch.Tensor,
    labels_q: torch.Tensor,
    column_of: torch.Tensor,
    prototypes: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """The pixel-to-prototype loss with several proposals per image, each its own prototype.

    Anchors are the query pixels of each proposal; an anchor's positive is its proposal's
    prototype, its negatives every other column: the batch's other proposals (of other images
    and of its own image) and the queue. The pixel-balancing class weights are per proposal:
    w_p = 1 / ln(1.02 + share of anchors in proposal p), the loss their weighted mean.
    With one proposal per image (``column_of`` = image index) this is :func:`contrastive_loss`,
    in value and gradients, to the bit.

    Args:
        q_emb: B x D x H x W raw query embedding.
        labels_q: B x H x W integer proposal labels: l in 1..L is slot l - 1 of its image; 0 and
            labels above L (e.g. 255: foreground of no proposal) are not anchors.
        column_of: B x L long, the row of ``prototypes`` of each image's slot, -1 for no proposal.
        prototypes: P x D key prototypes of the batch's proposals (the positives).
        queue: K x D earlier prototypes, K may be 0.
        temperature: tau, logits are cosine / tau.
        valid: P bool; anchors of invalid prototypes are dropped (their columns stay).
        chunk_size: anchors per block.
    Returns:
        scalar loss (float32 or float64); zero, still attached to ``q_emb``, without anchors.
    """
    _check_proposals(q_emb, labels_q, column_of, prototypes, queue)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of anchors, got {chunk_size}")
    index, target = _proposal_anchors(labels_q, column_of, valid)  # A, A
    if index.numel() == 0:
        return q_emb.sum().float() * 0.0
    dtype = torch.promote_types(q_emb.dtype, torch.float32)
    counts = torch.bincount(target, minlength=prototypes.shape[0]).to(dtype)  # P
    class_weight = 1.0 / torch.log(1.02 + counts / index.numel())  # P
    weight_sum = (class_weight * counts).sum()
    columns = torch.cat([prototypes.to(dtype), queue.to(dtype)], dim=0)  # (P + K) x D
    return _ChunkedPixelContrast.apply(
        q_emb, index, target, columns, class_weight, weight_sum, float(temperature), int(chunk_size)
    )


def proposal_contrastive_loss_naive(
    q_emb: torch.Tensor,
    labels_q: torch.Tensor,
    column_of: torch.Tensor,
    prototypes: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The reference of :func:`proposal_contrastive_loss`, written per anchor with the full
    anchors x (P + K) logit matrix and ``F.cross_entropy``'s class weights."""
    _check_proposals(q_emb, labels_q, column_of, prototypes, queue)
    b, d, h, w = q_emb.shape
    q = F.normalize(q_emb, dim=1).permute(0, 2, 3, 1).reshape(-1, d)  # BHW x D
    rows, targets = [], []
    for i in range(b):
        for slot in range(column_of.shape[1]):
            col = int(column_of[i, slot])
            if col < 0 or (valid is not None and not bool(valid[col])):
                continue
            pix = (labels_q[i].reshape(-1) == slot + 1).nonzero().squeeze(1)
            rows.append(i * h * w + pix)
            targets.append(torch.full_like(pix, col))
    index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
    if index.numel() == 0:
        return q_emb.sum() * 0.0
    target = torch.cat(targets)
    anchors = q[index]  # A x D
    logits = torch.cat([anchors @ prototypes.to(anchors.dtype).t(), anchors @ queue.to(anchors.dtype).t()],
                       dim=1) / temperature  # A x (P + K)
    share = torch.bincount(target, minlength=logits.shape[1]).to(logits.dtype) / target.numel()
    return F.cross_entropy(logits, target, weight=1.0 / torch.log(1.02 + share))


def balanced_bce(sal_logit: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Class-balanced BCE of the saliency logit against the (query) masks, as the reference.

    Positive pixels are weighted by the batch's background fraction, negative pixels by its
    foreground fraction; the weighted sum is divided by the number of pixels. Float32.

    Args:
        sal_logit: B x 1 x H x W saliency logits.
        masks: B x H x W, bool or 0/1 float.
    """
    if sal_logit.dim() != 4 or sal_logit.shape[1] != 1:
        raise ValueError(f"sal_logit must be B x 1 x H x W, got shape {tuple(sal_logit.shape)}")
    if tuple(masks.shape) != (sal_logit.shape[0], *sal_logit.shape[2:]):
        raise ValueError(
            f"masks must be {(sal_logit.shape[0], *sal_logit.shape[2:])} to match sal_logit,"
            f" got {tuple(masks.shape)}"
        )
    x = sal_logit.squeeze(1).float()  # B x H x W
    y = masks.to(x.dtype)
    w_pos = (1.0 - y).sum() / y.numel()  # background fraction
    bce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    return (w_pos * (y * bce).sum() + (1.0 - w_pos) * ((1.0 - y) * bce).sum()) / y.numel()
