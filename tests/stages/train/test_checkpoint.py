"""Checkpoint contents: RNG states, atomic save and checked load, and the model file round trip."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.train.checkpoint import (
    CheckpointError,
    ModelFileError,
    build_model,
    capture_rng_state,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
    save_model_file,
)

CONFIG = {"backbone": "resnet18", "output_stride": 16, "embedding_dim": 4, "aspp_rates": [6, 12, 18],
          "dropout": 0.5, "freeze_upto": "layer1"}


def _draws() -> tuple:
    return random.random(), np.random.random(), np.random.normal(), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "c.pt", {"rng": [capture_rng_state()]})
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    assert _draws() == expected


def test_save_checkpoint_is_atomic_and_load_checks_the_format(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "checkpoints" / "epoch-0001.pt", {"epoch": 1, "w": torch.ones(2)})
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["epoch-0001.pt"]  # no temp file left
    torch.save({"w": torch.ones(2)}, tmp_path / "raw.pt")
    with pytest.raises(CheckpointError, match=r"raw\.pt: not a training checkpoint"):
        load_checkpoint(tmp_path / "raw.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"junk\.pt: cannot read the training checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format": "maskcontrast/train-checkpoint", "format_version": 99}, tmp_path / "new.pt")
    with pytest.raises(CheckpointError, match="format_version 99 is not readable"):
        load_checkpoint(tmp_path / "new.pt")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(CONFIG)
    with torch.no_grad():  # non-default weights and BatchNorm statistics
        for p in model.parameters():
            p.add_(0.01)
        model.decoder[2].running_mean.fill_(0.3)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, model, CONFIG, params={"epochs": 3}, init=None, epochs=3)
    return path, model


def test_load_model_rebuilds_the_same_network(model_file) -> None:
    path, model = model_file
    loaded, meta = load_model(path.parent)
    assert not loaded.training
    assert meta["model_config"] == CONFIG and meta["params"] == {"epochs": 3} and meta["epochs"] == 3
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.frozen == model.frozen and not loaded.backbone.layer1[0].conv1.weight.requires_grad
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a, b in zip(model.eval()(x), loaded(x)):
            assert torch.equal(a, b)


def test_load_model_errors_name_the_file_and_the_problem(model_file, tmp_path: Path) -> None:
    path, _ = model_file
    with pytest.raises(ModelFileError, match=r"model\.pt: model file not found"):
        load_model(tmp_path)
    save_checkpoint(tmp_path / "ckpt" / "model.pt", {"epoch": 1})
    with pytest.raises(ModelFileError, match="not a MaskContrast model file"):
        load_model(tmp_path / "ckpt")
    obj = torch.load(path, weights_only=True)
    wrong_width = tmp_path / "wrong-width" / "model.pt"  # real weights, a config they do not fit
    wrong_width.parent.mkdir()
    torch.save({**obj, "model_config": {**CONFIG, "embedding_dim": 8}}, wrong_width)
    with pytest.raises(ModelFileError, match=r"(?s)weights do not fit the resnet18 network .*size mismatch for head\.weight"):
        load_model(wrong_width)
    small = {"format": obj["format"], "format_version": 1, "state_dict": {"head.bias": torch.zeros(4)}}
    for change, message in (
        ({"backbone": "mobilenet_v2"}, "weights do not fit the mobilenet_v2 network"),
        ({"backbone": "vgg16"}, "backbone 'vgg16' is not one this code builds"),
    ):
        torch.save({**small, "model_config": {**CONFIG, **change}}, tmp_path / "bad.pt")
        with pytest.raises(ModelFileError, match=message):
            load_model(tmp_path / "bad.pt")
    torch.save({**small, "model_config": {"backbone": "resnet18"}}, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match="model_config must hold backbone, output_stride"):
        load_model(tmp_path / "bad.pt")
