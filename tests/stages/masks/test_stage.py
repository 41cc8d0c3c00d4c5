"""The masks stage end to end: shards, dask vs in-process equality, import and model estimators."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from artifacts.masks import MaskStore
from stages.data import DatasetIndex
from stages.masks.postprocess import PostParams
from stages.masks.priors import PriorParams
from stages.masks.stage import ImportEstimator, OnnxEstimator, PriorsEstimator, compute_masks


def _dataset(root, n=10, size=40):
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    for i in range(n):
        img = rng.integers(0, 50, (size, size + 8, 3), dtype=np.uint8)
        y, x = rng.integers(4, size // 2, 2)
        img[y: y + size // 3, x: x + size // 3] = (240, 200, 40)
        Image.fromarray(img).save(root / "images" / f"i{i:02d}.png")
    return DatasetIndex.open(root)


def _records(directory):
    store = MaskStore(directory)
    return [(r.id, r.mask.tobytes(), None if r.soft is None else r.soft.tobytes(), r.kept, r.reason)
            for r in (store.get(i, soft=True) for i in store.ids())]


PRIORS = PriorParams(size=40, n_segments=30)


def test_shards_follow_index_order_and_size(tmp_path):
    ds = _dataset(tmp_path / "d")
    summary = compute_masks(ds.samples(), PriorsEstimator(PRIORS), PostParams(), tmp_path / "out",
                            shard_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*.h5")) == [
        "shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    assert MaskStore(tmp_path / "out").ids() == ds.ids()
    assert summary["n_images"] == 10 and summary["n_shards"] == 3
    rec = MaskStore(tmp_path / "out").get("i00", soft=True)
    assert rec.shape == (40, 48) and rec.soft.dtype == np.uint8


@pytest.mark.distributed
def test_local_cluster_and_in_process_write_identical_shards(tmp_path):
    from distributed import Client, LocalCluster

    ds = _dataset(tmp_path / "d")
    est = PriorsEstimator(PRIORS)
    compute_masks(ds.samples(), est, PostParams(), tmp_path / "sync", shard_size=4, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        compute_masks(ds.samples(), est, PostParams(), tmp_path / "dask", shard_size=4, client=client,
                      chunk_size=2, progress=False)
    assert _records(tmp_path / "sync") == _records(tmp_path / "dask")


def test_import_estimator_reports_missing_and_wrong_size(tmp_path):
    ds = _dataset(tmp_path / "d", n=4)
    masks = tmp_path / "pngs"
    masks.mkdir()
    for i, s in enumerate(ds.samples()):
        if i == 1:
            continue  # missing
        shape = (40, 48) if i != 2 else (20, 20)  # one of the wrong size
        m = np.zeros(shape, np.uint8)
        m[5:25, 5:25] = 255
        Image.fromarray(m).save(masks / f"{s.id}.png")
    summary = compute_masks(ds.samples(), ImportEstimator(masks), PostParams(), tmp_path / "out",
                            shard_size=8, progress=False)
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert set(skipped) == {"i01", "i02"}
    assert "i01.png" in skipped["i01"] and "20" in skipped["i02"]
    assert summary["n_images"] == 2 and summary["n_skipped"] == 2
    rec = MaskStore(tmp_path / "out").get("i00")
    assert rec.mask[10, 10] and not rec.mask[30, 40]


def test_crash_between_shards_recomputes_only_missing(tmp_path, monkeypatch):
    import stages.masks.stage as stage

    ds = _dataset(tmp_path / "d")
    seen, armed = [], [True]
    real = stage.compute_chunk

    def crash_on_second(shard, *a, **k):
        seen.append(shard)
        if shard == 1 and armed[0]:
            armed[0] = False
            raise RuntimeError("killed")
        return real(shard, *a, **k)

    monkeypatch.setattr(stage, "compute_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        compute_masks(ds.samples(), PriorsEstimator(PRIORS), PostParams(), tmp_path / "out", shard_size=4,
                      chunk_size=4, progress=False)
    seen.clear()
    compute_masks(ds.samples(), PriorsEstimator(PRIORS), PostParams(), tmp_path / "out", shard_size=4,
                  chunk_size=4, progress=False)
    assert seen == [1, 2]
    monkeypatch.setattr(stage, "compute_chunk", real)
    compute_masks(ds.samples(), PriorsEstimator(PRIORS), PostParams(), tmp_path / "ref", shard_size=4,
                  progress=False)
    assert _records(tmp_path / "out") == _records(tmp_path / "ref")


@pytest.mark.realdata
def test_onnx_estimator_on_u2netp(tmp_path, u2netp_path):
    from stages.masks.onnx_model import OnnxParams

    ds = _dataset(tmp_path / "d", n=2, size=64)
    est = OnnxEstimator(u2netp_path, OnnxParams(), threads=1)
    assert est.describe()["model_sha256"].startswith("309c8469")
    compute_masks(ds.samples(), est, PostParams(), tmp_path / "out", progress=False)
    store = MaskStore(tmp_path / "out")
    assert len(store) == 2 and store.get("i00").mask.shape == (64, 72)
