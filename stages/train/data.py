"""Training data: two independently augmented views of one image and its mask, and the batches.

Augmentation per view follows the reference (in its order): RandomResizedCrop (scale 0.2-1,
ratio 3/4-4/3; bilinear for the image, nearest for the mask), ColorJitter(0.4, 0.4, 0.4, 0.1)
with p 0.8 (the four adjustments in random order), RandomGrayscale p 0.2, a joint horizontal
flip. No blur. ImageNet mean/std normalisation is left to the training loop
(:func:`stages.network.runtime.normalize_images`), so the loader ships uint8 (a quarter of the
bytes) to the device.

Randomness is a pure function of ``(seed, epoch, index, attempt)``: every draw comes from a numpy
Generator seeded with those numbers, never from a global RNG. A batch is therefore the same
whatever the number of loader workers or their scheduling, and a resumed run sees exactly the data
an uninterrupted one would.

A view pair is accepted when both crops' foreground fraction lies in the open interval
(``min_fg``, ``max_fg``).

Several proposals per image (a mask store of schema version 2, ``proposals=True``): the mask is
carried as a label map, 1..n for the image's proposals (best first), ``NO_PROPOSAL`` (255) for
foreground no proposal covers, 0 for background, cropped and flipped with the same draws as a
mask. A proposal leaves the view pair when its share of either crop is not above ``min_fg`` (the
floor of a view's foreground); its pixels become ``NO_PROPOSAL`` (still foreground for the
saliency loss, anchors of nothing), the survivors are numbered 1..n' alike in both views, and a
pair with none left is redrawn as a pair with too little foreground is. With one proposal per
image, the image's mask, the views and every draw are the one-mask ones. Each image gets ``redraws`` draws (the reference: 3); after that, or at
once when the whole mask is outside the interval (no crop could pass) or the image cannot be read,
a replacement image is chosen, deterministically from the same numbers. The counts of failed draws,
replaced images and unreadable images travel with each item, so the loop can log them.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from artifacts.masks import MaskStore
from stages.data import BadInputError, Sample, load_image

from .params import AugmentParams

_REFERENCE = AugmentParams()
STAT_NAMES = ("redraws", "replaced", "bad_images")  # order of the per-item stats vector
NO_PROPOSAL = 255  # label of foreground no (surviving) proposal covers
MAX_CANDIDATES = 16  # images tried for one index before giving up

# Stream tags: the first entropy word, so that the streams never coincide.
_ORDER, _VIEWS, _REPLACE = 1, 2, 3


def _rng(*words: int) -> np.random.Generator:
    """A Generator seeded with the exact integers ``words`` (reduced to 64 bits)."""
    return np.random.default_rng([int(w) & 0xFFFF_FFFF_FFFF_FFFF for w in words])


def derive_seed(*words: int) -> int:
    """A 63-bit seed (for torch / python RNGs) that is a pure function of ``words``."""
    return int(np.random.SeedSequence([int(w) & 0xFFFF_FFFF_FFFF_FFFF for w in words])
               .generate_state(1, np.uint64)[0]) >> 1


class TrainDataError(ValueError):
    """The training data cannot yield a batch: unusable images or masks, with the ids named."""


@dataclass(frozen=True)
class ViewAugment:
    """Augmentation of one view (defaults: the reference's, ``AugmentParams``'s)."""

    crop_size: int = 224
    scale: tuple[float, float] = _REFERENCE.crop_scale
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = _REFERENCE.jitter  # brightness, contrast, saturation, hue
    jitter_p: float = _REFERENCE.jitter_p
    gray_p: float = _REFERENCE.gray_p
    flip_p: float = _REFERENCE.flip_p


def random_resized_crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop, torchvision's ``RandomResizedCrop.get_params`` algorithm
    (10 tries of area ~ U(scale), log-aspect ~ U(log ratio), then a centre crop) drawn from ``rng``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _color_jitter(image: Image.Image, jitter: tuple[float, float, float, float],
                  rng: np.random.Generator) -> Image.Image:
    """torchvision's ColorJitter with its parameter draws taken from ``rng``."""
    b, c, s, h = jitter
    order = rng.permutation(4)
    factors = (rng.uniform(max(0.0, 1 - b), 1 + b), rng.uniform(max(0.0, 1 - c), 1 + c),
               rng.uniform(max(0.0, 1 - s), 1 + s), rng.uniform(-h, h))
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in order:
        image = adjust[i](image, factors[i])
    return image


def augment_view(image: Image.Image, mask: Image.Image, rng: np.random.Generator,
                 aug: ViewAugment) -> tuple[np.ndarray, np.ndarray]:
    """One augmented view: ``(uint8 S x S x 3 image, bool S x S mask)``, S = ``aug.crop_size``.

    ``image`` is an RGB PIL image, ``mask`` an ``L`` image of 0/1 of the same size. The crop box
    is shared, so the mask stays aligned with the image pixel for pixel (up to the different
    resampling of the two at the object's boundary).
    """
    view, labels = augment_labels(image, mask, rng, aug)
    return view, labels > 0


def augment_labels(image: Image.Image, labels: Image.Image, rng: np.random.Generator,
                   aug: ViewAugment) -> tuple[np.ndarray, np.ndarray]:
    """:func:`augment_view` of a label map: ``(uint8 S x S x 3 image, uint8 S x S labels)``;
    ``labels`` is an ``L`` image (nearest resampling keeps its values)."""
    mask = labels
    top, left, h, w = random_resized_crop_params(image.height, image.width, aug.scale, aug.ratio, rng)
    box = (left, top, left + w, top + h)
    size = (aug.crop_size, aug.crop_size)
    image = image.resize(size, Image.BILINEAR, box=box)
    mask = mask.resize(size, Image.NEAREST, box=box)
    if rng.random() < aug.jitter_p:
        image = _color_jitter(image, aug.jitter, rng)
    if rng.random() < aug.gray_p:
        image = image.convert("L").convert("RGB")
    if rng.random() < aug.flip_p:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(image), np.asarray(mask)


def label_map(mask: np.ndarray, proposals: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (H, W): 0 background, k for the k-th proposal (1-based, disjoint bool masks),
    ``NO_PROPOSAL`` for foreground of ``mask`` no proposal covers."""
    if len(proposals) >= NO_PROPOSAL:
        raise TrainDataError(f"{len(proposals)} proposals in one image; at most {NO_PROPOSAL - 1} fit a label map")
    labels = np.where(mask, NO_PROPOSAL, 0).astype(np.uint8)
    for k, p in enumerate(proposals, start=1):
        labels[p] = k
    return labels


def keep_proposals(q: np.ndarray, k: np.ndarray, min_fg: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The proposals of a view pair's label maps whose share of both views is above ``min_fg``,
    renumbered 1..n in their order (the rest become ``NO_PROPOSAL``); returns (q, k, n)."""
    n_q = np.bincount(q.ravel(), minlength=256)
    n_k = np.bincount(k.ravel(), minlength=256)
    ids = np.arange(1, NO_PROPOSAL)
    kept = ids[(n_q[1:NO_PROPOSAL] > min_fg * q.size) & (n_k[1:NO_PROPOSAL] > min_fg * k.size)]
    lut = np.full(256, NO_PROPOSAL, np.uint8)
    lut[0] = 0
    lut[kept] = np.arange(1, kept.size + 1, dtype=np.uint8)
    return lut[q], lut[k], int(kept.size)


class TwoViewDataset(Dataset):
    """Items ``(q_img, q_mask, k_img, k_mask, stats, sample)`` for keys ``(epoch, index)``.

    ``q_img``/``k_img``: uint8 3 x S x S; ``q_mask``/``k_mask``: bool S x S, or with
    ``proposals`` uint8 S x S label maps (module docstring); ``stats``: int64 (3,) counts of
    failed draws, replaced images and unreadable images (``STAT_NAMES``); ``sample``: int64, the
    index in ``samples`` of the image the views come from (``index``, or its replacement).

    Args:
        samples: the training images; ``index`` refers to this list.
        masks: the mask store (opened lazily in each worker; never read as PNG folders).
        seed: run seed; with ``(epoch, index, attempt)`` it fixes every random draw.
        aug: view augmentation.
        min_fg, max_fg: accepted foreground fraction of each view (open interval).
        redraws: draws per image before another image is used (at least 1).
        proposals: carry each image's proposals as label maps (module docstring).
    """

    def __init__(self, samples: Sequence[Sample], masks: MaskStore, seed: int,
                 aug: ViewAugment = ViewAugment(), min_fg: float = 0.01, max_fg: float = 0.99,
                 redraws: int = 3, proposals: bool = False) -> None:
        if not samples:
            raise TrainDataError("no training images")
        if redraws < 1:
            raise ValueError(f"redraws must be >= 1, got {redraws}")
        if not 0.0 <= min_fg < max_fg <= 1.0:
            raise ValueError(f"need 0 <= min_fg < max_fg <= 1, got min_fg={min_fg}, max_fg={max_fg}")
        self.samples = list(samples)
        self.masks = masks
        self.seed = seed
        self.aug = aug
        self.min_fg = min_fg
        self.max_fg = max_fg
        self.redraws = redraws
        self.proposals = proposals

    def __len__(self) -> int:
        return len(self.samples)

    def _accept(self, mask: np.ndarray) -> bool:
        return self.min_fg < float(mask.mean()) < self.max_fg

    def _load(self, i: int) -> tuple[Image.Image, Image.Image]:
        """Image and mask of sample ``i`` as PIL images (BadInputError for an unreadable image)."""
        sample = self.samples[i]
        image = load_image(sample.image)  # H x W x 3 uint8
        record = self.masks.get(sample.id, proposals=self.proposals)
        mask = record.mask  # H x W bool
        if mask.shape != image.shape[:2]:
            raise TrainDataError(
                f"mask of {sample.id!r} in {self.masks.directory} is {mask.shape[1]}x{mask.shape[0]} but "
                f"its image {sample.image} is {image.shape[1]}x{image.shape[0]}: the masks were made "
                "from other images")
        if self.proposals:
            return Image.fromarray(image), Image.fromarray(label_map(mask, [p.mask for p in record.proposals]))
        return Image.fromarray(image), Image.fromarray(mask.view(np.uint8))

    def whole(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i`` unaugmented: image H x W x 3 uint8 and its mask H x W bool (the union of
        its proposals with ``proposals``); BadInputError for an unreadable image."""
        image, mask = self._load(i)
        return np.asarray(image), np.asarray(mask) > 0

    def _replacement(self, epoch: int, index: int, candidate: int, current: int) -> int:
        n = len(self.samples)
        if n == 1:
            return current
        return (current + 1 + int(_rng(_REPLACE, self.seed, epoch, index, candidate).integers(n - 1))) % n

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        stats = [0, 0, 0]
        current, attempt, tried = index, 0, []
        for candidate in range(MAX_CANDIDATES):
            tried.append(self.samples[current].id)
            try:
                image, mask = self._load(current)
            except BadInputError:
                stats[2] += 1
                current = self._replacement(epoch, index, candidate, current)
                continue
            fg = float((np.asarray(mask) > 0).mean())
            if self.min_fg < fg < self.max_fg:  # otherwise no crop can pass: replace at once
                for _ in range(self.redraws):
                    rng = _rng(_VIEWS, self.seed, epoch, index, attempt)
                    attempt += 1
                    q_img, q_mask = augment_labels(image, mask, rng, self.aug)
                    k_img, k_mask = augment_labels(image, mask, rng, self.aug)
                    if self._accept(q_mask > 0) and self._accept(k_mask > 0):
                        if self.proposals:
                            q_mask, k_mask, n = keep_proposals(q_mask, k_mask, self.min_fg)
                        else:
                            q_mask, k_mask, n = q_mask > 0, k_mask > 0, 1
                        if n:
                            return (_chw(q_img), torch.from_numpy(q_mask.copy()), _chw(k_img),
                                    torch.from_numpy(k_mask.copy()), torch.tensor(stats, dtype=torch.int64),
                                    torch.tensor(current, dtype=torch.int64))
                    stats[0] += 1
            stats[1] += 1
            current = self._replacement(epoch, index, candidate, current)
        raise TrainDataError(
            f"no usable view pair for training index {index} (epoch {epoch}) after trying "
            f"{MAX_CANDIDATES} images ({', '.join(tried)}): every one was unreadable or its mask's "
            f"crops had foreground outside ({self.min_fg}, {self.max_fg}); check the mask artifact")


def _chw(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 array -> 3 x H x W uint8 tensor (contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of ``range(n)`` that epoch ``epoch`` visits (a pure function)."""
    return _rng(_ORDER, seed, epoch).permutation(n)


def check_batch(n: int, global_batch: int, world_size: int) -> None:
    """``n`` images fill at least one global batch, which the ``world_size`` processes share evenly."""
    if global_batch < 1 or global_batch % world_size:
        raise ValueError(f"global batch {global_batch} must be a positive multiple of the "
                         f"{world_size} processes")
    if n < global_batch:
        raise TrainDataError(f"{n} training images cannot fill one batch of {global_batch}")


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, index)`` keys for epochs ``start_epoch..end_epoch`` (1-based),
    sharded over ranks: DistributedSampler's role with ``set_epoch`` built in.

    Each epoch shuffles all ``n`` indices (``epoch_order``), cuts them into ``n // global_batch``
    global batches (the rest is dropped, as ``drop_last=True``) and gives rank ``r`` the
    ``r``-th contiguous slice of each. The global batch, hence the training, does not depend on
    the number of ranks. ``start_step`` skips that many batches of the first epoch.
    """

    def __init__(self, n: int, global_batch: int, seed: int, start_epoch: int, end_epoch: int,
                 rank: int = 0, world_size: int = 1, start_step: int = 0) -> None:
        check_batch(n, global_batch, world_size)
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.start_epoch, self.end_epoch, self.start_step = start_epoch, end_epoch, start_step
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = n // global_batch

    def __len__(self) -> int:
        epochs = max(self.end_epoch - self.start_epoch + 1, 0)
        return max(epochs * self.steps_per_epoch - self.start_step, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        lo = self.rank * self.local_batch
        for epoch in range(self.start_epoch, self.end_epoch + 1):
            order = epoch_order(self.n, self.seed, epoch)
            first = self.start_step if epoch == self.start_epoch else 0
            for step in range(first, self.steps_per_epoch):
                batch = order[step * self.global_batch: (step + 1) * self.global_batch]
                yield [(epoch, int(i)) for i in batch[lo: lo + self.local_batch]]


def make_loader(dataset: TwoViewDataset, sampler: EpochBatchSampler, num_workers: int,
                pin_memory: bool, seed: int) -> DataLoader:
    """The DataLoader over ``sampler``'s batches. It gets its own torch Generator, so creating it
    draws nothing from the global RNG (which the loop checkpoints and restores)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(derive_seed(seed, _ORDER)))
