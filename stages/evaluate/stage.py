"""The evaluate stage: score one model's embeddings (and the masks) with the configured protocols
and write ``metrics.json`` and ``report.md``.

``run_protocol`` is the one dispatcher from a protocol name to its runner in
:mod:`stages.evaluate.protocols`; the stage (:func:`run`) and the comparison jobs
(:func:`stages.evaluate.batch.run_job`) both go through it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.data import DatasetIndex
from stages.evaluate.params import EvaluateParams, protocol_options

#: Protocols scored from an extract artifact (``saliency`` scores the masks).
EMBEDDING_PROTOCOLS = ("kmeans", "pixel_kmeans", "retrieval", "linear")
#: Summary figures copied from each protocol's metrics into the manifest.
SUMMARY_KEYS = ("miou", "miou_std", "miou_crf", "iou", "max_f", "mean_f", "mae")


def run_protocol(protocol: str, dataset: DatasetIndex, out_dir: Path, *, val_store: str | Path, val_split: str,
                 learn_store: str | Path | None = None, learn_split: str | None = None,
                 seeds: Sequence[int] | None = None, cache_dir: Path | None = None, progress: bool = True,
                 **options: Any) -> dict[str, Any]:
    """Run ``protocol`` on the embedding store ``val_store`` (split ``val_split``) into ``out_dir``.

    ``learn_store``/``learn_split``: what retrieval's memory bank or the linear probe learns from,
    and where K-means fits its discriminant space (``space="discriminant"``).
    ``seeds``: the K-means seeds; the linear probe takes the first (None: the runner's default).
    ``cache_dir``: where K-means and retrieval keep per-image label counts. ``options``: the
    runner's keyword arguments (:func:`stages.evaluate.params.protocol_options`, ``figures``).
    """
    from stages.evaluate import protocols as P

    val_ids = dataset.ids(val_split)
    seeded: dict[str, Any] = {}
    if seeds is not None:
        seeded = {"seed": seeds[0]} if protocol == "linear" else {"seeds": seeds}
    if protocol == "kmeans":
        fit = {"fit_store": learn_store} if options.get("space", "pca") != "pca" else {}
        return P.run_kmeans(val_store, dataset, val_ids, out_dir, split=val_split, cache_dir=cache_dir,
                            progress=progress, **fit, **seeded, **options)
    if protocol == "pixel_kmeans":
        return P.run_pixel_kmeans(val_store, dataset, val_ids, out_dir, split=val_split, progress=progress,
                                  **seeded, **options)
    if protocol == "retrieval":
        return P.run_retrieval(learn_store, val_store, dataset, dataset.ids(learn_split), val_ids, out_dir,
                               train_split=learn_split, val_split=val_split, cache_dir=cache_dir, progress=progress,
                               **options)
    if protocol == "linear":
        return P.run_linear(learn_store, val_store, dataset, dataset.ids(learn_split), val_ids, out_dir,
                            train_split=learn_split, val_split=val_split, progress=progress, **seeded, **options)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(EMBEDDING_PROTOCOLS)}")


def require_salient(store_dir: Path, protocol: str, ref: str) -> None:
    """Prototype protocols need salient pixels; a model whose saliency head fires nowhere gives none."""
    from artifacts.embeddings import EmbeddingStore
    from stages.evaluate.saliency import ProtocolError

    if protocol not in ("kmeans", "retrieval"):
        return
    _, _, valid = EmbeddingStore(store_dir).prototypes()
    if not valid.any():
        raise ProtocolError(
            f"{protocol}: no image of {ref} has a salient pixel (saliency logit > 0.5), so there is no "
            "prototype to cluster; train longer, or set extract.mask_source: masks to use the mask proposals")


def run(params: EvaluateParams, inputs: Mapping[str, Any], out_dir: Path, *, dataset: DatasetIndex,
        val_split: str, train_split: str, bank_split: str | None = None, masks_split: str | None = None,
        saliency_threshold: float = 0.5, context: Mapping[str, str] | None = None, progress: bool = True,
        on_progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Score ``params.protocols`` in order and write ``metrics.json`` and ``report.md`` into ``out_dir``.

    ``inputs``: the upstream artifacts by stage name (``.path``, ``.ref``): ``extract`` for the
    embedding protocols, ``masks`` for saliency. Retrieval's bank is the split ``bank_split``
    (None: ``train_split``); saliency scores the masks of ``masks_split`` (None: all) binarised at
    ``saliency_threshold``. ``context``: extra lines of the report. ``on_progress(done, total,
    unit, **extra)`` is called per protocol. Returns the summary figures for the manifest.
    """
    from stages.evaluate.report import write_metrics, write_report

    options = protocol_options(params)
    metrics: dict[str, dict[str, Any]] = {}
    images: dict[str, str] = {}
    protocols = list(params.protocols)
    report = on_progress or (lambda *args, **kwargs: None)
    for i, protocol in enumerate(protocols):
        report(i, len(protocols), "protocols", current=protocol)
        if protocol == "saliency":
            from stages.evaluate.saliency import evaluate_saliency

            metrics["saliency"] = evaluate_saliency(inputs["masks"].path, dataset, dataset.ids(masks_split), out_dir,
                                                    threshold=saliency_threshold, progress=progress)
            images.update({"saliency F-measure curve": "saliency_f_curve.png",
                           "best and worst images by IoU": "saliency_sheet.png"})
            continue
        emb = inputs["extract"].path
        val_store = emb / val_split
        require_salient(val_store, protocol, inputs["extract"].ref)
        learn_split = (bank_split or train_split) if protocol == "retrieval" else train_split
        metrics[protocol] = run_protocol(protocol, dataset, out_dir, val_store=val_store, val_split=val_split,
                                         learn_store=emb / learn_split, learn_split=learn_split,
                                         seeds=params.seeds, cache_dir=out_dir, progress=progress,
                                         **options[protocol])
        if protocol == "kmeans" and params.kmeans.pixel:
            metrics["pixel_kmeans"] = run_protocol("pixel_kmeans", dataset, out_dir / "pixel_kmeans",
                                                   val_store=val_store, val_split=val_split, seeds=params.seeds,
                                                   progress=progress, **options["pixel_kmeans"])
        for name in (protocol, "pixel_kmeans"):
            for caption, file in (metrics.get(name, {}).pop("figures", None) or {}).items():
                images[f"{name}: {caption}"] = file if name != "pixel_kmeans" else f"pixel_kmeans/{file}"
    report(len(protocols), len(protocols), "protocols")
    write_metrics(out_dir, metrics)
    write_report(out_dir, "MaskContrast evaluation report", metrics, dict(context or {}), images)
    return summary_figures(metrics)


def summary_figures(metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The headline figures of ``metrics`` (per protocol), rounded, for the manifest."""
    summary: dict[str, Any] = {}
    for protocol, m in metrics.items():
        for key in SUMMARY_KEYS:
            if isinstance(m.get(key), (int, float)):
                summary[f"{protocol}.{key}"] = round(float(m[key]), 4)
        if isinstance(m.get("colour_baseline"), dict):  # K-means on mask colours: the trivial baseline
            summary[f"{protocol}.colour_baseline_miou"] = round(float(m["colour_baseline"]["miou"]), 4)
    return summary
