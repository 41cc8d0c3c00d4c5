"""Training checkpoints and the final model file: what they hold, atomic saving, checked loading.

Both are ``torch.save`` dicts of tensors and plain Python values only, so they load with
``torch.load(weights_only=True)`` (no pickled code runs when a file is opened).

``checkpoints/epoch-NNNN.pt`` (format ``maskcontrast/train-checkpoint``, version 1): the query
model, key encoder, prototype queue (rows, pointer, fill count), optimiser, GradScaler, finished
epochs and global step, every rank's RNG states (python, numpy, torch, cuda), the data order
(seed, sample fingerprint, global batch: the order of every epoch follows from them), the number
of log lines it covers, the per-epoch history, the parameters and the init report.

``model.pt`` (format ``maskcontrast/train-model``, version 1): ``state_dict`` of the query model,
``model_config`` (the ``MaskContrastModel`` arguments and the frozen stage), ``params``, ``init``
report and ``epochs`` trained. :func:`load_model` rebuilds the network from it.
"""
from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifacts.atomic import atomic_path
from artifacts.checkpoints import MODEL_FILE
from stages.network.backbones import BACKBONES
from stages.network.model import MaskContrastModel, freeze_early

CHECKPOINT_FORMAT = "maskcontrast/train-checkpoint"
MODEL_FORMAT = "maskcontrast/train-model"
FORMAT_VERSION = 1
MODEL_CONFIG_KEYS = ("backbone", "output_stride", "embedding_dim", "aspp_rates", "dropout")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: unreadable, another format, or another run."""


class ModelFileError(ValueError):
    """A ``model.pt`` that is missing, unreadable, or does not fit the network its config names."""


# --------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict[str, Any]:
    """The python, numpy, torch (CPU) and CUDA RNG states of this process, weights_only-safe."""
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where the devices exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
        "has_gauss": np_state["has_gauss"],
        "gauss": np_state["gauss"],
    })
    torch.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# --------------------------------------------------------------------------- checkpoints


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every tensor detached and on the CPU (CPU tensors are not
    copied: the dict is for saving at once, not for keeping)."""
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write ``state`` (plus format tags) to ``path`` atomically: temp file, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **state}, tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` onto the CPU, checking its format."""
    path = Path(path)
    try:
        # mmap: tensors are read when used, so checking the metadata first costs little.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # unpickling / zip errors come in many types
        raise CheckpointError(f"{path}: cannot read the training checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a training checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format_version {state.get('format_version')!r} is not "
                              f"readable by this code (it reads {FORMAT_VERSION})")
    return state


# --------------------------------------------------------------------------- model file


def build_model(config: Mapping[str, Any]) -> MaskContrastModel:
    """A randomly initialised ``MaskContrastModel`` from a ``model_config`` dict, frozen as recorded."""
    model = MaskContrastModel(
        backbone=config["backbone"], output_stride=int(config["output_stride"]),
        embedding_dim=int(config["embedding_dim"]), aspp_rates=tuple(config["aspp_rates"]),
        dropout=float(config["dropout"]),
    )
    if config.get("freeze_upto"):
        freeze_early(model, config["freeze_upto"])
    return model


def save_model_file(path: str | os.PathLike, model: MaskContrastModel, config: Mapping[str, Any],
                    **extra: Any) -> Path:
    """Write ``model.pt``: the query model's weights, its ``model_config`` and ``extra`` entries."""
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save({"format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "model_config": dict(config),
                    "state_dict": cpu_state_dict(model), **extra}, tmp)
    return path


def load_model(artifact_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[MaskContrastModel, dict[str, Any]]:
    """Rebuild the trained network from ``<artifact_dir>/model.pt`` (or a path to the file).

    Returns the model in eval mode on ``map_location`` and the file's metadata (``model_config``,
    ``params``, ``init``, ``epochs``, ...; everything but the weights).

    Raises:
        ModelFileError: the file is missing or unreadable, is not a model file, names an unknown
            backbone, or its weights do not fit the network its config describes.
    """
    path = Path(artifact_dir)
    if path.is_dir() or not path.suffix:
        path = path / MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found (is the train artifact complete?)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelFileError(f"{path}: cannot read the model file ({type(error).__name__}: {error})") from error
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ModelFileError(f"{path}: not a MaskContrast model file (expected format {MODEL_FORMAT!r}; "
                             "a training checkpoint or a raw state dict is not one)")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format_version {obj.get('format_version')!r} is not readable "
                             f"by this code (it reads {FORMAT_VERSION})")
    config = obj.get("model_config")
    if not isinstance(config, dict) or any(k not in config for k in MODEL_CONFIG_KEYS):
        raise ModelFileError(f"{path}: model_config must hold {', '.join(MODEL_CONFIG_KEYS)}, got {config!r}")
    if config["backbone"] not in BACKBONES:
        raise ModelFileError(f"{path}: backbone {config['backbone']!r} is not one this code builds "
                             f"({', '.join(BACKBONES)})")
    try:
        model = build_model(config)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelFileError(f"{path}: cannot build the network of model_config {config}: {error}") from error
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, KeyError) as error:
        raise ModelFileError(f"{path}: weights do not fit the {config['backbone']} network of its "
                             f"model_config {config}: {error}") from error
    meta = {k: v for k, v in obj.items() if k not in ("state_dict", "format", "format_version")}
    return model.to(map_location).eval(), meta
