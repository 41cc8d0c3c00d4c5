"""The ``features`` estimator: salient objects from a pretrained network's feature map, no labels.

Per image, on the stride-16 grid of a pretrained backbone (several stages concatenated, each
L2-normalised, the earlier ones average-pooled to the grid):

1. **Seeds.** Two label-free cues score each patch. *Spread*: the spatial standard deviation of
   the patches that look like it (softmax of cosine similarity at ``temperature``); background
   stuff (sky, road, water) recurs across the image, an object's parts are compact. *Border
   contrast*: one minus the patch's mean similarity to the border ring, the side of the image an
   object touches least. With ``class_prior`` > 0 and weights that carry an ImageNet classifier,
   a third factor: the class-activation map of the network's five likeliest classes (CAM), to
   the power ``class_prior``, since ImageNet's classes are objects, not stuff. Their product
   (each min-max scaled) ranks the patches; the top
   ``seed_share`` are object seeds, the lower half and the border ring (but for its patches in
   the top quarter: an object may touch the border) are background seeds.
2. **Propagation.** Each patch is compared with the mean object seed and with ``bg_prototypes``
   k-means centroids of the background seeds: ``sigmoid((sim_fg - max sim_bg) / sharpness)``.
   The object and background sets are re-estimated from that map ``iterations`` times, so the
   object takes its full extent whatever its size.
3. **Refinement.** A two-label dense CRF (``stages.evaluate.crf``) on the image at ``crf_size``
   pixels snaps the grid's map to colour edges; the result is resized to the image.

``object_cuts`` repeats step 1-2 on the patches not yet taken (as MaskCut repeats its cut) and
returns every object it finds with a score, for several proposals per image.

How the defaults were chosen (README, "features estimator"): on the train split of
davis16-objects only, with the ImageNet MobileNetV2; the val split was scored once afterwards.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.evaluate.crf import CRFParams, dense_crf
from stages.masks.params import FeatureParams

GRID_STRIDE = 16
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MIN_SEEDS = 3


class FeaturesError(ValueError):
    """Weights the ``features`` estimator cannot use (no classifier for ``class_prior``)."""


# -- the maths on a feature grid (pure numpy) -----------------------------------------------------------
def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def border_ring(height: int, width: int) -> np.ndarray:
    ring = np.zeros((height, width), bool)
    ring[0], ring[-1], ring[:, 0], ring[:, -1] = True, True, True, True
    return ring


def seed_scores(grid: np.ndarray, temperature: float, classes: np.ndarray | None = None,
                class_prior: float = 0.0) -> np.ndarray:
    """Objectness of each patch of a (C, H, W) grid of unit vectors: low spread x border contrast,
    times ``classes`` (a class-activation map on the grid, (H, W) in [0, 1]) ** ``class_prior``."""
    c, h, w = grid.shape
    x = grid.reshape(c, -1).T.astype(np.float64)  # n x C
    sim = x @ x.T  # n x n cosine similarities
    ys, xs = np.mgrid[0:h, 0:w]
    pos = np.stack([ys.ravel(), xs.ravel()], 1) / max(h, w)  # n x 2
    weights = np.exp((sim - sim.max(1, keepdims=True)) / temperature)
    weights /= weights.sum(1, keepdims=True)
    centre = weights @ pos
    spread = np.sqrt(np.einsum("ij,ij->i", weights, (pos ** 2).sum(1)[None, :]) - (centre ** 2).sum(1)).clip(0)
    contrast = 1.0 - sim[:, border_ring(h, w).ravel()].mean(1)
    scores = (_minmax(-spread) * _minmax(contrast)).reshape(h, w)
    if classes is not None and class_prior > 0:
        if classes.shape != (h, w):
            raise ValueError(f"class map of shape {classes.shape} for a {h} x {w} grid")
        scores = scores * np.clip(classes, 0.0, 1.0) ** class_prior
    return scores


def _kmeans_centres(x: np.ndarray, k: int, seed: int = 0, iters: int = 20) -> np.ndarray:
    """k-means++ seeded Lloyd on unit vectors (deterministic for a given ``seed``)."""
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        idx = int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        centres.append(x[idx])
        d2 = np.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = np.stack(centres)
    for _ in range(iters):
        assign = (x @ c.T - 0.5 * (c ** 2).sum(1)).argmax(1)
        new = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def propagate(grid: np.ndarray, scores: np.ndarray, params: FeatureParams,
              allowed: np.ndarray | None = None) -> np.ndarray:
    """Object probability of each patch, grown from the top-scoring seeds (step 2)."""
    c, h, w = grid.shape
    x = grid.reshape(c, -1).T.astype(np.float64)
    s = scores.ravel().copy()
    ring = border_ring(h, w).ravel()
    if allowed is not None:
        s[~allowed.ravel()] = -np.inf
    order = np.argsort(-s, kind="stable")
    n_open = int(np.isfinite(s).sum())
    fg = order[: max(_MIN_SEEDS, int(params.seed_share * n_open))]
    # background seeds: the lower half, and the border ring except where it scores like an object
    # (an object that touches the border must not seed a background prototype)
    bg = np.union1d(np.setdiff1d(np.flatnonzero(ring), order[: n_open // 4]), order[n_open // 2:])
    bg = np.setdiff1d(bg, fg)
    prob = np.zeros(h * w)
    for it in range(params.iterations + 1):
        proto_fg = x[fg].mean(0)
        proto_fg /= max(np.linalg.norm(proto_fg), 1e-12)
        proto_bg = _kmeans_centres(x[bg], params.bg_prototypes)
        margin = x @ proto_fg - (x @ proto_bg.T).max(1)
        prob = 1.0 / (1.0 + np.exp(-margin / params.sharpness))
        if allowed is not None:
            prob[~allowed.ravel()] = 0.0
        grown = np.flatnonzero(prob > 0.5)
        if it == params.iterations or len(grown) < _MIN_SEEDS:
            break
        fg = grown
        bg = np.flatnonzero(prob < 0.5)
        if len(bg) == 0:
            break
    return prob.reshape(h, w)


def _seeded_component(region: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The 8-connected part of ``region`` that holds its best-scoring patch: a propagation may
    reach a second, separate object, which a later cut is to take on its own."""
    from scipy import ndimage

    labels, n = ndimage.label(region, structure=np.ones((3, 3), bool))
    if n <= 1:
        return region
    best = np.where(region, scores, -np.inf).argmax()
    return labels == labels.ravel()[best]


def object_cuts(grid: np.ndarray, params: FeatureParams,
                classes: np.ndarray | None = None) -> list[tuple[np.ndarray, float]]:
    """Up to ``max_objects`` (probability map, score) pairs, best first, each on patches the
    earlier ones left; a further object needs ``min_object_score`` of the first one's score."""
    scores = seed_scores(grid, params.temperature, classes, params.class_prior)
    allowed = np.ones(scores.shape, bool)
    found: list[tuple[np.ndarray, float]] = []
    for _ in range(params.max_objects):
        if allowed.sum() < 4 * _MIN_SEEDS:
            break
        prob = propagate(grid, scores, params, allowed)
        region = _seeded_component(prob > 0.5, scores)
        if region.sum() == 0:
            break
        prob = np.where(region, prob, np.minimum(prob, 0.5 - 1e-6))  # other objects wait for their own cut
        score = float(scores[region].mean())
        if found and score < params.min_object_score * found[0][1]:
            break
        found.append((prob, score))
        allowed &= ~region
    return found


def foreground_grid(grid: np.ndarray, params: FeatureParams, classes: np.ndarray | None = None) -> np.ndarray:
    """The first object's probability on the grid (steps 1-2)."""
    return propagate(grid, seed_scores(grid, params.temperature, classes, params.class_prior), params)


def refine(image: np.ndarray, prob: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Step 3: the grid map at image size, snapped to colour edges by a two-label dense CRF."""
    h, w = image.shape[:2]
    if not params.crf or params.crf_iterations == 0:
        return cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return crf_refine(image, prob, params.crf_params(), params.crf_size)


def crf_refine(image: np.ndarray, prob: np.ndarray, crf: CRFParams, size: int) -> np.ndarray:
    """A foreground map of any size (float (h, w) in [0, 1]) -> float32 (H, W) at ``image``'s size,
    snapped to its colour edges by a two-label dense CRF run with the image's long side at ``size``."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    ch, cw = max(1, round(h * scale)), max(1, round(w * scale))
    small = cv2.resize(image, (cw, ch), interpolation=cv2.INTER_AREA)
    p = np.clip(cv2.resize(prob.astype(np.float32), (cw, ch), interpolation=cv2.INTER_LINEAR), 1e-4, 1 - 1e-4)
    q = dense_crf(np.ascontiguousarray(small), np.stack([1 - p, p]), crf)[1]
    return cv2.resize(q.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


# -- the network: a pretrained backbone's stages on one grid ----------------------------------------------
# MobileNetV2 blocks ending at strides 4, 8, 16 and (dilated) 16; ResNet layer1..layer4 (layer4 dilated).
_MOBILENET_TAPS = (3, 6, 13, 17)


def input_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    scale = long_side / max(height, width)
    return (max(GRID_STRIDE, round(height * scale / GRID_STRIDE) * GRID_STRIDE),
            max(GRID_STRIDE, round(width * scale / GRID_STRIDE) * GRID_STRIDE))


_CLASSIFIER_KEYS = {"mobilenet_v2": "classifier.1", "resnet18": "fc", "resnet50": "fc"}
_TOP_CLASSES = 5


def load_classifier(backbone: str, weights: str | Path | None, width: int = 0):
    """The ImageNet classifier of a torchvision checkpoint as an ``nn.Linear`` (without
    ``weights``: seeded random on ``width`` features, like the backbone); ``FeaturesError`` when
    the file carries none (a MoCo checkpoint's MLP head is not a classifier). A file made for
    another backbone is refused by ``load_init`` already."""
    import torch
    from torch import nn

    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return nn.Linear(width, 1000).eval()
    prefix = _CLASSIFIER_KEYS[backbone]
    state = torch.load(weights, map_location="cpu", weights_only=True)
    w, b = (state.get(f"{prefix}.{k}") if isinstance(state, dict) else None for k in ("weight", "bias"))
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not isinstance(b, torch.Tensor):
        raise FeaturesError(
            f"{weights}: masks.features.class_prior needs weights with an ImageNet classifier "
            f"('{prefix}.weight' and '{prefix}.bias'); this file has none (a MoCo or other "
            "self-supervised checkpoint): set masks.features.class_prior: 0")
    layer = nn.Linear(w.shape[1], w.shape[0])
    layer.load_state_dict({"weight": w, "bias": b})
    return layer.eval()


class FeatureGrid:
    """``image -> ((C, H/16, W/16) grid of unit feature vectors, class map or None)`` from a
    pretrained backbone; with ``classes``, also the class-activation map (CAM) of its classifier's
    five likeliest classes on the same grid, min-max scaled to [0, 1]."""

    def __init__(self, backbone: str, weights: str | Path | None, init_kind: str = "auto",
                 classes: bool = False) -> None:
        import torch

        from stages.network.init import load_init
        from stages.network.backbones import build_backbone

        self.name = backbone
        with torch.random.fork_rng(devices=[]):  # without weights: the same network in every process
            torch.manual_seed(0)
            self.net, channels = build_backbone(backbone, GRID_STRIDE)
        if weights is not None:
            load_init(self.net, weights, init_kind)
        self.net.eval()
        self.classifier = load_classifier(backbone, weights, channels) if classes else None
        self._torch = torch

    def __call__(self, image: np.ndarray, long_side: int) -> tuple[np.ndarray, np.ndarray | None]:
        torch = self._torch
        import torch.nn.functional as F

        h, w = input_size(image.shape[0], image.shape[1], long_side)
        x = cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC if max(h, w) > max(image.shape[:2])
                       else cv2.INTER_AREA).astype(np.float32) / 255.0
        x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]
        taps = []
        with torch.inference_mode():
            if self.name == "mobilenet_v2":
                for i, block in enumerate(self.net.features):
                    x = block(x)
                    if i in _MOBILENET_TAPS:
                        taps.append(x)
                    if i == _MOBILENET_TAPS[-1]:
                        break
                last = self.net.features[_MOBILENET_TAPS[-1] + 1](x) if self.classifier is not None else None
            else:
                n = self.net
                x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
                for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
                    x = layer(x)
                    taps.append(x)
                last = x
            gh, gw = h // GRID_STRIDE, w // GRID_STRIDE
            parts = [F.normalize(F.adaptive_avg_pool2d(t, (gh, gw)), dim=1) for t in taps]
            grid = torch.cat(parts, 1)[0] / np.sqrt(len(parts))
            classes = None
            if self.classifier is not None:
                f = F.adaptive_avg_pool2d(last, (gh, gw))[0]  # C x gh x gw
                p = self.classifier(f.mean((1, 2))).softmax(0)
                top = p.topk(min(_TOP_CLASSES, len(p)))
                cam = torch.einsum("k,kc,chw->hw", top.values, self.classifier.weight[top.indices], f).clamp(min=0)
                classes = _minmax(cam.numpy().astype(np.float64)).astype(np.float32)
        return grid.numpy().astype(np.float32), classes


#: FeatureParams keys not in the estimator's recorded parameters: the weights are recorded as their
#: file and digest, and ``threads`` is bookkeeping.
_NOT_RECORDED = ("init", "init_kind", "threads")


class FeatureEstimator:
    """Picklable per-image estimator ``img -> soft map in [0, 1]``; the network (``weights``, the
    file ``params.init`` resolves to, read as ``params.init_kind``) loads lazily in each process and
    runs on ``params.threads`` threads, so in-process and dask runs give the same maps."""

    name = "features"

    def __init__(self, params: FeatureParams, weights: str | Path | None, weights_sha256: str | None = None) -> None:
        self.params = params
        self.weights = None if weights is None else str(weights)
        self.weights_sha256 = weights_sha256
        self._grid: FeatureGrid | None = None
        if params.class_prior > 0 and weights is not None:
            load_classifier(params.backbone, weights)  # a file without a classifier fails here, once

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_grid": None}

    def describe(self) -> dict[str, Any]:
        recorded = {k: v for k, v in asdict(self.params).items() if k not in _NOT_RECORDED}
        return {"estimator": self.name, "estimator_params": recorded,
                "weights_file": None if self.weights is None else Path(self.weights).name,
                "weights_sha256": self.weights_sha256}

    def features(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(the feature grid, the class map on it or None when ``class_prior`` is 0)."""
        import torch

        if self._grid is None:
            self._grid = FeatureGrid(self.params.backbone, self.weights, self.params.init_kind,
                                     classes=self.params.class_prior > 0)
        before = torch.get_num_threads()
        torch.set_num_threads(self.params.threads)
        try:
            return self._grid(img, self.params.size)
        finally:
            torch.set_num_threads(before)

    def __call__(self, img: np.ndarray, sample=None) -> np.ndarray:
        return self.with_grid(img)[0]

    def with_grid(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The soft map (as a call gives it), the (C, h, w) feature grid and the class map (or
        None) it came from, for :func:`stages.masks.proposals.cut_proposals`."""
        grid, classes = self.features(img)
        prob = foreground_grid(grid, self.params, classes)
        return np.clip(refine(img, prob, self.params), 0.0, 1.0), grid, classes
