"""The ``features`` estimator: the cut on planted feature grids, the foreground rule, repeated cuts,
determinism, and the stage's shards in-process and on dask."""
from __future__ import annotations

import pickle
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from stages.masks.features import (
    FeatureEstimator,
    FeatureParams,
    FeaturesError,
    foreground_grid,
    object_cuts,
    refine,
    seed_scores,
)

PARAMS = FeatureParams(crf=False)


def _unit(v):
    return v / np.linalg.norm(v, axis=0, keepdims=True)


def _grid(objects, h=16, w=24, c=16, noise=0.15, seed=0):
    """A (c, h, w) grid of unit vectors: sky over ground (two background 'stuff' directions), and
    each object (y0, y1, x0, x1) a compact block of its own direction."""
    rng = np.random.default_rng(seed)
    dirs = _unit(rng.normal(size=(c, 2 + len(objects))))
    grid = np.empty((c, h, w))
    grid[:, : h // 2] = dirs[:, 0, None, None]
    grid[:, h // 2:] = dirs[:, 1, None, None]
    truth = []
    for k, (y0, y1, x0, x1) in enumerate(objects):
        grid[:, y0:y1, x0:x1] = dirs[:, 2 + k, None, None]
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        truth.append(m)
    return _unit(grid + noise * rng.normal(size=grid.shape)).astype(np.float32), truth


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_the_cut_finds_a_planted_object():
    grid, [truth] = _grid([(6, 11, 9, 15)])
    prob = foreground_grid(grid, PARAMS)
    assert prob.shape == truth.shape and 0 <= prob.min() and prob.max() <= 1
    assert _iou(prob > 0.5, truth) > 0.9


def test_foreground_rule_picks_the_object_when_it_touches_a_border():
    grid, [truth] = _grid([(5, 12, 0, 6)])  # the object covers part of the left border
    assert truth[:, 0].any()
    scores = seed_scores(grid, PARAMS.temperature)
    assert scores[truth].mean() > scores[~truth].mean()
    assert _iou(foreground_grid(grid, PARAMS) > 0.5, truth) > 0.8


def test_repeated_cuts_find_each_object_best_first():
    grid, truths = _grid([(3, 7, 3, 8), (9, 14, 15, 21)], noise=0.1)
    found = object_cuts(grid, FeatureParams(crf=False, max_objects=3, min_object_score=0.3))
    assert len(found) >= 2
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)
    masks = [p > 0.5 for p, _ in found[:2]]
    for truth in truths:
        assert max(_iou(m, truth) for m in masks) > 0.8
    assert not (masks[0] & masks[1]).any()  # each cut takes patches the earlier ones left


def test_one_object_gives_one_cut():
    grid, _ = _grid([(6, 11, 9, 15)])
    assert len(object_cuts(grid, FeatureParams(crf=False, max_objects=3))) == 1


def test_the_cut_is_deterministic():
    grid, _ = _grid([(6, 11, 9, 15)], seed=3)
    assert np.array_equal(foreground_grid(grid, PARAMS), foreground_grid(grid.copy(), PARAMS))


def test_refine_snaps_to_the_image_and_keeps_its_size():
    img = np.full((60, 90, 3), 30, np.uint8)
    img[20:40, 30:60] = (230, 200, 40)
    prob = np.zeros((4, 6))
    prob[1:3, 2:4] = 0.9  # a coarse blob over the object
    out = refine(img, prob, FeatureParams(crf_size=64))
    assert out.shape == (60, 90) and out.dtype == np.float32
    truth = np.zeros((60, 90), bool)
    truth[20:40, 30:60] = True
    plain = refine(img, prob, FeatureParams(crf=False))
    assert _iou(out > 0.5, truth) >= _iou(plain > 0.5, truth)


@pytest.mark.parametrize("field, value", [("seed_share", 0.0), ("bg_prototypes", 0), ("backbone", "vgg"),
                                          ("crf_sxy", -1.0), ("size", 8)])
def test_impossible_settings_are_refused_by_name(field, value):
    with pytest.raises((FeaturesError, ValueError), match=field.split("_")[0]):
        FeatureParams(**{field: value})


def _image(seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
    img[14:34, 20:44] = (230, 190, 30)
    return img


def test_estimator_maps_an_image_and_pickles_without_its_network():
    est = FeatureEstimator(FeatureParams(size=64, crf_size=48), weights=None)
    img = _image()
    soft = est(img)
    assert soft.shape == img.shape[:2] and soft.dtype == np.float32 and 0 <= soft.min() <= soft.max() <= 1
    clone = pickle.loads(pickle.dumps(est))
    assert clone._grid is None  # the network is rebuilt lazily in each process
    assert est.describe()["estimator"] == "features"
    # the weights are recorded as their file and digest, the threads are bookkeeping
    assert set(est.describe()["estimator_params"]) == {
        "backbone", "size", "temperature", "seed_share", "bg_prototypes", "iterations", "sharpness", "crf", "crf_size",
        "crf_iterations", "crf_sxy", "crf_srgb", "crf_compat", "max_objects", "min_object_score", "class_prior"}


def test_estimator_is_deterministic_across_instances(mobilenet_weights):
    img = _image(1, (64, 96))
    a = FeatureEstimator(FeatureParams(size=96, crf_size=64), mobilenet_weights)(img)
    b = FeatureEstimator(FeatureParams(size=96, crf_size=64), mobilenet_weights)(img)
    assert np.array_equal(a, b)


@pytest.mark.realdata
def test_finds_davis_objects_with_imagenet_weights(davis_root, mobilenet_weights):
    from stages.evaluate.saliency_metrics import saliency_scores

    est = FeatureEstimator(FeatureParams(), mobilenet_weights)
    ious = []
    for image_id in ("blackswan_00000", "camel_00010", "car-roundabout_00050", "car-turn_00065", "goat_00045",
                     "horsejump-low_00010"):
        img = np.asarray(Image.open(davis_root / "images" / f"{image_id}.jpg").convert("RGB"))
        gt = np.asarray(Image.open(davis_root / "labels" / f"{image_id}.png")) > 0
        ious.append(saliency_scores(est(img), gt)["iou"])
    assert np.mean(ious) > 0.4, ious  # a centred ellipse scores 0.17 on this set, U2-Net-p 0.71


@pytest.mark.distributed
def test_local_cluster_and_in_process_write_identical_shards(tmp_path):
    from distributed import Client, LocalCluster

    from artifacts.masks import MaskStore
    from stages.data import DatasetIndex
    from stages.masks.postprocess import PostParams
    from stages.masks.stage import compute_masks

    (tmp_path / "d" / "images").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(_image(i)).save(tmp_path / "d" / "images" / f"i{i}.png")
    samples = DatasetIndex.open(tmp_path / "d").samples()
    est = FeatureEstimator(FeatureParams(size=64, crf_size=48), weights=None)
    compute_masks(samples, est, PostParams(), tmp_path / "sync", shard_size=3, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        compute_masks(samples, est, PostParams(), tmp_path / "dask", shard_size=3, client=client,
                      chunk_size=2, progress=False)

    def records(d):
        store = MaskStore(d)
        return [(r.id, r.mask.tobytes(), r.soft.tobytes()) for r in (store.get(i, soft=True) for i in store.ids())]

    assert records(tmp_path / "sync") == records(tmp_path / "dask")


# -- the class prior ----------------------------------------------------------------------------------------
def test_the_class_map_picks_which_of_two_objects_seeds_the_cut():
    # two compact objects: a class map that lights the one the plain cut takes second makes it first
    grid, (a, b) = _grid([(3, 7, 3, 8), (9, 14, 15, 21)], noise=0.1)
    first = object_cuts(grid, PARAMS)[0][0] > 0.5
    other = b if _iou(first, a) > _iou(first, b) else a
    assert _iou(first, other) < 0.2
    classes = np.where(other, 1.0, 0.05).astype(np.float32)
    chosen = object_cuts(grid, replace(PARAMS, class_prior=1.0), classes)[0][0] > 0.5
    assert _iou(chosen, other) > 0.8
    # off (0) or without a map: the scores are the plain ones
    plain = seed_scores(grid, PARAMS.temperature)
    assert np.array_equal(seed_scores(grid, PARAMS.temperature, classes, 0.0), plain)
    np.testing.assert_allclose(seed_scores(grid, PARAMS.temperature, classes, 0.5), plain * classes ** 0.5)
    with pytest.raises(ValueError, match="class map"):
        seed_scores(grid, PARAMS.temperature, classes[:-1], 0.5)


def test_the_feature_grid_gives_a_class_map_on_its_own_grid():
    est = FeatureEstimator(FeatureParams(size=64, crf_size=48, class_prior=0.25), weights=None)
    grid, classes = est.features(_image())
    assert classes is not None and classes.shape == grid.shape[1:] and classes.dtype == np.float32
    assert 0.0 <= classes.min() and classes.max() <= 1.0
    _, none = FeatureEstimator(FeatureParams(size=64, crf_size=48, class_prior=0.0), weights=None).features(_image())
    assert none is None


def test_weights_without_a_classifier_are_refused_with_the_key(tmp_path):
    import torch

    from stages.masks.features import load_classifier

    moco_like = tmp_path / "moco.pth"
    torch.save({"features.0.0.weight": torch.zeros(32, 3, 3, 3)}, moco_like)
    with pytest.raises(FeaturesError, match="class_prior: 0"):
        load_classifier("mobilenet_v2", moco_like)
    with_head = tmp_path / "imagenet.pth"
    torch.save({"classifier.1.weight": torch.ones(7, 1280), "classifier.1.bias": torch.zeros(7)}, with_head)
    layer = load_classifier("mobilenet_v2", with_head)
    assert layer.out_features == 7 and torch.equal(layer.weight, torch.ones(7, 1280))
