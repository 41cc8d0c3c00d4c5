"""Report figures of the segmentation protocols: confusion matrix, per-class IoU, loss curve,
and the model x protocol comparison table (markdown and bar chart).

Figures are drawn on a bare ``matplotlib.figure.Figure`` with the Agg canvas: no pyplot, so no
global backend state is touched and the functions are safe in threads and dask workers. Every
PNG is written atomically (temp name + rename), so a crash never leaves half a picture.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from artifacts.atomic import atomic_path

__all__ = [
    "cluster_sizes_png",
    "comparison_markdown",
    "comparison_png",
    "confusion_matrix_png",
    "format_miou",
    "k_selection_png",
    "loss_curve_png",
    "per_class_iou_png",
]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def confusion_matrix_png(conf: np.ndarray, class_names: Sequence[str], path: Path, *,
                         title: str | None = None) -> Path:
    """Draw a class-level confusion, row-normalised, ground truth on rows.

    ``conf``: (n_cls + r, n_cls) pixel counts in the convention of :mod:`stages.evaluate.metrics`
    (predicted class on rows, ground-truth class on columns, extra rows = predicted ids matched to
    no class). It is drawn transposed: row g shows where the pixels of class g went, as shares of
    that class's pixels; the extra rows become one last column "none" (shown only when non-empty).
    """
    conf = np.asarray(conf, dtype=np.float64)
    n_cls = len(class_names)
    if conf.ndim != 2 or conf.shape[1] != n_cls or conf.shape[0] < n_cls:
        raise ValueError(f"confusion_matrix_png: expected a ({n_cls} + r, {n_cls}) confusion for "
                         f"{n_cls} class names, got shape {conf.shape}")
    gt_rows = conf[:n_cls].T  # (GT, predicted)
    cols = list(class_names)
    none = conf[n_cls:].sum(axis=0)  # (n_cls,) GT pixels given no class
    if none.any():
        gt_rows = np.concatenate([gt_rows, none[:, None]], axis=1)
        cols.append("none")
    totals = gt_rows.sum(axis=1, keepdims=True)
    share = np.divide(gt_rows, totals, out=np.zeros_like(gt_rows), where=totals > 0)
    side = max(4.0, 0.32 * len(cols) + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(n_cls), class_names, fontsize=7)
    ax.set_xlabel("prediction (after matching)")
    ax.set_ylabel("ground truth")
    if len(cols) <= 24:  # percentages of the cells holding 5 % or more; readable up to VOC's 21 classes
        for g, p in zip(*np.nonzero(share >= 0.05)):
            ax.text(p, g, f"{100 * share[g, p]:.0f}", ha="center", va="center", fontsize=5, in_layout=False,
                    color="black" if share[g, p] > 0.6 else "white")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the class's pixels")
    ax.set_title(title or "confusion (row-normalised)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def per_class_iou_png(per_class: Mapping[str, float], path: Path, *, title: str | None = None,
                      mean: float | None = None) -> Path:
    """Bar chart of IoU (percent) per class, with the mean as a dashed line (mean of the values
    unless ``mean`` is given, e.g. a subset mean)."""
    names = list(per_class)
    values = np.array([float(per_class[n]) for n in names])
    fig = Figure(figsize=(max(4.0, 0.35 * len(names) + 1.5), 3.4), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(names)), values, color="C0")
    m = float(values.mean()) if mean is None and len(values) else mean
    if m is not None:
        ax.axhline(m, color="C3", linestyle="--", linewidth=1, label=f"mean {m:.1f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "per-class IoU", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def loss_curve_png(values: Sequence[float], path: Path, *, val_miou: Sequence[float | None] | None = None,
                   ylabel: str = "training loss", title: str | None = None) -> Path:
    """Loss per epoch (x = 1..n); with ``val_miou`` also the val mIoU (percent) on a second axis."""
    values = [float(v) for v in values]
    epochs = np.arange(1, len(values) + 1)
    fig = Figure(figsize=(5.5, 3.4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(epochs, values, color="C0", marker="." if len(values) < 30 else None, label=ylabel)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel, color="C0")
    ax.grid(alpha=0.3)
    if val_miou is not None and any(v is not None for v in val_miou):
        ax2 = ax.twinx()
        y = np.array([np.nan if v is None else float(v) for v in val_miou])
        ax2.plot(np.arange(1, len(y) + 1), y, color="C1", marker="." if len(y) < 30 else None)
        ax2.set_ylabel("val mIoU (%)", color="C1")
    ax.set_title(title or ylabel, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def cluster_sizes_png(sizes: Sequence[int], names: Sequence[str], colours: np.ndarray, path: Path, *,
                      title: str | None = None) -> Path:
    """Bar chart of images per cluster, each bar in its cluster's colour (colours (k, 3) uint8)."""
    sizes = [int(v) for v in sizes]
    fig = Figure(figsize=(max(4.0, 0.4 * len(sizes) + 1.5), 3.4), dpi=100)
    ax = fig.add_subplot()
    ax.bar(range(len(sizes)), sizes, color=np.asarray(colours, np.float64) / 255.0, edgecolor="black", linewidth=0.5)
    for i, v in enumerate(sizes):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(sizes)), list(names), rotation=90, fontsize=7)
    ax.set_ylabel("images")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title or "images per cluster", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def k_selection_png(ks: Sequence[int], silhouette: Sequence[float], inertia: Sequence[float], chosen: int,
                    path: Path, *, title: str | None = None) -> Path:
    """Mean silhouette (left axis) and k-means inertia (right axis) against k, the chosen k marked."""
    fig = Figure(figsize=(5.5, 3.4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(ks, silhouette, color="C0", marker=".", label="mean silhouette")
    ax.axvline(chosen, color="C3", linestyle="--", linewidth=1, label=f"chosen k = {chosen}")
    ax.set_xlabel("k (clusters)")
    ax.set_ylabel("mean silhouette", color="C0")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(ks, inertia, color="C1", marker=".", alpha=0.7)
    ax2.set_ylabel("inertia (whitened)", color="C1")
    ax.set_title(title or "choosing k", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------- comparison table


def format_miou(mean: float | None, std: float | None, n_seeds: int = 1) -> str:
    """'43.21 ± 1.05' (std shown for more than one seed), '43.21' for one, '-' without a value."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    if n_seeds > 1 and std is not None:
        return f"{mean:.2f} ± {std:.2f}"
    return f"{mean:.2f}"


_ALSO = (("miou_subset", "class subset"), ("miou_best_on_val", "best epoch on val"))


def comparison_markdown(rows: Sequence[Mapping[str, Any]], title: str = "Evaluation comparison") -> str:
    """Markdown of comparison rows (keys model, protocol, miou, miou_std, seeds, status, errors, and
    optionally miou_subset / miou_best_on_val): one line per model x protocol, mIoU as mean ± std
    over seeds, other headline figures in the "also" column."""
    lines = [f"# {title}", "", "| model | protocol | mIoU (%) | seeds | also | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        seeds = r.get("seeds") or []
        status = r["status"]
        if r.get("errors"):
            status += ": " + "; ".join(str(e).replace("|", "\\|").replace("\n", " ") for e in r["errors"])
        also = "; ".join(f"{label} {r[key]:.2f}" for key, label in _ALSO if r.get(key) is not None) or "-"
        lines.append(f"| {r['model']} | {r['protocol']} | {format_miou(r.get('miou'), r.get('miou_std'), len(seeds))} "
                     f"| {', '.join(map(str, seeds)) or '-'} | {also} | {status} |")
    return "\n".join(lines) + "\n"


def comparison_png(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str | None = None) -> Path:
    """Grouped bar chart: one group per protocol, one bar per model, error bars = std over seeds.
    Rows without a value (failed jobs) are left out."""
    rows = [r for r in rows if r.get("miou") is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    cell = {(r["model"], r["protocol"]): r for r in rows}
    width = 0.8 / max(1, len(models))
    fig = Figure(figsize=(max(4.5, 1.2 * len(protocols) * max(1, len(models)) ** 0.5 + 2), 3.6), dpi=100)
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        xs, ys, errs = [], [], []
        for j, protocol in enumerate(protocols):
            r = cell.get((model, protocol))
            if r is not None:
                xs.append(j + (i - (len(models) - 1) / 2) * width)
                ys.append(float(r["miou"]))
                errs.append(float(r.get("miou_std") or 0.0))
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=model, color=f"C{i % 10}")
    ax.set_xticks(range(len(protocols)), protocols)
    ax.set_ylabel("mIoU (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    if models:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title or "mIoU per model and protocol (mean ± std over seeds)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)
