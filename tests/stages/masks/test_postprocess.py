"""Post-processing rules: strict threshold, 8-connected small-region removal, fg bounds, resizing."""
from __future__ import annotations

import numpy as np
import pytest

from stages.masks.postprocess import PostParams, postprocess, resize_map, resize_nearest


def _square(shape, top, left, size, value=1.0):
    soft = np.zeros(shape, np.float32)
    soft[top : top + size, left : left + size] = value
    return soft


def test_threshold_is_strict():
    soft = np.full((10, 10), 0.5, np.float32)
    soft[:5] = 0.51
    mask, kept, reason = postprocess(soft, PostParams(min_region=0))
    assert mask.dtype == bool and mask.shape == (10, 10)
    assert mask[:5].all() and not mask[5:].any()
    assert kept and reason == ""


def test_small_regions_removed_large_kept():
    soft = _square((100, 100), 10, 10, 3) + _square((100, 100), 50, 50, 20)  # 9 px (0.09%) and 400 px
    mask, kept, _ = postprocess(soft, PostParams())
    assert not mask[10:13, 10:13].any()
    assert mask[50:70, 50:70].all() and mask.sum() == 400
    assert kept


def test_regions_are_8_connected():
    # two 8x8 squares (64 px = 0.64% each) touching only at a corner: one 128-px region (1.28%)
    soft = _square((100, 100), 0, 0, 8) + _square((100, 100), 8, 8, 8)
    mask, kept, _ = postprocess(soft, PostParams(min_fg=0))
    assert mask.sum() == 128
    # shifted by one pixel they no longer touch: both removed
    soft = _square((100, 100), 0, 0, 8) + _square((100, 100), 9, 9, 8)
    mask, kept, reason = postprocess(soft, PostParams())
    assert mask.sum() == 0 and not kept and reason == "fg<0.01"


def test_foreground_bounds_and_reasons():
    shape = (50, 40)
    mask, kept, reason = postprocess(np.zeros(shape, np.float32))
    assert not kept and reason == "fg<0.01" and not mask.any()
    mask, kept, reason = postprocess(np.ones(shape, np.float32))
    assert not kept and reason == "fg>0.99" and mask.all()
    _, kept, reason = postprocess(np.ones(shape, np.float32), PostParams(max_fg=1.0))
    assert kept and reason == ""
    # exactly min_fg is kept (the reference skips only below 1%)
    soft = _square((100, 100), 0, 0, 10)  # 100 px = 1%
    _, kept, _ = postprocess(soft, PostParams(min_region=0))
    assert kept
    _, kept, reason = postprocess(soft, PostParams(min_region=0, min_fg=0.02))
    assert not kept and reason == "fg<0.02"


def test_minmax_option():
    soft = np.full((20, 20), 0.2, np.float32)
    soft[5:15, 5:15] = 0.4
    mask, _, _ = postprocess(soft, PostParams())
    assert not mask.any()
    mask, kept, _ = postprocess(soft, PostParams(minmax=True))
    assert mask.sum() == 100 and kept
    mask, _, reason = postprocess(np.full((20, 20), 0.7, np.float32), PostParams(minmax=True))
    assert not mask.any() and reason == "fg<0.01"  # constant map: no evidence


def test_invalid_inputs():
    with pytest.raises(ValueError, match="2-D"):
        postprocess(np.zeros((3, 4, 1), np.float32))
    with pytest.raises(ValueError, match="float"):
        postprocess(np.zeros((3, 4), np.uint8))
    with pytest.raises(ValueError, match="must be below max_fg"):
        PostParams(min_fg=0.5, max_fg=0.1)


def test_resize_nearest_samples_pixel_centres():
    mask = np.array([[1, 0], [0, 1]], bool)
    up = resize_nearest(mask, (4, 6))
    assert up.dtype == bool and up.shape == (4, 6)
    expected = np.kron(np.array([[1, 0], [0, 1]]), np.ones((2, 3), int)).astype(bool)
    np.testing.assert_array_equal(up, expected)
    labels = np.arange(12, dtype=np.int64).reshape(3, 4)
    # output column centres 0.5 and 1.5 sit at source x = 1.0 and 3.0: columns 1 and 3
    np.testing.assert_array_equal(resize_nearest(labels, (3, 2)), labels[:, [1, 3]])
    np.testing.assert_array_equal(resize_nearest(resize_nearest(labels, (6, 8)), (3, 4)), labels)


def test_resize_map_bilinear():
    soft = np.array([[0.0, 1.0]], np.float32)
    out = resize_map(soft, (1, 4))
    assert out.dtype == np.float32 and out.shape == (1, 4)
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0])
    with pytest.raises(ValueError, match="positive"):
        resize_map(soft, (0, 3))
