"""Stage 3: run the trained network once over a split and store what evaluation needs.

Per image: one prototype (the K-means and retrieval protocols), the salient mask at the image's
original resolution (the region those protocols label) and, optionally, the decoder's 256-d trunk
at low resolution (the linear probe and pixel-level K-means), in HDF5 shards ``emb-NNNNN.h5``.

Inference (the reference's ``save_embeddings_to_disk`` and its validation transforms): the RGB
image is resized to ``input_size`` x ``input_size`` (aspect not kept) with cv2 bicubic
interpolation on uint8 (the reference's ``FixedResize`` uses ``cv2.INTER_CUBIC``; ``bilinear`` is
available), scaled to [0, 1] and normalised with the ImageNet mean/std. The model runs in eval
mode under ``torch.no_grad``, with autocast on CUDA (bf16 where supported, else fp16); its outputs
are taken to float32 before any arithmetic below.

Salient region and prototype, at input resolution. With ``s`` the RAW saliency logit (no sigmoid:
the reference thresholds the logit itself, so ``s > 0.5`` means sigmoid(s) > 0.62):

- ``mask_source="model"``: salient = ``s > 0.5``.
  ``embedding="head"``: prototype = L2-normalise(sum_p emb_p * s_p * [s_p > 0.5]), ``emb`` the
  un-normalised embedding upsampled to the input size (REFERENCE.md, K-means protocol).
- ``mask_source="masks"``: salient = the mask artifact's mask (kept or dropped, as stored), resized
  to the input size with nearest neighbour. ``embedding="head"``: prototype =
  L2-normalise(sum_p emb_p * m_p), the binary mask as weights (the training-time prototype).
- ``embedding="backbone"`` (baselines without a trained head, e.g. MoCo or ImageNet init alone):
  prototype = L2-normalise(mean over the salient pixels of the backbone's last feature grid
  upsampled bilinearly to the input size). It is computed on the grid itself: the mask is pulled
  back through the (linear) bilinear upsampling, ``w = A_h^T M A_w``, and the prototype is
  ``sum_c grid_c w_c``: the same number without a B x 2048 x 512 x 512 tensor.

An image without any salient pixel gets a zero prototype and ``valid = False``. The stored mask is
the input-resolution salient mask resized to the original image size with nearest neighbour
(bit-identical to ``cv2.INTER_NEAREST``, as the reference resizes its 512 x 512 predictions to the
label size), or, with ``mask_source="masks"``, the artifact's mask itself. ``features``: the trunk (B x 256 x
input/os x input/os) resized to ``feature_size`` x ``feature_size`` (area averaging when
shrinking, bilinear when enlarging), float16.

Several proposals per image (embedding shards of schema version 2, :mod:`artifacts.embeddings`):
with ``mask_source="masks"`` on a mask artifact of schema version 2, each of the image's stored
proposals; with ``mask_source="model"`` and ``proposals`` other than ``single``, the connected
components of the salient mask at input resolution (:func:`stages.masks.proposals.component_proposals`
with the masks stage's ``max_proposals`` and ``min_proposal``; ``cuts`` split the head's mask the
same way). Each proposal gets its prototype as the image gets its own (the same weights and
normalisation, restricted to the proposal's pixels) and its mask at the original resolution.
The per-image record (salient mask, prototype) is the version-1 one either way.

Streaming, bounded memory: a DataLoader (workers decode and resize) feeds batches that never
straddle a shard; features go to the shard file as each batch finishes, and a shard holds at most
``shard_size`` images' small arrays until it is written. Nothing is kept across shards, so memory
does not grow with the number of images.

Resumable: image i belongs to shard ``i // shard_size`` of the sample order. A shard file appears
only whole (temp name, fsync, rename); a rerun skips every shard already on disk and computes the
rest with the same batches, so an interrupted and resumed run writes the same shards as an
uninterrupted one. A block whose images are all unreadable gives an empty shard (it is done).

Unreadable images are skipped and listed in ``skipped.json`` (id -> reason), written before the
shard that would have held them. With ``mask_source="masks"``, an id the mask artifact lacks is an
error (:class:`ExtractError`) unless the masks stage listed it in its own ``skipped.json`` (it could
not read the image either), in which case it is skipped here too.

HDF5 layout of ``emb-NNNNN.h5`` (schema ``maskcontrast/embeddings``, ``schema_version`` 1;
n images in the shard, D prototype dimension, C = 256, f = ``feature_size``)::

    @schema = "maskcontrast/embeddings"   @schema_version = 1   @count = n
    @json_attrs      JSON list of the attrs below stored as JSON strings
    @extract         JSON: input_size, interpolation, mask_source, embedding, features,
                     feature_size, shard_size, saliency_threshold (0.5, on the raw logit)
    @model           JSON: backbone, output_stride, embedding_dim
    @shard           this file's shard number; plus the caller's attrs (e.g. input versions)
    ids              str (n,)
    shapes           int32 (n, 2)       original height, width
    prototypes       float32 (n, D)     L2-normalised; zero row where not valid. D = 32 for
                                        "head"; 2048 / 512 / 1280 for a resnet50 / resnet18 /
                                        mobilenet_v2 "backbone" (an empty shard: (0, 0))
    valid            bool (n,)          False: no salient pixel
    salient_fraction float32 (n,)       share of salient pixels in the stored mask
    offsets          int64 (n + 1,)     start of each mask in `masks`; offsets[n] == len(masks)
    masks            uint8 (flat)       np.packbits(mask.ravel()) at the ORIGINAL resolution,
                                        ceil(H * W / 8) bytes each, chunk-aligned (32 KiB
                                        chunks, gzip), as in the mask shards
    features         float16 (n, C, f, f), optional; chunks (1, C, f, f): one image per chunk,
                                        shuffle + gzip

Besides the shards the directory holds ``skipped.json`` (when an image was skipped).
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from artifacts.atomic import atomic_write_json
from artifacts.embeddings import (
    REGIONS_SCHEMA_VERSION,
    SCHEMA_VERSION,
    EmbeddingRecord,
    ProposalEmbedding,
    EmbeddingShardWriter,
    read_shard_attrs,
    shard_name,
    summarize_embeddings,
)
from artifacts.masks import MaskStore
from stages.common.prototypes import mask_prototypes, slot_prototypes
from stages.common.resize import nearest_indices
from stages.data import BadInputError, Sample, load_image
from stages.network.runtime import normalize_images, resolve_amp, resolve_device

from .params import _VOLATILE, EMBEDDINGS, MASK_SOURCES, SALIENCY_THRESHOLD, ExtractParams  # noqa: F401  (_VOLATILE: tests)

__all__ = [
    "EMBEDDINGS",
    "INTERPOLATIONS",
    "MASK_SOURCES",
    "SALIENCY_THRESHOLD",
    "SKIPPED_FILE",
    "ExtractError",
    "ExtractParams",
    "backbone_prototypes",
    "component_labels",
    "extract",
    "head_prototypes",
    "nearest_indices",
    "proposal_labels",
    "proposal_prototypes",
    "pullback_weights",
    "resize_features",
    "resize_mask",
    "split_prototypes",
]

SKIPPED_FILE = "skipped.json"  # here, and the masks stage's list of images it could not read
INTERPOLATIONS = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR}


class ExtractError(ValueError):
    """Extraction cannot proceed: a mask artifact that does not cover the samples or does not
    match the images, or existing shards written with other parameters."""


# --------------------------------------------------------------------------- pure maths


def head_prototypes(emb: torch.Tensor, sal_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's K-means prototypes from the model's outputs at input resolution.

    Args:
        emb: B x D x H x W, the un-normalised embedding.
        sal_logit: B x 1 x H x W, the RAW saliency logit ``s``.
    Returns:
        prototypes B x D float32 = L2-normalise(sum_p emb_p * s_p * [s_p > 0.5]) (zero rows where
        not valid), valid B (bool), salient B x H x W (bool, ``s > 0.5``).
    """
    s = sal_logit[:, 0].float()  # B x H x W
    salient = s > SALIENCY_THRESHOLD
    prototypes, valid = mask_prototypes(emb.float(), s * salient)
    return prototypes, valid & salient.flatten(1).any(1), salient


def _interpolation_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """A (n_out x n_in) with ``A @ v`` = 1-D bilinear resize (align_corners=False) of v to n_out."""
    eye = torch.eye(n_in, device=device, dtype=torch.float32)[None, None]  # 1 x 1 x n_in x n_in
    return F.interpolate(eye, size=(n_out, n_in), mode="bilinear", align_corners=False)[0, 0]


def pullback_weights(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Weights w (B x h x w) on a feature grid with sum_c grid_c w_c = sum_p up(grid)_p mask_p,
    ``up`` the bilinear upsampling (align_corners=False) of the h x w grid to the mask's H x W.

    Bilinear resizing is separable and linear, ``up(G) = A_h G A_w^T``, so w = A_h^T M A_w.
    """
    _, big_h, big_w = mask.shape
    a_h = _interpolation_matrix(grid[0], big_h, mask.device)  # H x h
    a_w = _interpolation_matrix(grid[1], big_w, mask.device)  # W x w
    return torch.einsum("Hh,bHW,Ww->bhw", a_h, mask.float(), a_w)


def backbone_prototypes(grid: torch.Tensor, salient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalise(mean of the bilinearly upsampled backbone grid over the salient pixels).

    Args:
        grid: B x C x h x w backbone features.
        salient: B x H x W bool at input resolution.
    Returns:
        prototypes B x C float32 (zero rows where not valid), valid B (bool).
    """
    weights = pullback_weights(salient, tuple(grid.shape[-2:]))  # B x h x w
    prototypes, valid = mask_prototypes(grid.float(), weights)
    return prototypes, valid & salient.flatten(1).any(1)


def proposal_labels(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """uint8 ``shape``: proposal k (bool masks, disjoint) is label k + 1, 0 elsewhere (a pixel two
    masks claim stays with the first)."""
    if len(masks) > 255:
        raise ExtractError(f"{len(masks)} proposals in one image; at most 255 fit a label map")
    labels = np.zeros(shape, np.uint8)
    for k in range(len(masks), 0, -1):
        labels[masks[k - 1]] = k
    return labels


def proposal_prototypes(emb: torch.Tensor, weights: torch.Tensor | None, labels: torch.Tensor,
                        n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-proposal head prototypes: L2-normalise(sum over proposal l's pixels of emb_p * w_p),
    ``weights`` B x H x W (None: 1), ``labels`` B x H x W (l in 1..n_slots). Returns B x L x D
    prototypes (zero where invalid) and valid B x L."""
    x = emb.float() if weights is None else emb.float() * weights[:, None].float()
    return slot_prototypes(x, labels, n_slots)


def resize_features(trunk: torch.Tensor, size: int) -> torch.Tensor:
    """B x C x h x w -> B x C x size x size: area averaging when shrinking (every trunk cell
    counts, no aliasing), bilinear (align_corners=False) when enlarging, identity when equal."""
    h, w = trunk.shape[-2:]
    if (h, w) == (size, size):
        return trunk
    if size <= h and size <= w:
        return F.adaptive_avg_pool2d(trunk, size)
    return F.interpolate(trunk, size=(size, size), mode="bilinear", align_corners=False)


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool (h, w) -> bool ``shape`` by nearest neighbour, as the reference's cv2 INTER_NEAREST.

    numpy, not cv2: cv2's thread pool, once used in this process, can deadlock a DataLoader
    worker forked later (observed: a worker hung in ``cv2.setNumThreads``)."""
    h, w = int(shape[0]), int(shape[1])
    if mask.shape == (h, w):
        return mask
    return mask[nearest_indices(mask.shape[0], h)[:, None], nearest_indices(mask.shape[1], w)[None, :]]


# --------------------------------------------------------------------------- data


@dataclass
class _Item:
    """One sample after decoding: ``image`` uint8 3 x S x S, or ``error`` when unusable."""

    id: str
    shape: tuple[int, int] = (0, 0)
    image: np.ndarray | None = None
    mask: np.ndarray | None = None      # bool (H, W) from the mask artifact
    mask_in: np.ndarray | None = None   # bool (S, S) the same, at input size
    proposals: list[np.ndarray] | None = None  # bool (H, W) each, from a version-2 mask artifact
    labels_in: np.ndarray | None = None  # uint8 (S, S): proposal k is label k (1-based), 0 elsewhere
    error: str | None = None


@dataclass
class _Batch:
    items: list[_Item]           # every sample of the batch, in order
    images: torch.Tensor | None  # uint8 B' x 3 x S x S of the usable items

    def pin_memory(self) -> _Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True, CUDA)."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


class _ExtractDataset(Dataset):
    """Decode + resize one sample (and read its mask from the mask artifact, if any)."""

    def __init__(self, samples: Sequence[Sample], params: ExtractParams, masks: MaskStore | None,
                 mask_skipped: Mapping[str, str]) -> None:
        self.samples = list(samples)
        self.size = params.input_size
        self.interpolation = INTERPOLATIONS[params.interpolation]
        self.masks = masks
        self.mask_skipped = dict(mask_skipped)
        self.proposals = masks is not None and masks.has_proposals

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> _Item:
        sample = self.samples[i]
        if sample.id in self.mask_skipped:
            return _Item(sample.id, error=f"no mask: the masks stage skipped it ({self.mask_skipped[sample.id]})")
        try:
            image = load_image(sample.image)  # H x W x 3 uint8
        except BadInputError as exc:
            return _Item(sample.id, error=str(exc))
        shape = (int(image.shape[0]), int(image.shape[1]))
        resized = cv2.resize(image, (self.size, self.size), interpolation=self.interpolation)
        item = _Item(sample.id, shape, np.ascontiguousarray(resized.transpose(2, 0, 1)))
        if self.masks is not None:
            record = self.masks.get(sample.id, proposals=self.proposals)
            mask = record.mask
            if mask.shape != shape:
                raise ExtractError(f"mask of {sample.id!r} in {self.masks.directory} is {mask.shape[1]}x"
                                   f"{mask.shape[0]} but image {sample.image} is {shape[1]}x{shape[0]}: "
                                   "the mask artifact was made from other images")
            item.mask, item.mask_in = mask, resize_mask(mask, (self.size, self.size))
            if self.proposals:
                item.proposals = [p.mask for p in record.proposals]
                item.labels_in = proposal_labels([resize_mask(m, (self.size, self.size)) for m in item.proposals],
                                                 (self.size, self.size))
        return item


class _ShardBatches:
    """Batches of dataset positions that never straddle a shard: the same batches whichever
    shards are left to compute, so a resumed run computes exactly what an uninterrupted one does."""

    def __init__(self, spans: Sequence[tuple[int, int, int]], batch_size: int) -> None:
        self.batches = [list(range(b, min(b + batch_size, stop)))
                        for _, start, stop in spans for b in range(start, stop, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(items: list[_Item]) -> _Batch:
    """Stack the usable images (in the worker, so one tensor crosses the process boundary)."""
    good = [it.image for it in items if it.error is None]
    images = torch.from_numpy(np.stack(good)) if good else None
    for it in items:
        it.image = None  # travels once, in `images`
    return _Batch(items, images)


def _to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """Copy a tensor into a new numpy array (numpy-owned memory, visible to tracemalloc)."""
    out = np.empty(tuple(t.shape), dtype=dtype)
    torch.from_numpy(out).copy_(t.detach())
    return out


# --------------------------------------------------------------------------- the stage


def _load_json(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        return dict(json.load(fh))


def _check_masks(samples: Sequence[Sample], mask_dir: Path | None) -> tuple[MaskStore, dict[str, str]]:
    """The mask store and the ids its stage skipped; ExtractError if it misses any other id."""
    if mask_dir is None:
        raise ExtractError("mask_source='masks' needs mask_dir (the mask artifact's directory)")
    store = MaskStore(mask_dir)
    known = set(store.ids())
    mask_skipped = _load_json(Path(mask_dir) / SKIPPED_FILE)
    missing = [s.id for s in samples if s.id not in known and s.id not in mask_skipped]
    if missing:
        raise ExtractError(f"mask_source='masks' but the mask artifact {mask_dir} has no mask for {len(missing)} "
                           f"of the {len(samples)} images (e.g. {', '.join(map(repr, missing[:5]))}): build "
                           "the masks for this split, or use mask_source='model'")
    return store, {s.id: mask_skipped[s.id] for s in samples if s.id not in known}


def _model_attrs(model: nn.Module) -> dict[str, Any]:
    return {k: getattr(model, attr) for k, attr in (("backbone", "backbone_name"), ("output_stride", "output_stride"),
                                                     ("embedding_dim", "embedding_dim")) if hasattr(model, attr)}


def _check_existing(out_dir: Path, done: Sequence[int], recorded: Mapping[str, Any]) -> None:
    for k in done:
        path = out_dir / shard_name(k)
        found = read_shard_attrs(path).get("extract")
        if found != recorded:
            raise ExtractError(f"{path} was written with extract parameters {found}, this run uses {recorded}: "
                               "use a new output directory")


def _compute(model: nn.Module, batch: _Batch, params: ExtractParams, device: torch.device,
             amp: torch.dtype | None, grids: list[torch.Tensor], split=None) -> list[EmbeddingRecord]:
    """Records of the usable items of one batch; ``split``: the proposal parameters that split
    the saliency head's mask (``mask_source="model"``), or None."""
    items = [it for it in batch.items if it.error is None]
    if not items:
        return []
    x = normalize_images(batch.images.to(device, non_blocking=True))  # B x 3 x S x S
    grids.clear()
    with torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        emb, sal, trunk = model(x, return_features=True)  # B x D x S x S, B x 1 x S x S, B x 256 x h x w
    if params.mask_source == "model":
        if params.embedding == "head":
            protos, valid, salient = head_prototypes(emb, sal)
        else:
            salient = sal[:, 0].float() > SALIENCY_THRESHOLD
            protos, valid = backbone_prototypes(grids[0], salient)
        salient_np = _to_numpy(salient, np.bool_)  # B x S x S
        masks = [resize_mask(salient_np[i], it.shape) for i, it in enumerate(items)]
    else:
        salient = torch.from_numpy(np.stack([it.mask_in for it in items])).to(device)  # B x S x S
        if params.embedding == "head":
            protos, valid = mask_prototypes(emb.float(), salient.float())
            valid = valid & salient.flatten(1).any(1)
        else:
            protos, valid = backbone_prototypes(grids[0], salient)
        masks = [it.mask for it in items]
    protos_np, valid_np = _to_numpy(protos, np.float32), _to_numpy(valid, np.bool_)
    feats = (_to_numpy(resize_features(trunk.float(), params.feature_size).half(), np.float16)
             if params.features else None)  # B x 256 x f x f
    regions = None
    if params.mask_source == "masks" and items[0].labels_in is not None:
        labels_np = np.stack([it.labels_in for it in items])  # B x S x S
        originals = [it.proposals for it in items]
        regions = _proposal_embeddings(emb, None, labels_np, originals, params, grids, device)
    elif params.mask_source == "model" and split is not None:
        labels_np = np.stack([component_labels(salient_np[i], split) for i in range(len(items))])
        originals = [[resize_mask(labels_np[i] == k, it.shape) for k in range(1, int(labels_np[i].max()) + 1)]
                     for i, it in enumerate(items)]
        weights = sal[:, 0].float() if params.embedding == "head" else None
        regions = _proposal_embeddings(emb, weights, labels_np, originals, params, grids, device)
    return [EmbeddingRecord(it.id, masks[i], protos_np[i], bool(valid_np[i]),
                            feats[i] if feats is not None else None,
                            proposals=None if regions is None else regions[i]) for i, it in enumerate(items)]


def component_labels(salient: np.ndarray, split) -> np.ndarray:
    """uint8 label map of the components of a salient mask at input size (``split``: the
    proposal parameters, components being taken whatever their method)."""
    from dataclasses import replace

    from stages.masks.proposals import component_proposals

    found = component_proposals(salient, replace(split, proposals="components"))
    return proposal_labels([p.mask for p in found], salient.shape)


def split_prototypes(emb: torch.Tensor, weights: torch.Tensor | None, labels_np: np.ndarray, embedding: str,
                     grid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-proposal prototypes of a batch, computed as the image's own: ``embedding="head"``:
    :func:`proposal_prototypes` of ``emb`` (B x D x S x S) with ``weights``; ``"backbone"``:
    :func:`backbone_prototypes` of the backbone ``grid`` over each proposal. ``labels_np``:
    uint8 B x S x S label maps (proposal l is label l). Returns B x L x D and valid B x L."""
    n_slots = max(1, int(labels_np.max()))
    labels = torch.from_numpy(labels_np).to(emb.device)
    if embedding == "head":
        return proposal_prototypes(emb, weights, labels, n_slots)  # B x L x D, B x L
    b = labels.shape[0]
    which = torch.arange(b, device=emb.device).repeat_interleave(n_slots)  # (B L,)
    masks = labels[which] == torch.arange(1, n_slots + 1, device=emb.device).repeat(b)[:, None, None]
    slots, valid = backbone_prototypes(grid[which], masks)
    return slots.view(b, n_slots, -1), valid.view(b, n_slots)


def _proposal_embeddings(emb: torch.Tensor, weights: torch.Tensor | None, labels_np: np.ndarray,
                         originals: list[list[np.ndarray]], params: ExtractParams, grids: list[torch.Tensor],
                         device: torch.device) -> list[list[ProposalEmbedding]]:
    """Each image's proposals (label map ``labels_np`` at input size, masks ``originals`` at the
    original size) with their prototypes, as the image's own is computed."""
    slots, valid = split_prototypes(emb, weights, labels_np, params.embedding, grids[0] if grids else None)
    slots_np, valid_np = _to_numpy(slots, np.float32), _to_numpy(valid, np.bool_)
    return [[ProposalEmbedding(m, slots_np[i, k], bool(valid_np[i, k])) for k, m in enumerate(masks_i)]
            for i, masks_i in enumerate(originals)]


def extract(model: nn.Module, samples: Sequence[Sample], out_dir: str | Path, params: ExtractParams, *,
            mask_dir: str | Path | None = None, attrs: Mapping[str, Any] | None = None, progress: bool = True,
            on_shard: Callable[[int, int], None] | None = None, proposals=None) -> dict[str, Any]:
    """Write every missing embedding shard of ``samples`` into ``out_dir``; return the summary.

    ``model``: a ``MaskContrastModel`` (anything with ``forward(x, return_features=True)`` ->
    (emb, sal_logit, trunk) and, for ``embedding="backbone"``, a ``backbone`` submodule); it is
    moved to the device and run in eval mode (its training flag is restored afterwards).
    ``mask_dir``: the mask artifact, needed with ``mask_source="masks"`` (its proposals, when it
    stores them, are embedded one by one). ``proposals``: the masks stage's
    :class:`stages.masks.params.ProposalParams`; with ``mask_source="model"`` and a method other
    than ``single`` the head's mask is split into components. ``attrs``: extra root
    attrs for every shard (e.g. input artifact versions). ``on_shard(done, total)`` is called
    at the start and after each shard is written.

    Returns: n_images (stored), n_valid, n_skipped, n_computed (this run), images_per_s (this
    run), salient_fraction_mean, prototype_dim, feature_bytes, bytes_on_disk, n_shards, plus
    skipped_examples when images were skipped.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    samples = list(samples)
    ids = [s.id for s in samples]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ExtractError(f"duplicate sample ids: {dup[:5]}")
    if params.embedding == "backbone" and not isinstance(getattr(model, "backbone", None), nn.Module):
        raise ExtractError("embedding='backbone' needs a model with a `backbone` submodule")
    masks, mask_skipped = (_check_masks(samples, Path(mask_dir) if mask_dir is not None else None)
                           if params.mask_source == "masks" else (None, {}))

    out_dir.mkdir(parents=True, exist_ok=True)
    n_shards = -(-len(samples) // params.shard_size)
    done = [k for k in range(n_shards) if (out_dir / shard_name(k)).exists()]
    recorded = params.recorded()
    split = proposals if (params.mask_source == "model" and proposals is not None and proposals.multiple) else None
    if split is not None:
        recorded["proposals"] = {"proposals": "components", "max_proposals": split.max_proposals,
                                 "min_proposal": split.min_proposal}
    elif masks is not None and masks.has_proposals:  # what segment needs to split new images alike
        from artifacts.masks import read_shard_attrs as read_mask_attrs

        found = read_mask_attrs(masks.shard_paths[0]).get("proposals") if masks.shard_paths else None
        recorded["proposals"] = dict(found) if isinstance(found, Mapping) else {"proposals": "stored"}
    _check_existing(out_dir, done, recorded)
    missing = [k for k in range(n_shards) if k not in set(done)]
    todo: list[Sample] = []
    spans: list[tuple[int, int, int]] = []  # (shard, start, stop) in `todo`
    for k in missing:
        block = samples[k * params.shard_size:(k + 1) * params.shard_size]
        spans.append((k, len(todo), len(todo) + len(block)))
        todo.extend(block)

    device = resolve_device(params.device)
    amp = resolve_amp("auto", device)
    loader = DataLoader(_ExtractDataset(todo, params, masks, mask_skipped),
                        batch_sampler=_ShardBatches(spans, params.batch_size), collate_fn=_collate,
                        num_workers=params.num_workers, pin_memory=device.type == "cuda")
    base_attrs = {**(attrs or {}), "extract": recorded, "model": _model_attrs(model)}
    skipped = _load_json(out_dir / SKIPPED_FILE)
    grids: list[torch.Tensor] = []
    hook = (model.backbone.register_forward_hook(lambda _m, _i, out: grids.append(out))
            if params.embedding == "backbone" else None)
    was_training = model.training
    model.to(device, memory_format=torch.channels_last).eval()  # see normalize_images
    bar = tqdm(total=len(todo), desc="extract", unit="img", disable=not progress or not todo, smoothing=0.1)
    if on_shard:
        on_shard(len(done), n_shards)
    n_done, writer, new_skips = len(done), None, False
    pending = iter(spans)  # the shards left, in the order the loader's batches come
    shard, start, stop = next(pending, (-1, 0, 0))
    left = stop - start
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in loader:
                if writer is None:
                    writer = EmbeddingShardWriter(out_dir / shard_name(shard), {**base_attrs, "shard": shard})
                    writer.__enter__()
                for record in _compute(model, batch, params, device, amp, grids, split):
                    writer.add(record)
                    if skipped.pop(record.id, None) is not None:  # readable now: no longer skipped
                        new_skips = True
                for it in batch.items:
                    if it.error is not None:
                        skipped[it.id], new_skips = it.error, True
                bar.update(len(batch.items))
                left -= len(batch.items)
                if left == 0:  # the shard is whole: its skips first, then the file itself
                    if new_skips:
                        atomic_write_json(out_dir / SKIPPED_FILE, dict(sorted(skipped.items())))
                        new_skips = False
                    current, writer = writer, None
                    current.__exit__(None, None, None)
                    n_done += 1
                    if on_shard:
                        on_shard(n_done, n_shards)
                    shard, start, stop = next(pending, (-1, 0, 0))
                    left = stop - start
    except BaseException:
        if writer is not None:
            writer.__exit__(*sys.exc_info())  # discards the partial shard
        raise
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
        model.train(was_training)
    wall = time.perf_counter() - t0
    return _summary(out_dir, skipped, len(todo), wall)


def _summary(out_dir: Path, skipped: Mapping[str, str], n_computed: int, wall_s: float) -> dict[str, Any]:
    s = summarize_embeddings(out_dir)
    summary: dict[str, Any] = {
        "schema_version": REGIONS_SCHEMA_VERSION if "n_proposals" in s else SCHEMA_VERSION,
        "n_images": s["n_images"],
        "n_valid": s["n_valid"],
        "n_skipped": len(skipped),
        "n_computed": n_computed,
        "images_per_s": round(n_computed / wall_s, 3) if n_computed and wall_s > 0 else None,
        "salient_fraction_mean": s["salient_fraction"]["mean"],
        "prototype_dim": s["prototype_dim"],
        "feature_shape": s["feature_shape"],
        "feature_bytes": s["feature_bytes"],
        "bytes_on_disk": s["bytes_on_disk"],
        "n_shards": s["n_shards"],
    }
    if "n_proposals" in s:
        summary["n_proposals"] = s["n_proposals"]
    if skipped:
        summary["skipped_examples"] = dict(list(sorted(skipped.items()))[:20])
    return summary
