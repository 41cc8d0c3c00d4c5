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
    report's rule for enough prototypes per direction)."""
    k: Union[int, Literal["auto"]] = opt("auto", doc="number of clusters, or 'auto': the best mean silhouette over [2, k_max]",
                                         check=_k)
    k_max: int = opt(20, doc="largest k tried by k: auto", check=in_range(K_MIN))
    pca_dim: Optional[int] = opt(None, doc="PCA-whitening dimension; null: min(32, images // 6)", check=in_range(1))
    n_init: int = opt(10, doc="k-means++ restarts (lowest inertia kept)", check=in_range(1))
    seed: int = opt(1234, doc="k-means seed")
    sheet_size: int = opt(12, doc="images on each cluster's contact sheet (nearest its centroid)", check=in_range(1))
    names: Optional[Path] = opt(None, doc="names file: one 'cluster id: name' per line (ids from 0)")

    def __post_init__(self):
        check_fields(self)
