"""Reading images and labels into numpy arrays, with one clear error per bad file.

Images come back as uint8 ``H x W x 3`` RGB whatever their stored mode; labels as uint8 ``H x W``
class indices. Both are decoded fully (``Image.load``) so a truncated file raises here instead of
yielding a partly grey image later; this relies on Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``
being False (its default, which this package never changes).

Decompression bombs: an image whose header claims more pixels than the limit (``data.max_pixels``,
passed to every process through the ``MASKCONTRAST_MAX_PIXELS`` environment variable; default
the size PIL refuses outright) is a :class:`BadInputError` before any pixel is decoded, so the
stages skip it with its reason like any unreadable image. PIL's ``DecompressionBombWarning`` is
turned into that error rather than printed and decoded anyway.

EXIF orientation is deliberately NOT applied: segmentation labels are aligned with the stored
pixel grid (VOC, DAVIS and most label tools ignore the EXIF tag), so rotating the image alone would
misalign it with its label.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .index import Sample


#: The size PIL refuses outright by default (its ``DecompressionBombError`` threshold, twice
#: ``Image.MAX_IMAGE_PIXELS`` = 2 x 89,478,485; about 13,400 x 13,400): far above any photo a
#: segmentation set holds (VOC: 500 x 375), while one decoded image stays about 0.5 GiB as RGB.
#: PIL's own default would only warn between 89 and 179 million pixels and decode anyway.
DEFAULT_MAX_PIXELS = 178_956_970
MAX_PIXELS_ENV = "MASKCONTRAST_MAX_PIXELS"


def max_pixels() -> int:
    """The pixel limit in force: ``$MASKCONTRAST_MAX_PIXELS`` (set by the pipeline from
    ``data.max_pixels`` while a stage runs, inherited by its worker processes), else the default."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    try:
        return int(raw) if raw else DEFAULT_MAX_PIXELS
    except ValueError:
        raise ValueError(f"{MAX_PIXELS_ENV} must be an integer number of pixels, got {raw!r}") from None


class BadInputError(Exception):
    """One image or label file is unreadable or inconsistent; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keep (path, reason) across pickling (dask workers, multiprocessing)
        return (type(self), (self.path, self.reason))


def _decode(path: Path) -> Image.Image:
    """Open and fully decode one file; any failure becomes a :class:`BadInputError`."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise BadInputError(path, f"cannot read the file ({e.strerror})") from e
    if size == 0:
        raise BadInputError(path, "empty file")
    limit = max_pixels()
    previous = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL checks the header's size at open: above the limit it warns (and decodes anyway),
            # above twice the limit it raises. Both become a skip, before any pixel is decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = limit
            with Image.open(path) as im:
                w, h = im.size
                if w * h > limit:  # formats whose size PIL does not check at open
                    raise Image.DecompressionBombError(f"{w}x{h} = {w * h} pixels")
                im.load()  # decode now: truncated data raises here (LOAD_TRUNCATED_IMAGES is False)
                return im
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise BadInputError(path, f"more pixels than data.max_pixels ({limit}), refused as a possible "
                                  f"decompression bomb ({e})") from e
    except UnidentifiedImageError as e:
        raise BadInputError(path, "not an image file (or a format Pillow cannot read)") from e
    except Exception as e:  # decoders of corrupt files raise OSError, SyntaxError, ValueError, ...
        raise BadInputError(path, f"cannot decode the image ({type(e).__name__}: {e})") from e
    finally:
        Image.MAX_IMAGE_PIXELS = previous  # other code in this process keeps PIL's own setting


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 ``H x W x 3`` RGB.

    Conversions: grayscale (``1``, ``L``, ``LA``) is repeated to three channels; alpha is dropped
    (``RGBA``, ``LA``, and palette images with transparency keep their stored colours); CMYK,
    YCbCr and other colour modes go through Pillow's RGB conversion. High-bit-depth data are
    scaled by the range of their storage type: 16-bit (``I;16*``, e.g. 16-bit PNG) by ``>> 8``;
    32-bit integer ``I`` by ``>> 8`` when its values fit 0..65535 (it then holds 16-bit data),
    otherwise min-max to 0..255; float ``F`` by ``x 255`` when within [0, 1], otherwise min-max
    (NaN -> 0). EXIF rotation is not applied (see the module docstring).
    """
    path = Path(path)
    im = _decode(path)
    mode = im.mode
    if mode == "RGB":
        return np.array(im)
    if mode in ("RGBA", "RGBX"):
        return np.ascontiguousarray(np.array(im)[:, :, :3])
    if mode in ("P", "PA"):  # via RGBA so that palette transparency is handled without warnings
        return np.ascontiguousarray(np.array(im.convert("RGBA"))[:, :, :3])
    if mode == "L":
        gray = np.array(im)
    elif mode == "1":
        gray = np.array(im.convert("L"))
    elif mode == "LA":
        gray = np.array(im)[:, :, 0]
    elif mode.startswith("I;16"):
        gray = (np.array(im).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "I":
        gray = _int_to_uint8(np.array(im))
    elif mode == "F":
        gray = _float_to_uint8(np.array(im))
    else:
        try:
            return np.array(im.convert("RGB"))
        except ValueError as e:
            raise BadInputError(path, f"unsupported image mode {mode} ({e})") from e
    return np.repeat(gray[:, :, None], 3, axis=2)  # HxW -> HxWx3


def _int_to_uint8(a: np.ndarray) -> np.ndarray:
    """int32 pixels -> uint8: ``>> 8`` for 16-bit data, min-max for any other range."""
    lo, hi = int(a.min()), int(a.max())
    if lo >= 0 and hi <= 0xFFFF:
        return (a >> 8).astype(np.uint8)
    return _minmax(a.astype(np.float64), lo, hi)


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    """float pixels -> uint8: ``x 255`` for values in [0, 1], min-max otherwise; NaN/inf -> 0."""
    finite = np.isfinite(a)
    a = np.where(finite, a, 0.0).astype(np.float64)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(a * 255.0).astype(np.uint8)
    return np.where(finite, _minmax(a, lo, hi), 0).astype(np.uint8)


def _minmax(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def load_label(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a label map as uint8 ``H x W`` class indices.

    Palette (``P``) images give their palette indices, not the colours; ``L`` gives its values,
    ``1`` gives 0/1; 16/32-bit grayscale is accepted when every value fits 0..255. Colour (RGB,
    RGBA, ...) labels are rejected. ``shape=(H, W)`` (extra trailing entries, as in an image's
    ``shape``, are ignored) checks that the label matches its image. Raises :class:`BadInputError`.
    """
    path = Path(path)
    im = _decode(path)
    mode = im.mode
    if mode in ("P", "L"):
        label = np.array(im)
    elif mode == "1":
        label = np.array(im, dtype=np.uint8)
    elif mode in ("PA", "LA"):  # index/value channel; the alpha channel means nothing in a label
        label = np.ascontiguousarray(np.array(im)[:, :, 0])
    elif mode == "I" or mode.startswith("I;16"):
        wide = np.array(im)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi > 255:
            raise BadInputError(path, f"label values span {lo}..{hi}; class indices must fit 0..255")
        label = wide.astype(np.uint8)
    else:
        raise BadInputError(
            path,
            f"label image has mode {mode}; a label must be a single-channel (L) or palette (P) "
            "image of class indices, not colours: convert colour-coded labels to indices first",
        )
    if shape is not None:
        h, w = int(shape[0]), int(shape[1])
        if label.shape != (h, w):
            raise BadInputError(path, f"label is {label.shape[1]}x{label.shape[0]} but image is {w}x{h}")
    return label


def read_sample(sample: Sample, with_label: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """(image ``HxWx3`` uint8, label ``HxW`` uint8 or None) of one sample; label checked against image."""
    image = load_image(sample.image)
    if not with_label or sample.label is None:
        return image, None
    return image, load_label(sample.label, shape=image.shape)
