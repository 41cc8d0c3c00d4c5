"""Bootstrapped saliency: refinement arithmetic, fit -> checkpoint -> estimator, resume, pickling,
determinism, skipped images. Tiny synthetic images (a bright disk on noise), 1 epoch per round."""
from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.data import Sample
from stages.masks.bootstrap import (
    BootstrapError,
    BootstrapEstimator,
    BootstrapParams,
    calibrate,
    fit_bootstrap,
    fraction_threshold,
    refine_labels,
    round_checkpoint,
    round_labels,
    to_u8,
)
from stages.masks.bootstrap import estimator as bs_estimator
from stages.masks.bootstrap import fit as bs_fit
from stages.masks.bootstrap import maps as bs_maps
from stages.masks.bootstrap import net as bs_net
from stages.masks.bootstrap import teacher as bs_teacher
from stages.masks.bootstrap import workdir as bs_workdir
from stages.masks.features import crf_refine
from stages.masks.priors import PriorParams
from stages.params import ParamError
from stages.network.backbones import build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

PRIORS = PriorParams(size=48, n_segments=40)
TINY = BootstrapParams(rounds=1, epochs_per_round=1, input_size=32, batch_size=4, decoder_channels=8,
                       device="cpu")
TWO_ROUNDS = replace(TINY, rounds=2, ema=0.6)


def _disk_image(rng: np.random.Generator, h: int = 40, w: int = 56) -> np.ndarray:
    """A bright disk at a random place on dark noise: uint8 (h, w, 3)."""
    img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
    cy, cx, r = rng.integers(12, h - 12), rng.integers(12, w - 12), rng.integers(6, 11)
    ys, xs = np.mgrid[0:h, 0:w]
    img[(ys - cy) ** 2 + (xs - cx) ** 2 < r * r] = rng.integers(200, 256, 3).astype(np.uint8)
    return img


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> list[Sample]:
    root = tmp_path_factory.mktemp("disks")
    rng = np.random.default_rng(0)
    out = []
    for i in range(8):
        path = root / f"img{i}.png"
        Image.fromarray(_disk_image(rng)).save(path)
        out.append(Sample(f"img{i}", path, None))
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_refine_labels_matches_hand_computation():
    previous = np.array([[0.0, 1.0], [0.5, 0.2]], np.float32)
    prediction = np.array([[1.0, 1.0], [0.0, 0.6]], np.float32)
    # 0.7 * previous + 0.3 * prediction, by hand
    expected = np.array([[0.3, 1.0], [0.35, 0.32]], np.float32)
    np.testing.assert_allclose(refine_labels(previous, prediction, 0.7), expected, atol=1e-6)
    np.testing.assert_array_equal(refine_labels(previous, prediction, 0.0), prediction)
    with pytest.raises(ValueError, match="shapes differ"):
        refine_labels(previous, prediction[:1], 0.5)


def test_calibrate_sends_the_threshold_to_one_half_and_keeps_the_order():
    p = np.array([0.01, 0.1, 0.2, 0.5, 0.9], np.float32)
    out = calibrate(p, 0.2)
    assert out[2] == pytest.approx(0.5, abs=1e-6)
    assert np.all(np.diff(out) > 0)
    # by hand: logit 0.1 - logit 0.2 = ln(1/9) - ln(1/4) = ln(4/9)  ->  sigmoid = 4 / 13
    assert out[1] == pytest.approx(4 / 13, abs=1e-6)
    np.testing.assert_allclose(calibrate(p, 0.5), p, atol=1e-6)


def test_fraction_threshold_leaves_the_requested_share_above():
    values = np.arange(1000, dtype=np.float32) / 1000.0
    t = fraction_threshold(values, 0.1)
    assert np.mean(values > t) == pytest.approx(0.1, abs=0.002)
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\)"):
        fraction_threshold(values, 0.0)


def test_params_are_validated():
    with pytest.raises(ParamError, match="^input_size: must be a multiple of 32, >= 32, got 100$"):
        BootstrapParams(input_size=100)
    with pytest.raises(ParamError, match=r"^ema: must be < 1.0, got 1.0$"):
        BootstrapParams(ema=1.0)
    with pytest.raises(ParamError, match="^backbone: expected one of .*'mobilenet_v2', got 'vgg16'$"):
        BootstrapParams(backbone="vgg16")
    with pytest.raises(ParamError, match="^freeze: expected one of 'none', 'stem', .*, got 'layer9'$"):
        BootstrapParams(freeze="layer9")
    with pytest.raises(ParamError, match=r"^label_threshold: must be < 1.0, got 1.0$"):
        BootstrapParams(label_threshold=1.0)


def test_the_fit_records_the_parameters_it_always_recorded():
    """fit.json and the checkpoints name a fit by these keys: a work_dir made before stays usable."""
    recorded = bs_fit._config(TINY, PRIORS)["params"]
    assert set(recorded) == {"backbone", "init", "rounds", "epochs_per_round", "input_size", "batch_size", "lr",
                             "ema", "label_threshold", "calibrate", "iou_weight", "crop_scale", "decoder_channels",
                             "freeze", "seed", "num_workers", "device"}


def test_pretrained_init_and_frozen_stages_stay_put(samples, tmp_path):
    init = tmp_path / "init.pth"
    torch.manual_seed(123)
    torch.save(build_backbone("mobilenet_v2", 32)[0].state_dict(), init)
    params = replace(TINY, init=str(init), freeze="layer2")
    state = _state(fit_bootstrap(samples, PRIORS, params, tmp_path / "work", progress=False))
    start = torch.load(init, weights_only=True)
    frozen = [k for k in start if k.startswith(tuple(f"features.{i}." for i in range(7)))]
    trained = [k for k in start if k.startswith("features.17.") and k.endswith("weight")]
    assert frozen and trained
    assert all(torch.equal(state[f"backbone.{k}"], start[k]) for k in frozen)  # weights and BN statistics
    assert not any(torch.equal(state[f"backbone.{k}"], start[k]) for k in trained)


@pytest.fixture(scope="module")
def fitted(samples, tmp_path_factory) -> Path:
    """work_dir of a finished two-round fit (ema 0.6), shared by the tests that only read it."""
    work = tmp_path_factory.mktemp("fit2")
    fit_bootstrap(samples, PRIORS, TWO_ROUNDS, work, progress=False)
    return work


def test_fit_gives_a_checkpoint_and_a_map_of_the_image_size(samples, fitted, monkeypatch):
    ckpt = round_checkpoint(fitted, 2)
    assert ckpt.is_file() and round_checkpoint(fitted, 1).is_file()
    est = BootstrapEstimator(ckpt)
    img = _disk_image(np.random.default_rng(5), 37, 61)
    soft = est(img)
    assert soft.shape == (37, 61) and soft.dtype == np.float32
    assert 0.0 <= soft.min() and soft.max() <= 1.0
    d = est.describe()
    assert d["estimator"] == "bootstrap" and len(d["checkpoint_sha256"]) == 64
    assert d["estimator_params"]["input_size"] == 32 and d["estimator_params"]["round"] == 2
    # a second call finds the final checkpoint and does nothing
    monkeypatch.setattr(bs_fit, "prepare_data", None)
    assert fit_bootstrap(samples, PRIORS, TWO_ROUNDS, fitted, progress=False) == ckpt


def test_estimator_pickle_round_trip(fitted):
    est = BootstrapEstimator(round_checkpoint(fitted, 2))
    img = _disk_image(np.random.default_rng(1))
    before = est(img)  # loads the network, which must not travel in the pickle
    clone = pickle.loads(pickle.dumps(est))
    assert clone._net is None
    np.testing.assert_array_equal(clone(img), before)


def test_fit_is_deterministic_for_a_seed(samples, fitted, tmp_path):
    # Each round is seeded by (seed, round) alone: a one-round fit redoes round 1 of the two-round one.
    a = fit_bootstrap(samples, PRIORS, replace(TWO_ROUNDS, rounds=1), tmp_path / "a", progress=False)
    b = fit_bootstrap(samples, PRIORS, replace(TWO_ROUNDS, rounds=1, seed=1), tmp_path / "b", progress=False)
    assert _same_state(_state(a), _state(round_checkpoint(fitted, 1)))
    assert not _same_state(_state(a), _state(b))


def test_resume_skips_finished_rounds_and_matches_an_uninterrupted_fit(samples, fitted, tmp_path, monkeypatch):
    work = tmp_path / "resumed"
    shutil.copytree(fitted, work)
    round_checkpoint(work, 2).unlink()  # as if interrupted during round 2
    trained, prepared = [], []
    original_train, original_prepare = bs_fit._train_round, bs_teacher._prepare_one
    monkeypatch.setattr(bs_fit, "_train_round", lambda net, imgs, labels, level, p, r, *a: trained.append(r)
                        or original_train(net, imgs, labels, level, p, r, *a))
    monkeypatch.setattr(bs_teacher, "_prepare_one", lambda task: prepared.append(task) or original_prepare(task))
    resumed = fit_bootstrap(samples, PRIORS, TWO_ROUNDS, work, progress=False)
    assert trained == [2]  # round 1 was not retrained
    assert prepared == []  # the prior maps came from the cache
    assert _same_state(_state(resumed), _state(round_checkpoint(fitted, 2)))


def test_round_labels_are_the_moving_average_of_priors_and_predictions(samples, fitted):
    [cache] = fitted.glob("priors-*.npz")
    with np.load(cache) as z:
        ids, priors = list(z["ids"]), z["maps"]
    with np.load(round_labels(fitted, 1)) as z:
        assert list(z["ids"]) == ids
        labels = z["labels"]
    # by hand: images at the input size, round-1 network with flip TTA, calibrated so that the
    # priors' foreground share exceeds 0.5, then 0.6 prior + 0.4 prediction
    est = BootstrapEstimator(round_checkpoint(fitted, 1))
    net = est._load()
    images = np.stack([bs_maps.resize_square(np.asarray(Image.open(s.image)), 32) for s in samples])
    x = bs_net.normalise(torch.from_numpy(images))
    with torch.no_grad():
        pred = 0.5 * (torch.sigmoid(net(x)) + torch.sigmoid(net(x.flip(-1))).flip(-1))[:, 0].numpy()
    fg = np.mean(priors > 127.5)
    assert est._ckpt["fg_fraction"] == pytest.approx(fg)
    threshold = np.quantile(pred, 1.0 - fg)
    assert est._ckpt["threshold"] == pytest.approx(threshold, abs=1e-4)
    shift = np.log(threshold / (1.0 - threshold))
    pred = 1.0 / (1.0 + np.exp(-(np.log(pred / (1.0 - pred)) - shift)))
    expected = to_u8(0.6 * priors / 255.0 + 0.4 * pred)
    assert np.abs(labels.astype(int) - expected.astype(int)).max() <= 1  # float rounding at .5 boundaries


def test_unreadable_images_are_skipped_and_reported(samples, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    work = tmp_path / "work"
    fit_bootstrap([*samples, Sample("broken", bad, None)], PRIORS, TINY, work, progress=False)
    skipped = (work / bs_workdir.SKIPPED_FILE).read_text()
    assert "broken" in skipped and "not an image file" in skipped


def test_work_dir_with_other_parameters_is_refused(samples, fitted):
    with pytest.raises(BootstrapError, match="holds a bootstrap fit with other parameters"):
        fit_bootstrap(samples, PRIORS, replace(TWO_ROUNDS, lr=0.1), fitted, progress=False)


class BrightTeacher:
    """A picklable stand-in for another estimator: the image's brightness above its median."""

    def describe(self) -> dict:
        return {"estimator": "bright"}

    def __call__(self, img: np.ndarray) -> np.ndarray:
        grey = img.astype(np.float32).mean(-1)
        return (grey > np.median(grey) + 60).astype(np.float32)


def test_a_teacher_estimator_gives_the_first_pseudo_labels(samples, tmp_path):
    work = tmp_path / "work"
    ckpt = fit_bootstrap(samples, BrightTeacher(), TINY, work, progress=False)
    assert ckpt.exists()
    [cache] = work.glob("priors-*.npz")
    with np.load(cache) as z:
        maps = z["maps"]
    img = np.asarray(Image.open(samples[0].image))
    assert np.array_equal(maps[0], to_u8(bs_maps.resize_square(BrightTeacher()(img), 32)))
    config = json.loads((work / bs_workdir.FIT_FILE).read_text())
    assert config["prior_params"] == {"teacher": {"estimator": "bright"}}
    with pytest.raises(BootstrapError, match="other parameters"):  # the same work_dir with the priors
        fit_bootstrap(samples, PRIORS, TINY, work, progress=False)


def test_the_priors_teacher_keeps_its_cache_name_and_fit_file():
    assert bs_teacher.teacher_config(PRIORS) == dataclasses.asdict(PRIORS)  # fits made before teachers existed resume


def test_crf_option_snaps_the_map_to_the_images_edges_and_travels_in_the_pickle(samples, fitted):
    ckpt = round_checkpoint(fitted, 2)
    img = _disk_image(np.random.default_rng(7), 48, 64)
    plain, snapped = BootstrapEstimator(ckpt), BootstrapEstimator(ckpt, crf=True)
    a, b = plain(img), snapped(img)
    assert b.shape == a.shape and b.dtype == np.float32 and 0.0 <= b.min() and b.max() <= 1.0
    assert not np.allclose(a, b)
    np.testing.assert_allclose(b, crf_refine(img, _network_map(plain, img), bs_estimator.BOOTSTRAP_CRF, 256), atol=1e-6)
    assert snapped.describe()["estimator_params"]["crf"] is True and "crf" not in plain.describe()["estimator_params"]
    clone = pickle.loads(pickle.dumps(snapped))
    np.testing.assert_array_equal(clone(img), b)


def _network_map(est: BootstrapEstimator, img: np.ndarray) -> np.ndarray:
    """The calibrated S x S map the estimator resizes (or refines) to the image."""
    net = est._load()
    x = bs_net.normalise(torch.from_numpy(bs_maps.resize_square(img, est._ckpt["input_size"])[None]))
    return calibrate(bs_net.predict_tta(net, x.contiguous(memory_format=torch.channels_last))[0].numpy(),
                        est._ckpt["threshold"])


def test_crf_is_not_part_of_the_fit(samples, fitted):
    # the same work_dir serves both: the option only post-processes the estimator's maps
    assert fit_bootstrap(samples, PRIORS, replace(TWO_ROUNDS, crf=True), fitted, progress=False) == \
        round_checkpoint(fitted, 2)
