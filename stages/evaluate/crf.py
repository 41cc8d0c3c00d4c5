"""Fully connected CRF post-processing of class probabilities (Krähenbühl & Koltun, NIPS 2011).

The model the reference applies to the linear probe's outputs (``pydensecrf.DenseCRF2D`` with
``unary_from_softmax``, ``addPairwiseGaussian(sxy=1, compat=3)``,
``addPairwiseBilateral(sxy=67, srgb=3, compat=4)``, ``inference(10)``), written here with numpy,
scipy.sparse and OpenCV so that no compiled CRF package is needed:

- unary ``U_i(l) = -log(max(p_i(l), 1e-5))`` (``unary_from_softmax``'s clip);
- two pairwise kernels with Potts compatibility, the spatial ``k_g = exp(-|p_i - p_j|^2 / 2 sxy_g^2)``
  and the bilateral ``k_b = exp(-|p_i - p_j|^2 / 2 sxy_b^2 - |I_i - I_j|^2 / 2 srgb^2)`` (p pixel
  position, I its RGB colour);
- each kernel normalised symmetrically as densecrf's default ``NORMALIZE_SYMMETRIC``:
  ``K~ = D^-1/2 K D^-1/2`` with ``D = diag(K 1)``; the sums include the pixel itself (j = i),
  as densecrf's filters do;
- mean-field updates ``Q <- softmax(-U + sum_k w_k K~_k Q)``, starting from ``softmax(-U)``:
  densecrf's Potts compatibility ``-w`` applied to the message and subtracted, i.e. each label is
  rewarded by the normalised kernel mass its neighbours put on it.

The bilateral sums are computed with a permutohedral lattice (Adams, Baek & Davis, Eurographics
2010), the filter densecrf uses: splat each pixel's value onto the d + 1 vertices of the lattice
simplex around its scaled feature (barycentric weights), blur with [1 2 1]/2 along the d + 1
lattice directions, slice back with the same weights. Building the lattice costs O(N d^2) plus
a sort of the simplices' vertices; each filtering O((N + M) d) per channel (M lattice vertices,
M <= N (d + 1); about 0.4 N to N on 500 x 375 photographs), not the O(N^2) of the exact sums.
The construction follows densecrf's ``Permutohedral::init`` step by step, vectorised (the tests
check it against a loop transcription); splat, blurs and slice are sparse matrices built once per
image and applied to all classes and iterations. The lattice approximates the Gaussian closely but
not exactly (correlations of 0.98 to 0.998 with the exact sums in the tests); its global scale
cancels in the symmetric normalisation.

The spatial kernel is computed exactly instead (a separable convolution cut at 4 sxy, where the
kernel is below e^-8, zero outside the image): with sxy = 1 a 9 x 9 stencil, cheaper and more
accurate than densecrf's lattice, which approximates it as it does the bilateral kernel.

Cost (benchmarks/bench_crf.py, one core): about 2 s for a 500 x 375 image with 21 classes and
2 s for 854 x 480 with 2 classes, half of it the lattice build in the second case.

Against pydensecrf itself (benchmarks/bench_crf_reference.py, the ``crf-reference`` extra; README
"Dense CRF"): the argmax maps agree on 99.99 % of the pixels of 30 davis16 photographs and on
99.7 % of the pixels either CRF changed; the differences come from the spatial term.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import scipy.sparse as sp

__all__ = [
    "PROB_FLOOR",
    "CRFError",
    "CRFParams",
    "Filter",
    "PermutohedralLattice",
    "bilateral_features",
    "dense_crf",
    "mean_field",
    "potts_message",
    "spatial_gaussian_filter",
    "unary_from_probs",
]

PROB_FLOOR = 1e-5  # probabilities are clipped to this before the log (pydensecrf's unary_from_softmax)
SPATIAL_TRUNCATE = 4.0  # the exact spatial kernel is cut at this many sxy
Filter = Callable[[np.ndarray], np.ndarray]  # linear map of per-pixel values (N, C) -> (N, C)


class CRFError(ValueError):
    """Bad input or parameter of the dense CRF."""


@dataclass(frozen=True)
class CRFParams:
    """Dense-CRF parameters; the defaults are the reference's (REFERENCE.md "Evaluation").

    Widths (``*_sxy`` in pixels, ``bilateral_srgb`` in 0..255 intensity units) must be positive;
    compatibilities (Potts weights) non-negative, 0 switching a kernel off; ``iterations`` >= 0
    (0 returns the input probabilities, clipped and renormalised).
    """

    iterations: int = 10
    gaussian_sxy: float = 1.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, (int, np.integer)) \
                or self.iterations < 0:
            raise CRFError(f"CRFParams.iterations must be an integer >= 0, got {self.iterations!r}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0):
                raise CRFError(f"CRFParams.{name} must be a finite number > 0, got {value!r}")
        for name in ("gaussian_compat", "bilateral_compat"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float, np.number)) and math.isfinite(value) and value >= 0):
                raise CRFError(f"CRFParams.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready parameters (for metrics files)."""
        return {k: (int(v) if k == "iterations" else float(v)) for k, v in asdict(self).items()}


# ----------------------------------------------------------------------------- permutohedral lattice


class PermutohedralLattice:
    """Gaussian filtering ``out_i ~ c * sum_j exp(-|f_i - f_j|^2 / 2) v_j`` of values attached to
    N points with d-dimensional features (already divided by the kernel widths).

    ``c`` is a constant of the approximation (the same for every point and channel); callers
    that normalise by ``filter(ones)`` do not see it. Build once per feature set; ``filter``
    then costs d + 3 sparse products (splat, d + 1 blurs, slice), O((N + M) d C) for C channels.
    """

    def __init__(self, features: np.ndarray) -> None:
        f = np.asarray(features, dtype=np.float32)
        if f.ndim != 2 or f.shape[0] < 1 or f.shape[1] < 1:
            raise CRFError(f"PermutohedralLattice: features must be (N, d) with N, d >= 1, got shape {f.shape}")
        if not np.isfinite(f).all():
            raise CRFError("PermutohedralLattice: features must be finite")
        n, d = f.shape
        self.n_points, self.dim = n, d
        # Elevate onto the hyperplane sum(x) = 0 of R^(d+1) (E f, Adams et al. p. 5), scaled so
        # that the lattice blur approximates a unit Gaussian; coordinates as columns (d+1) x (N,).
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        elevated = [np.empty(0, np.float32)] * (d + 1)
        tail = np.zeros(n, np.float32)  # sum of the scaled features after j
        for j in range(d, 0, -1):
            cf = f[:, j - 1] * np.float32(inv_std / math.sqrt((j + 1) * j))
            elevated[j] = tail - j * cf
            tail = tail + cf
        elevated[0] = tail
        # Nearest remainder-0 lattice point (coordinates multiples of d + 1), then the simplex
        # containing the point: rank[i] = number of coordinates whose residual exceeds i's (ties
        # to the lower index, as densecrf), shifted back onto the plane.
        rem0, residual = [], []
        for e in elevated:
            v = e / np.float32(d + 1)
            up, down = np.ceil(v) * (d + 1), np.floor(v) * (d + 1)
            r = np.where(up - e < e - down, up, down).astype(np.int64)
            rem0.append(r)
            residual.append(e - r)
        total = sum(rem0) // (d + 1)  # (N,) exact: each rem0 is a multiple of d + 1
        rank = [np.zeros(n, np.int16) for _ in range(d + 1)]
        for i in range(d):
            for j in range(i + 1, d + 1):
                less = residual[i] < residual[j]
                rank[i] += less
                rank[j] += ~less
        for i in range(d + 1):
            rank[i] += total
            low, high = rank[i] < 0, rank[i] > d
            rank[i][low] += d + 1
            rem0[i][low] += d + 1
            rank[i][high] -= d + 1
            rem0[i][high] -= d + 1
        # Barycentric coordinates (Adams et al. p. 10): with s[k] the residual / (d+1) of the
        # coordinate of rank d - k, b[k] = s[k] - s[k-1], b[0] = 1 + s[0] - s[d].
        s_sorted = np.empty((n, d + 1), np.float32)
        rows = np.arange(n) * (d + 1)
        for i in range(d + 1):
            s_sorted.ravel()[rows + d - rank[i]] = (elevated[i] - rem0[i]) / np.float32(d + 1)
        bary = np.empty((n, d + 1), np.float32)
        bary[:, 1:] = s_sorted[:, 1:] - s_sorted[:, :-1]
        bary[:, 0] = 1.0 + s_sorted[:, 0] - s_sorted[:, d]
        # Vertex r of the simplex: rem0 + the canonical remainder-r vertex permuted by rank,
        # coordinate i + (r if rank[i] <= d - r else r - (d + 1)); named by its first d
        # coordinates (they sum to 0), packed into one int64, mixed radix with room for the blur
        # neighbours (steps of at most d). Neighbouring pixels mostly share their simplex, so the
        # vertices are found once per distinct simplex (rem0 / (d + 1), rank), a few times fewer.
        margin = 2 * (d + 1)
        lo = [int(r.min()) - margin for r in rem0[:d]]
        base = [int(r.max()) + margin - l + 1 for r, l in zip(rem0[:d], lo)]
        cells = [(b - 1) // (d + 1) + 1 for b in base]  # distinct values of (rem0_j - lo_j) / (d + 1)
        if max(math.prod(base), math.prod(cells) * (d + 1) ** d) >= 2 ** 62:
            raise CRFError(f"PermutohedralLattice: features span too large a range for 64-bit lattice keys "
                           f"(extent {base} lattice units); use wider kernels")
        weight = [math.prod(base[j + 1:]) for j in range(d)]  # key -> sum_j (key_j - lo_j) weight_j
        code = np.zeros(n, np.int64)  # the simplex: rem0 / (d + 1) and rank, mixed radix
        for j in range(d):
            code = code * cells[j] + (rem0[j] - lo[j]) // (d + 1)
        for j in range(d):
            code = code * (d + 1) + rank[j]
        _, simplex = np.unique(code, return_inverse=True)  # (N,) in 0..S-1
        first = np.empty(int(simplex.max()) + 1, np.int64)  # a point of each simplex
        first[simplex] = np.arange(n)
        origin = sum((rem0[j][first] - lo[j]) * weight[j] for j in range(d))  # (S,)
        packed = np.empty((len(first), d + 1), np.int64)
        for r in range(d + 1):
            packed[:, r] = origin + r * sum(weight)
            for j in range(d):
                packed[:, r] -= (d + 1) * weight[j] * (rank[j][first] > d - r)
        vertices, index = np.unique(packed.ravel(), return_inverse=True)  # sorted (M,), (S (d+1),)
        index = index.reshape(-1, d + 1)[simplex]  # (N, d+1)
        m = len(vertices)
        self.n_vertices = m
        # splat: (M, N) sparse, d + 1 entries per point; slice: its transpose times densecrf's
        # constant 1 / (1 + 2^-d), so that filter() equals densecrf's Permutohedral::compute
        self._splat = sp.csr_matrix((bary.ravel(), index.ravel(), np.arange(0, n * (d + 1) + 1, d + 1)),
                                    shape=(n, m)).T.tocsr()
        self._slice = sp.csr_matrix((bary.ravel() / np.float32(1.0 + 2.0 ** -d), index.ravel(),
                                     np.arange(0, n * (d + 1) + 1, d + 1)), shape=(n, m))
        # Blur along lattice direction j: v <- v + (v[n1] + v[n2]) / 2 with n1 = key - 1 everywhere but
        # + d at j (direction d, outside the key, is - 1 everywhere), n2 the opposite step, a
        # missing neighbour counting 0: one sparse (M, M) matrix per direction, built row by row
        # as [self, n1 if present, n2 if present].
        self._blur: list[sp.csr_matrix] = []
        for j in range(d + 1):
            step = -sum(weight) + ((d + 1) * weight[j] if j < d else 0)
            cols = np.empty((m, 3), np.int64)
            present = np.ones((m, 3), bool)
            cols[:, 0] = np.arange(m)
            for k, probe in ((1, vertices + step), (2, vertices - step)):
                pos = np.minimum(np.searchsorted(vertices, probe), m - 1)
                cols[:, k] = pos
                present[:, k] = vertices[pos] == probe
            data = np.broadcast_to(np.array([1.0, 0.5, 0.5], np.float32), (m, 3))[present]
            indptr = np.concatenate([[0], np.cumsum(present.sum(axis=1))])
            self._blur.append(sp.csr_matrix((data, cols[present], indptr), shape=(m, m)))

    def filter(self, values: np.ndarray) -> np.ndarray:
        """Filtered values (N, C) float32 of values (N, C) (or (N,), returned as (N,))."""
        v = np.asarray(values, dtype=np.float32)
        vector = v.ndim == 1
        if vector:
            v = v[:, None]
        if v.ndim != 2 or v.shape[0] != self.n_points:
            raise CRFError(f"PermutohedralLattice.filter: values must be ({self.n_points}, C), got {v.shape}")
        lat = self._splat @ v  # (M, C)
        for blur in self._blur:
            lat = blur @ lat
        out = self._slice @ lat  # (N, C)
        return out[:, 0] if vector else out


# ----------------------------------------------------------------------------- kernels and inference


def bilateral_features(image: np.ndarray, sxy: float, srgb: float) -> np.ndarray:
    """Per-pixel features (H W, 5) float32 ``(x / sxy, y / sxy, r / srgb, g / srgb, b / srgb)`` of an
    (H, W, 3) image, pixels in row-major order (densecrf's ``addPairwiseBilateral`` features)."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.concatenate([xs.reshape(-1, 1) / sxy, ys.reshape(-1, 1) / sxy,
                           image.reshape(-1, 3).astype(np.float32) / srgb], axis=1)


def spatial_gaussian_filter(height: int, width: int, sxy: float) -> Filter:
    """Exact ``out_i = sum_j exp(-|p_i - p_j|^2 / 2 sxy^2) v_j`` over the pixels j of an image
    (p in pixels, the sum cut at ``SPATIAL_TRUNCATE`` sxy, nothing outside the image), as a filter
    of values (H W, C) in row-major pixel order: a separable convolution."""
    radius = max(1, int(math.ceil(SPATIAL_TRUNCATE * sxy)))
    taps = np.exp(-np.arange(-radius, radius + 1, dtype=np.float64) ** 2 / (2.0 * sxy * sxy)).astype(np.float32)

    def apply(values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, dtype=np.float32).reshape(height, width, -1)
        out = np.empty_like(v)
        for c0 in range(0, v.shape[2], 512):  # OpenCV's channel limit (CV_CN_MAX)
            chunk = np.ascontiguousarray(v[:, :, c0:c0 + 512])
            out[:, :, c0:c0 + 512] = cv2.sepFilter2D(chunk, -1, taps, taps, borderType=cv2.BORDER_CONSTANT
                                                     ).reshape(chunk.shape)
        return out.reshape(height * width, -1)

    return apply


def potts_message(kernel: Filter, compat: float, n: int) -> Filter:
    """The mean-field message of one Potts pairwise term: ``Q -> compat D^-1/2 K D^-1/2 Q`` with
    ``D = diag(K 1)`` (densecrf's NORMALIZE_SYMMETRIC), for N = n points; (N, C) -> (N, C)."""
    norm = 1.0 / np.sqrt(np.asarray(kernel(np.ones((n, 1), np.float32)), np.float32).reshape(n) + 1e-20)
    pre, post = norm[:, None], (compat * norm)[:, None]
    return lambda q: post * kernel(pre * q)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax of (N, C) float32, in place. Few classes: reduce column by column (numpy's
    reductions along a short last axis are several times slower)."""
    n_cls = logits.shape[1]
    if n_cls <= 8:
        top = logits[:, 0].copy()
        for c in range(1, n_cls):
            np.maximum(top, logits[:, c], out=top)
        logits -= top[:, None]
        np.exp(logits, out=logits)
        total = logits[:, 0].copy()
        for c in range(1, n_cls):
            total += logits[:, c]
        logits /= total[:, None]
        return logits
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def mean_field(unary: np.ndarray, messages: Sequence[Filter], iterations: int) -> np.ndarray:
    """Mean-field marginals (N, C) float32 of a CRF with unary energies (N, C) and pairwise
    messages (each Q (N, C) -> reward (N, C), e.g. :func:`potts_message`):
    ``Q0 = softmax(-U)``, then ``iterations`` times ``Q <- softmax(-U + sum_k message_k(Q))``."""
    neg = -np.asarray(unary, dtype=np.float32)
    q = _softmax(neg.copy())
    for _ in range(iterations):
        logits = neg.copy()
        for message in messages:
            logits += message(q)
        q = _softmax(logits)
    return q


def unary_from_probs(probs: np.ndarray) -> np.ndarray:
    """Unary energies (H W, C) float32 ``-log(clip(p, PROB_FLOOR, 1))`` of probabilities (C, H, W),
    pixels in row-major order (pydensecrf's ``unary_from_softmax``)."""
    c = probs.shape[0]
    p = np.clip(np.asarray(probs, dtype=np.float32).reshape(c, -1).T, PROB_FLOOR, 1.0)
    return -np.log(p)


def _check_inputs(image: np.ndarray, probs: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise CRFError(f"dense_crf: image must be an (H, W, 3) RGB array, got shape {shape}")
    if image.dtype != np.uint8:
        raise CRFError(f"dense_crf: image must be uint8 (0..255), got dtype {image.dtype}")
    if not isinstance(probs, np.ndarray) or probs.ndim != 3:
        shape = getattr(probs, "shape", type(probs).__name__)
        raise CRFError(f"dense_crf: probs must be a (C, H, W) array, got shape {shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise CRFError(f"dense_crf: probs must be floating point probabilities, got dtype {probs.dtype}")
    if probs.shape[1:] != image.shape[:2]:
        raise CRFError(f"dense_crf: probs (C, H, W) = {probs.shape} do not match the image's (H, W) = "
                       f"{image.shape[:2]}")
    if probs.shape[0] < 1 or image.shape[0] < 1 or image.shape[1] < 1:
        raise CRFError(f"dense_crf: probs must have at least one class and one pixel, got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise CRFError("dense_crf: probs must be finite and >= 0")


def dense_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """Marginals (C, H, W) float32 of the fully connected CRF on ``image`` (H, W, 3) uint8 RGB
    with unaries from the class probabilities ``probs`` (C, H, W) (e.g. a softmax; each pixel's
    values are clipped to [PROB_FLOOR, 1], not required to sum to 1). Each pixel's marginals sum
    to 1; their argmax is the post-processed prediction. Raises CRFError on bad input.
    """
    if not isinstance(params, CRFParams):
        raise CRFError(f"dense_crf: params must be a CRFParams, got {type(params).__name__}")
    _check_inputs(image, probs)
    c, h, w = probs.shape
    n = h * w
    unary = unary_from_probs(probs)  # (N, C)
    messages: list[Filter] = []
    if params.iterations > 0 and params.gaussian_compat > 0:
        messages.append(potts_message(spatial_gaussian_filter(h, w, params.gaussian_sxy), params.gaussian_compat, n))
    if params.iterations > 0 and params.bilateral_compat > 0:
        lattice = PermutohedralLattice(bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb))
        messages.append(potts_message(lattice.filter, params.bilateral_compat, n))
    q = mean_field(unary, messages, params.iterations)  # (N, C)
    return np.ascontiguousarray(q.T).reshape(c, h, w)


def pydensecrf_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams = CRFParams()) -> np.ndarray:
    """The same model through pydensecrf, as the reference calls it (its utils/crf.py): the
    independent check of ``dense_crf``. Needs the optional extra ``crf-reference`` (pydensecrf2)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    d.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
    d.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                           rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    return np.array(d.inference(params.iterations), dtype=np.float32).reshape(c, h, w)
