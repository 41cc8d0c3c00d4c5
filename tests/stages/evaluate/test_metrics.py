"""Confusion-matrix metrics, matching and SalientClassCounts against hand-computed cases and pixel passes."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stages.evaluate.metrics import (
    MetricsError,
    SalientClassCounts,
    confusion_matrix,
    hungarian_match,
    iou_from_confusion,
    majority_match,
    miou,
    pixel_accuracy,
    remap_confusion,
    segmentation_scores,
    subset_columns,
)


def pixels_from_confusion(conf: np.ndarray, rng: np.random.Generator, n_ignore: int = 7):
    """Flat (pred, label) pixels realising `conf`, shuffled, plus ignore pixels with random preds."""
    pred = np.concatenate([np.full(n, p) for (p, _), n in np.ndenumerate(conf)] + [rng.integers(0, conf.shape[0], n_ignore)])
    label = np.concatenate([np.full(n, c) for (_, c), n in np.ndenumerate(conf)] + [np.full(n_ignore, 255)])
    order = rng.permutation(pred.size)
    return pred[order].astype(np.int64), label[order].astype(np.uint8)


def score_pixels(pred, label, n_pred, n_cls, matcher=hungarian_match):
    conf = confusion_matrix(pred, label, n_pred, n_cls)
    mapping = matcher(conf)
    return mapping, remap_confusion(conf, mapping, n_cls)


def test_confusion_matrix_counts_and_ignores(rng):
    pred = np.array([[0, 1, 1], [2, 0, 1]])
    label = np.array([[0, 1, 255], [1, 0, 2]], dtype=np.uint8)
    expected = np.array([[2, 0, 0], [0, 1, 1], [0, 1, 0]])
    np.testing.assert_array_equal(confusion_matrix(pred, label, 3, 3), expected)
    np.testing.assert_array_equal(confusion_matrix(pred, label.astype(np.int32), 3, 3), expected)  # generic path
    # accumulable, and both label dtypes agree on random data
    p = rng.integers(0, 4, (2, 30, 20))
    t = rng.integers(0, 5, (2, 30, 20)).astype(np.uint8)
    t[:, :3] = 255
    total = confusion_matrix(p[0], t[0], 4, 5) + confusion_matrix(p[1], t[1], 4, 5)
    np.testing.assert_array_equal(total, confusion_matrix(p, t, 4, 5))
    np.testing.assert_array_equal(total, confusion_matrix(p, t.astype(np.int64), 4, 5))
    assert total.sum() == 2 * 27 * 20


@pytest.mark.parametrize("dtype", [np.uint8, np.int64])
def test_confusion_matrix_rejects_out_of_range(dtype):
    label = np.array([0, 3, 1], dtype=dtype)
    with pytest.raises(MetricsError, match=r"label values must lie in \[0, 3\) or be 255"):
        confusion_matrix(np.array([0, 1, 1]), label, 2, 3)
    with pytest.raises(MetricsError, match=r"predicted ids must lie in \[0, 2\)"):
        confusion_matrix(np.array([0, 2, 1]), np.array([0, 1, 1], dtype=dtype), 2, 3)
    with pytest.raises(MetricsError, match=r"predicted ids must lie in \[0, 2\)"):
        confusion_matrix(np.array([0, -1, 1]), np.array([0, 1, 1], dtype=dtype), 2, 3)
    with pytest.raises(MetricsError, match="pred must hold integer ids"):
        confusion_matrix(np.array([0.0, 1.0, 1.0]), np.array([0, 1, 1], dtype=dtype), 2, 3)
    with pytest.raises(MetricsError, match="pred shape"):
        confusion_matrix(np.zeros(2, int), np.zeros(3, dtype), 2, 3)


def test_iou_empty_union_is_zero_and_counts_in_mean():
    conf = np.array([[3, 1, 0], [1, 2, 0], [0, 0, 0]])
    iou, present = iou_from_confusion(conf)
    np.testing.assert_allclose(iou, [3 / 5, 2 / 4, 0.0])
    np.testing.assert_array_equal(present, [True, True, False])
    assert miou(conf) == pytest.approx((0.6 + 0.5) / 3)
    assert miou(conf, classes=[0, 1]) == pytest.approx(0.55)
    assert pixel_accuracy(conf) == pytest.approx(5 / 7)


def test_hungarian_background_not_forced(rng):
    conf = np.array([[1, 6, 0], [5, 0, 1], [0, 1, 4]])
    pred, label = pixels_from_confusion(conf, rng)
    mapping, cls_conf = score_pixels(pred, label, 3, 3)
    np.testing.assert_array_equal(mapping, [1, 0, 2])  # predicted background (id 0) takes class 1
    np.testing.assert_allclose(iou_from_confusion(cls_conf).iou, [5 / 7, 6 / 8, 4 / 6])
    assert miou(cls_conf) == pytest.approx((5 / 7 + 6 / 8 + 4 / 6) / 3)
    assert pixel_accuracy(cls_conf) == pytest.approx(15 / 18)


def test_hungarian_class_never_predicted(rng):
    conf = np.array([[4, 1, 0], [0, 3, 2]])  # 2 ids, 3 classes
    mapping, cls_conf = score_pixels(*pixels_from_confusion(conf, rng), 2, 3)
    np.testing.assert_array_equal(mapping, [0, 1])
    np.testing.assert_allclose(iou_from_confusion(cls_conf).iou, [0.8, 0.5, 0.0])
    assert miou(cls_conf) == pytest.approx(1.3 / 3)


def test_more_ids_than_classes_hungarian_and_majority(rng):
    conf = np.array([[4, 0, 0], [0, 3, 0], [0, 0, 2], [1, 1, 1]])
    pred, label = pixels_from_confusion(conf, rng)
    mapping, cls_conf = score_pixels(pred, label, 4, 3)
    np.testing.assert_array_equal(mapping, [0, 1, 2, -1])
    np.testing.assert_array_equal(cls_conf[3], [1, 1, 1])  # unmatched id: false negatives only
    np.testing.assert_allclose(iou_from_confusion(cls_conf).iou, [4 / 5, 3 / 4, 2 / 3])
    mapping, cls_conf = score_pixels(pred, label, 4, 3, majority_match)
    np.testing.assert_array_equal(mapping, [0, 1, 2, 0])  # tie goes to the lowest class
    np.testing.assert_allclose(iou_from_confusion(cls_conf).iou, [5 / 7, 3 / 4, 2 / 3])


def test_majority_count_vs_iou_and_empty_ids():
    conf = np.array([[10, 8], [0, 0], [90, 0]])
    np.testing.assert_array_equal(majority_match(conf), [0, -1, 0])
    np.testing.assert_array_equal(majority_match(conf, "iou"), [1, -1, 0])  # 8/18 > 10/108
    with pytest.raises(MetricsError, match="criterion must be 'count' or 'iou'"):
        majority_match(conf, "votes")


confusions = st.tuples(st.integers(1, 7), st.integers(1, 6)).flatmap(
    lambda s: arrays(np.int64, s, elements=st.integers(0, 50))
)


@settings(max_examples=60, deadline=None)
@given(conf=confusions, perm_seed=st.integers(0, 2**32 - 1))
def test_miou_invariant_to_permuting_cluster_ids(conf, perm_seed):
    n_cls = conf.shape[1]
    perm = np.random.default_rng(perm_seed).permutation(conf.shape[0])
    for matcher in (hungarian_match, majority_match):
        a = miou(remap_confusion(conf, matcher(conf), n_cls))
        b = miou(remap_confusion(conf[perm], matcher(conf[perm]), n_cls))
        assert a == pytest.approx(b, abs=1e-12)


def test_remap_confusion_validates():
    with pytest.raises(MetricsError, match=r"mapping values must lie in \[-1, 2\)"):
        remap_confusion(np.ones((2, 2), int), np.array([0, 2]), 2)
    with pytest.raises(MetricsError, match="expected conf"):
        remap_confusion(np.ones((2, 3), int), np.array([0, 1]), 2)


def test_subset_columns_equals_relabelling_to_ignore(rng):
    pred = rng.integers(0, 5, (40, 30))
    label = rng.integers(0, 5, (40, 30)).astype(np.uint8)
    keep = [0, 2, 3]
    relabelled = np.where(np.isin(label, keep), label, 255).astype(np.uint8)
    np.testing.assert_array_equal(
        subset_columns(confusion_matrix(pred, label, 5, 5), keep), confusion_matrix(pred, relabelled, 5, 5)
    )
    scores = segmentation_scores(confusion_matrix(pred, relabelled, 5, 5), classes=[2, 3])
    assert scores.miou == pytest.approx(scores.per_class_iou[[2, 3]].mean())
    with pytest.raises(MetricsError, match="classes must be a non-empty subset"):
        segmentation_scores(np.eye(3, dtype=int), classes=[3])


def random_images(rng, n, n_cls):
    out = []
    for _ in range(n):
        h, w = rng.integers(5, 30, 2)
        label = rng.integers(0, n_cls, (h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.1] = 255
        out.append((rng.random((h, w)) < 0.4, label))
    return out


def test_salient_counts_equal_painted_pixel_pass(rng):
    n_cls, k = 6, 4
    images = random_images(rng, 25, n_cls)
    counts = SalientClassCounts(n_cls)
    for mask, label in images:
        counts.update(mask, label)
    assert counts.counts.shape == (25, 2, n_cls)
    for _ in range(3):
        assign = rng.integers(0, k, len(images))
        naive = sum(confusion_matrix(np.where(m, a + 1, 0), lbl, k + 1, n_cls) for (m, lbl), a in zip(images, assign))
        np.testing.assert_array_equal(counts.confusion(assign, k), naive)
        cls = rng.integers(1, n_cls, len(images))
        naive = sum(confusion_matrix(np.where(m, c, 0), lbl, n_cls, n_cls) for (m, lbl), c in zip(images, cls))
        np.testing.assert_array_equal(counts.class_confusion(cls), naive)
    # rebuilt from stored counts, same answers; an empty cluster keeps its row with n_clusters
    again = SalientClassCounts.from_array(counts.counts)
    assign = np.zeros(len(images), int)
    np.testing.assert_array_equal(again.confusion(assign, k), counts.confusion(assign, k))
    assert again.confusion(assign).shape == (2, n_cls)


def test_salient_counts_errors():
    counts = SalientClassCounts(3)
    with pytest.raises(MetricsError, match="mask shape .* != label shape"):
        counts.update(np.zeros((2, 3), bool), np.zeros((3, 2), np.uint8))
    counts.update(np.ones((2, 2), bool), np.zeros((2, 2), np.uint8))
    with pytest.raises(MetricsError, match=r"assign must have shape \(1,\)"):
        counts.confusion(np.array([0, 1]), 2)
    with pytest.raises(MetricsError, match=r"assign values must lie in \[0, 2\)"):
        counts.confusion(np.array([2]), 2)
