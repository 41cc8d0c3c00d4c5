"""The presets in configs/: each loads through the real config loader, passes the path checks once
the user-provided paths exist, and resolves to the paper's recipe (REFERENCE.md) where it claims to."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from pipeline.config import VOC_SEEDS, Config, check_paths, load_config
from pipeline.configtypes import ConfigError
from stages.data.index import DatasetIndex

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "demo.yaml")  # the demo: tests/pipeline/test_config.py
VOC_PRESETS = ("voc_unsupervised_moco.yaml", "voc_supervised_imagenet.yaml")
SEVEN_CLASSES = ("aeroplane", "bottle", "bus", "car", "cat", "cow", "person")
ALT_START = re.compile(r"^(\s*)# --- alternative: (\w+)")
ALT_END = re.compile(r"^\s*# --- end ---")


def user_paths(cfg: Config, tmp: Path) -> list[str]:
    """``--set`` overrides pointing every data/weight path ``cfg`` uses at files made in ``tmp``."""
    (tmp / "dataset").mkdir(exist_ok=True)
    sets = [f"data.root={tmp / 'dataset'}"]
    m = cfg.masks
    if m.method == "import":
        (tmp / "masks").mkdir(exist_ok=True)
        sets.append(f"masks.import_dir={tmp / 'masks'}")
    if m.method == "model":
        (tmp / "model.onnx").write_bytes(b"onnx")
        sets.append(f"masks.model_path={tmp / 'model.onnx'}")
    if m.method == "bootstrap" and m.bootstrap.init != "random":
        (tmp / "bootstrap.pth").write_bytes(b"pth")
        sets.append(f"masks.bootstrap.init={tmp / 'bootstrap.pth'}")
    if cfg.train.init != "random":
        (tmp / "init.pth").write_bytes(b"pth")
        sets.append(f"train.init={tmp / 'init.pth'}")
    return sets


def load_with_user_paths(path: Path, tmp: Path) -> Config:
    placeholders = load_config(path)  # loading never touches the paths
    cfg = load_config(path, user_paths(placeholders, tmp))
    check_paths(cfg, source=str(path))  # what every command does before any work
    return cfg


def uncomment_alternative(text: str) -> tuple[str, str]:
    """The preset with its ``# --- alternative: NAME ---`` block uncommented and the active keys the
    block redefines (same indentation, above it) removed, as a user would edit it; and NAME."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if ALT_START.match(line)]
    assert len(starts) == 1, "one alternative block per preset"
    start = starts[0]
    indent, name = ALT_START.match(lines[start]).groups()
    end = next(i for i in range(start, len(lines)) if ALT_END.match(lines[i]))
    block = [re.sub(r"^(\s*)# ?", r"\1", line, count=1) for line in lines[start + 1:end]]
    redefined = {m.group(1) for line in block if (m := re.match(rf"^{indent}(\w+):", line))}
    head = [line for line in lines[:start]
            if not ((m := re.match(rf"^{indent}(\w+):", line)) and m.group(1) in redefined)]
    return "\n".join(head + block + lines[end + 1:]) + "\n", name


def test_the_three_presets_exist():
    assert {p.name for p in PRESETS} >= {*VOC_PRESETS, "davis16_mobilenet.yaml"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_passes_path_checks_and_queue_fits_batch(preset, tmp_path):
    cfg = load_with_user_paths(preset, tmp_path)
    assert cfg.data.root == tmp_path / "dataset"
    assert cfg.train.queue_size % cfg.train.batch_size == 0 and cfg.train.queue_size > 0
    # the cached probe features are the trunk's own grid, so the probe equals "upsample, then classify"
    assert cfg.extract.feature_size == cfg.extract.input_size // cfg.train.output_stride
    assert cfg.store.resolve() == REPO / "store"  # beside the demo's, ignored by git


@pytest.mark.parametrize("name", VOC_PRESETS)
def test_voc_placeholders_resolve_against_the_repository_not_the_cwd(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONFIGS / name)
    assert cfg.data.root.resolve() == REPO / "data" / "VOCSegmentation"
    assert Path(cfg.train.init).resolve().parent == REPO / "weights"
    assert cfg.masks.import_dir.resolve().parent == REPO / "data" / "VOCSegmentation"
    if not cfg.data.root.exists():  # a user who placed the data there passes this check instead
        with pytest.raises(ConfigError, match="data.root: dataset folder does not exist"):
            check_paths(cfg)


REFERENCE = {  # REFERENCE.md, "Model" and "Training"
    "voc_unsupervised_moco.yaml": dict(batch=128, queue=256, init_kind="moco", freeze=False,
                                       init="moco_v2_800ep_pretrain.pth.tar",
                                       masks="saliency_unsupervised_model"),
    "voc_supervised_imagenet.yaml": dict(batch=64, queue=128, init_kind="torchvision", freeze=True,
                                         init="resnet50-0676ba61.pth", masks="saliency_supervised_model"),
}


@pytest.mark.parametrize("name", VOC_PRESETS)
def test_voc_presets_are_the_papers_recipe(name, tmp_path):
    want = REFERENCE[name]
    placeholders = load_config(CONFIGS / name)
    assert Path(placeholders.train.init).name == want["init"]
    assert placeholders.masks.import_dir.name == want["masks"]
    cfg = load_with_user_paths(CONFIGS / name, tmp_path)
    d, m, t, x, e = cfg.data, cfg.masks, cfg.train, cfg.extract, cfg.evaluate
    assert (d.layout, d.train_split, d.val_split) == ("voc", "trainaug", "val")
    assert (m.method, m.split, m.threshold, m.min_fg) == ("import", "trainaug", 0.5, 0.01)
    assert (m.min_region, m.max_fg) == (0.0, 1.0)  # the reference's PNGs, as downloaded
    assert (t.backbone, t.output_stride, t.embedding_dim) == ("resnet50", 8, 32)
    assert (t.init_kind, t.freeze_early) == (want["init_kind"], want["freeze"])
    assert (t.batch_size, t.queue_size) == (want["batch"], want["queue"])
    assert t.queue_size == 2 * t.batch_size
    assert (t.epochs, t.crop_size, t.temperature, t.key_momentum) == (40, 224, 0.5, 0.999)
    assert (t.lr, t.momentum, t.weight_decay) == (0.004, 0.9, 1e-4)
    a = t.augment  # the reference's views (not the demo's stronger colour augmentation)
    assert (a.crop_scale, a.jitter, a.jitter_p, a.gray_p, a.flip_p) == ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, 0.5)
    assert t.amp == "off"  # float32 as the reference ("off" unquoted would be YAML's false)
    assert (x.input_size, x.interpolation, x.mask_source, x.embedding, x.features) == (
        512, "bicubic", "model", "head", True)
    assert e.protocols == ("kmeans", "linear", "retrieval") and e.seeds == VOC_SEEDS
    assert (e.kmeans.n_clusters, e.kmeans.pca_dim, e.kmeans.n_init) == (None, 32, 3)  # None: 20 on VOC
    lin = e.linear
    assert (lin.epochs, lin.lr_drop_epoch, lin.lr, lin.momentum, lin.weight_decay, lin.batch_size) == (
        60, 25, 0.1, 0.9, 1e-4, 16)
    assert e.retrieval.class_subset == SEVEN_CLASSES
    assert e.retrieval.bank_split == "train"  # the reference's bank: VOC train (1,464), not trainaug


@pytest.mark.parametrize("name, method", [("voc_unsupervised_moco.yaml", "bootstrap"),
                                          ("voc_supervised_imagenet.yaml", "model")])
def test_commented_alternative_is_valid_config(name, method, tmp_path):
    text, found = uncomment_alternative((CONFIGS / name).read_text(encoding="utf-8"))
    assert found == method
    (tmp_path / "configs").mkdir()
    edited = tmp_path / "configs" / name
    edited.write_text(text, encoding="utf-8")
    assert [line.split()[1] for line in text.splitlines() if line.startswith("  method:")] == [method]
    cfg = load_with_user_paths(edited, tmp_path)
    assert cfg.masks.method == method
    if method == "bootstrap":
        assert cfg.masks.bootstrap.backbone == "resnet50" and cfg.masks.bootstrap.freeze == "layer2"
        assert Path(load_config(edited).masks.bootstrap.init).name == "moco_v2_800ep_pretrain.pth.tar"
    else:  # the reference's post-processing applied here, BASNet's input size
        assert (cfg.masks.min_region, cfg.masks.min_fg, cfg.masks.model.input_size) == (0.01, 0.01, 256)
        assert cfg.masks.model.minmax is True
    assert cfg.train == load_with_user_paths(CONFIGS / name, tmp_path).train  # only the masks change


def test_documented_link_recipe_turns_the_reference_archive_into_the_voc_layout(tmp_path):
    """The `ln -s` line in the preset's comment, run on a miniature of the reference's archive."""
    text = (CONFIGS / "voc_unsupervised_moco.yaml").read_text(encoding="utf-8")
    recipe = next(line.split("#", 1)[1].strip() for line in text.splitlines() if "ln -s images JPEGImages" in line)
    root = tmp_path / "VOCSegmentation"
    ids = {"train": ["a1", "a2"], "val": ["v1"], "trainaug": ["a1", "a2", "s1"]}
    for folder in ("images", "SegmentationClass", "SegmentationClassAug", "sets", "saliency_unsupervised_model"):
        (root / folder).mkdir(parents=True)
    for i in ("a1", "a2", "s1", "v1"):
        (root / "images" / f"{i}.jpg").write_bytes(b"jpg")
        (root / "SegmentationClassAug" / f"{i}.png").write_bytes(b"png")
    for i in ("a1", "a2", "v1"):
        (root / "SegmentationClass" / f"{i}.png").write_bytes(b"png")
    for split, members in ids.items():
        (root / "sets" / f"{split}.txt").write_text("\n".join(members) + "\n")
    subprocess.run(["sh", "-c", recipe], cwd=root, check=True)
    cfg = load_config(CONFIGS / "voc_unsupervised_moco.yaml", [f"data.root={root}"])
    index = DatasetIndex.open(cfg.data.root, cfg.data.layout)
    assert index.layout == "voc" and index.ids("trainaug") == ids["trainaug"] and index.ids("val") == ids["val"]
    assert index.ids(cfg.evaluate.retrieval.bank_split) == ids["train"]  # the bank split exists after the links
    assert index.sample("s1").label.parent.name == "SegmentationClassAug"
    assert index.sample("v1").label.parent.name == "SegmentationClass"
    assert index.num_classes == 21


def test_davis_preset_sizes_fit_a_small_cpu():
    cfg = load_config(CONFIGS / "davis16_mobilenet.yaml")
    t = cfg.train
    assert (t.backbone, t.init_kind, t.freeze_early) == ("mobilenet_v2", "torchvision", True)
    assert (t.batch_size, t.queue_size) == (16, 32) and 160 <= t.crop_size <= 224 and t.epochs == 40
    assert cfg.data.layout == "folder" and (cfg.data.train_split, cfg.data.val_split) == ("train", "val")
    assert cfg.masks.method == "model" and "saliency" in cfg.evaluate.protocols


@pytest.mark.realdata
def test_davis_preset_runs_unmodified_beside_the_shared_folder(davis_root, mobilenet_weights, u2netp_path):
    cfg = load_config(CONFIGS / "davis16_mobilenet.yaml")
    assert cfg.data.root.resolve() == davis_root.resolve()
    assert Path(cfg.train.init).resolve() == mobilenet_weights.resolve()
    assert cfg.masks.model_path.resolve() == u2netp_path.resolve()
    check_paths(cfg)
    index = DatasetIndex.open(cfg.data.root, cfg.data.layout)
    assert index.num_classes == 11 and len(index.ids("train")) >= cfg.train.batch_size
    assert index.has_labels("train") and index.has_labels("val")
