"""Training data: aligned augmentation, view-pair acceptance and replacement, determinism, batches."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artifacts.masks import MaskRecord, MaskStore, write_mask_shard
from stages.data import Sample
from stages.train.data import (
    EpochBatchSampler,
    TrainDataError,
    TwoViewDataset,
    ViewAugment,
    augment_view,
    epoch_order,
    make_loader,
    random_resized_crop_params,
)

NO_COLOUR = ViewAugment(crop_size=32, jitter_p=0.0)


def _blob_mask(h: int, w: int, seed: int) -> np.ndarray:
    """An asymmetric mask: a rectangle, a disk and an L-shaped bar (so flips and shifts show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    y0, x0 = rng.integers(0, h // 3), rng.integers(0, w // 3)
    mask = (yy >= y0) & (yy < y0 + h // 4) & (xx >= x0) & (xx < x0 + w // 3)
    cy, cx = rng.integers(h // 2, h - 6), rng.integers(w // 2, w - 6)
    mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < (min(h, w) // 8) ** 2
    mask |= (xx >= w - 8) & (xx < w - 4) & (yy > h // 3)
    mask |= (yy >= h - 6) & (yy < h - 3) & (xx > w // 2)
    return mask


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels within one pixel of a mask edge (3 x 3 neighbourhood not constant)."""
    p = np.pad(mask, 1, mode="edge")
    h, w = mask.shape
    shifted = [p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return np.any([s != mask for s in shifted], axis=0)


# --------------------------------------------------------------------------- augmentation


def test_crop_params_stay_inside_the_image_with_scale_and_ratio_in_range() -> None:
    rng = np.random.default_rng(0)
    for h, w in [(40, 48), (375, 500), (17, 90), (90, 17)]:
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_params(h, w, (0.2, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
            if (h, w) == (375, 500):  # the sampling branch is always taken: area and ratio hold
                assert 0.2 * h * w * 0.9 <= ch * cw <= h * w
                assert 3 / 4 * 0.95 <= cw / ch <= 4 / 3 * 1.05


def test_crop_params_fall_back_to_the_central_crop_of_torchvision() -> None:
    # An impossible request (area > image) exhausts the 10 tries: centre crop clipped to the ratio.
    rng = np.random.default_rng(0)
    assert random_resized_crop_params(20, 100, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 36, 20, 27)
    assert random_resized_crop_params(100, 20, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (36, 0, 27, 20)
    assert random_resized_crop_params(30, 30, (2.0, 3.0), (3 / 4, 4 / 3), rng) == (0, 0, 30, 30)


def test_mask_equals_the_thresholded_image_after_crop_flip_and_grayscale() -> None:
    """The image encodes the mask (white on black); every augmentation but colour jitter keeps
    image and mask aligned: they may disagree only where bilinear and nearest resampling meet an
    edge, never by a shift or a flip."""
    mask = _blob_mask(60, 80, seed=1)
    image = Image.fromarray(np.repeat(mask[:, :, None] * np.uint8(255), 3, axis=2))
    mask_im = Image.fromarray(mask.view(np.uint8))
    aug = ViewAugment(crop_size=48, jitter_p=0.0, gray_p=0.5)
    for draw in range(60):
        img, m = augment_view(image, mask_im, np.random.default_rng(draw), aug)
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and m.shape == (48, 48) and m.dtype == bool
        disagree = (img[:, :, 0] > 127) != m
        assert not (disagree & ~_boundary(m)).any(), f"draw {draw}: image and mask misaligned"
        assert disagree.mean() < 0.05


def test_whole_image_crop_with_flip_equals_the_flipped_resized_mask() -> None:
    mask = _blob_mask(40, 40, seed=2)
    mask_im = Image.fromarray(mask.view(np.uint8))
    image = Image.fromarray(np.repeat(mask[:, :, None] * np.uint8(255), 3, axis=2))
    aug = ViewAugment(crop_size=20, scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=1.0)
    _, m = augment_view(image, mask_im, np.random.default_rng(0), aug)
    expected = np.asarray(mask_im.resize((20, 20), Image.NEAREST)) > 0
    np.testing.assert_array_equal(m, expected[:, ::-1])
    assert not np.array_equal(m, expected)  # the flip is visible


def test_colour_jitter_and_grayscale_change_colours_only() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    image, mask_im = Image.fromarray(pixels), Image.fromarray(np.ones((32, 32), np.uint8))
    whole = dict(crop_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    plain, _ = augment_view(image, mask_im, np.random.default_rng(1), ViewAugment(**whole, jitter_p=0, gray_p=0))
    np.testing.assert_array_equal(plain, pixels)  # identity crop: bilinear resampling changes nothing
    jittered, _ = augment_view(image, mask_im, np.random.default_rng(1), ViewAugment(**whole, jitter_p=1, gray_p=0))
    assert np.abs(jittered.astype(int) - pixels).mean() > 1.0
    gray, _ = augment_view(image, mask_im, np.random.default_rng(1), ViewAugment(**whole, jitter_p=0, gray_p=1))
    assert (gray[:, :, 0] == gray[:, :, 1]).all() and (gray[:, :, 1] == gray[:, :, 2]).all()


# --------------------------------------------------------------------------- the dataset


def _write_set(root: Path, masks: list[np.ndarray], corrupt: tuple[int, ...] = ()) -> tuple[list[Sample], MaskStore]:
    """Images whose red channel is 255 on the mask, noise elsewhere; masks in one shard."""
    rng = np.random.default_rng(0)
    samples, records = [], []
    for i, mask in enumerate(masks):
        path = root / f"im{i}.png"
        if i in corrupt:
            path.write_bytes(b"not a png")
        else:
            pixels = rng.integers(0, 200, (*mask.shape, 3), dtype=np.uint8)
            pixels[mask] = (255, 0, 0)
            Image.fromarray(pixels).save(path)
        samples.append(Sample(f"im{i}", path, None))
        records.append(MaskRecord(f"im{i}", mask))
    write_mask_shard(root / "masks" / "shard-00000.h5", records)
    return samples, MaskStore(root / "masks")


def _square(h: int = 40, w: int = 48, size: int = 20, y: int = 8, x: int = 10) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[y:y + size, x:x + size] = True
    return mask


def _stripes(h: int = 40, w: int = 48, period: int = 4) -> np.ndarray:
    """Vertical stripes: every crop wider than two periods holds about half foreground."""
    return np.broadcast_to((np.arange(w) // period) % 2 == 0, (h, w)).copy()


def _fg_ok(mask: torch.Tensor) -> bool:
    return 0.01 < mask.float().mean().item() < 0.99


def test_items_are_two_aligned_views_with_accepted_foreground(tmp_path: Path) -> None:
    samples, store = _write_set(tmp_path, [_square(), _square(y=2, x=20)])
    ds = TwoViewDataset(samples, store, seed=0, aug=NO_COLOUR)
    q_img, q_mask, k_img, k_mask, stats, sample = ds[(1, 0)]
    assert q_img.shape == k_img.shape == (3, 32, 32) and q_img.dtype == torch.uint8
    assert q_mask.shape == k_mask.shape == (32, 32) and q_mask.dtype == torch.bool
    assert _fg_ok(q_mask) and _fg_ok(k_mask)
    assert not torch.equal(q_mask, k_mask)  # independent crops
    for img, mask in ((q_img, q_mask), (k_img, k_mask)):  # red 255 exactly where the mask is
        red = img[0].numpy() == 255
        assert not ((red != mask.numpy()) & ~_boundary(mask.numpy())).any()
    assert stats[1:].tolist() == [0, 0]  # no image replaced, none unreadable
    assert sample.item() == 0  # the views come from the image asked for


def test_an_image_with_an_empty_mask_is_replaced_and_counted(tmp_path: Path) -> None:
    masks = [_stripes(), np.zeros((40, 48), bool), _stripes(period=5)]
    samples, store = _write_set(tmp_path, masks)
    ds = TwoViewDataset(samples, store, seed=0, aug=NO_COLOUR)
    for epoch in range(5):
        q_img, q_mask, k_img, k_mask, stats, sample = ds[(epoch, 1)]
        assert stats.tolist() == [0, 1, 0]  # replaced at once: no crop of an empty mask can pass
        assert sample.item() in (0, 2)  # the item names its replacement, not the empty image
        assert _fg_ok(q_mask) and _fg_ok(k_mask)
        again = ds[(epoch, 1)]
        assert torch.equal(q_img, again[0]) and torch.equal(k_mask, again[3])  # the same replacement


def test_small_objects_are_redrawn_then_replaced(tmp_path: Path) -> None:
    # A 5 x 5 object in the corner of a 100 x 100 image (fg 0.25 %, above min_fg 0.1 %): most
    # crops miss it, so draws fail, and after 3 failures the image is replaced by the other one,
    # whose stripes pass at the first draw.
    tiny = np.zeros((100, 100), bool)
    tiny[2:7, 2:7] = True
    samples, store = _write_set(tmp_path, [tiny, _stripes(100, 100)])
    ds = TwoViewDataset(samples, store, seed=0, aug=ViewAugment(crop_size=32), min_fg=0.001, redraws=3)
    counts = np.array([ds[(e, 0)][4].tolist() for e in range(20)])
    assert set(counts[:, 0]) <= {0, 1, 2, 3}
    replaced = counts[:, 1] == 1
    assert replaced.any() and (counts[replaced, 0] == 3).all()  # exactly `redraws` failures first
    assert (counts[~replaced, 0] < 3).all()


def test_unreadable_images_are_replaced_and_counted(tmp_path: Path) -> None:
    samples, store = _write_set(tmp_path, [_stripes(), _stripes(period=3), _stripes(period=5)], corrupt=(1,))
    ds = TwoViewDataset(samples, store, seed=0, aug=NO_COLOUR)
    *_, stats, _ = ds[(0, 1)]
    assert stats.tolist() == [0, 0, 1]


def test_no_usable_image_is_an_error_naming_the_images(tmp_path: Path) -> None:
    samples, store = _write_set(tmp_path, [np.zeros((20, 20), bool), np.ones((20, 20), bool)])
    ds = TwoViewDataset(samples, store, seed=0, aug=NO_COLOUR)
    with pytest.raises(TrainDataError, match=r"no usable view pair for training index 0 .*im0, im1"):
        ds[(0, 0)]


def test_mask_of_another_size_than_its_image_is_an_error(tmp_path: Path) -> None:
    samples, _ = _write_set(tmp_path, [_square()])
    write_mask_shard(tmp_path / "other" / "shard-00000.h5", [MaskRecord("im0", _square(30, 30, 10))])
    ds = TwoViewDataset(samples, MaskStore(tmp_path / "other"), seed=0, aug=NO_COLOUR)
    with pytest.raises(TrainDataError, match=r"mask of 'im0' .* is 30x30 but its image .* is 48x40"):
        ds[(0, 0)]


def test_items_are_a_pure_function_of_seed_epoch_and_index(tmp_path: Path) -> None:
    samples, store = _write_set(tmp_path, [_square(), _square(y=3, x=25)])
    ds = TwoViewDataset(samples, store, seed=7, aug=ViewAugment(crop_size=32))
    first = ds[(2, 1)]
    clone = pickle.loads(pickle.dumps(ds))  # what a loader worker holds
    ds[(0, 0)], ds[(3, 1)]  # other items in between change nothing
    for a, b, c in zip(first, ds[(2, 1)], clone[(2, 1)]):
        assert torch.equal(a, b) and torch.equal(a, c)
    other_epoch = ds[(3, 1)]
    other_seed = TwoViewDataset(samples, store, seed=8, aug=ViewAugment(crop_size=32))[(2, 1)]
    assert not torch.equal(first[0], other_epoch[0]) and not torch.equal(first[0], other_seed[0])


def test_batches_do_not_depend_on_the_number_of_workers(tmp_path: Path) -> None:
    masks = [_square(y=i, x=2 * i) for i in range(6)]
    samples, store = _write_set(tmp_path, masks)
    ds = TwoViewDataset(samples, store, seed=3, aug=ViewAugment(crop_size=24))

    def batches(workers: int) -> list:
        sampler = EpochBatchSampler(len(ds), 2, seed=3, start_epoch=1, end_epoch=2)
        return list(make_loader(ds, sampler, workers, pin_memory=False, seed=3))

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# --------------------------------------------------------------------------- batch order


def test_sampler_covers_each_epoch_once_in_a_new_order_and_drops_the_rest() -> None:
    sampler = EpochBatchSampler(10, 4, seed=0, start_epoch=1, end_epoch=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6  # 2 full batches per epoch, 2 images dropped
    for e in range(3):
        keys = [k for b in batches[2 * e: 2 * e + 2] for k in b]
        assert {k[0] for k in keys} == {e + 1}
        indices = [k[1] for k in keys]
        assert len(set(indices)) == 8 and indices == epoch_order(10, 0, e + 1)[:8].tolist()
    assert epoch_order(10, 0, 1).tolist() != epoch_order(10, 0, 2).tolist()


def test_sampler_shards_each_global_batch_over_ranks_and_resumes_mid_run() -> None:
    single = list(EpochBatchSampler(12, 4, seed=5, start_epoch=1, end_epoch=2))
    ranks = [list(EpochBatchSampler(12, 4, seed=5, start_epoch=1, end_epoch=2, rank=r, world_size=2))
             for r in range(2)]
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch  # the global batch does not depend on ranks
    later = list(EpochBatchSampler(12, 4, seed=5, start_epoch=1, end_epoch=2, start_step=2))
    assert later == single[2:]
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        EpochBatchSampler(12, 4, seed=5, start_epoch=1, end_epoch=2, world_size=3)
    with pytest.raises(TrainDataError, match="3 training images cannot fill one batch of 4"):
        EpochBatchSampler(3, 4, seed=5, start_epoch=1, end_epoch=2)
