"""The real chain in the default suite: masks -> train -> extract -> evaluate, and the clusters
stage on the same embeddings, on a tiny generated dataset through the real stage code (no faked
extraction or model loading), then a rerun that must do no work.

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

STAGES = ("masks", "train", "extract", "evaluate", "clusters")
#: what each stage's golden result depends on (clusters reads extract's embeddings, not evaluate's report)
UPSTREAM = {"masks": (), "train": ("masks",), "extract": ("masks", "train"), "evaluate": ("masks", "train", "extract"),
            "clusters": ("masks", "train", "extract")}
SETTINGS = {  # also the golden tests' (tests/pipeline/test_golden.py): changing them changes the digests
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
    "clusters.k_max": 4,
    "clusters.pca_dim": 4,
    "clusters.n_init": 2,
    "clusters.sheet_size": 2,
    "dask.scheduler": "synchronous",
}
PROTOCOL_KEYS = {"kmeans": {"miou", "miou_std", "per_class_iou", "seeds"},
                 "linear": {"miou", "miou_std", "per_class_iou", "seeds"},
                 "retrieval": {"miou", "miou_std", "per_class_iou", "seeds"},
                 "saliency": {"iou", "max_f", "mean_f", "mae"}}


def _versions(store: Store) -> dict[str, list[str]]:
    return {stage: sorted(i.version for i in store.list(stage)) for stage in STAGES}


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The chain run once for this module: (root, CLI arguments, output of the first run and of the
    clusters stage)."""
    return run_chain(tmp_path_factory.mktemp("chain"))


def run_chain(root: Path) -> tuple[Path, list[str], str]:
    """Run the chain in this process on one torch thread: float results follow the thread count
    (a second training step's loss moved by 0.2 between one and two threads), and the golden
    results below must not depend on the machine's core count."""
    import torch

    r = invoke("data", "make-demo", str(root / "data"), "--n-train", "8", "--n-val", "8", "--size", "32")
    assert r.exit_code == 0, r.output
    sets = [a for k, v in {"data.root": root / "data", **SETTINGS}.items() for a in ("--set", f"{k}={v}")]
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"  # weight-free, offline
    args = ["--config", str(demo), "--store", str(root / "store"), *sets]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = invoke(*args, "-q", "run")
        assert first.exit_code == 0, first.output
        clusters = invoke(*args, "-q", "run", "--to", "clusters")  # labels or not, it runs on the embeddings
        assert clusters.exit_code == 0, clusters.output
    finally:
        torch.set_num_threads(threads)
    return root, args, first.output + clusters.output


def test_real_chain_makes_complete_artifacts(chain):
    root, _, output = chain
    store = Store(root / "store")
    for stage in STAGES:
        [info] = store.list(stage)  # one version per stage
        assert info.state == COMPLETE, (stage, info.manifest and info.manifest.get("error"))
        files = {f["path"] for f in info.manifest["files"]}
        assert files and all((info.path / f).is_file() for f in files)
    masks, train, extract, evaluate, clusters = (store.list(s)[0] for s in STAGES)
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
    assert clusters.manifest["inputs"] == {"extract": extract.ref}
    summary = clusters.manifest["summary"]
    assert 2 <= summary["k"] <= 4 and summary["n_images"] == summary["n_segmentations"] == 8
    assert len(list((clusters.path / "sheets").glob("cluster-*.png"))) == summary["k"]
    assert len(list((clusters.path / "segmentations").glob("*_overlay.png"))) == 8
    assert (clusters.path / "kmeans_model.json").is_file() and f"clusters: k = {summary['k']}" in output
    assert "consider clusters.pca_dim <= 1; the silhouette is highest" in summary["note"]  # its own key named


def test_real_chain_rerun_does_no_work(chain):
    root, args, _ = chain
    store = Store(root / "store")
    before = {i.ref: (i.manifest["finished"], i.manifest["attempts"]) for i in store.list()}
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "store").rglob("*") if p.is_file()}
    for to, stages in (("evaluate", ("masks", "train", "extract", "evaluate")),
                       ("clusters", ("masks", "train", "extract", "clusters"))):
        r = invoke(*args, "-q", "run", "--to", to)
        assert r.exit_code == 0, r.output
        lines = [ln.split() for ln in r.output.splitlines() if ln.split()[:1] and ln.split()[0] in STAGES]
        assert [(ln[0], ln[2]) for ln in lines] == [(s, "skipped") for s in stages], r.output
    assert {i.ref: (i.manifest["finished"], i.manifest["attempts"]) for i in store.list()} == before
    assert _versions(store) == {s: [ref.split("/")[1] for ref in before if ref.startswith(s + "/")] for s in STAGES}
    assert {p: p.stat().st_mtime_ns for p in (root / "store").rglob("*") if p.is_file()} == mtimes


# -- golden results: each stage's output on this fixed input, per algorithm version -----------------
# A small rounded summary of each stage's result, compared with a tolerance that float noise across
# machines and thread counts does not reach. A change means the stage's results changed: bump the
# stage's number in stages/versions.py (so that artifacts made by the old code are not reused as if
# the new code had made them) and pin the new summary under the new number. Downstream stages are
# judged only when everything upstream still matches.
TOLERANCE = {"masks": 0.011, "train": 0.03, "extract": 0.021, "evaluate": 1.01, "clusters": 0.051}
GOLDEN: dict[str, dict[int, object]] = {
    "masks": {1: [['demo_00000', True, 0.28], ['demo_00001', True, 0.16], ['demo_00002', True, 0.11],
         ['demo_00003', True, 0.03], ['demo_00004', True, 0.22], ['demo_00005', True, 0.05],
         ['demo_00006', True, 0.14], ['demo_00007', True, 0.05], ['demo_00008', True, 0.24],
         ['demo_00009', True, 0.16], ['demo_00010', True, 0.07], ['demo_00011', True, 0.08],
         ['demo_00012', True, 0.09], ['demo_00013', True, 0.03], ['demo_00014', True, 0.08],
         ['demo_00015', True, 0.08]]},
    "train": {1: {'losses': [1.62, 2.43], 'weight_mean_abs': 0.0188}},
    "extract": {1: {'ids': ['demo_00008', 'demo_00009', 'demo_00010', 'demo_00011', 'demo_00012', 'demo_00013',
                 'demo_00014', 'demo_00015'],
         'prototypes': [[0.08, -0.21, 0.27, -0.18, -0.05, 0.26], [0.04, -0.23, 0.31, -0.14, -0.01, 0.25],
                        [0.05, -0.22, 0.32, -0.15, -0.03, 0.24], [0.08, -0.21, 0.27, -0.19, -0.06, 0.26],
                        [0.05, -0.23, 0.31, -0.14, -0.02, 0.24], [0.08, -0.21, 0.29, -0.19, -0.06, 0.24],
                        [0.09, -0.19, 0.24, -0.2, -0.06, 0.27], [0.07, -0.21, 0.29, -0.18, -0.05, 0.25]],
         'valid': [True, True, True, True, True, True, True, True]}},
    "evaluate": {1: {'kmeans': {'miou': 37.0},
         'linear': {'miou': 15.5},
         'retrieval': {'miou': 15.8},
         'saliency': {'iou': 0.55, 'mae': 0.14, 'max_f': 0.81}}},
    "clusters": {1: {'k': 4, 'silhouette': 0.21,
                     'partition': [['demo_00008', 'demo_00011', 'demo_00013', 'demo_00015'], ['demo_00009', 'demo_00012'],
                                   ['demo_00010'], ['demo_00014']],
                     'unclustered': []},
                 2: {'k': 4, 'silhouette': 0.21,
                     'partition': [['demo_00008', 'demo_00011'], ['demo_00009', 'demo_00012'],
                                   ['demo_00010', 'demo_00013', 'demo_00015'], ['demo_00014']],
                     'unclustered': []}},
}


def fingerprint(stage: str, path: Path) -> object:
    """The rounded result of ``stage`` in its artifact directory ``path``."""
    import h5py
    import numpy as np

    def r(x, n):
        return round(float(x), n) + 0.0  # + 0.0: no -0.0

    if stage == "masks":
        out = []
        for shard in sorted(path.glob("shard-*.h5")):
            with h5py.File(shard, "r") as f:
                out += [[i.decode() if isinstance(i, bytes) else i, bool(k), r(fg, 2)]
                        for i, k, fg in zip(f["ids"][:], f["kept"][:], f["fg_fraction"][:])]
        return out
    if stage == "train":
        import torch

        losses = [r(rec["loss"], 2) for rec in map(json.loads, (path / "log.jsonl").read_text().splitlines())
                  if "loss" in rec and "step" in rec]
        state = torch.load(path / "model.pt", map_location="cpu", weights_only=False)
        weights = state.get("model", state.get("state_dict", state))
        params = [v for k, v in sorted(weights.items()) if hasattr(v, "dtype") and v.dtype.is_floating_point
                  and "running" not in k]
        return {"losses": losses, "weight_mean_abs": r(sum(float(v.double().abs().sum()) for v in params)
                                                       / sum(v.numel() for v in params), 4)}
    if stage == "extract":
        from artifacts.embeddings import EmbeddingStore

        ids, protos, valid = EmbeddingStore(path / "val").prototypes()
        return {"ids": list(ids), "valid": valid.tolist(),
                "prototypes": [[r(x, 2) for x in row[:6]] for row in protos.astype(np.float64)]}
    if stage == "clusters":  # the partition (cluster numbering aside), k and its silhouette
        import csv

        rows = list(csv.DictReader((path / "assignments.csv").open(encoding="utf-8")))
        members: dict[str, list[str]] = {}
        for row in rows:
            members.setdefault(row["cluster"], []).append(row["id"])
        summary = json.loads((path / "manifest.json").read_text())["summary"]
        return {"k": summary["k"], "silhouette": r(summary["silhouette"], 2),
                "partition": sorted(sorted(ids) for c, ids in members.items() if c != "-1"),
                "unclustered": sorted(members.get("-1", []))}
    metrics = json.loads((path / "metrics.json").read_text())
    return {p: {k: r(v, 1 if k == "miou" else 2) for k, v in m.items() if k in ("miou", "iou", "max_f", "mae")}
            for p, m in sorted(metrics.items())}


def differences(pinned: object, got: object, tol: float, where: str = "") -> list[str]:
    """Where ``got`` differs from ``pinned``: numbers by more than ``tol``, anything else at all."""
    if isinstance(pinned, dict) and isinstance(got, dict):
        if set(pinned) != set(got):
            return [f"{where}: keys {sorted(pinned)} != {sorted(got)}"]
        return [d for k in pinned for d in differences(pinned[k], got[k], tol, f"{where}.{k}")]
    if isinstance(pinned, list) and isinstance(got, list):
        if len(pinned) != len(got):
            return [f"{where}: {len(pinned)} items != {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(pinned, got)) for d in differences(a, b, tol, f"{where}[{i}]")]
    if isinstance(pinned, float) and isinstance(got, float):
        return [] if abs(pinned - got) <= tol else [f"{where}: {pinned} -> {got}"]
    return [] if pinned == got else [f"{where}: {pinned!r} -> {got!r}"]


@pytest.mark.parametrize("stage", STAGES)
def test_golden_result_per_algorithm_version(chain, stage):
    from stages.versions import ALGORITHM_VERSIONS

    store = Store(chain[0] / "store")
    for upstream in UPSTREAM[stage]:
        [info] = store.list(upstream)
        pinned = GOLDEN[upstream].get(ALGORITHM_VERSIONS[upstream])
        if pinned is None or differences(pinned, fingerprint(upstream, info.path), TOLERANCE[upstream]):
            pytest.skip(f"upstream stage {upstream} does not match its golden result: see its test first")
    [info] = store.list(stage)
    got = fingerprint(stage, info.path)
    version = ALGORITHM_VERSIONS[stage]
    assert version in GOLDEN[stage], (
        f"no golden result for stage {stage!r} at algorithm version {version}: pin "
        f"GOLDEN[{stage!r}][{version}] = {got!r}")
    diff = differences(GOLDEN[stage][version], got, TOLERANCE[stage])
    assert not diff, (
        f"stage {stage!r} gives other results than its algorithm version {version} did ({'; '.join(diff[:5])}). "
        f"If the change is intended, bump ALGORITHM_VERSIONS[{stage!r}] in stages/versions.py to {version + 1} "
        f"and pin GOLDEN[{stage!r}][{version + 1}] = {got!r}")


def test_golden_failure_names_the_stage_to_bump(chain, monkeypatch):
    changed = {1: {**GOLDEN["train"][1], "losses": [9.0, 9.0]}}
    monkeypatch.setitem(GOLDEN, "train", changed)
    with pytest.raises(AssertionError, match=r"stage 'train' gives other results .* bump "
                                             r"ALGORITHM_VERSIONS\['train'\] in stages/versions.py to 2"):
        test_golden_result_per_algorithm_version(chain, "train")
    with pytest.raises(pytest.skip.Exception, match="upstream stage train does not match"):
        test_golden_result_per_algorithm_version(chain, "extract")
