"""Unlabelled photos end to end: any folder of images, no split files, `run` ending at clusters,
names, `segment --clusters`, an unreadable image, `gc`; and labelled data keeping its splits and
where `run` ends (its versions are pinned in test_versions.py)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import State, cli
from pipeline.configtypes import ConfigError
from pipeline.graph import plan
from pipeline.stagedefs import default_target

# a tiny, fast pipeline: hand-crafted priors, the initialisation alone, small inputs, in-process
FAST = ("--set", "masks.priors.size=48", "--set", "masks.priors.n_segments=40", "--set", "dask.scheduler=synchronous",
        "--set", "train.backbone=mobilenet_v2", "--set", "train.epochs=0", "--set", "train.batch_size=2",
        "--set", "train.queue_size=2", "--set", "train.num_workers=0", "--set", "extract.input_size=64",
        "--set", "extract.mask_source=masks", "--set", "extract.features=false", "--set", "extract.num_workers=0",
        "--set", "clusters.k_max=4")


def _photos(root: Path, n: int = 12, broken: bool = True) -> Path:
    """n photos (a red or blue square on noise) straight in ``root``, and one file that is no image."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 60, (48, 40, 3), dtype=np.uint8)
        y, x = rng.integers(8, 20, 2)
        img[y:y + 16, x:x + 16] = (230, 40, 40) if i % 2 else (40, 40, 230)
        Image.fromarray(img).save(root / f"p{i:02d}.png")
    if broken:
        (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _context(*overrides: str):
    return State(None, overrides, None, True, False).context()


def test_flat_folder_run_clusters_names_and_segment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "photos")
    base = ("--store", "store", "--set", "data.root=photos", *FAST)
    r = invoke(*base, "run")
    assert r.exit_code == 0, r.output
    assert r.output.count("has no split files") == 1  # said once, for the whole run
    assert "every stage uses all 13 images" in r.output
    assert "done: clusters artifact" in r.output and "evaluate" not in r.output.split("done:")[0]
    [version] = [p.name for p in (tmp_path / "store" / "clusters").iterdir()]
    out = tmp_path / "store" / "clusters" / version
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["params"]["split"]["split"] == "all"
    assert manifest["summary"]["n_images"] == 12 and manifest["summary"]["n_skipped"] == 1
    assert "broken" in json.loads((out / "skipped.json").read_text())  # reported, not fatal
    assert f"skipped: 1 image(s), listed in {out / 'skipped.json'}" in r.output
    k = manifest["summary"]["k"]
    assert 2 <= k <= 4 and len(list((out / "sheets").iterdir())) == k
    assert len(list((out / "segmentations").glob("*_overlay.png"))) == 12

    # name the clusters: a new clusters version (nothing upstream reruns), the names in its legend
    (tmp_path / "names.txt").write_text("0: red thing\n1: blue thing\n")
    r = invoke(*base, "--set", "clusters.names=names.txt", "run")
    assert r.exit_code == 0, r.output
    actions = dict(re.findall(r"^(masks|train|extract|clusters)\s+[0-9a-f]{12}\s+(\w+)", r.output, re.M))
    assert actions == {"masks": "skipped", "train": "skipped", "extract": "skipped", "clusters": "ran"}
    assert "named red thing, blue thing; segmentations in" in r.output
    named = [p for p in (tmp_path / "store" / "clusters").iterdir() if p.name != version]
    assert len(named) == 1
    rows = list(csv.DictReader((named[0] / "assignments.csv").open()))
    assert {r["name"] for r in rows if r["cluster"] == "0"} == {"red thing"}
    model = json.loads((named[0] / "kmeans_model.json").read_text())
    assert model["class_names"][:3] == ["background", "red thing", "blue thing"]

    # segment new images with the clusters artifact (its model found from its lineage), names given
    r = invoke(*base, "segment", "photos", "--out", "seg", "--clusters", f"clusters/{version}",
               "--names", "names.txt")
    assert r.exit_code == 0, r.output
    assert "segmented 13 image(s) into seg; skipped 1" in r.output
    assert "saliency head is untrained" in r.output  # train.epochs 0 here
    assert (tmp_path / "seg" / "legend.png").is_file() and (tmp_path / "seg" / "p03_overlay.png").is_file()
    r = invoke(*base, "segment", "photos", "--out", "seg2", "--clusters", f"clusters/{version}",
               "--report", "evaluate/x")
    assert r.exit_code == 2 and "--report or --clusters, not both" in r.output
    (tmp_path / "bad.txt").write_text("zero: sky\n")
    r = invoke(*base, "segment", "photos", "--out", "seg3", "--clusters", f"clusters/{version}", "--names", "bad.txt")
    assert r.exit_code == 2 and "bad.txt, line 1: expected 'cluster id: name'" in r.output
    r = invoke(*base, "--set", "clusters.names=bad.txt", "clusters")  # a usage error, before any work
    assert r.exit_code == 2 and re.search(r"clusters.names: \S*bad.txt, line 1: expected", r.output)

    # gc keeps what this pipeline uses (no evaluate on photos): the planned clusters version and its
    # inputs; the clusters version made before the names is superseded
    named_base = (*base, "--set", "clusters.names=names.txt")
    r = invoke(*named_base, "gc")
    assert r.exit_code == 0, r.output
    listed = [ln for ln in r.output.splitlines() if ln.startswith("would free  ")]
    assert len(listed) == 1 and str(Path("store") / "clusters" / version) in listed[0] and "superseded" in listed[0]
    r = invoke(*named_base, "gc", "--yes")
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "store" / "clusters").iterdir()] == [named[0].name]
    r = invoke(*named_base, "gc")
    assert r.exit_code == 0 and "nothing to free" in r.output, r.output


def test_images_folder_without_splits_uses_all_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _photos(tmp_path / "data" / "images", n=4, broken=False)
    ctx = _context("data.root=data")
    assert default_target(ctx) == "clusters"
    planned = plan(ctx, ("clusters",))
    assert list(planned) == ["masks", "train", "extract", "clusters"]
    assert planned["train"].spec.params["data"]["split"] == "all"
    assert list(planned["extract"].spec.params["splits"]) == ["all"]  # one split, extracted once
    with pytest.raises(ConfigError, match="evaluate.protocols: scoring needs ground truth"):
        plan(ctx, ("evaluate",))
    r = invoke("--store", "store", "--set", "data.root=data", "status")
    assert r.exit_code == 0, r.output
    assert "clusters" in r.output and "unplanned" in r.output  # evaluate: no labels to score


def test_labelled_data_keeps_run_ending_at_evaluate(tmp_path, monkeypatch, make_box_dataset):
    make_box_dataset(tmp_path / "data", ["background", "a", "b", "c"], {"train": 6, "val": 6})
    monkeypatch.chdir(tmp_path)
    ctx = _context("data.root=data")
    assert default_target(ctx) == "evaluate"
    assert (ctx.cfg.data.train_split, ctx.cfg.data.val_split) == ("train", "val")  # split files: kept


# The versions labelled configs plan (and the clusters versions, on labelled data and on a folder of
# photos) are pinned in one place: tests/pipeline/test_versions.py.
