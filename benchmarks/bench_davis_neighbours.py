"""Who are an image's nearest neighbours on davis16-objects, and which space would K-means on the
train split choose? The readings behind issue 18's README paragraph, from extract artifacts.

For each extract artifact given (``STORE/extract/<version>``, made by ``bench_davis_pipeline.py``):

- neighbour structure of the train split's prototypes: the share of an image's k nearest
  neighbours (cosine) of its class and of its own video sequence (the id before the last ``_``),
  and of its class among the 4 nearest outside its own sequence;
- cosine quantiles of same-sequence and other-sequence pairs (can a threshold find near-duplicates?);
- with ``--groups G,...``: the near-duplicate groups of ``train.contrast.groups`` (the train
  stage's ``near_duplicate_groups`` of these prototypes, 3 seeds): their video purity and the share of
  same-video pairs that share a group;
- image-level K-means on a split's prototypes (PCA-whiten 32, k = 10 foreground classes, seeds
  1234-1238, Hungarian matching to each image's majority label class): a cheap proxy for choosing
  the clustered space (head or backbone) on the train split, printed for train and val.

    python benchmarks/bench_davis_neighbours.py STORE/extract/<version> [...] [--data PATH] [--groups 24,30]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.optimize import linear_sum_assignment

from artifacts.embeddings import EmbeddingStore
from stages.evaluate.kmeans import kmeans, pca_whiten

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", REPO.parent / "shared"))


def image_class(labels: Path, id_: str) -> int:
    """The majority foreground class of an image's label map (0 when it has none)."""
    lab = np.array(Image.open(labels / f"{id_}.png"))
    v = lab[(lab > 0) & (lab < 255)]
    return int(np.bincount(v).argmax()) if v.size else 0


def split_prototypes(extract: Path, split: str, labels: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit prototypes of the valid images, their classes and sequences."""
    ids, protos, valid = EmbeddingStore(extract / split).prototypes()
    ids = [i for i, v in zip(ids, valid) if v]
    p = protos[valid]
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    return p, np.array([image_class(labels, i) for i in ids]), np.array([i.rsplit("_", 1)[0] for i in ids])


def neighbour_structure(p: np.ndarray, cls: np.ndarray, seq: np.ndarray) -> str:
    sim = p @ p.T
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1)
    parts = [f"k{k}: class {np.mean(cls[order[:, :k]] == cls[:, None]):.2f} "
             f"sequence {np.mean(seq[order[:, :k]] == seq[:, None]):.2f}" for k in (1, 2, 4, 8)]
    same = seq[None, :] == seq[:, None]
    other = np.argsort(-np.where(same, -np.inf, sim), axis=1)[:, :4]
    parts.append(f"4 nearest of other sequences: class {np.mean(cls[other] == cls[:, None]):.2f}")
    off = ~np.eye(len(p), dtype=bool)
    q_same = np.quantile(sim[same & off], [0.05, 0.5])
    q_other = np.quantile(sim[~same], [0.5, 0.95])
    parts.append(f"cosine same-sequence q05/q50 {q_same[0]:.2f}/{q_same[1]:.2f}, "
                 f"other q50/q95 {q_other[0]:.2f}/{q_other[1]:.2f}")
    return "; ".join(parts)


def group_structure(p: np.ndarray, seq: np.ndarray, n_groups: int, seeds=(0, 1, 2)) -> str:
    """Video purity of ``near_duplicate_groups`` and the share of same-video pairs they keep together."""
    import torch

    from stages.train.neighbours import near_duplicate_groups

    same = (seq[:, None] == seq[None, :]) & ~np.eye(len(seq), dtype=bool)
    purity, kept = [], []
    for seed in seeds:
        g = near_duplicate_groups(torch.from_numpy(p), n_groups, seed).numpy()
        purity.append(sum(np.unique(seq[g == c], return_counts=True)[1].max() for c in np.unique(g)) / len(g))
        kept.append((same & (g[:, None] == g[None, :])).sum() / same.sum())
    return (f"{n_groups} groups: video purity {np.mean(purity):.2f} [{min(purity):.2f}-{max(purity):.2f}], "
            f"same-video pairs in one group {np.mean(kept):.2f} [{min(kept):.2f}-{max(kept):.2f}]")


def image_kmeans(p: np.ndarray, cls: np.ndarray, k: int = 10, seeds=range(1234, 1239)) -> tuple[float, float]:
    z, _ = pca_whiten(p, 32)
    scores = []
    for seed in seeds:
        assignment = kmeans(z, k, seed).assignment
        conf = np.zeros((k, int(cls.max()) + 1))
        np.add.at(conf, (assignment, cls), 1)
        rows, cols = linear_sum_assignment(-conf)
        scores.append(100 * conf[rows, cols].sum() / len(cls))
    return float(np.mean(scores)), float(np.std(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("extracts", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "davis16-objects")
    ap.add_argument("--groups", default="", help="near-duplicate group counts to read, comma-separated")
    args = ap.parse_args()
    labels = args.data / "labels"
    for extract in args.extracts:
        manifest = json.loads((extract / "manifest.json").read_text())
        name = f"{extract.name} ({manifest['params'].get('embedding')}, {manifest['inputs'].get('train')})"
        p, cls, seq = split_prototypes(extract, "train", labels)
        print(f"{name} train neighbours: {neighbour_structure(p, cls, seq)}")
        for g in filter(None, args.groups.split(",")):
            print(f"{name} train {group_structure(p, seq, int(g))}", flush=True)
        for split in ("train", "val"):
            p, cls, _ = split_prototypes(extract, split, labels)
            mean, std = image_kmeans(p, cls)
            print(f"{name} {split} image-level K-means: {mean:.1f} ± {std:.1f}")


if __name__ == "__main__":
    main()
