"""The command line through click's CliRunner: exit codes, one-line errors, the stage lifecycle."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli


def make_folder_dataset(root: Path, n: int = 12, size: int = 48, bad: int = 0) -> Path:
    """A tiny folder-layout dataset: a bright square on a dark noisy background per image."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "splits").mkdir()
    (root / "classes.txt").write_text("background\nsquare\n")
    ids = []
    for i in range(n):
        img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        lab = np.zeros((size, size), np.uint8)
        y, x = rng.integers(8, size // 2, 2)
        img[y: y + size // 3, x: x + size // 3] = 230
        lab[y: y + size // 3, x: x + size // 3] = 1
        Image.fromarray(img).save(root / "images" / f"im{i:03d}.png")
        Image.fromarray(lab, mode="L").save(root / "labels" / f"im{i:03d}.png")
        ids.append(f"im{i:03d}")
    for j in range(bad):
        (root / "images" / f"bad{j}.jpg").write_bytes(b"not a jpeg at all")
        ids.append(f"bad{j}")
    (root / "splits" / "train.txt").write_text("\n".join(ids[: len(ids) * 2 // 3]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(ids[len(ids) * 2 // 3:]) + "\n")
    return root


@pytest.fixture
def project(tmp_path, monkeypatch):
    make_folder_dataset(tmp_path / "data", bad=1)
    (tmp_path / "pipeline.yaml").write_text(
        "store: store\ndata:\n  root: data\nmasks:\n  shard_size: 5\n  priors:\n    size: 48\n    n_segments: 40\n"
        "dask:\n  scheduler: synchronous\nevaluate:\n  protocols: [saliency]\n"
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(*args):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result


def test_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0 and "run" in r.output and "status" in r.output and "inspect" in r.output
    assert invoke("--version").exit_code == 0


def test_config_error_is_one_line_exit_2(project):
    r = invoke("--set", "train.epochs=-1", "status")
    assert r.exit_code == 2
    assert "train.epochs: must be >= 0" in r.output and "Traceback" not in r.output


def test_a_bad_linear_batch_size_is_one_error_naming_the_key(project):
    """Checked once, by the evaluate.linear parameters: before any work, exit 2, one message."""
    r = invoke("--set", "evaluate.linear.batch_size=0", "status")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.count("batch_size") == 2  # the key and the --set option that set it, once each
    assert "evaluate.linear.batch_size: must be >= 1, got 0 (in pipeline.yaml (with --set evaluate.linear.batch_size=0))" \
        in r.output


def test_missing_dataset_is_usage_error(project):
    r = invoke("--set", "data.root=nowhere", "masks")
    assert r.exit_code == 2 and "data.root: dataset folder does not exist" in r.output


def test_masks_stage_lifecycle(project):
    r = invoke("-q", "status")
    assert r.exit_code == 0, r.output
    assert "masks" in r.output and "missing" in r.output

    r = invoke("-q", "run")
    assert r.exit_code == 0, r.output
    store = project / "store" / "masks"
    [version] = [p.name for p in store.iterdir()]
    manifest = json.loads((store / version / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["summary"]["n_images"] == 12 and manifest["summary"]["n_skipped"] == 1
    assert "bad0" in json.loads((store / version / "skipped.json").read_text())
    assert sorted(f["path"] for f in manifest["files"]) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5", "skipped.json"]
    assert manifest["config"]["masks"]["shard_size"] == 5 and manifest["code_version"]

    r = invoke("-q", "run")  # nothing changed: skipped, no work
    assert "skipped" in r.output
    assert json.loads((store / version / "manifest.json").read_text())["finished"] == manifest["finished"]

    r = invoke("-q", "status")
    summary = manifest["summary"]
    [line] = [ln for ln in r.output.splitlines() if ln.split()[:1] == ["masks"]]
    assert "complete" in line and f"{summary['n_kept']}/{summary['n_images']} kept (priors)" in line, r.output

    r = invoke("-q", "--set", "masks.threshold=0.6", "status")  # a changed config is a new version
    assert "missing" in r.output and "config changed" in r.output

    r = invoke("ls")
    assert f"masks/{version}" in r.output and "complete" in r.output

    r = invoke("inspect", str(store / version))
    assert r.exit_code == 0, r.output
    assert "mask statistics" in r.output and "kept" in r.output
    r = invoke("inspect", str(store / version / "shard-00000.h5"))
    assert "chunks" in r.output and "@schema" in r.output
    r = invoke("inspect", str(store / version), "--contact-sheet", "sheet.png", "--n", "6")
    assert r.exit_code == 0 and (project / "sheet.png").stat().st_size > 1000


def test_interrupted_masks_stage_continues(project, monkeypatch):
    """A crash between shards keeps the finished shards; the rerun computes only the rest."""
    import stages.masks.stage as stage

    calls, crash = [], [True]
    real = stage.compute_chunk

    def flaky(shard, chunk, samples, *a, **k):
        calls.append(shard)
        if shard == 1 and crash[0]:
            crash[0] = False
            raise KeyboardInterrupt
        return real(shard, chunk, samples, *a, **k)

    monkeypatch.setattr(stage, "compute_chunk", flaky)
    r = CliRunner().invoke(cli, ["-q", "masks"])
    assert r.exit_code == 130
    [vdir] = (project / "store" / "masks").iterdir()
    assert (vdir / "shard-00000.h5").exists() and not (vdir / "shard-00001.h5").exists()
    assert json.loads((vdir / "manifest.json").read_text())["status"] == "failed"
    calls.clear()
    r = invoke("-q", "masks")
    assert r.exit_code == 0, r.output
    assert 0 not in calls and set(calls) == {1, 2}  # shard 0 was not computed twice
    assert json.loads((vdir / "manifest.json").read_text())["status"] == "complete"


def test_force_recomputes(project):
    assert invoke("-q", "masks").exit_code == 0
    r = invoke("-q", "masks", "--force")
    assert r.exit_code == 0 and " ran " in r.output


def test_data_info(project):
    r = invoke("data", "info")
    info = json.loads(r.output)
    assert info["num_images"] == 13 and info["splits"]["train"] == 8


def test_data_check_reports_bad_file(project):
    r = invoke("-q", "data", "check")
    assert r.exit_code == 1 and "bad0.jpg" in r.output and "1 unusable file(s)" in r.output


def test_make_demo_multi_object(tmp_path):
    from stages.data import DatasetIndex, load_label

    for flag, n_classes in (((), {1}), (("--multi-object",), {2, 3})):
        root = tmp_path / ("multi" if flag else "single")
        r = invoke("-q", "data", "make-demo", str(root), "--n-train", "4", "--n-val", "2", "--size", "48", *flag)
        assert r.exit_code == 0 and "demo dataset: 6 images, 6 classes" in r.output, r.output
        index = DatasetIndex.open(root, layout="folder")
        assert {len(np.unique(load_label(s.label))) - 1 for s in index.samples()} <= n_classes
    assert "--multi-object" in invoke("data", "make-demo", "--help").output


def test_config_prints_resolved(project):
    r = invoke("--set", "masks.threshold=0.3", "config")
    assert "threshold: 0.3" in r.output


@pytest.mark.slow
def test_bootstrap_masks_through_the_pipeline(project):
    """masks.method=bootstrap fits its network inside the mask artifact, then writes shards."""
    r = invoke("-q", "--set", "masks.method=bootstrap", "--set", "masks.bootstrap.rounds=1",
               "--set", "masks.bootstrap.epochs_per_round=1", "--set", "masks.bootstrap.input_size=32",
               "--set", "masks.bootstrap.batch_size=4", "masks")
    assert r.exit_code == 0, r.output
    [vdir] = (project / "store" / "masks").iterdir()
    manifest = json.loads((vdir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["params"]["bootstrap"]["rounds"] == 1
    assert manifest["estimator"]["estimator"] == "bootstrap"
    assert any(f["path"].startswith("bootstrap/") for f in manifest["files"])


def test_pixel_limit_skips_large_images_with_their_reason(project):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(project / "data" / "images" / "big.png")
    default = invoke("-q", "status").output
    r = invoke("-q", "--set", "data.max_pixels=3000", "status")  # 48 x 48 = 2304 pass, 64 x 64 = 4096 not
    assert r.exit_code == 0 and r.output != default  # the limit can change results: a new version
    r = invoke("-q", "--set", "data.max_pixels=3000", "masks")
    assert r.exit_code == 0, r.output
    [vdir] = (project / "store" / "masks").iterdir()
    skipped = json.loads((vdir / "skipped.json").read_text())
    assert "more pixels than data.max_pixels (3000)" in skipped["big"] and "bad0" in skipped
    assert json.loads((vdir / "manifest.json").read_text())["summary"]["n_skipped"] == 2
    r = invoke("-q", "--set", "data.max_pixels=3000", "data", "check")
    assert r.exit_code == 1 and "big.png: more pixels than data.max_pixels (3000)" in r.output
    assert "MASKCONTRAST_MAX_PIXELS" not in __import__("os").environ  # scoped to the stage


def test_named_weights_offline_is_exit_2_naming_url_and_path(project, tmp_path, monkeypatch):
    import urllib.error

    from stages.common import weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(weights, "_download", offline)
    r = invoke("--set", "train.init=imagenet", "--set", "train.backbone=resnet18", "status")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "train.init" in r.output and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in r.output
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in r.output


def test_a_weights_name_versions_like_the_same_file_by_path(project, tmp_path, monkeypatch, mobilenet_weights):
    import shutil

    cache = tmp_path / "th" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copy(mobilenet_weights, cache / mobilenet_weights.name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    by_name = invoke("--set", "train.init=imagenet", "--set", "train.backbone=mobilenet_v2", "status")
    by_path = invoke("--set", f"train.init={mobilenet_weights}", "--set", "train.backbone=mobilenet_v2", "status")
    assert by_name.exit_code == 0, by_name.output
    train_line = [line for line in by_name.output.splitlines() if line.startswith("train")]
    assert train_line and train_line == [line for line in by_path.output.splitlines() if line.startswith("train")]
