"""Stage 1: mask proposals for every image, written as HDF5 shards (:mod:`stages.masks.stage`),
from one of the estimators (priors, bootstrap, model, import, features). The parameters are in
:mod:`stages.masks.params` (torch-free); ``run`` is the stage.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any


def run(params: Any, inputs: Mapping[str, Any], out_dir: Path, *, samples: Sequence[Any], estimator: Any,
        attrs: Mapping[str, Any] | None = None, client: Any = None, progress: bool = True,
        on_progress: Callable[..., None] | None = None,
        on_record: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write the masks of ``samples`` by ``estimator`` (a picklable callable, e.g. made by the
    pipeline from the configuration) into ``out_dir``, post-processed with ``params`` (the masks
    section: ``PostParams`` and ``ProposalParams`` keys, ``shard_size``, ``store_soft``). The masks stage has no upstream
    ``inputs``. ``client``: a dask client (None: in this process). ``on_progress(done, total,
    unit)`` per shard; ``on_record(estimator=...)`` records the estimator's description."""
    from .params import PostParams, ProposalParams
    from .stage import compute_masks

    on_shard = None if on_progress is None else (lambda done, total: on_progress(done, total, "shards"))
    proposals = ProposalParams.of(params) if isinstance(params, ProposalParams) else None
    summary = compute_masks(samples, estimator, PostParams.of(params), out_dir, shard_size=params.shard_size,
                            store_soft=params.store_soft, attrs=dict(attrs or {}), client=client, progress=progress,
                            on_shard=on_shard, proposals=proposals)
    if on_record is not None:
        on_record(estimator=estimator.describe())
    return summary
