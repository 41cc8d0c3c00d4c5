"""Retrieval protocol: majority labels, nearest neighbours, and scores against a pixel-pass reference."""
from __future__ import annotations

import numpy as np
import pytest

from stages.evaluate.metrics import SalientClassCounts, confusion_matrix, iou_from_confusion
from stages.evaluate.retrieval import (
    VOC_SUBSET_7,
    RetrievalError,
    majority_class,
    majority_from_counts,
    retrieval_predictions,
    retrieval_protocol,
)


def test_majority_class_hand_cases():
    label = np.array([[0, 0, 3, 3, 3], [7, 7, 255, 255, 255]], dtype=np.uint8)
    assert majority_class(label, np.ones_like(label, bool)) == 3  # 3 beats 7; 0 and 255 excluded
    mask = np.array([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]], bool)
    assert majority_class(label, mask) == 7  # 2 each: the tie goes to the higher class, as the reference
    assert majority_class(label, label == 0) == -1
    assert majority_class(label, mask, ignore=(0, 255, 7)) == 3
    with pytest.raises(RetrievalError, match="label shape"):
        majority_class(label, mask[:, :2])


def random_split(rng, n, n_cls=21):
    images = []
    for _ in range(n):
        h, w = rng.integers(6, 20, 2)
        label = np.zeros((h, w), np.uint8)
        for _ in range(2):
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            label[y:y + rng.integers(2, 6), x:x + rng.integers(2, 6)] = rng.integers(1, n_cls)
        label[rng.random((h, w)) < 0.05] = 255
        mask = np.zeros((h, w), bool)
        if rng.random() > 0.1:  # some images without any salient pixel
            y, x = rng.integers(0, h - 3), rng.integers(0, w - 3)
            mask[y:y + 6, x:x + 6] = True
        images.append((mask, label))
    return images


def test_majority_from_counts_equals_pixel_majority(rng):
    images = random_split(rng, 40)
    counts = SalientClassCounts(21)
    for m, lbl in images:
        counts.update(m, lbl)
    np.testing.assert_array_equal(majority_from_counts(counts.counts[:, 1]), [majority_class(lbl, m) for m, lbl in images])
    others = [c for c in range(21) if c not in VOC_SUBSET_7]
    expected = [majority_class(np.where(np.isin(lbl, others), 255, lbl), m) for m, lbl in images]
    np.testing.assert_array_equal(majority_from_counts(counts.counts[:, 1], VOC_SUBSET_7), expected)


def test_retrieval_predictions_planted(rng):
    centres = rng.normal(size=(5, 16))
    bank_classes = np.repeat(np.arange(1, 6), 4)
    bank = centres[bank_classes - 1] + 0.1 * rng.normal(size=(20, 16))
    y = rng.integers(1, 6, 30)
    queries = 3.0 * (centres[y - 1] + 0.1 * rng.normal(size=(30, 16)))  # scale must not matter (cosine)
    np.testing.assert_array_equal(retrieval_predictions(bank, bank_classes, queries), y)
    # an unlabelled bank entry sitting exactly on a query is skipped
    bank2 = np.vstack([bank, queries[:1]])
    np.testing.assert_array_equal(retrieval_predictions(bank2, np.append(bank_classes, -1), queries[:1]), y[:1])
    with pytest.raises(RetrievalError, match="no entry with a class"):
        retrieval_predictions(bank, np.full(20, -1), queries)


def naive_retrieval(bank, val, bank_protos, val_protos, classes):
    """Reference-style: relabel, majority per bank image, nearest neighbour, paint, pixel pass."""
    def relabel(lbl):
        return lbl if classes is None else np.where(np.isin(lbl, [0, *classes]) | (lbl == 255), lbl, 255).astype(np.uint8)

    bank_cls = np.array([majority_class(relabel(lbl), m) for m, lbl in bank])
    keep = bank_cls >= 0
    b = bank_protos[keep] / np.linalg.norm(bank_protos[keep], axis=1, keepdims=True)
    q = val_protos / np.maximum(np.linalg.norm(val_protos, axis=1, keepdims=True), 1e-12)
    pred = bank_cls[keep][np.argmax(q @ b.T, axis=1)]
    conf = sum(confusion_matrix(np.where(m, p, 0), relabel(lbl), 21, 21) for (m, lbl), p in zip(val, pred))
    iou = iou_from_confusion(conf).iou
    return 100 * (iou.mean() if classes is None else iou[list(classes)].mean())


@pytest.mark.parametrize("classes", [None, VOC_SUBSET_7])
def test_retrieval_protocol_equals_pixel_pass(rng, classes):
    bank, val = random_split(rng, 60), random_split(rng, 40)
    bank_protos, val_protos = rng.normal(size=(60, 8)), rng.normal(size=(40, 8))
    bank_counts, val_counts = SalientClassCounts(21), SalientClassCounts(21)
    for m, lbl in bank:
        bank_counts.update(m, lbl)
    for m, lbl in val:
        val_counts.update(m, lbl)
    report = retrieval_protocol(bank_protos, bank_counts, val_protos, val_counts, classes)
    assert report.miou == pytest.approx(naive_retrieval(bank, val, bank_protos, val_protos, classes))
    assert report.classes == (list(range(21)) if classes is None else sorted(classes))
    assert set(report.metrics()) >= {"miou", "miou_std", "per_class_iou", "seeds"}
    with pytest.raises(RetrievalError, match="prototypes for"):
        retrieval_protocol(bank_protos[:5], bank_counts, val_protos, val_counts)
