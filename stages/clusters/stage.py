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

Embeddings with several proposals per image (schema version 2: a version-2 mask artifact, or the
saliency head's mask split into components) are clustered proposal by proposal, as the K-means
protocol labels them: each proposal gets its own cluster, the assignments list one row per
proposal, a contact sheet shows proposals (each cropped around its box), and an image's
segmentation paints each proposal's pixels with its cluster's class (the first proposal where two
overlap). Version-1 embeddings give one row per image, as before.

Files (``out_dir``):

- ``assignments.csv``: ``id, cluster, name, distance, valid, salient_fraction`` per image (store
  order); ``cluster`` counts from 0 (-1: no salient region); ``distance`` is to the centroid in
  the whitened space. Per proposal (version 2): ``id, proposal, cluster, ...`` per proposal
  (``proposal`` its index in the image, from 0; -1 for an image without any), and
  ``salient_fraction`` the proposal's share of the image;
- ``kmeans_model.json``: the clustering in the evaluate report's format (``segment`` reads it);
  predicted id ``c + 1`` is cluster ``c``, mapped to a class of ``class_names`` (``background``,
  then one class per name, or ``cluster c`` for unnamed clusters);
- ``sheets/cluster-NN.png``: per cluster the ``sheet_size`` valid images (proposals) nearest its
  centroid;
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
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from artifacts.atomic import atomic_path, atomic_write_json, atomic_write_text
from artifacts.embeddings import EmbeddingStore
from stages.clusters.params import K_MIN, ClusterParams
from stages.data import BadInputError, Sample, load_image
from stages.evaluate.figures import cluster_sizes_png, k_selection_png
from stages.evaluate.kmeans import KMeansError, KMeansProtocol, assign, choose_k, fit_discriminant
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


def write_legend(class_names: Sequence[str], path: Path, sizes: Mapping[str, int] | None = None,
                 unit: str = "images") -> Path:
    """One row per class: its index, colour (VOC palette, as in the class-index PNGs) and name, and
    its count of ``unit`` when ``sizes`` gives one."""
    sizes = sizes or {}
    pal = _colours(len(class_names))
    row = 20
    im = Image.new("RGB", (300, 8 + row * len(class_names)), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    for i, name in enumerate(class_names):
        y = 4 + i * row
        draw.rectangle([6, y + 2, 26, y + 16], fill=tuple(int(v) for v in pal[i]), outline=(0, 0, 0))
        extra = f"  ({sizes[name]} {unit})" if name in sizes else ""
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


def _write_csv(path: Path, rows: Sequence[Sequence[Any]], proposals: bool = False) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["id", *(["proposal"] if proposals else []), "cluster", "name", "distance", "valid",
                     "salient_fraction"])
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


@dataclass
class _Regions:
    """What the stage clusters, one row per region: an image's salient region (version-1
    embeddings) or each of its proposals (version 2, :meth:`EmbeddingStore.regions`)."""

    ids: list[str]                 # the images, store order
    counts: np.ndarray             # int64 (n,): rows per image
    prototypes: np.ndarray         # float32 (R, D)
    valid: np.ndarray              # bool (R,)
    proposal: np.ndarray | None    # int64 (R,): the row's proposal in its image (-1: the image has none); None: version 1

    @cached_property
    def image(self) -> np.ndarray:
        """int64 (R,): each row's image (index into ``ids``)."""
        return np.repeat(np.arange(len(self.ids)), self.counts)

    @property
    def unit(self) -> str:
        """What one row is, for titles and messages."""
        return "images" if self.proposal is None else "proposals"

    def label(self, row: int) -> str:
        """The row's name on pictures: ``id`` (version 1) or ``id#k`` (proposal k)."""
        id_ = self.ids[int(self.image[row])]
        return id_ if self.proposal is None else f"{id_}#{int(self.proposal[row])}"


def _regions(store: EmbeddingStore, wanted: Mapping[str, Any]) -> _Regions:
    """The store's regions of the images in ``wanted``, store order."""
    if store.has_proposals:
        ids, counts, protos, valid = store.regions()
        stored = store.proposal_counts()
        proposal = np.concatenate([np.arange(c) if s else np.full(1, -1) for c, s in zip(counts, stored)]
                                  ).astype(np.int64) if len(ids) else np.zeros(0, np.int64)
    else:
        ids, protos, valid = store.prototypes()
        counts, proposal = np.ones(len(ids), np.int64), None
    keep = np.array([i in wanted for i in ids], dtype=bool)
    rows = np.repeat(keep, counts)
    return _Regions([i for i, k in zip(ids, keep) if k], counts[keep], protos[rows], valid[rows],
                    None if proposal is None else proposal[rows])


def _proposal_tile(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], margin: float = 0.5,
                   least: int = 24) -> np.ndarray:
    """One proposal on a contact sheet: the image cropped to the proposal's bounding box grown by
    ``margin`` of its size on each side (at least ``least`` pixels a side, within the image), the
    proposal tinted and outlined in ``color``."""
    ys, xs = np.nonzero(mask)
    if not ys.size:
        return overlay_mask(image, mask, color=color)
    h, w = mask.shape
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    gy = max(int(round(margin * (y1 - y0))), (least - (y1 - y0) + 1) // 2, 0)
    gx = max(int(round(margin * (x1 - x0))), (least - (x1 - x0) + 1) // 2, 0)
    y0, y1, x0, x1 = max(0, y0 - gy), min(h, y1 + gy), max(0, x0 - gx), min(w, x1 + gx)
    return overlay_mask(np.ascontiguousarray(image[y0:y1, x0:x1]), mask[y0:y1, x0:x1], color=color)


def _paint_regions(masks: Sequence[np.ndarray], classes: Sequence[int]) -> np.ndarray:
    """uint8 class map: each region's pixels its class, 0 elsewhere; where regions overlap the
    first one wins (as the evaluate protocols paint)."""
    out = np.zeros(masks[0].shape, np.uint8)
    for mask, cls in reversed(list(zip(masks, classes))):
        out[mask] = cls
    return out


def _masks_in_store_order(store: EmbeddingStore, wanted: Mapping[str, int], per_proposal: bool):
    """(id, salient mask) of the images in ``wanted``, store order; per proposal, the mask is None
    (the proposals' masks are read where they are painted)."""
    if per_proposal:
        for id_ in store.ids():
            if id_ in wanted:
                yield id_, None
        return
    for rec in store.iter():
        if rec.id in wanted:
            yield rec.id, rec.mask


def make_clusters(store_dir: str | os.PathLike, samples: Sequence[Sample], out_dir: str | os.PathLike,
                  params: ClusterParams = ClusterParams(), *, names: Mapping[int, str] | None = None,
                  use_gpu: bool = False, progress: bool = True,
                  on_image: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Cluster the prototypes of the embedding store ``store_dir`` (one split of an extract
    artifact) for the images ``samples`` (the split, for image paths and the skipped list) and
    write the artifact's files into ``out_dir``. ``names``: the clusters' names (the content of
    ``params.names``, read by :func:`read_names`). A store with several proposals per image
    (schema version 2) is clustered proposal by proposal. Returns the summary for the manifest."""
    from tqdm import tqdm

    store_dir, out = Path(store_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = EmbeddingStore(store_dir)
    by_id = {s.id: s for s in samples}
    regions = _regions(store, by_id)
    ids, protos, valid = regions.ids, regions.prototypes, regions.valid
    in_store = set(store.ids())
    extract_skipped = _extract_skipped(store_dir)
    skipped = {s.id: extract_skipped.get(s.id, "no embedding (extract could not read the image)")
               for s in samples if s.id not in in_store}
    n, n_rows, n_valid = len(ids), len(valid), int(valid.sum())
    per_proposal = regions.proposal is not None
    if n_valid < 2:
        what = f"{n_valid} valid proposal(s) in {n_rows}" if per_proposal else f"{n_valid} with a salient region"
        raise ClustersError(f"{store_dir}: {n} image(s) with an embedding, {what}: "
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
            what = "valid proposals" if per_proposal else "images with a salient region"
            raise ClustersError(f"{store_dir}: {k} clusters need at least {k} {what}; there are {n_valid}")
    protocol = KMeansProtocol(n_clusters=k, seeds=(params.seed,), pca_dim=pca_dim, n_init=params.n_init,
                              use_gpu=use_gpu)
    whitened_dim = pca.dim if pca is not None else None  # k and the over-clusters are chosen there
    n_groups = min(params.groups * k, n_valid - 1)
    discriminant = params.space == "discriminant" and n_groups >= 2  # else too few prototypes: PCA whitening
    if discriminant:
        try:
            pca = fit_discriminant(protos[valid], n_groups, reg=params.reg, pca_dim=pca_dim, seed=params.seed)
        except KMeansError as exc:
            raise ClustersError(f"{store_dir}: discriminant space: {exc}") from None
        z = pca.transform(protos[valid])
    fit = protocol.fit(z, params.seed)
    cluster = np.full(n_rows, -1, np.int64)  # -1: no salient region, not clustered
    cluster[valid] = fit.assignment
    dist = np.full(n_rows, np.nan)
    dist[valid] = np.linalg.norm(z - fit.centroids[fit.assignment], axis=1)
    mapping, class_names = apply_names(k, names)
    cluster_class = [class_names[mapping[c + 1]] for c in range(k)]
    sizes = np.bincount(fit.assignment, minlength=k)

    report_model = {"protocol": "object", "n_clusters": k, "pca": None if pca is None else pca.to_dict(),
                    "per_seed": [{"seed": int(params.seed), "centroids": fit.centroids.tolist(), "mapping": mapping}]}
    extra: dict[str, Any] = {"embedding_dim": int(protos.shape[1]), "source": "clusters",
                             "cluster_names": {str(c): n for c, n in sorted((names or {}).items())}}
    if per_proposal:
        extra["regions"] = "proposals"
    if selection is not None:
        extra["k_selection"] = selection._asdict()
    if discriminant:
        extra["space"] = "discriminant"
    atomic_write_json(out / KMEANS_MODEL_FILE, kmeans_model_dict(report_model, "object", class_names, store, extra))
    if per_proposal:  # each row's share of its image, from its proposal's mask
        fraction = np.concatenate([[float(r.mask.mean()) for r in store.read_regions(id_)] for id_ in ids])
        image = regions.image
        _write_csv(out / ASSIGNMENTS_FILE, [
            (ids[image[r]], int(regions.proposal[r]), int(c), cluster_class[c] if c >= 0 else "",
             f"{d:.6g}" if c >= 0 else "", int(v), f"{f:.6g}")
            for r, (c, d, v, f) in enumerate(zip(cluster, dist, valid, fraction))], proposals=True)
    else:
        table = store.table()
        salient = dict(zip(table["id"], table["salient_fraction"].tolist()))
        _write_csv(out / ASSIGNMENTS_FILE, [
            (id_, int(c), cluster_class[c] if c >= 0 else "", f"{d:.6g}" if c >= 0 else "", int(v),
             f"{salient.get(id_, 0.0):.6g}") for id_, c, d, v in zip(ids, cluster, dist, valid)])

    # pictures a person looks at: sizes, legend, the k curve, one contact sheet per cluster
    unit = regions.unit
    pal = _colours(len(class_names))
    cluster_sizes_png(sizes, [f"{c}: {cluster_class[c]}" if names and c in names else str(c)
                              for c in range(k)],
                      pal[[mapping[c + 1] for c in range(k)]], out / "cluster_sizes.png",
                      title=(f"images per cluster (k = {k}, {n_valid} images with a salient region)" if not per_proposal
                             else f"proposals per cluster (k = {k}, {n_valid} proposals of {n} images)"))
    class_sizes: dict[str, int] = {}
    for c in range(k):
        class_sizes[cluster_class[c]] = class_sizes.get(cluster_class[c], 0) + int(sizes[c])
    write_legend(class_names, out / "legend.png", class_sizes, unit=unit)
    pictures = {f"{unit} per cluster": "cluster_sizes.png", "legend (class index, colour, name)": "legend.png"}
    if selection is not None:
        k_selection_png(selection.ks, selection.silhouette, selection.inertia, k, out / "k_selection.png",
                        title=f"k by silhouette over [{selection.ks[0]}, {selection.ks[-1]}]")
        pictures["choosing k (silhouette, inertia)"] = "k_selection.png"
    image_of = regions.image
    first_row = np.concatenate([[0], np.cumsum(regions.counts)[:-1]]).astype(np.int64)
    sheets = out / "sheets"
    for c in range(k):
        members = sorted(np.flatnonzero(cluster == c), key=lambda i: dist[i])
        tiles, captions = [], []
        colour = tuple(int(v) for v in pal[mapping[c + 1]])
        for i in members[:params.sheet_size]:
            id_ = ids[image_of[i]]
            try:
                image = load_image(by_id[id_].image)
            except BadInputError as exc:
                skipped[id_] = exc.reason
                continue
            if per_proposal:  # the proposal, cropped, on the sheet of its cluster
                mask = store.read_regions(id_)[i - first_row[image_of[i]]].mask
                tiles.append(_proposal_tile(image, mask, colour) if mask.shape == image.shape[:2] else image)
            else:
                mask = store.get(id_).mask
                tiles.append(overlay_mask(image, mask, color=colour) if mask.shape == image.shape[:2] else image)
            captions.append(f"{regions.label(i)} d={dist[i]:.2f}")
        path = sheets / f"cluster-{c:02d}.png"
        named = f": {cluster_class[c]}" if cluster_class[c] != f"cluster {c}" else ""
        title = f"cluster {c}{named}: {int(sizes[c])} {unit}, nearest the centroid first"
        if not tiles:
            tiles, captions = [np.full((32, 32, 3), 40, np.uint8)], ["no readable image"]
        rows = [tiles[j:j + SHEET_COLUMNS] for j in range(0, len(tiles), SHEET_COLUMNS)]
        caps = ["   ".join(captions[j:j + SHEET_COLUMNS]) for j in range(0, len(captions), SHEET_COLUMNS)]
        save_png(path, contact_sheet(rows, caps, tile=150, header=[title]))
    pictures.update({f"cluster {c} ({cluster_class[c]}): the {unit} nearest its centroid": f"sheets/cluster-{c:02d}.png"
                     for c in range(k)})

    # a segmentation of every image, streamed: one image, its mask(s) and its two PNGs at a time
    seg = out / "segmentations"
    seg.mkdir(exist_ok=True)
    row = {id_: i for i, id_ in enumerate(ids)}
    region_class = np.array([mapping[int(c) + 1] if c >= 0 else 0 for c in cluster], np.int64)
    n_written = 0
    bar = tqdm(total=n, desc="clusters: segmentations", unit="img", disable=not progress)
    for id_, image_mask in _masks_in_store_order(store, row, per_proposal):
        i = row[id_]
        label_path, overlay_path = seg / f"{id_}.png", seg / f"{id_}_overlay.png"
        if not (label_path.is_file() and overlay_path.is_file()):
            try:
                image = load_image(by_id[id_].image)
            except BadInputError as exc:
                skipped[id_] = exc.reason
                bar.update(1)
                continue
            if per_proposal:  # each proposal's pixels its cluster's class
                rows_i = slice(first_row[i], first_row[i] + regions.counts[i])
                classes = _paint_regions([r.mask for r in store.read_regions(id_)], region_class[rows_i].tolist())
            else:
                classes = np.where(image_mask, region_class[i], 0).astype(np.uint8)
            if classes.shape != image.shape[:2]:
                skipped[id_] = f"mask {classes.shape} and image {image.shape[:2]} sizes differ"
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
        "pca_dim": whitened_dim, "n_images": n, "n_valid": n_valid,
        "n_segmentations": n_written, "n_skipped": len(skipped), "cluster_sizes": sizes.tolist(),
        "class_names": class_names, "inertia": fit.inertia,
    }
    if per_proposal:  # n_valid counts proposals
        summary.update(regions="proposals", n_regions=n_rows)
    if params.space == "discriminant":
        summary.update(space="discriminant" if discriminant else "pca (too few prototypes for discriminant)",
                       groups=n_groups if discriminant else 0, space_dim=int(pca.dim) if pca is not None else None)
    if selection is not None:
        summary["silhouette"] = selection.silhouette[selection.ks.index(k)]
    notes = [whitening_note(n_valid, whitened_dim, "clusters.pca_dim")]
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
