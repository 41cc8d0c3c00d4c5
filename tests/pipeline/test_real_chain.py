"""The real chain in the default suite: masks -> train -> extract -> evaluate on a tiny generated
dataset through the real stage code (no faked extraction or model loading), then a rerun that
must do no work.

Sized for two shared cores: 8 train + 8 val demo images of 32 px, MobileNetV2 from random
weights, one epoch of two steps on 32 px crops, extraction at 32 px, every protocol with one or
two seeds, all in this process (``dask.scheduler: synchronous``, no loader workers). The slow
tests (``test_e2e_kill.py``) run a larger chain in subprocesses and kill it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from artifacts.store import COMPLETE, Store
from pipeline.cli import cli

STAGES = ("masks", "train", "extract", "evaluate")
SETTINGS = {
    "data.layout": "folder",
    "masks.shard_size": 4,
    "masks.priors.size": 32,
    "masks.priors.n_segments": 20,
    "train.backbone": "mobilenet_v2",
    "train.output_stride": 16,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.queue_size": 8,
    "train.crop_size": 32,
    "train.num_workers": 0,
    "train.device": "cpu",
    "extract.input_size": 32,
    "extract.mask_source": "masks",
    "extract.feature_size": 4,
    "extract.num_workers": 0,
    "extract.device": "cpu",
    "evaluate.protocols": "[kmeans, retrieval, linear, saliency]",
    "evaluate.seeds": "[1, 2]",
    "evaluate.kmeans.n_init": 1,
    "evaluate.kmeans.pca_dim": 4,
    "evaluate.linear.epochs": 1,
    "evaluate.linear.lr_drop_epoch": 1,
    "dask.scheduler": "synchronous",
}
PROTOCOL_KEYS = {"kmeans": {"miou", "miou_std", "per_class_iou", "seeds"},
                 "linear": {"miou", "miou_std", "per_class_iou", "seeds"},
                 "retrieval": {"miou", "miou_std", "per_class_iou", "seeds"},
                 "saliency": {"iou", "max_f", "mean_f", "mae"}}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    r = invoke("data", "make-demo", str(root / "data"), "--n-train", "8", "--n-val", "8", "--size", "32")
    assert r.exit_code == 0, r.output
    sets = [a for k, v in {"data.root": root / "data", **SETTINGS}.items() for a in ("--set", f"{k}={v}")]
    args = ["--store", str(root / "store"), *sets]
    first = invoke(*args, "-q", "run")
    assert first.exit_code == 0, first.output
    return root, args, first.output


def _versions(store: Store) -> dict[str, list[str]]:
    return {stage: sorted(i.version for i in store.list(stage)) for stage in STAGES}


def test_real_chain_makes_complete_artifacts(chain):
    root, _, output = chain
    store = Store(root / "store")
    for stage in STAGES:
        [info] = store.list(stage)  # one version per stage
        assert info.state == COMPLETE, (stage, info.manifest and info.manifest.get("error"))
        files = {f["path"] for f in info.manifest["files"]}
        assert files and all((info.path / f).is_file() for f in files)
    masks, train, extract, evaluate = (store.list(s)[0] for s in STAGES)
    assert any(f.startswith("shard-") for f in (x["path"] for x in masks.manifest["files"]))
    assert (train.path / "model.pt").is_file() and train.manifest["inputs"] == {"masks": masks.ref}
    assert extract.manifest["inputs"] == {"train": train.ref, "masks": masks.ref}
    assert sorted(extract.manifest["summary"]["splits"]) == ["train", "val"]
    metrics = json.loads((evaluate.path / "metrics.json").read_text())
    for protocol, keys in PROTOCOL_KEYS.items():
        assert keys <= set(metrics[protocol]), (protocol, sorted(metrics[protocol]))
    assert metrics["kmeans"]["seeds"] == [1, 2]
    assert 0.0 <= metrics["kmeans"]["miou"] <= 100.0
    assert f"report: {evaluate.path / 'report.md'}" in output


def test_real_chain_rerun_does_no_work(chain):
    root, args, _ = chain
    store = Store(root / "store")
    before = {i.ref: (i.manifest["finished"], i.manifest["attempts"]) for i in store.list()}
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "store").rglob("*") if p.is_file()}
    r = invoke(*args, "-q", "run")
    assert r.exit_code == 0, r.output
    lines = [ln.split() for ln in r.output.splitlines() if ln.split()[:1] and ln.split()[0] in STAGES]
    assert [(ln[0], ln[2]) for ln in lines] == [(s, "skipped") for s in STAGES], r.output
    assert {i.ref: (i.manifest["finished"], i.manifest["attempts"]) for i in store.list()} == before
    assert _versions(store) == {s: [ref.split("/")[1] for ref in before if ref.startswith(s + "/")] for s in STAGES}
    assert {p: p.stat().st_mtime_ns for p in (root / "store").rglob("*") if p.is_file()} == mtimes
