"""Dataset index: which images, labels and splits a dataset has, read from directory listings.

Two layouts are understood:

* ``voc`` (PASCAL VOC 2012): ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette),
  optionally ``SegmentationClassAug/<id>.png`` (SBD-augmented labels, used for ids that
  ``SegmentationClass`` lacks), and split lists ``ImageSets/Segmentation/<name>.txt`` (``train``,
  ``val``, ``trainval``, and ``trainaug.txt`` or ``train_aug.txt``, both exposed as ``trainaug``).
  ``root`` may point at ``VOC2012/`` or at ``VOCdevkit/`` (the index descends into ``VOC2012/``).
  Split lines may be bare ids or DeepLab-style ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``
  pairs; the id is the stem of the first path.
* ``folder``: ``images/<id>.<ext>`` (jpg jpeg png bmp tif tiff webp, any case; the id is the file
  stem), optional ``labels/<id>.png``, optional ``classes.txt`` (one name per line, the first is
  background) and optional ``splits/<name>.txt`` (one id per line). A flat folder of images, with
  no ``images/`` folder, is the same layout with the images in ``root`` itself (unlabelled photos).

In split files and ``classes.txt`` blank lines are skipped and ``#`` starts a comment (at the start
of a line, or after whitespace). Hidden files (names starting with ``.``) are ignored everywhere.
Split ids are returned sorted; the pseudo-split ``all`` (every image) always exists and is the
only split of a dataset without split files.

Building an index costs one directory listing per folder and one read per split file: no image or
label is opened, so 10k-image datasets index in milliseconds. Images are never copied; stages
read them in place through :mod:`stages.data.io`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
LABEL_EXTENSIONS = frozenset({".png"})
ALL = "all"  # pseudo-split: every image of the dataset
LAYOUTS = ("voc", "folder")

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

_FINGERPRINT_FORMAT = 1
_COMMENT = re.compile(r"(^|\s)#.*$")


class DataError(ValueError):
    """The dataset as a whole is unusable: bad layout, missing split, unknown id, bad list file."""


@dataclass(frozen=True)
class Sample:
    """One image and its label file (``None`` when the dataset has no label for it)."""

    id: str
    image: Path
    label: Path | None


class DatasetIndex:
    """The images, labels and splits of one dataset. Build it with :meth:`DatasetIndex.open`.

    Attributes: ``root`` (the dataset folder; for VOC the ``VOC2012/`` folder), ``layout``
    (``"voc"`` or ``"folder"``), ``classes`` (class names, index 0 is background; empty when a
    folder dataset has no ``classes.txt``), ``ignore_index`` (label value excluded from scoring).
    The index is a plain picklable object, so it can be shipped to dask or data-loader workers.
    """

    def __init__(
        self,
        root: Path,
        layout: str,
        classes: list[str],
        images: dict[str, str],
        labels: dict[str, str],
        splits: dict[str, tuple[str, ...]],
        ignore_index: int = 255,
    ) -> None:
        """Internal: use :meth:`open`. ``images``/``labels`` map id -> path relative to ``root``."""
        self.root = root
        self.layout = layout
        self.classes = classes
        self.ignore_index = ignore_index
        self._images = images
        self._labels = labels
        self._splits = splits
        self._all = tuple(sorted(images))

    # ---------------------------------------------------------------- construction
    @classmethod
    def open(cls, root: str | os.PathLike, layout: str = "auto") -> DatasetIndex:
        """Index the dataset at ``root``; ``layout`` is ``"auto"``, ``"voc"`` or ``"folder"``.

        ``"auto"`` picks VOC when ``JPEGImages/`` (or ``VOC2012/JPEGImages/``) exists and the folder
        layout when ``images/`` exists or ``root`` itself holds image files (a flat folder). Raises :class:`DataError` naming the path when neither is
        found, or when the listings or split files are inconsistent.
        """
        root = Path(root)
        if layout not in ("auto", *LAYOUTS):
            raise DataError(f"layout must be 'auto', 'voc' or 'folder', got {layout!r}")
        if not root.is_dir():
            raise DataError(f"{root}: dataset root is not a directory")
        voc_root = _voc_root(root)
        if layout == "auto":
            has_folder = (root / "images").is_dir()
            if voc_root is not None and has_folder:
                raise DataError(
                    f"{root}: holds both JPEGImages/ (VOC) and images/ (folder layout); "
                    "pass layout='voc' or layout='folder'"
                )
            if voc_root is None and not has_folder and not _scan(root, IMAGE_EXTENSIONS):
                raise DataError(
                    f"{root}: cannot detect the dataset layout: expected JPEGImages/ (VOC 2012, or "
                    "VOCdevkit/ holding VOC2012/), images/ (folder layout) or image files (a flat folder)"
                )
            layout = "voc" if voc_root is not None else "folder"
        if layout == "voc":
            if voc_root is None:
                raise DataError(f"{root}: not a VOC 2012 folder: no JPEGImages/ here or in VOC2012/")
            return cls._open_voc(voc_root)
        return cls._open_folder(root)

    @classmethod
    def _open_voc(cls, root: Path) -> DatasetIndex:
        images = _prefixed(_scan(root / "JPEGImages", IMAGE_EXTENSIONS), "JPEGImages")
        labels: dict[str, str] = {}
        for folder in ("SegmentationClassAug", "SegmentationClass"):  # the second one wins
            if (root / folder).is_dir():
                found = _scan(root / folder, LABEL_EXTENSIONS)
                labels.update((i, f"{folder}/{n}") for i, n in found.items() if i in images)
        split_dir = root / "ImageSets" / "Segmentation"
        files = _split_files(split_dir) if split_dir.is_dir() else {}
        if "train_aug" in files and "trainaug" not in files:
            files["trainaug"] = files.pop("train_aug")
        splits = {name: _read_split(path, images, root / "JPEGImages", voc=True)
                  for name, path in files.items()}
        return cls(root, "voc", list(VOC_CLASSES), images, labels, splits)

    @classmethod
    def _open_folder(cls, root: Path) -> DatasetIndex:
        if (root / "images").is_dir():
            images = _prefixed(_scan(root / "images", IMAGE_EXTENSIONS), "images")
        else:  # a flat folder of photos
            images = _scan(root, IMAGE_EXTENSIONS)
            if not images:
                raise DataError(f"{root}: not a folder-layout dataset: no images/ folder and no image files "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder itself")
        labels: dict[str, str] = {}
        if (root / "labels").is_dir():
            found = _scan(root / "labels", LABEL_EXTENSIONS)
            labels = {i: f"labels/{n}" for i, n in found.items() if i in images}
        classes = _read_classes(root / "classes.txt") if (root / "classes.txt").is_file() else []
        split_dir = root / "splits"
        files = _split_files(split_dir) if split_dir.is_dir() else {}
        if ALL in files:
            raise DataError(
                f"{files[ALL]}: the split name 'all' is reserved for every image; rename the file")
        image_dir = root / "images" if (root / "images").is_dir() else root
        splits = {name: _read_split(path, images, image_dir, voc=False)
                  for name, path in files.items()}
        return cls(root, "folder", classes, images, labels, splits)

    # ---------------------------------------------------------------- queries
    def splits(self) -> list[str]:
        """Split names from the split files (sorted); ``["all"]`` when there are none."""
        return sorted(self._splits) if self._splits else [ALL]

    def ids(self, split: str | None = None) -> list[str]:
        """Sorted ids of ``split``; ``None`` or ``"all"`` gives every image id."""
        return list(self._ids(split))

    def _ids(self, split: str | None) -> tuple[str, ...]:
        if split is None or split == ALL:
            return self._all
        try:
            return self._splits[split]
        except KeyError:
            available = ", ".join([*sorted(self._splits), ALL])
            raise DataError(f"{self.root}: no split {split!r}; available: {available}") from None

    def sample(self, id: str) -> Sample:
        """The image and label paths of one id; :class:`DataError` for an unknown id."""
        try:
            image = self._images[id]
        except KeyError:
            raise DataError(f"{self.root}: no image with id {id!r}") from None
        label = self._labels.get(id)
        return Sample(id, self.root / image, None if label is None else self.root / label)

    def samples(self, split: str | None = None) -> list[Sample]:
        """:meth:`sample` for every id of ``split``, in id order."""
        return [self.sample(i) for i in self._ids(split)]

    def has_labels(self, split: str | None = None) -> bool:
        """True when the split is non-empty and every one of its ids has a label file."""
        ids = self._ids(split)
        return bool(ids) and all(i in self._labels for i in ids)

    def any_labels(self, split: str | None = None) -> bool:
        """True when at least one id of the split has a label file (unlabelled photos have none)."""
        return any(i in self._labels for i in self._ids(split))

    @property
    def num_classes(self) -> int:
        """Number of classes including background; :class:`DataError` when the names are unknown."""
        if not self.classes:
            raise DataError(
                f"{self.root}: the number of classes is unknown: add classes.txt (one class name "
                "per line, background first)"
            )
        return len(self.classes)

    def fingerprint(self, split: str | None = None) -> str:
        """sha256 hex of the split's content as seen from the file system, without reading files.

        Hashes the layout, the class names, and per id (sorted): the id, the image and label paths
        relative to ``root`` and their file sizes. No absolute paths or modification times enter,
        so the same files give the same fingerprint on any machine; an added or removed id, a
        changed size or a label that appears or disappears changes it. One ``stat`` per file.
        """
        head = {"format": _FINGERPRINT_FORMAT, "layout": self.layout, "classes": self.classes}
        fields = [json.dumps(head, sort_keys=True)]
        root = os.fspath(self.root)
        for i in self._ids(split):
            image, label = self._images[i], self._labels.get(i)
            label_size = "" if label is None else _size(root, label)
            fields += (i, image, _size(root, image), label or "", label_size)
        # 5 fields per id, NUL-separated: NUL cannot occur in file names, so the encoding is unambiguous
        return hashlib.sha256("\0".join(map(str, fields)).encode("utf-8", "surrogateescape")).hexdigest()

    def describe(self) -> dict:
        """A JSON-ready summary: root, layout, image count, classes, split sizes, labelled count."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "num_images": len(self._all),
            "classes": list(self.classes),
            "splits": {name: len(self._ids(name)) for name in self.splits()},
            "labelled": len(self._labels),
        }

    def __repr__(self) -> str:
        return (f"DatasetIndex(root={str(self.root)!r}, layout={self.layout!r}, "
                f"images={len(self._all)}, splits={self.splits()})")


# -------------------------------------------------------------------- helpers
def _voc_root(root: Path) -> Path | None:
    """``root`` itself when it holds JPEGImages/, ``root/VOC2012`` for a VOCdevkit/ root, else None."""
    if (root / "JPEGImages").is_dir():
        return root
    if (root / "VOC2012" / "JPEGImages").is_dir():
        return root / "VOC2012"
    return None


def _scan(folder: Path, extensions: frozenset[str]) -> dict[str, str]:
    """id (file stem) -> file name for the files of ``folder`` with one of ``extensions``.

    One directory listing; ``DirEntry.is_file`` uses the type the listing already returned.
    """
    found: dict[str, str] = {}
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror})") from e
    for entry in entries:
        name = entry.name
        stem, dot, ext = name.rpartition(".")
        if not stem or name[0] == "." or f".{ext.lower()}" not in extensions or not entry.is_file():
            continue
        if stem in found:
            a, b = sorted((found[stem], name))
            raise DataError(f"{folder}: two files have the id {stem!r}: {a} and {b}; ids must be unique")
        found[stem] = name
    return found


def _size(root: str, rel: str) -> int:
    """Size in bytes of ``root/rel`` (one stat, no open)."""
    path = os.path.join(root, rel)
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise DataError(f"{path}: cannot stat a file of the index ({e.strerror})") from e


def _prefixed(names: dict[str, str], folder: str) -> dict[str, str]:
    return {i: f"{folder}/{n}" for i, n in names.items()}


def _split_files(folder: Path) -> dict[str, Path]:
    """split name -> path for every ``*.txt`` in ``folder``."""
    try:
        names = os.listdir(folder)
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({e.strerror})") from e
    return {n[:-4]: folder / n for n in names if n.endswith(".txt") and not n.startswith(".")}


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, content) of the non-blank, non-comment lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the list file ({e})") from e
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _COMMENT.sub("", raw).strip()
        if line:
            out.append((number, line))
    return out


def _read_split(path: Path, images: dict[str, str], image_dir: Path, voc: bool) -> tuple[str, ...]:
    """Sorted ids listed in a split file; every id must be an image and appear once."""
    seen: dict[str, int] = {}
    for number, line in _lines(path):
        id_ = line
        if voc:  # bare id, or DeepLab's "/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png"
            name = line.split()[0].rsplit("/", 1)[-1]
            stem, ext = os.path.splitext(name)
            id_ = stem if ext.lower() in IMAGE_EXTENSIONS else name
        if id_ not in images:
            raise DataError(f"{path}, line {number}: id {id_!r} has no image in {image_dir}")
        if id_ in seen:
            raise DataError(f"{path}, line {number}: id {id_!r} is already listed on line {seen[id_]}")
        seen[id_] = number
    return tuple(sorted(seen))


def _read_classes(path: Path) -> list[str]:
    """Class names from ``classes.txt``, background first; names must be unique."""
    classes: list[str] = []
    for number, name in _lines(path):
        if name in classes:
            raise DataError(f"{path}, line {number}: class {name!r} is listed twice")
        classes.append(name)
    if not classes:
        raise DataError(f"{path}: no class names (expected one per line, background first)")
    return classes
