"""Stage 2: MaskContrast training (query network, momentum key encoder, prototype queue).

``run`` is the stage: it trains on the images of a split that have a kept mask and writes the
artifact (checkpoints, log, ``model.pt``); ``load_model`` rebuilds the trained network from it for
the extract stage. ``TrainParams`` (:mod:`stages.train.params`) is the
``train`` section of the configuration. Names are imported on first use, so that reading the
parameters does not import torch.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.lazy import lazy_exports

_HOMES = {
    "CheckpointError": "checkpoint",
    "ModelFileError": "checkpoint",
    "load_model": "checkpoint",
    "TrainDataError": "data",
    "TrainingDiverged": "trainer",
    "train": "trainer",
    "AugmentParams": "params",
    "TrainParams": "params",
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)


def run(params: Any, inputs: Mapping[str, Any], out_dir: Path, *, samples: Sequence[Any], split: str,
        progress: bool = True, on_progress: Callable[..., None] | None = None,
        on_record: Callable[..., None] | None = None) -> dict[str, Any]:
    """Train ``params`` (``TrainParams``) on those ``samples`` (split ``split``) that have a kept mask
    in ``inputs["masks"]`` (``.path``, ``.ref``); write the artifact into ``out_dir``.
    ``on_progress(done, total, unit)`` per epoch; ``on_record(**fields)`` records the images used."""
    from artifacts.masks import MaskStore

    from .trainer import train

    masks = inputs["masks"]
    kept = set(MaskStore(masks.path).ids(kept_only=True))
    with_mask = [s for s in samples if s.id in kept]
    if not with_mask:
        raise ValueError(f"no image of split {split!r} has a kept mask in {masks.ref}")
    if on_record is not None:
        on_record(train_images={"split": split, "n_split": len(samples), "n_with_mask": len(with_mask)})
    on_epoch = None if on_progress is None else (lambda epoch, record: on_progress(epoch, params.epochs, "epochs"))
    return train(params, with_mask, masks.path, out_dir, progress=progress, on_epoch=on_epoch)
