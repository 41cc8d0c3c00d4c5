"""Hand-crafted saliency priors: contracts, closed forms of the MBD transform, behaviour on a
synthetic object, fusion arithmetic. Small working size to keep the suite fast."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from stages.masks.priors import (
    PriorParams,
    _mbd_transform,
    contrast_saliency,
    fuse_maps,
    mbd_saliency,
    priors_saliency,
    rbd_saliency,
)

FAST = PriorParams(size=64, n_segments=80)
PRIORS = (rbd_saliency, mbd_saliency, contrast_saliency, priors_saliency)


def _object_image(h: int = 60, w: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A reddish ellipse slightly off centre on a green-grey textured background."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    obj = ((ys - 0.45 * h) / (0.22 * h)) ** 2 + ((xs - 0.55 * w) / (0.18 * w)) ** 2 < 1
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = rng.integers(60, 100, (h, w))
    img[..., 1] = rng.integers(100, 140, (h, w))
    img[..., 2] = rng.integers(60, 100, (h, w))
    n = int(obj.sum())
    img[obj] = np.stack([rng.integers(200, 240, n), rng.integers(30, 60, n), rng.integers(40, 70, n)], 1)
    return img, obj


@pytest.mark.parametrize("prior", PRIORS, ids=lambda f: f.__name__)
def test_contract_shape_dtype_range(prior):
    img, _ = _object_image(45, 70)
    sal = prior(img, FAST)
    assert sal.shape == (45, 70) and sal.dtype == np.float32
    assert np.isfinite(sal).all() and sal.min() >= 0.0 and sal.max() <= 1.0
    assert sal.max() > 0.9  # normalised to [0, 1], not just bounded
    np.testing.assert_array_equal(prior(img, FAST), sal)  # deterministic


@pytest.mark.parametrize("prior", PRIORS, ids=lambda f: f.__name__)
def test_object_is_salient(prior):
    img, obj = _object_image()
    sal = prior(img, FAST)
    assert sal[obj].mean() > sal[~obj].mean() + 0.4
    pred = sal > 0.5
    assert (pred & obj).sum() / (pred | obj).sum() > 0.5


def test_fused_mask_on_object():
    img, obj = _object_image(90, 120, seed=3)
    pred = priors_saliency(img, FAST) > 0.5
    assert (pred & obj).sum() / (pred | obj).sum() > 0.7


@pytest.mark.parametrize("prior", PRIORS, ids=lambda f: f.__name__)
def test_constant_image_has_no_salient_pixel(prior):
    sal = prior(np.full((30, 40, 3), 128, np.uint8), FAST)
    assert sal.shape == (30, 40)
    np.testing.assert_array_equal(sal, 0.0)


@pytest.mark.parametrize("index, prior", [(0, rbd_saliency), (1, mbd_saliency), (2, contrast_saliency)])
def test_single_weight_fusion_is_that_prior(index, prior):
    img, _ = _object_image(50, 50, seed=1)
    weights = tuple(1.0 if k == index else 0.0 for k in range(3))
    fused = priors_saliency(img, PriorParams(size=64, n_segments=80, weights=weights))
    np.testing.assert_allclose(fused, prior(img, FAST), atol=1e-6)


def test_fuse_maps_weighted_mean_then_minmax():
    a = np.array([[0.0, 1.0], [0.5, 0.5]], np.float32)
    b = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    c = np.zeros((2, 2), np.float32)
    mix = (2 * a + 1 * b + 1 * c) / 4  # [[0.25, 0.5], [0.5, 0.25]]
    np.testing.assert_allclose(fuse_maps((a, b, c), (2, 1, 1)), (mix - 0.25) / 0.25)
    np.testing.assert_array_equal(fuse_maps((c, c, c), (1, 1, 1)), 0.0)


def _exact_mbd(img: np.ndarray) -> np.ndarray:
    """Exact minimum barrier distance to the border by brute force over value intervals [a, b]:
    a pixel has D <= b - a iff a 4-connected path of values in [a, b] joins it to the border."""
    border = np.zeros(img.shape, bool)
    border[0] = border[-1] = border[:, 0] = border[:, -1] = True
    levels = np.unique(img)
    best = np.full(img.shape, np.inf)
    for a in levels:
        for b in levels[levels >= a]:
            inside = (img >= a) & (img <= b)
            comp, _ = ndimage.label(inside)
            reach = inside & np.isin(comp, comp[border & inside])
            best[reach] = np.minimum(best[reach], b - a)
    return best


def test_mbd_transform_closed_form_pyramid():
    # value = Chebyshev distance to the border: every path to the border climbs down from I(x)
    # to 0, so the minimum barrier distance is I(x) itself.
    h, w = 9, 12
    ys, xs = np.mgrid[0:h, 0:w]
    pyramid = np.minimum(np.minimum(ys, h - 1 - ys), np.minimum(xs, w - 1 - xs)).astype(np.float32)
    out = _mbd_transform(np.stack([pyramid, 2 * pyramid], 2), iterations=2)
    np.testing.assert_array_equal(out[..., 0], pyramid)
    np.testing.assert_array_equal(out[..., 1], 2 * pyramid)


def test_mbd_transform_against_brute_force():
    rng = np.random.default_rng(0)
    equal, total = 0, 0
    for _ in range(20):
        img = rng.integers(0, 5, (7, 9)).astype(np.float32)
        fast = _mbd_transform(img[..., None], iterations=3)[..., 0]
        exact = _exact_mbd(img)
        assert np.all(fast >= exact - 1e-6)  # FastMBD returns the barrier of a real path
        equal += np.count_nonzero(fast == exact)
        total += img.size
    assert equal / total > 0.9  # and is usually the minimum


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"uint8 RGB image.*float64 \(8, 8, 3\)"):
        priors_saliency(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match=r"uint8 RGB image.*\(8, 8\)"):
        rbd_saliency(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="^weights: needs 3 non-negative weights"):
        PriorParams(weights=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="^size: must be >= 32, got 8$"):
        PriorParams(size=8)
