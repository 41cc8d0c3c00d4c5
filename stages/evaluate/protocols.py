"""Protocol runners of the evaluate stage: read embedding stores and labels, write pictures, return
the protocol's metrics (REFERENCE.md "Evaluation").

Each runner streams over the images with bounded memory (one image, its label and mask at a time,
plus the small per-image tables the maths needs), writes its pictures into ``out_dir`` and returns
a JSON-ready dict with the ``metrics.json`` keys of DESIGN.md: ``miou`` (percent, mean over
seeds), ``miou_std``, ``per_class_iou`` (class name -> percent), ``pixel_accuracy`` and ``seeds``,
plus ``figures`` (caption -> file name in ``out_dir``, for the report) and protocol details.
``figures=False`` skips the pictures (e.g. batch jobs after a model's first seed); the numbers
are the same.

Scoring never rereads pixels per seed: K-means and retrieval go through per-image (outside /
inside the salient mask, class) pixel counts taken once per split at the label's full resolution
(:func:`class_counts`, cached as ``counts_<split>.npz`` in ``out_dir``),
so every seed, matching and class subset costs O(n_images x n_classes).

Images whose label cannot be read, or that the embedding store lacks (``extract`` could not read
them), are skipped and listed under ``skipped`` in the metrics (the first 20, and the count in
``n_skipped``): the score is over the images that remain. A label whose size differs from its
image is such an unreadable label (``load_label`` checks it against the stored image shape).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from artifacts.atomic import atomic_path, atomic_write_json
from artifacts.embeddings import EmbeddingStore
from stages.data import BadInputError, DatasetIndex, load_image, load_label
from stages.evaluate.crf import CRFError, CRFParams, dense_crf
from stages.evaluate.figures import confusion_matrix_png, loss_curve_png, per_class_iou_png
from stages.evaluate.kmeans import (
    VOC_KMEANS_SEEDS,
    KMeansProtocol,
    PCAWhitening,
    assign,
    cell_class_counts,
    nearest_indices,
    pixel_kmeans_protocol,
)
from stages.evaluate.metrics import (
    MetricsError,
    SalientClassCounts,
    confusion_matrix,
    remap_confusion,
    segmentation_scores,
)
from stages.evaluate.retrieval import retrieval_protocol
from stages.evaluate.saliency import ProtocolError
from stages.viz import colorize, contact_sheet, save_png

__all__ = [
    "KMEANS_MODEL_FILE",
    "PIXEL_KMEANS_MODEL_FILE",
    "ProtocolError",
    "SplitCounts",
    "class_counts",
    "kmeans_model_dict",
    "run_kmeans",
    "run_linear",
    "run_pixel_kmeans",
    "run_retrieval",
]

KMEANS_MODEL_FILE = "kmeans_model.json"
PIXEL_KMEANS_MODEL_FILE = "pixel_kmeans_model.json"
MODEL_SCHEMA = "maskcontrast/kmeans-model"
MODEL_SCHEMA_VERSION = 1
SHEET_SIZE = 12  # images in each protocol's contact sheet
_MAX_LISTED = 20  # skipped images listed by name in the metrics
_COUNTS_FORMAT = 1

StoreLike = EmbeddingStore | str | os.PathLike


# ----------------------------------------------------------------------------- shared helpers


def _open_store(store: StoreLike) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)


def _class_names(dataset: DatasetIndex) -> list[str]:
    if not dataset.classes:
        raise ProtocolError(f"{dataset.root}: the class names are unknown, so labels cannot be scored: add "
                            "classes.txt (one class name per line, background first)")
    return list(dataset.classes)


def _require_labels(dataset: DatasetIndex, ids: Sequence[str], split: str, protocol: str) -> None:
    if not ids:
        raise ProtocolError(f"{dataset.root}: split {split!r} has no image for the {protocol} protocol")
    missing = [i for i in ids if dataset.sample(i).label is None]
    if missing:
        raise ProtocolError(f"{dataset.root}: the {protocol} protocol needs ground-truth labels for split "
                            f"{split!r}, but {len(missing)} of its {len(ids)} images have none "
                            f"(e.g. {missing[0]!r})")


def _require_features(store: EmbeddingStore, protocol: str) -> tuple[int, int, int]:
    shape = store.feature_shape
    if shape is None:
        raise ProtocolError(f"{store.directory}: the {protocol} protocol needs cached decoder features, but this "
                            "embedding artifact was extracted without them: rerun extract with "
                            "`extract.features: true`")
    return shape


def _skipped_metrics(skipped: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_skipped": len(skipped)}
    if skipped:
        out["skipped"] = dict(list(sorted(skipped.items()))[:_MAX_LISTED])
    return out


def _per_class(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}


def _pick(ids: Sequence[str], n: int) -> list[str]:
    """n ids spread evenly over the list (all of them when there are fewer)."""
    if len(ids) <= n:
        return list(ids)
    if n <= 1:
        return list(ids[:n])
    return [ids[round(i * (len(ids) - 1) / (n - 1))] for i in range(n)]


def _display(classes: np.ndarray) -> np.ndarray:
    """Class map with -1 ("matched to no class") shown as 255 (white in the VOC palette); uint8."""
    return np.where(classes < 0, 255, classes).astype(np.uint8)


def _write_sheet(dataset: DatasetIndex, ids: Sequence[str], predict: Callable[[str, np.ndarray], np.ndarray],
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


def _figures(out_dir: Path, prefix: str, title: str, names: Sequence[str], class_conf: np.ndarray,
             per_class: Mapping[str, float], dataset: DatasetIndex, sheet_ids: Sequence[str],
             predict: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, str]:
    """A protocol's confusion matrix, per-class IoU chart and contact sheet; caption -> file name."""
    confusion_matrix_png(class_conf, names, out_dir / f"{prefix}_confusion.png", title=f"{title}: confusion")
    per_class_iou_png(per_class, out_dir / f"{prefix}_per_class_iou.png", title=f"{title}: per-class IoU")
    pictures = {f"{title}: confusion (rows ground truth, row-normalised)": f"{prefix}_confusion.png",
                f"{title}: per-class IoU": f"{prefix}_per_class_iou.png"}
    sheet = _write_sheet(dataset, sheet_ids, predict, out_dir / f"{prefix}_sheet.png")
    if sheet is not None:
        pictures[f"{title}: image | ground truth | prediction"] = sheet.name
    return pictures


# ----------------------------------------------------------------------------- class counts


@dataclass
class SplitCounts:
    """Per-region (outside / inside the region, class) pixel counts of one split.

    A region is what the K-means and retrieval protocols label with one id: an image's salient
    region (version-1 embeddings), or each of its proposals (version 2,
    :meth:`artifacts.embeddings.EmbeddingStore.regions`). ``ids`` are the kept images (store
    order); ``regions[i]`` how many rows of ``counts`` image ``ids[i]`` has (None: one each);
    ``skipped`` maps the requested ids left out to the reason (unreadable label, no embedding).
    """

    split: str
    ids: list[str]
    counts: SalientClassCounts
    skipped: dict[str, str] = field(default_factory=dict)
    regions: list[int] | None = None

    @property
    def row_ids(self) -> list[str]:
        """The image of each row of ``counts``."""
        if self.regions is None:
            return list(self.ids)
        return [i for i, n in zip(self.ids, self.regions) for _ in range(n)]

    def first_rows(self) -> dict[str, int]:
        """The first row of each image's regions."""
        starts = np.concatenate([[0], np.cumsum(self.regions)[:-1]]) if self.regions else range(len(self.ids))
        return {id_: int(r) for id_, r in zip(self.ids, starts)}


def _counts_key(store: EmbeddingStore, ids: Sequence[str], n_cls: int, ignore_index: int) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
    key = {"format": _COUNTS_FORMAT, "store": str(Path(store.directory).resolve()), "ids_sha256": digest,
           "n_ids": len(ids), "n_cls": n_cls, "ignore_index": ignore_index}
    if store.has_proposals:
        key["regions"] = True
    return key


def _load_counts(path: Path, key: Mapping[str, Any], split: str) -> SplitCounts | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            counts, ids = z["counts"], [str(i) for i in z["ids"]]
            skipped = dict(zip((str(i) for i in z["skipped_ids"]), (str(r) for r in z["skipped_reasons"])))
            regions = [int(r) for r in z["regions"]] if key.get("regions") else None
        n_rows = len(ids) if regions is None else sum(regions)
        if counts.shape != (n_rows, 2, key["n_cls"]) or (regions is not None and len(regions) != len(ids)):
            return None
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache: recompute
    return SplitCounts(split, ids, SalientClassCounts.from_array(counts, key["ignore_index"]), skipped, regions)


def class_counts(emb_store: StoreLike, dataset: DatasetIndex, ids: Sequence[str], progress: bool = True, *,
                 split: str = "val", cache_dir: Path | None = None, protocol: str = "K-means / retrieval") -> SplitCounts:
    """One pass over the labels of ``ids``: per image, the pixel counts of each ground-truth class
    outside and inside the stored salient mask (label at full resolution, ignore excluded).

    With ``cache_dir`` the result is kept in ``counts_<split>.npz`` (``counts`` int64 n x 2 x n_cls,
    ``ids``, ``skipped_ids`` / ``skipped_reasons``, and ``key``: the JSON of the store, requested
    ids and classes it was computed for), one file written atomically so concurrent jobs sharing a
    cache never see a torn pair; a later call with the same key reads it instead of the labels.
    Raises ProtocolError when the split has no labels or a label holds a value outside the classes.
    """
    store = _open_store(emb_store)
    names = _class_names(dataset)
    ids = list(ids)
    _require_labels(dataset, ids, split, protocol)
    key = _counts_key(store, ids, len(names), dataset.ignore_index)
    cache = None if cache_dir is None else Path(cache_dir) / f"counts_{split}.npz"
    if cache is not None:
        cached = _load_counts(cache, key, split)
        if cached is not None:
            return cached
    wanted = set(ids)
    in_store = set(store.ids())
    skipped = {i: "no embedding (extract could not read the image)" for i in ids if i not in in_store}
    acc = SalientClassCounts(len(names), dataset.ignore_index)
    kept: list[str] = []
    regions: list[int] | None = [] if store.has_proposals else None
    records = (r for r in store.iter() if r.id in wanted)
    for rec in tqdm(records, total=len(wanted & in_store), desc=f"labels {split}", unit="img", disable=not progress):
        label_path = dataset.sample(rec.id).label
        try:
            label = load_label(label_path, rec.shape)
        except BadInputError as exc:
            skipped[rec.id] = str(exc)
            continue
        try:
            if regions is None:
                acc.update(rec.mask, label)
            else:
                regions.append(len(acc.update_regions([r.mask for r in store.read_regions(rec.id)], label)))
        except MetricsError as exc:
            raise ProtocolError(f"{label_path}: {exc}; the dataset declares {len(names)} classes "
                                f"({', '.join(names[:4])}, ...)") from None
        kept.append(rec.id)
    if not kept:
        raise ProtocolError(f"{store.directory}: no image of split {split!r} could be scored "
                            f"({len(skipped)} skipped, e.g. {next(iter(skipped.values()), '')})")
    out = SplitCounts(split, kept, acc, skipped, regions)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if regions is None else {"regions": np.array(regions, dtype=np.int64)}
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, counts=acc.counts, ids=np.array(kept, dtype=str), key=json.dumps(key, sort_keys=True),
                     skipped_ids=np.array(list(skipped), dtype=str),
                     skipped_reasons=np.array(list(skipped.values()), dtype=str), **extra)
    return out


def _prototypes(store: EmbeddingStore, ids: Sequence[str] | SplitCounts) -> np.ndarray:
    """Prototypes (rows, D) float32 of ``ids`` (one per image), or of the regions of a
    :class:`SplitCounts` (one per row of its counts), from the store's index arrays."""
    if isinstance(ids, SplitCounts) and ids.regions is not None:
        all_ids, counts, protos, _ = store.regions()
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        first = dict(zip(all_ids, starts))
        rows = [first[i] + k for i, n in zip(ids.ids, ids.regions) for k in range(n)]
        return protos[np.array(rows, dtype=np.int64)]
    if isinstance(ids, SplitCounts):
        ids = ids.ids
    all_ids, protos, _ = store.prototypes()
    row = {k: i for i, k in enumerate(all_ids)}
    return protos[np.array([row[i] for i in ids], dtype=np.int64)]


def _paint(store: EmbeddingStore, sc: SplitCounts, id_: str, values: np.ndarray, background: int = 0) -> np.ndarray:
    """Image ``id_``'s prediction: ``values[row]`` on each of its regions' pixels (row: its row of
    ``sc``'s counts), ``background`` elsewhere."""
    first = sc.first_rows()[id_]
    if sc.regions is None:
        return np.where(store.get(id_).mask, values[first], background)
    regions = store.read_regions(id_)
    out = np.full(regions[0].mask.shape, background, dtype=np.asarray(values).dtype)
    for k in range(len(regions), 0, -1):
        out[regions[k - 1].mask] = values[first + k - 1]
    return out


def kmeans_model_dict(report_model: dict, protocol: str, names: Sequence[str], store: EmbeddingStore,
                      extra: Mapping[str, Any]) -> dict[str, Any]:
    """The clustering file ``segment`` reads (schema ``maskcontrast/kmeans-model``): the fitted state, the
    class names and the extract parameters of the embeddings it was fitted on."""
    attrs = store.attrs
    return {"schema": MODEL_SCHEMA, "schema_version": MODEL_SCHEMA_VERSION, **report_model, "protocol": protocol,
            "class_names": list(names), "store": str(store.directory), "extract": attrs.get("extract"),
            "model": attrs.get("model"), **extra}


# ----------------------------------------------------------------------------- K-means


COLOUR_LEVELS = 4  # per RGB channel: a 64-bin joint colour histogram
# Fewer prototypes than this per whitened direction and whitening scales noise up to the signal's
# size: on the demo's 116 val prototypes, pca_dim 32 / 24 / 16 / 8 gave K-means 27.5 / 29.5 /
# 37.2 / 39.4 mIoU on the same embeddings (colour baseline 27).
PROTOTYPES_PER_WHITENED_DIM = 6


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


def run_kmeans(val_store: StoreLike, dataset: DatasetIndex, val_ids: Sequence[str], out_dir: Path, *,
               n_clusters: int | None = None, seeds: Sequence[int] = VOC_KMEANS_SEEDS, pca_dim: int | None = 32,
               n_init: int = 3, use_gpu: bool = False, split: str = "val", progress: bool = True,
               figures: bool = True, sheet_size: int = SHEET_SIZE, cache_dir: Path | None = None,
               colour_baseline: bool = True) -> dict[str, Any]:
    """The paper's K-means protocol on the val prototypes (one per image).

    PCA(pca_dim, whiten), k-means with ``n_clusters`` (default: number of foreground classes) per
    seed, prediction "cluster + 1 on the salient pixels, 0 elsewhere", Hungarian matching on IoU,
    mIoU averaged over seeds. Writes ``kmeans_model.json`` (PCA, centroids and mapping per seed,
    class names, the extract parameters: what ``segment`` needs) and, for the first seed, the
    confusion matrix, the per-class IoU chart and a contact sheet. The label counts are cached in
    ``cache_dir`` (default ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = _open_store(val_store)
    names = _class_names(dataset)
    sc = class_counts(store, dataset, val_ids, progress, split=split,
                      cache_dir=out_dir if cache_dir is None else cache_dir, protocol="K-means")
    k = int(n_clusters) if n_clusters is not None else len(names) - 1
    if len(sc.counts) < k:
        what = "images" if sc.regions is None else "regions (proposals)"
        raise ProtocolError(f"{store.directory}: K-means with {k} clusters needs at least {k} {what}, split "
                            f"{split!r} has {len(sc.counts)} usable ones")
    protos = _prototypes(store, sc)
    protocol = KMeansProtocol(n_clusters=k, seeds=tuple(int(s) for s in seeds), pca_dim=pca_dim, n_init=n_init,
                              use_gpu=use_gpu)
    report = protocol.run(protos, sc.counts)
    model = kmeans_model_dict(report.model(), "object", names, store, {"embedding_dim": int(protos.shape[1])})
    atomic_write_json(out_dir / KMEANS_MODEL_FILE, model)

    per_class = _per_class(names, report.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:
        first = report.per_seed[0]
        z = report.pca.transform(protos) if report.pca is not None else protos
        cluster = assign(z, np.asarray(first.centroids, np.float32), use_gpu)  # (N,) = the fit's assignment
        mapping = np.asarray(first.mapping, dtype=np.int64)  # predicted id (0 unsalient, c + 1) -> class
        class_conf = remap_confusion(sc.counts.confusion(cluster, k), mapping, len(names))

        def predict(id_: str, label: np.ndarray) -> np.ndarray:
            return _display(mapping[_paint(store, sc, id_, cluster + 1)])

        pictures = _figures(out_dir, "kmeans", f"K-means (seed {first.seed})", names, class_conf, per_class,
                            dataset, _pick(sc.ids, sheet_size), predict)
    metrics = report.metrics()
    metrics.update(per_class_iou=per_class, classes=names, k=k, n_images=len(sc.ids), model_file=KMEANS_MODEL_FILE,
                   figures=pictures, **_skipped_metrics(sc.skipped))
    if sc.regions is not None:
        metrics["n_regions"] = len(sc.counts)
    note = whitening_note(len(sc.counts), report.pca.dim if report.pca is not None else None)
    if note:
        metrics["note"] = note
    if colour_baseline:
        colour = protocol.run(colour_descriptors(store, dataset, sc), sc.counts).metrics()
        metrics["colour_baseline"] = {"miou": colour["miou"], "miou_std": colour["miou_std"],
                                      "descriptor": f"sqrt of the {COLOUR_LEVELS ** 3}-bin RGB histogram in the mask"}
    return metrics


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
    store = _open_store(val_store)
    names = _class_names(dataset)
    feature_shape = _require_features(store, "pixel-level K-means")
    ids = list(val_ids)
    _require_labels(dataset, ids, split, "pixel-level K-means")
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

    per_class = _per_class(names, report.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:  # a third pass, for the first seed: its confusion and the sheet's class maps
        first = report.per_seed[0]
        centroids = np.asarray(first.centroids, np.float32)
        mapping = np.asarray(first.mapping, dtype=np.int64)
        class_conf = np.zeros((len(names) + 1, len(names)), dtype=np.int64)  # last row: no class
        picked = set(_pick([i for i in ids if i not in skipped], sheet_size))
        preds: dict[str, np.ndarray] = {}
        for id_, label in labelled():
            feats = store.features(id_)  # (C, f, f)
            cls = mapping[assign(_pixel_rows(feats, normalize, report.pca), centroids, use_gpu)]  # (f*f,)
            grid = feats.shape[1:]
            np.add.at(class_conf, np.where(cls < 0, len(names), cls),
                      cell_class_counts(label, grid, len(names), dataset.ignore_index))
            if id_ in picked:
                h, w = label.shape
                preds[id_] = _display(cls.reshape(grid)[nearest_indices(grid[0], h)[:, None],
                                                        nearest_indices(grid[1], w)[None, :]])
        pictures = _figures(out_dir, "pixel_kmeans", f"pixel K-means (seed {first.seed})", names, class_conf,
                            per_class, dataset, [i for i in ids if i in preds], lambda i, _: preds[i])
    metrics = report.metrics()
    metrics.update(per_class_iou=per_class, classes=names, k=k, n_images=sum(i not in skipped for i in ids),
                   sample_pixels=sample_pixels, model_file=PIXEL_KMEANS_MODEL_FILE, figures=pictures,
                   **_skipped_metrics(skipped))
    return metrics


# ----------------------------------------------------------------------------- retrieval


def _class_ids(names: Sequence[str], subset: Sequence[str]) -> list[int]:
    unknown = [c for c in subset if c not in names]
    if unknown:
        raise ProtocolError(f"retrieval class_subset: unknown class name(s) {unknown}; the dataset's classes are "
                            f"{', '.join(names)}")
    ids = sorted({names.index(c) for c in subset} - {0})
    if not ids:
        raise ProtocolError(f"retrieval class_subset {list(subset)} names no foreground class")
    return ids


def run_retrieval(train_store: StoreLike, val_store: StoreLike, dataset: DatasetIndex, train_ids: Sequence[str],
                  val_ids: Sequence[str], out_dir: Path, class_subset: Sequence[str] | None = None, *,
                  train_split: str = "train", val_split: str = "val", progress: bool = True,
                  figures: bool = True, sheet_size: int = SHEET_SIZE, cache_dir: Path | None = None) -> dict[str, Any]:
    """Retrieval: each val image takes its top-1 cosine neighbour's class among the train images
    (labelled with the majority class inside their salient mask) on its salient pixels.

    The "train" arguments describe the memory bank: ``train_store`` holds the embeddings of split
    ``train_split`` (the reference's bank is VOC ``train``, not the ``trainaug`` it trains on);
    ``bank_split`` and ``n_bank_images`` in the metrics record which split and how many images.
    ``miou`` is the all-classes variant (mean over every class, background included); with
    ``class_subset`` (class names, e.g. the paper's 7) the subset variant is under ``subset``:
    other classes ignored in both splits, mean over the subset without background. The label
    counts of both splits are cached in ``cache_dir`` (default ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bank_store, query_store = _open_store(train_store), _open_store(val_store)
    names = _class_names(dataset)
    subset = _class_ids(names, class_subset) if class_subset is not None else None
    cache = out_dir if cache_dir is None else cache_dir
    bank = class_counts(bank_store, dataset, train_ids, progress, split=train_split, cache_dir=cache,
                        protocol="retrieval")
    query = class_counts(query_store, dataset, val_ids, progress, split=val_split, cache_dir=cache,
                         protocol="retrieval")
    bank_protos, query_protos = _prototypes(bank_store, bank), _prototypes(query_store, query)
    if bank_protos.shape[1] != query_protos.shape[1]:
        raise ProtocolError(f"retrieval: the train embeddings {bank_store.directory} have prototypes of dimension "
                            f"{bank_protos.shape[1]} but the val embeddings {query_store.directory} have "
                            f"{query_protos.shape[1]}: extract both splits with the same model and parameters")
    try:
        full = retrieval_protocol(bank_protos, bank.counts, query_protos, query.counts)
        part = (retrieval_protocol(bank_protos, bank.counts, query_protos, query.counts, classes=subset)
                if subset is not None else None)
    except ValueError as exc:  # e.g. no train image has a labelled salient pixel
        raise ProtocolError(f"retrieval on {bank_store.directory}: {exc}") from None
    per_class = _per_class(names, full.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:
        pred = np.asarray(full.predictions, dtype=np.int64)  # class of each val region

        def predict(id_: str, label: np.ndarray) -> np.ndarray:
            return _paint(query_store, query, id_, pred).astype(np.uint8)

        pictures = _figures(out_dir, "retrieval", "retrieval (all classes)", names,
                            query.counts.class_confusion(pred), per_class, dataset, _pick(query.ids, sheet_size),
                            predict)
    metrics: dict[str, Any] = {
        "miou": full.miou, "miou_std": 0.0, "per_class_iou": per_class, "pixel_accuracy": full.pixel_accuracy,
        "seeds": [], "classes": names, "bank_split": train_split, "n_bank": full.n_bank,
        "n_bank_images": len(bank.ids),
        "n_images": len(query.ids), "deterministic": True,
    }
    if query.regions is not None:
        metrics["n_regions"] = len(query.counts)
    if part is not None:
        sub_names = [names[c] for c in part.classes]
        sub_per_class = {n: float(part.per_class_iou[c]) for n, c in zip(sub_names, part.classes)}
        metrics["subset"] = {"classes": sub_names, "miou": part.miou, "per_class_iou": sub_per_class,
                             "pixel_accuracy": part.pixel_accuracy, "n_bank": part.n_bank}
        metrics["miou_subset"] = part.miou
        if figures:
            per_class_iou_png(sub_per_class, out_dir / "retrieval_subset_per_class_iou.png",
                              title=f"retrieval ({len(sub_names)} classes): per-class IoU", mean=part.miou)
            pictures[f"retrieval ({len(sub_names)} classes): per-class IoU"] = "retrieval_subset_per_class_iou.png"
    metrics["figures"] = pictures
    skipped = {**{f"{train_split}/{k}": v for k, v in bank.skipped.items()},
               **{f"{val_split}/{k}": v for k, v in query.skipped.items()}}
    metrics.update(_skipped_metrics(skipped))
    return metrics


def _linear_crf_pass(head, samples: Iterable[tuple[str, np.ndarray, np.ndarray]], dataset: DatasetIndex,
                     names: Sequence[str], params: CRFParams, sheet_ids: set[str], val_split: str, progress: bool,
                     total: int) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """Score the probe ``head`` on val samples (id, features (C, f, f), label (H, W)) after the
    dense CRF: returns the ``crf`` metrics block, its confusion (n_cls, n_cls) and the class maps
    of the ``sheet_ids`` images. An unreadable image is skipped and listed in the block."""
    import torch

    from stages.evaluate.linear import upsampled_logits

    n_cls = len(names)
    conf = np.zeros((n_cls, n_cls), dtype=np.int64)
    skipped: dict[str, str] = {}
    preds: dict[str, np.ndarray] = {}
    seconds, n_done = 0.0, 0
    for id_, feats, label in tqdm(samples, total=total, desc="linear + CRF", unit="img", disable=not progress):
        try:
            image = load_image(dataset.sample(id_).image)  # (H', W', 3) uint8
        except BadInputError as exc:
            skipped[f"{val_split}/{id_}"] = str(exc)
            continue
        if image.shape[:2] != label.shape:
            image = cv2.resize(image, (label.shape[1], label.shape[0]), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            feats_t = torch.as_tensor(np.asarray(feats, np.float32), device=head.weight.device)[None]
            probs = torch.softmax(upsampled_logits(head, feats_t, label.shape)[0], dim=0).cpu().numpy()  # (C, H, W)
        start = time.perf_counter()
        try:
            pred = dense_crf(image, probs, params).argmax(axis=0)  # (H, W)
        except CRFError as exc:
            raise ProtocolError(f"linear + CRF on {dataset.sample(id_).image}: {exc}") from None
        seconds += time.perf_counter() - start
        n_done += 1
        conf += confusion_matrix(pred, label, n_cls, n_cls, dataset.ignore_index)
        if id_ in sheet_ids:
            preds[id_] = pred.astype(np.uint8)
    scores = segmentation_scores(conf) if n_done else None
    block = {
        "miou": 100.0 * scores.miou if scores else None,
        "per_class_iou": _per_class(names, 100.0 * scores.per_class_iou) if scores else None,
        "pixel_accuracy": 100.0 * scores.pixel_accuracy if scores else None,
        "params": params.to_dict(), "seconds_per_image": seconds / max(n_done, 1), "n_images": n_done,
        **_skipped_metrics(skipped),
    }
    return block, conf, preds


# ----------------------------------------------------------------------------- linear probe


LINEAR_CACHE_BYTES = 2 << 30  # features + labels of both splits held in memory up to this size


def run_linear(train_store: StoreLike, val_store: StoreLike, dataset: DatasetIndex, train_ids: Sequence[str],
               val_ids: Sequence[str], out_dir: Path, *, epochs: int = 60, lr: float = 0.1, lr_drop_epoch: int = 25,
               momentum: float = 0.9, weight_decay: float = 1e-4, batch_size: int = 16, seed: int = 0,
               device: str = "auto", train_split: str = "train", val_split: str = "val", progress: bool = True,
               figures: bool = True, sheet_size: int = SHEET_SIZE, crf: bool = False,
               crf_params: CRFParams | None = None) -> dict[str, Any]:
    """Linear probe (1x1 conv on the cached decoder features) trained on the train split, scored
    on val after every epoch.

    ``miou`` is the LAST epoch's val mIoU; ``miou_best_on_val`` the best epoch's, labelled as such
    (the reference reports it, choosing the epoch on the split it reports). Each epoch streams
    the train features in a seeded order (``np.random.default_rng((seed, epoch))``). Writes the
    loss curve, the last epoch's confusion / per-class IoU / contact sheet and
    ``linear_probe.npz`` (last and best head weights).

    With ``crf`` the last epoch's head scores val a second time, its class probabilities (softmax
    of the logits upsampled to the label) post-processed by the dense CRF on the image
    (``crf_params``, default the reference's; the paper's "linear + CRF" column): metrics
    ``crf`` (``miou``, ``per_class_iou``, ``pixel_accuracy``, ``params``, ``seconds_per_image``,
    ``n_images``, and ``n_skipped`` / ``skipped``: the val images that could not be read for it)
    and ``miou_crf``, and the ``linear_crf_*`` pictures.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tr_store, va_store = _open_store(train_store), _open_store(val_store)
    names = _class_names(dataset)
    c_train, h_feat, w_feat = _require_features(tr_store, "linear")
    c_val = _require_features(va_store, "linear")[0]
    if c_train != c_val:
        raise ProtocolError(f"linear: the train features {tr_store.directory} have {c_train} channels but the val "
                            f"features {va_store.directory} have {c_val}: extract both splits with the same model")
    train_ids, val_ids = list(train_ids), list(val_ids)
    _require_labels(dataset, train_ids, train_split, "linear")
    _require_labels(dataset, val_ids, val_split, "linear")
    # here, after the checks: importing torch takes seconds
    from stages.evaluate.linear import linear_confusion, predict_linear, train_linear_probe
    from stages.network.runtime import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ProtocolError(f"linear: {e}") from None
    skipped: dict[str, str] = {}

    def usable(store: EmbeddingStore, ids: list[str], split: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
        t = store.table()
        shapes = {i: (int(h), int(w)) for i, h, w in zip(t["id"], t["height"], t["width"])}
        for i in ids:
            if i not in shapes:
                skipped[f"{split}/{i}"] = "no embedding (extract could not read the image)"
        return [i for i in ids if i in shapes], shapes

    train_ids, train_shapes = usable(tr_store, train_ids, train_split)
    val_ids, val_shapes = usable(va_store, val_ids, val_split)
    # Every epoch reads every train and val image: keep the decoded features and labels in memory
    # when they fit in LINEAR_CACHE_BYTES (a few hundred MB up to thousands of images), else
    # stream them from the store each epoch (memory then stays flat whatever the dataset size).
    footprint = sum(h * w + 2 * c_train * h_feat * w_feat for shapes in (train_shapes, val_shapes)
                    for h, w in shapes.values())
    cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] | None = {} if footprint <= LINEAR_CACHE_BYTES else None

    def stream(store: EmbeddingStore, ids: Sequence[str], shapes: Mapping[str, tuple[int, int]],
               split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for id_ in ids:
            if cache is not None and (split, id_) in cache:
                yield cache[split, id_]
                continue
            try:
                label = load_label(dataset.sample(id_).label, shapes[id_])
            except BadInputError as exc:
                skipped[f"{split}/{id_}"] = str(exc)
                continue
            item = (store.features(id_), label)  # (C, f, f) float16, (H, W) uint8
            if cache is not None:
                cache[split, id_] = item
            yield item

    def train_iter(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng((seed, epoch)).permutation(len(train_ids))
        return stream(tr_store, [train_ids[i] for i in order], train_shapes, train_split)

    def val_iter() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return stream(va_store, val_ids, val_shapes, val_split)

    bar = tqdm(total=epochs, desc="linear probe", unit="epoch", disable=not progress)

    def on_epoch(log) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{log.train_loss:.4f}", val_miou=f"{log.val_miou:.2f}")

    try:
        result = train_linear_probe(train_iter, len(names), in_dim=c_train, epochs=epochs, lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, batch_size=batch_size, lr_drop_epoch=lr_drop_epoch,
                                    seed=seed, device=dev, val_iter_fn=val_iter,
                                    on_epoch_end=on_epoch, ignore_index=dataset.ignore_index)
    except ValueError as exc:  # LinearProbeError, or a label value outside the classes
        raise ProtocolError(f"linear probe on {tr_store.directory}: {exc}") from None
    finally:
        bar.close()
    head = result.head.eval()
    conf = linear_confusion(head, val_iter(), len(names), dataset.ignore_index)  # last epoch, (n_cls, n_cls)
    scores = segmentation_scores(conf)

    def predict(id_: str, label: np.ndarray) -> np.ndarray:
        return predict_linear(head, va_store.features(id_), label.shape).astype(np.uint8)

    with atomic_path(out_dir / "linear_probe.npz", suffix=".npz") as tmp:
        best = result.best_state or {}
        np.savez(tmp, weight=head.weight.detach().cpu().numpy(), bias=head.bias.detach().cpu().numpy(),
                 best_weight=best["weight"].numpy() if best else np.zeros(0, np.float32),
                 best_bias=best["bias"].numpy() if best else np.zeros(0, np.float32),
                 class_names=np.array(names))

    sheet_ids = _pick(val_ids, sheet_size)
    crf_out = None  # (metrics block, confusion, sheet class maps) of the CRF pass
    if crf:  # after the head is saved: this pass takes about 2 s an image on a CPU core
        scored = [i for i in val_ids if f"{val_split}/{i}" not in skipped]
        crf_out = _linear_crf_pass(
            head, ((id_, *item) for id_ in scored for item in stream(va_store, [id_], val_shapes, val_split)),
            dataset, names, CRFParams() if crf_params is None else crf_params, set(sheet_ids), val_split, progress,
            total=len(scored))

    per_class = _per_class(names, 100.0 * scores.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:
        loss_curve_png([h.train_loss for h in result.history], out_dir / "linear_loss.png",
                       val_miou=[h.val_miou for h in result.history], ylabel="training loss (CE per pixel)",
                       title="linear probe")
        pictures = {"linear probe: training loss and val mIoU": "linear_loss.png",
                    **_figures(out_dir, "linear", "linear probe (last epoch)", names, conf, per_class, dataset,
                               sheet_ids, predict)}
        if crf_out is not None and crf_out[0]["n_images"]:
            block, crf_conf, crf_preds = crf_out
            pictures.update(_figures(out_dir, "linear_crf", "linear probe + CRF (last epoch)", names, crf_conf,
                                     block["per_class_iou"], dataset, [i for i in sheet_ids if i in crf_preds],
                                     lambda i, _: crf_preds[i]))
    m = result.metrics()
    best_pc = m.get("per_class_iou_best_on_val")
    metrics: dict[str, Any] = {
        "miou": 100.0 * scores.miou, "miou_std": 0.0, "per_class_iou": per_class,
        "pixel_accuracy": 100.0 * scores.pixel_accuracy, "seeds": [int(seed)], "classes": names,
        "miou_best_on_val": m["miou_best_on_val"], "best_epoch": m["best_epoch"],
        "per_class_iou_best_on_val": _per_class(names, best_pc) if best_pc else None,
        "note": "miou: last epoch; miou_best_on_val: the epoch with the best val mIoU (val chooses the epoch)",
        "epochs": epochs, "history": m["history"],
        "n_train_images": sum(f"{train_split}/{i}" not in skipped for i in train_ids),
        "n_images": sum(f"{val_split}/{i}" not in skipped for i in val_ids),
        "device": str(head.weight.device), "figures": pictures, "head_file": "linear_probe.npz",
    }
    if crf_out is not None:
        metrics.update(crf=crf_out[0], miou_crf=crf_out[0]["miou"])
    metrics.update(_skipped_metrics(skipped))
    return metrics
