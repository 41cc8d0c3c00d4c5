"""Dense CRF: the permutohedral lattice against a loop transcription of densecrf's algorithm and
against exact O(N^2) Gaussian sums; mean-field against the same inference with exact sums; the
behaviour the post-processing is for (noisy unaries cleaned along colour edges)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from stages.evaluate.crf import (
    PROB_FLOOR,
    CRFError,
    CRFParams,
    PermutohedralLattice,
    bilateral_features,
    dense_crf,
    mean_field,
    potts_message,
    spatial_gaussian_filter,
    unary_from_probs,
)


def _loop_lattice_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """densecrf's Permutohedral::init + compute, point by point with a dict as the hash table
    (Adams et al. 2010): the algorithm the vectorised lattice must reproduce."""
    n, d = features.shape
    canonical = [[i if j <= d - i else i - (d + 1) for j in range(d + 1)] for i in range(d + 1)]
    inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
    scale = [inv_std / math.sqrt((i + 2) * (i + 1)) for i in range(d)]
    table: dict[tuple, int] = {}
    offsets, weights = [], []
    for k in range(n):
        f = features[k]
        elevated = [0.0] * (d + 1)
        sm = 0.0
        for j in range(d, 0, -1):
            cf = f[j - 1] * scale[j - 1]
            elevated[j] = sm - j * cf
            sm += cf
        elevated[0] = sm
        rem0, total = [0] * (d + 1), 0
        for i in range(d + 1):
            v = elevated[i] / (d + 1)
            up, down = math.ceil(v) * (d + 1), math.floor(v) * (d + 1)
            rem0[i] = up if up - elevated[i] < elevated[i] - down else down
            total += rem0[i] // (d + 1)
        rank = [0] * (d + 1)
        for i in range(d):
            for j in range(i + 1, d + 1):
                if elevated[i] - rem0[i] < elevated[j] - rem0[j]:
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d + 1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d + 1
                rem0[i] += d + 1
            elif rank[i] > d:
                rank[i] -= d + 1
                rem0[i] -= d + 1
        bary = [0.0] * (d + 2)
        for i in range(d + 1):
            v = (elevated[i] - rem0[i]) / (d + 1)
            bary[d - rank[i]] += v
            bary[d - rank[i] + 1] -= v
        bary[0] += 1.0 + bary[d + 1]
        for r in range(d + 1):
            key = tuple(rem0[i] + canonical[r][rank[i]] for i in range(d))
            offsets.append(table.setdefault(key, len(table)))
            weights.append(bary[r])
    keys = list(table)
    lat = np.zeros((len(keys) + 1, values.shape[1]))  # last row: a missing neighbour
    for p in range(n):
        for r in range(d + 1):
            lat[offsets[p * (d + 1) + r]] += weights[p * (d + 1) + r] * values[p]
    for j in range(d + 1):
        new = lat.copy()
        for i, key in enumerate(keys):
            n1 = tuple(key[k] + (d if k == j else -1) for k in range(d))
            n2 = tuple(key[k] - (d if k == j else -1) for k in range(d))
            new[i] = lat[i] + 0.5 * (lat[table.get(n1, -1)] + lat[table.get(n2, -1)])
        lat = new
    alpha = 1.0 / (1.0 + 2.0 ** -d)
    out = np.zeros((n, values.shape[1]))
    for p in range(n):
        for r in range(d + 1):
            out[p] += weights[p * (d + 1) + r] * lat[offsets[p * (d + 1) + r]] * alpha
    return out


def _exact_gaussian(features: np.ndarray):
    """The exact kernel sums v -> sum_j exp(-|f_i - f_j|^2 / 2) v_j, O(N^2)."""
    f = features.astype(np.float64)
    k = np.exp(-0.5 * ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    return lambda v: (k @ np.asarray(v, np.float64)).astype(np.float32)


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth, contrasted random RGB image (H, W, 3) uint8: colour regions, not pixel noise."""
    blurred = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3)).astype(np.float32), (0, 0), 2.0)
    return np.clip((blurred - blurred.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def _two_colour_scene(h: int = 24, w: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A red disc on a blue background with mild pixel noise; (image (H, W, 3) uint8, truth (H, W))."""
    yy, xx = np.mgrid[0:h, 0:w]
    truth = ((yy - h / 2) ** 2 + (xx - w / 2.5) ** 2 < (h / 3) ** 2).astype(np.int64)
    colours = np.array([[40, 60, 200], [210, 40, 30]], np.float32)
    noise = np.random.default_rng(5).normal(0, 4, (h, w, 3))
    return np.clip(colours[truth] + noise, 0, 255).astype(np.uint8), truth


def _noisy_probs(truth: np.ndarray, n_cls: int, flip: float, seed: int) -> np.ndarray:
    """Probabilities (C, H, W) favouring the true class (0.6) except on a random `flip` share of
    pixels, which favour another class."""
    rng = np.random.default_rng(seed)
    favoured = np.where(rng.random(truth.shape) < flip, (truth + rng.integers(1, n_cls, truth.shape)) % n_cls, truth)
    probs = np.full((n_cls, *truth.shape), 0.4 / (n_cls - 1), np.float32)
    np.put_along_axis(probs, favoured[None], 0.6, axis=0)
    return probs


# ----------------------------------------------------------------------------- the lattice


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_lattice_equals_a_loop_transcription_of_densecrf(d):
    rng = np.random.default_rng(d)
    features = (rng.normal(size=(60, d)) * 1.5).astype(np.float32)
    values = rng.normal(size=(60, 3)).astype(np.float32)
    lattice = PermutohedralLattice(features)
    expected = _loop_lattice_filter(features.astype(np.float64), values.astype(np.float64))
    np.testing.assert_allclose(lattice.filter(values), expected, rtol=1e-4, atol=1e-5)
    assert lattice.filter(values[:, 0]).shape == (60,)  # a vector in, a vector out


def test_lattice_approximates_exact_gaussian_sums():
    # normalised sums (K v / K 1: the scale of the approximation drops out) on bilateral image
    # features, against exact sums with the stated kernel width and with widths 1.5x off (the
    # kind of error a wrong scale factor makes): the stated width matches best, within bounds
    # that the wider kernel fails
    rng = np.random.default_rng(1)
    h, w = 16, 20
    image = _smooth_image(rng, h, w)
    values = rng.random((h * w, 3)).astype(np.float32)
    for sxy, srgb, min_corr, max_rel in ((67.0, 3.0, 0.99, 0.1), (4.0, 12.0, 0.97, 0.3)):
        features = bilateral_features(image, sxy, srgb)
        lattice = PermutohedralLattice(features)
        got = lattice.filter(values) / lattice.filter(np.ones(h * w, np.float32))[:, None]

        def error(width: float) -> tuple[float, float]:
            exact = _exact_gaussian(features / width)
            ref = exact(values) / exact(np.ones((h * w, 1)))
            corr = float(np.corrcoef(got.ravel(), ref.ravel())[0, 1])
            return corr, float(np.abs(got - ref).mean() / np.abs(ref - ref.mean()).mean())

        (corr, rel), (narrow, _), (wide, wide_rel) = error(1.0), error(1 / 1.5), error(1.5)
        assert corr > min_corr and rel < max_rel, (sxy, srgb, corr, rel)
        assert corr > max(narrow, wide) and wide < min_corr and wide_rel > max_rel, (sxy, srgb, narrow, wide)
        assert lattice.n_vertices <= h * w * (features.shape[1] + 1)


def test_lattice_rejects_bad_features_and_values():
    with pytest.raises(CRFError, match=r"features must be \(N, d\)"):
        PermutohedralLattice(np.zeros(5))
    with pytest.raises(CRFError, match="features must be finite"):
        PermutohedralLattice(np.array([[0.0, np.nan]]))
    with pytest.raises(CRFError, match=r"values must be \(4, C\), got \(3, 2\)"):
        PermutohedralLattice(np.zeros((4, 2))).filter(np.zeros((3, 2)))
    with pytest.raises(CRFError, match="span too large a range for 64-bit lattice keys"):
        PermutohedralLattice(np.array([[0.0] * 5, [1e5] * 5]))


def test_spatial_filter_equals_exact_sums():
    h, w, sxy = 7, 9, 1.3
    values = np.random.default_rng(0).random((h * w, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    pos = np.stack([xx.ravel(), yy.ravel()], axis=1) / sxy
    np.testing.assert_allclose(spatial_gaussian_filter(h, w, sxy)(values), _exact_gaussian(pos)(values), atol=1e-3)


# ----------------------------------------------------------------------------- inference


def test_mean_field_with_exact_bilateral_sums_agrees_with_dense_crf():
    image, truth = _two_colour_scene(20, 24)
    image = np.clip(image.astype(np.int16) + _smooth_image(np.random.default_rng(3), 20, 24) // 8, 0, 255
                    ).astype(np.uint8)  # some texture, so that colour distances vary
    probs = _noisy_probs(truth, 3, 0.35, seed=2)
    params = CRFParams(bilateral_sxy=10.0, bilateral_srgb=13.0)
    h, w = truth.shape
    exact = mean_field(unary_from_probs(probs), [
        potts_message(spatial_gaussian_filter(h, w, params.gaussian_sxy), params.gaussian_compat, h * w),
        potts_message(_exact_gaussian(bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb)),
                      params.bilateral_compat, h * w),
    ], params.iterations).T.reshape(3, h, w)
    fast = dense_crf(image, probs, params)
    agree = fast.argmax(0) == exact.argmax(0)
    changed = exact.argmax(0) != probs.argmax(0)  # the pixels where the agreement is not trivial
    assert changed.mean() > 0.2 and agree.mean() > 0.95 and agree[changed].mean() > 0.9, (changed.mean(), agree.mean())
    assert np.abs(fast - exact).max() < 0.1


@pytest.mark.parametrize("n_cls", [2, 4])
def test_crf_cleans_a_noisy_unary(n_cls):
    image, truth = _two_colour_scene()
    probs = _noisy_probs(truth, n_cls, 0.3, seed=n_cls)
    before = (probs.argmax(0) == truth).mean()
    q = dense_crf(image, probs)
    after = (q.argmax(0) == truth).mean()
    assert before < 0.75 and after > 0.97, (before, after)


@pytest.mark.parametrize("n_cls", [3, 12])  # the few-class and many-class softmax
def test_zero_iterations_returns_the_normalised_input(n_cls):
    rng = np.random.default_rng(0)
    probs = rng.uniform(0.0, 2.0, (n_cls, 5, 6)).astype(np.float64)  # not normalised, some > 1
    probs[0, 0, 0] = 0.0  # clipped to PROB_FLOOR
    image = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    clipped = np.clip(probs, PROB_FLOOR, 1.0)
    np.testing.assert_allclose(dense_crf(image, probs, CRFParams(iterations=0)), clipped / clipped.sum(0), rtol=1e-5)


def test_marginals_are_distributions_and_equivariant_in_the_classes():
    rng = np.random.default_rng(4)
    image = _smooth_image(rng, 18, 22)
    for n_cls in (4, 12):
        probs = rng.dirichlet(np.ones(n_cls), (18, 22)).transpose(2, 0, 1).astype(np.float32)
        q = dense_crf(image, probs)
        assert q.dtype == np.float32 and q.shape == probs.shape
        np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-5)
        assert (q >= 0).all()
        perm = rng.permutation(n_cls)
        np.testing.assert_allclose(dense_crf(image, probs[perm]), q[perm], atol=1e-5)  # Potts: no class is special


def test_params_defaults_and_dict():
    p = CRFParams()
    assert p.to_dict() == {"iterations": 10, "gaussian_sxy": 1.0, "gaussian_compat": 3.0, "bilateral_sxy": 67.0,
                           "bilateral_srgb": 3.0, "bilateral_compat": 4.0}
    image, truth = _two_colour_scene(8, 8)
    probs = _noisy_probs(truth, 2, 0.3, seed=0)
    off = CRFParams(gaussian_compat=0.0, bilateral_compat=0.0)  # no pairwise term: the unary alone
    np.testing.assert_allclose(dense_crf(image, probs, off), probs / probs.sum(0), rtol=1e-5)


@pytest.mark.realdata
@pytest.mark.slow  # about 5 s: three 512 x 288 photographs
def test_crf_sharpens_coarse_predictions_on_photographs(davis_root):
    # probe-like input on real photos: the label's classes on a grid 16x coarser, noisy logits,
    # bilinear back to full size; the CRF must recover much of the lost boundary detail
    from stages.data import DatasetIndex, load_image, load_label
    from stages.evaluate.metrics import confusion_matrix, segmentation_scores

    dataset = DatasetIndex.open(davis_root)
    n_cls = len(dataset.classes)
    rng = np.random.default_rng(0)
    before, after = np.zeros((n_cls, n_cls), np.int64), np.zeros((n_cls, n_cls), np.int64)
    for id_ in dataset.ids("val")[::80]:  # 3 images
        image = load_image(dataset.sample(id_).image)
        label = load_label(dataset.sample(id_).label, image.shape)
        h, w = label.shape
        coarse = cv2.resize(np.where(label == 255, 0, label), (w // 16, h // 16), interpolation=cv2.INTER_NEAREST)
        logits = (3.0 * np.eye(n_cls, dtype=np.float32)[coarse]
                  + rng.normal(0, 1, (*coarse.shape, n_cls)).astype(np.float32))  # (h, w, C)
        logits = np.stack([cv2.resize(c, (w, h)) for c in logits.transpose(2, 0, 1)])  # (C, H, W)
        probs = np.exp(logits - logits.max(axis=0))
        probs /= probs.sum(axis=0)
        before += confusion_matrix(probs.argmax(0), label, n_cls, n_cls)
        after += confusion_matrix(dense_crf(image, probs).argmax(0), label, n_cls, n_cls)
    present = np.flatnonzero(before.sum(axis=0))  # the classes of these images
    miou_before = segmentation_scores(before[np.ix_(present, present)]).miou
    miou_after = segmentation_scores(after[np.ix_(present, present)]).miou
    assert miou_after > miou_before + 0.05, (miou_before, miou_after)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": -1}, r"iterations must be an integer >= 0, got -1"),
    ({"iterations": 2.5}, r"iterations must be an integer >= 0, got 2\.5"),
    ({"gaussian_sxy": 0.0}, r"gaussian_sxy must be a finite number > 0, got 0\.0"),
    ({"bilateral_srgb": -3.0}, r"bilateral_srgb must be a finite number > 0, got -3\.0"),
    ({"bilateral_sxy": float("inf")}, r"bilateral_sxy must be a finite number > 0, got inf"),
    ({"bilateral_compat": -4.0}, r"bilateral_compat must be a finite number >= 0, got -4\.0"),
])
def test_bad_params(kwargs, message):
    with pytest.raises(CRFError, match=message):
        CRFParams(**kwargs)


def test_bad_inputs():
    image = np.zeros((4, 5, 3), np.uint8)
    probs = np.full((2, 4, 5), 0.5, np.float32)
    cases = [
        (image.astype(np.float32), probs, r"image must be uint8 \(0\.\.255\), got dtype float32"),
        (image[:, :, :1], probs, r"image must be an \(H, W, 3\) RGB array, got shape \(4, 5, 1\)"),
        (image, probs[:, :3], r"probs \(C, H, W\) = \(2, 3, 5\) do not match the image's \(H, W\) = \(4, 5\)"),
        (image, probs[0], r"probs must be a \(C, H, W\) array, got shape \(4, 5\)"),
        (image, (probs * 2).astype(np.int64), r"probs must be floating point probabilities, got dtype int64"),
        (image, -probs, r"probs must be finite and >= 0"),
        (image, np.where(probs > 0, np.nan, probs), r"probs must be finite and >= 0"),
    ]
    for img, p, message in cases:
        with pytest.raises(CRFError, match=message):
            dense_crf(img, p)
    with pytest.raises(CRFError, match="params must be a CRFParams, got dict"):
        dense_crf(image, probs, {"iterations": 3})
    assert issubclass(CRFError, ValueError)
