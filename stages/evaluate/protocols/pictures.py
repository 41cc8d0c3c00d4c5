"""The pictures of a segmentation protocol: confusion matrix, per-class IoU chart and a contact
sheet (image | ground truth | prediction) of a few images spread over the split."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from stages.data import BadInputError, DatasetIndex, load_image, load_label
from stages.evaluate.figures import confusion_matrix_png, per_class_iou_png
from stages.viz import colorize, contact_sheet, save_png


def pick(ids: Sequence[str], n: int) -> list[str]:
    """n ids spread evenly over the list (all of them when there are fewer)."""
    if len(ids) <= n:
        return list(ids)
    if n <= 1:
        return list(ids[:n])
    return [ids[round(i * (len(ids) - 1) / (n - 1))] for i in range(n)]


def display_classes(classes: np.ndarray) -> np.ndarray:
    """Class map with -1 ("matched to no class") shown as 255 (white in the VOC palette); uint8."""
    return np.where(classes < 0, 255, classes).astype(np.uint8)


def write_sheet(dataset: DatasetIndex, ids: Sequence[str], predict: Callable[[str, np.ndarray], np.ndarray],
                path: Path) -> Path | None:
    """Contact sheet image | ground truth | prediction; predict(id, label (H, W)) -> (H, W) uint8."""
    rows, captions = [], []
    for id_ in ids:
        sample = dataset.sample(id_)
        try:
            image = load_image(sample.image)
            label = load_label(sample.label, image.shape)
        except BadInputError:
            continue
        pred = predict(id_, label)
        valid = label != 255
        acc = float((pred[valid] == label[valid]).mean()) if valid.any() else 0.0
        rows.append([image, colorize(label), colorize(pred)])
        captions.append(f"{id_}  pixel acc {100 * acc:.0f}%")
    if not rows:
        return None
    return save_png(path, contact_sheet(rows, captions, tile=150, header=["image", "ground truth", "prediction"]))


def protocol_figures(out_dir: Path, prefix: str, title: str, names: Sequence[str], class_conf: np.ndarray,
                     per_class: Mapping[str, float], dataset: DatasetIndex, sheet_ids: Sequence[str],
                     predict: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, str]:
    """A protocol's confusion matrix, per-class IoU chart and contact sheet; caption -> file name."""
    confusion_matrix_png(class_conf, names, out_dir / f"{prefix}_confusion.png", title=f"{title}: confusion")
    per_class_iou_png(per_class, out_dir / f"{prefix}_per_class_iou.png", title=f"{title}: per-class IoU")
    pictures = {f"{title}: confusion (rows ground truth, row-normalised)": f"{prefix}_confusion.png",
                f"{title}: per-class IoU": f"{prefix}_per_class_iou.png"}
    sheet = write_sheet(dataset, sheet_ids, predict, out_dir / f"{prefix}_sheet.png")
    if sheet is not None:
        pictures[f"{title}: image | ground truth | prediction"] = sheet.name
    return pictures
