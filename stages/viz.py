"""Pictures people look at: mask overlays, label colourings and contact sheets (PIL + numpy)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

from artifacts.atomic import atomic_path


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (n x 3 uint8); index 255 is white ("ignore")."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    if n > 255:
        pal[255] = (255, 255, 255)
    return pal


def colorize(label: np.ndarray) -> np.ndarray:
    """Class-index map (H, W) -> RGB (H, W, 3) with the VOC palette."""
    return voc_palette()[label.astype(np.uint8)]


def overlay_mask(img: np.ndarray, mask: np.ndarray, color=(255, 40, 40), alpha: float = 0.45) -> np.ndarray:
    """Tint ``mask`` pixels of an RGB image and draw the mask's outline."""
    out = img.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in color), max(1, img.shape[0] // 200))
    return out


#: colours of an image's proposals, best first (the first is overlay_mask's default)
PROPOSAL_COLOURS = ((255, 40, 40), (40, 200, 255), (255, 210, 0), (60, 220, 60), (220, 60, 255), (255, 140, 0))
LEFT_OUT_COLOUR = (150, 150, 150)


def overlay_proposals(img: np.ndarray, masks: Sequence[np.ndarray], left_out: np.ndarray | None = None,
                      alpha: float = 0.45) -> np.ndarray:
    """Tint and outline each of an image's proposal ``masks`` in its own colour
    (:data:`PROPOSAL_COLOURS`, in order, repeating after six), and ``left_out`` pixels (salient
    but in no proposal) in grey."""
    out = img
    if left_out is not None and left_out.any():
        out = overlay_mask(out, left_out, color=LEFT_OUT_COLOUR, alpha=alpha)
    for k, mask in enumerate(masks):
        out = overlay_mask(out, mask, color=PROPOSAL_COLOURS[k % len(PROPOSAL_COLOURS)], alpha=alpha)
    return out


def overlay_labels(img: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a colourised class map over an image; background (0) and ignore (255) stay clear."""
    col = colorize(label).astype(np.float32)
    out = img.astype(np.float32).copy()
    fg = (label > 0) & (label != 255)
    out[fg] = (1 - alpha) * out[fg] + alpha * col[fg]
    return out.astype(np.uint8)


def fit(img: np.ndarray, size: int) -> np.ndarray:
    """Resize to fit in a size x size box (aspect kept) and pad with dark grey."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_NEAREST
    small = cv2.resize(img, (nw, nh), interpolation=interp)
    canvas = np.full((size, size, 3), 40, dtype=np.uint8)
    y, x = (size - nh) // 2, (size - nw) // 2
    canvas[y: y + nh, x: x + nw] = small if small.ndim == 3 else small[..., None]
    return canvas


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], captions: Sequence[str] | None = None,
                  tile: int = 160, header: Sequence[str] | None = None) -> np.ndarray:
    """A grid image: one row per item, one tile per column (e.g. image | ground truth | prediction)."""
    n_rows, n_cols = len(rows), max(len(r) for r in rows) if rows else 1
    top = 18 if header else 0
    cap = 14 if captions else 0
    sheet = Image.new("RGB", (n_cols * (tile + 4) + 4, top + n_rows * (tile + cap + 4) + 4), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    if header:
        for c, text in enumerate(header):
            draw.text((4 + c * (tile + 4), 3), text, fill=(230, 230, 230))
    for r, row in enumerate(rows):
        y = top + 4 + r * (tile + cap + 4)
        for c, im in enumerate(row):
            sheet.paste(Image.fromarray(fit(im, tile)), (4 + c * (tile + 4), y))
        if captions:
            draw.text((4, y + tile + 1), captions[r][: tile * n_cols // 6], fill=(200, 200, 200))
    return np.asarray(sheet)


def save_png(path: Path, rgb: np.ndarray, optimize: bool = True) -> Path:
    """Write an RGB array as PNG atomically. ``optimize=False`` is about 1.6x faster for photos
    (512 x 288: 0.13 s against 0.20 s) and 1 % larger: for pictures written per image."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG", optimize=optimize)
    return path


def save_label_png(path: Path, classes: np.ndarray) -> Path:
    """Palette PNG of class indices (uint8, VOC colours), written atomically."""
    path = Path(path)
    im = Image.fromarray(classes.astype(np.uint8), mode="L")
    im.putpalette(voc_palette().ravel().tolist())  # L -> P, indices kept
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp, format="PNG", optimize=True)
    return path
