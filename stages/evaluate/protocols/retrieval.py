"""The retrieval protocol runner: each val region takes the class of its nearest train region
(cosine, top 1) on its pixels; all classes, and optionally a class subset."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.data import DatasetIndex
from stages.evaluate.figures import per_class_iou_png
from stages.evaluate.retrieval import retrieval_protocol
from stages.evaluate.saliency import ProtocolError

from .common import SHEET_SIZE, StoreLike, class_names, open_store, per_class_dict, skipped_metrics
from .counts import class_counts, paint, region_prototypes
from .pictures import pick, protocol_figures


def _class_ids(names: Sequence[str], subset: Sequence[str]) -> list[int]:
    unknown = [c for c in subset if c not in names]
    if unknown:
        raise ProtocolError(f"retrieval class_subset: unknown class name(s) {unknown}; the dataset's classes are "
                            f"{', '.join(names)}")
    ids = sorted({names.index(c) for c in subset} - {0})
    if not ids:
        raise ProtocolError(f"retrieval class_subset {list(subset)} names no foreground class")
    return ids


def run_retrieval(train_store: StoreLike, val_store: StoreLike, dataset: DatasetIndex, train_ids: Sequence[str],
                  val_ids: Sequence[str], out_dir: Path, class_subset: Sequence[str] | None = None, *,
                  train_split: str = "train", val_split: str = "val", progress: bool = True,
                  figures: bool = True, sheet_size: int = SHEET_SIZE, cache_dir: Path | None = None) -> dict[str, Any]:
    """Retrieval: each val image takes its top-1 cosine neighbour's class among the train images
    (labelled with the majority class inside their salient mask) on its salient pixels.

    The "train" arguments describe the memory bank: ``train_store`` holds the embeddings of split
    ``train_split`` (the reference's bank is VOC ``train``, not the ``trainaug`` it trains on);
    ``bank_split`` and ``n_bank_images`` in the metrics record which split and how many images.
    ``miou`` is the all-classes variant (mean over every class, background included); with
    ``class_subset`` (class names, e.g. the paper's 7) the subset variant is under ``subset``:
    other classes ignored in both splits, mean over the subset without background. The label
    counts of both splits are cached in ``cache_dir`` (default ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bank_store, query_store = open_store(train_store), open_store(val_store)
    names = class_names(dataset)
    subset = _class_ids(names, class_subset) if class_subset is not None else None
    cache = out_dir if cache_dir is None else cache_dir
    bank = class_counts(bank_store, dataset, train_ids, progress, split=train_split, cache_dir=cache,
                        protocol="retrieval")
    query = class_counts(query_store, dataset, val_ids, progress, split=val_split, cache_dir=cache,
                         protocol="retrieval")
    bank_protos, query_protos = region_prototypes(bank_store, bank), region_prototypes(query_store, query)
    if bank_protos.shape[1] != query_protos.shape[1]:
        raise ProtocolError(f"retrieval: the train embeddings {bank_store.directory} have prototypes of dimension "
                            f"{bank_protos.shape[1]} but the val embeddings {query_store.directory} have "
                            f"{query_protos.shape[1]}: extract both splits with the same model and parameters")
    try:
        full = retrieval_protocol(bank_protos, bank.counts, query_protos, query.counts)
        part = (retrieval_protocol(bank_protos, bank.counts, query_protos, query.counts, classes=subset)
                if subset is not None else None)
    except ValueError as exc:  # e.g. no train image has a labelled salient pixel
        raise ProtocolError(f"retrieval on {bank_store.directory}: {exc}") from None
    per_class = per_class_dict(names, full.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:
        pred = np.asarray(full.predictions, dtype=np.int64)  # class of each val region

        def predict(id_: str, label: np.ndarray) -> np.ndarray:
            return paint(query_store, query, id_, pred).astype(np.uint8)

        pictures = protocol_figures(out_dir, "retrieval", "retrieval (all classes)", names,
                                    query.counts.class_confusion(pred), per_class, dataset,
                                    pick(query.ids, sheet_size), predict)
    metrics: dict[str, Any] = {
        "miou": full.miou, "miou_std": 0.0, "per_class_iou": per_class, "pixel_accuracy": full.pixel_accuracy,
        "seeds": [], "classes": names, "bank_split": train_split, "n_bank": full.n_bank,
        "n_bank_images": len(bank.ids),
        "n_images": len(query.ids), "deterministic": True,
    }
    if query.regions is not None:
        metrics["n_regions"] = len(query.counts)
    if part is not None:
        sub_names = [names[c] for c in part.classes]
        sub_per_class = {n: float(part.per_class_iou[c]) for n, c in zip(sub_names, part.classes)}
        metrics["subset"] = {"classes": sub_names, "miou": part.miou, "per_class_iou": sub_per_class,
                             "pixel_accuracy": part.pixel_accuracy, "n_bank": part.n_bank}
        metrics["miou_subset"] = part.miou
        if figures:
            per_class_iou_png(sub_per_class, out_dir / "retrieval_subset_per_class_iou.png",
                              title=f"retrieval ({len(sub_names)} classes): per-class IoU", mean=part.miou)
            pictures[f"retrieval ({len(sub_names)} classes): per-class IoU"] = "retrieval_subset_per_class_iou.png"
    metrics["figures"] = pictures
    skipped = {**{f"{train_split}/{k}": v for k, v in bank.skipped.items()},
               **{f"{val_split}/{k}": v for k, v in query.skipped.items()}}
    metrics.update(skipped_metrics(skipped))
    return metrics
