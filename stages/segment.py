"""Segment new images with a trained model and a fitted clustering (the evaluate stage's K-means).

Per image, the same inference as ``extract`` (stages/extract/extract.py): resize to ``input_size``
square (aspect not kept; cv2 bicubic or bilinear, as the embeddings the clustering was fitted on),
ImageNet normalisation, the model in eval mode under ``torch.no_grad``. Then, with the clustering
file written by the evaluate stage:

- object protocol (``kmeans_model.json``): salient = raw saliency logit > 0.5; the image's
  prototype is computed as in extraction (``head_prototypes``, or ``backbone_prototypes`` when
  the clustering was fitted on backbone prototypes); PCA whitening, nearest centroid, the seed's
  matching -> one class for the salient pixels, 0 (background) elsewhere. An image without a
  salient pixel is all background. When the clustered embeddings held several proposals per
  image (their ``extract`` attrs name ``proposals``), the salient mask is split into its
  connected components as extraction splits it (``max_proposals``, ``min_proposal``; stored
  ``cuts`` are approximated by components, the model's map being all there is), each
  component gets its own prototype and class, and the image several regions.
- pixel protocol (``pixel_kmeans_model.json``): the decoder trunk resized to the stored feature
  grid as in extraction, each cell L2-normalised (when the clustering was), PCA, nearest
  centroid, matching -> a class per cell.

A cluster matched to no class (possible when clusters outnumber classes) is written as 255, the
"ignore" value (white in the VOC palette). The class map is resized to the image's own size with
nearest neighbour and written as ``<stem>.png`` (palette PNG of class indices, VOC colours) and
``<stem>_overlay.png`` (classes blended over the image). Unreadable images are skipped and
reported; memory holds one batch.
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from stages.data import BadInputError, load_image
from stages.evaluate.kmeans import PCAWhitening, apply_kmeans
from stages.extract import backbone_prototypes, head_prototypes, resize_features
from stages.extract.extract import INTERPOLATIONS, SALIENCY_THRESHOLD, component_labels, split_prototypes
from stages.network.runtime import normalize_images, resolve_amp, resolve_device
from stages.viz import overlay_labels, save_label_png, save_png

__all__ = ["UNMATCHED", "Clustering", "SegmentError", "load_clustering", "segment_images"]

UNMATCHED = 255  # written for a cluster matched to no class


class SegmentError(ValueError):
    """The clustering file or the arguments cannot be used to segment images."""


class Clustering:
    """One seed of a fitted clustering file: PCA, centroids and the matching to classes."""

    def __init__(self, path: Path, seed: int | None = None) -> None:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SegmentError(f"{path}: cannot read the clustering file ({exc})") from None
        if not isinstance(data, dict) or data.get("schema") != "maskcontrast/kmeans-model":
            raise SegmentError(f"{path}: not a clustering file written by the evaluate stage "
                               "(kmeans_model.json or pixel_kmeans_model.json)")
        self.path = Path(path)
        self.protocol: str = data["protocol"]
        if self.protocol not in ("object", "pixel"):
            raise SegmentError(f"{path}: unknown protocol {self.protocol!r}")
        per_seed = data["per_seed"]
        seeds = [int(s["seed"]) for s in per_seed]
        if seed is None:
            chosen = per_seed[0]
        elif seed in seeds:
            chosen = per_seed[seeds.index(seed)]
        else:
            raise SegmentError(f"{path}: no clustering for seed {seed}; it holds seeds {seeds}")
        self.seed = int(chosen["seed"])
        self.centroids = np.asarray(chosen["centroids"], np.float32)  # (k, d)
        self.mapping = np.asarray(chosen["mapping"], np.int64)  # predicted id -> class, -1: none
        self.pca = PCAWhitening.from_dict(data["pca"]) if data.get("pca") else None
        self.class_names: list[str] = list(data.get("class_names") or [])
        self.extract: dict[str, Any] = dict(data.get("extract") or {})
        self.normalize = bool(data.get("normalize", True))
        shape = data.get("feature_shape")
        self.feature_size = int(shape[-1]) if shape else int(self.extract.get("feature_size", 0)) or None
        self.in_dim = self.pca.mean.shape[0] if self.pca is not None else self.centroids.shape[1]
        self.source: str = str(data.get("source") or "evaluate")  # "clusters": fitted without labels

    def rename(self, names: dict[int, str]) -> None:
        """Name the clusters (``cluster id: name``, ids from 0) instead of the file's classes: clusters
        with one name form one class, unnamed ones are ``cluster c`` (stages.clusters.apply_names)."""
        from stages.clusters import NamesError, apply_names

        if self.protocol != "object":
            raise SegmentError(f"{self.path}: names apply to object clusterings, not {self.protocol!r} ones")
        try:
            mapping, self.class_names = apply_names(self.centroids.shape[0], names)
        except NamesError as exc:
            raise SegmentError(f"{self.path}: {exc}") from None
        self.mapping = np.asarray(mapping, np.int64)

    def classes(self, x: np.ndarray) -> np.ndarray:
        """Class (N,) of each row of x (N, D); -1 where the cluster was matched to no class."""
        if x.shape[1] != self.in_dim:
            raise SegmentError(f"{self.path}: the clustering was fitted on {self.in_dim}-d vectors but the model "
                               f"gives {x.shape[1]}-d ones: use the model the embeddings were extracted with")
        return apply_kmeans(x, self.pca, self.centroids, self.mapping, offset=1 if self.protocol == "object" else 0)


def load_clustering(path: str | os.PathLike, seed: int | None = None) -> Clustering:
    """Read a ``kmeans_model.json`` / ``pixel_kmeans_model.json``; ``seed`` None: its first seed."""
    return Clustering(Path(path), seed)


def _split_params(extract: dict[str, Any]):
    """The proposal parameters that split a salient mask as the clustered embeddings were, or None."""
    found = extract.get("proposals")
    if not isinstance(found, dict):
        return None
    from stages.masks.params import ProposalParams

    defaults = ProposalParams()
    return ProposalParams("components", int(found.get("max_proposals", defaults.max_proposals)),
                          float(found.get("min_proposal", defaults.min_proposal)))


def _predict(model: nn.Module, clustering: Clustering, images: torch.Tensor, embedding: str,
             amp: torch.dtype | None) -> np.ndarray:
    """Class maps (B, S, S) or (B, f, f) int64 of a batch of normalised images (B, 3, S, S)."""
    grids: list[torch.Tensor] = []
    hook = (model.backbone.register_forward_hook(lambda _m, _i, out: grids.append(out))
            if embedding == "backbone" and clustering.protocol == "object" else None)
    try:
        with torch.autocast(images.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
            emb, sal, trunk = model(images, return_features=True)  # B x D x S x S, B x 1 x S x S, B x 256 x h x w
    finally:
        if hook is not None:
            hook.remove()
    if clustering.protocol == "pixel":
        size = clustering.feature_size or trunk.shape[-1]
        feats = resize_features(trunk.float(), size)  # B x C x f x f
        b, c, fh, fw = feats.shape
        x = feats.permute(0, 2, 3, 1).reshape(-1, c).cpu().numpy()  # (B*f*f, C)
        if clustering.normalize:
            x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return clustering.classes(x).reshape(b, fh, fw)
    split = _split_params(clustering.extract)
    if split is not None:  # several regions per image
        salient = (sal[:, 0].float() > SALIENCY_THRESHOLD).cpu().numpy()  # B x S x S
        labels = np.stack([component_labels(m, split) for m in salient])  # B x S x S, 0: background
        weights = sal[:, 0].float() if embedding == "head" else None
        slots, valid = split_prototypes(emb, weights, labels, embedding, grids[0] if grids else None)
        b, n_slots, dim = slots.shape
        cls = clustering.classes(slots.reshape(-1, dim).cpu().numpy()).reshape(b, n_slots)
        cls = np.where(valid.cpu().numpy(), cls, 0)
        lut = np.concatenate([np.zeros((b, 1), np.int64), cls], axis=1)  # label 0 -> background
        return np.take_along_axis(lut, labels.reshape(b, -1).astype(np.int64), axis=1).reshape(labels.shape)
    if embedding == "backbone":
        salient = sal[:, 0].float() > SALIENCY_THRESHOLD
        protos, valid = backbone_prototypes(grids[0], salient)
    else:
        protos, valid, salient = head_prototypes(emb, sal)
    cls = clustering.classes(protos.cpu().numpy())  # (B,)
    cls = np.where(valid.cpu().numpy(), cls, 0)
    return np.where(salient.cpu().numpy(), cls[:, None, None], 0)  # (B, S, S)


def segment_images(model: nn.Module, kmeans_model_path: str | os.PathLike, image_paths: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, input_size: int | None = None, seed: int | None = None,
                   device: str = "auto", *, interpolation: str | None = None, batch_size: int = 4,
                   progress: bool = True, names: dict[int, str] | None = None) -> dict[str, Any]:
    """Segment ``image_paths`` into ``out_dir`` with ``model`` (a MaskContrastModel, or anything
    with its ``forward(x, return_features=True)``) and the clustering at ``kmeans_model_path``.

    ``input_size`` / ``interpolation``: default to those the clustered embeddings were extracted
    with (recorded in the clustering file), else 512 / bicubic. ``seed``: which seed's clustering
    (default the first). Returns a summary: counts, the seed, skipped images (path -> reason),
    pixel share per class and the class map file of every image.
    """
    from tqdm import tqdm

    clustering = load_clustering(kmeans_model_path, seed)
    if names is not None:
        clustering.rename(names)
    extract = clustering.extract
    size = int(input_size or extract.get("input_size") or 512)
    interp_name = interpolation or extract.get("interpolation") or "bicubic"
    if interp_name not in INTERPOLATIONS:
        raise SegmentError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interp_name!r}")
    embedding = extract.get("embedding", "head")
    if embedding == "backbone" and clustering.protocol == "object" and not isinstance(
            getattr(model, "backbone", None), nn.Module):
        raise SegmentError(f"{kmeans_model_path}: the clustering was fitted on backbone prototypes; the model "
                           "has no `backbone` submodule")
    paths = [Path(p) for p in image_paths]
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise SegmentError(f"two images share the output name {p.stem!r}: {stems[p.stem]} and {p}")
        stems[p.stem] = p
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    amp = resolve_amp("auto", dev)
    was_training = model.training
    model.to(dev, memory_format=torch.channels_last).eval()  # see normalize_images
    n_cls = max(len(clustering.class_names), int(clustering.mapping.max()) + 1, 1)
    pixels = np.zeros(256, dtype=np.int64)
    skipped: dict[str, str] = {}
    written: dict[str, str] = {}
    bar = tqdm(total=len(paths), desc="segment", unit="img", disable=not progress)
    try:
        for start in range(0, len(paths), batch_size):
            batch: list[tuple[Path, np.ndarray]] = []
            for p in paths[start:start + batch_size]:
                try:
                    batch.append((p, load_image(p)))  # H x W x 3 uint8
                except BadInputError as exc:
                    skipped[str(p)] = exc.reason
            if batch:
                resized = np.stack([cv2.resize(img, (size, size), interpolation=INTERPOLATIONS[interp_name])
                                    for _, img in batch]).transpose(0, 3, 1, 2)  # B x 3 x S x S
                x = normalize_images(torch.from_numpy(np.ascontiguousarray(resized)).to(dev))
                with torch.no_grad():
                    maps = _predict(model, clustering, x, embedding, amp)
                for (p, img), cls in zip(batch, maps):
                    h, w = img.shape[:2]
                    full = np.where(cls < 0, UNMATCHED, cls).astype(np.uint8)
                    full = cv2.resize(full, (w, h), interpolation=cv2.INTER_NEAREST)  # nearest, as extract
                    save_label_png(out / f"{p.stem}.png", full)
                    save_png(out / f"{p.stem}_overlay.png", overlay_labels(img, full))
                    pixels += np.bincount(full.ravel(), minlength=256)
                    written[str(p)] = f"{p.stem}.png"
            bar.update(len(paths[start:start + batch_size]))
    finally:
        bar.close()
        model.train(was_training)
    class_names = clustering.class_names or [str(i) for i in range(n_cls)]
    total = max(int(pixels.sum()), 1)
    share = {(class_names[c] if c < len(class_names) else ("unmatched" if c == UNMATCHED else str(c))):
             float(pixels[c] / total) for c in np.flatnonzero(pixels)}
    summary: dict[str, Any] = {
        "n_images": len(paths), "n_written": len(written), "n_skipped": len(skipped), "protocol": clustering.protocol,
        "seed": clustering.seed, "input_size": size, "interpolation": interp_name, "embedding": embedding,
        "class_pixel_share": share, "outputs": written,
    }
    if skipped:
        summary["skipped"] = skipped
    if _split_params(extract) is not None and clustering.protocol == "object":
        summary["regions"] = "connected components of the salient mask, a class each"
    if names is not None or clustering.source == "clusters":
        from stages.clusters import write_legend

        summary["legend"] = write_legend(class_names, out / "legend.png").name
    if extract.get("mask_source") == "masks" and clustering.protocol == "object":
        summary["note"] = ("the clustering was fitted on prototypes of the mask artifact's regions; new images "
                           "use the model's saliency head instead")
    return summary

