"""The clusters stage on a hand-written embedding store: planted prototypes, images on disk, no labels."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts.embeddings import EmbeddingRecord, write_embedding_shard
from stages.clusters import (
    ClusterParams,
    ClustersError,
    NamesError,
    apply_names,
    default_pca_dim,
    make_clusters,
    parse_names,
    read_names,
)
from stages.data import Sample
from stages.evaluate.kmeans import KMeansProtocol
from stages.segment import load_clustering

GROUPS = 3


def _store(tmp_path: Path, n: int = 30, d: int = 8, seed: int = 0):
    """n images (three planted groups of prototypes) as files and as one embedding shard; image 0
    has no salient pixel (a zero prototype, valid False)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(GROUPS, d))
    groups = np.arange(n) % GROUPS
    samples, records = [], []
    for i, g in enumerate(groups):
        h, w = 20 + i % 3, 24
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), bool)
        mask[5:14, 6:18] = i != 0
        image[mask] = 200
        path = tmp_path / "photos" / f"im{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        samples.append(Sample(f"im{i:02d}", path, None))
        proto = centres[g] + 0.05 * rng.normal(size=d)
        proto = (proto / np.linalg.norm(proto)).astype(np.float32) if i else np.zeros(d, np.float32)
        records.append(EmbeddingRecord(f"im{i:02d}", mask, proto, valid=i != 0))
    store = tmp_path / "extract" / "all"
    store.mkdir(parents=True)
    write_embedding_shard(store / "emb-00000.h5", records,
                          attrs={"extract": {"input_size": 64, "interpolation": "bilinear", "embedding": "head"}})
    return store, samples, groups


# ----------------------------------------------------------------------------- names


def test_parse_names():
    text = "# what the sheets show\n0: dog\n\n 2 :  red car   # looked twice\n1: dog\n"
    assert parse_names(text) == {0: "dog", 2: "red car", 1: "dog"}
    assert parse_names("") == {}


@pytest.mark.parametrize("text, message", [
    ("0 dog\n", r"names.txt, line 1: expected 'cluster id: name', got '0 dog'"),
    ("cat: 0\n", r"line 1: expected 'cluster id: name'"),
    ("0: dog\n\n0: cat\n", r"line 3: cluster 0 is already named on line 1"),
    ("1:\n", r"line 1: cluster 1 has an empty name"),
    ("-1: sky\n", r"line 1: cluster ids start at 0, got -1"),
    ("3: background\n", r"'background' is the unsalient pixels' class"),
])
def test_parse_names_errors(text, message):
    with pytest.raises(NamesError, match=message):
        parse_names(text, "names.txt")


def test_read_names_file(tmp_path):
    (tmp_path / "names.txt").write_text("1: boat\n", encoding="utf-8")
    assert read_names(tmp_path / "names.txt") == {1: "boat"}
    with pytest.raises(NamesError, match="cannot read the names file"):
        read_names(tmp_path / "missing.txt")


def test_apply_names_shares_classes_and_checks_ids():
    mapping, classes = apply_names(4, {0: "dog", 2: "dog", 3: "car"})
    assert classes == ["background", "dog", "cluster 1", "car"]
    assert mapping == [0, 1, 2, 1, 3]  # predicted id c + 1 -> class
    assert apply_names(2, None) == ([0, 1, 2], ["background", "cluster 0", "cluster 1"])
    with pytest.raises(NamesError, match=r"names cluster 5, but there are 4 clusters \(0-3\)"):
        apply_names(4, {5: "sky"})


# ----------------------------------------------------------------------------- the stage


def test_auto_k_every_picture_and_the_model_file(tmp_path):
    store, samples, groups = _store(tmp_path)
    (samples[7].image).write_bytes(b"truncated")  # unreadable when its pictures are drawn
    missing = Sample("gone", tmp_path / "photos" / "gone.png", None)  # extract could not read it
    (store / "skipped.json").write_text(json.dumps({"gone": "not an image file"}))
    out = tmp_path / "clusters"
    summary = make_clusters(store, [*samples, missing], out, ClusterParams(k_max=6, pca_dim=2, seed=5),
                            progress=False)

    assert summary["k"] == GROUPS and summary["k_rule"] == "silhouette" and "note" not in summary
    assert summary["n_images"] == 30 and summary["n_valid"] == 29
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped.keys() == {"gone", "im07"} and skipped["gone"] == "not an image file"
    assert summary["n_skipped"] == 2 and summary["n_segmentations"] == 29

    rows = list(csv.DictReader((out / "assignments.csv").open()))
    assert [r["id"] for r in rows] == [s.id for s in samples]
    cluster = np.array([int(r["cluster"]) for r in rows])
    for g in range(GROUPS):  # the planted groups, recovered
        assert len(set(cluster[1:][groups[1:] == g])) == 1
    assert len(set(cluster[1:])) == GROUPS
    assert (rows[0]["valid"], rows[0]["cluster"], rows[0]["name"]) == ("0", "-1", "")  # no salient region
    assert rows[1]["name"] == f"cluster {cluster[1]}"

    # every picture: one sheet per cluster, sizes, legend, the k curve, two PNGs per readable image
    assert sorted(p.name for p in (out / "sheets").iterdir()) == [f"cluster-{c:02d}.png" for c in range(GROUPS)]
    for name in ("cluster_sizes.png", "legend.png", "k_selection.png", "report.md", "kmeans_model.json"):
        assert (out / name).stat().st_size > 100, name
    written = sorted(p.name for p in (out / "segmentations").iterdir())
    assert written == sorted(f"{s.id}{suffix}" for s in samples if s.id != "im07" for suffix in (".png", "_overlay.png"))
    seg = np.asarray(Image.open(out / "segmentations" / "im01.png"))
    assert seg.shape == (21, 24) and set(np.unique(seg)) == {0, cluster[1] + 1}
    assert not np.asarray(Image.open(out / "segmentations" / "im00.png")).any()  # no salient region

    # the model file is segment's: its clustering re-assigns the prototypes as the stage did
    clustering = load_clustering(out / "kmeans_model.json")
    assert clustering.source == "clusters" and clustering.class_names[0] == "background"
    ids_protos = [r for r in rows if r["valid"] == "1"]
    from artifacts.embeddings import EmbeddingStore

    es = EmbeddingStore(store)
    x = np.stack([es.get(r["id"]).prototype for r in ids_protos])
    np.testing.assert_array_equal(clustering.classes(x), [int(r["cluster"]) + 1 for r in ids_protos])
    model = json.loads((out / "kmeans_model.json").read_text())
    assert model["k_selection"]["k"] == GROUPS and model["k_selection"]["ks"] == [2, 3, 4, 5, 6]


def test_given_k_is_the_protocols_partition_and_names_apply(tmp_path):
    """One code path: the stage's partition is KMeansProtocol's on the same prototypes and seed."""
    store, samples, _ = _store(tmp_path, n=24)
    out = tmp_path / "clusters"
    summary = make_clusters(store, samples, out, ClusterParams(k=4, pca_dim=4, n_init=3, seed=9, space="pca"),
                            names={0: "left", 3: "left", 1: "right"}, progress=False)
    assert summary["k"] == 4 and summary["k_rule"] == "given" and not (out / "k_selection.png").exists()
    from artifacts.embeddings import EmbeddingStore

    _, protos, valid = EmbeddingStore(store).prototypes()
    protocol = KMeansProtocol(n_clusters=4, seeds=(9,), pca_dim=4, n_init=3)
    expected = protocol.fit(protocol.whiten(protos[valid])[0], 9).assignment
    rows = list(csv.DictReader((out / "assignments.csv").open()))
    np.testing.assert_array_equal([int(r["cluster"]) for r in rows], [-1, *expected])
    names = {int(r["cluster"]): r["name"] for r in rows}
    assert {names.get(0), names.get(3), names.get(1)} <= {"left", "right", None}
    assert summary["class_names"] == ["background", "left", "right", "cluster 2"]
    model = json.loads((out / "kmeans_model.json").read_text())
    assert model["per_seed"][0]["mapping"] == [0, 1, 2, 3, 1]
    assert model["cluster_names"] == {"0": "left", "1": "right", "3": "left"}
    with pytest.raises(NamesError, match="names cluster 7"):
        make_clusters(store, samples, tmp_path / "again", ClusterParams(k=4), names={7: "sky"},
                      progress=False)


def test_discriminant_space_clusters_in_the_fitted_space_and_segment_loads_it(tmp_path):
    store, samples, groups = _store(tmp_path, n=30)
    out = tmp_path / "clusters"
    params = ClusterParams(k=GROUPS, space="discriminant", groups=2, n_init=3, seed=5)
    summary = make_clusters(store, samples, out, params, progress=False)
    assert (summary["space"], summary["groups"], summary["pca_dim"]) == ("discriminant", 6, default_pca_dim(29))
    from artifacts.embeddings import EmbeddingStore
    from stages.evaluate.kmeans import fit_discriminant

    _, protos, valid = EmbeddingStore(store).prototypes()
    space = fit_discriminant(protos[valid], 6, reg=0.1, pca_dim=default_pca_dim(29), seed=5)
    expected = KMeansProtocol(n_clusters=GROUPS, seeds=(5,), n_init=3).fit(space.transform(protos[valid]), 5).assignment
    rows = list(csv.DictReader((out / "assignments.csv").open()))
    got = np.array([int(r["cluster"]) for r in rows])
    np.testing.assert_array_equal(got, [-1, *expected])
    assert len({(g, c) for g, c in zip(groups[1:], got[1:])}) == GROUPS  # the planted groups, one cluster each
    model = json.loads((out / "kmeans_model.json").read_text())
    assert model["space"] == "discriminant" and len(model["pca"]["components"]) == summary["space_dim"] == 5
    clustering = load_clustering(out / "kmeans_model.json")  # segment applies the same map
    np.testing.assert_array_equal(clustering.classes(protos[valid]), np.array(model["per_seed"][0]["mapping"])[expected + 1])
    tiny = make_clusters(store, samples[:3], tmp_path / "tiny", ClusterParams(k=2, space="discriminant"),
                         progress=False)  # 2 prototypes: no room for over-clusters, PCA whitening instead
    assert tiny["space"].startswith("pca") and tiny["groups"] == 0


def test_auto_k_at_the_top_of_the_range_says_so(tmp_path):
    store, samples, _ = _store(tmp_path, n=24)
    summary = make_clusters(store, samples, tmp_path / "out", ClusterParams(k_max=GROUPS, pca_dim=2), progress=False)
    assert summary["k"] == GROUPS and "raise clusters.k_max" in summary["note"]


def test_too_few_images(tmp_path):
    store, samples, _ = _store(tmp_path, n=3)
    with pytest.raises(ClustersError, match="5 clusters need at least 5 images with a salient region; there are 2"):
        make_clusters(store, samples, tmp_path / "out", ClusterParams(k=5), progress=False)


# ----------------------------------------------------------------------------- several proposals per image


def _proposal_store(tmp_path: Path, n: int = 24, d: int = 8, seed: int = 0):
    """n images of two proposals each (a left and a right box) as files and as one version-2
    embedding shard: proposal 0 of image i from planted group i % 3, proposal 1 from (i + 1) % 3, so
    an image's two proposals belong to different clusters; image 0 has no proposal at all and
    image 1's second proposal is invalid (a zero prototype)."""
    from artifacts.embeddings import ProposalEmbedding

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(GROUPS, d))
    samples, records, groups = [], [], []
    h, w = 20, 30
    boxes = [(slice(4, 14), slice(2, 12)), (slice(6, 16), slice(16, 28))]

    def planted(g):
        p = centres[g] + 0.05 * rng.normal(size=d)
        return (p / np.linalg.norm(p)).astype(np.float32)

    for i in range(n):
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        masks = []
        for box in boxes:
            m = np.zeros((h, w), bool)
            m[box] = True
            masks.append(m)
            image[m] = 200
        path = tmp_path / "photos" / f"im{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        samples.append(Sample(f"im{i:02d}", path, None))
        if i == 0:
            proposals, union = [], np.zeros((h, w), bool)
        else:
            gs = [i % GROUPS, (i + 1) % GROUPS]
            proposals = [ProposalEmbedding(m, planted(g), True) for m, g in zip(masks, gs)]
            if i == 1:
                proposals[1] = ProposalEmbedding(masks[1], np.zeros(d, np.float32), False)
                gs[1] = -1
            groups += gs
            union = masks[0] | masks[1]
        proto = planted(i % GROUPS) if union.any() else np.zeros(d, np.float32)
        records.append(EmbeddingRecord(f"im{i:02d}", union, proto, valid=bool(union.any()), proposals=proposals))
    store = tmp_path / "extract" / "all"
    store.mkdir(parents=True)
    write_embedding_shard(store / "emb-00000.h5", records, attrs={
        "extract": {"input_size": 64, "interpolation": "bilinear", "embedding": "head",
                    "proposals": {"proposals": "components", "max_proposals": 3, "min_proposal": 0.01}}})
    return store, samples, np.array(groups), boxes


def test_every_proposal_gets_its_cluster_row_and_pixels(tmp_path):
    store, samples, groups, boxes = _proposal_store(tmp_path)
    out = tmp_path / "clusters"
    summary = make_clusters(store, samples, out, ClusterParams(k=GROUPS, pca_dim=2, n_init=3, seed=3),
                            progress=False)
    assert summary["regions"] == "proposals" and summary["n_images"] == 24
    assert summary["n_regions"] == 1 + 23 * 2 and summary["n_valid"] == 23 * 2 - 1
    assert sum(summary["cluster_sizes"]) == summary["n_valid"]

    rows = list(csv.DictReader((out / "assignments.csv").open()))
    assert list(rows[0]) == ["id", "proposal", "cluster", "name", "distance", "valid", "salient_fraction"]
    assert [(r["id"], r["proposal"]) for r in rows] == [("im00", "-1")] + [
        (f"im{i:02d}", str(k)) for i in range(1, 24) for k in (0, 1)]
    assert (rows[0]["cluster"], rows[0]["valid"]) == ("-1", "0")  # an image without any proposal
    assert (rows[2]["id"], rows[2]["cluster"], rows[2]["valid"], rows[2]["name"]) == ("im01", "-1", "0", "")
    cluster = np.array([int(r["cluster"]) for r in rows[1:]])
    assert len(set(cluster[groups >= 0])) == GROUPS
    for g in range(GROUPS):  # each planted group is one cluster, whichever side its proposals are on
        assert len(set(cluster[groups == g])) == 1
    assert float(rows[1]["salient_fraction"]) == pytest.approx(100 / 600, abs=1e-6)  # the proposal's share of its image
    assert float(rows[4]["salient_fraction"]) == pytest.approx(120 / 600, abs=1e-6)

    # the segmentation paints each proposal with its own cluster's class
    for i, (first, second) in ((5, rows[9:11]), (1, rows[1:3])):
        seg = np.asarray(Image.open(out / "segmentations" / f"im{i:02d}.png"))
        assert seg.shape == (20, 30)
        left = seg[boxes[0]]
        assert (left == int(first["cluster"]) + 1).all()
        right = seg[boxes[1]]
        assert (right == (int(second["cluster"]) + 1 if second["cluster"] != "-1" else 0)).all()
        outside = np.ones_like(seg, bool)
        outside[boxes[0]] = outside[boxes[1]] = False
        assert not seg[outside].any()
    assert second["cluster"] == "-1"  # (im01's second proposal is invalid: background)
    assert int(rows[9]["cluster"]) != int(rows[10]["cluster"])  # two classes in one image
    assert not np.asarray(Image.open(out / "segmentations" / "im00.png")).any()

    # segment's model file re-assigns the proposals' prototypes as the stage did
    from artifacts.embeddings import EmbeddingStore

    es = EmbeddingStore(store)
    _, _, protos, valid = es.regions()
    clustering = load_clustering(out / "kmeans_model.json")
    clusters = np.array([int(r["cluster"]) for r in rows])
    np.testing.assert_array_equal(clustering.classes(protos[valid]), clusters[valid] + 1)
    model = json.loads((out / "kmeans_model.json").read_text())
    assert model["regions"] == "proposals" and model["extract"]["proposals"]["proposals"] == "components"
    assert sorted(p.name for p in (out / "sheets").iterdir()) == [f"cluster-{c:02d}.png" for c in range(GROUPS)]
    assert "the proposals nearest its centroid" in (out / "report.md").read_text()


def test_a_proposal_tile_is_cropped_around_its_box():
    from stages.clusters.stage import _proposal_tile

    image = np.zeros((100, 200, 3), np.uint8)
    mask = np.zeros((100, 200), bool)
    mask[40:60, 100:140] = True
    tile = _proposal_tile(image, mask, (255, 0, 0))
    assert tile.shape == (40, 80, 3)  # the 20 x 40 box grown by half its size on each side
    assert tile[20, 40].tolist() != [0, 0, 0]  # tinted inside
    assert _proposal_tile(image, np.zeros_like(mask), (255, 0, 0)).shape == image.shape  # nothing to crop to
    small = np.zeros((100, 200), bool)
    small[0, 199] = True  # one pixel in a corner: at least 24 pixels a side, within the image
    assert _proposal_tile(image, small, (255, 0, 0)).shape == (13, 13, 3)
