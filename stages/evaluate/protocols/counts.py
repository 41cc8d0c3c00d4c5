"""Per-region (outside / inside the region, class) pixel counts of a split, taken once at the
label's full resolution and cached as ``counts_<split>.npz``, so that every K-means seed,
matching and retrieval class subset is scored in O(n_images x n_classes) without rereading
pixels; and the regions' prototypes and painted class maps in the same row order."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from artifacts.atomic import atomic_path
from artifacts.embeddings import EmbeddingStore
from stages.data import BadInputError, DatasetIndex, load_label
from stages.evaluate.metrics import MetricsError, SalientClassCounts
from stages.evaluate.saliency import ProtocolError

from .common import StoreLike, class_names, open_store, require_labels

_COUNTS_FORMAT = 1


@dataclass
class SplitCounts:
    """Per-region (outside / inside the region, class) pixel counts of one split.

    A region is what the K-means and retrieval protocols label with one id: an image's salient
    region (version-1 embeddings), or each of its proposals (version 2,
    :meth:`artifacts.embeddings.EmbeddingStore.regions`). ``ids`` are the kept images (store
    order); ``regions[i]`` how many rows of ``counts`` image ``ids[i]`` has (None: one each);
    ``skipped`` maps the requested ids left out to the reason (unreadable label, no embedding).
    """

    split: str
    ids: list[str]
    counts: SalientClassCounts
    skipped: dict[str, str] = field(default_factory=dict)
    regions: list[int] | None = None

    @property
    def row_ids(self) -> list[str]:
        """The image of each row of ``counts``."""
        if self.regions is None:
            return list(self.ids)
        return [i for i, n in zip(self.ids, self.regions) for _ in range(n)]

    def first_rows(self) -> dict[str, int]:
        """The first row of each image's regions."""
        starts = np.concatenate([[0], np.cumsum(self.regions)[:-1]]) if self.regions else range(len(self.ids))
        return {id_: int(r) for id_, r in zip(self.ids, starts)}


def _counts_key(store: EmbeddingStore, ids: Sequence[str], n_cls: int, ignore_index: int) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()
    key = {"format": _COUNTS_FORMAT, "store": str(Path(store.directory).resolve()), "ids_sha256": digest,
           "n_ids": len(ids), "n_cls": n_cls, "ignore_index": ignore_index}
    if store.has_proposals:
        key["regions"] = True
    return key


def _load_counts(path: Path, key: Mapping[str, Any], split: str) -> SplitCounts | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != key:
                return None
            counts, ids = z["counts"], [str(i) for i in z["ids"]]
            skipped = dict(zip((str(i) for i in z["skipped_ids"]), (str(r) for r in z["skipped_reasons"])))
            regions = [int(r) for r in z["regions"]] if key.get("regions") else None
        n_rows = len(ids) if regions is None else sum(regions)
        if counts.shape != (n_rows, 2, key["n_cls"]) or (regions is not None and len(regions) != len(ids)):
            return None
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache: recompute
    return SplitCounts(split, ids, SalientClassCounts.from_array(counts, key["ignore_index"]), skipped, regions)


def class_counts(emb_store: StoreLike, dataset: DatasetIndex, ids: Sequence[str], progress: bool = True, *,
                 split: str = "val", cache_dir: Path | None = None, protocol: str = "K-means / retrieval") -> SplitCounts:
    """One pass over the labels of ``ids``: per image, the pixel counts of each ground-truth class
    outside and inside the stored salient mask (label at full resolution, ignore excluded).

    With ``cache_dir`` the result is kept in ``counts_<split>.npz`` (``counts`` int64 n x 2 x n_cls,
    ``ids``, ``skipped_ids`` / ``skipped_reasons``, and ``key``: the JSON of the store, requested
    ids and classes it was computed for), one file written atomically so concurrent jobs sharing a
    cache never see a torn pair; a later call with the same key reads it instead of the labels.
    Raises ProtocolError when the split has no labels or a label holds a value outside the classes.
    """
    store = open_store(emb_store)
    names = class_names(dataset)
    ids = list(ids)
    require_labels(dataset, ids, split, protocol)
    key = _counts_key(store, ids, len(names), dataset.ignore_index)
    cache = None if cache_dir is None else Path(cache_dir) / f"counts_{split}.npz"
    if cache is not None:
        cached = _load_counts(cache, key, split)
        if cached is not None:
            return cached
    wanted = set(ids)
    in_store = set(store.ids())
    skipped = {i: "no embedding (extract could not read the image)" for i in ids if i not in in_store}
    acc = SalientClassCounts(len(names), dataset.ignore_index)
    kept: list[str] = []
    regions: list[int] | None = [] if store.has_proposals else None
    records = (r for r in store.iter() if r.id in wanted)
    for rec in tqdm(records, total=len(wanted & in_store), desc=f"labels {split}", unit="img", disable=not progress):
        label_path = dataset.sample(rec.id).label
        try:
            label = load_label(label_path, rec.shape)
        except BadInputError as exc:
            skipped[rec.id] = str(exc)
            continue
        try:
            if regions is None:
                acc.update(rec.mask, label)
            else:
                regions.append(len(acc.update_regions([r.mask for r in store.read_regions(rec.id)], label)))
        except MetricsError as exc:
            raise ProtocolError(f"{label_path}: {exc}; the dataset declares {len(names)} classes "
                                f"({', '.join(names[:4])}, ...)") from None
        kept.append(rec.id)
    if not kept:
        raise ProtocolError(f"{store.directory}: no image of split {split!r} could be scored "
                            f"({len(skipped)} skipped, e.g. {next(iter(skipped.values()), '')})")
    out = SplitCounts(split, kept, acc, skipped, regions)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if regions is None else {"regions": np.array(regions, dtype=np.int64)}
        with atomic_path(cache, suffix=".npz") as tmp:
            np.savez(tmp, counts=acc.counts, ids=np.array(kept, dtype=str), key=json.dumps(key, sort_keys=True),
                     skipped_ids=np.array(list(skipped), dtype=str),
                     skipped_reasons=np.array(list(skipped.values()), dtype=str), **extra)
    return out


def region_prototypes(store: EmbeddingStore, ids: Sequence[str] | SplitCounts) -> np.ndarray:
    """Prototypes (rows, D) float32 of ``ids`` (one per image), or of the regions of a
    :class:`SplitCounts` (one per row of its counts), from the store's index arrays."""
    if isinstance(ids, SplitCounts) and ids.regions is not None:
        all_ids, counts, protos, _ = store.regions()
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        first = dict(zip(all_ids, starts))
        rows = [first[i] + k for i, n in zip(ids.ids, ids.regions) for k in range(n)]
        return protos[np.array(rows, dtype=np.int64)]
    if isinstance(ids, SplitCounts):
        ids = ids.ids
    all_ids, protos, _ = store.prototypes()
    row = {k: i for i, k in enumerate(all_ids)}
    return protos[np.array([row[i] for i in ids], dtype=np.int64)]


def paint(store: EmbeddingStore, sc: SplitCounts, id_: str, values: np.ndarray, background: int = 0) -> np.ndarray:
    """Image ``id_``'s prediction: ``values[row]`` on each of its regions' pixels (row: its row of
    ``sc``'s counts), ``background`` elsewhere."""
    first = sc.first_rows()[id_]
    if sc.regions is None:
        return np.where(store.get(id_).mask, values[first], background)
    regions = store.read_regions(id_)
    out = np.full(regions[0].mask.shape, background, dtype=np.asarray(values).dtype)
    for k in range(len(regions), 0, -1):
        out[regions[k - 1].mask] = values[first + k - 1]
    return out
