"""Backbone initialisation from MoCo and torchvision checkpoints."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision

from stages.network.init import InitError, load_init
from stages.network.backbones import build_backbone


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    """A random torchvision ResNet-18 state dict, with ``fc.*``, standing in for ImageNet weights."""
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _assert_loaded(backbone: torch.nn.Module, source: dict[str, torch.Tensor]) -> None:
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, source[key]), key


@pytest.mark.parametrize("kind", ["auto", "torchvision"])
def test_torchvision_state_dict(tmp_path: Path, resnet18_state, kind: str) -> None:
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    backbone, _ = build_backbone("resnet18", 8)  # dilation does not change names or shapes
    report = load_init(backbone, path, kind)
    _assert_loaded(backbone, resnet18_state)
    assert report == {
        "kind": "torchvision",
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "loaded": len(resnet18_state) - 2,
        "ignored": ["fc.bias", "fc.weight"],
    }


def test_old_torchvision_files_without_batch_counters(tmp_path: Path, resnet18_state) -> None:
    old = {k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}
    backbone, _ = build_backbone("resnet18", 8)
    report = load_init(backbone, _save(old, tmp_path / "old.pth"), "auto")
    assert report["loaded"] == len(old) - 2
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, old[key]) if key in old else key.endswith("num_batches_tracked")


def test_moco_checkpoint(tmp_path: Path, resnet18_state) -> None:
    encoder = {k: v for k, v in resnet18_state.items() if not k.startswith("fc.")}
    mlp = {"fc.0.weight": torch.zeros(512, 512), "fc.0.bias": torch.zeros(512),
           "fc.2.weight": torch.zeros(128, 512), "fc.2.bias": torch.zeros(128)}
    state = {f"module.encoder_q.{k}": v for k, v in {**encoder, **mlp}.items()}
    state |= {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in encoder.items()}
    state |= {"module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = _save({"epoch": 800, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")

    backbone, _ = build_backbone("resnet18", 8)
    report = load_init(backbone, path, "auto")
    _assert_loaded(backbone, encoder)
    assert report["kind"] == "moco" and report["loaded"] == len(encoder)
    assert "module.encoder_q.fc.0.weight" in report["ignored"]
    assert "module.queue" in report["ignored"] and "module.encoder_k.conv1.weight" in report["ignored"]
    assert not any(k.startswith("module.encoder_q.layer") for k in report["ignored"])


def test_wrong_kind_is_refused(tmp_path: Path, resnet18_state) -> None:
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    backbone, _ = build_backbone("resnet18", 8)
    with pytest.raises(InitError, match=r"resnet18\.pth: not a MoCo checkpoint"):
        load_init(backbone, path, "moco")
    moco = _save({"state_dict": {f"module.encoder_q.{k}": v for k, v in resnet18_state.items()}},
                 tmp_path / "moco.pth")
    with pytest.raises(InitError, match="not a torchvision state dict"):
        load_init(backbone, moco, "torchvision")


def test_other_architecture_lists_missing_and_unexpected_keys(tmp_path: Path, resnet18_state) -> None:
    path = _save(resnet18_state, tmp_path / "resnet18.pth")
    backbone, _ = build_backbone("resnet50", 8)
    with pytest.raises(InitError) as error:
        load_init(backbone, path, "auto")
    message = str(error.value)
    assert str(path) in message and "as a torchvision checkpoint" in message
    missing = [k for k in backbone.state_dict() if k not in resnet18_state and "num_batches" not in k]
    listed = f"{len(missing)} [{', '.join(missing[:10])}, ... ({len(missing) - 10} more)]"
    assert f"missing keys {listed}" in message
    assert "layer1.0.conv3.weight" in message  # a ResNet-50 key absent from ResNet-18
    assert "unexpected keys 0 []" in message and "shape mismatches" in message


def test_shape_mismatch_and_extra_keys(tmp_path: Path, resnet18_state) -> None:
    broken = dict(resnet18_state)
    broken["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    broken["extra.weight"] = torch.zeros(1)
    backbone, _ = build_backbone("resnet18", 8)
    before = backbone.conv1.weight.clone()
    expected = r"unexpected keys 1 \[extra\.weight\].*conv1\.weight: file \(64, 3, 3, 3\) vs model \(64, 3, 7, 7\)"
    with pytest.raises(InitError, match=expected):
        load_init(backbone, _save(broken, tmp_path / "broken.pth"), "torchvision")
    assert torch.equal(backbone.conv1.weight, before)  # nothing loaded on failure


def test_unreadable_unknown_and_absent_files(tmp_path: Path) -> None:
    backbone, _ = build_backbone("resnet18", 8)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InitError, match="junk.pth: cannot be read as a tensors-only checkpoint"):
        load_init(backbone, junk)
    other = _save({"model": {"conv1.weight": torch.zeros(1)}, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(InitError, match=r"other.pth: cannot tell the checkpoint kind.*\['model', 'epoch'\]"):
        load_init(backbone, other)
    with pytest.raises(InitError, match="absent.pth: init checkpoint not found"):
        load_init(backbone, tmp_path / "absent.pth")
    with pytest.raises(InitError, match="unknown init kind 'simclr'"):
        load_init(backbone, other, "simclr")


@pytest.mark.realdata
def test_real_torchvision_mobilenet_weights(mobilenet_weights: Path) -> None:
    backbone, _ = build_backbone("mobilenet_v2", 8)
    report = load_init(backbone, mobilenet_weights, "auto")
    source = torch.load(mobilenet_weights, weights_only=True)
    assert report["kind"] == "torchvision"
    assert report["sha256"].startswith("b0353104")  # torchvision names files by their hash
    assert report["ignored"] == ["classifier.1.bias", "classifier.1.weight"]
    assert report["loaded"] == len(source) - 2
    _assert_loaded(backbone, source)
