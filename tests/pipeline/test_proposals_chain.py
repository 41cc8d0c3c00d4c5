"""The chain with several proposals per image: masks (components, schema version 2) -> train
(one prototype per proposal) -> extract (per-proposal prototypes) -> evaluate (K-means and
retrieval per proposal) -> segment, on the multi-object demo, and extraction splitting the
saliency head's mask (extract.mask_source: model). Sized like test_real_chain."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from artifacts.store import COMPLETE, Store
from pipeline.cli import cli

SETTINGS = {
    "data.layout": "folder",
    "masks.proposals": "components",
    "masks.max_proposals": 3,
    "masks.shard_size": 8,
    "masks.priors.size": 48,
    "masks.priors.n_segments": 40,
    "train.backbone": "mobilenet_v2",
    "train.output_stride": 16,
    "train.epochs": 1,
    "train.batch_size": 4,
    "train.queue_size": 8,
    "train.crop_size": 32,
    "train.num_workers": 0,
    "train.device": "cpu",
    "extract.input_size": 48,
    "extract.mask_source": "masks",
    "extract.feature_size": 4,
    "extract.num_workers": 0,
    "extract.device": "cpu",
    "evaluate.protocols": "[kmeans, retrieval, linear]",
    "evaluate.seeds": "[1]",
    "evaluate.kmeans.n_init": 1,
    "evaluate.kmeans.pca_dim": 4,
    "evaluate.linear.epochs": 1,
    "evaluate.linear.lr_drop_epoch": 1,
    "dask.scheduler": "synchronous",
}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("proposals-chain")
    r = invoke("data", "make-demo", str(root / "data"), "--n-train", "8", "--n-val", "8", "--size", "48",
               "--multi-object")
    assert r.exit_code == 0, r.output
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    try:
        # the head is silent after one epoch: the model-source chain stops at extraction
        for name, extra, to in (("masks", {}, "evaluate"), ("model", {"extract.mask_source": "model"}, "extract")):
            sets = [a for k, v in {"data.root": root / "data", **SETTINGS, **extra}.items()
                    for a in ("--set", f"{k}={v}")]
            args = ["--config", str(demo), "--store", str(root / "store"), *sets]
            out = invoke(*args, "-q", "run", "--to", to)
            assert out.exit_code == 0, out.output
            runs[name] = args
    finally:
        torch.set_num_threads(threads)
    return root, runs


def test_every_stage_runs_on_proposals(chain):
    root, _ = chain
    store = Store(root / "store")
    [masks] = store.list("masks")
    [train] = store.list("train")
    assert masks.manifest["summary"]["schema_version"] == 2 and train.state == COMPLETE
    assert masks.manifest["params"]["proposals"]["proposals"] == "components"
    extracts = store.list("extract")
    assert len(extracts) == 2 and all(e.state == COMPLETE for e in extracts)
    for e in extracts:
        shard = next((e.path / "val").glob("emb-*.h5"))
        with h5py.File(shard, "r") as f:
            assert f.attrs["schema_version"] == 2 and "proposal_prototypes" in f
    for report in store.list("evaluate"):
        metrics = json.loads((report.path / "metrics.json").read_text())
        assert {"kmeans", "retrieval", "linear"} <= set(metrics)
        assert metrics["kmeans"]["n_regions"] >= metrics["kmeans"]["n_images"]
        assert 0.0 <= metrics["kmeans"]["miou"] <= 100.0


def test_segment_writes_several_regions(chain):
    root, runs = chain
    images = sorted((root / "data" / "images").glob("*.jpg"))[:3]
    r = invoke(*runs["masks"], "-q", "segment", *map(str, images), "--out", str(root / "seg"))
    assert r.exit_code == 0, r.output
    assert all((root / "seg" / f"{p.stem}.png").is_file() for p in images)
    [report] = Store(root / "store").list("evaluate")
    model = json.loads((report.path / "kmeans_model.json").read_text())
    assert model["extract"]["proposals"]["proposals"] == "components"  # segment splits the head's mask alike


def test_clusters_label_each_proposal(chain):
    """The label-free stage on the proposals' embeddings: one assignment row per proposal, a new
    clusters version (not the per-image one), and `segment --clusters` reads its model file."""
    root, runs = chain
    r = invoke(*runs["masks"], "--set", "clusters.k=3", "-q", "run", "--to", "clusters")
    assert r.exit_code == 0, r.output
    [clusters] = Store(root / "store").list("clusters")
    assert clusters.manifest["params"]["regions"] == "proposals"
    summary = clusters.manifest["summary"]
    assert summary["regions"] == "proposals" and summary["n_regions"] >= summary["n_images"]
    lines = (clusters.path / "assignments.csv").read_text().splitlines()
    assert lines[0].startswith("id,proposal,cluster,") and len(lines) == 1 + summary["n_regions"]
    assert len(list((clusters.path / "segmentations").glob("*_overlay.png"))) == summary["n_segmentations"]
