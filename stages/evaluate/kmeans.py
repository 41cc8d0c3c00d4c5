"""K-means evaluation: PCA whitening, k-means (k-means++ seeding + faiss Lloyd), and the protocols.

Object level (the paper's protocol): one prototype per image, PCA(32, whiten), k-means with 20
clusters per seed, prediction "cluster + 1 on the salient pixels, 0 elsewhere", Hungarian
matching on IoU, mIoU averaged over seeds. Scoring goes through `SalientClassCounts`, so a seed
costs a clustering plus O(n_images * n_cls) additions instead of passes over the pixels.

Pixel level (backbones without a saliency head): k-means on a uniform sample of per-pixel
features, every pixel assigned, confusion at the label's resolution, streamed image by image.

Why k-means++: on planted 20-cluster prototypes scikit-learn's k-means++ with 3 inits recovered
the clusters best (adjusted Rand 0.95) against faiss's random init (0.90), and the gap was 74.6
vs 82.2 mIoU on the full protocol (DESIGN.md "Measured facts"). So seeding is greedy k-means++
(as scikit-learn does it), several restarts, lowest inertia kept; faiss only runs the Lloyd
iterations, on GPU when asked and available.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import faiss
import numpy as np

from stages.common.resize import nearest_indices

from .metrics import (
    SalientClassCounts,
    confusion_matrix,
    hungarian_match,
    majority_match,
    remap_confusion,
    segmentation_scores,
)

VOC_KMEANS_SEEDS = (1234, 1235, 1236, 1237, 1238)


class KMeansError(ValueError):
    """Bad input to PCA / k-means / a k-means protocol."""


# ----------------------------------------------------------------------------- PCA whitening


@dataclass(frozen=True)
class PCAWhitening:
    """A fitted linear map to the clustering space: z = ((x - mean) @ components.T) * scales.

    From :func:`pca_whiten` (orthonormal rows by decreasing variance, scales 1 / sqrt(variance))
    or :func:`fit_discriminant` (discriminant directions, scales 1); ``segment`` applies either.
    """

    mean: np.ndarray  # (D,) float64
    components: np.ndarray  # (d, D) float64
    scales: np.ndarray  # (d,) float64

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(N, D) -> (N, d) float32, whitened with the fitted statistics."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise KMeansError(f"PCAWhitening.transform: expected (N, {self.mean.shape[0]}), got {x.shape}")
        return (((x - self.mean) @ self.components.T) * self.scales).astype(np.float32)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(), "scales": self.scales.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "PCAWhitening":
        return cls(np.asarray(d["mean"], np.float64), np.asarray(d["components"], np.float64),
                   np.asarray(d["scales"], np.float64))


def pca_whiten(x: np.ndarray, dim: int = 32, eps: float = 1e-6, chunk: int = 65536) -> tuple[np.ndarray, PCAWhitening]:
    """Fit PCA with whitening on x (N, D) and return (x whitened (N, d) float32, the fit).

    Variance uses N - 1 (as scikit-learn). d = min(dim, number of components whose variance
    exceeds eps * the largest): asking for more dimensions than the data's rank gives fewer
    columns instead of whitening null directions, which would blow numerical noise up to unit
    variance and let it dominate k-means distances. Each component's sign is fixed (largest
    absolute loading positive) so the fit is deterministic. Fitted through the D x D covariance
    in float64, accumulated over row chunks, so N can be large (pixel samples).
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise KMeansError(f"pca_whiten: expected (N >= 2, D) data, got shape {x.shape}")
    if dim < 1:
        raise KMeansError(f"pca_whiten: dim must be >= 1, got {dim}")
    n, d_in = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d_in, d_in))
    for start in range(0, n, chunk):
        xc = x[start:start + chunk].astype(np.float64) - mean
        cov += xc.T @ xc
    cov /= n - 1
    var, vecs = np.linalg.eigh(cov)  # ascending
    var, vecs = var[::-1], vecs[:, ::-1]
    keep = int(np.count_nonzero(var > eps * max(var[0], 0.0))) if var[0] > 0 else 0
    if keep == 0:
        raise KMeansError("pca_whiten: the data has zero variance (all rows equal)")
    d_out = min(dim, keep)
    comps = vecs[:, :d_out].T.copy()  # (d, D)
    flip = np.sign(comps[np.arange(d_out), np.argmax(np.abs(comps), axis=1)])
    comps *= flip[:, None]
    fit = PCAWhitening(mean, comps, 1.0 / np.sqrt(var[:d_out]))
    return fit.transform(x), fit


# ----------------------------------------------------------------------------- discriminant space


def discriminant_directions(x: np.ndarray, groups: np.ndarray, reg: float = 0.1) -> np.ndarray:
    """Fisher's discriminant directions of rows x (N, D) for the partition ``groups`` (N,): the
    columns (D, d) of L maximising between-group over within-group scatter, scaled so that the
    regularised within-group scatter is the identity in the new space (L.T Sw L = I), by
    decreasing ratio; d = min(number of groups - 1, D).

    Sw is the mean within-group scatter plus ``reg`` times its mean eigenvalue on the diagonal
    (shrinkage: with fewer rows than dimensions Sw is singular). Solved through the Cholesky
    factor of Sw and an SVD of the between-group scatter there; each column's sign is fixed (largest absolute
    loading positive) so the result is deterministic.
    """
    x = np.asarray(x, dtype=np.float64)
    groups = np.asarray(groups)
    if x.ndim != 2 or groups.shape != (x.shape[0],):
        raise KMeansError(f"discriminant_directions: expected x (N, D) and groups (N,), got {x.shape}, {groups.shape}")
    labels, inverse = np.unique(groups, return_inverse=True)
    if len(labels) < 2:
        raise KMeansError("discriminant_directions: needs at least 2 groups")
    if reg <= 0:
        raise KMeansError(f"discriminant_directions: reg must be > 0, got {reg}")
    n, d_in = x.shape
    mean = x.mean(axis=0)
    sums = np.zeros((len(labels), d_in))
    np.add.at(sums, inverse, x)
    sizes = np.bincount(inverse).astype(np.float64)
    centres = sums / sizes[:, None]
    within = x - centres[inverse]
    sw = within.T @ within / n
    between = (centres - mean) * np.sqrt(sizes / n)[:, None]  # sb = between.T @ between
    sw[np.diag_indices(d_in)] += reg * max(np.trace(sw) / d_in, 1e-12)
    chol_inv = np.linalg.inv(np.linalg.cholesky(sw))  # sw^-1 = chol_inv.T @ chol_inv
    b = between @ chol_inv.T  # (G, D): sb in the whitened-within space is b.T @ b
    _, sing, vt = np.linalg.svd(b, full_matrices=False)  # eigenvectors of b.T b, decreasing
    d_out = int(min(len(labels) - 1, d_in, np.count_nonzero(sing > 1e-10 * max(sing[0], 1e-300))))
    dirs = chol_inv.T @ vt[:d_out].T  # (D, d)
    flip = np.sign(dirs[np.argmax(np.abs(dirs), axis=0), np.arange(d_out)])
    return dirs * np.where(flip == 0, 1.0, flip)[None, :]


def over_cluster(x: np.ndarray, n_groups: int, *, pca_dim: int = 32, seed: int = 0, n_init: int = 3) -> np.ndarray:
    """(N,) int64 group of each row of x (N, D): k-means with ``n_groups`` (many more than the
    classes) clusters in the PCA-whitened space (``pca_dim``). The groups of
    :func:`fit_discriminant` and of the train stage's near-duplicate groups."""
    z, _ = pca_whiten(np.asarray(x, dtype=np.float64), pca_dim)
    return kmeans(z, int(n_groups), seed, n_init).assignment


def fit_discriminant(x: np.ndarray, n_groups: int, *, reg: float = 0.1, pca_dim: int = 32, seed: int = 0,
                     n_init: int = 3) -> PCAWhitening:
    """A label-free discriminant space for K-means, fitted on prototypes x (N, D) (e.g. the train
    split's): k-means with ``n_groups`` clusters in the PCA-whitened space (``pca_dim``) groups the
    rows finely (over-clustering), then Fisher's discriminant of those groups
    (:func:`discriminant_directions`, shrinkage ``reg``) maps any prototype to z = (x - mean) @ L.

    K-means assumes round clusters of equal spread; PCA whitening rounds the whole cloud, this
    rounds the groups: directions along which members of a group differ (pose, background, the
    frames of one video) shrink, directions that separate groups grow (LDA-Km, Ding & Li 2007).
    Returned as a :class:`PCAWhitening` (scales 1), so reports, ``segment`` and
    ``apply_kmeans`` use it unchanged.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise KMeansError(f"fit_discriminant: expected (N >= 2, D) prototypes, got shape {x.shape}")
    n_groups = int(n_groups)
    if not 2 <= n_groups <= x.shape[0]:
        raise KMeansError(f"fit_discriminant: needs 2 <= n_groups <= {x.shape[0]} prototypes, got {n_groups}")
    groups = over_cluster(x, n_groups, pca_dim=pca_dim, seed=seed, n_init=n_init)
    dirs = discriminant_directions(x, groups, reg)
    return PCAWhitening(x.mean(axis=0), dirs.T.copy(), np.ones(dirs.shape[1]))


# ----------------------------------------------------------------------------- k-means


class KMeansFit(NamedTuple):
    centroids: np.ndarray  # (k, D) float32
    assignment: np.ndarray  # (N,) int64
    inertia: float  # sum of squared distances to the assigned centroid


# Below this many multiply-adds per pass (N * k * D), faiss runs single-threaded: OpenMP's
# start-up and barriers cost more than they save, and on a loaded machine spinning threads made
# a 1,449 x 32 x 20 clustering 25x slower (1.6 s against 0.06 s), with identical results.
_SMALL_WORK = 50_000_000


@contextmanager
def _faiss_threads(work: int) -> Iterator[None]:
    """Run faiss single-threaded for small problems; the setting is restored on exit."""
    if work >= _SMALL_WORK:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _use_gpu(use_gpu: bool) -> bool:
    return bool(use_gpu) and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _nearest(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid (N,) int64 and the squared distance to it (N,) float32."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    if _use_gpu(use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    with _faiss_threads(x.shape[0] * centroids.shape[0] * centroids.shape[1]):
        dist, idx = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return idx[:, 0].astype(np.int64), np.maximum(dist[:, 0], 0.0)


def assign(x: np.ndarray, centroids: np.ndarray, use_gpu: bool = False) -> np.ndarray:
    """Nearest-centroid index (N,) int64 of each row of x (N, D) for centroids (k, D)."""
    x = np.asarray(x)
    centroids = np.asarray(centroids)
    if x.ndim != 2 or centroids.ndim != 2 or x.shape[1] != centroids.shape[1]:
        raise KMeansError(f"assign: expected x (N, D) and centroids (k, D), got {x.shape} and {centroids.shape}")
    return _nearest(x, centroids, use_gpu)[0]


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator, n_local_trials: int | None = None) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; greedy variant as scikit-learn):
    each new centre is the best of `n_local_trials` (default 2 + ln k) D²-sampled candidates,
    best meaning the lowest resulting potential. x (N, D) float32 -> (k, D) float32."""
    n = x.shape[0]
    trials = n_local_trials if n_local_trials is not None else 2 + int(math.log(k))
    sq_norms = np.einsum("nd,nd->n", x, x)  # (N,)

    def sq_dist(rows: np.ndarray) -> np.ndarray:  # (t,) row ids -> (t, N) squared distances
        c = x[rows]
        d2 = sq_norms[rows][:, None] + sq_norms[None, :] - 2.0 * (c @ x.T)
        return np.maximum(d2, 0.0).astype(np.float64)

    centers = np.empty(k, dtype=np.int64)
    centers[0] = rng.integers(n)
    closest = sq_dist(centers[:1])[0]  # (N,)
    potential = closest.sum()
    for c in range(1, k):
        if potential > 0:
            draws = rng.random(trials) * potential
            candidates = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        else:  # fewer distinct points than centres: any point is as good as another
            candidates = rng.integers(n, size=trials)
        new_closest = np.minimum(closest[None, :], sq_dist(candidates))  # (t, N)
        best = int(np.argmin(new_closest.sum(axis=1)))
        centers[c] = candidates[best]
        closest = new_closest[best]
        potential = closest.sum()
    return x[centers].copy()


def kmeans(
    x: np.ndarray, k: int, seed: int, n_init: int = 3, n_iter: int = 100, use_gpu: bool = False
) -> KMeansFit:
    """k-means on x (N, D): n_init restarts of k-means++ seeding + n_iter Lloyd iterations in
    faiss (all N points, no subsampling), lowest inertia kept. Deterministic for a seed.

    use_gpu runs the Lloyd iterations on GPU when faiss has one, on CPU otherwise.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise KMeansError(f"kmeans: expected (N, D) data, got shape {x.shape}")
    if not 1 <= k <= x.shape[0]:
        raise KMeansError(f"kmeans: need 1 <= k <= N, got k={k} for N={x.shape[0]}")
    if n_init < 1 or n_iter < 1:
        raise KMeansError(f"kmeans: n_init and n_iter must be >= 1, got {n_init} and {n_iter}")
    n, d = x.shape
    rng = np.random.default_rng(seed)
    gpu = _use_gpu(use_gpu)
    best: KMeansFit | None = None
    for _ in range(n_init):
        init = kmeans_plusplus(x, k, rng)
        km = faiss.Kmeans(
            d, k, niter=n_iter, nredo=1, seed=int(rng.integers(2**31 - 1)), verbose=False,
            max_points_per_centroid=n // k + 1, min_points_per_centroid=1, gpu=gpu,
        )
        with _faiss_threads(n * k * d):
            km.train(x, init_centroids=init)
        centroids = km.centroids.astype(np.float32)
        labels, d2 = _nearest(x, centroids, gpu)
        inertia = float(d2.sum(dtype=np.float64))
        if best is None or inertia < best.inertia:
            best = KMeansFit(centroids, labels, inertia)
    assert best is not None
    return best


# ----------------------------------------------------------------------------- reports


@dataclass
class SeedResult:
    """One seed of a k-means protocol. IoUs in percent; mapping[p] is the class of predicted id p
    (p = 0 background / unsalient, p = c + 1 cluster c for the object protocol; p = c for the
    pixel protocol), -1 for an id matched to no class."""

    seed: int
    miou: float
    per_class_iou: list[float]
    pixel_accuracy: float
    mapping: list[int]
    inertia: float
    cluster_sizes: list[int]
    centroids: list[list[float]]  # (k, d) in the whitened space


@dataclass
class KMeansReport:
    """Result of a k-means protocol over several seeds; figures in percent."""

    protocol: str  # "object" or "pixel"
    n_clusters: int
    matching: str
    miou: float  # mean over seeds
    miou_std: float  # sample std over seeds (0 for one seed)
    per_class_iou: list[float]  # mean over seeds
    pixel_accuracy: float  # mean over seeds
    present_classes: list[int]  # classes occurring in the ground truth
    per_seed: list[SeedResult]
    pca: PCAWhitening | None = field(default=None, repr=False)

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.per_seed]

    def metrics(self) -> dict:
        """JSON-ready figures (no centroids): miou, miou_std, per_class_iou, seeds, per_seed."""
        return {
            "protocol": self.protocol, "n_clusters": self.n_clusters, "matching": self.matching,
            "miou": self.miou, "miou_std": self.miou_std, "per_class_iou": self.per_class_iou,
            "pixel_accuracy": self.pixel_accuracy, "present_classes": self.present_classes,
            "seeds": self.seeds,
            "per_seed": [{k: v for k, v in asdict(r).items() if k != "centroids"} for r in self.per_seed],
        }

    def model(self) -> dict:
        """JSON-ready fitted state to re-apply the clustering to new images (see `apply_kmeans`)."""
        return {
            "protocol": self.protocol, "n_clusters": self.n_clusters,
            "pca": None if self.pca is None else self.pca.to_dict(),
            "per_seed": [{"seed": r.seed, "centroids": r.centroids, "mapping": r.mapping} for r in self.per_seed],
        }


def apply_kmeans(x: np.ndarray, pca: PCAWhitening | None, centroids: np.ndarray, mapping: Sequence[int],
                 offset: int) -> np.ndarray:
    """Classes (N,) of new prototypes / pixel features x (N, D) under a fitted clustering.

    offset = 1 for the object protocol (cluster c is predicted id c + 1; the unsalient pixels
    take mapping[0]), 0 for the pixel protocol. Ids matched to no class give -1.
    """
    z = pca.transform(x) if pca is not None else np.asarray(x, dtype=np.float32)
    return np.asarray(mapping, dtype=np.int64)[assign(z, np.asarray(centroids, np.float32)) + offset]


MATCHINGS = ("hungarian", "majority")


def _check_matching(matching: str) -> None:
    if matching not in MATCHINGS:
        raise KMeansError(f"matching must be 'hungarian' or 'majority', got {matching!r}")


def _match(conf: np.ndarray, matching: str) -> np.ndarray:
    _check_matching(matching)
    return hungarian_match(conf) if matching == "hungarian" else majority_match(conf)


def _seed_result(seed: int, conf: np.ndarray, matching: str, n_cls: int, fit: KMeansFit) -> tuple[SeedResult, np.ndarray]:
    mapping = _match(conf, matching)
    scores = segmentation_scores(remap_confusion(conf, mapping, n_cls))
    k = fit.centroids.shape[0]
    result = SeedResult(
        seed=int(seed), miou=100.0 * scores.miou, per_class_iou=(100.0 * scores.per_class_iou).tolist(),
        pixel_accuracy=100.0 * scores.pixel_accuracy, mapping=mapping.tolist(), inertia=fit.inertia,
        cluster_sizes=np.bincount(fit.assignment, minlength=k).tolist(), centroids=fit.centroids.tolist(),
    )
    return result, scores.present


def _report(protocol: str, k: int, matching: str, results: list[SeedResult], present: np.ndarray,
            pca: PCAWhitening | None) -> KMeansReport:
    mious = np.array([r.miou for r in results])
    return KMeansReport(
        protocol=protocol, n_clusters=k, matching=matching, miou=float(mious.mean()),
        miou_std=float(mious.std(ddof=1)) if len(mious) > 1 else 0.0,
        per_class_iou=np.mean([r.per_class_iou for r in results], axis=0).tolist(),
        pixel_accuracy=float(np.mean([r.pixel_accuracy for r in results])),
        present_classes=np.flatnonzero(present).tolist(), per_seed=results, pca=pca,
    )


@dataclass(frozen=True)
class KMeansProtocol:
    """The paper's object-level k-means protocol (REFERENCE.md "Evaluation", K-means).

    Every prototype passed in is clustered, including those of images without a salient pixel
    (whose zero prototype the reference clusters too; their salient region is empty, so their
    cluster does not change the score).
    """

    n_clusters: int = 20
    seeds: Sequence[int] = VOC_KMEANS_SEEDS
    pca_dim: int | None = 32
    n_init: int = 3
    n_iter: int = 100
    matching: str = "hungarian"
    use_gpu: bool = False

    def whiten(self, prototypes: np.ndarray) -> tuple[np.ndarray, PCAWhitening | None]:
        """The space the protocol clusters in: prototypes (N, D) -> (z (N, d) float32, the PCA fit or
        None without whitening). Shared with the label-free clusters stage (stages/clusters/)."""
        prototypes = np.asarray(prototypes)
        if self.pca_dim is None:
            return prototypes.astype(np.float32), None
        return pca_whiten(prototypes, self.pca_dim)

    def fit(self, z: np.ndarray, seed: int) -> KMeansFit:
        """One seed's clustering of whitened prototypes z (N, d): k-means++ restarts, lowest inertia."""
        return kmeans(z, self.n_clusters, seed, self.n_init, self.n_iter, self.use_gpu)

    def run(self, prototypes: np.ndarray, counts: SalientClassCounts,
            space: PCAWhitening | None = None) -> KMeansReport:
        """prototypes (n_images, D), L2-normalised, in the same order as `counts`. ``space``: a
        fitted map to cluster in (e.g. :func:`fit_discriminant`) instead of PCA whitening."""
        prototypes = np.asarray(prototypes)
        if prototypes.ndim != 2 or prototypes.shape[0] != len(counts):
            raise KMeansError(
                f"KMeansProtocol: expected prototypes (n_images={len(counts)}, D), got {prototypes.shape}"
            )
        if not self.seeds:
            raise KMeansError("KMeansProtocol: seeds must not be empty")
        _check_matching(self.matching)
        z, pca = self.whiten(prototypes) if space is None else (space.transform(prototypes), space)
        results, present = [], np.zeros(counts.n_cls, bool)
        for seed in self.seeds:
            fit = self.fit(z, seed)
            conf = counts.confusion(fit.assignment, self.n_clusters)  # (k + 1, n_cls)
            result, present = _seed_result(seed, conf, self.matching, counts.n_cls, fit)
            results.append(result)
        return _report("object", self.n_clusters, self.matching, results, present, pca)


# ----------------------------------------------------------------------------- choosing k


def silhouette_score(x: np.ndarray, labels: np.ndarray, max_points: int = 10_000, seed: int = 0,
                     chunk: int = 1024) -> float:
    """Mean silhouette (Rousseeuw 1987) of a partition of x (N, D), Euclidean, as scikit-learn
    defines it: s(i) = (b - a) / max(a, b) with a the mean distance to the other points of i's
    cluster and b the lowest mean distance to another cluster's points; 0 for a point alone in
    its cluster. Over a seeded uniform sample of ``max_points`` points when N is larger (the
    sample's own distances); memory O(chunk * N)."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise KMeansError(f"silhouette_score: expected x (N, D) and labels (N,), got {x.shape} and {labels.shape}")
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], max_points, replace=False))
        x, labels = x[keep], labels[keep]
    _, labels = np.unique(labels, return_inverse=True)
    k = int(labels.max()) + 1 if labels.size else 0
    if k < 2:
        raise KMeansError(f"silhouette_score: needs at least 2 non-empty clusters, got {k}")
    onehot = np.zeros((x.shape[0], k))
    onehot[np.arange(x.shape[0]), labels] = 1.0
    sizes = onehot.sum(axis=0)  # (k,)
    sq = np.einsum("nd,nd->n", x, x)
    scores = np.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        d = np.sqrt(np.maximum(sq[rows, None] + sq[None, :] - 2.0 * (x[rows] @ x.T), 0.0))  # (c, N)
        sums = d @ onehot  # (c, k): summed distance to each cluster's points
        own = labels[rows]
        idx = np.arange(len(own))
        own_size = sizes[own]
        a = sums[idx, own] / np.maximum(own_size - 1, 1)
        mean_other = sums / sizes
        mean_other[idx, own] = np.inf
        b = mean_other.min(axis=1)
        s = (b - a) / np.maximum(np.maximum(a, b), 1e-12)
        scores[rows] = np.where(own_size > 1, s, 0.0)
    return float(scores.mean())


class KSelection(NamedTuple):
    """The automatic choice of k: every tried k with its silhouette and inertia, and the winner."""

    k: int
    ks: list[int]
    silhouette: list[float]
    inertia: list[float]
    rule: str


K_RULE = "the k in [k_min, k_max] with the highest mean silhouette of the whitened prototypes (ties: the smaller k)"


def choose_k(z: np.ndarray, k_min: int, k_max: int, seed: int, n_init: int = 3, n_iter: int = 100,
             use_gpu: bool = False) -> KSelection:
    """Cluster whitened prototypes z (N, d) with every k in [k_min, min(k_max, N - 1)] (the
    protocol's k-means, one seed) and keep the k with the highest mean silhouette.

    Why silhouette and not the elbow of inertia: inertia falls with every k, so an elbow needs a
    knee heuristic and a scale; the silhouette has a maximum, is scale-free, and scores each
    partition on its own. Its known bias (coarse partitions of diffuse data) is why the whole
    curve is drawn next to the choice.
    """
    z = np.asarray(z, dtype=np.float32)
    hi = min(int(k_max), z.shape[0] - 1)
    if k_min < 2 or hi < k_min:
        raise KMeansError(f"choose_k: needs 2 <= k_min <= k_max < N; got k_min={k_min}, k_max={k_max}, N={z.shape[0]}")
    ks, sil, inertia = [], [], []
    for k in range(int(k_min), hi + 1):
        fit = kmeans(z, k, seed, n_init, n_iter, use_gpu)
        n_used = len(np.unique(fit.assignment))
        ks.append(k)
        sil.append(silhouette_score(z, fit.assignment, seed=seed) if n_used >= 2 else -1.0)
        inertia.append(fit.inertia)
    best = int(np.argmax(sil))  # the first maximum: the smaller k on ties
    return KSelection(ks[best], ks, sil, inertia, K_RULE)


# ----------------------------------------------------------------------------- pixel level


def cell_class_counts(label: np.ndarray, grid: tuple[int, int], n_cls: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel counts (h * w, n_cls) of each GT class under each cell of an (h, w) prediction grid
    stretched over the label (H, W) by nearest resizing (cv2 INTER_NEAREST, as ``segment`` paints
    it); the confusion of any per-cell prediction p (h*w,) is then these rows summed by p, with
    no upsampled map."""
    h, w = grid
    big_h, big_w = label.shape
    cell = nearest_indices(h, big_h)[:, None] * w + nearest_indices(w, big_w)[None, :]  # (H, W)
    return confusion_matrix(cell, label, h * w, n_cls, ignore_index)


def _flatten_features(feats: np.ndarray, normalize: bool) -> np.ndarray:
    if feats.ndim != 3:
        raise KMeansError(f"pixel k-means: expected features (h, w, C), got shape {feats.shape}")
    x = feats.reshape(-1, feats.shape[2]).astype(np.float32)  # a copy: the caller's array stays intact
    if normalize:
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def sample_pixel_features(
    samples: Iterable[tuple[np.ndarray, np.ndarray]], n_samples: int, seed: int, normalize: bool = True
) -> np.ndarray:
    """Uniform sample without replacement of n_samples pixel features over all images, streamed.

    Bottom-k sampling: every pixel draws a uniform key and the n_samples smallest keys are kept,
    so memory stays O(n_samples * C) and the sample is fixed by the seed and the image order.
    Returns (min(n_samples, total pixels), C) float32.
    """
    if n_samples < 1:
        raise KMeansError(f"pixel k-means: sample_pixels must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    keys = np.empty(0)
    kept: np.ndarray | None = None
    for feats, _ in samples:
        x = _flatten_features(np.asarray(feats), normalize)
        new_keys = rng.random(x.shape[0])
        if kept is None:
            kept = np.empty((0, x.shape[1]), np.float32)
        if kept.shape[0] < n_samples:  # still filling
            take = min(n_samples - kept.shape[0], x.shape[0])
            kept = np.concatenate([kept, x[:take]])
            keys = np.concatenate([keys, new_keys[:take]])
            x, new_keys = x[take:], new_keys[take:]
        cand = np.flatnonzero(new_keys < keys.max()) if x.shape[0] else np.empty(0, np.int64)
        if cand.size:
            all_keys = np.concatenate([keys, new_keys[cand]])
            chosen = np.argpartition(all_keys, n_samples - 1)[:n_samples]
            incoming = chosen[chosen >= n_samples] - n_samples
            dropped = np.ones(n_samples, bool)
            dropped[chosen[chosen < n_samples]] = False
            slots = np.flatnonzero(dropped)  # as many as incoming
            kept[slots] = x[cand[incoming]]
            keys[slots] = new_keys[cand[incoming]]
    if kept is None:
        raise KMeansError("pixel k-means: the sample source yielded no image")
    return kept


def pixel_kmeans_protocol(
    samples: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    n_cls: int,
    n_clusters: int,
    seeds: Sequence[int] = VOC_KMEANS_SEEDS,
    matching: str = "hungarian",
    sample_pixels: int = 100_000,
    sample_seed: int = 0,
    normalize: bool = True,
    pca_dim: int | None = None,
    n_init: int = 3,
    n_iter: int = 50,
    use_gpu: bool = False,
    ignore_index: int = 255,
) -> KMeansReport:
    """Pixel-level k-means protocol, in two streamed passes over `samples()`.

    samples: called twice; each call yields (features (h, w, C), label (H, W) uint8) per image,
    in the same order. Pass 1 draws a uniform sample of `sample_pixels` pixel features (L2
    normalised per pixel when `normalize`, then optionally PCA-whitened to `pca_dim`) and fits
    k-means per seed on it. Pass 2 assigns every pixel of every image for all seeds at once and
    accumulates the confusion at the label's resolution (assignment stretched by nearest
    resizing, via `cell_class_counts`). Matching "hungarian" (one-to-one) or "majority"
    (many-to-one, for over-clustering). Memory: the sample plus one image.
    """
    _check_matching(matching)
    if not seeds:
        raise KMeansError("pixel_kmeans_protocol: seeds must not be empty")
    sample = sample_pixel_features(samples(), sample_pixels, sample_seed, normalize)
    pca = None
    if pca_dim is not None:
        sample, pca = pca_whiten(sample, pca_dim)
    fits = [kmeans(sample, n_clusters, seed, n_init, n_iter, use_gpu) for seed in seeds]
    del sample
    confs = np.zeros((len(seeds), n_clusters, n_cls), dtype=np.int64)
    for feats, label in samples():
        feats = np.asarray(feats)
        x = _flatten_features(feats, normalize)
        if pca is not None:
            x = pca.transform(x)
        table = cell_class_counts(np.asarray(label), feats.shape[:2], n_cls, ignore_index)  # (h*w, n_cls)
        for s, fit in enumerate(fits):
            np.add.at(confs[s], assign(x, fit.centroids, use_gpu), table)
    results, present = [], np.zeros(n_cls, bool)
    for seed, fit, conf in zip(seeds, fits, confs):
        result, present = _seed_result(seed, conf, matching, n_cls, fit)
        results.append(result)
    return _report("pixel", n_clusters, matching, results, present, pca)
