"""load_image / load_label / read_sample: every mode conversion and every bad-file case."""
from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from stages.data import BadInputError, Sample, load_image, load_label, read_sample


@pytest.fixture
def rgb(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)  # H=5, W=7


def _save(path: Path, img: Image.Image, **options) -> Path:
    img.save(path, **options)
    return path


def _stored(path: Path) -> Image.Image:
    """The file's header as Pillow sees it (mode, EXIF), without leaking the file handle."""
    with Image.open(path) as img:
        img.load()
        return img


def _palette_image(indices: np.ndarray) -> Image.Image:
    h, w = indices.shape
    img = Image.frombytes("P", (w, h), indices.astype(np.uint8).tobytes())
    palette = np.zeros((256, 3), np.uint8)
    palette[:, 0] = 255 - np.arange(256)  # colours unrelated to the indices
    palette[:, 1] = 7
    img.putpalette(palette.tobytes())
    return img


# ---------------------------------------------------------------- images: modes
def test_rgb_png_exact(tmp_path: Path, rgb: np.ndarray) -> None:
    out = load_image(_save(tmp_path / "a.png", Image.fromarray(rgb)))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.writeable
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_repeated(tmp_path: Path, rgb: np.ndarray) -> None:
    gray = rgb[:, :, 0]
    out = load_image(_save(tmp_path / "g.png", Image.fromarray(gray)))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_one_bit(tmp_path: Path) -> None:
    bits = np.array([[0, 1, 1], [1, 0, 0]], bool)
    out = load_image(_save(tmp_path / "b.png", Image.fromarray(bits)))
    np.testing.assert_array_equal(out[:, :, 1], bits * 255)


def test_la_drops_alpha(tmp_path: Path, rgb: np.ndarray) -> None:
    la = Image.fromarray(np.stack([rgb[:, :, 0], rgb[:, :, 1]], -1))
    assert la.mode == "LA"
    out = load_image(_save(tmp_path / "la.png", la))
    np.testing.assert_array_equal(out[:, :, 2], rgb[:, :, 0])


def test_rgba_drops_alpha_without_compositing(tmp_path: Path, rgb: np.ndarray) -> None:
    rgba = np.concatenate([rgb, np.zeros((5, 7, 1), np.uint8)], -1)  # fully transparent
    out = load_image(_save(tmp_path / "a.png", Image.fromarray(rgba)))
    np.testing.assert_array_equal(out, rgb)


def test_palette_with_transparency(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [2, 1]])
    img = _palette_image(idx)
    img.info["transparency"] = 1
    path = _save(tmp_path / "p.png", img, transparency=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(path)
    np.testing.assert_array_equal(out[:, :, 0], 255 - idx)
    np.testing.assert_array_equal(out[:, :, 1], 7)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = np.zeros((8, 16, 4), np.uint8)
    cmyk[:, 8:, 0] = 255  # right half full cyan, left half no ink
    path = _save(tmp_path / "c.jpg", Image.fromarray(cmyk, mode="CMYK"), quality=100)
    assert _stored(path).mode == "CMYK"
    out = load_image(path).astype(int)
    assert out.shape == (8, 16, 3)
    np.testing.assert_allclose(out[:, :6].mean((0, 1)), [255, 255, 255], atol=6)  # paper white
    np.testing.assert_allclose(out[:, 10:].mean((0, 1)), [0, 255, 255], atol=6)   # cyan


def test_16bit_png_scaled_by_shift(tmp_path: Path) -> None:
    a = np.array([[0, 255, 256, 4095], [32768, 65280, 65535, 1000]], np.uint16)
    path = _save(tmp_path / "d.png", Image.fromarray(a))
    assert _stored(path).mode.startswith("I")
    out = load_image(path)
    np.testing.assert_array_equal(out[:, :, 0], a >> 8)


def test_int32_in_16bit_range_and_beyond(tmp_path: Path) -> None:
    a = np.array([[0, 512, 65535]], np.int32)
    out = load_image(_save(tmp_path / "i.tif", Image.fromarray(a)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 2, 255])
    b = np.array([[-100, 0, 155]], np.int32)  # not 16-bit data: min-max
    out = load_image(_save(tmp_path / "j.tif", Image.fromarray(b)))
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255])


def test_float_images(tmp_path: Path) -> None:
    a = np.array([[0.0, 0.5, 1.0]], np.float32)
    np.testing.assert_array_equal(load_image(_save(tmp_path / "f.tif", Image.fromarray(a)))[0, :, 0],
                                  [0, 128, 255])
    b = np.array([[-1.0, 1.0, 3.0, np.nan]], np.float32)
    np.testing.assert_array_equal(load_image(_save(tmp_path / "g.tif", Image.fromarray(b)))[0, :, 0],
                                  [0, 128, 255, 0])


def test_exif_orientation_not_applied(tmp_path: Path, rgb: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path / "e.jpg", Image.fromarray(rgb), exif=exif)
    assert _stored(path).getexif()[0x0112] == 6
    assert load_image(path).shape == (5, 7, 3)  # the stored grid, which labels are aligned to


def test_truncated_images_are_not_loaded_silently() -> None:
    import stages.data  # noqa: F401  (importing the package must leave Pillow's default alone)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------- images: bad files
def test_unreadable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "junk.jpg"
    path.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(BadInputError, match=r"junk\.jpg: not an image file") as info:
        load_image(path)
    assert info.value.path == path and "not an image" in info.value.reason
    assert str(info.value) == f"{path}: {info.value.reason}"


def test_empty_and_missing(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInputError, match=r"empty\.png: empty file"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(BadInputError, match=r"gone\.png: cannot read the file \(No such file"):
        load_image(tmp_path / "gone.png")


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_jpeg(tmp_path: Path, rng: np.random.Generator, keep: float) -> None:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BadInputError, match=r"cut\.jpg: cannot decode the image .*truncated"):
        load_image(path)


def test_truncated_png(tmp_path: Path, rng: np.random.Generator) -> None:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadInputError, match=r"cut\.png: cannot decode the image"):
        load_image(path)


def test_bad_input_error_pickles(tmp_path: Path) -> None:
    err = pickle.loads(pickle.dumps(BadInputError(tmp_path / "x.png", "empty file")))
    assert isinstance(err, BadInputError)
    assert err.path == tmp_path / "x.png" and err.reason == "empty file"
    assert str(err) == f"{tmp_path / 'x.png'}: empty file"


# ---------------------------------------------------------------- labels
def test_palette_label_gives_indices(tmp_path: Path) -> None:
    idx = np.array([[0, 1, 2], [255, 15, 0]])
    out = load_label(_save(tmp_path / "l.png", _palette_image(idx)))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, idx)  # not the palette colours (255 - idx, 7, 0)


def test_grayscale_and_binary_labels(tmp_path: Path) -> None:
    values = np.array([[0, 3], [255, 1]], np.uint8)
    np.testing.assert_array_equal(load_label(_save(tmp_path / "l.png", Image.fromarray(values))), values)
    bits = np.array([[0, 1], [1, 1]], bool)
    np.testing.assert_array_equal(load_label(_save(tmp_path / "b.png", Image.fromarray(bits))), bits)


def test_16bit_label(tmp_path: Path) -> None:
    ok = np.array([[0, 20], [255, 3]], np.uint16)
    np.testing.assert_array_equal(load_label(_save(tmp_path / "ok.png", Image.fromarray(ok))), ok)
    too_big = np.array([[0, 256]], np.uint16)
    with pytest.raises(BadInputError, match=r"big\.png: label values span 0\.\.256"):
        load_label(_save(tmp_path / "big.png", Image.fromarray(too_big)))


@pytest.mark.parametrize("channels", [3, 4])
def test_colour_label_rejected(tmp_path: Path, rgb: np.ndarray, channels: int) -> None:
    arr = np.concatenate([rgb, np.full((5, 7, 1), 255, np.uint8)], -1)[:, :, :channels]
    path = _save(tmp_path / "colour.png", Image.fromarray(arr))
    with pytest.raises(BadInputError, match=r"colour\.png: label image has mode RGBA?; a label must be a "
                                              r"single-channel \(L\) or palette \(P\) image"):
        load_label(path)


def test_label_size_mismatch(tmp_path: Path) -> None:
    path = _save(tmp_path / "l.png", _palette_image(np.zeros((3, 4))))
    assert load_label(path, shape=(3, 4)).shape == (3, 4)
    assert load_label(path, shape=(3, 4, 3)).shape == (3, 4)
    with pytest.raises(BadInputError, match=r"l\.png: label is 4x3 but image is 5x3"):
        load_label(path, shape=(3, 5))


def test_unreadable_label(tmp_path: Path) -> None:
    (tmp_path / "l.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(BadInputError, match=r"l\.png: cannot decode|l\.png: not an image"):
        load_label(tmp_path / "l.png")


# ---------------------------------------------------------------- read_sample
def test_read_sample(tmp_path: Path, rgb: np.ndarray) -> None:
    img = _save(tmp_path / "i.png", Image.fromarray(rgb))
    lab = _save(tmp_path / "l.png", _palette_image(np.full((5, 7), 3)))
    image, label = read_sample(Sample("i", img, lab))
    np.testing.assert_array_equal(image, rgb)
    assert label.shape == (5, 7) and (label == 3).all()
    assert read_sample(Sample("i", img, lab), with_label=False)[1] is None
    assert read_sample(Sample("i", img, None))[1] is None


def test_read_sample_size_mismatch(tmp_path: Path, rgb: np.ndarray) -> None:
    img = _save(tmp_path / "i.png", Image.fromarray(rgb))
    lab = _save(tmp_path / "l.png", _palette_image(np.zeros((7, 5))))
    with pytest.raises(BadInputError, match=r"l\.png: label is 5x7 but image is 7x5"):
        read_sample(Sample("i", img, lab))


# -- decompression bombs: data.max_pixels --------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` pixels, with almost no data: a bomb's shape."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    bomb = _png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels claimed, 100 bytes
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadInputError, match=r"more pixels than data.max_pixels \(178956970\).*decompression bomb"):
        load_image(bomb)
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's own setting is left as it was


@pytest.mark.parametrize("limit", [1000, 500])  # 1200 pixels: PIL's warning (< 2x limit), its error (> 2x)
def test_pixel_limit_from_the_environment(tmp_path: Path, rgb: np.ndarray, monkeypatch, limit: int) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(path)
    monkeypatch.setenv("MASKCONTRAST_MAX_PIXELS", str(limit))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is turned into the skip, never printed
        with pytest.raises(BadInputError, match=f"more pixels than data.max_pixels \\({limit}\\)"):
            load_image(path)
    monkeypatch.setenv("MASKCONTRAST_MAX_PIXELS", "1200")
    assert load_image(path).shape == (30, 40, 3)
    monkeypatch.setenv("MASKCONTRAST_MAX_PIXELS", str(300_000_000))  # above PIL's default: allowed
    assert load_image(path).shape == (30, 40, 3)
