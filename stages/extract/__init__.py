"""Stage 3: run the trained network over a split once and store prototypes, salient masks and
low-resolution decoder features as HDF5 embedding shards (see :mod:`stages.extract.extract`)."""
from .extract import (
    SKIPPED_FILE,
    ExtractError,
    ExtractParams,
    backbone_prototypes,
    extract,
    head_prototypes,
    nearest_indices,
    pullback_weights,
    resize_features,
    resize_mask,
)

__all__ = [
    "SKIPPED_FILE",
    "ExtractError",
    "ExtractParams",
    "backbone_prototypes",
    "extract",
    "head_prototypes",
    "nearest_indices",
    "pullback_weights",
    "resize_features",
    "resize_mask",
]
