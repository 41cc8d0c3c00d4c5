"""segment_images with a stub model whose embedding is the normalised image and whose saliency is
its red channel, and hand-written clusterings: red objects -> class 1, magenta objects -> class 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.segment import SegmentError, segment_images

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
RED, MAGENTA = (255, 0, 0), (255, 0, 255)


@pytest.fixture
def stub(stub_model):
    """emb = the normalised image (3-d), saliency logit = its normalised red channel (object pixels
    ~2.2 > 0.5, the dark background < 0), trunk = the image average-pooled by 4."""
    return stub_model(image_embedding=True)


def _unit(rgb) -> list[float]:
    v = (np.asarray(rgb) / 255.0 - MEAN) / STD
    return (v / np.linalg.norm(v)).tolist()


def _images(tmp_path: Path) -> list[tuple[Path, tuple[int, int, int, int], int]]:
    """(path, object box y0 y1 x0 x1, expected class) of a few images of different sizes."""
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w, colour, cls) in enumerate([(40, 56, RED, 1), (64, 48, MAGENTA, 2), (37, 45, RED, 1)]):
        img = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        box = (h // 4, 3 * h // 4, w // 5, 3 * w // 5)
        img[box[0]:box[1], box[2]:box[3]] = colour
        path = tmp_path / "in" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(img).save(path)
        out.append((path, box, cls))
    return out


def _model_file(path: Path, protocol: str = "object") -> Path:
    if protocol == "object":
        centroids, mapping = [_unit(RED), _unit(MAGENTA)], [0, 1, 2]  # id 0 = unsalient
    else:  # every cell: background direction, red, magenta
        centroids, mapping = [_unit((30, 30, 30)), _unit(RED), _unit(MAGENTA)], [0, 1, 2]
    data = {"schema": "maskcontrast/kmeans-model", "schema_version": 1, "protocol": protocol, "n_clusters": 2,
            "pca": None, "class_names": ["background", "red", "magenta"],
            "per_seed": [{"seed": 5, "centroids": centroids, "mapping": mapping},
                         {"seed": 6, "centroids": centroids[::-1],
                          "mapping": [0, 2, 1] if protocol == "object" else [2, 1, 0]}],
            "extract": {"input_size": 32, "interpolation": "bilinear", "embedding": "head"},
            "feature_shape": [3, 8, 8]}
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("protocol", ["object", "pixel"])
def test_segment_writes_class_maps_of_the_image_size(tmp_path, protocol, stub):
    images = _images(tmp_path)
    bad = tmp_path / "in" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    model_path = _model_file(tmp_path / "kmeans_model.json", protocol)
    out = tmp_path / "out"
    summary = segment_images(stub, model_path, [p for p, _, _ in images] + [bad], out, device="cpu",
                             progress=False)
    assert summary["n_written"] == 3 and summary["n_skipped"] == 1 and str(bad) in summary["skipped"]
    assert summary["seed"] == 5 and summary["input_size"] == 32 and summary["protocol"] == protocol
    for path, (y0, y1, x0, x1), cls in images:
        with Image.open(out / f"{path.stem}.png") as im:
            assert im.mode == "P"
            classes = np.array(im)
        with Image.open(path) as src:
            assert classes.shape == (src.height, src.width)
        assert set(np.unique(classes)) <= {0, cls}
        box = np.zeros_like(classes, bool)
        box[y0:y1, x0:x1] = True
        pred = classes == cls
        # the pixel protocol predicts on an 8 x 8 grid: coarser object borders
        assert (pred & box).sum() / (pred | box).sum() > (0.8 if protocol == "object" else 0.6)
        with Image.open(out / f"{path.stem}_overlay.png") as ov:
            assert ov.size == (classes.shape[1], classes.shape[0]) and ov.mode == "RGB"
    assert not (out / "broken.png").exists()


def test_segment_seed_choice_and_errors(tmp_path, stub):
    images = _images(tmp_path)
    model_path = _model_file(tmp_path / "kmeans_model.json")
    # seed 6 swaps the centroid order and the matching: the same classes come out
    s = segment_images(stub, model_path, [images[1][0]], tmp_path / "o6", seed=6, device="cpu", progress=False)
    with Image.open(tmp_path / "o6" / "img1.png") as im:
        assert set(np.unique(np.array(im))) == {0, 2} and s["seed"] == 6
    with pytest.raises(SegmentError, match=r"no clustering for seed 9; it holds seeds \[5, 6\]"):
        segment_images(stub, model_path, [images[0][0]], tmp_path / "o", seed=9, device="cpu", progress=False)
    with pytest.raises(SegmentError, match="share the output name 'img0'"):
        segment_images(stub, model_path, [images[0][0], tmp_path / "img0.jpg"], tmp_path / "o",
                       device="cpu", progress=False)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SegmentError, match="not a clustering file"):
        segment_images(stub, tmp_path / "other.json", [images[0][0]], tmp_path / "o", device="cpu",
                       progress=False)


def test_segment_names_clusters_and_writes_a_legend(tmp_path, stub):
    """--names: cluster ids (from 0) renamed; clusters sharing a name are one class; legend.png."""
    images = _images(tmp_path)
    model_path = _model_file(tmp_path / "kmeans_model.json")  # cluster 0 red, cluster 1 magenta
    out = tmp_path / "named"
    s = segment_images(stub, model_path, [p for p, _, _ in images], out, device="cpu", progress=False,
                       names={0: "warm", 1: "warm"})
    assert set(s["class_pixel_share"]) == {"background", "warm"} and s["legend"] == "legend.png"
    assert (out / "legend.png").stat().st_size > 100
    for path, _, _ in images:
        with Image.open(out / f"{path.stem}.png") as im:
            assert set(np.unique(np.array(im))) == {0, 1}
    s = segment_images(stub, model_path, [images[1][0]], tmp_path / "one", device="cpu", progress=False,
                       names={1: "pink"})
    assert set(s["class_pixel_share"]) == {"background", "pink"}  # cluster 0 keeps "cluster 0", class 2
    with pytest.raises(SegmentError, match=r"names cluster 4, but there are 2 clusters \(0-1\)"):
        segment_images(stub, model_path, [images[0][0]], tmp_path / "o", device="cpu", progress=False,
                       names={4: "sky"})
    assert "legend" not in segment_images(stub, model_path, [images[0][0]], tmp_path / "plain",
                                          device="cpu", progress=False)  # an evaluate report, no names


def test_segment_writes_several_regions_when_the_clustering_saw_proposals(tmp_path, stub):
    """Embeddings with several proposals per image: the salient mask is split into components,
    each painted with its own class; without proposals the image's one prototype paints both."""
    rng = np.random.default_rng(1)
    img = rng.integers(0, 60, (48, 64, 3), dtype=np.uint8)
    img[8:40, 4:26] = RED
    img[8:40, 38:60] = MAGENTA
    path = tmp_path / "in" / "pair.png"
    path.parent.mkdir()
    Image.fromarray(img).save(path)
    plain = _model_file(tmp_path / "plain.json")
    data = json.loads(plain.read_text())
    data["extract"]["proposals"] = {"proposals": "components", "max_proposals": 3, "min_proposal": 0.01}
    split = tmp_path / "split.json"
    split.write_text(json.dumps(data))
    summary = segment_images(stub, split, [path], tmp_path / "two", device="cpu", progress=False)
    segment_images(stub, plain, [path], tmp_path / "one", device="cpu", progress=False)
    with Image.open(tmp_path / "two" / "pair.png") as im:
        two = np.array(im)
    with Image.open(tmp_path / "one" / "pair.png") as im:
        one = np.array(im)
    assert summary["regions"].startswith("connected components")
    assert (two[12:36, 8:22] == 1).all() and (two[12:36, 42:56] == 2).all()  # each object its class
    assert len(set(np.unique(one)) - {0}) == 1  # one prototype per image: one class for both
    assert set(np.unique(two)) == {0, 1, 2}
