"""The MaskContrast training stage: query network + momentum key encoder + prototype queue.

One step (the reference's ``ContrastiveModel.forward`` + ``train``): the query network gives an
embedding and a saliency logit for view q; under no_grad the key encoder is moved towards the
query network (momentum m), embeds view k, and each image's prototype is the normalised sum of
its key embeddings over the key mask; loss = pixel-to-prototype contrastive loss (anchors: query
foreground pixels; positives: own prototype; negatives: the batch's other prototypes and the
queue) + balanced BCE of the saliency logit against the query mask. After the optimiser step the
(all-gathered) prototypes enter the FIFO queue. SGD, poly learning rate per epoch.

Shuffle-BN. The reference (MoCo's ``_batch_shuffle_ddp``) gathers the key images of all GPUs,
permutes them, gives each GPU a slice of the permutation and undoes it afterwards, so the key
encoder's BatchNorm statistics mix images of several GPUs. On one GPU that permutation stays
inside the single batch and changes nothing (BatchNorm statistics are permutation invariant):
the reference's single-device runs have no shuffle-BN. We do the same: with several processes the
key batch is shuffled across ranks (prototypes, not embeddings, are gathered back, B x D instead
of B x D x H x W); in one process there is no shuffle and no emulation by sub-batches, which
would give the key encoder different (noisier) BatchNorm statistics than the reference trained
with. The permutation comes from a generator seeded with (seed, step), identical on all ranks.

Determinism. Data augmentation and order are pure functions of (seed, epoch, index) (see
``data``), the loader has its own generator, and the RNG states of every rank (dropout draws) are
checkpointed with the weights, the optimiser and the queue; a resumed run therefore ends with the
weights of an uninterrupted one, bit for bit, on the CPU. On CUDA the same holds up to the
run-to-run nondeterminism of some kernels (atomics in bilinear upsampling's backward, cuDNN
algorithm choice), which differs between two uninterrupted runs as well.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from artifacts.checkpoints import (
    LOG_FILE,
    LOSS_CURVE_FILE,
    MODEL_FILE,
    append_jsonl,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_jsonl,
    truncate_lines,
)
from artifacts.masks import MaskStore
from stages.bookkeeping import BOOKKEEPING
from stages.common.prototypes import mask_prototypes, slot_prototypes
from stages.common.weights import resolve_init
from stages.data import Sample
from stages.network.init import load_init
from stages.network.model import DEFAULT_ASPP_RATES, MaskContrastModel
from stages.network.runtime import amp_name, normalize_images, resolve_amp, resolve_device
from stages.params import to_plain

from . import distributed as D
from .checkpoint import (
    CheckpointError,
    build_model,
    capture_rng_state,
    cpu_state_dict,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    save_model_file,
)
from .data import (
    STAT_NAMES,
    EpochBatchSampler,
    TrainDataError,
    TwoViewDataset,
    ViewAugment,
    check_batch,
    derive_seed,
    make_loader,
)
from .loss import PrototypeQueue, balanced_bce, contrastive_loss, proposal_contrastive_loss
from .neighbours import ColumnRule, contrastive_loss_targets, pooled_features, select_columns
from .params import AugmentParams, ContrastParams, TrainParams

REFERENCE_DROPOUT = 0.5
FREEZE_UPTO = "layer2"  # conv1, bn1, layer1, layer2: the reference's frozen part
LR_POWER = 0.9
# Parameters that do not change the result (``stages.bookkeeping``): a checkpoint written under
# other values resumes. (``init`` is compared by the file's sha256, not its path.)
VOLATILE_PARAMS = tuple(sorted(BOOKKEEPING["train"]))
_TORCH_STREAM, _SHUFFLE_STREAM = 11, 12  # derive_seed stream tags


def column_rule(params: TrainParams, epoch: int | None = None) -> ColumnRule | None:
    """The ``neighbours.ColumnRule`` of ``params.contrast`` in (1-based) ``epoch``; None: today's
    loss (every option off, or ``epoch`` within the warm-up). Without ``epoch``: the rule after it."""
    c = params.contrast
    rule = ColumnRule(fn_threshold=c.fn_threshold, fn_topk=c.fn_topk, nn_topk=c.nn_topk, nn_weight=c.nn_weight,
                      space=c.space)
    if not rule.active or (epoch is not None and epoch <= c.warmup_epochs):
        return None
    return rule


def view_augment(params: TrainParams) -> ViewAugment:
    """The per-view augmentation of ``params`` (``augment`` names ``scale`` ``crop_scale``)."""
    a = params.augment
    return ViewAugment(crop_size=params.crop_size, scale=tuple(a.crop_scale), jitter=tuple(a.jitter),
                       jitter_p=a.jitter_p, gray_p=a.gray_p, flip_p=a.flip_p)


class TrainingDiverged(RuntimeError):
    """A non-finite loss: training stopped before any of it reached a checkpoint."""

    def __init__(self, epoch: int, step: int, losses: dict[str, float], checkpoint: Path | None) -> None:
        self.epoch, self.step, self.losses, self.checkpoint = epoch, step, losses, checkpoint
        where = (f"last good checkpoint: {checkpoint}" if checkpoint is not None
                 else "no checkpoint yet (no epoch finished): rerunning starts from the beginning")
        values = ", ".join(f"{k}={v}" for k, v in losses.items())
        super().__init__(f"training diverged: non-finite loss ({values}) at epoch {epoch}, step {step}; "
                         f"{where}. Lower the learning rate, or try amp='off'.")


# --------------------------------------------------------------------------- pure helpers


def poly_lr(base: float, epoch: int, epochs: int, power: float = LR_POWER) -> float:
    """Learning rate of (1-based) ``epoch``: ``base * (1 - (epoch - 1) / epochs) ** power``,
    the reference's ``adjust_learning_rate`` with its 0-based epoch."""
    return base * (1.0 - (epoch - 1) / epochs) ** power


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


def samples_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 of the ordered sample ids: a resumed run must see the same list."""
    return hashlib.sha256("\n".join(s.id for s in samples).encode()).hexdigest()


# --------------------------------------------------------------------------- the step


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
    return Encoders(model, model, key, queue, optimizer, scaler, space_queue)


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
    n_slots: int = 1, rule: ColumnRule | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch; returns detached float32 ``[loss, contrastive, saliency]``.

    ``q_img``/``k_img``: uint8 B x 3 x H x W on the model's device; ``q_mask``/``k_mask``: bool
    B x H x W (one mask per image, the loss ``contrastive_fn``), or uint8 label maps of up to
    ``n_slots`` proposals per image (``data``; :func:`proposal_contrastive_loss`, one prototype
    per proposal, the saliency target their union with the foreground of no proposal). The queue
    is read before and written after the optimiser step; with proposals it takes all of the
    step's proposals (``PrototypeQueue.enqueue(any_count=True)``). ``rule`` (not None, one mask
    per image): the columns and positives of each image's anchors (``neighbours``) instead of
    ``contrastive_fn``.
    """
    proposals = q_mask.dtype != torch.bool
    if proposals and (rule is not None or enc.space_queue is not None):
        raise ValueError("train.contrast needs one mask per image; it is not implemented for proposals")
    q_in = normalize_images(q_img)
    device_type = q_in.device.type
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
            memory = None
            if rule.space == "backbone":
                memory = (pooled[0], enc.space_queue.negatives() if enc.space_queue is not None
                          else pooled[0].new_zeros((0, pooled[0].shape[1])))
            keep, targets = select_columns(protos, negatives, rule, space=memory)
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
    return torch.stack([loss.detach(), loss_c.detach().float(), loss_s.detach().float()])


# --------------------------------------------------------------------------- the run


def proposal_slots(store: MaskStore) -> int | None:
    """Proposal slots per image for a mask store of schema version 2 (its most proposals in one
    image, at least 1); None for a version-1 store, trained on one mask per image as before."""
    if not store.has_proposals:
        return None
    counts = store.table()["n_proposals"]
    return max(1, int(counts.max())) if counts.size else 1


def _clone_tensors(obj: Any) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples) replaced by a private copy."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One training run into ``out_dir`` (see :func:`train`); after ``run()`` its ``enc`` holds
    the networks of this process (used by tests to compare ranks)."""

    def __init__(self, params: TrainParams, samples: Sequence[Sample], mask_dir: str | os.PathLike,
                 out_dir: str | os.PathLike, *, progress: bool = True,
                 on_epoch: Callable[[int, dict], None] | None = None, max_steps: int | None = None) -> None:
        self.params = params
        self.samples = list(samples)
        self.mask_dir = Path(mask_dir)
        self.out_dir = Path(out_dir)
        self.progress = progress
        self.on_epoch = on_epoch
        self.max_steps = max_steps
        self.enc: Encoders | None = None
        self.history: list[dict[str, Any]] = []
        self.log_lines = 0
        self.global_step = 0
        self.epochs_done = 0
        self.resumed_from: int | None = None
        self.last_checkpoint: Path | None = None
        self.init_report: dict | None = None

    # -- set-up
    def _build(self) -> tuple[MaskContrastModel, dict | None]:
        """The query network with its initialisation (same on every rank: seeded by ``seed``)."""
        p = self.params
        _seed_all(p.seed)
        model = build_model(model_config(p))  # frozen as configured; loading weights still works
        report = (load_init(model.backbone, resolve_init(p.init, p.backbone), p.init_kind)
                  if p.init != "random" else None)
        return model, report

    def _check_data(self, info: D.DistInfo) -> MaskStore:
        """Fail before any work: batch split, enough images, a mask for every image."""
        p = self.params
        check_batch(len(self.samples), p.batch_size, info.world_size)
        store = MaskStore(self.mask_dir)
        missing = [s.id for s in self.samples if s.id not in store]
        if missing:
            raise TrainDataError(f"{len(missing)} training images have no mask in {self.mask_dir}: "
                                 f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        return store

    def _check_resume(self, state: dict, path: Path) -> None:
        mine = to_plain(self.params)
        # checkpoints from before the augment key; tuples and lists alike
        theirs = to_plain({"augment": to_plain(AugmentParams()), "contrast": to_plain(ContrastParams()),
                           **state.get("params", {})})
        diff = [f"{k}: checkpoint {theirs.get(k)!r} vs now {v!r}" for k, v in mine.items()
                if k not in VOLATILE_PARAMS and k != "init" and theirs.get(k) != v]
        if (theirs.get("init") == "random") != (self.params.init == "random"):
            diff.append(f"init: checkpoint {theirs.get('init')!r} vs now {self.params.init!r}")
        if diff:
            raise CheckpointError(f"{path}: written with other training parameters ({'; '.join(diff)});"
                                  " use a fresh output directory")
        if state.get("samples") != samples_fingerprint(self.samples):
            raise CheckpointError(f"{path}: written for another list of training images "
                                  f"(fingerprint differs); use a fresh output directory")
        if not 1 <= state["epoch"] <= self.params.epochs:
            raise CheckpointError(f"{path}: holds epoch {state['epoch']} of a {self.params.epochs}-epoch run")

    def _find_resume_state(self) -> tuple[dict, Path] | None:
        """The newest checkpoint of ``out_dir``, checked against this run (None: a fresh start)."""
        latest = latest_checkpoint(self.out_dir)
        if latest is None:
            return None
        state = load_checkpoint(latest[1])
        self._check_resume(state, latest[1])
        return state, latest[1]

    def _resume(self, enc: Encoders, info: D.DistInfo, found: tuple[dict, Path] | None) -> None:
        """Load a checkpoint into ``enc`` and the run state; cut the log back to it (on a fresh
        start: empty it)."""
        log = self.out_dir / LOG_FILE
        if found is None:
            if info.rank == 0:
                truncate_lines(log, 0)
            return
        state, path = found
        epoch = state["epoch"]
        then, now = (state.get("init") or {}).get("sha256"), (self.init_report or {}).get("sha256")
        if then != now:  # the init file is compared by content: it may have moved
            raise CheckpointError(f"{path}: started from another init checkpoint (sha256 {then} vs now {now});"
                                  " use a fresh output directory")
        enc.model.load_state_dict(state["model"])
        enc.key.load_state_dict(state["key"])
        if enc.queue is not None:
            enc.queue.load_state_dict(state["queue"])
        if enc.space_queue is not None:
            enc.space_queue.load_state_dict(state["space_queue"])
        # Optimiser state is adopted as is (no copy): clone it off the memory-mapped file.
        enc.optimizer.load_state_dict(_clone_tensors(state["optimizer"]))
        if enc.scaler is not None and state.get("scaler"):
            enc.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) == info.world_size:
            restore_rng_state(rng[info.rank])
        else:  # another number of processes: every rank gets a fresh, seeded stream
            warnings.warn(f"{path} was written by {len(rng)} processes, resuming with {info.world_size}: "
                          "the dropout draws of the remaining epochs differ from an uninterrupted run")
            torch.manual_seed(derive_seed(self.params.seed, _TORCH_STREAM, info.rank, epoch))
        self.epochs_done, self.global_step = state["epoch"], state["global_step"]
        self.history = list(state["history"])
        self.log_lines = state["log_lines"]
        self.resumed_from = epoch
        self.last_checkpoint = path
        if info.rank == 0:
            truncate_lines(log, self.log_lines)

    # -- the loop
    def run(self) -> dict[str, Any]:
        info = D.init_distributed("gloo" if self.params.device == "cpu" else None)
        try:
            return self._run(info)
        finally:
            D.shutdown_distributed(info)

    def _run(self, info: D.DistInfo) -> dict[str, Any]:
        p = self.params
        started = time.perf_counter()
        device = resolve_device(p.device, info.local_rank)
        amp_dtype = resolve_amp(p.amp, device)
        main = info.rank == 0
        store = self._check_data(info) if p.epochs else None
        found = self._find_resume_state() if p.epochs else None
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        model, init_report = self._build()
        self.init_report = init_report
        config = model_config(p)
        common = {"device": str(device), "amp": amp_name(amp_dtype), "init": init_report,
                  "seeds": {"seed": p.seed, "model_init": p.seed,
                            "dropout": [derive_seed(p.seed, _TORCH_STREAM, r) for r in range(info.world_size)]},
                  "world_size": info.world_size}
        if p.epochs == 0:
            if main:
                save_model_file(self.out_dir / MODEL_FILE, model, config, params=to_plain(p),
                                init=init_report, epochs=0, steps=0)
            D.barrier()
            return {**self._summary(complete=True, n_images=len(self.samples), seconds=0.0), **common}

        torch.manual_seed(derive_seed(p.seed, _TORCH_STREAM, info.rank))  # this rank's dropout stream
        enc = build_encoders(model, p, device, amp_dtype)
        self.enc = enc
        self._resume(enc, info, found)
        del found  # release the checkpoint's tensors
        if info.distributed:
            enc.forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        sampler = EpochBatchSampler(len(self.samples), p.batch_size, p.seed, self.epochs_done + 1, p.epochs,
                                    info.rank, info.world_size)
        steps_per_epoch = sampler.steps_per_epoch
        total_steps = p.epochs * steps_per_epoch
        n_slots = proposal_slots(store)
        dataset = TwoViewDataset(self.samples, store, p.seed, view_augment(p),
                                 p.min_fg, p.max_fg, p.redraws, proposals=n_slots is not None)
        loader = make_loader(dataset, sampler, p.num_workers, device.type == "cuda", p.seed)
        last = total_steps if self.max_steps is None else min(total_steps, self.max_steps)
        log = open(self.out_dir / LOG_FILE, "a", encoding="utf-8") if main else None
        bar = tqdm(total=total_steps, initial=self.global_step, unit="step", desc="train",
                   disable=not (self.progress and main), dynamic_ncols=True)
        try:
            self._loop(enc, loader, info, device, amp_dtype, steps_per_epoch, last, log, bar, n_slots or 1)
        finally:
            bar.close()
            if log is not None:
                log.close()
        complete = self.epochs_done == p.epochs
        if complete and main:
            save_model_file(self.out_dir / MODEL_FILE, model, config, params=to_plain(p),
                            init=init_report, epochs=p.epochs, steps=self.global_step,
                            history=self.history)
            plot_loss_curve(self.out_dir / LOG_FILE, self.out_dir / LOSS_CURVE_FILE)
        D.barrier()
        return {**self._summary(complete, len(self.samples), time.perf_counter() - started), **common}

    def _loop(self, enc: Encoders, loader, info: D.DistInfo, device: torch.device,
              amp_dtype: torch.dtype | None, steps_per_epoch: int, last: int, log, bar, n_slots: int = 1) -> None:
        p = self.params
        batches = iter(loader)
        acc = np.zeros(3)
        stats = np.zeros(len(STAT_NAMES), dtype=np.int64)
        wait = busy = 0.0
        tick = time.perf_counter()
        while self.global_step < last:
            step = self.global_step + 1
            epoch = (step - 1) // steps_per_epoch + 1
            lr = poly_lr(p.lr, epoch, p.epochs)
            for group in enc.optimizer.param_groups:
                group["lr"] = lr
            q_img, q_mask, k_img, k_mask, item_stats = next(batches)
            got = time.perf_counter()
            shuffle = (torch.Generator().manual_seed(derive_seed(p.seed, _SHUFFLE_STREAM, step))
                       if info.distributed else None)
            losses = train_step(
                enc, q_img.to(device, non_blocking=True), q_mask.to(device, non_blocking=True),
                k_img.to(device, non_blocking=True), k_mask.to(device, non_blocking=True),
                temperature=p.temperature, key_momentum=p.key_momentum, amp_dtype=amp_dtype, shuffle=shuffle,
                n_slots=n_slots, rule=column_rule(p, epoch))
            reduced = torch.cat([losses.double().cpu(), item_stats.sum(0).double()])
            if info.distributed:  # one collective: mean losses, summed data counts
                reduced = D.all_reduce_mean(reduced.to(device)).cpu()
                reduced[3:] *= info.world_size
            values = reduced[:3].tolist()
            now = time.perf_counter()
            step_wait, step_time = got - tick, now - tick
            tick = now
            named = dict(zip(("loss", "loss_contrastive", "loss_saliency"), values))
            if not all(math.isfinite(v) for v in values):
                raise TrainingDiverged(epoch, step, named, self.last_checkpoint)
            self.global_step = step
            acc += values
            stats += np.rint(reduced[3:].numpy()).astype(np.int64)
            wait += step_wait
            busy += step_time
            ips = p.batch_size / step_time
            if log is not None:
                append_jsonl(log, {"type": "step", "epoch": epoch, "step": step, **named, "lr": lr,
                                   "images_per_s": ips, "data_wait_share": step_wait / step_time})
                self.log_lines += 1
            bar.set_postfix(epoch=epoch, loss=f"{values[0]:.4f}", img_s=f"{ips:.1f}", refresh=False)
            bar.update(1)
            if step % steps_per_epoch == 0:
                record = {"type": "epoch", "epoch": epoch, "steps": steps_per_epoch, "lr": lr,
                          **dict(zip(("loss", "loss_contrastive", "loss_saliency"), (acc / steps_per_epoch).tolist())),
                          "images_per_s": p.batch_size * steps_per_epoch / busy, "data_wait_share": wait / busy,
                          "seconds": busy, **dict(zip(STAT_NAMES, stats.tolist()))}
                self._end_epoch(enc, info, epoch, record, log)
                acc[:] = 0
                stats[:] = 0
                wait = busy = 0.0
                tick = time.perf_counter()  # checkpoint time is not step time

    def _end_epoch(self, enc: Encoders, info: D.DistInfo, epoch: int, record: dict, log) -> None:
        """Log the epoch, checkpoint (rank 0, atomically), prune, and call ``on_epoch``."""
        self.epochs_done = epoch
        self.history.append(record)
        rng = D.all_gather_object(capture_rng_state())  # every rank's, for an exact resume
        if info.rank == 0:
            path = checkpoint_path(self.out_dir, epoch)
            record["checkpoint"] = str(path.relative_to(self.out_dir))
            append_jsonl(log, record)
            self.log_lines += 1
            os.fsync(log.fileno())  # the lines the checkpoint counts are on disk before it
            save_checkpoint(path, {
                "epoch": epoch, "global_step": self.global_step,
                "model": cpu_state_dict(enc.model), "key": cpu_state_dict(enc.key),
                "queue": cpu_state_dict(enc.queue) if enc.queue is not None else None,
                **({"space_queue": cpu_state_dict(enc.space_queue)} if enc.space_queue is not None else {}),
                "optimizer": enc.optimizer.state_dict(),
                "scaler": enc.scaler.state_dict() if enc.scaler is not None else None,
                "rng": rng, "samples": samples_fingerprint(self.samples),
                "data": {"seed": self.params.seed, "n_samples": len(self.samples),
                         "global_batch": self.params.batch_size, "world_size": info.world_size,
                         "next_epoch": epoch + 1, "next_step_in_epoch": 0},
                "log_lines": self.log_lines, "history": self.history,
                "params": to_plain(self.params), "model_config": model_config(self.params),
                "init": self.init_report,
            })
            prune_checkpoints(self.out_dir, self.params.keep_last)
            self.last_checkpoint = path
        else:
            self.last_checkpoint = checkpoint_path(self.out_dir, epoch)
        if self.on_epoch is not None:
            self.on_epoch(epoch, record)

    def _summary(self, complete: bool, n_images: int, seconds: float) -> dict[str, Any]:
        h = self.history
        trained = sum(r["seconds"] for r in h)
        final = h[-1] if h else {}
        return {
            "complete": complete, "epochs": self.epochs_done, "steps": self.global_step,
            "loss": final.get("loss"), "loss_contrastive": final.get("loss_contrastive"),
            "loss_saliency": final.get("loss_saliency"),
            "images_per_s": sum(r["images_per_s"] * r["seconds"] for r in h) / trained if trained else None,
            "data_wait_share": sum(r["data_wait_share"] * r["seconds"] for r in h) / trained if trained else None,
            "seconds": trained, "seconds_this_call": seconds, "n_images": n_images,
            "resumed_from_epoch": self.resumed_from,
            **{name: sum(r[name] for r in h) for name in STAT_NAMES},
            "checkpoints": [path.name for _, path in list_checkpoints(self.out_dir)],
        }


def train(params: TrainParams, samples: Sequence[Sample], mask_dir: str | os.PathLike,
          out_dir: str | os.PathLike, *, progress: bool = True,
          on_epoch: Callable[[int, dict], None] | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Train MaskContrast on ``samples`` with masks from ``mask_dir``; write the artifact to ``out_dir``.

    Writes ``checkpoints/epoch-NNNN.pt`` after every epoch (atomically; the last ``keep_last``
    kept), ``log.jsonl`` (a line per step and per epoch), and, once all epochs are done,
    ``model.pt`` (the query network, see ``checkpoint.load_model``) and ``loss_curve.png``.
    Continues from the newest checkpoint in ``out_dir`` (same parameters and images required).
    ``epochs == 0`` writes ``model.pt`` holding the initialisation alone.

    Under torchrun / SLURM with several processes it joins the process group (``distributed``):
    DDP query network, sharded batches of ``batch_size / world_size``, prototypes all-gathered
    into the queue, only rank 0 writes. ``on_epoch(epoch, record)`` is called on every rank after
    the epoch's checkpoint is written. ``max_steps`` stops the run once that many optimiser steps
    (counted from the start of training, resumed ones included) are done; the run is then
    incomplete (no ``model.pt``) and a later call continues it from the last checkpoint.

    Returns a summary: complete, epochs, steps, final losses (means of the last epoch),
    images_per_s, data_wait_share, seconds, seeds, device, amp, n_images, init report, counts of
    redrawn views / replaced images / unreadable images.

    Raises:
        TrainingDiverged: a non-finite loss (names the epoch, step and last good checkpoint).
        TrainDataError: images without masks, too few images for a batch, unusable masks.
        CheckpointError: the checkpoint in ``out_dir`` belongs to another run.
    """
    return Trainer(params, samples, mask_dir, out_dir, progress=progress, on_epoch=on_epoch,
                   max_steps=max_steps).run()


def plot_loss_curve(log_path: Path, png_path: Path) -> Path | None:
    """Plot per-step losses (thin) and per-epoch means (markers) from ``log.jsonl`` into a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from artifacts.atomic import atomic_path

    records = read_jsonl(log_path)
    steps = [r for r in records if r.get("type") == "step"]
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not steps:
        return None
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = [r["step"] for r in steps]
    steps_at_epoch = {r["epoch"]: r["step"] for r in steps}
    for name, colour in (("loss", "black"), ("loss_contrastive", "tab:blue"), ("loss_saliency", "tab:orange")):
        ax.plot(x, [r[name] for r in steps], color=colour, alpha=0.35, linewidth=0.8)
        ax.plot([steps_at_epoch[r["epoch"]] for r in epochs], [r[name] for r in epochs], "o-",
                color=colour, markersize=3, label=f"{name} (epoch mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("MaskContrast training loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(png_path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return png_path
