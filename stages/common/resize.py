"""Nearest-neighbour resizing by index arrays, bit-identical to OpenCV's ``INTER_NEAREST``.

One convention for the whole pipeline: ``extract`` resizes predicted masks to the image's size,
pixel K-means stretches the feature grid's assignment over the label, and ``segment`` resizes its
class map with ``cv2.resize(..., INTER_NEAREST)``; all three must pick the same source pixels.
numpy, not cv2: cv2's thread pool, once used in a process, can deadlock a DataLoader worker
forked later.
"""
from __future__ import annotations

import numpy as np

__all__ = ["nearest_indices"]


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index (n_out,) int64 of each output position of a nearest-neighbour resize
    n_in -> n_out, as cv2 ``INTER_NEAREST`` computes it: floor(i * (1 / (n_out / n_in))) in
    double precision, clipped to n_in - 1.

    Index a 2-D array with it as ``a[nearest_indices(h, H)[:, None], nearest_indices(w, W)[None, :]]``.
    The exact-integer floor(i * n_in / n_out) differs from cv2 at some sizes: for 512 -> 374 at
    i = 187, i * n_in / n_out is exactly 256 but the double product is 255.99999999999997, so
    cv2 (and this function) take source pixel 255.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"nearest_indices: sizes must be positive, got n_in={n_in}, n_out={n_out}")
    inverse_scale = 1.0 / (n_out / n_in)
    return np.minimum(np.floor(np.arange(n_out) * inverse_scale).astype(np.int64), n_in - 1)
