"""Protocol runners on a tiny synthetic dataset with planted embedding stores.

Every score is checked against an independent pixel pass: the prediction maps are rebuilt from
what the planted data says each image should get, and scored with `confusion_matrix` on the
labels, never through the runners' count tables.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts.embeddings import EmbeddingRecord, EmbeddingStore, shard_name, write_embedding_shard
from stages.data import DatasetIndex
from stages.evaluate.kmeans import PCAWhitening, apply_kmeans, nearest_indices
from stages.evaluate.metrics import confusion_matrix, segmentation_scores
from stages.evaluate.protocols import (
    KMEANS_MODEL_FILE,
    ProtocolError,
    class_counts,
    colour_descriptors,
    run_kmeans,
    run_linear,
    run_pixel_kmeans,
    run_retrieval,
    whitening_note,
)
from stages.evaluate import protocols
from stages.evaluate.report import write_metrics, write_report

CLASSES = ["background", "alpha", "beta", "gamma"]
N_CLS = len(CLASSES)
GRID = 4  # feature grid side; labels are made from a GRID x GRID class grid by nearest resizing
D = 8  # prototype dimension
C = 6  # feature channels


class Planted:
    """A folder-layout dataset with train/val splits, and one embedding store per split.

    Image i of a split holds one object of class 1 + i % 3 (a 2x2 block of grid cells); its
    stored salient mask is exactly the object, its prototype the class's planted direction (or
    another class's for the ids in ``swap``), its features the class's one-hot direction per
    cell plus noise. Row 0 of every label is 255 (ignore).
    """

    def __init__(self, root: Path, n_train: int = 9, n_val: int = 12, seed: int = 0, *,
                 swap: dict[str, int] | None = None, labels: bool = True, features: bool = True,
                 dim: int = D, channels: int = C) -> None:
        rng = np.random.default_rng(seed)
        self.root = root / "data"
        for sub in ("images", "labels", "splits"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
        centres = np.random.default_rng(123).normal(size=(N_CLS, dim))
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        self.labels: dict[str, np.ndarray] = {}
        self.masks: dict[str, np.ndarray] = {}
        self.planted: dict[str, int] = {}  # class whose prototype the image carries
        self.stores: dict[str, Path] = {}
        swap = swap or {}
        for split, n in (("train", n_train), ("val", n_val)):
            records = []
            ids = [f"{split}{i:02d}" for i in range(n)]
            (self.root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
            for i, id_ in enumerate(ids):
                cls = 1 + i % 3
                h, w = int(rng.choice([16, 20, 24])), int(rng.choice([16, 20, 28]))
                cells = np.zeros((GRID, GRID), np.uint8)
                r0, c0 = rng.integers(0, GRID - 1, 2)
                cells[r0:r0 + 2, c0:c0 + 2] = cls
                label = cells[nearest_indices(GRID, h)[:, None], nearest_indices(GRID, w)[None, :]]
                label[0, :] = 255
                mask = label == cls
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(self.root / "images" / f"{id_}.png")
                if labels:
                    Image.fromarray(label).save(self.root / "labels" / f"{id_}.png")
                self.labels[id_], self.masks[id_] = label, mask
                self.planted[id_] = swap.get(id_, cls)
                feats = None
                if features:
                    onehot = np.eye(channels, dtype=np.float32)[:N_CLS] * 3.0  # (N_CLS, channels)
                    feats = (onehot[cells].transpose(2, 0, 1)
                             + 0.1 * rng.normal(size=(channels, GRID, GRID))).astype(np.float16)
                records.append(EmbeddingRecord(id_, mask, self.centres[self.planted[id_]].copy(), True, feats))
            store = root / f"emb-{split}"
            half = len(records) // 2  # two shards: the runners must follow the store's order
            write_embedding_shard(store / shard_name(0), records[:half], {"extract": {"input_size": 32}})
            write_embedding_shard(store / shard_name(1), records[half:], {"extract": {"input_size": 32}})
            self.stores[split] = store
        self.dataset = DatasetIndex.open(self.root)

    def ids(self, split: str) -> list[str]:
        return self.dataset.ids(split)

    def score(self, split: str, pred_class: dict[str, int], classes=None, ignore=()) -> tuple:
        """Independent pixel pass: image id gets class pred_class[id] on its mask, 0 elsewhere.
        Classes in `ignore` become 255 in the labels. Returns (mIoU %, per-class %, pixel acc %)."""
        conf = np.zeros((N_CLS, N_CLS), np.int64)
        for id_, cls in pred_class.items():
            label = self.labels[id_].copy()
            for c in ignore:
                label[label == c] = 255
            pred = np.where(self.masks[id_], cls, 0)
            conf += confusion_matrix(pred, label, N_CLS, N_CLS)
        s = segmentation_scores(conf, classes)
        return 100 * s.miou, 100 * s.per_class_iou, 100 * s.pixel_accuracy


@pytest.fixture
def data(tmp_path) -> Planted:
    return Planted(tmp_path, swap={"val05": 1})  # val05 is a gamma image carrying alpha's prototype


def _valid_png(path: Path) -> None:
    assert path.is_file(), path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 10 and im.size[1] > 10
        im.verify()


# ----------------------------------------------------------------------------- class counts


def test_class_counts_match_pixel_counts_and_are_cached(data, tmp_path):
    ids = data.ids("val")
    sc = class_counts(data.stores["val"], data.dataset, ids, progress=False, split="val", cache_dir=tmp_path / "c")
    assert sc.ids == ids and sc.skipped == {}
    for i, id_ in enumerate(ids):
        label, mask = data.labels[id_], data.masks[id_]
        for inside in (0, 1):
            expected = np.bincount(label[(mask == inside) & (label != 255)], minlength=N_CLS)
            np.testing.assert_array_equal(sc.counts.counts[i, inside], expected)
    assert (tmp_path / "c" / "counts_val.npz").is_file()
    for p in (data.root / "labels").iterdir():  # the cache must not read labels again
        p.write_bytes(b"broken")
    again = class_counts(data.stores["val"], data.dataset, ids, progress=False, split="val", cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(again.counts.counts, sc.counts.counts)
    assert again.ids == ids
    # another id list is another key: recomputed, and now every label is unreadable
    with pytest.raises(ProtocolError, match="no image of split 'val' could be scored"):
        class_counts(data.stores["val"], data.dataset, ids[:5], progress=False, split="val", cache_dir=tmp_path / "c")


def test_unreadable_label_and_missing_embedding_are_skipped(data, tmp_path):
    (data.root / "labels" / "val03.png").write_bytes(b"\x89PNG not really")
    # an image the store lacks (extract could not read it)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(data.root / "images" / "val99.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(data.root / "labels" / "val99.png")
    dataset = DatasetIndex.open(data.root)
    ids = [*data.ids("val"), "val99"]
    m = run_kmeans(data.stores["val"], dataset, ids, tmp_path / "out", seeds=(1,), figures=False, progress=False)
    assert m["n_skipped"] == 2 and set(m["skipped"]) == {"val03", "val99"}
    assert "no embedding" in m["skipped"]["val99"] and "val03.png" in m["skipped"]["val03"]
    assert m["n_images"] == len(data.ids("val")) - 1


# ----------------------------------------------------------------------------- K-means


def test_kmeans_planted_prototypes_recover_classes(tmp_path):
    data = Planted(tmp_path)
    out = tmp_path / "out"
    m = run_kmeans(data.stores["val"], data.dataset, data.ids("val"), out, seeds=(1, 2, 3), figures=False,
                   progress=False)
    assert m["miou"] == pytest.approx(100.0) and m["miou_std"] == 0.0
    assert m["pixel_accuracy"] == pytest.approx(100.0)
    assert m["seeds"] == [1, 2, 3] and m["k"] == 3 and m["n_images"] == 12
    assert set(m["per_class_iou"]) == set(CLASSES)
    assert all(v == pytest.approx(100.0) for v in m["per_class_iou"].values())
    assert m["figures"] == {} and not list(out.glob("*.png"))
    assert "note" not in m  # 3 planted classes: whitened to their rank, not to pca_dim 32


def test_kmeans_discriminant_space_is_fitted_on_the_train_store(tmp_path):
    data = Planted(tmp_path)
    out = tmp_path / "out"
    m = run_kmeans(data.stores["val"], data.dataset, data.ids("val"), out, seeds=(1, 2), figures=False, progress=False,
                   space="discriminant", groups=1, fit_store=data.stores["train"])
    assert m["miou"] == pytest.approx(100.0)
    assert m["space"]["name"] == "discriminant" and m["space"]["groups"] == 3 and m["space"]["n_fit"] == 9
    assert m["space"]["dim"] == 2 and m["space"]["fitted_on"] == str(data.stores["train"])
    model = json.loads((out / "kmeans_model.json").read_text())
    assert model["space"] == "discriminant" and np.asarray(model["pca"]["components"]).shape == (2, D)
    seed0 = model["per_seed"][0]
    protos = np.stack([data.centres[data.planted[i]] for i in data.ids("val")])
    classes = apply_kmeans(protos, PCAWhitening.from_dict(model["pca"]), np.array(seed0["centroids"]), seed0["mapping"], 1)
    assert classes.tolist() == [1 + i % 3 for i in range(12)]  # segment's path: the same classes
    assert "space" not in json.loads(json.dumps(run_kmeans(data.stores["val"], data.dataset, data.ids("val"),
                                                           tmp_path / "pca", seeds=(1,), figures=False, progress=False)))


def test_kmeans_discriminant_space_errors(tmp_path):
    data = Planted(tmp_path, n_train=2)
    ids = data.ids("val")
    with pytest.raises(protocols.ProtocolError, match="pass fit_store"):
        run_kmeans(data.stores["val"], data.dataset, ids, tmp_path / "a", space="discriminant", progress=False)
    with pytest.raises(protocols.ProtocolError, match="'pca' or 'discriminant', got 'lda'"):
        run_kmeans(data.stores["val"], data.dataset, ids, tmp_path / "b", space="lda", progress=False)
    with pytest.raises(protocols.ProtocolError, match=r"emb-train: .* at least 3 usable ones, found 2"):
        run_kmeans(data.stores["val"], data.dataset, ids, tmp_path / "c", space="discriminant",
                   fit_store=data.stores["train"], progress=False)


def test_kmeans_notes_whitening_too_many_directions():
    assert whitening_note(1449, 32) is None and whitening_note(116, 16) is None and whitening_note(116, None) is None
    note = whitening_note(116, 32)
    assert "32 directions from 116 prototypes" in note and "pca_dim <= 19" in note


def test_colour_baseline_clusters_mask_colours(tmp_path):
    data = Planted(tmp_path)
    store = EmbeddingStore(data.stores["val"])
    ids = data.ids("val")
    noisy = run_kmeans(store, data.dataset, ids, tmp_path / "a", seeds=(1, 2), figures=False, progress=False)
    # noise images: colour says nothing about the class, the planted prototypes say everything
    assert noisy["miou"] == pytest.approx(100.0) and noisy["colour_baseline"]["miou"] < 90.0
    colours = {1: (250, 10, 10), 2: (10, 250, 10), 3: (10, 10, 250)}
    for id_ in ids:  # paint each object in its class's colour: now colour alone recovers the classes
        path = data.root / "images" / f"{id_}.png"
        image = np.asarray(Image.open(path)).copy()
        image[data.masks[id_]] = colours[int(data.labels[id_][data.masks[id_]][0])]
        Image.fromarray(image).save(path)
    painted = run_kmeans(store, data.dataset, ids, tmp_path / "b", seeds=(1, 2), figures=False, progress=False)
    assert painted["colour_baseline"]["miou"] == pytest.approx(100.0)
    assert painted["colour_baseline"]["miou_std"] == 0.0
    desc = colour_descriptors(store, data.dataset, ids[:1])  # one pure colour: one bin of 64
    assert desc.shape == (1, 64) and np.count_nonzero(desc) == 1 and desc.max() == pytest.approx(1.0)
    assert "colour_baseline" not in run_kmeans(store, data.dataset, ids, tmp_path / "c", seeds=(1,), figures=False,
                                               progress=False, colour_baseline=False)


def test_kmeans_matches_pixel_pass_and_model_file(data, tmp_path):
    out = tmp_path / "out"
    m = run_kmeans(data.stores["val"], data.dataset, data.ids("val"), out, seeds=(7, 8), progress=False)
    # val05 (gamma) carries alpha's prototype: it is predicted alpha, everything else is right
    pred = {i: data.planted[i] for i in data.ids("val")}
    miou, per_class, acc = data.score("val", pred)
    assert miou < 100.0
    assert m["miou"] == pytest.approx(miou) and m["pixel_accuracy"] == pytest.approx(acc)
    np.testing.assert_allclose([m["per_class_iou"][c] for c in CLASSES], per_class)
    for r in m["per_seed"]:
        assert r["miou"] == pytest.approx(miou)
    # the model file re-applies the clustering: same classes from the prototypes
    model = json.loads((out / KMEANS_MODEL_FILE).read_text())
    assert model["class_names"] == CLASSES and model["protocol"] == "object" and model["embedding_dim"] == D
    assert [s["seed"] for s in model["per_seed"]] == [7, 8] and model["extract"] == {"input_size": 32}
    pca = PCAWhitening.from_dict(model["pca"])
    store = EmbeddingStore(data.stores["val"])
    ids, protos, _ = store.prototypes()
    for s in model["per_seed"]:
        cls = apply_kmeans(protos, pca, np.asarray(s["centroids"], np.float32), s["mapping"], offset=1)
        assert dict(zip(ids, cls.tolist())) == pred
    for name in ("kmeans_confusion.png", "kmeans_per_class_iou.png", "kmeans_sheet.png"):
        _valid_png(out / name)
        assert name in m["figures"].values()


def test_kmeans_too_few_images(data, tmp_path):
    with pytest.raises(ProtocolError, match="needs at least 20 images"):
        run_kmeans(data.stores["val"], data.dataset, data.ids("val"), tmp_path, n_clusters=20, progress=False)


def test_dataset_without_labels_is_a_clear_error(tmp_path):
    data = Planted(tmp_path, labels=False)
    with pytest.raises(ProtocolError, match=rf"{re.escape(str(data.root))}.*split 'val'.*12 images have none"):
        run_kmeans(data.stores["val"], data.dataset, data.ids("val"), tmp_path / "o", progress=False)
    with pytest.raises(ProtocolError, match="split 'train'"):
        run_linear(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"),
                   tmp_path / "o", epochs=1, progress=False)


def test_pixel_kmeans_on_planted_features(data, tmp_path):
    out = tmp_path / "pix"
    m = run_pixel_kmeans(data.stores["val"], data.dataset, data.ids("val"), out, seeds=(1, 2), progress=False)
    assert m["k"] == N_CLS and m["miou"] == pytest.approx(100.0) and m["pixel_accuracy"] == pytest.approx(100.0)
    for name in ("pixel_kmeans_confusion.png", "pixel_kmeans_per_class_iou.png", "pixel_kmeans_sheet.png"):
        _valid_png(out / name)
    model = json.loads((out / "pixel_kmeans_model.json").read_text())
    assert model["protocol"] == "pixel" and model["feature_shape"] == [C, GRID, GRID]
    over = run_pixel_kmeans(data.stores["val"], data.dataset, data.ids("val"), tmp_path / "over", n_clusters=7,
                            matching="majority", seeds=(1,), figures=False, progress=False)
    assert over["miou"] == pytest.approx(100.0) and over["matching"] == "majority"


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_matches_pixel_pass_all_and_subset(data, tmp_path):
    out = tmp_path / "ret"
    m = run_retrieval(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"),
                      out, class_subset=["gamma", "alpha"], progress=False)
    pred = {i: data.planted[i] for i in data.ids("val")}  # top-1 neighbour carries the planted class
    miou, per_class, acc = data.score("val", pred)
    assert m["miou"] == pytest.approx(miou) and m["pixel_accuracy"] == pytest.approx(acc) and miou < 100
    np.testing.assert_allclose([m["per_class_iou"][c] for c in CLASSES], per_class)
    assert m["n_bank"] == 9 and m["seeds"] == [] and m["miou_std"] == 0.0
    # subset: beta becomes ignore in both splits; the mean runs over alpha and gamma only
    sub_miou, sub_pc, _ = data.score("val", pred, classes=[1, 3], ignore=(2,))
    assert m["subset"]["classes"] == ["alpha", "gamma"]
    assert m["subset"]["miou"] == pytest.approx(sub_miou) == m["miou_subset"]
    assert m["subset"]["per_class_iou"]["gamma"] == pytest.approx(sub_pc[3])
    assert m["subset"]["n_bank"] == 6  # the beta train images have no allowed class
    for name in ("retrieval_confusion.png", "retrieval_per_class_iou.png", "retrieval_sheet.png",
                 "retrieval_subset_per_class_iou.png"):
        _valid_png(out / name)
    with pytest.raises(ProtocolError, match="unknown class name"):
        run_retrieval(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"),
                      out, class_subset=["delta"], progress=False)


def test_retrieval_dimension_mismatch(tmp_path):
    a = Planted(tmp_path / "a")
    b = Planted(tmp_path / "b", dim=5)
    with pytest.raises(ProtocolError, match="prototypes of dimension 8 .* have 5"):
        run_retrieval(a.stores["train"], b.stores["val"], a.dataset, a.ids("train"), a.ids("val"), tmp_path / "o",
                      progress=False)


# ----------------------------------------------------------------------------- linear probe


def test_linear_probe_on_separable_features(data, tmp_path):
    out = tmp_path / "lin"
    m = run_linear(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"), out,
                   epochs=12, lr=0.1, lr_drop_epoch=8, batch_size=4, seed=3, device="cpu", progress=False)
    assert m["miou"] > 85.0, m["miou"]
    assert m["miou"] == pytest.approx(m["history"][-1]["val_miou"])  # last epoch, as scored per epoch
    assert m["miou_best_on_val"] >= m["miou"] and 0 <= m["best_epoch"] < 12
    assert m["seeds"] == [3] and len(m["history"]) == 12 and m["history"][-1]["lr"] == pytest.approx(0.01)
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"]
    for name in ("linear_loss.png", "linear_confusion.png", "linear_per_class_iou.png", "linear_sheet.png"):
        _valid_png(out / name)
    with np.load(out / "linear_probe.npz") as z:
        assert z["weight"].shape == (N_CLS, C, 1, 1) and list(z["class_names"]) == CLASSES


def test_linear_probe_streamed_equals_cached(data, tmp_path, monkeypatch):
    # small splits are held in memory after the first epoch; over the budget every epoch streams
    # from the store: same batches in the same order, so the same head and scores
    kw = dict(epochs=3, lr=0.1, lr_drop_epoch=2, batch_size=4, seed=3, device="cpu", progress=False, figures=False)
    cached = run_linear(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"),
                        tmp_path / "a", **kw)
    monkeypatch.setattr(protocols.linear, "LINEAR_CACHE_BYTES", 0)
    reads = []
    original = EmbeddingStore.features
    monkeypatch.setattr(EmbeddingStore, "features", lambda self, id_: reads.append(id_) or original(self, id_))
    streamed = run_linear(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"),
                          tmp_path / "b", **kw)
    assert streamed["miou"] == cached["miou"] and streamed["history"] == cached["history"]
    n_train, n_val = len(data.ids("train")), len(data.ids("val"))
    assert len(reads) == 3 * (n_train + n_val) + n_val  # every epoch reads both splits again, then the final val pass


def test_linear_probe_with_crf_scores_the_post_processed_last_head(data, tmp_path):
    import torch

    from stages.evaluate.crf import CRFParams, dense_crf
    from stages.evaluate.linear import head_from_state, upsampled_logits

    bad = data.ids("val")[3]
    (data.root / "images" / f"{bad}.png").write_bytes(b"not a png")  # unreadable for the CRF pass only
    out = tmp_path / "lin"
    params = CRFParams(iterations=3, bilateral_sxy=8.0, bilateral_srgb=20.0)
    m = run_linear(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"), out,
                   epochs=4, lr=0.1, lr_drop_epoch=3, batch_size=4, seed=3, device="cpu", progress=False,
                   crf=True, crf_params=params)
    crf = m["crf"]
    assert m["n_images"] == len(data.ids("val")) and m["n_skipped"] == 0  # the probe's own score keeps it
    assert crf["n_images"] == len(data.ids("val")) - 1 and crf["n_skipped"] == 1
    assert list(crf["skipped"]) == [f"val/{bad}"] and f"{bad}.png" in crf["skipped"][f"val/{bad}"]
    assert crf["params"] == params.to_dict() and crf["seconds_per_image"] > 0
    assert m["miou_crf"] == crf["miou"] and set(crf["per_class_iou"]) == set(CLASSES)
    # independent pass: the saved last head, softmax of its upsampled logits, dense_crf, argmax
    with np.load(out / "linear_probe.npz") as z:
        head = head_from_state({"weight": torch.from_numpy(z["weight"]), "bias": torch.from_numpy(z["bias"])})
    store = EmbeddingStore(data.stores["val"])
    conf = np.zeros((N_CLS, N_CLS), np.int64)
    for id_ in data.ids("val"):
        if id_ == bad:
            continue
        label = data.labels[id_]
        with torch.no_grad():
            logits = upsampled_logits(head, torch.from_numpy(store.features(id_).astype(np.float32))[None], label.shape)
        probs = torch.softmax(logits[0], dim=0).numpy()
        image = np.asarray(Image.open(data.root / "images" / f"{id_}.png").convert("RGB"))
        conf += confusion_matrix(dense_crf(image, probs, params).argmax(0), label, N_CLS, N_CLS)
    s = segmentation_scores(conf)
    assert crf["miou"] == pytest.approx(100 * s.miou) and crf["pixel_accuracy"] == pytest.approx(100 * s.pixel_accuracy)
    for name in ("linear_crf_confusion.png", "linear_crf_per_class_iou.png", "linear_crf_sheet.png"):
        _valid_png(out / name)
        assert name in m["figures"].values()
    plain = run_linear(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"), data.ids("val"),
                       tmp_path / "plain", epochs=4, lr=0.1, lr_drop_epoch=3, batch_size=4, seed=3, device="cpu",
                       progress=False, figures=False)
    assert "crf" not in plain and "miou_crf" not in plain and plain["miou"] == m["miou"]  # off by default


def test_linear_needs_features_with_equal_channels(tmp_path):
    plain = Planted(tmp_path / "plain", features=False)
    with pytest.raises(ProtocolError, match=r"extracted without them.*extract\.features"):
        run_linear(plain.stores["train"], plain.stores["val"], plain.dataset, plain.ids("train"), plain.ids("val"),
                   tmp_path / "o", epochs=1, progress=False)
    a = Planted(tmp_path / "a")
    b = Planted(tmp_path / "b", channels=5)
    with pytest.raises(ProtocolError, match="have 6 channels but the val features .* have 5"):
        run_linear(a.stores["train"], b.stores["val"], a.dataset, a.ids("train"), a.ids("val"), tmp_path / "o",
                   epochs=1, progress=False)


# ----------------------------------------------------------------------------- report files


def test_report_files_parse_with_the_design_keys(data, tmp_path):
    out = tmp_path / "report"
    metrics = {
        "kmeans": run_kmeans(data.stores["val"], data.dataset, data.ids("val"), out, seeds=(1, 2), progress=False),
        "retrieval": run_retrieval(data.stores["train"], data.stores["val"], data.dataset, data.ids("train"),
                                   data.ids("val"), out, progress=False),
    }
    write_metrics(out, metrics)
    images = {caption: name for m in metrics.values() for caption, name in m["figures"].items()}
    write_report(out, "report", metrics, {"dataset": str(data.root)}, images)
    loaded = json.loads((out / "metrics.json").read_text())
    for protocol in ("kmeans", "retrieval"):
        m = loaded[protocol]
        assert {"miou", "miou_std", "per_class_iou", "pixel_accuracy", "seeds"} <= set(m)
        assert isinstance(m["miou"], float) and isinstance(m["per_class_iou"], dict)
    assert loaded["kmeans"]["seeds"] == [1, 2]
    text = (out / "report.md").read_text()
    for name in images.values():
        assert f"]({name})" in text
        _valid_png(out / name)
