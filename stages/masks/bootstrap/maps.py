"""Pseudo-label arithmetic of the bootstrapped saliency fit, on numpy maps in [0, 1]: the
moving-average refinement, the uint8 storage form, square resizing, and the foreground-share
threshold and logit-space calibration that keep the fit's foreground fraction."""
from __future__ import annotations

import math

import cv2
import numpy as np


def refine_labels(previous: np.ndarray, prediction: np.ndarray, ema: float) -> np.ndarray:
    """DeepUSPS-style moving average: ``ema * previous + (1 - ema) * prediction``, float32.

    previous, prediction: (..., H, W) maps in [0, 1] of the same shape.
    """
    previous = np.asarray(previous, np.float32)
    prediction = np.asarray(prediction, np.float32)
    if previous.shape != prediction.shape:
        raise ValueError(f"refine_labels: shapes differ: previous {previous.shape}, prediction {prediction.shape}")
    return (np.float32(ema) * previous + np.float32(1.0 - ema) * prediction).astype(np.float32)


def to_u8(maps: np.ndarray) -> np.ndarray:
    """Maps in [0, 1] -> uint8 0..255 (rounded): the storage form of priors and pseudo-labels."""
    return np.round(np.clip(maps, 0.0, 1.0) * 255.0).astype(np.uint8)


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Resize an image or map to size x size (aspect not kept): area averaging when shrinking."""
    h, w = img.shape[:2]
    interp = cv2.INTER_AREA if size <= min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


def fraction_threshold(values: np.ndarray, fraction: float) -> float:
    """The value t with a share ``fraction`` of ``values`` above it: their (1 - fraction)-quantile."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction_threshold: fraction must be in (0, 1), got {fraction}")
    return float(np.quantile(np.asarray(values).ravel(), 1.0 - fraction))


def calibrate(prob: np.ndarray, threshold: float, eps: float = 1e-6) -> np.ndarray:
    """Shift probabilities in logit space so that ``threshold`` maps to 0.5: sigmoid(logit p - logit t).

    Monotone (rankings, hence F-measure curves, are kept); the identity for threshold 0.5.
    """
    p = np.clip(np.asarray(prob, np.float64), eps, 1.0 - eps)
    t = min(max(float(threshold), eps), 1.0 - eps)
    shift = math.log(t) - math.log1p(-t)
    return (1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p) - shift)))).astype(np.float32)
