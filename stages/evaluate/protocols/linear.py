"""The linear probe runner: a 1x1 conv trained on the cached train features, scored on val after
every epoch, and optionally once more after the dense CRF (the paper's "linear + CRF")."""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from artifacts.atomic import atomic_path
from artifacts.embeddings import EmbeddingStore
from stages.data import BadInputError, DatasetIndex, load_image, load_label
from stages.evaluate.crf import CRFError, CRFParams, dense_crf
from stages.evaluate.figures import loss_curve_png
from stages.evaluate.metrics import confusion_matrix, segmentation_scores
from stages.evaluate.saliency import ProtocolError

from .common import (
    SHEET_SIZE,
    StoreLike,
    class_names,
    open_store,
    per_class_dict,
    require_features,
    require_labels,
    skipped_metrics,
)
from .pictures import pick, protocol_figures

LINEAR_CACHE_BYTES = 2 << 30  # features + labels of both splits held in memory up to this size


def _linear_crf_pass(head, samples: Iterable[tuple[str, np.ndarray, np.ndarray]], dataset: DatasetIndex,
                     names: Sequence[str], params: CRFParams, sheet_ids: set[str], val_split: str, progress: bool,
                     total: int) -> tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]:
    """Score the probe ``head`` on val samples (id, features (C, f, f), label (H, W)) after the
    dense CRF: returns the ``crf`` metrics block, its confusion (n_cls, n_cls) and the class maps
    of the ``sheet_ids`` images. An unreadable image is skipped and listed in the block."""
    import torch

    from stages.evaluate.linear import upsampled_logits

    n_cls = len(names)
    conf = np.zeros((n_cls, n_cls), dtype=np.int64)
    skipped: dict[str, str] = {}
    preds: dict[str, np.ndarray] = {}
    seconds, n_done = 0.0, 0
    for id_, feats, label in tqdm(samples, total=total, desc="linear + CRF", unit="img", disable=not progress):
        try:
            image = load_image(dataset.sample(id_).image)  # (H', W', 3) uint8
        except BadInputError as exc:
            skipped[f"{val_split}/{id_}"] = str(exc)
            continue
        if image.shape[:2] != label.shape:
            image = cv2.resize(image, (label.shape[1], label.shape[0]), interpolation=cv2.INTER_LINEAR)
        with torch.no_grad():
            feats_t = torch.as_tensor(np.asarray(feats, np.float32), device=head.weight.device)[None]
            probs = torch.softmax(upsampled_logits(head, feats_t, label.shape)[0], dim=0).cpu().numpy()  # (C, H, W)
        start = time.perf_counter()
        try:
            pred = dense_crf(image, probs, params).argmax(axis=0)  # (H, W)
        except CRFError as exc:
            raise ProtocolError(f"linear + CRF on {dataset.sample(id_).image}: {exc}") from None
        seconds += time.perf_counter() - start
        n_done += 1
        conf += confusion_matrix(pred, label, n_cls, n_cls, dataset.ignore_index)
        if id_ in sheet_ids:
            preds[id_] = pred.astype(np.uint8)
    scores = segmentation_scores(conf) if n_done else None
    block = {
        "miou": 100.0 * scores.miou if scores else None,
        "per_class_iou": per_class_dict(names, 100.0 * scores.per_class_iou) if scores else None,
        "pixel_accuracy": 100.0 * scores.pixel_accuracy if scores else None,
        "params": params.to_dict(), "seconds_per_image": seconds / max(n_done, 1), "n_images": n_done,
        **skipped_metrics(skipped),
    }
    return block, conf, preds


def run_linear(train_store: StoreLike, val_store: StoreLike, dataset: DatasetIndex, train_ids: Sequence[str],
               val_ids: Sequence[str], out_dir: Path, *, epochs: int = 60, lr: float = 0.1, lr_drop_epoch: int = 25,
               momentum: float = 0.9, weight_decay: float = 1e-4, batch_size: int = 16, seed: int = 0,
               device: str = "auto", train_split: str = "train", val_split: str = "val", progress: bool = True,
               figures: bool = True, sheet_size: int = SHEET_SIZE, crf: bool = False,
               crf_params: CRFParams | None = None) -> dict[str, Any]:
    """Linear probe (1x1 conv on the cached decoder features) trained on the train split, scored
    on val after every epoch.

    ``miou`` is the LAST epoch's val mIoU; ``miou_best_on_val`` the best epoch's, labelled as such
    (the reference reports it, choosing the epoch on the split it reports). Each epoch streams
    the train features in a seeded order (``np.random.default_rng((seed, epoch))``). Writes the
    loss curve, the last epoch's confusion / per-class IoU / contact sheet and
    ``linear_probe.npz`` (last and best head weights).

    With ``crf`` the last epoch's head scores val a second time, its class probabilities (softmax
    of the logits upsampled to the label) post-processed by the dense CRF on the image
    (``crf_params``, default the reference's; the paper's "linear + CRF" column): metrics
    ``crf`` (``miou``, ``per_class_iou``, ``pixel_accuracy``, ``params``, ``seconds_per_image``,
    ``n_images``, and ``n_skipped`` / ``skipped``: the val images that could not be read for it)
    and ``miou_crf``, and the ``linear_crf_*`` pictures.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tr_store, va_store = open_store(train_store), open_store(val_store)
    names = class_names(dataset)
    c_train, h_feat, w_feat = require_features(tr_store, "linear")
    c_val = require_features(va_store, "linear")[0]
    if c_train != c_val:
        raise ProtocolError(f"linear: the train features {tr_store.directory} have {c_train} channels but the val "
                            f"features {va_store.directory} have {c_val}: extract both splits with the same model")
    train_ids, val_ids = list(train_ids), list(val_ids)
    require_labels(dataset, train_ids, train_split, "linear")
    require_labels(dataset, val_ids, val_split, "linear")
    # here, after the checks: importing torch takes seconds
    from stages.evaluate.linear import linear_confusion, predict_linear, train_linear_probe
    from stages.network.runtime import resolve_device

    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ProtocolError(f"linear: {e}") from None
    skipped: dict[str, str] = {}

    def usable(store: EmbeddingStore, ids: list[str], split: str) -> tuple[list[str], dict[str, tuple[int, int]]]:
        t = store.table()
        shapes = {i: (int(h), int(w)) for i, h, w in zip(t["id"], t["height"], t["width"])}
        for i in ids:
            if i not in shapes:
                skipped[f"{split}/{i}"] = "no embedding (extract could not read the image)"
        return [i for i in ids if i in shapes], shapes

    train_ids, train_shapes = usable(tr_store, train_ids, train_split)
    val_ids, val_shapes = usable(va_store, val_ids, val_split)
    # Every epoch reads every train and val image: keep the decoded features and labels in memory
    # when they fit in LINEAR_CACHE_BYTES (a few hundred MB up to thousands of images), else
    # stream them from the store each epoch (memory then stays flat whatever the dataset size).
    footprint = sum(h * w + 2 * c_train * h_feat * w_feat for shapes in (train_shapes, val_shapes)
                    for h, w in shapes.values())
    cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] | None = {} if footprint <= LINEAR_CACHE_BYTES else None

    def stream(store: EmbeddingStore, ids: Sequence[str], shapes: Mapping[str, tuple[int, int]],
               split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for id_ in ids:
            if cache is not None and (split, id_) in cache:
                yield cache[split, id_]
                continue
            try:
                label = load_label(dataset.sample(id_).label, shapes[id_])
            except BadInputError as exc:
                skipped[f"{split}/{id_}"] = str(exc)
                continue
            item = (store.features(id_), label)  # (C, f, f) float16, (H, W) uint8
            if cache is not None:
                cache[split, id_] = item
            yield item

    def train_iter(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        order = np.random.default_rng((seed, epoch)).permutation(len(train_ids))
        return stream(tr_store, [train_ids[i] for i in order], train_shapes, train_split)

    def val_iter() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return stream(va_store, val_ids, val_shapes, val_split)

    bar = tqdm(total=epochs, desc="linear probe", unit="epoch", disable=not progress)

    def on_epoch(log) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{log.train_loss:.4f}", val_miou=f"{log.val_miou:.2f}")

    try:
        result = train_linear_probe(train_iter, len(names), in_dim=c_train, epochs=epochs, lr=lr, momentum=momentum,
                                    weight_decay=weight_decay, batch_size=batch_size, lr_drop_epoch=lr_drop_epoch,
                                    seed=seed, device=dev, val_iter_fn=val_iter,
                                    on_epoch_end=on_epoch, ignore_index=dataset.ignore_index)
    except ValueError as exc:  # LinearProbeError, or a label value outside the classes
        raise ProtocolError(f"linear probe on {tr_store.directory}: {exc}") from None
    finally:
        bar.close()
    head = result.head.eval()
    conf = linear_confusion(head, val_iter(), len(names), dataset.ignore_index)  # last epoch, (n_cls, n_cls)
    scores = segmentation_scores(conf)

    def predict(id_: str, label: np.ndarray) -> np.ndarray:
        return predict_linear(head, va_store.features(id_), label.shape).astype(np.uint8)

    with atomic_path(out_dir / "linear_probe.npz", suffix=".npz") as tmp:
        best = result.best_state or {}
        np.savez(tmp, weight=head.weight.detach().cpu().numpy(), bias=head.bias.detach().cpu().numpy(),
                 best_weight=best["weight"].numpy() if best else np.zeros(0, np.float32),
                 best_bias=best["bias"].numpy() if best else np.zeros(0, np.float32),
                 class_names=np.array(names))

    sheet_ids = pick(val_ids, sheet_size)
    crf_out = None  # (metrics block, confusion, sheet class maps) of the CRF pass
    if crf:  # after the head is saved: this pass takes about 2 s an image on a CPU core
        scored = [i for i in val_ids if f"{val_split}/{i}" not in skipped]
        crf_out = _linear_crf_pass(
            head, ((id_, *item) for id_ in scored for item in stream(va_store, [id_], val_shapes, val_split)),
            dataset, names, CRFParams() if crf_params is None else crf_params, set(sheet_ids), val_split, progress,
            total=len(scored))

    per_class = per_class_dict(names, 100.0 * scores.per_class_iou)
    pictures: dict[str, str] = {}
    if figures:
        loss_curve_png([h.train_loss for h in result.history], out_dir / "linear_loss.png",
                       val_miou=[h.val_miou for h in result.history], ylabel="training loss (CE per pixel)",
                       title="linear probe")
        pictures = {"linear probe: training loss and val mIoU": "linear_loss.png",
                    **protocol_figures(out_dir, "linear", "linear probe (last epoch)", names, conf, per_class,
                                       dataset, sheet_ids, predict)}
        if crf_out is not None and crf_out[0]["n_images"]:
            block, crf_conf, crf_preds = crf_out
            pictures.update(protocol_figures(out_dir, "linear_crf", "linear probe + CRF (last epoch)", names,
                                             crf_conf, block["per_class_iou"], dataset,
                                             [i for i in sheet_ids if i in crf_preds], lambda i, _: crf_preds[i]))
    m = result.metrics()
    best_pc = m.get("per_class_iou_best_on_val")
    metrics: dict[str, Any] = {
        "miou": 100.0 * scores.miou, "miou_std": 0.0, "per_class_iou": per_class,
        "pixel_accuracy": 100.0 * scores.pixel_accuracy, "seeds": [int(seed)], "classes": names,
        "miou_best_on_val": m["miou_best_on_val"], "best_epoch": m["best_epoch"],
        "per_class_iou_best_on_val": per_class_dict(names, best_pc) if best_pc else None,
        "note": "miou: last epoch; miou_best_on_val: the epoch with the best val mIoU (val chooses the epoch)",
        "epochs": epochs, "history": m["history"],
        "n_train_images": sum(f"{train_split}/{i}" not in skipped for i in train_ids),
        "n_images": sum(f"{val_split}/{i}" not in skipped for i in val_ids),
        "device": str(head.weight.device), "figures": pictures, "head_file": "linear_probe.npz",
    }
    if crf_out is not None:
        metrics.update(crf=crf_out[0], miou_crf=crf_out[0]["miou"])
    metrics.update(skipped_metrics(skipped))
    return metrics
