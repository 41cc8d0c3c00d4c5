"""The demo dataset: reproducible files, balanced classes, and classes that colour cannot separate."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from sklearn.cluster import KMeans

from stages.data import DataError, DatasetIndex, load_label, make_demo, read_sample
from stages.data.demo import DEMO_CLASSES, render_sample


def _hashes(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (hidden temp files included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DatasetIndex:
    return make_demo(tmp_path_factory.mktemp("demo") / "d", n_train=100, n_val=50, size=64, seed=3)


@pytest.fixture(scope="module")
def stats(demo: DatasetIndex) -> dict[str, np.ndarray]:
    """Per image: class, mean colour inside the object, object area, contrast to its surround."""
    cls, colour, area, contrast, border = [], [], [], [], []
    for s in demo.samples():
        image, label = read_sample(s)
        obj = label > 0
        ring = cv2.dilate(obj.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~obj
        cls.append(int(label.max()))
        colour.append(image[obj].mean(axis=0))
        area.append(obj.mean())
        contrast.append(np.linalg.norm(image[obj].mean(axis=0) - image[ring].mean(axis=0)))
        border.append(obj[0].any() or obj[-1].any() or obj[:, 0].any() or obj[:, -1].any())
    return {k: np.array(v) for k, v in
            dict(cls=cls, colour=colour, area=area, contrast=contrast, border=border).items()}


def test_layout_and_balance(demo: DatasetIndex) -> None:
    assert demo.layout == "folder" and demo.classes == list(DEMO_CLASSES) and demo.num_classes == 6
    assert demo.splits() == ["train", "val"]
    assert len(demo.ids("train")) == 100 and len(demo.ids("val")) == 50
    assert demo.has_labels("train") and demo.has_labels("val")
    assert (demo.root / "README.txt").read_text().startswith("MaskContrast demo dataset")
    for split, n in (("train", 100), ("val", 50)):
        classes = [int(load_label(s.label).max()) for s in demo.samples(split)]
        np.testing.assert_array_equal(np.bincount(classes, minlength=6), [0] + [n // 5] * 5)


def test_files_are_jpeg_and_palette_png(demo: DatasetIndex) -> None:
    s = demo.sample(demo.ids()[0])
    with Image.open(s.image) as img:
        assert img.format == "JPEG" and img.mode == "RGB" and img.size == (64, 64)
    with Image.open(s.label) as lab:
        assert lab.format == "PNG" and lab.mode == "P"


def test_one_object_per_image(demo: DatasetIndex) -> None:
    for s in demo.samples("val"):
        label = load_label(s.label)
        values = np.unique(label)
        assert len(values) == 2 and values[0] == 0  # background and one class
        n, _ = cv2.connectedComponents((label > 0).astype(np.uint8))
        assert n == 2  # one connected object


def test_colour_does_not_determine_class(stats: dict[str, np.ndarray]) -> None:
    """k-means on the mean object colour (k = 5 classes) gets low purity: colour does not solve it."""
    purity = []
    for seed in range(2):
        clusters = KMeans(5, n_init=5, random_state=seed).fit_predict(stats["colour"])
        purity.append(sum(np.bincount(stats["cls"][clusters == k]).max()
                          for k in np.unique(clusters)) / len(clusters))
    assert max(purity) < 0.45  # chance is 0.2; all-correct is 1.0


def test_shape_determines_class(demo: DatasetIndex) -> None:
    """The outline alone (first Hu moment of the mask, 1-NN train -> val) recovers the class."""
    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        hu1, cls = [], []
        for s in demo.samples(split):
            label = load_label(s.label)
            hu1.append(cv2.HuMoments(cv2.moments((label > 0).astype(np.uint8), binaryImage=True))[0, 0])
            cls.append(label.max())
        return np.log(hu1), np.array(cls)

    train_x, train_y = features("train")
    val_x, val_y = features("val")
    nearest = np.abs(val_x[:, None] - train_x[None]).argmin(1)
    assert (train_y[nearest] == val_y).mean() > 0.9


def test_object_is_salient(stats: dict[str, np.ndarray]) -> None:
    assert np.median(stats["contrast"]) > 50        # stands out from what surrounds it
    assert 0.04 < np.median(stats["area"]) < 0.1     # 26-38 % of the side, shape-dependent fill
    assert not stats["border"].any()                 # inside the image


def test_object_is_upright(demo: DatasetIndex) -> None:
    """Squares stand within +-15 degrees of axis-aligned (free rotation told instances apart)."""
    angles = []
    for s in demo.samples():
        label = load_label(s.label)
        if label.max() == DEMO_CLASSES.index("square_checker"):
            points = cv2.findNonZero((label > 0).astype(np.uint8))
            angle = cv2.minAreaRect(points)[2] % 90.0
            angles.append(min(angle, 90.0 - angle))
    assert len(angles) == 30 and max(angles) < 15.0


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = _hashes(make_demo(tmp_path / "a", n_train=5, n_val=5, size=48, seed=7).root)
    b = _hashes(make_demo(tmp_path / "b", n_train=5, n_val=5, size=48, seed=7).root)
    c = _hashes(make_demo(tmp_path / "c", n_train=5, n_val=5, size=48, seed=8).root)
    assert len(a) == 10 + 10 + 4 and a == b
    assert {k for k in a if a[k] != c[k]} >= {k for k in a if k.startswith(("images", "labels"))}


def test_rerun_repairs_interrupted_generation(tmp_path: Path) -> None:
    fresh = _hashes(make_demo(tmp_path / "fresh", n_train=6, n_val=4, size=48).root)
    root = tmp_path / "broken"
    make_demo(root, n_train=6, n_val=4, size=48)
    (root / "labels" / "demo_00003.png").unlink()                      # never written
    (root / "images" / "demo_00001.jpg").write_bytes(b"\xff\xd8 partial")  # half written
    (root / "images" / ".demo_00002.jpg.999.tmp").write_bytes(b"partial")  # temp left behind
    (root / "README.txt").unlink()
    idx = make_demo(root, n_train=6, n_val=4, size=48)
    assert _hashes(root) == fresh
    assert len(idx.ids()) == 10


def test_rerun_smaller_removes_stale_images(tmp_path: Path) -> None:
    make_demo(tmp_path / "d", n_train=6, n_val=4, size=48)
    idx = make_demo(tmp_path / "d", n_train=3, n_val=2, size=48)
    assert idx.ids() == [f"demo_{i:05d}" for i in range(5)]
    assert len(list((tmp_path / "d" / "labels").iterdir())) == 5


def test_refuses_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DataError, match=r"refusing to write the demo dataset here: .*holiday\.jpg"):
        make_demo(tmp_path, n_train=2, n_val=1, size=48)
    assert (tmp_path / "images" / "holiday.jpg").read_bytes() == b"precious"


def test_argument_checks(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        make_demo(tmp_path, n_train=0, n_val=0)
    with pytest.raises(ValueError, match="size must be at least 32"):
        make_demo(tmp_path, size=16)
    with pytest.raises(ValueError, match=r"demo class must be in 1\.\.5, got 0"):
        render_sample(rng, 0, 64)


def test_render_sample_label_matches_class(rng: np.random.Generator) -> None:
    for cls in range(1, 6):
        image, label = render_sample(rng, cls, 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert label.shape == (64, 64) and set(np.unique(label)) == {0, cls}


@pytest.mark.slow
def test_default_size_is_fast(tmp_path: Path) -> None:
    """360 images of 128 px: well under 10 s of CPU (one core)."""
    start = time.process_time()
    idx = make_demo(tmp_path / "d")
    assert time.process_time() - start < 6.0
    assert len(idx.ids()) == 360


# -------------------------------------------------------------------- the default output is pinned

#: sha256 over (relative path, bytes) of every file of make_demo(n_train=3, n_val=2, size=40, seed=7),
#: taken before the multi-object variant existed (numpy, OpenCV and Pillow as in the lock file, like
#: the golden digests of tests/pipeline/test_real_chain.py).
DEFAULT_DIGEST = "50cb4db9ebfc66cfcf21aa51c030dbd995c2075ee88bfc30755c3db1325a28e0"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_default_output_is_unchanged(tmp_path: Path) -> None:
    assert _digest(make_demo(tmp_path / "d", n_train=3, n_val=2, size=40, seed=7).root) == DEFAULT_DIGEST
    multi = _digest(make_demo(tmp_path / "m", n_train=3, n_val=2, size=40, seed=7, multi_object=True).root)
    assert multi != DEFAULT_DIGEST


# -------------------------------------------------------------------- the multi-object variant

MULTI_SIZE = 64


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory) -> DatasetIndex:
    return make_demo(tmp_path_factory.mktemp("multi") / "d", n_train=40, n_val=20, size=MULTI_SIZE, seed=5,
                     multi_object=True)


def test_multi_object_images_hold_two_or_three_objects_of_different_classes(multi: DatasetIndex) -> None:
    counts = []
    for s in multi.samples():
        label = load_label(s.label)
        classes = np.unique(label)[1:]
        counts.append(len(classes))
        for cls in classes:  # one object a class, each one 8-connected piece
            n, _ = cv2.connectedComponents((label == cls).astype(np.uint8), connectivity=8)
            assert n == 2, (s.id, cls)
    assert set(counts) == {2, 3}
    assert "multi_object=True" in (multi.root / "README.txt").read_text()


def test_multi_object_components_tell_the_objects_apart(multi: DatasetIndex) -> None:
    """Connected components of the union of the objects are the objects, a gap of >= 8 % of the
    side apart (with a margin for pixel sampling), and none touches the border."""
    gaps = []
    for s in multi.samples():
        label = load_label(s.label)
        n, comp = cv2.connectedComponents((label > 0).astype(np.uint8), connectivity=8)
        assert n - 1 == len(np.unique(label)) - 1
        for k in range(1, n):
            assert len(np.unique(label[comp == k])) == 1  # one class a component
        for cls in np.unique(label)[1:]:
            dist = cv2.distanceTransform((label != cls).astype(np.uint8), cv2.DIST_L2, 5)
            gaps.append(dist[(label > 0) & (label != cls)].min())
        assert not (label[0].any() or label[-1].any() or label[:, 0].any() or label[:, -1].any())
    assert min(gaps) >= 0.08 * MULTI_SIZE - 1


def test_multi_object_classes_are_balanced_enough(multi: DatasetIndex) -> None:
    """The first object's class is balanced within each split, so every class is in at least a
    fifth of a split's images."""
    for split, n in (("train", 40), ("val", 20)):
        seen = np.zeros(6, int)
        for s in multi.samples(split):
            seen[np.unique(load_label(s.label))[1:]] += 1
        assert (seen[1:] >= n // 5).all(), (split, seen)
        assert seen[1:].sum() >= 2 * n


def test_multi_object_same_seed_same_bytes(tmp_path: Path) -> None:
    a = _hashes(make_demo(tmp_path / "a", n_train=4, n_val=2, size=48, seed=2, multi_object=True).root)
    b = _hashes(make_demo(tmp_path / "b", n_train=4, n_val=2, size=48, seed=2, multi_object=True).root)
    assert a == b and len(a) == 6 + 6 + 4


def test_render_multi_sample_checks_and_labels(rng: np.random.Generator) -> None:
    from stages.data.demo import render_multi_sample

    image, label = render_multi_sample(rng, [2, 5, 1], 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2, 5}
    for bad in ([], [1, 1], [1, 2, 3, 4]):
        with pytest.raises(ValueError, match="one to three distinct classes"):
            render_multi_sample(rng, bad, 64)
    with pytest.raises(ValueError, match=r"demo class must be in 1\.\.5, got 6"):
        render_multi_sample(rng, [1, 6], 64)
