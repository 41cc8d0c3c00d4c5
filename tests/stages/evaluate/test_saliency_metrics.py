"""Saliency metrics against hand computations and a brute-force threshold loop."""
from __future__ import annotations

import numpy as np
import pytest

from stages.evaluate.saliency_metrics import (
    THRESHOLDS,
    SaliencyAccumulator,
    f_measure,
    saliency_scores,
)


def _brute_pr(soft: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision/recall at soft > k/256 by one pass per threshold, 0 for 0/0."""
    fg = gt > 0.5
    p, r = [], []
    for t in THRESHOLDS:
        pred = soft > t
        tp = np.sum(pred & fg)
        p.append(tp / pred.sum() if pred.sum() else 0.0)
        r.append(tp / fg.sum() if fg.sum() else 0.0)
    return np.array(p), np.array(r)


def test_hand_computed_example():
    soft = np.array([[0.9, 0.6, 0.5], [0.2, 0.7, 0.0]], np.float32)
    gt = np.array([[1, 1, 1], [0, 0, 0]], np.uint8)
    s = saliency_scores(soft, gt)
    # pred (> 0.5) = {0.9, 0.6, 0.7}: TP 2, FP 1, FN 1 (0.5 is not > 0.5)
    assert s["iou"] == pytest.approx(2 / 4)
    assert s["mae"] == pytest.approx((0.1 + 0.4 + 0.5 + 0.2 + 0.7 + 0.0) / 6)
    p, r = 2 / 3, 2 / 3
    assert s["f_at_threshold"] == pytest.approx(1.3 * p * r / (0.3 * p + r))
    assert s["pred_fg"] == pytest.approx(3 / 6) and s["gt_fg"] == pytest.approx(3 / 6)
    # thresholds: k = 0 -> soft > 0: 5 predicted, TP 3; k = 128 (t = 0.5) as above
    assert s["precision"][0] == pytest.approx(3 / 5) and s["recall"][0] == pytest.approx(1.0)
    assert THRESHOLDS[128] == 0.5
    assert s["precision"][128] == pytest.approx(2 / 3) and s["recall"][128] == pytest.approx(2 / 3)
    # t = 0.9 is not > 0.9: at k = 231 (0.902) nothing is predicted -> P = R = 0
    assert s["precision"][231] == 0.0 and s["recall"][231] == 0.0


def test_curves_match_brute_force(rng):
    soft = rng.random((23, 17)).astype(np.float32)
    soft[0, :5] = [0.0, 1.0, 0.5, 3 / 256, 255 / 256]  # exact threshold values
    gt = rng.random((23, 17)) > 0.6
    s = saliency_scores(soft, gt)
    p, r = _brute_pr(soft, gt)
    np.testing.assert_allclose(s["precision"], p)
    np.testing.assert_allclose(s["recall"], r)


def test_empty_prediction_and_empty_gt():
    zero = np.zeros((4, 4), np.float32)
    both = saliency_scores(zero, np.zeros((4, 4), bool))
    assert both["iou"] == 1.0 and both["mae"] == 0.0
    assert both["f_at_threshold"] == 0.0  # P = R = 0 by the 0/0 -> 0 convention
    assert np.all(both["precision"] == 0) and np.all(both["recall"] == 0)

    gt = np.zeros((4, 4), bool)
    gt[:2] = True
    no_pred = saliency_scores(zero, gt)
    assert no_pred["iou"] == 0.0 and no_pred["mae"] == pytest.approx(0.5)
    assert np.all(no_pred["recall"] == 0) and no_pred["f_at_threshold"] == 0.0

    ones = np.ones((4, 4), np.float32)
    no_gt = saliency_scores(ones, np.zeros((4, 4), bool))
    assert no_gt["iou"] == 0.0 and no_gt["mae"] == 1.0
    assert np.all(no_gt["precision"] == 0) and np.all(no_gt["recall"] == 0)


def test_gt_conventions_and_shape_check():
    soft = np.array([[1.0, 0.0]], np.float32)
    for gt in (np.array([[255, 0]], np.uint8), np.array([[True, False]]), np.array([[3, 0]], np.int64)):
        assert saliency_scores(soft, gt)["iou"] == 1.0
    with pytest.raises(ValueError, match=r"same 2-D shape.*\(1, 2\).*\(2, 1\)"):
        saliency_scores(soft, np.zeros((2, 1)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        saliency_scores(np.array([[np.nan, 0.0]]), np.zeros((1, 2)))


def test_f_measure_closed_form():
    assert f_measure(1.0, 0.5) == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))
    assert f_measure(0.0, 0.0) == 0.0
    np.testing.assert_allclose(f_measure(np.array([0.5, 1.0]), np.array([0.5, 1.0])), [0.5, 1.0])


def test_accumulator_protocol(rng):
    maps = [rng.random((12, 9)).astype(np.float32) for _ in range(3)]
    gts = [rng.random((12, 9)) > t for t in (0.3, 0.6, 0.9)]
    acc = SaliencyAccumulator()
    per = [acc.update(m, g) for m, g in zip(maps, gts)]
    r = acc.result()
    assert r["n"] == 3
    assert r["iou"] == pytest.approx(np.mean([s["iou"] for s in per]))
    assert r["mae"] == pytest.approx(np.mean([np.abs(m - g).mean() for m, g in zip(maps, gts)]))
    # mean P and mean R per threshold, then F; not the mean of per-image F
    curves = [_brute_pr(m, g) for m, g in zip(maps, gts)]
    mp = np.mean([c[0] for c in curves], 0)
    mr = np.mean([c[1] for c in curves], 0)
    f = 1.3 * mp * mr / np.where(0.3 * mp + mr > 0, 0.3 * mp + mr, 1)
    assert r["max_f"] == pytest.approx(f.max())
    assert r["mean_f"] == pytest.approx(f.mean())
    assert len(r["f_curve"]) == 256


def test_accumulator_add_matches_update(rng):
    m, g = rng.random((8, 8)).astype(np.float32), rng.random((8, 8)) > 0.5
    a, b = SaliencyAccumulator(), SaliencyAccumulator()
    a.update(m, g)
    b.add(saliency_scores(m, g))
    assert a.result() == b.result()


def test_accumulator_empty_raises():
    with pytest.raises(ValueError, match="no image was added"):
        SaliencyAccumulator().result()
