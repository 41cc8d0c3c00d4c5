"""Stage 4 without labels: K-means on the prototypes of an extract artifact, contact sheets to
name the clusters, a segmentation per image (see :mod:`stages.clusters.stage`).
``ClusterParams`` (:mod:`stages.clusters.params`) is the ``clusters`` section of the
configuration. Names are imported on first use, so that reading the parameters stays light.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "ClusterParams": "params",
    "K_MIN": "params",
    **{name: "stage" for name in (
        "ASSIGNMENTS_FILE", "SKIPPED_FILE", "ClustersError", "NamesError", "apply_names", "default_pca_dim",
        "make_clusters", "parse_names", "read_names", "write_legend")},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
