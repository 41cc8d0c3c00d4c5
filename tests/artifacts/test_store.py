"""The artifact store contract: deterministic versions, atomic manifests, locks, resume."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import time

import pytest

from artifacts.lock import LockError, VersionLock
from artifacts.store import (
    COMPLETE,
    FAILED,
    ArtifactSpec,
    Store,
    StoreError,
    compute_version,
    read_manifest,
)


def spec(**params):
    return ArtifactSpec("masks", 1, {"method": "priors", **params}, {})


def test_version_is_deterministic_and_order_independent():
    a = compute_version("masks", 1, {"a": 1, "b": [1, 2]}, {"x": "masks/abc"})
    b = compute_version("masks", 1, {"b": [1, 2], "a": 1}, {"x": "masks/abc"})
    assert a == b and len(a) == 12
    # the known value pins the hash scheme: changing it silently would orphan every store
    assert a == compute_version("masks", 1, dict(a=1, b=[1, 2]), dict(x="masks/abc"))


@pytest.mark.parametrize("change", [
    dict(stage="train"), dict(schema_version=2), dict(params={"a": 2, "b": [1, 2]}),
    dict(inputs={"x": "masks/abd"}),
])
def test_version_changes_with_each_ingredient(change):
    base = dict(stage="masks", schema_version=1, params={"a": 1, "b": [1, 2]}, inputs={"x": "masks/abc"})
    assert compute_version(**base) != compute_version(**{**base, **change})


def test_lifecycle_complete_manifest_lists_files(tmp_path):
    store = Store(tmp_path)
    s = spec()
    with store.begin(s, code_version="test") as w:
        assert store.info("masks", s.version).state == "running"
        (w.path / "shard-00000.h5").write_bytes(b"x" * 10)
        (w.path / ".shard-00001.h5.123.abcdef01.tmp").write_bytes(b"partial")  # a temp file is never listed
        w.complete({"n": 3})
    info = store.info("masks", s.version)
    assert info.state == COMPLETE
    m = info.manifest
    assert m["status"] == COMPLETE and m["summary"] == {"n": 3} and m["code_version"] == "test"
    assert [f["path"] for f in m["files"]] == ["shard-00000.h5"]
    assert m["files"][0]["size"] == 10 and len(m["files"][0]["sha256"]) == 64
    assert m["params"] == {"method": "priors"} and m["host"] == socket.gethostname()
    assert not (w.path / ".lock").exists()
    assert store.open(f"masks/{s.version[:6]}").path == w.path  # unique prefix resolves


def test_complete_version_is_never_rewritten(tmp_path):
    store = Store(tmp_path)
    s = spec()
    with store.begin(s) as w:
        w.complete({})
    with pytest.raises(StoreError, match="already complete"):
        with store.begin(s):
            pass
    with store.begin(s, restart=True) as w:  # --force: explicit restart under the lock
        assert not (w.path / "manifest.json").read_text().count('"complete"')
        w.complete({"again": True})
    assert store.info("masks", s.version).summary == {"again": True}


def test_exception_marks_failed_and_keeps_partial_work(tmp_path):
    store = Store(tmp_path)
    s = spec()
    with pytest.raises(RuntimeError):
        with store.begin(s) as w:
            (w.path / "shard-00000.h5").write_bytes(b"done")
            raise RuntimeError("boom")
    info = store.info("masks", s.version)
    assert info.state == FAILED and "boom" in info.manifest["error"]
    assert (info.path / "shard-00000.h5").exists()
    with store.begin(s) as w:  # the next run continues
        assert w.resumed and w.manifest["attempts"] == 2
        w.complete({})
    assert store.info("masks", s.version).state == COMPLETE


def _die_mid_write(root, name):
    """A writer killed inside an atomic write: its temp file stays behind, never renamed."""
    from artifacts.atomic import atomic_path

    w = Store(root).begin(spec()).__enter__()
    (w.path / "shard-00000.h5").write_bytes(b"whole")
    with atomic_path(w.path / name, suffix=".h5") as tmp:
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("name", ["shard-00001.h5", "train/emb-00003.h5"])
def test_rerun_removes_the_half_written_files_of_a_killed_writer(tmp_path, name):
    (tmp_path / "masks" / spec().version / "train").mkdir(parents=True)
    p = mp.get_context("fork").Process(target=_die_mid_write, args=(tmp_path, name))
    p.start()
    p.join(30)
    assert p.exitcode == -signal.SIGKILL
    path = Store(tmp_path).path("masks", spec().version)
    debris = list(path.rglob("*.tmp.h5"))
    assert len(debris) == 1 and debris[0].read_bytes() == b"half"
    with pytest.warns(UserWarning, match="stale lock"):
        with Store(tmp_path).begin(spec()) as w:
            assert w.resumed
            assert not debris[0].exists() and not (path / name).exists()
            assert (path / "shard-00000.h5").read_bytes() == b"whole"  # finished work is kept
            w.complete({})
    assert sorted(q.relative_to(path).as_posix() for q in path.rglob("*") if q.is_file()) == [
        "manifest.json", "shard-00000.h5"]


def test_open_refuses_incomplete(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="no artifact"):
        store.open("masks/deadbeef")
    with pytest.raises(StoreError, match="stage/version"):
        store.open("masks")


def _killed_writer(root, ready):
    store = Store(root)
    w = store.begin(spec()).__enter__()
    w.set_progress(1, 4, "shards")
    ready.set()
    # write manifests in a loop until killed: the kill lands mid-write at a random moment
    i = 0
    while True:
        i += 1
        w.set_progress(i % 4, 4, "shards", filler="x" * 20000)


def test_sigkill_mid_write_leaves_readable_partial_and_resumes(tmp_path):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_killed_writer, args=(tmp_path, ready))
    p.start()
    assert ready.wait(30)
    time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    store = Store(tmp_path)
    info = store.info("masks", spec().version)
    manifest = read_manifest(info.path)  # parses: never a torn file
    assert manifest["status"] == "running"
    assert info.state == "partial"  # the lock holder is dead
    with pytest.warns(UserWarning, match="stale lock"):
        with store.begin(spec()) as w:  # a rerun breaks the dead process's lock and continues
            assert w.resumed
            w.complete({})
    assert store.info("masks", spec().version).state == COMPLETE


def _hold_lock(path, ready, stop):
    lock = VersionLock(path)
    lock.acquire()
    ready.set()
    stop.wait(60)
    lock.release()


def test_lock_held_by_live_process_fails_fast_naming_holder(tmp_path):
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path / ".lock", ready, stop))
    p.start()
    try:
        assert ready.wait(30)
        t0 = time.monotonic()
        with pytest.raises(LockError, match=f"being written by pid {p.pid} on host {socket.gethostname()}"):
            VersionLock(tmp_path / ".lock").acquire()
        assert time.monotonic() - t0 < 5
        assert VersionLock(tmp_path / ".lock").holder_alive()
        with pytest.raises(LockError, match=f"pid {p.pid}"):  # --force cannot take a lock the kernel holds
            VersionLock(tmp_path / ".lock").acquire(force=True)
    finally:
        stop.set()
        p.join(30)
    assert not (tmp_path / ".lock").exists()  # released cleanly: the holder removed its file


def test_sigkilled_holder_frees_the_version_at_once(tmp_path):
    ctx = mp.get_context("fork")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(tmp_path / ".lock", ready, stop))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    lock = VersionLock(tmp_path / ".lock")
    assert lock.holder()["pid"] == p.pid  # the record stays, for messages
    assert not lock.holder_alive()
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=f"stale lock .* pid {p.pid}"):
        lock.acquire()
    assert time.monotonic() - t0 < 1.0
    assert lock.holder()["pid"] == os.getpid()
    lock.release()


def _race(path, marker, barrier, rounds, out):
    """Each round every process tries the lock; a winner proves it is alone by creating ``marker``
    exclusively, keeps it a moment, and removes it before releasing."""
    overlaps = wins = 0
    for _ in range(rounds):
        barrier.wait(30)
        lock = VersionLock(path)
        try:
            lock.acquire()
        except LockError:
            continue
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            overlaps += 1
        else:
            os.close(fd)
            wins += 1
            time.sleep(0.002)
            os.unlink(marker)
        finally:
            lock.release()
    out.put((overlaps, wins))


def test_racing_writers_never_both_hold_the_version(tmp_path):
    ctx = mp.get_context("fork")
    n, rounds = 3, 25
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(tmp_path / ".lock", tmp_path / "writing", barrier, rounds, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(r[0] for r in results) == 0, results
    assert sum(r[1] for r in results) >= rounds  # every round someone wrote
    assert not (tmp_path / ".lock").exists()


def test_release_leaves_another_owners_record(tmp_path):
    lock = VersionLock(tmp_path / ".lock")
    lock.acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"}))
    with pytest.warns(UserWarning, match="no longer this process"):
        lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["token"] == "theirs"


def test_lock_from_other_host_needs_force(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "t"}))
    lock = VersionLock(tmp_path / ".lock")
    with pytest.raises(LockError, match="--force"):
        lock.acquire()
    with pytest.warns(UserWarning, match="forced"):
        lock.acquire(force=True)
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_dead_pid_lock_is_stale(tmp_path):
    ctx = mp.get_context("fork")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    (tmp_path / ".lock").write_text(json.dumps({"pid": p.pid, "host": socket.gethostname(), "since": "t"}))
    lock = VersionLock(tmp_path / ".lock")
    assert not lock.holder_alive()
    with pytest.warns(UserWarning, match="stale"):
        lock.acquire()
    lock.release()


def test_second_writer_in_same_store_is_refused(tmp_path):
    store = Store(tmp_path)
    with store.begin(spec()):
        with pytest.raises(LockError, match="already held by this process"):
            with store.begin(spec()):
                pass


def test_list_sees_every_version(tmp_path):
    store = Store(tmp_path)
    for v in range(3):
        with store.begin(spec(v=v)) as w:
            w.complete({"v": v})
    infos = store.list()
    assert sorted(i.summary["v"] for i in infos) == [0, 1, 2]
    assert all(i.state == COMPLETE and i.size_bytes == 0 for i in infos)


@pytest.mark.parametrize("ref", ["train/../x", "train/..", "../train/abc", "/etc/passwd", "train//etc",
                                 "train/a/b", "train/*", "train/[ab]", "train/.lock", "./train/abc", "tr ain/abc"])
def test_resolve_refuses_references_that_leave_the_store(tmp_path, ref):
    (tmp_path / "x").mkdir()  # something outside the store that "train/../x" would name
    (tmp_path / "store" / "train" / "abc").mkdir(parents=True)
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError, match="plain names .* could point outside the store"):
        store.resolve(ref)
    with pytest.raises(StoreError, match="outside the store"):
        store.open(ref)
    assert store.resolve("train/abc") == tmp_path / "store" / "train" / "abc"


def test_path_and_list_refuse_or_skip_unsafe_names(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(StoreError, match="outside the store"):
        store.path("masks", "../../etc")
    (tmp_path / "masks" / ".partial-copy").mkdir(parents=True)
    (tmp_path / ".trash").mkdir()
    assert store.list() == []


def test_a_forked_helper_does_not_keep_a_killed_writers_lock(tmp_path):
    """A writer holding the lock forks a helper that outlives it (as a data-loader worker may); the
    writer is SIGKILLed: the version is free at once although the helper still runs."""
    read_end, write_end = os.pipe()
    writer = os.fork()
    if writer == 0:  # the writer: plain fork/_exit, so that no pytest code runs in it
        try:
            os.close(read_end)
            VersionLock(tmp_path / ".lock").acquire()
            helper = os.fork()
            if helper == 0:
                time.sleep(60)
                os._exit(0)
            os.write(write_end, f"{helper}\n".encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as fh:
        helper = int(fh.readline())
    try:
        os.kill(writer, signal.SIGKILL)
        os.waitpid(writer, 0)
        os.kill(helper, 0)  # still running
        lock = VersionLock(tmp_path / ".lock")
        assert not lock.holder_alive()
        with pytest.warns(UserWarning, match="stale lock"):
            lock.acquire()
        lock.release()
    finally:
        os.kill(helper, signal.SIGKILL)
