"""The K-means protocol runner: the paper's clustering of the val prototypes (one per image or
per proposal), its colour baseline, and the clustering file ``segment`` reads."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.atomic import atomic_write_json
from artifacts.embeddings import EmbeddingStore
from stages.data import BadInputError, DatasetIndex, load_image
from stages.evaluate.kmeans import VOC_KMEANS_SEEDS, KMeansProtocol, PCAWhitening, assign, fit_discriminant
from stages.evaluate.metrics import remap_confusion
from stages.evaluate.saliency import ProtocolError

from .common import SHEET_SIZE, StoreLike, class_names, open_store, per_class_dict, skipped_metrics
from .counts import SplitCounts, class_counts, paint, region_prototypes
from .pictures import display_classes, pick, protocol_figures

KMEANS_MODEL_FILE = "kmeans_model.json"
MODEL_SCHEMA = "maskcontrast/kmeans-model"
MODEL_SCHEMA_VERSION = 1
COLOUR_LEVELS = 4  # per RGB channel: a 64-bin joint colour histogram
# Fewer prototypes than this per whitened direction and whitening scales noise up to the signal's
# size: on the demo's 116 val prototypes, pca_dim 32 / 24 / 16 / 8 gave K-means 27.5 / 29.5 /
# 37.2 / 39.4 mIoU on the same embeddings (colour baseline 27).
PROTOTYPES_PER_WHITENED_DIM = 6


def kmeans_model_dict(report_model: dict, protocol: str, names: Sequence[str], store: EmbeddingStore,
                      extra: Mapping[str, Any]) -> dict[str, Any]:
    """The clustering file ``segment`` reads (schema ``maskcontrast/kmeans-model``): the fitted state, the
    class names and the extract parameters of the embeddings it was fitted on."""
    attrs = store.attrs
    return {"schema": MODEL_SCHEMA, "schema_version": MODEL_SCHEMA_VERSION, **report_model, "protocol": protocol,
            "class_names": list(names), "store": str(store.directory), "extract": attrs.get("extract"),
            "model": attrs.get("model"), **extra}


def whitening_note(n_prototypes: int, whitened_dim: int | None, key: str = "evaluate.kmeans.pca_dim") -> str | None:
    """A warning for the K-means report when ``whitened_dim`` (the directions PCA kept, None: no
    PCA) is large for ``n_prototypes``, else None. ``key``: the setting the note suggests lowering."""
    if whitened_dim is None or n_prototypes >= PROTOTYPES_PER_WHITENED_DIM * whitened_dim:
        return None
    return (f"PCA whitening of {whitened_dim} directions from {n_prototypes} prototypes (under "
            f"{PROTOTYPES_PER_WHITENED_DIM} per direction) scales noise directions up to the signal's; "
            f"consider {key} <= {max(1, n_prototypes // PROTOTYPES_PER_WHITENED_DIM)}")


def colour_descriptors(store: EmbeddingStore, dataset: DatasetIndex, ids: Sequence[str] | SplitCounts) -> np.ndarray:
    """Per image (per region of a :class:`SplitCounts`), the joint RGB histogram (4 levels a channel, 64 bins) of the pixels inside its
    salient mask, L1-normalised then square-rooted (Hellinger): N x 64 float32.

    The trivial baseline of the K-means protocol: the same masks, the same clustering and
    matching, but colour instead of learnt embeddings. An empty mask or an unreadable image gives
    the uniform histogram.
    """
    split = ids if isinstance(ids, SplitCounts) else None
    ids = split.ids if split is not None else list(ids)
    per_image = split.regions if split is not None and split.regions is not None else [1] * len(ids)
    out = np.full((sum(per_image), COLOUR_LEVELS ** 3), 1.0 / COLOUR_LEVELS ** 3, np.float32)
    row = 0
    for id_, n in zip(ids, per_image):
        masks = [store.get(id_).mask] if n == 1 and (split is None or split.regions is None) else \
            [r.mask for r in store.read_regions(id_)]
        try:
            image = load_image(dataset.sample(id_).image)
        except BadInputError:
            row += n
            continue
        for mask in masks:
            if image.shape[:2] == mask.shape and mask.any():
                q = (image[mask].astype(np.int64) * COLOUR_LEVELS) // 256  # P x 3 in [0, levels)
                hist = np.bincount((q[:, 0] * COLOUR_LEVELS + q[:, 1]) * COLOUR_LEVELS + q[:, 2],
                                   minlength=COLOUR_LEVELS ** 3)
                out[row] = hist / hist.sum()
            row += 1
    return np.sqrt(out)


def discriminant_space(fit_store: StoreLike, n_groups: int, *, reg: float, pca_dim: int | None,
                       seed: int = 0) -> tuple[PCAWhitening, dict[str, Any]]:
    """The label-free discriminant space (:func:`stages.evaluate.kmeans.fit_discriminant`) fitted on
    the valid region prototypes of ``fit_store`` (the train split's), with ``n_groups``
    over-clusters (fewer when the store has fewer prototypes); returns (space, its description
    for the report)."""
    store = open_store(fit_store)
    _, _, protos, valid = store.regions()
    x = protos[valid]
    if len(x) < 3:
        raise ProtocolError(f"{store.directory}: the discriminant K-means space is fitted on this split's "
                            f"prototypes and needs at least 3 usable ones, found {len(x)}")
    n_groups = min(n_groups, len(x) - 1)
    space = fit_discriminant(x, n_groups, reg=reg, pca_dim=pca_dim or 32, seed=seed)
    return space, {"name": "discriminant", "groups": n_groups, "reg": reg, "dim": space.dim,
                   "fitted_on": str(store.directory), "n_fit": len(x)}


def run_kmeans(val_store: StoreLike, dataset: DatasetIndex, val_ids: Sequence[str], out_dir: Path, *,
               n_clusters: int | None = None, seeds: Sequence[int] = VOC_KMEANS_SEEDS, pca_dim: int | None = 32,
               n_init: int = 3, use_gpu: bool = False, split: str = "val", progress: bool = True,
               figures: bool = True, sheet_size: int = SHEET_SIZE, cache_dir: Path | None = None,
               colour_baseline: bool = True, space: str = "pca", groups: int = 3, reg: float = 0.1,
               fit_store: StoreLike | None = None) -> dict[str, Any]:
    """The paper's K-means protocol on the val prototypes (one per image).

    PCA(pca_dim, whiten), k-means with ``n_clusters`` (default: number of foreground classes) per
    seed, prediction "cluster + 1 on the salient pixels, 0 elsewhere", Hungarian matching on IoU,
    mIoU averaged over seeds. Writes ``kmeans_model.json`` (PCA, centroids and mapping per seed,
    class names, the extract parameters: what ``segment`` needs) and, for the first seed, the
    confusion matrix, the per-class IoU chart and a contact sheet. The label counts are cached in
    ``cache_dir`` (default ``out_dir``).

    ``space="discriminant"``: cluster in the discriminant space of ``groups`` x ``n_clusters``
    over-clusters of ``fit_store``'s prototypes (the train split's; :func:`discriminant_space`,
    shrinkage ``reg``) instead of the PCA whitening; the colour baseline keeps PCA whitening.
    """
    if space not in ("pca", "discriminant"):
        raise ProtocolError(f"K-means space must be 'pca' or 'discriminant', got {space!r}")
    if space == "discriminant" and fit_store is None:
        raise ProtocolError("K-means space 'discriminant' is fitted on the train split's prototypes: pass fit_store")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(val_store)
    names = class_names(dataset)
    sc = class_counts(store, dataset, val_ids, progress, split=split,
                      cache_dir=out_dir if cache_dir is None else cache_dir, protocol="K-means")
    k = int(n_clusters) if n_clusters is not None else len(names) - 1
    if len(sc.counts) < k:
        what = "images" if sc.regions is None else "regions (proposals)"
        raise ProtocolError(f"{store.directory}: K-means with {k} clusters needs at least {k} {what}, split "
                            f"{split!r} has {len(sc.counts)} usable ones")
    protos = region_prototypes(store, sc)
    protocol = KMeansProtocol(n_clusters=k, seeds=tuple(int(s) for s in seeds), pca_dim=pca_dim, n_init=n_init,
                              use_gpu=use_gpu)
    fitted, described = (None, None) if space == "pca" else discriminant_space(fit_store, groups * k, reg=reg,
                                                                                pca_dim=pca_dim)
    report = protocol.run(protos, sc.counts, space=fitted)
    model = kmeans_model_dict(report.model(), "object", names, store, {"embedding_dim": int(protos.shape[1]),
                                                                      **({"space": "discriminant"} if fitted else {})})
    atomic_write_json(out_dir / KMEANS_MODEL_FILE, model)

    per_class = per_class_dict(names, report.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:
        first = report.per_seed[0]
        z = report.pca.transform(protos) if report.pca is not None else protos
        cluster = assign(z, np.asarray(first.centroids, np.float32), use_gpu)  # (N,) = the fit's assignment
        mapping = np.asarray(first.mapping, dtype=np.int64)  # predicted id (0 unsalient, c + 1) -> class
        class_conf = remap_confusion(sc.counts.confusion(cluster, k), mapping, len(names))

        def predict(id_: str, label: np.ndarray) -> np.ndarray:
            return display_classes(mapping[paint(store, sc, id_, cluster + 1)])

        pictures = protocol_figures(out_dir, "kmeans", f"K-means (seed {first.seed})", names, class_conf,
                                    per_class, dataset, pick(sc.ids, sheet_size), predict)
    metrics = report.metrics()
    metrics.update(per_class_iou=per_class, classes=names, k=k, n_images=len(sc.ids), model_file=KMEANS_MODEL_FILE,
                   figures=pictures, **skipped_metrics(sc.skipped))
    if sc.regions is not None:
        metrics["n_regions"] = len(sc.counts)
    if described is not None:
        metrics["space"] = described
    note = whitening_note(len(sc.counts), report.pca.dim if report.pca is not None and fitted is None else None)
    if note:
        metrics["note"] = note
    if colour_baseline:
        colour = protocol.run(colour_descriptors(store, dataset, sc), sc.counts).metrics()
        metrics["colour_baseline"] = {"miou": colour["miou"], "miou_std": colour["miou_std"],
                                      "descriptor": f"sqrt of the {COLOUR_LEVELS ** 3}-bin RGB histogram in the mask"}
    return metrics
