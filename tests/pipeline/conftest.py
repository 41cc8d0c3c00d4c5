"""Shared fixtures of the pipeline tests."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BoxDatasetMaker = Callable[[Path, Sequence[str], Mapping[str, int]], dict[str, np.ndarray]]


def _make_box_dataset(root: Path, classes: Sequence[str], splits: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Folder dataset of 16 x 20 px images: image i of a split ("<split><i>") holds class
    1 + i % 3 in an 8 x 10 box, bright on a dark background. Returns each image's label map."""
    rng = np.random.default_rng(0)
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    labels = {}
    for split, n in splits.items():
        ids = [f"{split}{i}" for i in range(n)]
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, id_ in enumerate(ids):
            label = np.zeros((16, 20), np.uint8)
            y, x = rng.integers(0, 8, 2)
            label[y:y + 8, x:x + 10] = 1 + i % 3
            Image.fromarray(label).save(root / "labels" / f"{id_}.png")
            image = rng.integers(0, 60, (16, 20, 3), dtype=np.uint8)
            image[label > 0] += 170
            Image.fromarray(image).save(root / "images" / f"{id_}.png")
            labels[id_] = label
    return labels


@pytest.fixture
def no_pictures(monkeypatch):
    """Skip the per-protocol pictures (matplotlib drawing is most of a job's time here; the
    pictures are tested with the protocols and in tests/stages/evaluate/test_batch.py)."""
    from stages.evaluate.protocols import kmeans, linear, pixel_kmeans, retrieval

    for runner in (kmeans, pixel_kmeans, retrieval, linear):
        monkeypatch.setattr(runner, "protocol_figures", lambda *args, **kwargs: {})


@pytest.fixture
def make_box_dataset() -> BoxDatasetMaker:
    """The writer of the tiny box dataset: ``make_box_dataset(root, classes, {split: n})``."""
    return _make_box_dataset
