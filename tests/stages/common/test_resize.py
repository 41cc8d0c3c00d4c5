"""Nearest-neighbour index arrays against OpenCV's INTER_NEAREST itself."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages.common.resize import nearest_indices


def resize(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return a[nearest_indices(a.shape[0], shape[0])[:, None], nearest_indices(a.shape[1], shape[1])[None, :]]


@pytest.mark.parametrize("src, dst", [
    ((32, 32), (374, 500)),   # up, non-square; 32 -> 374 is where floor(i * n_in / n_out) is off
    ((28, 21), (288, 512)),   # up, odd grid; 28 -> 288 differs from the integer formula three times
    ((7, 13), (343, 31)),     # up one side, 7 -> 343 differs too
    ((512, 512), (374, 498)), # down, the sizes that first showed the difference
    ((375, 500), (33, 17)),   # down, odd and non-square
    ((1, 9), (5, 1)),         # single row / column
    ((17, 17), (17, 17)),     # identity
])
def test_2d_resize_equals_cv2(src, dst):
    a = np.arange(src[0] * src[1], dtype=np.int32).reshape(src)  # every source pixel distinct
    ref = cv2.resize(a, dst[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(resize(a, dst), ref)


def test_feature_grid_sizes_to_every_label_size_equal_cv2():
    """Every grid side extract writes or a user may pick, to every output side up to 1024."""
    for n_in in (7, 8, 14, 16, 28, 32, 56, 64):
        row = np.arange(n_in, dtype=np.float32)[None].repeat(2, 0)  # (2, n_in): cv2 wants 2-D
        for n_out in range(1, 1025):
            ref = cv2.resize(row, (n_out, 2), interpolation=cv2.INTER_NEAREST)[0].astype(np.int64)
            np.testing.assert_array_equal(nearest_indices(n_in, n_out), ref, err_msg=f"{n_in} -> {n_out}")


def test_sizes_must_be_positive():
    assert nearest_indices(4, 2).tolist() == [0, 2] and nearest_indices(2, 4).tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="sizes must be positive, got n_in=0, n_out=3"):
        nearest_indices(0, 3)
    with pytest.raises(ValueError, match="n_out=0"):
        nearest_indices(3, 0)
