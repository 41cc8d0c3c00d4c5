"""Stage 5: score a model's embeddings (K-means, linear probe, retrieval) and the masks (saliency)
against the labels, one report per model (:mod:`stages.evaluate.stage`); comparisons of several
models run the same protocols as dask jobs (:mod:`stages.evaluate.batch`). ``EvaluateParams``
(:mod:`stages.evaluate.params`) is the ``evaluate`` section of the configuration. Names are
imported on first use, so that reading the parameters does not import torch.
"""
from __future__ import annotations

from stages.lazy import lazy_exports

_HOMES = {
    "EvaluateParams": "params",
    "protocol_options": "params",
    "run": "stage",
    "run_protocol": "stage",
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)
