"""The versioned artifact store: ``<store>/<stage>/<version>/`` directories with a manifest and a lock.

A version is a short hash of what determines an artifact's content: the stage name, the artifact
schema version, the stage's algorithm version, its resolved parameters and the exact versions of
its inputs. The same configuration on the same inputs names the same directory on any machine, so
a complete version is skipped, a partial one is continued, and a changed configuration lands
beside the old one. Stage and version names are plain names (:func:`_check_name`): no reference
can point outside the store.

``manifest.json`` is the source of truth for a version's state. It is rewritten atomically (temp
file, fsync, rename) and ``status: complete`` is the last thing a stage writes, so a directory
whose manifest does not say ``complete`` is partial, whatever files it holds.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from artifacts.atomic import atomic_write_json, is_temp_name, sha256_file
from artifacts.lock import VersionLock

MANIFEST = "manifest.json"
LOCK = ".lock"
GC_PREFIX = ".gc-"  # a version directory being deleted (see Store.remove)
VERSION_CHARS = 12

#: Manifest states. ``running`` on disk with no live lock holder means the writer died: partial.
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"


class StoreError(RuntimeError):
    """A store-level problem (missing artifact, corrupt manifest); the message names the path."""


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte string that version hashes are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def compute_version(stage: str, schema_version: int, params: Mapping[str, Any], inputs: Mapping[str, str],
                    algorithm_version: int | None = None) -> str:
    """Short, deterministic hash of everything that determines an artifact's content: the stage, its
    schema version, its parameters, its inputs' versions and (when given) the version of the
    algorithm that computes it, so that a change of the code's results makes new versions."""
    payload: dict[str, Any] = {"stage": stage, "schema_version": int(schema_version), "params": params,
                               "inputs": dict(inputs)}
    if algorithm_version is not None:
        payload["algorithm_version"] = int(algorithm_version)
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:VERSION_CHARS]


def utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class ArtifactSpec:
    """What a stage is asked to produce. ``inputs`` maps a role name to ``"stage/version"``."""

    stage: str
    schema_version: int
    params: Mapping[str, Any]
    inputs: Mapping[str, str] = field(default_factory=dict)
    algorithm_version: int | None = None

    @property
    def version(self) -> str:
        return compute_version(self.stage, self.schema_version, self.params, self.inputs, self.algorithm_version)

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.version}"


@dataclass(frozen=True)
class ArtifactInfo:
    """A version directory as seen from its manifest alone (no file is re-hashed)."""

    stage: str
    version: str
    path: Path
    state: str  # missing | partial | running | complete | failed
    manifest: Mapping[str, Any] | None

    @property
    def ref(self) -> str:
        return f"{self.stage}/{self.version}"

    @property
    def size_bytes(self) -> int:
        if self.manifest and self.state == COMPLETE:
            return int(sum(f.get("size", 0) for f in self.manifest.get("files", [])))
        return dir_size(self.path)

    @property
    def progress(self) -> Mapping[str, Any] | None:
        return (self.manifest or {}).get("progress")

    @property
    def summary(self) -> Mapping[str, Any]:
        return (self.manifest or {}).get("summary") or {}


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _check_name(part: str, ref: str) -> None:
    """A stage or version name: letters, digits, ``_ . -``, not starting with a dot, so that
    ``<root>/<stage>/<version>`` never leaves the store (no ``..``, no separator, no absolute
    path) and a version prefix holds no glob characters."""
    if not isinstance(part, str) or not _NAME.fullmatch(part):
        raise StoreError(f"artifact reference {ref!r} is not of the form stage/version with plain names "
                         f"(got {part!r}): it could point outside the store")


def dir_size(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_manifest(directory: Path) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path}: unreadable manifest ({exc})") from exc


class Store:
    """A directory of artifacts: ``<root>/<stage>/<version>/``."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def path(self, stage: str, version: str) -> Path:
        _check_name(stage, f"{stage}/{version}")
        _check_name(version, f"{stage}/{version}")
        return self.root / stage / version

    def resolve(self, ref: str) -> Path:
        """``"stage/version"`` (or a unique version prefix) to its directory. A reference that is
        not two plain names (``..``, an absolute path, more slashes, glob characters) is refused:
        it could name something outside the store."""
        stage, _, version = ref.partition("/")
        if not version:
            raise StoreError(f"artifact reference {ref!r} is not of the form stage/version")
        _check_name(stage, ref)
        _check_name(version, ref)
        exact = self.path(stage, version)
        if exact.is_dir():
            return exact
        matches = sorted(p for p in (self.root / stage).glob(f"{version}*") if p.is_dir())
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StoreError(f"no artifact {ref} in {self.root}")
        raise StoreError(f"{ref} is ambiguous in {self.root}: {', '.join(m.name for m in matches)}")

    def info(self, stage: str, version: str) -> ArtifactInfo:
        path = self.path(stage, version)
        if not path.is_dir():
            return ArtifactInfo(stage, version, path, "missing", None)
        manifest = read_manifest(path)
        if manifest is None:
            return ArtifactInfo(stage, version, path, "partial", None)
        status = manifest.get("status")
        if status == RUNNING:
            state = RUNNING if VersionLock(path / LOCK).holder_alive() else "partial"
        elif status in (COMPLETE, FAILED):
            state = status
        else:
            state = "partial"
        return ArtifactInfo(stage, version, path, state, manifest)

    def list(self, stage: str | None = None) -> list[ArtifactInfo]:
        """Every version directory in the store (optionally of one stage), oldest first."""
        if not self.root.is_dir():
            return []
        stages = [stage] if stage else sorted(p.name for p in self.root.iterdir()
                                              if p.is_dir() and _NAME.fullmatch(p.name))
        out: list[ArtifactInfo] = []
        for st in stages:
            sdir = self.root / st
            if not sdir.is_dir():
                continue
            for vdir in sdir.iterdir():
                if vdir.is_dir() and _NAME.fullmatch(vdir.name):
                    out.append(self.info(st, vdir.name))
        out.sort(key=lambda a: ((a.manifest or {}).get("created") or "", a.stage, a.version))
        return out

    def open(self, ref: str) -> ArtifactInfo:
        """A complete artifact by reference; anything else is a clear error."""
        path = self.resolve(ref)
        info = self.info(path.parent.name, path.name)
        if info.state != COMPLETE:
            raise StoreError(f"artifact {info.ref} is {info.state}, not complete ({path})")
        return info

    def remove(self, stage: str, version: str) -> int:
        """Delete a version directory, under its lock; returns the bytes freed.

        Raises LockError when a writer holds the version (or another host's record says one may).
        The directory is first renamed to a hidden ``.gc-*`` name in its stage folder, so a crash
        during the deletion never leaves a half-deleted directory that looks like a version;
        :meth:`leftovers` lists such remains for the next clean-up.
        """
        import shutil

        path = self.path(stage, version)
        lock = VersionLock(path / LOCK)
        lock.acquire()
        try:
            size = dir_size(path)
            trash = path.parent / f"{GC_PREFIX}{version}-{os.getpid()}"
            os.rename(path, trash)
            shutil.rmtree(trash)
        finally:
            lock.release()
        return size

    def leftovers(self) -> list[Path]:
        """Directories left by a removal that was interrupted (hidden ``.gc-*`` names)."""
        if not self.root.is_dir():
            return []
        return sorted(p for sdir in self.root.iterdir() if sdir.is_dir() and _NAME.fullmatch(sdir.name)
                      for p in sdir.iterdir() if p.is_dir() and p.name.startswith(GC_PREFIX))

    def remove_files(self, stage: str, version: str, names: list[str]) -> int:
        """Delete files (paths relative to the version) of a complete version, under its lock;
        returns the bytes freed. The manifest is rewritten first without them (recording what was
        removed under ``gc``), then the files go: a crash in between leaves only unlisted files."""
        path = self.path(stage, version)
        lock = VersionLock(path / LOCK)
        lock.acquire()
        try:
            manifest = read_manifest(path)
            if not manifest or manifest.get("status") != COMPLETE:
                raise StoreError(f"{path}: only files of a complete version are removed one by one")
            targets = [path / name for name in names]
            for t in targets:
                if path.resolve() not in t.resolve().parents or t.name in (MANIFEST, LOCK):
                    raise StoreError(f"{t}: not a data file inside {path}")
            gone = set(names)
            manifest["files"] = [f for f in manifest.get("files", []) if f.get("path") not in gone]
            manifest.setdefault("gc", []).append({"removed": sorted(gone), "at": utcnow()})
            atomic_write_json(path / MANIFEST, manifest)
            freed = 0
            for t in targets:
                try:
                    freed += t.stat().st_size
                    t.unlink()
                except FileNotFoundError:
                    pass
        finally:
            lock.release()
        return freed

    def begin(
        self,
        spec: ArtifactSpec,
        *,
        code_version: str = "unknown",
        extra: Mapping[str, Any] | None = None,
        break_lock: bool = False,
        restart: bool = False,
    ) -> "ArtifactWriter":
        """Lock the spec's version directory and mark it running.

        Partial work is continued; ``restart=True`` clears the directory first (under the lock),
        which is the only way a complete version is ever rewritten.
        """
        return ArtifactWriter(self, spec, code_version=code_version, extra=extra, break_lock=break_lock,
                              restart=restart)


class ArtifactWriter:
    """The life of one version directory while a stage writes it.

    Use as a context manager: on entry the lock is taken and the manifest says ``running``; files
    are written by the stage (each atomically); ``complete(summary)`` hashes the files and writes
    the final manifest; an exception or Ctrl-C marks the manifest ``failed`` with the error and
    keeps partial work for the next run to continue. The lock is released in every case.
    """

    def __init__(self, store: Store, spec: ArtifactSpec, *, code_version: str, extra, break_lock: bool,
                 restart: bool = False):
        self.store = store
        self.spec = spec
        self.version = spec.version
        self.path = store.path(spec.stage, self.version)
        self._lock = VersionLock(self.path / LOCK)
        self._code_version = code_version
        self._extra = dict(extra or {})
        self._break_lock = break_lock
        self._restart = restart
        self.manifest: dict[str, Any] = {}
        self.completed = False
        self.resumed = False

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "ArtifactWriter":
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock.acquire(break_stale=True, force=self._break_lock)
        try:
            if self._restart:
                _clear_dir(self.path, keep=(LOCK,))
            previous = read_manifest(self.path)
            if previous and previous.get("status") == COMPLETE:
                raise StoreError(f"{self.path} is already complete; refusing to rewrite it")
            _remove_temp_files(self.path)
            self.resumed = previous is not None
            now = utcnow()
            self.manifest = {
                "stage": self.spec.stage,
                "version": self.version,
                "schema_version": self.spec.schema_version,
                **({} if self.spec.algorithm_version is None else {"algorithm_version": self.spec.algorithm_version}),
                "params": self.spec.params,
                "inputs": dict(self.spec.inputs),
                "code_version": self._code_version,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "python": sys.version.split()[0],
                "created": (previous or {}).get("created", now),
                "started": now,
                "finished": None,
                "attempts": int((previous or {}).get("attempts", 0)) + 1,
                "status": RUNNING,
                "progress": (previous or {}).get("progress"),
                "files": [],
                "summary": {},
                **self._extra,
            }
            self._write()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is not None and not self.completed:
                self.manifest["status"] = FAILED
                self.manifest["finished"] = utcnow()
                if issubclass(exc_type, KeyboardInterrupt):
                    self.manifest["error"] = "interrupted (KeyboardInterrupt)"
                else:
                    self.manifest["error"] = f"{exc_type.__name__}: {exc}"
                    self.manifest["traceback"] = "".join(traceback.format_exception(exc_type, exc, tb))[-8000:]
                self._write()
            elif not self.completed:
                self.manifest["status"] = FAILED
                self.manifest["error"] = "stage returned without completing its artifact"
                self._write()
        finally:
            self._lock.release()
        return False

    # -- during the run --------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        """Path of a file inside the version directory (sub-directories are created)."""
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def set_progress(self, done: int, total: int, unit: str = "items", **more: Any) -> None:
        """Record progress in the manifest so ``status`` can show it without reading any shard."""
        self.manifest["progress"] = {"done": int(done), "total": int(total), "unit": unit, **more}
        self._write()

    def update(self, **fields: Any) -> None:
        """Add top-level manifest fields (seeds, environment, skipped inputs...)."""
        self.manifest.update(fields)
        self._write()

    def complete(self, summary: Mapping[str, Any] | None = None) -> None:
        """Hash every file once, then write ``status: complete`` last."""
        files = []
        for p in sorted(self.path.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(self.path).as_posix()
            if rel in (MANIFEST, LOCK) or is_temp_name(p.name):
                continue
            files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
        self.manifest["files"] = files
        self.manifest["summary"] = dict(summary or {})
        self.manifest["status"] = COMPLETE
        self.manifest["finished"] = utcnow()
        self.manifest.pop("error", None)
        self.manifest.pop("traceback", None)
        self._write()
        self.completed = True

    def _write(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)


def _remove_temp_files(path: Path) -> None:
    """Delete the temp files (:func:`~artifacts.atomic.is_temp_name`) under ``path``.

    Called by the version's single writer, under its lock, before the stage runs: any temp file
    there is the half-written remains of a writer that was killed (a shard, a checkpoint, a
    ``model.pt`` of tens of MiB), which no reader would ever open and the complete artifact
    should not carry.
    """
    for p in [p for p in path.rglob(".*") if is_temp_name(p.name) and p.is_file()]:
        p.unlink(missing_ok=True)


def _clear_dir(path: Path, keep: tuple[str, ...] = ()) -> None:
    import shutil

    for child in path.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()

