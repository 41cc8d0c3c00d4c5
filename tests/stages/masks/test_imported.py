"""Imported PNG masks: accepted encodings, size checks, and errors naming the file."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from stages.masks.imported import BadMaskError, load_imported_mask

BLOCK = np.array([[0, 0, 1], [0, 1, 1]], np.uint8)  # (2, 3)


def _save(tmp_path, name: str, image: Image.Image) -> None:
    image.save(tmp_path / f"{name}.png")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(BLOCK * 255, mode="L"),  # 0/255 grayscale
        lambda: Image.fromarray(BLOCK, mode="L"),  # 0/1 grayscale
        lambda: Image.fromarray(BLOCK.astype(bool)),  # bilevel
        lambda: Image.fromarray(BLOCK.astype(np.uint16) * 65535),  # 16-bit
        lambda: Image.fromarray(np.repeat(BLOCK[..., None] * 255, 3, 2), mode="RGB"),  # gray saved as RGB
    ],
)
def test_binary_encodings(tmp_path, make):
    _save(tmp_path, "a", make())
    out = load_imported_mask(tmp_path, "a", (2, 3))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, BLOCK.astype(np.float32))


def test_palette_indices_are_foreground_above_zero(tmp_path):
    im = Image.fromarray(np.array([[0, 3, 15], [0, 0, 1]], np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0] * 128)
    _save(tmp_path, "p", im)
    np.testing.assert_array_equal(load_imported_mask(tmp_path, "p", (2, 3)), [[0, 1, 1], [0, 0, 1]])


def test_soft_grayscale_map(tmp_path):
    _save(tmp_path, "s", Image.fromarray(np.array([[0, 51, 255]], np.uint8), mode="L"))
    np.testing.assert_allclose(load_imported_mask(tmp_path, "s", (1, 3)), [[0.0, 0.2, 1.0]])


def test_size_mismatch_raises_unless_resize_allowed(tmp_path):
    _save(tmp_path, "a", Image.fromarray(BLOCK * 255, mode="L"))
    with pytest.raises(BadMaskError, match=r"a\.png: mask is 2x3 \(HxW\), image is 4x6") as info:
        load_imported_mask(tmp_path, "a", (4, 6))
    assert info.value.path == str(tmp_path / "a.png")
    assert info.value.reason.startswith("mask is 2x3")
    assert str(info.value) == f"{info.value.path}: {info.value.reason}"
    out = load_imported_mask(tmp_path, "a", (4, 6), allow_resize=True)
    np.testing.assert_array_equal(out, np.kron(BLOCK, np.ones((2, 2))))


def test_missing_corrupt_and_colour_files(tmp_path):
    with pytest.raises(BadMaskError, match=r"nope\.png: mask file not found") as info:
        load_imported_mask(tmp_path, "nope", (2, 3))
    assert info.value.path == str(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    with pytest.raises(BadMaskError, match=r"junk\.png: cannot read as PNG"):
        load_imported_mask(tmp_path, "junk", (2, 3))
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    _save(tmp_path, "rgb", Image.fromarray(colour, mode="RGB"))
    with pytest.raises(BadMaskError, match=r"rgb\.png: expected a single-channel PNG"):
        load_imported_mask(tmp_path, "rgb", (2, 3))
