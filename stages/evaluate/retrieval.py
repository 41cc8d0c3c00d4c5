"""Retrieval protocol: label each val image's salient region with its nearest train prototype's class.

Bank: train images with a salient pixel, each labelled with the majority ground-truth class
inside its predicted mask (background and ignore excluded). Query: each val image takes its top-1
cosine neighbour's class on its salient pixels, background elsewhere. The 7-class variant sets
the other 13 classes to ignore in both splits' labels and averages IoU over the 7 without
background (REFERENCE.md "Evaluation", Retrieval).

Both the bank's majority classes and the val confusion come from `SalientClassCounts` tables
(pixels inside / outside the predicted mask per class), so neither variant needs a pass over
pixels once the tables exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import faiss
import numpy as np

from .metrics import SalientClassCounts, segmentation_scores, subset_columns

# PASCAL VOC ids of the paper's 7-class subset: aeroplane, bottle, bus, car, cat, cow, person.
VOC_SUBSET_7 = (1, 5, 6, 7, 8, 10, 15)


class RetrievalError(ValueError):
    """Bad input to the retrieval protocol."""


def majority_class(label: np.ndarray, mask: np.ndarray, ignore: Sequence[int] = (0, 255)) -> int:
    """Most frequent label value inside mask (H, W), values in `ignore` excluded; -1 if none.

    Ties go to the highest class id, as in the reference (max over (count, class) pairs).
    """
    label = np.asarray(label)
    mask = np.asarray(mask, dtype=bool)
    if label.shape != mask.shape:
        raise RetrievalError(f"majority_class: label shape {label.shape} != mask shape {mask.shape}")
    counts = np.bincount(label[mask].astype(np.int64).ravel(), minlength=256)
    counts[[i for i in ignore if 0 <= i < counts.size]] = 0
    if not counts.any():
        return -1
    return int(counts.size - 1 - np.argmax(counts[::-1]))


def majority_from_counts(inside: np.ndarray, keep: Sequence[int] | None = None, background: int = 0) -> np.ndarray:
    """Majority class (M,) int64 of each image from its inside-mask counts (M, n_cls); -1 if none.

    Only classes in `keep` (default all but background) can win, which is what setting the other
    classes to ignore in the labels does. Ties go to the highest class id, as `majority_class`.
    """
    inside = np.asarray(inside)
    if inside.ndim != 2:
        raise RetrievalError(f"majority_from_counts: expected (M, n_cls) counts, got shape {inside.shape}")
    n_cls = inside.shape[1]
    allowed = np.zeros(n_cls, bool)
    allowed[list(keep) if keep is not None else range(n_cls)] = True
    allowed[background] = False
    scores = np.where(allowed, inside, 0)
    winner = n_cls - 1 - np.argmax(scores[:, ::-1], axis=1)
    return np.where(scores.max(axis=1) > 0, winner, -1).astype(np.int64)


def retrieval_predictions(bank_protos: np.ndarray, bank_classes: np.ndarray, query_protos: np.ndarray) -> np.ndarray:
    """Class (N,) of each query's top-1 cosine neighbour among bank entries with class >= 0.

    Prototypes are L2-normalised here (zero vectors stay zero), then searched exactly with a
    faiss inner-product index.
    """
    bank_protos = np.asarray(bank_protos, dtype=np.float32)
    query_protos = np.asarray(query_protos, dtype=np.float32)
    bank_classes = np.asarray(bank_classes, dtype=np.int64)
    if bank_protos.ndim != 2 or query_protos.ndim != 2 or bank_protos.shape[1] != query_protos.shape[1]:
        raise RetrievalError(
            f"retrieval_predictions: expected bank (M, D) and queries (N, D), got {bank_protos.shape} and {query_protos.shape}"
        )
    if bank_classes.shape != (bank_protos.shape[0],):
        raise RetrievalError(
            f"retrieval_predictions: bank_classes must have shape ({bank_protos.shape[0]},), got {bank_classes.shape}"
        )
    valid = bank_classes >= 0
    if not valid.any():
        raise RetrievalError("retrieval_predictions: the memory bank has no entry with a class (all -1)")

    def unit(v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))

    index = faiss.IndexFlatIP(bank_protos.shape[1])
    index.add(unit(bank_protos[valid]))
    _, nn = index.search(unit(query_protos), 1)
    return bank_classes[valid][nn[:, 0]]


@dataclass
class RetrievalReport:
    """Retrieval scores; IoUs in percent. `classes` are the ids the mean runs over."""

    miou: float
    per_class_iou: list[float]  # all n_cls classes (ignored classes score 0)
    pixel_accuracy: float
    classes: list[int]
    n_bank: int  # bank entries with a class
    predictions: list[int]  # class given to each val image's salient region

    def metrics(self) -> dict:
        """JSON-ready figures, with the `metrics.json` keys (one deterministic run: std 0)."""
        return {
            "miou": self.miou, "miou_std": 0.0, "per_class_iou": self.per_class_iou,
            "pixel_accuracy": self.pixel_accuracy, "classes": self.classes, "n_bank": self.n_bank, "seeds": [],
        }


def retrieval_protocol(
    bank_protos: np.ndarray,
    bank_counts: SalientClassCounts,
    val_protos: np.ndarray,
    val_counts: SalientClassCounts,
    classes: Sequence[int] | None = None,
    background: int = 0,
) -> RetrievalReport:
    """Score retrieval from prototypes and (inside/outside mask, class) counts of both splits.

    classes=None: all classes, mean over all including background. classes=ids (e.g.
    VOC_SUBSET_7): the other classes are ignore pixels in both splits (so they neither label the
    bank nor count in val), and the mean runs over `classes` without background.
    """
    if bank_counts.n_cls != val_counts.n_cls:
        raise RetrievalError(f"retrieval_protocol: bank has {bank_counts.n_cls} classes, val {val_counts.n_cls}")
    if len(np.asarray(bank_protos)) != len(bank_counts) or len(np.asarray(val_protos)) != len(val_counts):
        raise RetrievalError(
            f"retrieval_protocol: {len(bank_protos)} bank / {len(val_protos)} val prototypes for "
            f"{len(bank_counts)} / {len(val_counts)} count tables"
        )
    n_cls = val_counts.n_cls
    subset = None if classes is None else sorted({int(c) for c in classes} - {background})
    bank_classes = majority_from_counts(bank_counts.counts[:, 1], subset, background)
    pred = retrieval_predictions(bank_protos, bank_classes, val_protos)
    conf = val_counts.class_confusion(pred, background)  # (n_cls, n_cls)
    if subset is not None:
        conf = subset_columns(conf, [background, *subset])
    scores = segmentation_scores(conf, subset)
    return RetrievalReport(
        miou=100.0 * scores.miou, per_class_iou=(100.0 * scores.per_class_iou).tolist(),
        pixel_accuracy=100.0 * scores.pixel_accuracy, classes=list(scores.classes),
        n_bank=int((bank_classes >= 0).sum()), predictions=pred.tolist(),
    )
