"""PCA whitening, k-means and the k-means protocols on planted, synthetic data."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.metrics import silhouette_score as sk_silhouette

from stages.evaluate.kmeans import (
    KMeansError,
    KMeansProtocol,
    PCAWhitening,
    apply_kmeans,
    assign,
    cell_class_counts,
    choose_k,
    discriminant_directions,
    fit_discriminant,
    kmeans,
    kmeans_plusplus,
    pca_whiten,
    pixel_kmeans_protocol,
    sample_pixel_features,
    silhouette_score,
)
from stages.evaluate.metrics import SalientClassCounts, confusion_matrix, hungarian_match, miou, remap_confusion


def planted(n: int, k: int, d: int, noise: float, seed: int):
    """L2-normalised prototypes around k random unit centres, unequal cluster sizes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 3.0)))
    x = centres[y] + noise * rng.normal(size=(n, d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_pca_whiten_matches_sklearn_and_whitens(rng):
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    z, fit = pca_whiten(x, dim=6)
    assert z.shape == (300, 6) and z.dtype == np.float32
    np.testing.assert_allclose(np.cov(z.T), np.eye(6), atol=1e-4)
    ref = PCA(n_components=6, whiten=True).fit_transform(x)
    np.testing.assert_allclose(np.abs(z), np.abs(ref), atol=1e-4)  # equal up to each column's sign
    np.testing.assert_allclose(fit.transform(x[:5]), z[:5], atol=1e-6)  # reusable on new rows
    again = PCAWhitening.from_dict(json.loads(json.dumps(fit.to_dict())))
    np.testing.assert_allclose(again.transform(x), z, atol=1e-6)


def test_pca_whiten_dim_above_rank_keeps_rank(rng):
    x = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 10))  # rank 4 in 10-d
    z, fit = pca_whiten(x, dim=8)
    assert z.shape == (200, 4) and fit.dim == 4
    np.testing.assert_allclose(np.cov(z.T), np.eye(4), atol=1e-4)
    with pytest.raises(KMeansError, match="zero variance"):
        pca_whiten(np.ones((5, 3)))
    with pytest.raises(KMeansError, match=r"expected \(N >= 2, D\)"):
        pca_whiten(np.ones((1, 3)))


def test_kmeans_recovers_planted_clusters_deterministically():
    # mean over 5 draws, as DESIGN.md measured (scikit-learn k-means++ 3 inits: 0.95)
    scores = []
    for draw in range(5):
        x, y = planted(n=1449, k=20, d=32, noise=0.5, seed=draw)
        z, _ = pca_whiten(x, 32)
        fit = kmeans(z, 20, seed=1234 + draw)
        scores.append(adjusted_rand_score(y, fit.assignment))
    assert np.mean(scores) > 0.9
    again = kmeans(z, 20, seed=1234 + 4)  # same seed as the last draw
    np.testing.assert_array_equal(fit.assignment, again.assignment)
    np.testing.assert_array_equal(fit.centroids, again.centroids)
    np.testing.assert_array_equal(assign(z, fit.centroids), fit.assignment)
    inertia = ((z - fit.centroids[fit.assignment]) ** 2).sum()
    assert fit.inertia == pytest.approx(inertia, rel=1e-4)


def test_kmeans_plusplus_covers_separated_clusters(rng):
    centres = rng.normal(size=(8, 5)) * 100
    x = (centres[np.repeat(np.arange(8), 20)] + rng.normal(size=(160, 5)) * 0.01).astype(np.float32)
    init = kmeans_plusplus(x, 8, np.random.default_rng(0))
    assert len({int(np.argmin(((centres - c) ** 2).sum(1))) for c in init}) == 8
    assert all((x == c).all(axis=1).any() for c in init)  # seeds are data points


def test_kmeans_validates():
    with pytest.raises(KMeansError, match="need 1 <= k <= N"):
        kmeans(np.zeros((3, 2), np.float32), 4, seed=0)


def object_setup(rng, n_images=120, n_groups=5, d=16):
    """Each image's prototype is planted in group g and its salient object is class g + 1."""
    x, y = planted(n_images, n_groups, d, noise=0.3, seed=int(rng.integers(1 << 30)))
    counts = SalientClassCounts(n_groups + 1)
    for g in y:
        label = np.zeros((12, 10), np.uint8)
        label[3:9, 2:8] = g + 1
        label[0] = 255
        counts.update(label == g + 1, label)
    return x, y, counts


def test_kmeans_protocol_perfect_case_and_reapply(rng):
    x, y, counts = object_setup(rng)
    report = KMeansProtocol(n_clusters=5, seeds=(1, 2), pca_dim=8).run(x, counts)
    assert report.miou == pytest.approx(100.0) and report.miou_std == 0.0
    assert report.seeds == [1, 2] and report.present_classes == list(range(6))
    model = json.loads(json.dumps(report.model()))
    json.dumps(report.metrics())
    seed0 = model["per_seed"][0]
    classes = apply_kmeans(x, PCAWhitening.from_dict(model["pca"]), np.array(seed0["centroids"]), seed0["mapping"], offset=1)
    np.testing.assert_array_equal(classes, y + 1)
    assert seed0["mapping"][0] == 0


def test_kmeans_protocol_matches_pixel_pass(rng):
    x, y, counts = object_setup(rng, n_groups=4)
    noisy = x + rng.normal(size=x.shape).astype(np.float32)  # imperfect clustering
    report = KMeansProtocol(n_clusters=4, seeds=(7,), pca_dim=None).run(noisy, counts)
    fit = kmeans(noisy, 4, seed=7)
    painted = np.zeros((5, 5), np.int64)
    for g, a in zip(y, fit.assignment):
        label = np.zeros((12, 10), np.uint8)
        label[3:9, 2:8] = g + 1
        label[0] = 255
        painted += confusion_matrix(np.where(label == g + 1, a + 1, 0), label, 5, 5)
    expected = 100 * miou(remap_confusion(painted, hungarian_match(painted), 5))
    assert report.miou == pytest.approx(expected)
    with pytest.raises(KMeansError, match=r"expected prototypes \(n_images=120, D\)"):
        KMeansProtocol(n_clusters=4, seeds=(7,)).run(noisy[:3], counts)


def test_protocol_whiten_and_fit_are_what_run_clusters(rng):
    """The label-free clusters stage calls whiten + fit: the partition run() scores, seed by seed."""
    x, _, counts = object_setup(rng)
    protocol = KMeansProtocol(n_clusters=5, seeds=(3, 4), pca_dim=8)
    report = protocol.run(x, counts)
    z, pca = protocol.whiten(x)
    assert pca.to_dict() == report.pca.to_dict()
    for seed, result in zip((3, 4), report.per_seed):
        fit = protocol.fit(z, seed)
        np.testing.assert_array_equal(fit.centroids, np.asarray(result.centroids, np.float32))
        assert np.bincount(fit.assignment, minlength=5).tolist() == result.cluster_sizes


def test_discriminant_directions_solve_the_generalised_eigenproblem(rng):
    import scipy.linalg

    x = rng.normal(size=(90, 6)) * np.array([3.0, 1.0, 1.0, 0.5, 0.2, 2.0])
    groups = rng.integers(0, 5, size=90)
    x[:, 1] += groups  # one direction carries the groups
    reg = 0.1
    dirs = discriminant_directions(x, groups, reg)
    # straightforward reference: Sw (with shrinkage) and Sb by definition, scipy's eigh(Sb, Sw)
    mean = x.mean(0)
    sw, sb = np.zeros((6, 6)), np.zeros((6, 6))
    for g in np.unique(groups):
        xg = x[groups == g]
        sw += (xg - xg.mean(0)).T @ (xg - xg.mean(0))
        sb += len(xg) * np.outer(xg.mean(0) - mean, xg.mean(0) - mean)
    sw, sb = sw / len(x), sb / len(x)
    sw += reg * np.trace(sw) / 6 * np.eye(6)
    values, vectors = scipy.linalg.eigh(sb, sw)  # ascending, vectors.T @ sw @ vectors = I
    values, vectors = values[::-1][:4], vectors[:, ::-1][:, :4]  # 5 groups: 4 directions
    assert dirs.shape == (6, 4)
    np.testing.assert_allclose(dirs.T @ sw @ dirs, np.eye(4), atol=1e-9)
    np.testing.assert_allclose(np.diag(dirs.T @ sb @ dirs), values, rtol=1e-8)
    np.testing.assert_allclose(np.abs(dirs), np.abs(vectors), atol=1e-8)
    assert np.allclose(discriminant_directions(x, groups, reg), dirs)  # deterministic signs


def test_discriminant_directions_validate(rng):
    x = rng.normal(size=(10, 3))
    with pytest.raises(KMeansError, match="at least 2 groups"):
        discriminant_directions(x, np.zeros(10, int))
    with pytest.raises(KMeansError, match="reg must be > 0"):
        discriminant_directions(x, np.arange(10) % 2, reg=0.0)
    with pytest.raises(KMeansError, match="n_groups"):
        fit_discriminant(x, 11)


def sequences(seed: int):
    """Classes hidden by nuisance: 4 classes x 6 'videos' x 10 frames; a class's signal lives in 3
    directions, each video also sits at its own place in 20 nuisance directions, and its frames
    spread around it. Even videos fit the space, odd ones are clustered."""
    rng = np.random.default_rng(seed)
    centres = 2.0 * rng.normal(size=(4, 3))
    rows, cls, video = [], [], []
    for c in range(4):
        for v in range(6):
            signal, nuisance = centres[c] + 0.3 * rng.normal(size=3), rng.normal(size=20)
            for _ in range(10):
                rows.append(np.concatenate([signal + 0.1 * rng.normal(size=3), nuisance + 0.5 * rng.normal(size=20)]))
                cls.append(c)
                video.append(v)
    return np.array(rows), np.array(cls), np.array(video) % 2 == 0


def test_discriminant_space_clusters_classes_that_pca_whitening_loses():
    pca_ari, disc_ari = [], []
    for seed in range(6):
        x, y, fit = sequences(seed)
        z, _ = pca_whiten(x[~fit].astype(np.float32), 32)
        pca_ari.append(adjusted_rand_score(y[~fit], kmeans(z, 4, 0, 3).assignment))
        space = fit_discriminant(x[fit], 12)  # 3 groups per class: over-clusters of the fitting videos
        assert space.dim == 11 and np.allclose(space.scales, 1.0)
        disc_ari.append(adjusted_rand_score(y[~fit], kmeans(space.transform(x[~fit]), 4, 0, 3).assignment))
    assert np.mean(pca_ari) < 0.3 and np.mean(disc_ari) > np.mean(pca_ari) + 0.4, (pca_ari, disc_ari)


def test_protocol_run_clusters_in_a_given_space_and_reapplies(rng):
    x, y, counts = object_setup(rng)
    space = fit_discriminant(x, 10)
    report = KMeansProtocol(n_clusters=5, seeds=(1, 2)).run(x, counts, space=space)
    assert report.pca is space and report.miou == pytest.approx(100.0)
    seed0 = json.loads(json.dumps(report.model()))["per_seed"][0]
    classes = apply_kmeans(x, PCAWhitening.from_dict(report.model()["pca"]), np.array(seed0["centroids"]),
                           seed0["mapping"], offset=1)
    np.testing.assert_array_equal(classes, y + 1)


def test_silhouette_matches_sklearn(rng):
    x = rng.normal(size=(90, 5))
    labels = rng.integers(0, 4, 90)
    labels[7] = 9  # a cluster of one point scores 0, as in scikit-learn
    assert silhouette_score(x, labels, chunk=16) == pytest.approx(sk_silhouette(x, labels), abs=1e-9)
    sampled = silhouette_score(x, labels, max_points=60, seed=1)  # a seeded subsample
    assert sampled == silhouette_score(x, labels, max_points=60, seed=1) and -1 <= sampled <= 1
    with pytest.raises(KMeansError, match="at least 2 non-empty clusters"):
        silhouette_score(x, np.zeros(90, int))


@pytest.mark.parametrize("k", [3, 5, 8])
def test_choose_k_recovers_planted_k(k):
    x, y = planted(n=400, k=k, d=16, noise=0.4, seed=k)
    z, _ = pca_whiten(x, 16)
    sel = choose_k(z, 2, 12, seed=1234)
    assert sel.k == k and sel.ks == list(range(2, 13))
    assert sel.silhouette[sel.ks.index(k)] == max(sel.silhouette)
    assert all(a >= b for a, b in zip(sel.inertia, sel.inertia[1:]))  # inertia falls with k
    assert adjusted_rand_score(y, kmeans(z, sel.k, seed=1234).assignment) > 0.95
    with pytest.raises(KMeansError, match="k_min <= k_max < N"):
        choose_k(z[:2], 2, 12, seed=0)


def test_sample_pixel_features_is_bottom_k(rng):
    images = [(rng.normal(size=(int(rng.integers(2, 6)), 3, 4)), None) for _ in range(9)]
    sample = sample_pixel_features(iter(images), 17, seed=5, normalize=False)
    keys_rng = np.random.default_rng(5)
    rows = np.concatenate([f.reshape(-1, 4) for f, _ in images])
    keys = np.concatenate([keys_rng.random(f.shape[0] * f.shape[1]) for f, _ in images])
    expected = rows[np.argsort(keys)[:17]].astype(np.float32)
    assert sorted(map(tuple, sample)) == sorted(map(tuple, expected))
    everything = sample_pixel_features(iter(images), 10_000, seed=5, normalize=False)
    assert everything.shape == (rows.shape[0], 4)
    f32 = [(f.astype(np.float32), None) for f, _ in images]
    before = [f.copy() for f, _ in f32]
    normed = sample_pixel_features(iter(f32), 10_000, seed=5, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    assert all(np.array_equal(a, f) for a, (f, _) in zip(before, f32))  # caller's features untouched


def test_cell_class_counts_matches_torch_nearest(rng):
    label = rng.integers(0, 4, (23, 17)).astype(np.uint8)
    label[:2] = 255
    cells = torch.arange(5 * 3, dtype=torch.float32).reshape(1, 1, 5, 3)
    up = F.interpolate(cells, size=(23, 17), mode="nearest")[0, 0].long().numpy()
    np.testing.assert_array_equal(cell_class_counts(label, (5, 3), 4), confusion_matrix(up, label, 15, 4))


@pytest.mark.parametrize("grid, label_shape", [((32, 32), (374, 500)), ((28, 21), (288, 512)), ((5, 3), (23, 17))])
def test_cell_class_counts_matches_cv2_inter_nearest(rng, grid, label_shape):
    """The grid is stretched as segment paints it (cv2 INTER_NEAREST), also at sizes where the
    exact-integer floor(i * h / H) picks another cell (32 -> 374 at row 187, 28 -> 288)."""
    label = rng.integers(0, 5, label_shape).astype(np.uint8)
    label[:3] = 255
    cells = np.arange(grid[0] * grid[1], dtype=np.int32).reshape(grid)  # (h, w) cell ids
    up = cv2.resize(cells, label_shape[::-1], interpolation=cv2.INTER_NEAREST)  # (H, W)
    want = confusion_matrix(up, label, cells.size, 5)
    np.testing.assert_array_equal(cell_class_counts(label, grid, 5), want)


def test_pixel_kmeans_protocol_separable(rng):
    n_cls, h, w, scale = 4, 4, 4, 4
    codes = np.eye(n_cls, 8)
    images = []
    for _ in range(12):
        cls_map = rng.integers(0, n_cls, (h, w))
        feats = codes[cls_map] + 0.05 * rng.normal(size=(h, w, 8))
        label = np.kron(cls_map, np.ones((scale, scale), int)).astype(np.uint8)
        label[0, :] = 255
        images.append((feats.astype(np.float16), label))
    report = pixel_kmeans_protocol(lambda: iter(images), n_cls=n_cls, n_clusters=n_cls, seeds=(0, 1), sample_pixels=100)
    assert report.miou == pytest.approx(100.0)
    over = pixel_kmeans_protocol(lambda: iter(images), n_cls=n_cls, n_clusters=6, seeds=(0,), matching="majority",
                                 sample_pixels=150, pca_dim=4)
    assert over.miou == pytest.approx(100.0) and len(over.per_seed[0].mapping) == 6
    with pytest.raises(KMeansError, match="matching must be 'hungarian' or 'majority'"):
        pixel_kmeans_protocol(lambda: iter(images), n_cls=n_cls, n_clusters=4, matching="greedy")
