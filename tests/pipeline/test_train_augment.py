"""``train.augment`` and the view-pair keys: the reference's values keep the train versions made
before the keys existed."""
from __future__ import annotations

import pytest

from artifacts.store import ArtifactSpec
from pipeline.cli import State
from pipeline.configtypes import ConfigError
from pipeline.graph import plan

REFERENCE = ["train.augment.crop_scale=[0.2, 1.0]", "train.augment.jitter=[0.4, 0.4, 0.4, 0.1]",
             "train.augment.jitter_p=0.8", "train.augment.gray_p=0.2", "train.augment.flip_p=0.5"]


@pytest.fixture
def project(tmp_path, monkeypatch, make_box_dataset):
    make_box_dataset(tmp_path / "data", ["background", "box"], {"train": 2, "val": 2})
    (tmp_path / "pipeline.yaml").write_text("store: store\ndata: {root: data}\n")
    monkeypatch.chdir(tmp_path)


def _train(*overrides: str):
    ctx = State("pipeline.yaml", overrides, None, True, False).context()
    return ctx, plan(ctx, ("train",))["train"].spec


def test_reference_augment_is_left_out_of_the_version(project):
    ctx, spec = _train(*REFERENCE)
    assert "augment" not in spec.params
    section = {k: v for k, v in ctx.cfg.section("train").items() if k != "augment"}
    before = {**section, "data": ctx.data_identity("train"),  # the formula before the key existed
              "compute": spec.params["compute"]}  # (the resolved device type and precision came later)
    assert spec.version == ArtifactSpec("train", spec.schema_version, before, spec.inputs,
                                        spec.algorithm_version).version


def test_other_augment_is_a_new_version_naming_it(project):
    _, reference = _train()
    _, gray = _train("train.augment.gray_p=0.8")
    assert gray.version != reference.version
    assert gray.params["augment"]["gray_p"] == 0.8
    _, again = _train("train.augment.gray_p=0.8")
    assert again.version == gray.version


@pytest.mark.parametrize("override, message", [
    ("train.augment.crop_scale=[0.6, 0.5]", "0 < min <= max <= 1"),
    ("train.augment.jitter=[0.4, 0.4, 0.4]", "brightness, contrast, saturation, hue"),
    ("train.augment.jitter=[0.4, 0.4, 0.4, 0.7]", "hue <= 0.5"),
    ("train.augment.gray_p=1.5", "<= 1.0"),
    ("train.augment.grey=0.5", "unknown key"),
])
def test_bad_augment_names_the_key(project, override, message):
    with pytest.raises(ConfigError, match=message) as info:
        _train(override)
    assert override.split("=")[0] in str(info.value)


def test_view_pair_keys_are_settable_and_enter_the_version_only_when_set(project):
    _, reference = _train()
    assert not {"min_fg", "max_fg", "redraws"} & set(reference.params)  # the versions made before the keys
    ctx, redraws = _train("train.redraws=5")
    assert ctx.cfg.train.redraws == 5 and redraws.params["redraws"] == 5 and redraws.version != reference.version
    _, at_default = _train("train.min_fg=0.01")
    assert at_default.version == reference.version
    with pytest.raises(ConfigError, match=r"^train.min_fg: must be below max_fg \(0.3\), got 0.5 "):
        _train("train.min_fg=0.5", "train.max_fg=0.3")
