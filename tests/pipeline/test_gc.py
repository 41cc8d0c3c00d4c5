"""``maskcontrast gc`` on a small store built with the artifacts API (no stage runs): what the
current config plans and what --keep names survive with their inputs; failed, partial and
superseded versions, intermediate checkpoints and the remains of an interrupted gc go; a version a
live writer holds is left alone; nothing is deleted without --yes."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest
from click.testing import CliRunner

from artifacts.checkpoints import CHECKPOINT_DIR, checkpoint_name
from artifacts.lock import VersionLock
from artifacts.store import COMPLETE, LOCK, ArtifactSpec, Store
from pipeline.cli import State, cli
from pipeline.graph import plan

CONFIG = """store: store
data: {root: data}
evaluate: {protocols: [kmeans]}
dask: {scheduler: synchronous}
"""


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _write(store: Store, spec: ArtifactSpec, files: dict[str, int], *, complete: bool = True, fail: bool = False):
    try:
        with store.begin(spec) as w:
            for name, size in files.items():
                w.file(name).write_bytes(b"x" * size)
            if fail:
                raise RuntimeError("boom")
            if complete:
                w.complete({})
    except RuntimeError:
        pass
    path = store.path(spec.stage, spec.version)
    if not complete and not fail:  # as a killed writer leaves it: "running" with nobody holding the lock
        manifest = json.loads((path / "manifest.json").read_text())
        (path / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
        assert store.info(spec.stage, spec.version).state == "partial"
    return path


def _hold(path, ready, stop):
    lock = VersionLock(path)
    lock.acquire()
    ready.set()
    stop.wait(60)
    lock.release()


@pytest.fixture
def project(tmp_path, monkeypatch, make_box_dataset):
    make_box_dataset(tmp_path / "data", ["background", "a", "b"], {"train": 4, "val": 4})
    (tmp_path / "pipeline.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    ctx = State("pipeline.yaml", (), None, True, False).context()
    planned = plan(ctx)
    store = ctx.store
    paths = {}
    paths["masks"] = _write(store, planned["masks"].spec, {"shard-00000.h5": 100})
    ckpts = {f"{CHECKPOINT_DIR}/{checkpoint_name(e)}": 1000 for e in (1, 2, 3)}
    paths["train"] = _write(store, planned["train"].spec, {**ckpts, "model.pt": 500, "log.jsonl": 10})
    paths["extract"] = _write(store, planned["extract"].spec, {"val/emb-00000.h5": 50}, complete=False)
    paths["old_masks"] = _write(store, ArtifactSpec("masks", 1, {"old": True}), {"shard-00000.h5": 300})
    paths["failed_train"] = _write(store, ArtifactSpec("train", 1, {"lr": 9}, {"masks": planned["masks"].spec.ref}),
                                   {f"{CHECKPOINT_DIR}/{checkpoint_name(1)}": 700}, fail=True)
    paths["old_train"] = _write(store, ArtifactSpec("train", 1, {"kept": "by --keep"}), {
        f"{CHECKPOINT_DIR}/{checkpoint_name(1)}": 10, f"{CHECKPOINT_DIR}/{checkpoint_name(2)}": 10, "model.pt": 5})
    old_extract = ArtifactSpec("extract", 1, {"old": 1}, {"train": f"train/{paths['old_train'].name}"})
    paths["old_extract"] = _write(store, old_extract, {"val/emb-00000.h5": 20})
    paths["old_eval"] = _write(store, ArtifactSpec("evaluate", 1, {"old": 1}, {"extract": old_extract.ref}),
                               {"metrics.json": 2})
    paths["busy"] = _write(store, ArtifactSpec("evaluate", 1, {"busy": 1}), {}, complete=False)
    paths["leftover"] = store.root / "masks" / ".gc-deadbeef-123"
    (paths["leftover"] / "x").mkdir(parents=True)
    return tmp_path, store, paths


def test_gc_dry_run_lists_and_deletes_nothing(project):
    root, store, paths = project
    before = sorted(p for p in (root / "store").rglob("*"))
    r = invoke("gc")
    assert r.exit_code == 0, r.output
    out = r.output
    assert f"{paths['old_masks']}  (superseded: not used by the current config or --keep)" in out
    assert f"{paths['failed_train']}  (failed)" in out
    assert f"{paths['busy']}  (partial (no complete manifest))" in out  # no live writer yet
    assert f"{paths['leftover']}  (left by an interrupted gc)" in out
    assert f"[checkpoints/{checkpoint_name(1)}, checkpoints/{checkpoint_name(2)}]" in out
    for kept in ("masks", "train", "extract"):
        assert f"{paths[kept]}  (" not in out
    assert "rerun with --yes to delete" in out
    assert sorted(p for p in (root / "store").rglob("*")) == before


def test_gc_yes_frees_what_nothing_uses_and_keeps_what_is_used(project):
    root, store, paths = project
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(paths["busy"] / LOCK, ready, stop))
    holder.start()
    try:
        assert ready.wait(30)
        keep = f"evaluate/{paths['old_eval'].name[:8]}"
        r = invoke("gc", "--yes", "--keep", keep)
        assert r.exit_code == 0, r.output
        assert paths["busy"].is_dir() and f"evaluate/{paths['busy'].name}" in r.output  # a live writer's
    finally:
        stop.set()
        holder.join(30)
    for gone in ("old_masks", "failed_train", "leftover"):
        assert not paths[gone].exists(), gone
    for kept in ("masks", "extract", "old_eval", "old_extract", "old_train"):  # --keep keeps its inputs too
        assert paths[kept].is_dir(), kept
    train = paths["train"]
    assert sorted(p.name for p in (train / CHECKPOINT_DIR).iterdir()) == [checkpoint_name(3)]
    assert (train / "model.pt").is_file()
    info = store.info("train", train.name)
    assert info.state == COMPLETE
    listed = {f["path"] for f in info.manifest["files"]}
    assert f"{CHECKPOINT_DIR}/{checkpoint_name(1)}" not in listed and "model.pt" in listed
    assert info.manifest["gc"][0]["removed"] == [f"{CHECKPOINT_DIR}/{checkpoint_name(e)}" for e in (1, 2)]
    assert not list((root / "store").rglob(".gc-*"))
    r = invoke("gc", "--keep", keep)  # the lock holder is gone: its partial version goes next time
    assert f"{paths['busy']}  (partial" in r.output and "superseded" not in r.output
    assert "checkpoint" not in r.output


def test_gc_checkpoints_only(project):
    root, store, paths = project
    r = invoke("gc", "--checkpoints-only", "--yes")
    assert r.exit_code == 0, r.output
    assert paths["old_masks"].is_dir() and paths["failed_train"].is_dir()  # versions untouched
    assert [p.name for p in (paths["old_train"] / CHECKPOINT_DIR).iterdir()] == [checkpoint_name(2)]
    assert [p.name for p in (paths["train"] / CHECKPOINT_DIR).iterdir()] == [checkpoint_name(3)]


def test_gc_keep_must_name_an_artifact(project):
    r = invoke("gc", "--keep", "train/../x")
    assert r.exit_code == 2 and "outside the store" in r.output
    r = invoke("gc", "--keep", "masks/ffffffffffff")
    assert r.exit_code == 2 and "no artifact" in r.output
