"""Stage 3: run the trained network over a split once and store prototypes, salient masks and
low-resolution decoder features as HDF5 embedding shards (see :mod:`stages.extract.extract`).
``ExtractParams`` (:mod:`stages.extract.params`) is the ``extract`` section of the configuration.
Names are imported on first use, so that reading the parameters does not import torch. The stage
function is ``stages.extract.extract.extract`` (the package attribute ``extract`` is that module).
"""
from __future__ import annotations

import importlib

_HOMES = {
    "ExtractParams": "params",
    **{name: "extract" for name in (
        "SKIPPED_FILE", "ExtractError", "backbone_prototypes", "head_prototypes", "nearest_indices",
        "pullback_weights", "resize_features", "resize_mask")},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
