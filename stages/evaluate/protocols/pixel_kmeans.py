"""The pixel-level K-means protocol runner: every cell of the cached feature grids clustered
(baselines without a saliency head), and its clustering file for ``segment``."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from artifacts.atomic import atomic_write_json
from stages.data import BadInputError, DatasetIndex, load_label
from stages.evaluate.kmeans import (
    VOC_KMEANS_SEEDS,
    PCAWhitening,
    assign,
    cell_class_counts,
    nearest_indices,
    pixel_kmeans_protocol,
)
from stages.evaluate.metrics import MetricsError
from stages.evaluate.saliency import ProtocolError

from .common import (
    SHEET_SIZE,
    StoreLike,
    class_names,
    open_store,
    per_class_dict,
    require_features,
    require_labels,
    skipped_metrics,
)
from .kmeans import kmeans_model_dict
from .pictures import display_classes, pick, protocol_figures

PIXEL_KMEANS_MODEL_FILE = "pixel_kmeans_model.json"


def _pixel_rows(feats: np.ndarray, normalize: bool, pca: PCAWhitening | None) -> np.ndarray:
    """Features (C, h, w) -> (h * w, d) float32 rows as the pixel protocol clusters them."""
    x = np.ascontiguousarray(feats.reshape(feats.shape[0], -1).T, dtype=np.float32)  # (h*w, C)
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return pca.transform(x) if pca is not None else x


def run_pixel_kmeans(val_store: StoreLike, dataset: DatasetIndex, val_ids: Sequence[str], out_dir: Path, *,
                     n_clusters: int | None = None, seeds: Sequence[int] = VOC_KMEANS_SEEDS,
                     matching: str = "hungarian", sample_pixels: int = 100_000, sample_seed: int = 0,
                     normalize: bool = True, pca_dim: int | None = None, n_init: int = 3, n_iter: int = 50,
                     use_gpu: bool = False, split: str = "val", progress: bool = True,
                     figures: bool = True, sheet_size: int = SHEET_SIZE) -> dict[str, Any]:
    """Pixel-level K-means on the stored feature grids (baselines without a saliency head).

    Every pixel of the feature grid is clustered (k = ``n_clusters``, default the number of
    classes, background included); ``matching="majority"`` with k > classes is the
    over-clustering variant. Two streamed passes fit and score all seeds; a third, for the first
    seed only, gives the pictures (the protocol keeps no per-seed confusion). Writes
    ``pixel_kmeans_model.json`` for ``segment``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(val_store)
    names = class_names(dataset)
    feature_shape = require_features(store, "pixel-level K-means")
    ids = list(val_ids)
    require_labels(dataset, ids, split, "pixel-level K-means")
    table = store.table()
    shapes = {i: (int(h), int(w)) for i, h, w in zip(table["id"], table["height"], table["width"])}
    skipped = {i: "no embedding (extract could not read the image)" for i in ids if i not in shapes}
    ids = [i for i in ids if i in shapes]
    k = int(n_clusters) if n_clusters is not None else len(names)

    def labelled() -> Iterator[tuple[str, np.ndarray]]:
        for id_ in ids:
            if id_ in skipped:
                continue
            try:
                yield id_, load_label(dataset.sample(id_).label, shapes[id_])
            except BadInputError as exc:
                skipped[id_] = str(exc)

    def samples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for id_, label in tqdm(labelled(), total=len(ids), desc="pixel k-means", unit="img", disable=not progress):
            yield store.features(id_).transpose(1, 2, 0), label  # (f, f, C), (H, W)

    try:
        report = pixel_kmeans_protocol(samples, len(names), k, seeds=tuple(int(s) for s in seeds), matching=matching,
                                       sample_pixels=sample_pixels, sample_seed=sample_seed, normalize=normalize,
                                       pca_dim=pca_dim, n_init=n_init, n_iter=n_iter, use_gpu=use_gpu,
                                       ignore_index=dataset.ignore_index)
    except MetricsError as exc:
        raise ProtocolError(f"{dataset.root}: {exc}; the dataset declares {len(names)} classes") from None
    model = kmeans_model_dict(report.model(), "pixel", names, store,
                              {"normalize": normalize, "feature_shape": list(feature_shape), "matching": matching})
    atomic_write_json(out_dir / PIXEL_KMEANS_MODEL_FILE, model)

    per_class = per_class_dict(names, report.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:  # a third pass, for the first seed: its confusion and the sheet's class maps
        first = report.per_seed[0]
        centroids = np.asarray(first.centroids, np.float32)
        mapping = np.asarray(first.mapping, dtype=np.int64)
        class_conf = np.zeros((len(names) + 1, len(names)), dtype=np.int64)  # last row: no class
        picked = set(pick([i for i in ids if i not in skipped], sheet_size))
        preds: dict[str, np.ndarray] = {}
        for id_, label in labelled():
            feats = store.features(id_)  # (C, f, f)
            cls = mapping[assign(_pixel_rows(feats, normalize, report.pca), centroids, use_gpu)]  # (f*f,)
            grid = feats.shape[1:]
            np.add.at(class_conf, np.where(cls < 0, len(names), cls),
                      cell_class_counts(label, grid, len(names), dataset.ignore_index))
            if id_ in picked:
                h, w = label.shape
                preds[id_] = display_classes(cls.reshape(grid)[nearest_indices(grid[0], h)[:, None],
                                                        nearest_indices(grid[1], w)[None, :]])
        pictures = protocol_figures(out_dir, "pixel_kmeans", f"pixel K-means (seed {first.seed})", names,
                                    class_conf, per_class, dataset, [i for i in ids if i in preds],
                                    lambda i, _: preds[i])
    metrics = report.metrics()
    metrics.update(per_class_iou=per_class, classes=names, k=k, n_images=sum(i not in skipped for i in ids),
                   sample_pixels=sample_pixels, model_file=PIXEL_KMEANS_MODEL_FILE, figures=pictures,
                   **skipped_metrics(skipped))
    return metrics
