"""Salient-object detection metrics: IoU, MAE and F-measure curves (pure numpy).

Conventions (fixed here, tested in tests/stages/evaluate/test_saliency_metrics.py):
- ``soft`` is a float map in [0, 1] (values outside are clipped); ``gt`` is boolean or numeric and
  its foreground is ``gt > 0.5`` (so {0, 1}, {0, 255} and class-index labels all work).
- IoU binarises ``soft > threshold`` (strictly greater, as the reference's mask post-processing).
  Empty prediction and empty ground truth: IoU 1 (they agree); exactly one empty: IoU 0.
- F-measure curves use the 256 thresholds t_k = k / 256, k = 0..255, with ``soft > t_k``
  (t_128 = 0.5, the IoU threshold). Precision = TP / (TP + FP) and recall = TP / (TP + FN), each 0
  when its denominator is 0 (the convention of the common SOD toolkits). F = (1 + b2) P R /
  (b2 P + R) with b2 = 0.3, and 0 when P = R = 0.
- Dataset protocol (``SaliencyAccumulator``): per-image IoU and MAE averaged over images; precision
  and recall averaged over images per threshold, then F per threshold from the mean P and mean R;
  ``max_f`` is its maximum and ``mean_f`` its mean over thresholds.
"""
from __future__ import annotations

import numpy as np

__all__ = ["BETA2", "N_THRESHOLDS", "THRESHOLDS", "saliency_scores", "SaliencyAccumulator", "f_measure"]

BETA2 = 0.3
N_THRESHOLDS = 256
THRESHOLDS = np.arange(N_THRESHOLDS, dtype=np.float64) / N_THRESHOLDS  # t_k = k / 256


def _check(soft: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    soft = np.asarray(soft)
    gt = np.asarray(gt)
    if soft.ndim != 2 or soft.shape != gt.shape:
        raise ValueError(f"expected soft and gt of the same 2-D shape, got {soft.shape} and {gt.shape}")
    if not np.isfinite(soft).all():
        raise ValueError("soft map has NaN or infinite values")
    return np.clip(soft.astype(np.float32, copy=False), 0.0, 1.0), gt > 0.5


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def f_measure(precision: np.ndarray, recall: np.ndarray, beta2: float = BETA2) -> np.ndarray:
    """F_beta = (1 + b2) P R / (b2 P + R), elementwise; 0 where P = R = 0."""
    p = np.asarray(precision, np.float64)
    r = np.asarray(recall, np.float64)
    return _safe_div((1.0 + beta2) * p * r, beta2 * p + r)


def _pr_curves(soft: np.ndarray, fg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall (256,) at soft > k / 256, from two histograms instead of 256 passes."""
    # soft > k/256  <=>  ceil(256 soft) - 1 >= k (exact in float32: 256 is a power of two).
    level = np.ceil(soft * N_THRESHOLDS).astype(np.int64)  # in [0, 256]; predicted at k iff level > k
    fg_hist = np.bincount(level[fg], minlength=N_THRESHOLDS + 1)
    bg_hist = np.bincount(level[~fg], minlength=N_THRESHOLDS + 1)
    # tp[k] = #fg pixels with level >= k + 1
    tp = np.cumsum(fg_hist[::-1])[::-1][1:]
    fp = np.cumsum(bg_hist[::-1])[::-1][1:]
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, np.full_like(tp, fg.sum()))
    return precision, recall


def saliency_scores(soft: np.ndarray, gt: np.ndarray, threshold: float = 0.5) -> dict:
    """Scores of one image: soft (H, W) in [0, 1], gt (H, W) -> dict.

    Keys: ``iou`` (soft > threshold vs gt), ``mae`` (mean |soft - gt|), ``precision`` and ``recall``
    (arrays (256,) at the thresholds ``THRESHOLDS``), ``f_at_threshold`` (F-measure of the binary
    mask soft > threshold), ``pred_fg`` and ``gt_fg`` (foreground fractions).
    """
    soft, fg = _check(soft, gt)
    pred = soft > threshold
    inter = int(np.count_nonzero(pred & fg))
    union = int(np.count_nonzero(pred | fg))
    iou = 1.0 if union == 0 else inter / union
    n_pred, n_fg = int(pred.sum()), int(fg.sum())
    p_at = inter / n_pred if n_pred else 0.0
    r_at = inter / n_fg if n_fg else 0.0
    precision, recall = _pr_curves(soft, fg)
    return {
        "iou": float(iou),
        "mae": float(np.abs(soft - fg).mean()),
        "precision": precision,
        "recall": recall,
        "f_at_threshold": float(f_measure(p_at, r_at)),
        "pred_fg": n_pred / soft.size,
        "gt_fg": n_fg / soft.size,
    }


class SaliencyAccumulator:
    """Streaming dataset-level saliency metrics; memory independent of the number of images."""

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = threshold
        self.n = 0
        self._iou = 0.0
        self._mae = 0.0
        self._f_at = 0.0
        self._pred_fg = 0.0
        self._gt_fg = 0.0
        self._precision = np.zeros(N_THRESHOLDS)
        self._recall = np.zeros(N_THRESHOLDS)

    def update(self, soft: np.ndarray, gt: np.ndarray) -> dict:
        """Add one image; returns its ``saliency_scores``."""
        s = saliency_scores(soft, gt, self.threshold)
        self.add(s)
        return s

    def add(self, s: dict) -> None:
        """Add one image's precomputed ``saliency_scores`` (e.g. computed in a worker process)."""
        self.n += 1
        self._iou += s["iou"]
        self._mae += s["mae"]
        self._f_at += s["f_at_threshold"]
        self._pred_fg += s["pred_fg"]
        self._gt_fg += s["gt_fg"]
        self._precision += s["precision"]
        self._recall += s["recall"]

    def result(self) -> dict:
        """{"iou", "max_f", "mean_f", "mae", "f_at_threshold", "pred_fg", "gt_fg", "n", "f_curve"}.

        Raises ValueError when no image was added (a mean over nothing is not a score).
        """
        if self.n == 0:
            raise ValueError("SaliencyAccumulator.result(): no image was added")
        f_curve = f_measure(self._precision / self.n, self._recall / self.n)
        return {
            "iou": self._iou / self.n,
            "max_f": float(f_curve.max()),
            "mean_f": float(f_curve.mean()),
            "mae": self._mae / self.n,
            "f_at_threshold": self._f_at / self.n,
            "pred_fg": self._pred_fg / self.n,
            "gt_fg": self._gt_fg / self.n,
            "n": self.n,
            "f_curve": f_curve.tolist(),
        }
