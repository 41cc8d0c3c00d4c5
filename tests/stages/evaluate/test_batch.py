"""Batch evaluation: jobs by path, retries, failures reported in the table, and the same table
from a real dask LocalCluster as from the in-process run."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts.embeddings import EmbeddingRecord, shard_name, write_embedding_shard
from stages.evaluate.batch import Job, jobs_for, run_batch

CLASSES = ["background", "alpha", "beta", "gamma"]


def _dataset(root: Path, swap: dict[str, int]) -> tuple[Path, dict[str, Path]]:
    """Folder dataset (train 6, val 9 images of 16 x 20 px; image i holds class 1 + i % 3 in a
    box that is also its salient mask) and one embedding store per split whose prototypes are
    the class's direction (another class's for the ids in `swap`)."""
    rng = np.random.default_rng(0)
    data = root / "data"
    for sub in ("images", "labels", "splits"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    (data / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    centres = rng.normal(size=(4, 6))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    stores = {}
    for split, n in (("train", 6), ("val", 9)):
        ids = [f"{split}{i}" for i in range(n)]
        (data / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        records = []
        for i, id_ in enumerate(ids):
            cls = 1 + i % 3
            label = np.zeros((16, 20), np.uint8)
            y, x = rng.integers(0, 8, 2)
            label[y:y + 8, x:x + 10] = cls
            Image.fromarray(label).save(data / "labels" / f"{id_}.png")
            Image.fromarray(rng.integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(data / "images" / f"{id_}.png")
            proto = centres[swap.get(id_, cls)].astype(np.float32)
            records.append(EmbeddingRecord(id_, label == cls, proto, True))
        stores[split] = root / f"emb-{split}"
        write_embedding_shard(stores[split] / shard_name(0), records)
    return data, stores


@pytest.fixture
def jobs(tmp_path) -> list[Job]:
    data, stores = _dataset(tmp_path, swap={"val2": 1})
    good = jobs_for("model-a", data, val_store=stores["val"], train_store=stores["train"],
                    protocols=("kmeans", "retrieval"), seeds=(1, 2, 3),
                    params={"kmeans": {"pca_dim": 4}, "retrieval": {"class_subset": ["alpha", "gamma"]}})
    broken = jobs_for("model-b", data, val_store=tmp_path / "no-such-store", protocols=("kmeans",), seeds=(1,))
    return good + broken


def _check_table(table: dict, out: Path, jobs: list[Job]) -> None:
    rows = {(r["model"], r["protocol"]): r for r in table["rows"]}
    assert list(rows) == [("model-a", "kmeans"), ("model-a", "retrieval"), ("model-b", "kmeans")]
    km = rows[("model-a", "kmeans")]
    per_seed = [json.loads((out / j.subdir / "metrics.json").read_text())["kmeans"]["miou"] for j in jobs[:3]]
    assert km["status"] == "ok" and km["seeds"] == [1, 2, 3]
    assert km["miou"] == pytest.approx(np.mean(per_seed)) and km["miou_std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert 50 < km["miou"] < 100  # val2 (a gamma image) carries alpha's prototype
    assert rows[("model-a", "retrieval")]["status"] == "ok" and rows[("model-a", "retrieval")]["seeds"] == []
    bad = rows[("model-b", "kmeans")]
    assert bad["status"] == "failed" and bad["miou"] is None
    assert "FileNotFoundError" in bad["errors"][0] and "no-such-store" in bad["errors"][0]
    # retried once: two attempts logged by the failing job
    assert len((out / jobs[-1].subdir / "attempts.log").read_text().splitlines()) == 2
    assert len((out / jobs[0].subdir / "attempts.log").read_text().splitlines()) == 1
    assert json.loads((out / "comparison.json").read_text()) == table
    md = (out / "comparison.md").read_text()
    assert f"| model-a | kmeans | {km['miou']:.2f} ± {km['miou_std']:.2f} | 1, 2, 3 | - | ok |" in md
    ret = rows[("model-a", "retrieval")]
    assert f"| model-a | retrieval | {ret['miou']:.2f} | - | class subset {ret['miou_subset']:.2f} | ok |" in md
    assert "| model-b | kmeans | - | - | - | failed: seed 1: FileNotFoundError: embedding store directory not found" in md
    assert (out / "comparison.png").stat().st_size > 0
    # pictures for the first seed only
    assert (out / jobs[0].subdir / "kmeans_sheet.png").is_file()
    assert not list((out / jobs[1].subdir).glob("*.png"))


@pytest.mark.distributed
@pytest.mark.slow
def test_batch_on_local_cluster_equals_in_process(jobs, tmp_path):
    from distributed import Client, LocalCluster

    local = run_batch(jobs, None, tmp_path / "local", retries=1, progress=False)
    _check_table(local, tmp_path / "local", jobs)
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        remote = run_batch(jobs, client, tmp_path / "dask", retries=1, progress=False)
    _check_table(remote, tmp_path / "dask", jobs)
    assert remote == local


def test_jobs_are_checked_and_keys_unique(tmp_path):
    with pytest.raises(ValueError, match="protocol must be one of"):
        Job("m", "knn", 1, "data", "store")
    with pytest.raises(ValueError, match="needs train_store"):
        Job("m", "retrieval", None, "data", "store")
    a = Job("m a/b", "kmeans", 1, "data", "store")
    assert a.key.startswith("evaluate-m-a-b-kmeans-seed-1-") and a.key != Job("m a/b", "kmeans", 2, "data", "store").key
    assert str(a.subdir) == "m-a-b/kmeans/seed-1"
    with pytest.raises(ValueError, match="duplicate jobs"):
        run_batch([a, a], None, tmp_path, progress=False)


def test_retrieval_bank_from_its_own_split(tmp_path):
    """bank_store/bank_split feed retrieval only; the linear probe keeps the train split; and
    without them the jobs (and their keys) are those of a call that never heard of a bank."""
    kw = dict(val_store="emb/val", train_store="emb/train", protocols=("retrieval", "linear"), seeds=(1,))
    jobs = {j.protocol: j for j in jobs_for("m", "data", bank_store="emb/bank", bank_split="bank", **kw)}
    assert (jobs["retrieval"].train_store, jobs["retrieval"].train_split) == ("emb/bank", "bank")
    assert (jobs["linear"].train_store, jobs["linear"].train_split) == ("emb/train", "train")
    plain = jobs_for("m", "data", **kw)
    assert [j.key for j in plain] == [Job("m", "retrieval", None, "data", "emb/val", "emb/train",
                                          params={"figures": True}).key,
                                      Job("m", "linear", 1, "data", "emb/val", "emb/train",
                                          params={"figures": True}).key]
    only_bank = jobs_for("m", "data", val_store="emb/val", bank_store="emb/bank", bank_split="bank",
                         protocols=("kmeans", "retrieval"), seeds=(1,))  # no train store needed
    assert [j.train_store for j in only_bank] == [None, "emb/bank"]
    with pytest.raises(ValueError, match="give bank_store and bank_split together"):
        jobs_for("m", "data", bank_store="emb/bank", **kw)


def test_resume_reads_finished_jobs_back(tmp_path):
    """An interrupted batch continues: jobs with a metrics.json are read back, the others run."""
    data, stores = _dataset(tmp_path / "in", swap={"val2": 1})
    good = jobs_for("model-a", data, val_store=stores["val"], train_store=stores["train"],
                    protocols=("kmeans", "retrieval"), seeds=(1, 2, 3),
                    params={"kmeans": {"pca_dim": 4, "figures": False}, "retrieval": {"figures": False}})
    first = run_batch(good, None, tmp_path, progress=False)
    (tmp_path / good[1].subdir / "metrics.json").unlink()  # as if seed 2 had not finished
    seen = []
    again = run_batch(good, None, tmp_path, progress=False, resume=True, on_job=lambda d, t: seen.append((d, t)))
    assert again == first
    assert seen == [(4, 4)]  # only the missing job ran
    attempts = [len((tmp_path / j.subdir / "attempts.log").read_text().splitlines()) for j in good]
    assert attempts == [1, 2, 1, 1]
    (tmp_path / good[0].subdir / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match=r"cannot reuse .*seed-1/metrics.json: expected a JSON object with key 'kmeans'"):
        run_batch(good, None, tmp_path, progress=False, resume=True)
