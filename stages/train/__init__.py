"""Stage 2: MaskContrast training (query network, momentum key encoder, prototype queue).

``train`` writes the artifact (checkpoints, log, ``model.pt``); ``load_model`` rebuilds the trained
network from it for the extract stage.
"""
from .checkpoint import CheckpointError, ModelFileError, load_model
from .data import TrainDataError
from .loop import TrainingDiverged, TrainParams, train

__all__ = [
    "CheckpointError",
    "ModelFileError",
    "TrainDataError",
    "TrainParams",
    "TrainingDiverged",
    "load_model",
    "train",
]
