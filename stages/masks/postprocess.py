"""Soft saliency map -> one binary object mask, with the reference's rules (all configurable).

The reference (MaskContrast's saliency/README) thresholds the map with ``> 0.5``, removes every
region under 1% of the image and skips the image when the remaining foreground is under 1%.
Differences, on purpose:
- regions are 8-connected components measured by their pixel count; the reference measured the
  area inside each filled contour, so a thin ring enclosing a large hole counted as large there;
- an image is also rejected when the foreground exceeds ``max_fg`` (0.99 by default): such a
  mask has no background to contrast against, and training crops need a fraction in (0.01, 0.99).
"""
from __future__ import annotations

import cv2
import numpy as np

from stages.masks.params import PostParams

__all__ = ["PostParams", "postprocess", "resize_nearest", "resize_map"]


def postprocess(soft: np.ndarray, params: PostParams = PostParams()) -> tuple[np.ndarray, bool, str]:
    """soft (H, W) float in [0, 1] -> (mask bool (H, W), kept, reason).

    ``reason`` is "" when kept, else "fg<{min_fg}" or "fg>{max_fg}" (e.g. "fg<0.01"). The mask
    is returned in both cases, at the input resolution.
    """
    soft = np.asarray(soft)
    if soft.ndim != 2 or soft.size == 0:
        raise ValueError(f"expected a non-empty 2-D saliency map, got shape {soft.shape}")
    if not np.issubdtype(soft.dtype, np.floating):
        raise ValueError(f"expected a float saliency map in [0, 1], got dtype {soft.dtype}")
    if params.minmax:
        lo, hi = float(soft.min()), float(soft.max())
        soft = (soft - lo) / (hi - lo) if hi > lo else np.zeros_like(soft)
    mask = soft > params.threshold
    if params.min_region > 0 and mask.any():
        _, comp, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= params.min_region * mask.size  # (n_components,)
        keep[0] = False  # component 0 is the background
        mask = keep[comp]
    fg = float(np.count_nonzero(mask)) / mask.size
    if fg < params.min_fg:
        return mask, False, f"fg<{params.min_fg:g}"
    if fg > params.max_fg:
        return mask, False, f"fg>{params.max_fg:g}"
    return mask, True, ""


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(s) for s in shape)
    if h < 1 or w < 1:
        raise ValueError(f"target shape must be (H, W) with positive sides, got {shape}")
    return h, w


def resize_nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array (mask or labels, any dtype) to (H, W).

    Output pixel (y, x) takes the source pixel containing its centre:
    src_y = floor((y + 0.5) * H_src / H), likewise for x.
    """
    h, w = _check_shape(shape)
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    ys = ((np.arange(h) + 0.5) * (mask.shape[0] / h)).astype(np.int64)
    xs = ((np.arange(w) + 0.5) * (mask.shape[1] / w)).astype(np.int64)
    return mask[ys[:, None], xs[None, :]]


def resize_map(soft: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D soft map to (H, W): float32."""
    h, w = _check_shape(shape)
    soft = np.asarray(soft, np.float32)
    if soft.shape == (h, w):
        return soft.copy()
    return cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
