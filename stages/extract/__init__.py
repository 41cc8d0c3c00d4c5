"""Stage 3: run the trained network over a split once and store prototypes, salient masks and
low-resolution decoder features as HDF5 embedding shards (see :mod:`stages.extract.extract`).
``ExtractParams`` (:mod:`stages.extract.params`) is the ``extract`` section of the configuration.
Names are imported on first use, so that reading the parameters does not import torch. ``run`` is
the stage (every split); one split is ``stages.extract.extract.extract`` (the package attribute
``extract`` is that module).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.lazy import lazy_exports

_HOMES = {
    "ExtractParams": "params",
    **{name: "extract" for name in (
        "SKIPPED_FILE", "ExtractError", "backbone_prototypes", "head_prototypes", "nearest_indices",
        "pullback_weights", "resize_features", "resize_mask")},
}

__getattr__, __all__ = lazy_exports(__name__, _HOMES)


def run(params: Any, inputs: Mapping[str, Any], out_dir: Path, *, samples: Mapping[str, Sequence[Any]],
        progress: bool = True, on_progress: Callable[..., None] | None = None, proposals: Any = None) -> dict[str, Any]:
    """Run the model of ``inputs["train"]`` over each split of ``samples`` (split name -> its
    samples, in order) into ``out_dir/<split>`` with ``params`` (``ExtractParams``); the masks of
    ``inputs["masks"]``, when given, are the salient regions (``mask_source: masks``; their
    proposals too, when the artifact stores them). ``proposals``: the masks section's
    ``ProposalParams``, splitting the head's mask into components (``mask_source: model``).
    ``on_progress(done, total, unit, **extra)`` per shard. Returns the summary for the manifest."""
    from stages.train import load_model

    from .extract import extract

    model, _ = load_model(inputs["train"].path)
    mask_dir = inputs["masks"].path if "masks" in inputs else None
    splits = list(samples)
    summary: dict[str, Any] = {}
    for i, split in enumerate(splits):
        on_shard = None if on_progress is None else (
            lambda done, total, i=i, split=split: on_progress(done, total, "shards", split=split, split_index=i + 1,
                                                              n_splits=len(splits)))
        summary[split] = extract(model, samples[split], Path(out_dir) / split, params, mask_dir=mask_dir,
                                 attrs={"train": inputs["train"].ref, "split": split}, progress=progress,
                                 on_shard=on_shard, **({} if proposals is None else {"proposals": proposals}))
    return {"splits": splits, **{f"{k}.n_images": v["n_images"] for k, v in summary.items()},
            **{f"{k}.n_valid": v["n_valid"] for k, v in summary.items()},
            "images_per_s": summary[splits[0]].get("images_per_s"), "details": summary}
