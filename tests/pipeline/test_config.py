"""Configuration: every bad value is rejected before any work, naming the key and the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Config, check_paths, load_config, parse_override
from pipeline.configtypes import ConfigError, field_docs

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text):
    p = tmp_path / "pipeline.yaml"
    p.write_text(text)
    return p


def test_repository_pipeline_yaml_is_valid():
    cfg = load_config(REPO / "pipeline.yaml")  # the defaults for real photos
    assert cfg.masks.method == "features" and cfg.masks.features.init == "imagenet"
    assert cfg.train.init == "imagenet" and cfg.train.backbone == "mobilenet_v2"
    assert cfg.data.root == REPO / "photos"  # relative to the file's directory


def test_demo_config_is_weight_free():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.masks.method == "priors" and cfg.train.init == "random"
    assert cfg.data.root == REPO / "demo-data" and cfg.store == REPO / "store"  # normalised: no configs/../


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.train.temperature == 0.5 and cfg.evaluate.seeds == (1234, 1235, 1236, 1237, 1238)


@pytest.mark.parametrize("text, key, message", [
    ("masks:\n  methd: priors\n", "masks.methd", "unknown key"),
    ("trian:\n  epochs: 3\n", "trian", "unknown key"),
    ("train:\n  epochs: -1\n", "train.epochs", "must be >= 0"),
    ("train:\n  epochs: three\n", "train.epochs", "expected an integer"),
    ("train:\n  epochs: 2.5\n", "train.epochs", "expected an integer"),
    ("masks:\n  threshold: 1.5\n", "masks.threshold", "must be <= 1"),
    ("masks:\n  method: magic\n", "masks.method", "expected one of"),
    ("masks:\n  store_soft: 'yes'\n", "masks.store_soft", "expected true or false"),
    ("masks:\n  min_fg: 0.5\n  max_fg: 0.4\n", "masks.min_fg", "must be below max_fg"),
    ("masks:\n  method: model\n", "masks.model_path", "no model file"),
    ("train:\n  batch_size: 64\n  queue_size: 100\n", "train.queue_size", "multiple of batch_size"),
    ("evaluate:\n  protocols: [kmeans, knn]\n", "evaluate.protocols[1]", "expected one of"),
    ("evaluate:\n  protocols: []\n", "evaluate.protocols", "must not be empty"),
    ("evaluate:\n  seeds: 3\n", "evaluate.seeds", "expected list"),
    ("data: [1, 2]\n", "data", "expected a mapping"),
    ("- a\n- b\n", None, "top level must be a mapping"),
    ("masks: {priors: {weights: [0, 0, 0]}}\n", "masks.priors.weights", "not all zero"),
])
def test_bad_values_name_key_and_file(tmp_path, text, key, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert info.value.key == key
    assert str(path) in str(info.value)


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/pipeline.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    cfg = load_config(path, ["train.epochs=5", "evaluate.protocols=[saliency]", "masks.threshold=0.4"])
    assert cfg.train.epochs == 5 and cfg.evaluate.protocols == ("saliency",) and cfg.masks.threshold == 0.4
    with pytest.raises(ConfigError, match="train.epochs: must be >= 0") as info:
        load_config(path, ["train.epochs=-2"])
    assert "--set" in str(info.value)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["train.epoch=2"])


def test_config_error_names_the_key_first_and_the_set_options_once(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    sets = ["masks.threshold=0.4", "evaluate.seeds=[1]", "train.lr=0.1", "train.epochs=-2", "data.layout=folder",
            "train.seed=3"]
    with pytest.raises(ConfigError) as info:
        load_config(path, sets)
    text = str(info.value)
    assert text.startswith("train.epochs: must be >= 0, got -2 (in ")
    assert text.count("--set") == 1 and text.count("masks.threshold=0.4") == 1 and "\n" not in text
    # the option at fault first, the others after it in the order given
    assert text.endswith(f"(in {path} (with --set train.epochs=-2, masks.threshold=0.4, evaluate.seeds=[1], "
                         "train.lr=0.1, data.layout=folder, train.seed=3))")
    with pytest.raises(ConfigError, match=r"^train.queue_size: .* \(in .* \(with --set train.seed=1, train.batch_size=7\)\)$"):
        load_config(path, ["train.seed=1", "train.batch_size=7"])  # a cross-key check names the key it checks
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


def test_yaml_booleans_read_as_off_where_a_choice_allows_it(tmp_path):
    # YAML 1.1 parses a bare `off` as False: amp: off must still mean "off"
    path = write(tmp_path, "train:\n  amp: off\n")
    assert load_config(path).train.amp == "off"
    assert load_config(path, ["train.amp=no"]).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp: expected one of"):
        load_config(path, ["train.amp=yes"])  # "on" is not a choice of train.amp


def test_relative_paths(tmp_path, monkeypatch):
    sub = tmp_path / "conf"
    sub.mkdir()
    path = write(sub, "data:\n  root: ../data\nstore: s\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert cfg.data.root == sub.parent / "data" and cfg.store == sub / "s"
    cfg = load_config(path, ["data.root=elsewhere"])
    assert cfg.data.root == tmp_path / "elsewhere"  # --set paths are relative to the cwd


def test_check_paths(tmp_path):
    cfg = load_config(write(tmp_path, f"data:\n  root: {tmp_path / 'nope'}\n"))
    with pytest.raises(ConfigError, match="data.root: dataset folder does not exist"):
        check_paths(cfg)
    (tmp_path / "d").mkdir()
    cfg = load_config(write(tmp_path, "data:\n  root: d\ntrain:\n  init: missing.pth\n"))
    with pytest.raises(ConfigError, match="train.init: expected random, imagenet or moco_v2 or an existing checkpoint file, got"):
        check_paths(cfg)
    cfg = load_config(write(tmp_path, "data:\n  root: d\nmasks:\n  method: model\n  model_path: m.onnx\n"))
    with pytest.raises(ConfigError, match="masks.model_path: model file does not exist"):
        check_paths(cfg)


def test_volatile_keys_stay_out_of_sections():
    cfg = Config()
    assert "num_workers" not in cfg.section("train")
    assert "num_workers" in cfg.section("train", drop_volatile=False)
    # keep_last entered versions before it was bookkeeping: it stays, at its old default, whatever is set
    assert cfg.section("train")["keep_last"] == 2
    assert load_config(None, ["train.keep_last=5"]).section("train")["keep_last"] == 2


def test_every_key_is_documented():
    rows = field_docs(Config)
    keys = {r[0] for r in rows}
    for contract in ["data.root", "data.layout", "data.train_split", "data.val_split", "masks.method",
                     "masks.model_path", "train.backbone", "train.init", "train.init_kind", "train.epochs",
                     "train.batch_size", "train.seed", "evaluate.protocols", "evaluate.seeds"]:
        assert contract in keys


def test_features_weights_are_checked_for_the_estimator_and_the_bootstrap_teacher(tmp_path):
    (tmp_path / "d").mkdir()
    for extra in ("masks:\n  method: features\n  features:\n    init: nope.pth\n",
                  "masks:\n  method: bootstrap\n  bootstrap:\n    teacher: features\n  features:\n    init: nope.pth\n"):
        cfg = load_config(write(tmp_path, "data:\n  root: d\n" + extra))
        with pytest.raises(ConfigError, match="masks.features.init: expected imagenet or moco_v2 or an existing checkpoint file"):
            check_paths(cfg)
    cfg = load_config(write(tmp_path, "data:\n  root: d\nmasks:\n  method: features\n  features:\n    init: random\n"))
    with pytest.raises(ConfigError, match="this estimator needs pretrained weights"):
        check_paths(cfg)


def test_stage_parameters_once_hidden_are_settable(tmp_path):
    cfg = load_config(write(tmp_path, "train: {redraws: 5, min_fg: 0.05}\nmasks: {priors: {mbd_sigmoid: 0}}\n"),
                      ["masks.model.channel_order=BGR", "masks.model.input_size=[24, 32]"])
    assert cfg.train.redraws == 5 and cfg.train.min_fg == 0.05 and cfg.masks.priors.mbd_sigmoid == 0
    assert cfg.masks.model.channel_order == "BGR" and cfg.masks.model.size_hw == (24, 32)
    with pytest.raises(ConfigError, match="^masks.priors.mbd_iterations: must be >= 1, got 0 "):
        load_config(write(tmp_path, "masks: {priors: {mbd_iterations: 0}}\n"))


def test_bootstrap_parameters_once_hidden_are_settable(tmp_path):
    cfg = load_config(write(tmp_path, "masks: {bootstrap: {label_threshold: 0.4, calibrate: false}}\n"),
                      ["masks.bootstrap.iou_weight=0", "masks.bootstrap.crop_scale=1", "masks.bootstrap.num_workers=2"])
    b = cfg.masks.bootstrap
    assert (b.label_threshold, b.calibrate, b.iou_weight, b.crop_scale, b.num_workers) == (0.4, False, 0.0, 1.0, 2)
    with pytest.raises(ConfigError, match=r"^masks.bootstrap.label_threshold: must be < 1.0, got 1.0 "):
        load_config(write(tmp_path, "masks: {bootstrap: {label_threshold: 1.0}}\n"))
    with pytest.raises(ConfigError, match=r"^masks.features.seed_share: must be > 0.0, got 0.0 "):
        load_config(write(tmp_path, "masks: {features: {seed_share: 0.0}}\n"))


def test_the_class_prior_is_refused_with_moco_weights(tmp_path):
    ckpt = tmp_path / "moco.pth"
    ckpt.write_bytes(b"not read: the kind decides")
    sets = ["masks.method=features", f"masks.features.init={ckpt}", "masks.features.init_kind=moco"]
    with pytest.raises(ConfigError, match="masks.features.class_prior"):
        check_paths(load_config(None, sets), need_data=False)
    check_paths(load_config(None, [*sets, "masks.features.class_prior=0"]), need_data=False)
