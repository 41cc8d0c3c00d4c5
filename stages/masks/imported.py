"""Masks or soft maps computed elsewhere, read from a folder of ``<id>.png`` files.

Accepted PNGs hold one channel: palette (class or region indices, foreground = index > 0), bilevel,
8- or 16-bit grayscale, or an RGB(A) file whose colour channels are equal (grayscale saved as RGB;
alpha ignored). Grayscale values are read as 0/1 when the file's maximum is 1, otherwise divided by
the type's maximum (255 or 65535), so both binary masks and soft maps come back in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.masks.postprocess import resize_nearest

__all__ = ["BadMaskError", "load_imported_mask"]


class BadMaskError(Exception):
    """A mask file that is missing, unreadable, multi-channel or of the wrong size."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _to_unit(path: Path, im: Image.Image) -> np.ndarray:
    """Decoded PNG -> float32 (h, w) in [0, 1]."""
    if im.mode == "P":
        return (np.asarray(im) > 0).astype(np.float32)
    if im.mode == "1":
        return np.asarray(im).astype(np.float32)
    if im.mode in ("RGB", "RGBA"):
        rgb = np.asarray(im)[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise BadMaskError(
                path, f"expected a single-channel PNG (grayscale or palette), found {im.mode} with distinct colours"
            )
        arr, top = rgb[..., 0], 255.0
    elif im.mode in ("L", "LA"):
        arr, top = np.asarray(im.getchannel(0)), 255.0
    elif im.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" in older Pillow)
        arr, top = np.asarray(im), 65535.0
    else:
        raise BadMaskError(
            path, f"unsupported PNG mode {im.mode}; expected a single-channel PNG (grayscale or palette)"
        )
    if arr.size and (arr.min() < 0 or arr.max() > top):
        raise BadMaskError(path, f"values outside [0, {top:g}]: min {arr.min()}, max {arr.max()}")
    if arr.size == 0 or arr.max() <= 1:
        return arr.astype(np.float32)
    return arr.astype(np.float32) / np.float32(top)


def load_imported_mask(
    directory: str | Path, id: str, shape: tuple[int, int], allow_resize: bool = False
) -> np.ndarray:
    """Read ``<directory>/<id>.png`` -> float32 (H, W) in [0, 1] at ``shape`` = (H, W).

    A size mismatch raises BadMaskError unless ``allow_resize``, which resizes with nearest
    neighbour. A missing, unreadable or multi-channel file raises BadMaskError naming its path.
    """
    path = Path(directory) / f"{id}.png"
    if not path.is_file():
        raise BadMaskError(path, "mask file not found")
    try:
        with Image.open(path) as im:
            im.load()
            unit = _to_unit(path, im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadMaskError(path, f"cannot read as PNG ({type(exc).__name__}: {exc})") from exc
    h, w = int(shape[0]), int(shape[1])
    if unit.shape != (h, w):
        if not allow_resize:
            raise BadMaskError(
                path,
                f"mask is {unit.shape[0]}x{unit.shape[1]} (HxW), image is {h}x{w}; "
                "pass allow_resize=True to resize it",
            )
        unit = resize_nearest(unit, (h, w))
    return unit
