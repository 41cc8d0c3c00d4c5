"""Object proposals: the regions of one image to treat as separate objects (pure numpy + OpenCV).

MaskContrast contrasts one salient region per image; with several objects of different classes
in an image that region either keeps one object or merges them into one prototype. A proposal
is one region with a score (higher is better); every method returns them best first, as
:class:`artifacts.masks.Proposal` (non-empty bool mask at the image's size, score, area share):

- ``single``: the image's binary mask as one proposal (today's behaviour), none when it is
  empty. ``max_proposals`` and ``min_proposal`` do not apply: the masks stage's post-processing
  already drops images with too little foreground.
- ``components``: the 8-connected components of the binary mask (OpenCV's
  ``connectedComponentsWithStats``) covering at least ``min_proposal`` of the image, largest
  first (ties: higher score, then position), at most ``max_proposals``. Their union is the mask
  less the dropped components.
- ``cuts``: the repeated cuts of the ``features`` estimator
  (:func:`stages.masks.features.object_cuts`) on the image's feature grid, each brought to the
  image's size (with the estimator's CRF refinement when the image is given) and thresholded at
  0.5, in the cuts' order (best seed score first). A pixel two cuts claim stays with the better
  one, so the proposals are disjoint; then the ``min_proposal`` floor applies.

A proposal's score: the mean of the soft saliency map over it when one is given, else 1.0
(``single``, ``components``); the cut's seed score (``cuts``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import cv2
import numpy as np

from artifacts.masks import Proposal
from artifacts.shards import describe_array
from stages.masks.params import PROPOSAL_METHODS, ProposalParams, ProposalsError

__all__ = [
    "PROPOSAL_METHODS",
    "ProposalParams",
    "ProposalsError",
    "component_proposals",
    "cut_proposals",
    "proposals_from_cuts",
    "proposals_from_mask",
    "single_proposal",
]

def _check_mask(mask: np.ndarray, soft: np.ndarray | None) -> None:
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f"proposals need a non-empty bool (H, W) mask, got {describe_array(mask)}")
    if soft is not None and (not isinstance(soft, np.ndarray) or soft.shape != mask.shape):
        raise ValueError(f"the soft map must have the mask's shape {mask.shape}, got {describe_array(soft)}")


def single_proposal(mask: np.ndarray, soft: np.ndarray | None = None) -> list[Proposal]:
    """The whole binary ``mask`` (bool (H, W)) as one proposal, scored by the mean of ``soft``
    (float (H, W) in [0, 1]) over it; none when the mask is empty."""
    _check_mask(mask, soft)
    if not mask.any():
        return []
    return [Proposal(mask.copy(), 1.0 if soft is None else float(soft[mask].mean()))]


def component_proposals(mask: np.ndarray, params: ProposalParams, soft: np.ndarray | None = None) -> list[Proposal]:
    """The 8-connected components of ``mask`` with at least ``params.min_proposal`` of the image's
    pixels, largest first (ties: higher score, then the component's first pixel in row-major
    order), at most ``params.max_proposals``; each scored by the mean of ``soft`` over it."""
    _check_mask(mask, soft)
    if not mask.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    areas = stats[:, cv2.CC_STAT_AREA].astype(np.int64)  # (n,): component 0 is the background
    if soft is None:
        scores = np.ones(n)
    else:  # mean of the soft map over each component, (n,)
        scores = np.bincount(labels.ravel(), weights=soft.ravel().astype(np.float64), minlength=n) / areas
    floor = max(1.0, params.min_proposal * mask.size)
    big = np.flatnonzero(areas >= floor)
    big = big[big > 0]
    # OpenCV numbers components in row-major order of their first pixel: the last key breaks ties
    order = sorted(big, key=lambda k: (-areas[k], -scores[k], k))[: params.max_proposals]
    return [Proposal(labels == k, float(scores[k])) for k in order]


def proposals_from_cuts(maps: Sequence[tuple[np.ndarray, float]], params: ProposalParams) -> list[Proposal]:
    """Proposals from (probability map at the image's size, score) pairs given best first (as
    :func:`stages.masks.features.object_cuts` gives them, once brought to the image): each
    thresholded at 0.5, less the pixels of better ones, kept when it covers
    ``params.min_proposal`` of the image; at most ``params.max_proposals``."""
    taken: np.ndarray | None = None
    out: list[Proposal] = []
    for prob, score in maps:
        region = np.asarray(prob) > 0.5
        if taken is None:
            taken = np.zeros(region.shape, bool)
        elif region.shape != taken.shape:
            raise ValueError(f"cut maps differ in shape: {region.shape} after {taken.shape}")
        region &= ~taken
        taken |= region
        count = int(np.count_nonzero(region))
        if count and count >= params.min_proposal * region.size:
            out.append(Proposal(region, score))
        if len(out) == params.max_proposals:
            break
    return out


def cut_proposals(grid: np.ndarray, shape: tuple[int, int], params: ProposalParams, feature_params,
                  image: np.ndarray | None = None, classes: np.ndarray | None = None) -> list[Proposal]:
    """``cuts``: :func:`stages.masks.features.object_cuts` on ``grid`` ((C, h, w) unit feature
    vectors) with up to ``params.max_proposals`` objects, each cut's map brought to ``shape``
    (H, W) (refined by the estimator's CRF on ``image`` when given, else resized bilinearly),
    then :func:`proposals_from_cuts`. ``feature_params``: the estimator's
    :class:`stages.masks.features.FeatureParams`; ``classes``: the grid's class map, as
    ``FeatureEstimator.features`` returns it beside the grid."""
    from stages.masks.features import object_cuts, refine

    h, w = (int(s) for s in shape)
    if image is not None and image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} does not have the proposals' shape {(h, w)}")
    cuts = object_cuts(grid, replace(feature_params, max_objects=params.max_proposals), classes)
    maps = []
    for prob, score in cuts:
        if image is not None:
            full = refine(image, prob, feature_params)
        else:
            full = cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        maps.append((full, score))
    return proposals_from_cuts(maps, params)


def proposals_from_mask(mask: np.ndarray, params: ProposalParams, soft: np.ndarray | None = None) -> list[Proposal]:
    """``single`` or ``components`` proposals of a binary mask (``cuts`` needs the feature grid:
    :func:`cut_proposals`)."""
    if params.proposals == "single":
        return single_proposal(mask, soft)
    if params.proposals == "components":
        return component_proposals(mask, params, soft)
    raise ProposalsError(f"masks.proposals: {params.proposals!r} proposals come from the features "
                         "estimator's cuts (masks.method: features), not from a mask")
