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


# --------------------------------------------------------------------------- proposals


def _demo(root, n_train=6, n_val=2):
    from stages.data.demo import make_demo

    return make_demo(root, n_train=n_train, n_val=n_val, size=96, seed=3, multi_object=True)


def test_components_on_the_multi_object_demo_write_version_2_shards(tmp_path):
    from artifacts.masks import PROPOSALS_SCHEMA_VERSION, SCHEMA_VERSION, read_shard_attrs
    from stages.masks.params import ProposalParams

    ds = _demo(tmp_path / "d")
    est = PriorsEstimator(PriorParams(size=96, n_segments=100))
    single = compute_masks(ds.samples(), est, PostParams(), tmp_path / "single", progress=False,
                           proposals=ProposalParams())
    comps = compute_masks(ds.samples(), est, PostParams(), tmp_path / "comps", progress=False,
                          proposals=ProposalParams("components", max_proposals=3, min_proposal=0.01))
    [s1], [s2] = (sorted((tmp_path / d).glob("shard-*.h5")) for d in ("single", "comps"))
    assert read_shard_attrs(s1)["schema_version"] == SCHEMA_VERSION and "proposals" not in read_shard_attrs(s1)
    attrs = read_shard_attrs(s2)
    assert attrs["schema_version"] == PROPOSALS_SCHEMA_VERSION
    assert attrs["proposals"] == {"proposals": "components", "max_proposals": 3, "min_proposal": 0.01}
    assert single["schema_version"] == 1 and "n_proposals" not in single
    assert comps["schema_version"] == 2 and comps["n_proposals"] >= comps["n_kept"]
    # same masks either way; the proposals split them into separate objects
    assert _records(tmp_path / "single") == _records(tmp_path / "comps")
    store = MaskStore(tmp_path / "comps")
    counts = [len(store.read_proposals(i)) for i in store.ids(kept_only=True)]
    assert max(counts) >= 2 and all(1 <= c <= 3 for c in counts)
    for id_ in store.ids():
        rec = store.get(id_, proposals=True)
        union = np.zeros(rec.shape, bool)
        for p in rec.proposals:
            assert not (union & p.mask).any() and (p.mask <= rec.mask).all() and p.area >= 0.01
            union |= p.mask


def test_cuts_proposals_come_from_the_features_estimators_grid(tmp_path):
    from stages.masks.features import FeatureEstimator, FeatureParams
    from stages.masks.params import ProposalParams

    ds = _dataset(tmp_path / "d", n=3)
    est = FeatureEstimator(FeatureParams(size=64, crf=False), weights=None)
    img = np.asarray(Image.open(ds.samples()[0].image).convert("RGB"))
    soft, grid, classes = est.with_grid(img)
    assert np.array_equal(soft, est(img)) and grid.ndim == 3
    params = ProposalParams("cuts", max_proposals=2, min_proposal=0.0)
    summary = compute_masks(ds.samples(), est, PostParams(), tmp_path / "out", progress=False, proposals=params)
    assert summary["schema_version"] == 2
    store = MaskStore(tmp_path / "out")
    for id_ in store.ids():
        props = store.read_proposals(id_)
        assert len(props) <= 2
        assert all(p.mask.shape == store.get(id_).shape for p in props)
