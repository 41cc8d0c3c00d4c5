"""Stage 4 without labels: K-means on the prototypes of an extract artifact, contact sheets to
name the clusters, a segmentation per image (see :mod:`stages.clusters.stage`).
``ClusterParams`` (:mod:`stages.clusters.params`) is the ``clusters`` section of the
configuration; ``run`` is the stage. Names are imported on first use, so that reading the
parameters stays light.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.lazy import lazy_exports

_HOMES = {
    "ClusterParams": "params",
    "K_MIN": "params",
    **{name: "stage" for name in (
        "ASSIGNMENTS_FILE", "SKIPPED_FILE", "ClustersError", "NamesError", "apply_names", "default_pca_dim",
        "make_clusters", "parse_names", "read_names", "write_legend")},
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)


def run(params: Any, inputs: Mapping[str, Any], out_dir: Path, *, samples: Sequence[Any], split: str,
        progress: bool = True, on_progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Cluster the prototypes of split ``split`` of ``inputs["extract"]`` (``.path``) for ``samples``
    with ``params`` (``ClusterParams``; its names file is read here) into ``out_dir``.
    ``on_progress(done, total, unit)`` every 50 images drawn. Returns the summary for the manifest."""
    from .stage import make_clusters, read_names

    names = read_names(params.names) if params.names is not None else None
    on_image = None if on_progress is None else (
        lambda done, total: on_progress(done, total, "images") if done % 50 == 0 or done == total else None)
    summary = make_clusters(Path(inputs["extract"].path) / split, samples, out_dir, params, names=names or None,
                            progress=progress, on_image=on_image)
    if summary.get("n_skipped"):
        logging.getLogger("maskcontrast").warning("clusters: %d image(s) skipped (listed in %s)",
                                                  summary["n_skipped"], Path(out_dir) / "skipped.json")
    return summary
