"""Synthetic demo dataset for MaskContrast: one salient object per image, classed by shape and texture.

Each image shows one foreground object of five classes on a cluttered background:

==============  ===========  ====================================
class           shape        texture (two grey tones, ~50 % each)
==============  ===========  ====================================
disk_stripes    disk         parallel stripes
square_checker  square       checkerboard
triangle_dots   triangle     dots on a square grid
ring_spokes     ring         alternating angular sectors
cross_bullseye  plus sign    concentric circles
==============  ===========  ====================================

Colour says nothing about the class: every object is painted in two grey tones, a dark and a
light one, each covering about half of it, so all classes share one colour distribution. The
background is a gradient between two saturated colours with low-frequency colour noise and a few
smaller, fainter objects of the same five kinds in random colours. So clustering colours does not
recover the classes; shape and texture do. The object is meant to be found by saliency: it is
larger (26-38 % of the image side), drawn on top at full opacity, grey on colour, and it lies inside
the image. Label: the class index inside the object, 0 elsewhere (the background objects are
background).

The design keeps the demo learnable from random weights in minutes on a CPU. Contrastive training
learns whatever tells one image from another after the view augmentation, so within a class the
objects vary little in what the views keep: the texture period is a fixed fraction of the object's
size, the size varies by less than 1.5x (about what a crop's rescaling covers), the object stands
upright (within +-14 degrees, as photographed objects mostly do; views do not rotate, so free
rotation told instances apart better than class did), and its grey tones carry no colour. The
background is calm enough (faint clutter, gentle colour noise) for the weight-free ``priors``
saliency to find the object: poor training masks halved what the embedding learnt.

The multi-object variant (``make_demo(..., multi_object=True)``, ``maskcontrast data make-demo DIR
--multi-object``) draws two or three salient objects of different classes per image, smaller
(18-24 % of the side) and apart (a gap of at least 8 % of the side between their outer circles), so
the connected components of a saliency mask can tell them apart; each object's pixels carry its
class. It is the test bed for several proposals per image. Without the option every file is what
it was before the option existed.

Files are written to a temporary hidden name and renamed, so an interrupted run leaves only whole
files behind, and rerunning :func:`make_demo` rewrites everything deterministically from the seed
(same seed and parameters -> byte-identical files, given the same numpy, OpenCV and Pillow).
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from .index import DataError, DatasetIndex

DEMO_CLASSES = ("background", "disk_stripes", "square_checker", "triangle_dots", "ring_spokes",
                "cross_bullseye")
_KINDS = len(DEMO_CLASSES) - 1  # object kinds 1..5 (shape + texture); 0 is background

# Geometry, in units of the object's radius R (half its extent).
_EXTENT = 1.25        # bounding half-size of every shape (the triangle's vertices reach 1.2 R)
_OBJECT_RADIUS = (0.13, 0.19)    # x image side: object extent 26-38 % of the side
_CLUTTER_RADIUS = (0.035, 0.08)  # x image side: background objects, smaller
_CLUTTER_COUNT = (2, 5)          # background objects per image, [low, high)
_CLUTTER_ALPHA = (0.15, 0.3)     # their opacity: fainter than the object
_PERIOD = 0.55                   # texture period, x R
_DARK, _LIGHT = (15.0, 60.0), (195.0, 245.0)  # grey levels of the object's two tones
_BACKGROUND_SATURATION = (0.35, 0.9)  # saturated backgrounds: the grey object stands out by colour
_UPRIGHT = 0.25                  # the object's rotation is within +-this (radians); clutter: any
_BACKGROUND_VALUE = (0.35, 0.8)  # HSV value of the gradient's colours: both grey tones stand out
_BACKGROUND_NOISE = 10.0         # std of the low-frequency colour noise (grey levels)
# The multi-object variant: 2-3 objects a little smaller, apart by a gap the saliency can see.
_MULTI_COUNT = (2, 4)            # objects per image, [low, high)
_MULTI_RADIUS = (0.09, 0.12)     # x image side: extent 18-24 % of the side
_MULTI_GAP = 0.08                # x image side: least gap between the objects' outer circles
_MULTI_TRIES = 1000              # placements tried before an image takes one object fewer

_ID = r"demo_\d{5,}"
_TMP = re.compile(r"\..+\.tmp")
_OWNED = {  # what make_demo writes: anything else in the folder makes it refuse to write there
    "images": re.compile(_ID + r"\.jpg"),
    "labels": re.compile(_ID + r"\.png"),
    "splits": re.compile(r"(train|val)\.txt"),
}
_OWNED_FILES = ("classes.txt", "README.txt")


# -------------------------------------------------------------------- drawing (pure functions)
def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) HSV in [0, 1] -> (..., 3) RGB in [0, 255] (float32)."""
    h, s, v = hsv[..., :1], hsv[..., 1:2], hsv[..., 2:3]
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * h) % 6.0                        # ... x 3
    rgb = v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return (255.0 * rgb).astype(np.float32)


def _object_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n colours (n x 3 RGB) from the one distribution every class uses."""
    hsv = np.stack([rng.random(n), rng.uniform(0.25, 1.0, n), rng.uniform(0.3, 1.0, n)], -1)
    return _hsv_to_rgb(hsv)


def _shape_mask(kind: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Bool mask of shape ``kind`` (1..5) of radius ``r`` in object coordinates (u, v)."""
    if kind == 1:  # disk
        return u * u + v * v <= r * r
    if kind == 2:  # square, half side 0.8 r
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == 3:  # equilateral triangle, circumradius 1.2 r: three half-planes at the inradius
        inner = 0.6 * r
        m = -v <= inner
        for a in (np.pi / 6, 5 * np.pi / 6):
            m &= u * np.cos(a) + v * np.sin(a) <= inner
        return m
    if kind == 4:  # ring, inner radius 0.55 r
        rr = u * u + v * v
        return (rr <= r * r) & (rr >= (0.55 * r) ** 2)
    if kind == 5:  # plus sign, arm half-width 0.3 r
        au, av = np.abs(u), np.abs(v)
        w = 0.3 * r
        return ((au <= w) & (av <= r)) | ((av <= w) & (au <= r))
    raise ValueError(f"unknown object kind {kind}")


def _texture(kind: int, u: np.ndarray, v: np.ndarray, period: float, phase: np.ndarray,
             sectors: int) -> np.ndarray:
    """Bool two-colour pattern of ``kind`` (1..5), each colour covering about half the area."""
    if kind == 1:  # stripes
        return np.sin(2 * np.pi * u / period + 2 * np.pi * phase[0]) > 0
    if kind == 2:  # checkerboard, cells half a period wide
        cu = np.floor(2 * u / period + phase[0])
        cv = np.floor(2 * v / period + phase[1])
        return (cu + cv) % 2 == 0
    if kind == 3:  # dots of radius 0.4 period on a square grid: pi * 0.16 = 50 % of the area
        fu = (u / period + phase[0]) % 1.0 - 0.5
        fv = (v / period + phase[1]) % 1.0 - 0.5
        return fu * fu + fv * fv < 0.16
    if kind == 4:  # angular sectors
        return np.floor((np.arctan2(v, u) / (2 * np.pi) + phase[0]) * sectors) % 2 == 0
    if kind == 5:  # concentric circles
        return np.sin(2 * np.pi * np.sqrt(u * u + v * v) / period + 2 * np.pi * phase[0]) > 0
    raise ValueError(f"unknown object kind {kind}")


def _place(rng: np.random.Generator, kind: int, cx: float, cy: float, r: float, size: int,
           max_rotation: float = np.pi):
    """Pixel window of a shape rotated by up to +-``max_rotation``, its (u, v) object coordinates
    there (h x w float32) and its mask."""
    half = _EXTENT * r
    x0, x1 = max(0, int(cx - half)), min(size, int(np.ceil(cx + half)) + 1)
    y0, y1 = max(0, int(cy - half)), min(size, int(np.ceil(cy + half)) + 1)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5 - cx)   # 1 x w
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5 - cy)   # h x 1
    theta = rng.uniform(-max_rotation, max_rotation)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    u, v = c * dx + s * dy, c * dy - s * dx                                     # h x w each
    return (slice(y0, y1), slice(x0, x1)), u, v, _shape_mask(kind, u, v, r)


def _paint(canvas: np.ndarray, window, u, v, mask, kind: int, r: float, colours: np.ndarray,
           alpha: float, rng: np.random.Generator) -> None:
    """Blend the textured object (colours: 2 x 3) into ``canvas`` (H x W x 3 float32) under ``mask``."""
    period = r * _PERIOD
    pattern = _texture(kind, u, v, period, rng.random(2), int(rng.choice([6, 8, 10])))
    shade = 1.0 + np.float32(rng.uniform(-0.15, 0.15) / r) * u          # h x w linear shading
    colour = np.where(pattern[..., None], colours[0], colours[1]) * shade[..., None]
    weight = (np.float32(alpha) * mask)[..., None]                       # h x w x 1
    region = canvas[window]
    region += weight * (colour - region)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient between two saturated colours + low-frequency colour noise: H x W x 3 float32."""
    hsv = np.stack([rng.random(2), rng.uniform(*_BACKGROUND_SATURATION, 2), rng.uniform(*_BACKGROUND_VALUE, 2)],
                   -1)
    c0, c1 = _hsv_to_rgb(hsv)
    a = rng.uniform(0, 2 * np.pi)
    grid = np.arange(size, dtype=np.float32) - np.float32(size / 2 - 0.5)      # centred pixel coords
    t = np.float32(np.cos(a)) * grid[None, :] + np.float32(np.sin(a)) * grid[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)                     # H x W in [0, 1]
    g = int(rng.integers(3, 6))
    noise = rng.normal(0.0, _BACKGROUND_NOISE, (g, g, 3)).astype(np.float32)
    canvas = cv2.resize(noise, (size, size), interpolation=cv2.INTER_LINEAR)
    canvas += c0 + (c1 - c0) * t[..., None]
    return canvas


def _cluttered_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """The background with its faint clutter objects: H x W x 3 float32."""
    canvas = _background(rng, size)
    n = int(rng.integers(*_CLUTTER_COUNT))
    kinds = rng.integers(1, _KINDS + 1, n)
    radii = size * rng.uniform(*_CLUTTER_RADIUS, n)
    centres = rng.uniform(0, size, (n, 2))
    alphas = rng.uniform(*_CLUTTER_ALPHA, n)
    colours = _object_colours(rng, 2 * n).reshape(n, 2, 3)
    for k in range(n):
        window, u, v, mask = _place(rng, int(kinds[k]), *centres[k], radii[k], size)
        _paint(canvas, window, u, v, mask, int(kinds[k]), radii[k], colours[k], alphas[k], rng)
    return canvas


def _finish(rng: np.random.Generator, canvas: np.ndarray) -> np.ndarray:
    """Camera-like softness and noise; the image as uint8."""
    canvas = cv2.GaussianBlur(canvas, (0, 0), 0.6)
    canvas += np.float32(rng.uniform(2.0, 6.0)) * rng.standard_normal(canvas.shape, dtype=np.float32)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)             # round half up


def _check_class(cls: int) -> None:
    if not 1 <= cls <= _KINDS:
        raise ValueError(f"demo class must be in 1..{_KINDS}, got {cls}")


def render_sample(rng: np.random.Generator, cls: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One demo image (``size x size x 3`` uint8) with an object of class ``cls`` (1..5), and its
    label (``size x size`` uint8: ``cls`` inside the object, 0 elsewhere)."""
    _check_class(cls)
    canvas = _cluttered_background(rng, size)
    r = size * rng.uniform(*_OBJECT_RADIUS)
    margin = _EXTENT * r + 1
    cx, cy = rng.uniform(margin, size - margin, 2)
    window, u, v, mask = _place(rng, cls, cx, cy, r, size, max_rotation=_UPRIGHT)
    _paint(canvas, window, u, v, mask, cls, r, _object_tones(rng), 1.0, rng)

    image = _finish(rng, canvas)
    label = np.zeros((size, size), np.uint8)
    label[window][mask] = cls
    return image, label


def _place_apart(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Radii (n,) and centres (n x 2) of ``n`` objects inside the image whose outer circles
    (radius ``_EXTENT`` x r, which holds the shape at any rotation) are ``_MULTI_GAP`` x size apart;
    fewer objects when ``_MULTI_TRIES`` placements of n all fail."""
    radii = size * rng.uniform(*_MULTI_RADIUS, n)
    reach = _EXTENT * radii + 1                                           # (n,)
    gap = _MULTI_GAP * size
    for _ in range(_MULTI_TRIES):
        centres = rng.uniform(reach[:, None], size - reach[:, None], (n, 2))
        dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)   # n x n
        need = reach[:, None] + reach[None] + gap
        if (dist + np.eye(n) * need >= need).all():
            return radii, centres
    if n == 1:  # pragma: no cover - one object always fits (size >= 32)
        raise ValueError(f"cannot place a demo object in {size} px")
    return _place_apart(rng, n - 1, size)


def render_multi_sample(rng: np.random.Generator, classes: list[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """One multi-object demo image (``size x size x 3`` uint8) with one object of each of the
    distinct ``classes`` (1..5, one to three), apart from each other, and its label (``size x size``
    uint8: each object's class inside it, 0 elsewhere). Should the objects not fit apart, the last
    classes are left out (not at the sizes make_demo allows)."""
    for cls in classes:
        _check_class(cls)
    if not 1 <= len(classes) <= 3 or len(set(classes)) != len(classes):
        raise ValueError(f"a multi-object demo image needs one to three distinct classes, got {classes}")
    canvas = _cluttered_background(rng, size)
    radii, centres = _place_apart(rng, len(classes), size)
    label = np.zeros((size, size), np.uint8)
    for cls, r, (cx, cy) in zip(classes, radii, centres):
        window, u, v, mask = _place(rng, cls, cx, cy, r, size, max_rotation=_UPRIGHT)
        _paint(canvas, window, u, v, mask, cls, r, _object_tones(rng), 1.0, rng)
        label[window][mask] = cls
    return _finish(rng, canvas), label


def _object_tones(rng: np.random.Generator) -> np.ndarray:
    """The salient object's two tones (2 x 3 RGB): a dark and a light grey, in random order."""
    tones = np.array([[rng.uniform(*_DARK)] * 3, [rng.uniform(*_LIGHT)] * 3], np.float32)
    return tones if rng.random() < 0.5 else tones[::-1].copy()


# -------------------------------------------------------------------- writing
def _voc_palette() -> np.ndarray:
    """The PASCAL VOC colour map (256 x 3 uint8) for palette label PNGs."""
    idx = np.arange(256)
    pal = np.zeros((256, 3), np.int64)
    for bit in range(8):
        for ch in range(3):
            pal[:, ch] |= ((idx >> (3 * bit + ch)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode(img: Image.Image, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, **options)
    return buf.getvalue()


def _prepare(root: Path, ids: set[str]) -> None:
    """Make ``root`` ready: refuse foreign files; remove temp files and stale demo images/labels."""
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: exists and is not a directory")
    foreign: list[Path] = []
    stale: list[Path] = []
    for entry in root.iterdir() if root.is_dir() else ():
        name = entry.name
        if _TMP.fullmatch(name) and entry.is_file():
            stale.append(entry)
        elif name in _OWNED and entry.is_dir():
            for item in entry.iterdir():
                if _TMP.fullmatch(item.name) and item.is_file():
                    stale.append(item)
                elif not (_OWNED[name].fullmatch(item.name) and item.is_file()):
                    foreign.append(item)
                elif name != "splits" and item.stem not in ids:
                    stale.append(item)  # from an earlier run with more images
        elif not (name in _OWNED_FILES and entry.is_file()):
            foreign.append(entry)
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise DataError(
            f"{root}: refusing to write the demo dataset here: {sorted(foreign)[0]}{more} was not "
            "written by make_demo; choose an empty or new folder"
        )
    for path in stale:
        path.unlink()
    for sub in _OWNED:
        (root / sub).mkdir(parents=True, exist_ok=True)


def _readme(n_train: int, n_val: int, size: int, seed: int, multi_object: bool = False) -> str:
    rows = "\n".join(f"  {i}  {name}" for i, name in enumerate(DEMO_CLASSES))
    kind, flag = ("multi-object demo", " multi_object=True") if multi_object else ("demo", "")
    return f"""MaskContrast {kind} dataset (synthetic), written by stages.data.demo.make_demo
Parameters: n_train={n_train} n_val={n_val} size={size} seed={seed}{flag}
The same parameters always give byte-identical files.

Layout (folder layout of stages.data):
  images/<id>.jpg    {size}x{size} RGB, JPEG quality 95
  labels/<id>.png    palette PNG of class indices (0 = background)
  classes.txt        class names, background first
  splits/train.txt   {n_train} ids
  splits/val.txt     {n_val} ids

Classes (index, name = shape_texture):
{rows}

""" + (_MULTI_OBJECTS if multi_object else _ONE_OBJECT)


_ONE_OBJECT = """Each image holds one salient, upright object (extent 26-38 % of the side) of one class, painted in
a dark and a light grey, on a background of two saturated colours, colour noise and a few smaller,
fainter objects of the same kinds in random colours. The class is given by the object's SHAPE and
TEXTURE only: every object's tones are drawn from one distribution, so colour does not identify it.
The label is the class index inside the object and 0 elsewhere; background objects are labelled 0.
Classes are balanced within each split.
"""

_MULTI_OBJECTS = """Each image holds two or three salient, upright objects (extent 18-24 % of the side each) of
different classes, apart from each other (a gap of at least 8 % of the side), painted in a dark and
a light grey, on a background of two saturated colours, colour noise and a few smaller, fainter
objects of the same kinds in random colours. The class is given by the object's SHAPE and TEXTURE
only. The label is each object's class index inside it and 0 elsewhere; background objects are
labelled 0. Each image's first object's class is balanced within each split, the others are drawn
at random.
"""


def _multi_classes(rng: np.random.Generator, first: int) -> list[int]:
    """``first`` and one or two more distinct classes at random: the classes of one image."""
    n = int(rng.integers(*_MULTI_COUNT))
    others = rng.permutation([k for k in range(1, _KINDS + 1) if k != first])
    return [first, *(int(k) for k in others[: n - 1])]


def make_demo(root: str | os.PathLike, n_train: int = 240, n_val: int = 120, size: int = 128,
              seed: int = 0, progress: bool = False, multi_object: bool = False) -> DatasetIndex:
    """Write the demo dataset (folder layout) into ``root`` and return its index.

    ``root`` must be missing, empty, or an earlier (possibly interrupted) demo dataset, which is
    rewritten; a folder with other files raises :class:`DataError`. Deterministic in all arguments
    except ``progress`` (a tqdm bar). ``multi_object``: two or three objects of different classes
    per image (module docstring); the first object's class is balanced within each split.
    """
    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ValueError(f"need n_train >= 0, n_val >= 0 and at least one image, got {n_train}, {n_val}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    root = Path(root)
    n = n_train + n_val
    width = max(5, len(str(n - 1)))
    ids = [f"demo_{i:0{width}d}" for i in range(n)]
    _prepare(root, set(ids))

    streams = np.random.SeedSequence(seed).spawn(n + 1)  # [class assignment, image 0, image 1, ...]
    split_rng = np.random.default_rng(streams[0])
    classes = np.concatenate([split_rng.permutation(np.arange(k) % _KINDS) + 1 for k in (n_train, n_val)])
    palette = _voc_palette().tobytes()
    for i in tqdm(range(n), desc="demo images", disable=not progress):
        rng = np.random.default_rng(streams[i + 1])
        if multi_object:
            image, label = render_multi_sample(rng, _multi_classes(rng, int(classes[i])), size)
        else:
            image, label = render_sample(rng, int(classes[i]), size)
        _write_atomic(root / "images" / f"{ids[i]}.jpg",
                      _encode(Image.fromarray(image), format="JPEG", quality=95))
        png = Image.frombytes("P", (size, size), label.tobytes())
        png.putpalette(palette)
        _write_atomic(root / "labels" / f"{ids[i]}.png", _encode(png, format="PNG"))

    _write_atomic(root / "classes.txt", ("\n".join(DEMO_CLASSES) + "\n").encode())
    _write_atomic(root / "splits" / "train.txt", "".join(f"{i}\n" for i in ids[:n_train]).encode())
    _write_atomic(root / "splits" / "val.txt", "".join(f"{i}\n" for i in ids[n_train:]).encode())
    readme = _readme(n_train, n_val, size, seed, multi_object)
    _write_atomic(root / "README.txt", readme.encode())
    return DatasetIndex.open(root, layout="folder")
