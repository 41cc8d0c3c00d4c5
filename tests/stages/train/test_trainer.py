"""The training run: schedule, init-alone artifact, determinism, exact resume, divergence. Runs
use resnet18 at 32 px on a handful of synthetic images with square masks."""
from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from artifacts.checkpoints import LOG_FILE, MODEL_FILE, read_jsonl
from artifacts.masks import MaskRecord, write_mask_shard
from stages.data import Sample
from stages.params import ParamError
from stages.train import CheckpointError, TrainDataError, TrainingDiverged, TrainParams, load_model, train
from stages.train import step, trainer
from stages.train.checkpoint import build_model
from stages.train.data import ViewAugment
from stages.train.params import AugmentParams
from stages.train.step import model_config
from stages.train.trainer import poly_lr

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = TrainParams(backbone="resnet18", epochs=2, batch_size=4, queue_size=8, crop_size=32, embedding_dim=8,
                   lr=0.05, num_workers=0, keep_last=1, device="cpu", seed=3)
TIMING = ("images_per_s", "data_wait_share", "seconds")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[Sample], Path]:
    """12 images 40 x 48: noise with a red square, the square as mask (one shard)."""
    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    samples, records = [], []
    for i in range(12):
        pixels = rng.integers(0, 200, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), bool)
        y, x = rng.integers(0, 20, 2)
        mask[y:y + 18, x:x + 22] = True
        pixels[mask] = (230, 40, 40)
        Image.fromarray(pixels).save(root / f"im{i:02d}.png")
        samples.append(Sample(f"im{i:02d}", root / f"im{i:02d}.png", None))
        records.append(MaskRecord(f"im{i:02d}", mask))
    write_mask_shard(root / "masks" / "shard-00000.h5", records)
    return samples, root / "masks"


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _state(path: Path) -> dict:
    """A checkpoint or model file, memory-mapped (only what is compared is read)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- pieces


def test_poly_schedule_is_the_references_per_epoch_rule() -> None:
    assert poly_lr(0.004, 1, 40) == 0.004
    assert poly_lr(0.004, 40, 40) == pytest.approx(0.004 * (1 / 40) ** 0.9)
    assert poly_lr(1.0, 3, 4) == pytest.approx(0.5 ** 0.9)


def test_params_are_checked_naming_the_key() -> None:
    with pytest.raises(ParamError, match=r"^queue_size: must be a multiple of batch_size \(64\), got 100$"):
        TrainParams(queue_size=100)
    with pytest.raises(ParamError, match="^amp: expected one of 'auto', 'off', 'bf16', 'fp16', got 'fp8'$"):
        TrainParams(amp="fp8")
    with pytest.raises(ParamError, match=r"^min_fg: must be below max_fg \(0.4\), got 0.5$"):
        TrainParams(min_fg=0.5, max_fg=0.4)
    with pytest.raises(ParamError, match=r"^augment: unknown keys \['grey'\]"):
        TrainParams(augment={"grey": 0.5})
    with pytest.raises(ParamError, match=r"^augment.gray_p: must be <= 1.0, got 1.5$"):
        TrainParams(augment={"gray_p": 1.5})
    with pytest.raises(ParamError, match="^augment.crop_scale: needs"):
        TrainParams(augment={"crop_scale": [0.6, 0.5]})


def test_augment_overrides_the_references_view_augmentation() -> None:
    assert trainer.view_augment(TrainParams(crop_size=64)) == ViewAugment(crop_size=64)  # all defaults
    p = TrainParams(crop_size=64, augment={"crop_scale": [0.5, 1.0], "gray_p": 0.8})
    assert p.augment == AugmentParams(crop_scale=(0.5, 1.0), gray_p=0.8)  # complete
    assert trainer.view_augment(p) == dataclasses.replace(ViewAugment(crop_size=64), scale=(0.5, 1.0), gray_p=0.8)


# --------------------------------------------------------------------------- runs


def test_zero_epochs_writes_the_initialisation_alone(tmp_path: Path) -> None:
    summary = train(dataclasses.replace(TINY, epochs=0), [], tmp_path / "no-masks", tmp_path / "out",
                    progress=False)
    assert summary["complete"] and summary["epochs"] == 0 and summary["steps"] == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MODEL_FILE]
    model, meta = load_model(tmp_path / "out")
    assert meta["epochs"] == 0 and meta["params"]["epochs"] == 0 and meta["init"] is None
    torch.manual_seed(TINY.seed)
    _assert_same_tensors(build_model(model_config(TINY)).state_dict(), model.state_dict())


def test_zero_epochs_with_an_init_checkpoint_holds_its_backbone_weights(tmp_path: Path) -> None:
    """The baseline row "init alone" (e.g. MoCo v2 alone): model.pt carries the loaded weights."""
    torch.manual_seed(1)
    backbone = torchvision.models.resnet18().state_dict()  # a torchvision-layout checkpoint
    torch.save(backbone, tmp_path / "init.pth")
    params = dataclasses.replace(TINY, epochs=0, init=str(tmp_path / "init.pth"))
    summary = train(params, [], tmp_path / "no-masks", tmp_path / "out", progress=False)
    assert summary["init"]["kind"] == "torchvision" and summary["init"]["ignored"] == ["fc.bias", "fc.weight"]
    model, meta = load_model(tmp_path / "out")
    assert meta["init"] == summary["init"]
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, backbone[name]), name


def test_images_without_masks_fail_before_any_work(data, tmp_path: Path) -> None:
    samples, masks = data
    stranger = Sample("stranger", samples[0].image, None)
    with pytest.raises(TrainDataError, match=r"1 training images have no mask in .*: stranger"):
        train(TINY, samples[:4] + [stranger], masks, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_same_seed_gives_the_same_loss_curve_whatever_the_workers(data, tmp_path: Path) -> None:
    samples, masks = data
    params = dataclasses.replace(TINY, epochs=1)  # 3 steps per epoch; stop after 2: no checkpoint
    curves = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        summary = train(dataclasses.replace(params, num_workers=workers), samples, masks, out,
                        progress=False, max_steps=2)
        assert not summary["complete"] and summary["steps"] == 2 and not (out / MODEL_FILE).exists()
        curves.append(_without_timing(read_jsonl(out / LOG_FILE)))
    assert len(curves[0]) == 2 and all(math.isfinite(r["loss"]) for r in curves[0])
    assert curves[0] == curves[1]


def test_resume_after_an_interruption_ends_with_the_same_weights_queue_and_log(data, tmp_path: Path) -> None:
    """A crash after epoch 1 leaves epoch-0001.pt and the log (plus, here, lines written after the
    checkpoint and a torn one); rerunning continues from it and ends bit for bit where an
    uninterrupted run ends: weights, key encoder, queue, optimiser, log."""
    samples, masks = data
    samples = samples[:4]  # one step per epoch
    params = dataclasses.replace(TINY, keep_last=2)
    full = train(params, samples, masks, tmp_path / "full", progress=False)
    assert full["complete"] and full["steps"] == 2 and full["resumed_from_epoch"] is None

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "epoch-0001.pt", run / "checkpoints")
    first = _state(run / "checkpoints" / "epoch-0001.pt")
    assert int(first["queue"]["ptr"]) == 4 and int(first["queue"]["filled"]) == 4  # half-full queue
    lines = (tmp_path / "full" / LOG_FILE).read_text().splitlines(keepends=True)
    (run / LOG_FILE).write_text("".join(lines[:first["log_lines"]]) + lines[2] + '{"type": "step", "ep')
    with pytest.raises(CheckpointError, match=r"other training parameters \(lr: checkpoint 0.05 vs now 0.01\)"):
        train(dataclasses.replace(params, lr=0.01), samples, masks, run, progress=False)
    with pytest.raises(CheckpointError, match="written for another list of training images"):
        train(params, samples[1:] + samples[:1], masks, run, progress=False)

    with pytest.raises(CheckpointError, match=r"other training parameters \(augment: "):
        train(dataclasses.replace(params, augment={"gray_p": 0.8}), samples, masks, run, progress=False)
    before_the_key = torch.load(run / "checkpoints" / "epoch-0001.pt", map_location="cpu", weights_only=False)
    del before_the_key["params"]["augment"]  # a checkpoint written before the key existed resumes
    torch.save(before_the_key, run / "checkpoints" / "epoch-0001.pt")

    resumed = train(dataclasses.replace(params, keep_last=1), samples, masks, run, progress=False)
    assert resumed["complete"] and resumed["resumed_from_epoch"] == 1 and resumed["steps"] == 2
    assert resumed["loss"] == full["loss"]
    a, b = _state(tmp_path / "full" / "checkpoints" / "epoch-0002.pt"), _state(run / "checkpoints" / "epoch-0002.pt")
    for part in ("model", "key", "queue"):
        _assert_same_tensors(a[part], b[part])
    for index, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"])
    _assert_same_tensors(_state(tmp_path / "full" / MODEL_FILE)["state_dict"], _state(run / MODEL_FILE)["state_dict"])
    assert _without_timing(read_jsonl(run / LOG_FILE)) == _without_timing(read_jsonl(tmp_path / "full" / LOG_FILE))
    assert [r["type"] for r in read_jsonl(run / LOG_FILE)] == ["step", "epoch", "step", "epoch"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0002.pt"]  # keep_last 1
    assert (run / "loss_curve.png").stat().st_size > 0


def test_a_non_finite_loss_stops_naming_the_step_and_the_last_good_checkpoint(
        data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples, masks = data
    samples = samples[:4]
    calls = []
    real_bce = step.balanced_bce

    def nan_from_the_second_step(logit, mask):
        calls.append(1)
        loss = real_bce(logit, mask)
        return loss * float("nan") if len(calls) >= 2 else loss

    monkeypatch.setattr(step, "balanced_bce", nan_from_the_second_step)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* at epoch 2, step 2; "
                                               r"last good checkpoint: .*checkpoints/epoch-0001\.pt") as info:
        train(TINY, samples, masks, tmp_path, progress=False)
    assert info.value.step == 2 and info.value.checkpoint == tmp_path / "checkpoints" / "epoch-0001.pt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch-0001.pt"]
    assert not (tmp_path / MODEL_FILE).exists()
    assert [r["type"] for r in read_jsonl(tmp_path / LOG_FILE)] == ["step", "epoch"]  # nothing logged for it


@pytest.mark.slow
def test_resume_mid_epoch_with_workers_equals_an_uninterrupted_run(data, tmp_path: Path) -> None:
    """Three epochs of three steps; the interrupted run stops inside epoch 2 (max_steps) with two
    loader workers and resumes from the epoch-1 checkpoint with none."""
    samples, masks = data
    params = dataclasses.replace(TINY, epochs=3, keep_last=2)
    train(params, samples, masks, tmp_path / "full", progress=False)
    stopped = train(dataclasses.replace(params, num_workers=2), samples, masks, tmp_path / "run",
                    progress=False, max_steps=5)
    assert not stopped["complete"] and stopped["steps"] == 5 and stopped["epochs"] == 1
    assert len(read_jsonl(tmp_path / "run" / LOG_FILE)) == 6  # 5 steps + 1 epoch line
    train(params, samples, masks, tmp_path / "run", progress=False)
    for name in ("epoch-0002.pt", "epoch-0003.pt"):
        a, b = _state(tmp_path / "full" / "checkpoints" / name), _state(tmp_path / "run" / "checkpoints" / name)
        for part in ("model", "key", "queue"):
            _assert_same_tensors(a[part], b[part])
    assert (_without_timing(read_jsonl(tmp_path / "run" / LOG_FILE))
            == _without_timing(read_jsonl(tmp_path / "full" / LOG_FILE)))


@pytest.mark.gpu
@pytest.mark.parametrize("amp", ["bf16", "fp16", "off"])
def test_cuda_mixed_precision_trains_and_resumes(data, tmp_path: Path, amp: str) -> None:
    samples, masks = data
    params = dataclasses.replace(TINY, device="cuda", amp=amp, keep_last=2, epochs=2)
    full = train(params, samples[:8], masks, tmp_path / "full", progress=False)
    assert full["complete"] and full["amp"] == amp and full["device"].startswith("cuda")
    assert math.isfinite(full["loss"])
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "full" / "checkpoints" / "epoch-0001.pt", tmp_path / "run" / "checkpoints")
    resumed = train(params, samples[:8], masks, tmp_path / "run", progress=False)
    assert resumed["resumed_from_epoch"] == 1 and math.isfinite(resumed["loss"])
    model, _ = load_model(tmp_path / "run", map_location="cuda")
    assert next(model.parameters()).is_cuda
