"""The clusters stage: K-means on the prototypes of an embedding artifact, with no labels anywhere.

What a person needs to turn unlabelled photos into named segmentations: each image's cluster,
one contact sheet per cluster (the images nearest its centroid, their masks outlined) to look at
and name it, a names file (``cluster id: name``) to apply the names, and a segmentation of every
image. The clustering is the evaluate stage's object-level K-means protocol, the same code
(:class:`stages.evaluate.kmeans.KMeansProtocol`: PCA whitening, k-means++ restarts, lowest
inertia kept), without the scoring: on the same prototypes, k and seed it makes the same
partition, so matched to labels afterwards it scores what the protocol scores.

``k`` is given, or chosen by :func:`stages.evaluate.kmeans.choose_k` (the highest mean silhouette
of the whitened prototypes over [2 (``K_MIN``), k_max]; the curve is drawn).

An image without a salient pixel (``valid`` false, a zero prototype) is left out of the
clustering: in the whitened space its zero prototype is an outlier that takes a cluster of its
own (the evaluate protocol clusters it, as the reference does; there its region is empty, so it
only costs a cluster). It is listed in ``assignments.csv`` with cluster -1 and is all background
in its segmentation. On the valid prototypes the stage and the protocol make the same partition.

Files (``out_dir``):

- ``assignments.csv``: ``id, cluster, name, distance, valid, salient_fraction`` per image (store
  order); ``cluster`` counts from 0 (-1: no salient region); ``distance`` is to the centroid in
  the whitened space;
- ``kmeans_model.json``: the clustering in the evaluate report's format (``segment`` reads it);
  predicted id ``c + 1`` is cluster ``c``, mapped to a class of ``class_names`` (``background``,
  then one class per name, or ``cluster c`` for unnamed clusters);
- ``sheets/cluster-NN.png``: per cluster the ``sheet_size`` valid images nearest its centroid;
- ``cluster_sizes.png``, ``legend.png``, ``k_selection.png`` (automatic k only);
- ``segmentations/<id>.png`` (palette PNG of class indices: 0 background, VOC colours) and
  ``segmentations/<id>_overlay.png`` for every image, streamed one image at a time; an image
  whose two files exist is not redrawn, so an interrupted stage continues;
- ``skipped.json``: images of the split that have no embedding (the extract stage's reason) or
  could not be read when drawn; ``report.md``.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from artifacts.atomic import atomic_path, atomic_write_json, atomic_write_text
from artifacts.embeddings import EmbeddingStore
from stages.clusters.params import K_MIN, ClusterParams
from stages.data import BadInputError, Sample, load_image
from stages.evaluate.figures import cluster_sizes_png, k_selection_png
from stages.evaluate.kmeans import KMeansError, KMeansProtocol, assign, choose_k
from stages.evaluate.protocols import KMEANS_MODEL_FILE, kmeans_model_dict, whitening_note
from stages.evaluate.report import write_report
from stages.viz import contact_sheet, overlay_labels, overlay_mask, save_label_png, save_png, voc_palette

__all__ = ["ClusterParams", "ClustersError", "NamesError", "apply_names", "make_clusters", "parse_names", "read_names",
           "write_legend"]

ASSIGNMENTS_FILE = "assignments.csv"
SKIPPED_FILE = "skipped.json"
SHEET_COLUMNS = 4
_NAME_LINE = re.compile(r"^\s*(-?\d+)\s*:\s*(.*?)\s*$")


class ClustersError(ValueError):
    """The embeddings or the parameters cannot be clustered."""


class NamesError(ClustersError):
    """A names file that cannot be read or does not fit the clustering."""


# ----------------------------------------------------------------------------- names


def parse_names(text: str, source: str = "names file") -> dict[int, str]:
    """``cluster id: name`` per line -> {id: name}. Blank lines and ``#`` comments are skipped; ids
    are the clusters' numbers (from 0, as on the contact sheets); an id may appear once; a name
    may be shared by several clusters (they then form one class)."""
    names: dict[int, str] = {}
    lines: dict[int, int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        m = _NAME_LINE.match(line)
        if m is None:
            raise NamesError(f"{source}, line {number}: expected 'cluster id: name', got {raw.strip()!r}")
        cid, name = int(m.group(1)), m.group(2)
        if cid < 0:
            raise NamesError(f"{source}, line {number}: cluster ids start at 0, got {cid}")
        if not name:
            raise NamesError(f"{source}, line {number}: cluster {cid} has an empty name")
        if name == "background":
            raise NamesError(f"{source}, line {number}: 'background' is the unsalient pixels' class; "
                             "choose another name")
        if cid in names:
            raise NamesError(f"{source}, line {number}: cluster {cid} is already named on line {lines[cid]}")
        names[cid], lines[cid] = name, number
    return names


def read_names(path: str | os.PathLike) -> dict[int, str]:
    """:func:`parse_names` of a file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise NamesError(f"{path}: cannot read the names file ({exc})") from None
    return parse_names(text, str(path))


def apply_names(k: int, names: Mapping[int, str] | None) -> tuple[list[int], list[str]]:
    """(mapping, class_names) of k clusters under ``names``: ``mapping[c + 1]`` is cluster c's class
    (``mapping[0] = 0``, the unsalient pixels), ``class_names[0] = "background"``; clusters with
    the same name share a class, unnamed ones are ``cluster c``."""
    names = dict(names or {})
    beyond = sorted(c for c in names if c >= k)
    if beyond:
        raise NamesError(f"the names file names cluster {beyond[0]}, but there are {k} clusters (0-{k - 1})")
    classes = ["background"]
    mapping = [0]
    for c in range(k):
        name = names.get(c, f"cluster {c}")
        if name not in classes:
            classes.append(name)
        mapping.append(classes.index(name))
    return mapping, classes


# ----------------------------------------------------------------------------- the stage


def default_pca_dim(n_images: int) -> int:
    return max(1, min(32, n_images // 6))


def _colours(n_classes: int) -> np.ndarray:
    return voc_palette()[:n_classes]


def write_legend(class_names: Sequence[str], path: Path, sizes: Mapping[str, int] | None = None) -> Path:
    """One row per class: its index, colour (VOC palette, as in the class-index PNGs) and name, and
    its image count when ``sizes`` gives one."""
    sizes = sizes or {}
    pal = _colours(len(class_names))
    row = 20
    im = Image.new("RGB", (300, 8 + row * len(class_names)), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for i, name in enumerate(class_names):
        y = 4 + i * row
        draw.rectangle([6, y + 2, 26, y + 16], fill=tuple(int(v) for v in pal[i]), outline=(0, 0, 0))
        extra = f"  ({sizes[name]} images)" if name in sizes else ""
        draw.text((34, y + 4), f"{i}  {name}{extra}", fill=(0, 0, 0))
    return save_png(path, np.asarray(im))


def _extract_skipped(store_dir: Path) -> dict[str, str]:
    path = store_dir / SKIPPED_FILE
    if not path.is_file():
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_csv(path: Path, rows: Sequence[Sequence[Any]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", "cluster", "name", "distance", "valid", "salient_fraction"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def make_clusters(store_dir: str | os.PathLike, samples: Sequence[Sample], out_dir: str | os.PathLike,
                  params: ClusterParams = ClusterParams(), *, names: Mapping[int, str] | None = None,
                  use_gpu: bool = False, progress: bool = True,
                  on_image: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Cluster the prototypes of the embedding store ``store_dir`` (one split of an extract
    artifact) for the images ``samples`` (the split, for image paths and the skipped list) and
    write the artifact's files into ``out_dir``. ``names``: the clusters' names (the content of
    ``params.names``, read by :func:`read_names`). Returns the summary for the manifest."""
    from tqdm import tqdm

    store_dir, out = Path(store_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = EmbeddingStore(store_dir)
    ids, protos, valid = store.prototypes()  # store order
    by_id = {s.id: s for s in samples}
    in_store = set(ids)
    extract_skipped = _extract_skipped(store_dir)
    skipped = {s.id: extract_skipped.get(s.id, "no embedding (extract could not read the image)")
               for s in samples if s.id not in in_store}
    keep = np.array([i in by_id for i in ids], dtype=bool)
    ids = [i for i, k in zip(ids, keep) if k]
    protos, valid = protos[keep], valid[keep]
    n, n_valid = len(ids), int(valid.sum())
    if n_valid < 2:
        raise ClustersError(f"{store_dir}: {n} image(s) with an embedding, {n_valid} with a salient region: "
                            "clustering needs at least 2 salient regions")

    pca_dim = params.pca_dim if params.pca_dim is not None else default_pca_dim(n_valid)
    try:
        z, pca = KMeansProtocol(pca_dim=pca_dim).whiten(protos[valid])  # the protocol's clustering space
    except KMeansError as exc:
        raise ClustersError(f"{store_dir}: {exc}") from None
    selection = None
    if params.k == "auto":
        try:
            selection = choose_k(z, K_MIN, params.k_max, params.seed, params.n_init, use_gpu=use_gpu)
        except KMeansError as exc:
            raise ClustersError(f"{store_dir}: automatic k: {exc}") from None
        k = selection.k
    else:
        k = int(params.k)
        if k > n_valid:
            raise ClustersError(f"{store_dir}: {k} clusters need at least {k} images with a salient region; "
                                f"there are {n_valid}")
    protocol = KMeansProtocol(n_clusters=k, seeds=(params.seed,), pca_dim=pca_dim, n_init=params.n_init,
                              use_gpu=use_gpu)
    fit = protocol.fit(z, params.seed)
    cluster = np.full(n, -1, np.int64)  # -1: no salient region, not clustered
    cluster[valid] = fit.assignment
    dist = np.full(n, np.nan)
    dist[valid] = np.linalg.norm(z - fit.centroids[fit.assignment], axis=1)
    mapping, class_names = apply_names(k, names)
    cluster_class = [class_names[mapping[c + 1]] for c in range(k)]
    sizes = np.bincount(fit.assignment, minlength=k)

    report_model = {"protocol": "object", "n_clusters": k, "pca": None if pca is None else pca.to_dict(),
                    "per_seed": [{"seed": int(params.seed), "centroids": fit.centroids.tolist(), "mapping": mapping}]}
    extra: dict[str, Any] = {"embedding_dim": int(protos.shape[1]), "source": "clusters",
                             "cluster_names": {str(c): n for c, n in sorted((names or {}).items())}}
    if selection is not None:
        extra["k_selection"] = selection._asdict()
    atomic_write_json(out / KMEANS_MODEL_FILE, kmeans_model_dict(report_model, "object", class_names, store, extra))
    table = store.table()
    salient = dict(zip(table["id"], table["salient_fraction"].tolist()))
    _write_csv(out / ASSIGNMENTS_FILE, [
        (id_, int(c), cluster_class[c] if c >= 0 else "", f"{d:.6g}" if c >= 0 else "", int(v),
         f"{salient.get(id_, 0.0):.6g}") for id_, c, d, v in zip(ids, cluster, dist, valid)])

    # pictures a person looks at: sizes, legend, the k curve, one contact sheet per cluster
    pal = _colours(len(class_names))
    cluster_sizes_png(sizes, [f"{c}: {cluster_class[c]}" if names and c in names else str(c)
                              for c in range(k)],
                      pal[[mapping[c + 1] for c in range(k)]], out / "cluster_sizes.png",
                      title=f"images per cluster (k = {k}, {n_valid} images with a salient region)")
    class_sizes: dict[str, int] = {}
    for c in range(k):
        class_sizes[cluster_class[c]] = class_sizes.get(cluster_class[c], 0) + int(sizes[c])
    write_legend(class_names, out / "legend.png", class_sizes)
    pictures = {"images per cluster": "cluster_sizes.png", "legend (class index, colour, name)": "legend.png"}
    if selection is not None:
        k_selection_png(selection.ks, selection.silhouette, selection.inertia, k, out / "k_selection.png",
                        title=f"k by silhouette over [{selection.ks[0]}, {selection.ks[-1]}]")
        pictures["choosing k (silhouette, inertia)"] = "k_selection.png"
    row = {id_: i for i, id_ in enumerate(ids)}
    sheets = out / "sheets"
    for c in range(k):
        members = sorted(np.flatnonzero(cluster == c), key=lambda i: dist[i])
        tiles, captions = [], []
        for i in members[:params.sheet_size]:
            try:
                image = load_image(by_id[ids[i]].image)
            except BadInputError as exc:
                skipped[ids[i]] = exc.reason
                continue
            mask = store.get(ids[i]).mask
            tiles.append(overlay_mask(image, mask, color=tuple(int(v) for v in pal[mapping[c + 1]]))
                         if mask.shape == image.shape[:2] else image)
            captions.append(f"{ids[i]} d={dist[i]:.2f}")
        path = sheets / f"cluster-{c:02d}.png"
        named = f": {cluster_class[c]}" if cluster_class[c] != f"cluster {c}" else ""
        title = f"cluster {c}{named}: {int(sizes[c])} images, nearest the centroid first"
        if not tiles:
            tiles, captions = [np.full((32, 32, 3), 40, np.uint8)], ["no readable image"]
        rows = [tiles[j:j + SHEET_COLUMNS] for j in range(0, len(tiles), SHEET_COLUMNS)]
        caps = ["   ".join(captions[j:j + SHEET_COLUMNS]) for j in range(0, len(captions), SHEET_COLUMNS)]
        save_png(path, contact_sheet(rows, caps, tile=150, header=[title]))
    pictures.update({f"cluster {c} ({cluster_class[c]}): the images nearest its centroid": f"sheets/cluster-{c:02d}.png"
                     for c in range(k)})

    # a segmentation of every image, streamed: one image, its mask and its two PNGs at a time
    seg = out / "segmentations"
    seg.mkdir(exist_ok=True)
    n_written = 0
    bar = tqdm(total=n, desc="clusters: segmentations", unit="img", disable=not progress)
    for rec in store.iter():
        if rec.id not in row:
            continue
        i = row[rec.id]
        label_path, overlay_path = seg / f"{rec.id}.png", seg / f"{rec.id}_overlay.png"
        if not (label_path.is_file() and overlay_path.is_file()):
            try:
                image = load_image(by_id[rec.id].image)
            except BadInputError as exc:
                skipped[rec.id] = exc.reason
                bar.update(1)
                continue
            cls = mapping[int(cluster[i]) + 1] if cluster[i] >= 0 else 0
            classes = np.where(rec.mask, cls, 0).astype(np.uint8)
            if classes.shape != image.shape[:2]:
                skipped[rec.id] = f"mask {classes.shape} and image {image.shape[:2]} sizes differ"
                bar.update(1)
                continue
            save_label_png(label_path, classes)
            save_png(overlay_path, overlay_labels(image, classes), optimize=False)
        n_written += 1
        bar.update(1)
        if on_image is not None:
            on_image(n_written, n)
    bar.close()
    atomic_write_json(out / SKIPPED_FILE, dict(sorted(skipped.items())))

    summary: dict[str, Any] = {
        "k": k, "k_rule": "given" if selection is None else "silhouette", "seed": int(params.seed),
        "pca_dim": int(pca.dim) if pca is not None else None, "n_images": n, "n_valid": n_valid,
        "n_segmentations": n_written, "n_skipped": len(skipped), "cluster_sizes": sizes.tolist(),
        "class_names": class_names, "inertia": fit.inertia,
    }
    if selection is not None:
        summary["silhouette"] = selection.silhouette[selection.ks.index(k)]
    notes = [whitening_note(n_valid, pca.dim if pca is not None else None, "clusters.pca_dim")]
    if selection is not None and k == selection.ks[-1] and len(selection.ks) > 1:
        notes.append(f"the silhouette is highest at the largest k tried ({k}): raise clusters.k_max to see "
                     "whether it peaks further on (near-duplicate images, such as video frames, form clusters "
                     "of their own)")
    notes = [n for n in notes if n]
    if notes:
        summary["note"] = "; ".join(notes)
    if skipped:
        summary["skipped_examples"] = dict(list(sorted(skipped.items()))[:20])
    context = {"embeddings": str(store_dir), "assignments": ASSIGNMENTS_FILE, "model file": KMEANS_MODEL_FILE,
               "segmentations": "segmentations/<id>.png and <id>_overlay.png"}
    shown = {key: v for key, v in summary.items() if not isinstance(v, (list, dict))}
    write_report(out, "MaskContrast clusters (no labels)", {"clusters": shown}, context, pictures)
    return summary
