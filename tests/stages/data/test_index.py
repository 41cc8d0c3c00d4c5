"""DatasetIndex: layout detection, splits, ids, labels, errors and fingerprints on tiny fixtures."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.data import DataError, DatasetIndex, Sample, read_sample
from stages.data.index import VOC_CLASSES


def _jpeg(path: Path, w: int = 6, h: int = 4, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path, format="JPEG")


def _label(path: Path, w: int = 6, h: int = 4, value: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.frombytes("P", (w, h), np.full((h, w), value, np.uint8).tobytes())
    img.putpalette([0, 0, 0, 128, 0, 0] + [255] * (3 * 254))
    img.save(path, format="PNG")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def voc_devkit(tmp_path: Path) -> Path:
    """VOCdevkit/VOC2012 with 5 images: a, b, c in SegmentationClass; c, d in SegmentationClassAug."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for i in "abcde":
        _jpeg(voc / "JPEGImages" / f"2007_00000{i}.jpg")
    for i in "abc":
        _label(voc / "SegmentationClass" / f"2007_00000{i}.png")
    for i in "cd":
        _label(voc / "SegmentationClassAug" / f"2007_00000{i}.png", value=2)
    seg = voc / "ImageSets" / "Segmentation"
    _write(seg / "train.txt", "2007_00000a\n2007_00000b\n")
    _write(seg / "val.txt", "2007_00000c\n")
    _write(seg / "trainval.txt", "2007_00000a\n2007_00000b\n2007_00000c\n")
    # DeepLab's list format: image and label paths per line
    _write(seg / "train_aug.txt",
           "/JPEGImages/2007_00000d.jpg /SegmentationClassAug/2007_00000d.png\n"
           "/JPEGImages/2007_00000a.jpg /SegmentationClassAug/2007_00000a.png\n")
    return tmp_path / "VOCdevkit"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Folder layout: x.jpg, y.PNG, z.jpeg (+ junk files), labels for x and y, classes, two splits."""
    root = tmp_path / "ds"
    _jpeg(root / "images" / "x.jpg")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "images" / "y.PNG")
    _jpeg(root / "images" / "z.jpeg")
    _write(root / "images" / "notes.txt", "not an image")
    _write(root / "images" / "._x.jpg", "macOS resource fork")
    (root / "images" / "sub.jpg").mkdir()  # a directory with an image-like name is not an image
    _label(root / "labels" / "x.png")
    _label(root / "labels" / "y.png")
    _label(root / "labels" / "orphan.png")  # a label without an image is ignored
    _write(root / "classes.txt", "background\ncat\n\ndog\n")
    _write(root / "splits" / "train.txt", "# training ids\nx\n\n  y  \n")
    _write(root / "splits" / "val.txt", "z  # the only val image\n")
    return root


# ---------------------------------------------------------------- VOC
@pytest.mark.parametrize("sub", ["", "VOC2012"])
def test_voc_detected_from_devkit_or_voc2012(voc_devkit: Path, sub: str) -> None:
    root = voc_devkit / sub if sub else voc_devkit
    idx = DatasetIndex.open(root)
    assert idx.layout == "voc"
    assert idx.root == voc_devkit / "VOC2012"
    assert idx.classes == list(VOC_CLASSES) and idx.num_classes == 21
    assert idx.classes[0] == "background" and idx.classes[-1] == "tvmonitor"
    assert idx.ignore_index == 255


def test_voc_splits_ids_and_trainaug(voc_devkit: Path) -> None:
    idx = DatasetIndex.open(voc_devkit, layout="voc")
    assert idx.splits() == ["train", "trainaug", "trainval", "val"]
    assert idx.ids() == [f"2007_00000{i}" for i in "abcde"]
    assert idx.ids("all") == idx.ids()
    assert idx.ids("train") == ["2007_00000a", "2007_00000b"]
    assert idx.ids("trainaug") == ["2007_00000a", "2007_00000d"]  # sorted, parsed from path pairs


def test_voc_labels_prefer_segmentationclass_then_aug(voc_devkit: Path) -> None:
    idx = DatasetIndex.open(voc_devkit)
    voc = voc_devkit / "VOC2012"
    assert idx.sample("2007_00000a") == Sample(
        "2007_00000a", voc / "JPEGImages/2007_00000a.jpg", voc / "SegmentationClass/2007_00000a.png")
    assert idx.sample("2007_00000c").label == voc / "SegmentationClass/2007_00000c.png"
    assert idx.sample("2007_00000d").label == voc / "SegmentationClassAug/2007_00000d.png"
    assert idx.sample("2007_00000e").label is None
    assert idx.has_labels("train") and idx.has_labels("val") and idx.has_labels("trainaug")
    assert not idx.has_labels()  # e has none
    image, label = read_sample(idx.sample("2007_00000d"))
    assert image.shape == (4, 6, 3) and (label == 2).all()


def test_voc_trainaug_txt_preferred_over_train_aug(voc_devkit: Path) -> None:
    _write(voc_devkit / "VOC2012/ImageSets/Segmentation/trainaug.txt", "2007_00000e\n")
    idx = DatasetIndex.open(voc_devkit)
    assert idx.ids("trainaug") == ["2007_00000e"]
    assert idx.ids("train_aug") == ["2007_00000a", "2007_00000d"]


def test_missing_split_lists_available(voc_devkit: Path) -> None:
    idx = DatasetIndex.open(voc_devkit)
    with pytest.raises(DataError, match=r"no split 'test'; available: train, trainaug, trainval, val, all"):
        idx.ids("test")
    with pytest.raises(DataError, match="no split 'test'"):
        idx.has_labels("test")


def test_split_id_without_image(voc_devkit: Path) -> None:
    split = voc_devkit / "VOC2012/ImageSets/Segmentation/val.txt"
    _write(split, "2007_00000c\n2008_999999\n")
    with pytest.raises(DataError, match=r"val\.txt, line 2: id '2008_999999' has no image in .*JPEGImages"):
        DatasetIndex.open(voc_devkit)


def test_duplicate_id_in_split(folder: Path) -> None:
    _write(folder / "splits" / "val.txt", "z\nx\nz\n")
    with pytest.raises(DataError, match=r"val\.txt, line 3: id 'z' is already listed on line 1"):
        DatasetIndex.open(folder)


def test_wrong_explicit_layout(folder: Path, voc_devkit: Path) -> None:
    with pytest.raises(DataError, match="not a VOC 2012 folder"):
        DatasetIndex.open(folder, layout="voc")
    with pytest.raises(DataError, match=r"VOC2012: not a folder-layout dataset: no images/ folder"):
        DatasetIndex.open(voc_devkit / "VOC2012", layout="folder")
    with pytest.raises(DataError, match="layout must be 'auto', 'voc' or 'folder', got 'coco'"):
        DatasetIndex.open(folder, layout="coco")


def test_undetectable_and_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot detect the dataset layout"):
        DatasetIndex.open(tmp_path)
    with pytest.raises(DataError, match="nowhere: dataset root is not a directory"):
        DatasetIndex.open(tmp_path / "nowhere")


def test_ambiguous_layout(folder: Path) -> None:
    (folder / "JPEGImages").mkdir()
    with pytest.raises(DataError, match="both JPEGImages/"):
        DatasetIndex.open(folder)
    assert DatasetIndex.open(folder, layout="folder").layout == "folder"


# ---------------------------------------------------------------- folder
def test_folder_layout(folder: Path) -> None:
    idx = DatasetIndex.open(folder)
    assert idx.layout == "folder" and idx.root == folder
    assert idx.ids() == ["x", "y", "z"]  # junk, hidden files and directories ignored
    assert idx.classes == ["background", "cat", "dog"] and idx.num_classes == 3
    assert idx.splits() == ["train", "val"]
    assert idx.ids("train") == ["x", "y"] and idx.ids("val") == ["z"]
    assert idx.sample("y").image == folder / "images" / "y.PNG"
    assert idx.sample("y").label == folder / "labels" / "y.png"
    assert idx.sample("z").label is None
    assert idx.has_labels("train") and not idx.has_labels("val") and not idx.has_labels()
    assert [s.id for s in idx.samples("train")] == ["x", "y"]
    assert idx.describe() == {
        "root": str(folder), "layout": "folder", "num_images": 3, "classes": ["background", "cat", "dog"],
        "splits": {"train": 2, "val": 1}, "labelled": 2,
    }


def test_ids_returns_a_copy(folder: Path) -> None:
    idx = DatasetIndex.open(folder)
    idx.ids("train").append("intruder")
    idx.ids().clear()
    assert idx.ids("train") == ["x", "y"] and len(idx.ids()) == 3


def test_folder_without_splits_has_only_all(folder: Path) -> None:
    shutil.rmtree(folder / "splits")
    idx = DatasetIndex.open(folder)
    assert idx.splits() == ["all"]
    assert idx.ids("all") == idx.ids(None) == ["x", "y", "z"]
    assert idx.describe()["splits"] == {"all": 3}
    with pytest.raises(DataError, match="no split 'train'; available: all"):
        idx.ids("train")


def test_reserved_split_name(folder: Path) -> None:
    _write(folder / "splits" / "all.txt", "x\n")
    with pytest.raises(DataError, match=r"all\.txt: the split name 'all' is reserved"):
        DatasetIndex.open(folder)


def test_folder_split_id_not_in_images(folder: Path) -> None:
    _write(folder / "splits" / "val.txt", "# header\nz\n\nw\n")
    with pytest.raises(DataError, match=r"splits/val\.txt, line 4: id 'w' has no image in .*images"):
        DatasetIndex.open(folder)


def test_duplicate_stems(folder: Path) -> None:
    _jpeg(folder / "images" / "x.JPEG")
    with pytest.raises(DataError, match=r"images: two files have the id 'x': x\.JPEG and x\.jpg"):
        DatasetIndex.open(folder)


def test_no_classes_file(folder: Path) -> None:
    (folder / "classes.txt").unlink()
    idx = DatasetIndex.open(folder)
    assert idx.classes == []
    with pytest.raises(DataError, match="number of classes is unknown: add classes.txt"):
        _ = idx.num_classes


def test_bad_classes_file(folder: Path) -> None:
    _write(folder / "classes.txt", "background\ncat\ncat\n")
    with pytest.raises(DataError, match=r"classes\.txt, line 3: class 'cat' is listed twice"):
        DatasetIndex.open(folder)


def test_unknown_id(folder: Path) -> None:
    with pytest.raises(DataError, match="no image with id 'w'"):
        DatasetIndex.open(folder).sample("w")


def test_index_never_reads_images(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing and fingerprinting use listings and stat only: files need not even be images."""
    (folder / "images" / "x.jpg").write_bytes(b"garbage")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the index opened an image")

    monkeypatch.setattr(Image, "open", no_decoding)
    idx = DatasetIndex.open(folder)
    assert idx.ids() == ["x", "y", "z"]
    assert len(idx.fingerprint()) == 64


def test_index_pickles(folder: Path) -> None:
    idx = DatasetIndex.open(folder)
    back = pickle.loads(pickle.dumps(idx))
    assert back.ids("train") == idx.ids("train") and back.fingerprint() == idx.fingerprint()


# ---------------------------------------------------------------- fingerprint
def test_fingerprint_stable_and_location_independent(folder: Path, tmp_path: Path) -> None:
    a = DatasetIndex.open(folder)
    assert a.fingerprint("train") == DatasetIndex.open(folder).fingerprint("train")
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "copy")
    b = DatasetIndex.open(copy)
    for split in (None, "train", "val"):
        assert a.fingerprint(split) == b.fingerprint(split)
    assert a.fingerprint("train") != a.fingerprint("val")


def test_fingerprint_changes_with_size_ids_and_labels(folder: Path) -> None:
    before = {s: DatasetIndex.open(folder).fingerprint(s) for s in (None, "train", "val")}

    with open(folder / "images" / "z.jpeg", "ab") as f:  # a file grows: its splits change
        f.write(b"\0")
    after = {s: DatasetIndex.open(folder).fingerprint(s) for s in (None, "train", "val")}
    assert after["val"] != before["val"] and after[None] != before[None]
    assert after["train"] == before["train"]

    _jpeg(folder / "images" / "w.jpg")  # a new id: "all" changes, the splits do not
    added = {s: DatasetIndex.open(folder).fingerprint(s) for s in (None, "train", "val")}
    assert added[None] != after[None] and added["train"] == after["train"]

    _label(folder / "labels" / "z.png")  # a label appears
    assert DatasetIndex.open(folder).fingerprint("val") != added["val"]

    with open(folder / "labels" / "x.png", "ab") as f:  # a label grows
        f.write(b"\0")
    assert DatasetIndex.open(folder).fingerprint("train") != added["train"]


def test_fingerprint_depends_on_classes_not_contents(folder: Path) -> None:
    before = DatasetIndex.open(folder).fingerprint()
    _jpeg(folder / "images" / "x.jpg", value=100)  # same pixels, same bytes
    assert DatasetIndex.open(folder).fingerprint() == before
    _write(folder / "classes.txt", "background\ncat\nbird\n")
    assert DatasetIndex.open(folder).fingerprint() != before


def test_fingerprint_missing_file(folder: Path) -> None:
    idx = DatasetIndex.open(folder)
    (folder / "images" / "z.jpeg").unlink()
    with pytest.raises(DataError, match=r"z\.jpeg: cannot stat"):
        idx.fingerprint("val")


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_davis16_objects(davis_root: Path) -> None:
    idx = DatasetIndex.open(davis_root)
    assert idx.layout == "folder"
    assert len(idx.ids()) == 519 and idx.num_classes == 11
    assert idx.classes[0] == "background" and "person" in idx.classes
    assert idx.splits() == ["train", "val"]
    assert len(idx.ids("train")) == 306 and len(idx.ids("val")) == 213
    assert not set(idx.ids("train")) & set(idx.ids("val"))
    assert idx.has_labels("train") and idx.has_labels("val") and idx.describe()["labelled"] == 519
    image, label = read_sample(idx.sample(idx.ids("val")[0]))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert label.shape == image.shape[:2] and label.dtype == np.uint8
    assert 0 < (label > 0).mean() < 1 and label.max() < idx.num_classes


def test_flat_folder_of_photos(tmp_path: Path) -> None:
    """Images straight in the root, nothing else: the folder layout, one split ('all'), no labels."""
    root = tmp_path / "photos"
    _jpeg(root / "b.jpg")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "a.PNG")
    _write(root / "notes.txt", "not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    ds = DatasetIndex.open(root)
    assert (ds.layout, ds.splits(), ds.ids(), ds.classes) == ("folder", ["all"], ["a", "b"], [])
    assert ds.sample("b") == Sample("b", root / "b.jpg", None)
    assert not ds.any_labels() and not ds.any_labels("all")
    image, label = read_sample(ds.sample("a"))
    assert image.shape == (4, 6, 3) and label is None
    assert DatasetIndex.open(root, layout="folder").ids() == ["a", "b"]
    with pytest.raises(DataError, match="no split 'train'; available: all"):
        ds.ids("train")


def test_flat_folder_without_images_is_undetectable(tmp_path: Path) -> None:
    _write(tmp_path / "empty" / "notes.txt", "no image here")
    with pytest.raises(DataError, match="cannot detect the dataset layout.*image files"):
        DatasetIndex.open(tmp_path / "empty")
    with pytest.raises(DataError, match="no images/ folder and no image files"):
        DatasetIndex.open(tmp_path / "empty", layout="folder")


def test_any_labels(folder: Path) -> None:
    ds = DatasetIndex.open(folder)
    assert ds.any_labels() and not ds.has_labels()  # x and y have labels, z has none
