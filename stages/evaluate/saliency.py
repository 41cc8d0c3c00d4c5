"""The saliency protocol: score a mask artifact against ground-truth foreground (label > 0).

Needs only a mask artifact and a labelled dataset (no training). Ground-truth pixels labelled 255
("ignore" in VOC) are counted as background, as the salient-object literature does when it
derives foreground from segmentation labels. The soft map is scored when the artifact stored
it (F-measure curves need it); otherwise the binary mask is.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from artifacts.atomic import atomic_path
from artifacts.masks import MaskStore
from stages.data import BadInputError, DatasetIndex, load_image, load_label
from stages.evaluate.saliency_metrics import SaliencyAccumulator
from stages.viz import contact_sheet, overlay_mask, save_png


class ProtocolError(ValueError):
    """A protocol cannot run on the given inputs (e.g. a dataset without labels)."""


def evaluate_saliency(mask_dir: Path, dataset: DatasetIndex, ids: Sequence[str], out_dir: Path, *,
                      threshold: float = 0.5, progress: bool = True, sheet_size: int = 8) -> dict[str, Any]:
    """Stream over ``ids``; write per-image scores, an F-measure curve and a best/worst contact sheet."""
    from tqdm import tqdm

    store = MaskStore(mask_dir)
    ids = [i for i in ids if i in store]
    if not ids:
        raise ProtocolError(f"{mask_dir}: none of the requested images has a mask")
    missing = [i for i in ids if dataset.sample(i).label is None]
    if missing:
        raise ProtocolError(f"{dataset.root}: the saliency protocol needs ground-truth labels, "
                            f"but {len(missing)} image(s) have none (e.g. {missing[0]})")
    acc = SaliencyAccumulator(threshold)
    rows, skipped = [], {}
    for id_ in tqdm(ids, desc="saliency", unit="img", disable=not progress):
        rec = store.get(id_, soft=True)
        try:
            label = load_label(dataset.sample(id_).label, rec.shape)
        except BadInputError as exc:
            skipped[id_] = str(exc)
            continue
        soft = rec.soft.astype(np.float32) / 255.0 if rec.soft is not None else rec.mask.astype(np.float32)
        gt = (label > 0) & (label != 255)
        s = acc.update(soft, gt)
        rows.append({"id": id_, "iou": round(float(s["iou"]), 5), "mae": round(float(s["mae"]), 5),
                     "f": round(float(s["f_at_threshold"]), 5), "pred_fg": round(float(s["pred_fg"]), 5),
                     "gt_fg": round(float(s["gt_fg"]), 5), "kept": bool(rec.kept)})
    if not rows:
        raise ProtocolError(f"{mask_dir}: no image could be scored ({len(skipped)} unreadable labels)")
    res = acc.result()
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "saliency_per_image.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    _plot_f_curve(res["f_curve"], out_dir / "saliency_f_curve.png")
    _sheet(store, dataset, rows, out_dir / "saliency_sheet.png", sheet_size)
    metrics = {k: float(res[k]) for k in ("iou", "max_f", "mean_f", "mae", "f_at_threshold", "pred_fg", "gt_fg")}
    metrics.update(n=int(res["n"]), threshold=threshold, n_skipped=len(skipped))
    if skipped:
        metrics["skipped"] = dict(list(skipped.items())[:20])
    return metrics


def _plot_f_curve(f_curve: list[float], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    t = np.linspace(0, 1, len(f_curve))
    ax.plot(t, f_curve)
    i = int(np.argmax(f_curve))
    ax.scatter([t[i]], [f_curve[i]], color="C3", zorder=3, label=f"max F {f_curve[i]:.3f} at {t[i]:.2f}")
    ax.set_xlabel("threshold")
    ax.set_ylabel(r"F-measure ($\beta^2=0.3$)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center")
    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _sheet(store: MaskStore, dataset: DatasetIndex, rows: list[dict], out: Path, n: int) -> None:
    """Best and worst images by IoU: image | ground truth | mask proposal."""
    order = sorted(rows, key=lambda r: r["iou"])
    pick = order[-(n // 2):][::-1] + order[: n - n // 2]
    tiles, captions = [], []
    for r in pick:
        sample = dataset.sample(r["id"])
        try:
            img = load_image(sample.image)
        except BadInputError:
            continue
        rec = store.get(r["id"])
        label = load_label(sample.label, rec.shape)
        gt = (label > 0) & (label != 255)
        tiles.append([img, overlay_mask(img, gt, color=(40, 220, 40)), overlay_mask(img, rec.mask)])
        captions.append(f"{r['id']}  IoU {r['iou']:.2f}")
    save_png(out, contact_sheet(tiles, captions, tile=150, header=["image", "ground truth", "mask proposal"]))
