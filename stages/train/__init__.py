"""Stage 2: MaskContrast training (query network, momentum key encoder, prototype queue).

``train`` writes the artifact (checkpoints, log, ``model.pt``); ``load_model`` rebuilds the trained
network from it for the extract stage. ``TrainParams`` (:mod:`stages.train.params`) is the
``train`` section of the configuration. Names are imported on first use, so that reading the
parameters does not import torch.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "CheckpointError": "checkpoint",
    "ModelFileError": "checkpoint",
    "load_model": "checkpoint",
    "TrainDataError": "data",
    "TrainingDiverged": "loop",
    "train": "loop",
    "AugmentParams": "params",
    "TrainParams": "params",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
