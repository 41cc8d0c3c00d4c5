"""K-means and retrieval on embeddings with several proposals per image (schema version 2):
each proposal is a region with its own cluster or neighbour, and the prediction paints each
region's pixels. Scores are checked against an independent pixel pass on the labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts.embeddings import EmbeddingRecord, EmbeddingStore, ProposalEmbedding, shard_name, write_embedding_shard
from stages.data import DatasetIndex
from stages.evaluate.metrics import SalientClassCounts, confusion_matrix, segmentation_scores
from stages.evaluate.protocols import class_counts, colour_descriptors, run_kmeans, run_retrieval
from stages.evaluate.protocols.counts import paint

CLASSES = ["background", "alpha", "beta", "gamma"]
N_CLS, D = len(CLASSES), 8


class PlantedPairs:
    """Images 16 x 24 with two objects of different classes (left and right); each object is a
    proposal carrying its class's planted prototype (version 2), or, in the version-1 store, the
    image's one prototype is its left object's class over the union of both."""

    def __init__(self, root: Path, n_train: int = 9, n_val: int = 12) -> None:
        rng = np.random.default_rng(0)
        self.root = root / "data"
        for sub in ("images", "labels", "splits"):
            (self.root / sub).mkdir(parents=True)
        (self.root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        centres = rng.normal(size=(N_CLS, D))
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        self.labels, self.objects, self.stores, self.plain = {}, {}, {}, {}
        for split, n in (("train", n_train), ("val", n_val)):
            ids = [f"{split}{i:02d}" for i in range(n)]
            (self.root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
            v2, v1 = [], []
            for i, id_ in enumerate(ids):
                a, b = 1 + i % 3, 1 + (i + 1) % 3
                label = np.zeros((16, 24), np.uint8)
                left, right = np.zeros_like(label, bool), np.zeros_like(label, bool)
                left[4:12, 2:9], right[3:13, 13:22] = True, True
                label[left], label[right] = a, b
                label[0] = 255
                Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(self.root / "images" / f"{id_}.png")
                Image.fromarray(label).save(self.root / "labels" / f"{id_}.png")
                self.labels[id_], self.objects[id_] = label, [(left, a), (right, b)]
                union = left | right
                props = [ProposalEmbedding(left, self.centres[a].copy(), True),
                         ProposalEmbedding(right, self.centres[b].copy(), True)]
                v2.append(EmbeddingRecord(id_, union, self.centres[a].copy(), True, proposals=props))
                v1.append(EmbeddingRecord(id_, union, self.centres[a].copy(), True))
            for name, records, out in (("v2", v2, self.stores), ("v1", v1, self.plain)):
                store = root / f"{name}-{split}"
                write_embedding_shard(store / shard_name(0), records[:5], {"extract": {"input_size": 32}})
                write_embedding_shard(store / shard_name(1), records[5:], {"extract": {"input_size": 32}})
                out[split] = store
        self.dataset = DatasetIndex.open(self.root)

    def score(self, regions: dict[str, list[tuple[np.ndarray, int]]]) -> tuple[float, float]:
        conf = np.zeros((N_CLS, N_CLS), np.int64)
        for id_, painted in regions.items():
            pred = np.zeros(self.labels[id_].shape, np.int64)
            for mask, cls in painted:
                pred[mask] = cls
            conf += confusion_matrix(pred, self.labels[id_], N_CLS, N_CLS)
        s = segmentation_scores(conf)
        return 100 * s.miou, 100 * s.pixel_accuracy


@pytest.fixture
def pairs(tmp_path) -> PlantedPairs:
    return PlantedPairs(tmp_path)


def test_region_counts_sum_to_the_pixel_pass(pairs):
    val = pairs.dataset.ids("val")
    sc = class_counts(pairs.stores["val"], pairs.dataset, val, progress=False)
    assert sc.regions == [2] * len(val) and len(sc.counts) == 2 * len(val) and sc.row_ids[:2] == [val[0]] * 2
    # predicting each region's true class gives the exact confusion of the pixel pass
    truth = np.array([c for i in sc.ids for _, c in pairs.objects[i]])
    assert (sc.counts.class_confusion(truth) == sum(
        confusion_matrix(np.select([m for m, _ in pairs.objects[i]], [c for _, c in pairs.objects[i]], 0),
                         pairs.labels[i], N_CLS, N_CLS) for i in sc.ids)).all()
    one = SalientClassCounts(N_CLS)
    assert (one.update_regions([pairs.objects[val[0]][0][0]], pairs.labels[val[0]])
            == SalientClassCounts(N_CLS).update(pairs.objects[val[0]][0][0], pairs.labels[val[0]])[None]).all()


def test_kmeans_paints_each_proposal_with_its_cluster(pairs, tmp_path):
    val = pairs.dataset.ids("val")
    m = run_kmeans(pairs.stores["val"], pairs.dataset, val, tmp_path / "v2", seeds=(1, 2), pca_dim=None,
                   progress=False)
    truth = {i: pairs.objects[i] for i in val}
    miou, acc = pairs.score(truth)
    assert m["miou"] == pytest.approx(miou) == pytest.approx(100.0) and m["pixel_accuracy"] == pytest.approx(acc)
    assert m["n_regions"] == 2 * len(val) and m["n_images"] == len(val)
    one = run_kmeans(pairs.plain["val"], pairs.dataset, val, tmp_path / "v1", seeds=(1, 2), pca_dim=None,
                     progress=False)
    assert one["miou"] < 70 and "n_regions" not in one  # one cluster per image cannot tell the pair apart
    assert "kmeans_sheet.png" in m["figures"].values()


def test_painting_follows_the_regions(pairs):
    val = pairs.dataset.ids("val")
    store = EmbeddingStore(pairs.stores["val"])
    sc = class_counts(store, pairs.dataset, val, progress=False)
    values = np.arange(len(sc.counts)) + 1
    for n, id_ in enumerate(val[:3]):
        painted = paint(store, sc, id_, values)
        (left, _), (right, _) = pairs.objects[id_]
        assert (painted[left] == 2 * n + 1).all() and (painted[right] == 2 * n + 2).all()
        assert (painted[~(left | right)] == 0).all()
    assert colour_descriptors(store, pairs.dataset, sc).shape == (len(sc.counts), 64)


def test_retrieval_gives_each_proposal_its_neighbours_class(pairs, tmp_path):
    m = run_retrieval(pairs.stores["train"], pairs.stores["val"], pairs.dataset, pairs.dataset.ids("train"),
                      pairs.dataset.ids("val"), tmp_path / "r", progress=False)
    miou, acc = pairs.score({i: pairs.objects[i] for i in pairs.dataset.ids("val")})
    assert m["miou"] == pytest.approx(miou) and m["pixel_accuracy"] == pytest.approx(acc)
    assert m["n_bank"] == 2 * 9 and m["n_regions"] == 2 * 12
