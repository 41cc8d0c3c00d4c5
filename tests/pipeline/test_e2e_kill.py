"""End to end: ``maskcontrast run`` killed with SIGKILL inside every stage, rerun, same report.

A tiny demo dataset and configuration run once without interruption (the reference). Then, in a
second store, ``run`` is started as a real subprocess in its own session and killed, with its
whole process group (dask nannies and workers, data-loader workers), at a seeded random moment
inside ``masks``; the rerun continues ``masks`` and is killed inside ``train``; and so on through
``extract`` and ``evaluate``; a last rerun finishes. After every kill the store must show the
stage as partial (never complete), its lock as stale, every shard on disk must be whole, and the
rerun must continue the stage rather than redo it. At the end every artifact equals the
reference's: mask and embedding shards byte for byte, the trained weights bit for bit, the step
losses of the training log, and the evaluation's ``metrics.json`` as a whole.

The moment of each kill: once the stage holds its lock and has finished one unit of partial work
(a shard, an epoch's checkpoint, a protocol), after a random fraction (seed
``MASKCONTRAST_KILL_SEED``, default 0; the draws are printed) of the time the reference took from
that point to the stage's end, or earlier when the stage's progress shows it is about to finish (so
that a run faster than the reference still dies inside the stage). The partial work on disk at the
kill must still be there, untouched, when the rerun completes the stage.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import h5py
import pytest

from artifacts.lock import VersionLock
from artifacts.store import COMPLETE, LOCK, MANIFEST, Store, read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]
STAGES = ("masks", "train", "extract", "evaluate")
SEED = int(os.environ.get("MASKCONTRAST_KILL_SEED", "0"))
POLL_S = 0.02
STAGE_TIMEOUT_S = 120.0

# Small enough for a short reference run on two shared cores, large enough that every stage lasts
# a few seconds and writes several units of partial work (shards, epochs, protocols).
DEMO = ("--n-train", "24", "--n-val", "16", "--size", "48")
SETTINGS: dict[str, Any] = {
    "data.layout": "folder",
    "masks.method": "priors",
    "masks.shard_size": 4,
    "masks.priors.size": 96,  # upsampled: a slower masks stage, so that a kill can land inside it
    "masks.priors.n_segments": 60,
    "train.backbone": "mobilenet_v2",
    "train.epochs": 2,
    "train.batch_size": 4,
    "train.queue_size": 8,
    "train.crop_size": 32,
    "train.num_workers": 1,
    "train.device": "cpu",
    "train.keep_last": 2,
    "extract.input_size": 64,
    "extract.mask_source": "masks",
    "extract.feature_size": 4,
    "extract.shard_size": 2,
    "extract.batch_size": 2,
    "extract.num_workers": 1,
    "extract.device": "cpu",
    "evaluate.protocols": "[kmeans, retrieval, linear, saliency]",
    "evaluate.seeds": "[1, 2]",
    "evaluate.kmeans.n_init": 2,
    "evaluate.linear.epochs": 2,
    "evaluate.linear.lr_drop_epoch": 1,
    "dask.scheduler": "null",  # a local cluster: its worker processes must die with the run
    "dask.n_workers": 2,
}


# --------------------------------------------------------------------------- processes


def _cli(project: Path, store: Path, *args: str) -> list[str]:
    overrides = [f"data.root={project / 'data'}", *(f"{k}={v}" for k, v in SETTINGS.items())]
    return [sys.executable, "-m", "pipeline", "--store", str(store),
            *(a for kv in overrides for a in ("--set", kv)), *args]


def _env() -> dict[str, str]:
    """The runs' environment: this checkout first on the path, one BLAS/OpenMP thread everywhere
    (the same in every run, as float results follow the thread count; and several OpenMP threads
    on a busy two-core machine spin-wait through most of each step)."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    return env


def _start(project: Path, store: Path, log: Path) -> subprocess.Popen:
    """``maskcontrast run`` in a new session: its pid is the process group of all it starts."""
    fh = open(log, "w", encoding="utf-8")
    try:
        return subprocess.Popen(_cli(project, store, "-q", "run"), cwd=project, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        fh.close()  # the child holds its own descriptor


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-n:] if log.exists() else "<no log>"


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append((int(entry.name), cmd))
    return members


def _kill_group(proc: subprocess.Popen, timeout: float = 15.0) -> list[tuple[int, str]]:
    """SIGKILL the whole process group of ``proc``; wait until none of it is alive; return who was."""
    members = _group_members(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while (left := _group_members(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"processes of the killed run survived SIGKILL of its group: {left}"
    return members


# --------------------------------------------------------------------------- the store, from outside


def _version_dir(store: Path, stage: str) -> Path | None:
    """The stage's version directory in a store that holds one configuration."""
    found = sorted(p for p in (store / stage).glob("*") if p.is_dir()) if (store / stage).is_dir() else []
    assert len(found) <= 1, f"several versions of {stage} in {store}: {found}"
    return found[0] if found else None


def _manifest(path: Path | None) -> Mapping[str, Any]:
    if path is None:
        return {}
    try:
        return read_manifest(path) or {}
    except Exception:  # noqa: BLE001 - polled while it is being replaced: read again next time
        return {}


def _in_progress(store: Path, stage: str) -> bool:
    path = _version_dir(store, stage)
    return path is not None and (path / LOCK).exists() and _manifest(path).get("status") != COMPLETE


def _units_done(manifest: Mapping[str, Any]) -> bool:
    """True once the stage has finished one unit of partial work: a shard, an epoch, a protocol."""
    p = manifest.get("progress") or {}
    return p.get("done", 0) >= 1 or p.get("split_index", 1) > 1


def _about_to_finish(stage: str, manifest: Mapping[str, Any]) -> bool:
    """True once the stage is near its end (kill now, or risk missing it): two shards left (they
    may come in a burst), the last protocol running, or the last epoch done (model.pt, the loss
    plot and the hashing of every file come after it)."""
    p = manifest.get("progress") or {}
    done, total = p.get("done", 0), p.get("total", 10**9)
    if stage == "train":
        return done >= total
    if stage == "evaluate":
        return done >= total - 1
    if stage == "extract" and p.get("split_index", 1) < p.get("n_splits", 1):
        return False
    return done >= total - 2


def _watch_reference(proc: subprocess.Popen, store: Path, log: Path) -> dict[str, float]:
    """Poll the store while the reference runs; return, per stage, the seconds from its first
    unit of partial work to its complete manifest (the window the kills are drawn from)."""
    first: dict[str, float] = {}
    ended: dict[str, float] = {}
    deadline = time.monotonic() + STAGE_TIMEOUT_S * len(STAGES)
    while len(ended) < len(STAGES):
        assert proc.poll() is None or proc.returncode == 0, f"reference run failed:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"reference run too slow:\n{_tail(log)}"
        for stage in STAGES:
            manifest = _manifest(_version_dir(store, stage))
            now = time.monotonic()
            if manifest and stage not in first and _units_done(manifest):
                first[stage] = now
            if manifest.get("status") == COMPLETE and stage not in ended:
                ended[stage] = now
                assert stage in first, f"{stage} finished before any partial work was seen: poll faster"
        time.sleep(POLL_S)
    assert proc.wait(timeout=60) == 0, _tail(log)
    return {s: ended[s] - first[s] for s in STAGES}


def _status(project: Path, store: Path) -> dict[str, str]:
    """``maskcontrast status``: stage -> state."""
    out = subprocess.run(_cli(project, store, "-q", "status"), cwd=project, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if parts and parts[0] in STAGES:
            states[parts[0]] = parts[2]
    return states


def _files(path: Path, pattern: str) -> dict[str, str]:
    """sha256 of the files matching ``pattern`` as the complete manifest lists them."""
    return {f["path"]: f["sha256"] for f in _manifest(path).get("files", []) if fnmatch(f["path"], pattern)}


# The partial work a rerun must keep rather than redo, per stage (evaluate: the label-count cache).
PARTIAL_WORK = {"masks": "shard-*.h5", "train": "checkpoints/epoch-*.pt", "extract": "*/emb-*.h5",
                "evaluate": "counts_*.npz"}


def _partial_work(path: Path, stage: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of the stage's finished units of partial work (temp files excluded)."""
    return {p.relative_to(path).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in path.glob(PARTIAL_WORK[stage]) if not p.name.startswith(".")}


def _check_whole_shards(path: Path) -> None:
    """Every shard file under ``path`` (not temp debris) opens and is as long as it says."""
    for shard in sorted(path.rglob("*.h5")):
        if shard.name.startswith("."):
            continue  # an interrupted write's temp file: ignored by every reader
        with h5py.File(shard, "r") as f:
            count = len(f["ids"])
            assert f["offsets"].shape == (count + 1,), f"{shard}: offsets do not match ids"
            assert int(f["offsets"][-1]) == f["masks"].shape[0], f"{shard}: truncated masks"


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    subprocess.run([sys.executable, "-m", "pipeline", "-q", "data", "make-demo", str(root / "data"), *DEMO],
                   cwd=root, env=_env(), check=True, capture_output=True, timeout=120)
    return root


@pytest.fixture(scope="module")
def reference(project: Path) -> tuple[Path, dict[str, float]]:
    """An uninterrupted run: its store, and each stage's seconds from first partial work to complete."""
    store, log = project / "reference", project / "reference.log"
    proc = _start(project, store, log)
    try:
        windows = _watch_reference(proc, store, log)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    print(f"reference: seconds from each stage's first unit of work to its end: "
          f"{ {s: round(d, 2) for s, d in windows.items()} }")
    return store, windows


def _kill_inside(stage: str, proc: subprocess.Popen, store: Path, window: float, rng: random.Random,
                 log: Path) -> list[tuple[int, str]]:
    """Wait until ``stage`` holds its lock and has written partial work, then kill the run at a
    random moment of the rest of the stage (a drawn fraction of the reference's ``window``)."""
    fraction = rng.random()
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    path = None
    while path is None or not (_in_progress(store, stage) and _units_done(_manifest(path))):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {stage} started:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"{stage} did not start:\n{_tail(log)}"
        time.sleep(POLL_S)
        path = _version_dir(store, stage)
    t0 = time.monotonic()
    target = t0 + fraction * window
    while time.monotonic() < target and not _about_to_finish(stage, _manifest(path)):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) inside {stage}:\n{_tail(log)}"
        time.sleep(POLL_S)
    killed_after = time.monotonic() - t0
    progress = _manifest(path).get("progress")
    members = _kill_group(proc)
    print(f"{stage}: killed {killed_after:.2f}s after its first unit of work (drawn fraction {fraction:.3f} of "
          f"{window:.2f}s), progress {progress}, process group of {len(members)}")
    return members


def _assert_killed_state(project: Path, store: Path, stage: str) -> None:
    """After the kill: the stage is partial with a stale lock, upstream complete, downstream absent."""
    path = _version_dir(store, stage)
    manifest = _manifest(path)
    assert manifest.get("status") != COMPLETE, f"{stage} says complete after a kill inside it: {manifest}"
    lock = VersionLock(path / LOCK)
    assert lock.holder() is not None, f"{path}: the killed writer's lock is gone"
    assert not lock.holder_alive(), f"{path}: lock of a killed process looks alive: {lock.holder()}"
    assert Store(store).info(stage, path.name).state == "partial"
    states = _status(project, store)
    i = STAGES.index(stage)
    assert states[stage] == "partial", f"status after killing {stage}: {states}"
    assert all(states[s] == COMPLETE for s in STAGES[:i]), states
    assert all(states[s] in ("missing", "stale") for s in STAGES[i + 1:]), states
    # The store stays readable: complete inputs open, and nothing half-written looks whole.
    for s in STAGES[:i]:
        Store(store).open(f"{s}/{_version_dir(store, s).name}")
    if stage in ("masks", "extract"):
        _check_whole_shards(path)
    listed = {info.stage: info.state for info in Store(store).list()}  # what `maskcontrast ls` shows
    assert listed == {**dict.fromkeys(STAGES[:i], COMPLETE), stage: "partial"}, listed


def _step_losses(path: Path) -> list[tuple]:
    records = [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["loss_contrastive"], r["loss_saliency"], r["lr"])
            for r in records if r["type"] == "step"]


def _assert_same_artifacts(ref_store: Path, store: Path) -> None:
    import torch

    ref = {s: _version_dir(ref_store, s) for s in STAGES}
    got = {s: _version_dir(store, s) for s in STAGES}
    assert {s: p.name for s, p in ref.items()} == {s: p.name for s, p in got.items()}
    for s in STAGES:
        manifest = _manifest(got[s])
        assert manifest.get("status") == COMPLETE and manifest.get("attempts") == 2, manifest
        # no debris of the killed writers (temp files, a lock) beside what the manifest lists
        on_disk = sorted(p.relative_to(got[s]).as_posix() for p in got[s].rglob("*") if p.is_file())
        assert on_disk == sorted([MANIFEST, *(f["path"] for f in manifest["files"])]), on_disk
    # masks and extract: the same shard files, byte for byte
    for stage, pattern in (("masks", "*.h5"), ("extract", "*/*.h5")):
        mine, theirs = _files(got[stage], pattern), _files(ref[stage], pattern)
        assert theirs and mine == theirs, f"{stage} shards differ after resume: {mine} vs {theirs}"
    # train: the same weights, and the same losses at every step (the log was cut back, not doubled)
    a = torch.load(ref["train"] / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    b = torch.load(got["train"] / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"trained weights differ after resume: {differ[:10]}"
    assert _step_losses(got["train"]) == _step_losses(ref["train"])
    # evaluate: the report's figures
    ref_metrics = json.loads((ref["evaluate"] / "metrics.json").read_text())
    metrics = json.loads((got["evaluate"] / "metrics.json").read_text())
    for protocol, m in ref_metrics.items():
        for key in ("miou", "per_class_iou", "iou", "max_f", "mean_f", "mae"):
            if key in m:
                assert metrics[protocol][key] == m[key], f"{protocol}.{key}: {metrics[protocol][key]} vs {m[key]}"
    assert metrics == ref_metrics


def _assert_continued(store: Path, stage: str, kept: Mapping[str, tuple[int, int]]) -> None:
    """The rerun completed ``stage`` on top of the partial work the kill left, not from scratch."""
    path = _version_dir(store, stage)
    manifest = _manifest(path)
    assert manifest.get("attempts") == 2, f"{stage}: attempts {manifest.get('attempts')}"
    now = _partial_work(path, stage)
    redone = sorted(name for name, stamp in kept.items() if now.get(name) != stamp)
    assert not redone, f"{stage}: the rerun rewrote finished partial work instead of keeping it: {redone}"
    if stage == "train":
        assert manifest["summary"]["resumed_from_epoch"] >= 1, manifest["summary"]


def _wait_for_complete(store: Path, stage: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    while _manifest(_version_dir(store, stage)).get("status") != COMPLETE:
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {stage} was complete:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"timed out waiting for {stage} to complete:\n{_tail(log)}"
        time.sleep(POLL_S)


def test_killed_in_every_stage_resumes_to_the_reference_report(project, reference):
    """Run 1 is killed in masks; run 2 continues masks and is killed in train; ... run 5 finishes."""
    ref_store, windows = reference
    store = project / "killed"
    rng = random.Random(SEED)
    print(f"kill seed {SEED} (set MASKCONTRAST_KILL_SEED to vary it)")
    procs: list[subprocess.Popen] = []
    try:
        for attempt, stage in enumerate(STAGES, start=1):
            log = project / f"killed-{attempt}-{stage}.log"
            proc = _start(project, store, log)
            procs.append(proc)
            if attempt > 1:  # the previous kill's stage is continued and completed by this run
                _wait_for_complete(store, previous, proc, log)
                _assert_continued(store, previous, kept)
            members = _kill_inside(stage, proc, store, windows[stage], rng, log)
            previous, kept = stage, _partial_work(_version_dir(store, stage), stage)
            assert kept, f"no partial work of {stage} on disk at the kill"
            if stage == "train":  # the masks stage just resumed started a local dask cluster
                assert len(members) >= 3, f"expected the dask workers in the killed group: {members}"
            _assert_killed_state(project, store, stage)
        log = project / "killed-final.log"
        proc = _start(project, store, log)
        procs.append(proc)
        assert proc.wait(timeout=STAGE_TIMEOUT_S * 2) == 0, _tail(log)
        _assert_continued(store, previous, kept)
        actions = {line.split()[0]: line.split()[2] for line in log.read_text().splitlines()
                   if line.split() and line.split()[0] in STAGES}
        assert actions == {"masks": "skipped", "train": "skipped", "extract": "skipped",
                           "evaluate": "resumed"}, _tail(log)
    finally:
        for proc in procs:
            if proc.poll() is None:
                _kill_group(proc)
    _assert_same_artifacts(ref_store, store)
