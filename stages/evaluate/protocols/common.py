"""What every protocol runner shares: opening an embedding store, the dataset's class names, the
checks that a split can be scored, and the metrics entries for skipped images."""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from artifacts.embeddings import EmbeddingStore
from stages.data import DatasetIndex
from stages.evaluate.saliency import ProtocolError

SHEET_SIZE = 12  # images in each protocol's contact sheet
MAX_LISTED = 20  # skipped images listed by name in the metrics

StoreLike = EmbeddingStore | str | os.PathLike


def open_store(store: StoreLike) -> EmbeddingStore:
    return store if isinstance(store, EmbeddingStore) else EmbeddingStore(store)


def class_names(dataset: DatasetIndex) -> list[str]:
    if not dataset.classes:
        raise ProtocolError(f"{dataset.root}: the class names are unknown, so labels cannot be scored: add "
                            "classes.txt (one class name per line, background first)")
    return list(dataset.classes)


def require_labels(dataset: DatasetIndex, ids: Sequence[str], split: str, protocol: str) -> None:
    if not ids:
        raise ProtocolError(f"{dataset.root}: split {split!r} has no image for the {protocol} protocol")
    missing = [i for i in ids if dataset.sample(i).label is None]
    if missing:
        raise ProtocolError(f"{dataset.root}: the {protocol} protocol needs ground-truth labels for split "
                            f"{split!r}, but {len(missing)} of its {len(ids)} images have none "
                            f"(e.g. {missing[0]!r})")


def require_features(store: EmbeddingStore, protocol: str) -> tuple[int, int, int]:
    shape = store.feature_shape
    if shape is None:
        raise ProtocolError(f"{store.directory}: the {protocol} protocol needs cached decoder features, but this "
                            "embedding artifact was extracted without them: rerun extract with "
                            "`extract.features: true`")
    return shape


def skipped_metrics(skipped: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"n_skipped": len(skipped)}
    if skipped:
        out["skipped"] = dict(list(sorted(skipped.items()))[:MAX_LISTED])
    return out


def per_class_dict(names: Sequence[str], values: Sequence[float]) -> dict[str, float]:
    return {n: float(v) for n, v in zip(names, values)}
