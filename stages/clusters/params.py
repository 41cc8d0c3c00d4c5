"""The clusters stage's parameters (the ``clusters`` section of ``pipeline.yaml``), declared once.
Torch-free."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from stages.params import check_fields, in_range, opt

#: The smallest k that ``k: auto`` tries.
K_MIN = 2


def _k(v):
    return None if v == "auto" or (isinstance(v, int) and v >= 1) else f"must be an integer >= 1 or 'auto', got {v!r}"


@dataclass(frozen=True)
class ClusterParams:
    """K-means on the val split's prototypes. ``pca_dim`` None: min(32, n_images // 6) (the K-means
    report's rule for enough prototypes per direction). ``space: discriminant``: k is chosen in the
    PCA-whitened space, then the prototypes are clustered in the discriminant space of ``groups`` x k
    over-clusters of themselves (:func:`stages.evaluate.kmeans.fit_discriminant`; no labels)."""
    k: Union[int, Literal["auto"]] = opt("auto", doc="number of clusters, or 'auto': the best mean silhouette over [2, k_max]",
                                         check=_k)
    k_max: int = opt(20, doc="largest k tried by k: auto", check=in_range(K_MIN))
    pca_dim: Optional[int] = opt(None, doc="PCA-whitening dimension; null: min(32, images // 6)", check=in_range(1))
    n_init: int = opt(10, doc="k-means++ restarts (lowest inertia kept)", check=in_range(1))
    # the space K-means clusters in (evaluate.kmeans.space, whose default stays the paper's PCA):
    # here discriminant by default, measured on davis16-objects with its labels hidden (README)
    space: Literal["pca", "discriminant"] = opt(
        "discriminant", doc="discriminant: Fisher's discriminant of over-clusters of the same prototypes; pca: PCA "
                            "whitening (the evaluate stage's default)")
    groups: int = opt(3, doc="discriminant space: over-clusters per cluster", check=in_range(1))
    reg: float = opt(0.1, doc="discriminant space: shrinkage of the within-group scatter", check=in_range(0.0, lo_open=True))
    seed: int = opt(1234, doc="k-means seed")
    sheet_size: int = opt(12, doc="images on each cluster's contact sheet (nearest its centroid)", check=in_range(1))
    names: Optional[Path] = opt(None, doc="names file: one 'cluster id: name' per line (ids from 0)")

    def __post_init__(self):
        check_fields(self)
