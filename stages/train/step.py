"""One MaskContrast training step: query network + momentum key encoder + prototype queue.

The reference's ``ContrastiveModel.forward``: the query network gives an embedding and a saliency
logit for view q; under no_grad the key encoder is moved towards the query network (momentum m),
embeds view k, and each image's prototype is the normalised sum of its key embeddings over the
key mask; loss = pixel-to-prototype contrastive loss (anchors: query foreground pixels; positives:
own prototype; negatives: the batch's other prototypes and the queue) + balanced BCE of the
saliency logit against the query mask. After the optimiser step the (all-gathered) prototypes
enter the FIFO queue.

Shuffle-BN. The reference (MoCo's ``_batch_shuffle_ddp``) gathers the key images of all GPUs,
permutes them, gives each GPU a slice of the permutation and undoes it afterwards, so the key
encoder's BatchNorm statistics mix images of several GPUs. On one GPU that permutation stays
inside the single batch and changes nothing (BatchNorm statistics are permutation invariant):
the reference's single-device runs have no shuffle-BN. We do the same: with several processes the
key batch is shuffled across ranks (prototypes, not embeddings, are gathered back, B x D instead
of B x D x H x W); in one process there is no shuffle and no emulation by sub-batches, which
would give the key encoder different (noisier) BatchNorm statistics than the reference trained
with. The permutation comes from a generator the caller seeds with (seed, step), identical on all
ranks.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stages.common.prototypes import mask_prototypes, slot_prototypes
from stages.network.model import DEFAULT_ASPP_RATES, MaskContrastModel
from stages.network.runtime import normalize_images

from . import distributed as D
from .loss import PrototypeQueue, balanced_bce, contrastive_loss, proposal_contrastive_loss
from .neighbours import ColumnRule, contrastive_loss_targets, pooled_features, select_columns
from .params import TrainParams

REFERENCE_DROPOUT = 0.5
FREEZE_UPTO = "layer2"  # conv1, bn1, layer1, layer2: the reference's frozen part


def model_config(params: TrainParams) -> dict[str, Any]:
    """Everything ``checkpoint.build_model`` needs to rebuild the network of ``params``."""
    return {
        "backbone": params.backbone,
        "output_stride": params.output_stride,
        "embedding_dim": params.embedding_dim,
        "aspp_rates": list(DEFAULT_ASPP_RATES[params.output_stride]),
        "dropout": REFERENCE_DROPOUT,
        "freeze_upto": FREEZE_UPTO if params.freeze_early else None,
    }


def column_rule(params: TrainParams, epoch: int | None = None) -> ColumnRule | None:
    """The ``neighbours.ColumnRule`` of ``params.contrast`` in (1-based) ``epoch``; None: today's
    loss (every option off, or ``epoch`` within the warm-up). Without ``epoch``: the rule after it."""
    c = params.contrast
    rule = ColumnRule(fn_threshold=c.fn_threshold, fn_topk=c.fn_topk, nn_topk=c.nn_topk, nn_weight=c.nn_weight,
                      space=c.space, same_group=c.same_group, group_weight=c.group_weight)
    if not rule.active or (epoch is not None and epoch <= c.warmup_epochs):
        return None
    return rule


@dataclass
class InitSpace:
    """``space: init``: one fixed row per training image (``neighbours.initial_features``) and,
    with ``groups``, its near-duplicate group (``neighbours.near_duplicate_groups``), on the step's device."""

    features: torch.Tensor  # N x C unit rows (zero: no usable mask)
    groups: torch.Tensor | None = None  # N int64 (-1: none)

    def lookup(self, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows and groups of sample indices (int64; -1: no image, a zero row and group -1)."""
        known = samples >= 0
        idx = samples.clamp_min(0)
        rows = self.features[idx] * known[:, None].to(self.features.dtype)
        groups = None if self.groups is None else torch.where(known, self.groups[idx], torch.full_like(idx, -1))
        return rows, groups


@dataclass
class Encoders:
    """What one training step reads and changes.

    ``model``: the query network; ``forward``: what the step calls for the query view (the DDP
    wrapper of ``model``, or ``model`` itself); ``key``: the momentum encoder (no gradients);
    ``queue``: the prototype memory (None when K = 0); ``scaler``: GradScaler under fp16.
    """

    model: MaskContrastModel
    forward: nn.Module
    key: MaskContrastModel
    queue: PrototypeQueue | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    space_queue: PrototypeQueue | None = None  # key backbone features, row for row with ``queue``
    sample_queue: PrototypeQueue | None = None  # K x 1: the image of each ``queue`` row (-1: none)
    init_space: InitSpace | None = None  # ``space: init``; set by the trainer before the first step

    def __post_init__(self) -> None:
        pairs = [(q, k) for q, k in zip(self.model.parameters(), self.key.parameters()) if q.requires_grad]
        self._query_params = [q for q, _ in pairs]
        self._key_params = [k for _, k in pairs]

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """key <- m * key + (1 - m) * query, for the parameters the optimiser trains (frozen ones
        are equal in both and stay bit-identical)."""
        if self._key_params:
            torch._foreach_mul_(self._key_params, m)
            torch._foreach_add_(self._key_params, self._query_params, alpha=1.0 - m)


def build_encoders(model: MaskContrastModel, params: TrainParams, device: torch.device,
                   amp_dtype: torch.dtype | None = None) -> Encoders:
    """Query network (moved to ``device``, training mode), its momentum copy as key encoder (no
    gradients; frozen stages stay frozen, dropout active as in the reference), the queue, SGD over
    the parameters that require grad, and a GradScaler under fp16."""
    model.to(device, memory_format=torch.channels_last).train()  # see normalize_images
    key = copy.deepcopy(model)
    for parameter in key.parameters():
        parameter.requires_grad_(False)
    queue = PrototypeQueue(params.queue_size, params.embedding_dim).to(device) if params.queue_size else None
    optimizer = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=params.lr,
                                momentum=params.momentum, weight_decay=params.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    space_queue = None
    if params.contrast.space == "backbone" and column_rule(params) is not None and params.queue_size:
        channels = model.decoder[0].convs[0][0].in_channels  # the backbone's output channels
        space_queue = PrototypeQueue(params.queue_size, channels).to(device)
    sample_queue = None
    if params.contrast.space == "init" and column_rule(params) is not None and params.queue_size:
        sample_queue = PrototypeQueue(params.queue_size, 1).to(device)
    return Encoders(model, model, key, queue, optimizer, scaler, space_queue, sample_queue)


@torch.no_grad()
def key_prototypes(
    key: MaskContrastModel, k_img: torch.Tensor, k_mask: torch.Tensor,
    shuffle: torch.Generator | None = None, space: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Prototypes of the key view: ``(local B x D, local valid B, global world*B x D)``.

    With several processes and a ``shuffle`` generator the key batch is shuffled across ranks
    (shuffle-BN, see the module docstring); the returned prototypes are in the original order.
    ``k_img``: uint8 B x 3 x H x W (normalised here, after any gathering: 4x fewer bytes sent);
    ``k_mask``: bool B x H x W. With ``space`` also ``(local B x C, global world*B x C)``: the
    key backbone's features pooled over the masks (``neighbours.pooled_features``), zero rows for
    invalid prototypes, in the same order as the prototypes.
    """
    grids: list[torch.Tensor] = []
    hook = key.backbone.register_forward_hook(lambda _m, _i, out: grids.append(out)) if space else None
    try:
        found = _key_prototypes(key, k_img, k_mask, shuffle)
    finally:
        if hook is not None:
            hook.remove()
    if not space:
        return found[:3]
    protos, valid, all_protos, masks = found[:4]
    pooled = pooled_features(grids[0], masks)  # rows of the images this rank embedded
    if D.is_dist() and shuffle is not None:  # back to the original order, as the prototypes
        b, rank = k_img.shape[0], D.get_rank()
        pooled = D.all_gather_tensor(pooled)[found[4]][rank * b: (rank + 1) * b]
    pooled = pooled * valid[:, None].to(pooled.dtype)  # valid: this rank's images, original order
    return protos, valid, all_protos, pooled, D.all_gather_tensor(pooled)


def _key_prototypes(key, k_img, k_mask, shuffle):
    """``key_prototypes`` plus the masks in the order the key embedded them (and the unshuffle)."""
    if not D.is_dist() or shuffle is None:
        emb = F.normalize(key(normalize_images(k_img))[0].float(), dim=1)  # B x D x H x W
        protos, valid = mask_prototypes(emb, k_mask)
        return protos, valid, D.all_gather_tensor(protos), k_mask
    b, rank = k_img.shape[0], D.get_rank()
    images = D.all_gather_tensor(k_img)  # world*B x 3 x H x W
    masks = D.all_gather_tensor(k_mask.to(torch.uint8)).bool()  # gloo cannot gather bool
    perm = torch.randperm(images.shape[0], generator=shuffle).to(images.device)  # same on every rank
    mine = perm[rank * b: (rank + 1) * b]
    emb = F.normalize(key(normalize_images(images[mine]))[0].float(), dim=1)
    protos, valid = mask_prototypes(emb, masks[mine])
    unshuffle = torch.argsort(perm)
    all_protos = D.all_gather_tensor(protos)[unshuffle]  # world*B x D, original order
    all_valid = D.all_gather_tensor(valid.to(torch.uint8))[unshuffle].bool()
    return (all_protos[rank * b: (rank + 1) * b], all_valid[rank * b: (rank + 1) * b], all_protos,
            masks[mine], unshuffle)


def proposal_columns(slots: torch.Tensor, slot_valid: torch.Tensor,
                     counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss's columns from per-slot prototypes: ``(P x D prototypes, valid P, column_of B x L)``.

    ``slots``: B x L x D, ``slot_valid``: B x L, ``counts``: B proposals of each image (slots
    ``0..counts[b] - 1`` exist). Columns follow (image, slot) order; ``column_of`` is -1 for
    slots that do not exist."""
    b, n_slots = slot_valid.shape
    exists = torch.arange(n_slots, device=counts.device)[None, :] < counts[:, None]  # B x L
    column_of = torch.where(exists, exists.reshape(-1).long().cumsum(0).view(b, n_slots) - 1,
                            torch.full_like(exists, -1, dtype=torch.long))
    return slots[exists], slot_valid[exists], column_of


def proposal_counts(labels: torch.Tensor, n_slots: int) -> torch.Tensor:
    """B: proposals per image of label maps numbered 1..n (labels above ``n_slots`` are none)."""
    lab = labels.reshape(labels.shape[0], -1).long()
    return torch.where(lab <= n_slots, lab, torch.zeros_like(lab)).amax(1)


@torch.no_grad()
def key_proposal_prototypes(
    key: MaskContrastModel, k_img: torch.Tensor, k_labels: torch.Tensor, n_slots: int,
    shuffle: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`key_prototypes` with several proposals per image: ``(local P x D, local valid P,
    column_of B x L, global P_all x D)``, one prototype per proposal of the key view's label map
    ``k_labels`` (uint8 B x H x W, 1..n per image, see ``data``). Ranks exchange fixed-size
    B x ``n_slots`` slot tensors, so their proposal counts may differ."""
    counts = proposal_counts(k_labels, n_slots)  # B
    if not D.is_dist() or shuffle is None:
        emb = F.normalize(key(normalize_images(k_img))[0].float(), dim=1)  # B x D x H x W
        slots, slot_valid = slot_prototypes(emb, k_labels, n_slots)  # B x L x D, B x L
        all_slots, all_valid = D.all_gather_tensor(slots), D.all_gather_tensor(slot_valid.to(torch.uint8)).bool()
    else:
        b, rank = k_img.shape[0], D.get_rank()
        images = D.all_gather_tensor(k_img)
        labels = D.all_gather_tensor(k_labels)
        perm = torch.randperm(images.shape[0], generator=shuffle).to(images.device)
        mine = perm[rank * b: (rank + 1) * b]
        emb = F.normalize(key(normalize_images(images[mine]))[0].float(), dim=1)
        slots, slot_valid = slot_prototypes(emb, labels[mine], n_slots)
        unshuffle = torch.argsort(perm)
        all_slots = D.all_gather_tensor(slots)[unshuffle]
        all_valid = D.all_gather_tensor(slot_valid.to(torch.uint8))[unshuffle].bool()
        slots, slot_valid = all_slots[rank * b: (rank + 1) * b], all_valid[rank * b: (rank + 1) * b]
    all_counts = D.all_gather_tensor(counts)
    protos, valid, column_of = proposal_columns(slots, slot_valid, counts)
    all_protos, _, _ = proposal_columns(all_slots, all_valid, all_counts)
    return protos, valid, column_of, all_protos


def train_step(
    enc: Encoders, q_img: torch.Tensor, q_mask: torch.Tensor, k_img: torch.Tensor, k_mask: torch.Tensor,
    *, temperature: float, key_momentum: float, amp_dtype: torch.dtype | None = None,
    shuffle: torch.Generator | None = None, contrastive_fn: Callable[..., torch.Tensor] = contrastive_loss,
    n_slots: int = 1, rule: ColumnRule | None = None, sample: torch.Tensor | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch; returns detached float32 ``[loss, contrastive, saliency]``.

    ``q_img``/``k_img``: uint8 B x 3 x H x W on the model's device; ``q_mask``/``k_mask``: bool
    B x H x W (one mask per image, the loss ``contrastive_fn``), or uint8 label maps of up to
    ``n_slots`` proposals per image (``data``; :func:`proposal_contrastive_loss`, one prototype
    per proposal, the saliency target their union with the foreground of no proposal). The queue
    is read before and written after the optimiser step; with proposals it takes all of the
    step's proposals (``PrototypeQueue.enqueue(any_count=True)``). ``rule`` (not None, one mask
    per image): the columns and positives of each image's anchors (``neighbours``) instead of
    ``contrastive_fn``. ``sample``: int64 B, the image of each row (``data``'s item), which
    ``space: init`` needs (``enc.init_space``); the queue then keeps them beside its rows.
    """
    proposals = q_mask.dtype != torch.bool
    if proposals and (rule is not None or enc.space_queue is not None or enc.sample_queue is not None):
        raise ValueError("train.contrast needs one mask per image; it is not implemented for proposals")
    if (enc.sample_queue is not None or (rule is not None and rule.space == "init")) and (
            enc.init_space is None or sample is None):
        raise ValueError("train.contrast.space: init needs enc.init_space and the batch's sample indices")
    q_in = normalize_images(q_img)
    device_type = q_in.device.type
    mine = None  # space: init: the image of each of this rank's prototypes (-1: an invalid one)
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        q_emb, q_sal = enc.forward(q_in)  # B x D x H x W, B x 1 x H x W
        with torch.no_grad():
            enc.momentum_update(key_momentum)
            if proposals:
                protos, valid, column_of, all_protos = key_proposal_prototypes(enc.key, k_img, k_mask, n_slots,
                                                                               shuffle)
            else:
                space = (rule is not None and rule.space == "backbone") or enc.space_queue is not None
                protos, valid, all_protos, *pooled = key_prototypes(enc.key, k_img, k_mask, shuffle, space=space)
                if sample is not None:
                    sample = sample.to(valid.device)
                    mine = torch.where(valid, sample, torch.full_like(sample, -1))
        if enc.queue is not None:
            negatives = enc.queue.negatives()  # filled x D
        else:
            negatives = protos.new_zeros((0, protos.shape[1]))
        if proposals:
            loss_c = proposal_contrastive_loss(q_emb, q_mask, column_of, protos, negatives, temperature, valid)
            loss_s = balanced_bce(q_sal, q_mask > 0)
        elif rule is None:
            loss_c = contrastive_fn(q_emb, q_mask, protos, negatives, temperature, valid)
            loss_s = balanced_bce(q_sal, q_mask)
        else:
            memory = groups = None
            if rule.space == "backbone":
                memory = (pooled[0], enc.space_queue.negatives() if enc.space_queue is not None
                          else pooled[0].new_zeros((0, pooled[0].shape[1])))
            elif rule.space == "init":
                theirs = (enc.sample_queue.negatives()[:, 0].round().long() if enc.sample_queue is not None
                          else mine.new_zeros(0))
                (rows, own_groups), (q_rows, q_groups) = enc.init_space.lookup(mine), enc.init_space.lookup(theirs)
                memory = (rows, q_rows)
                if own_groups is not None:
                    groups = (own_groups, q_groups)
            keep, targets = select_columns(protos, negatives, rule, space=memory, groups=groups)
            loss_c = contrastive_loss_targets(q_emb, q_mask, protos, negatives, temperature, keep, targets, valid)
            loss_s = balanced_bce(q_sal, q_mask)
    loss = loss_c.float() + loss_s.float()
    enc.optimizer.zero_grad(set_to_none=True)
    if enc.scaler is not None:
        enc.scaler.scale(loss).backward()
        enc.scaler.step(enc.optimizer)
        enc.scaler.update()
    else:
        loss.backward()
        enc.optimizer.step()
    if enc.queue is not None:
        enc.queue.enqueue(all_protos, any_count=proposals)
    if enc.space_queue is not None:  # also during a warm-up: row for row with the prototype queue
        enc.space_queue.enqueue(pooled[1])
    if enc.sample_queue is not None:  # likewise; invalid prototypes (zero rows) are no image
        enc.sample_queue.enqueue(D.all_gather_tensor(mine.float()[:, None]))
    return torch.stack([loss.detach(), loss_c.detach().float(), loss_s.detach().float()])
