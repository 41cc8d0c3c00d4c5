"""A lock per artifact version, held by the kernel, so two processes never write the same directory.

The lock is ``fcntl.flock(LOCK_EX)`` on the version's ``.lock`` file. The kernel gives it to one
open file at a time and drops it when its holder exits, however it exits (SIGKILL included), so
there is nothing stale to detect or break on this host: a killed run is resumed by running it
again. The file's content, the owner record (pid, host, process start time, time, command), is
written by the holder once it holds the lock and serves messages only ("being written by pid N on
host H"); the lock itself never depends on it.

Network file systems. NFSv4 (and NFSv3 with lockd) pass flock locks to the server, so writers on
two hosts exclude each other. Some mounts keep flock local to each host (``local_lock=flock``,
``nolock``, Lustre with ``localflock``, some CIFS set-ups): there a writer on another host is
invisible to the kernel. The owner record covers that case: a record from another host that its
holder did not clear (a clean release removes the file) means that host may still be writing, and
the lock is refused with a message naming it unless ``force=True`` (``--force``: the user states
that process is gone). A crash on another host therefore needs ``--force`` once; a crash on this
host never does. ``force`` cannot take a lock the kernel says is held.

Release removes the file only while holding the lock and only if the record is still this
owner's, so it never deletes another writer's lock. A flock lock belongs to the open file, which
``fork`` shares with the child (data-loader workers, multiprocessing helpers): a child that
outlived a killed writer would keep the version locked. So a child closes its copies of the held
lock descriptors right after the fork (closing a copy never unlocks the parent's) and holds none.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any


class LockError(RuntimeError):
    """Another writer holds the version; the message names it."""


#: How long ``acquire`` keeps trying when the lock is busy: a reader probing the lock
#: (``holder_alive``) holds it shared for microseconds, which must not fail a writer.
BUSY_RETRY_SECONDS = 0.5
#: How long a loser waits for the winner's owner record to appear before naming it unknown.
RECORD_WAIT_SECONDS = 0.5


def _proc_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (clock ticks since boot) on Linux; None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _read_record(fd: int) -> dict[str, Any] | None:
    """The owner record in an open lock file: None when empty, ``{"corrupt": True}`` when unparseable."""
    try:
        data = os.pread(fd, 1 << 16, 0)
    except OSError:
        return {"corrupt": True}
    if not data.strip():
        return None
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"corrupt": True}
    return record if isinstance(record, dict) else {"corrupt": True}


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


#: Locks this process holds (for the fork hook below).
_HELD: set["VersionLock"] = set()


def _forget_in_child() -> None:
    """After ``fork``, in the child: close the inherited lock descriptors, hold nothing."""
    for lock in list(_HELD):
        if lock._fd is not None:
            try:
                os.close(lock._fd)
            except OSError:
                pass
        lock._fd, lock._token = None, None
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class VersionLock:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._fd: int | None = None
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    # -- reading (any process) ---------------------------------------------------------------------
    def holder(self) -> dict[str, Any] | None:
        """The owner record on disk (None without a lock file or record). For messages only:
        a record whose writer died stays until the next writer replaces it."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError:
            return {"pid": None, "host": None, "corrupt": True}
        try:
            return _read_record(fd)
        finally:
            os.close(fd)

    def holder_alive(self) -> bool:
        """True when a writer may be running: the kernel says the lock is held, or a record from
        another host was never cleared (its kernel lock may be invisible from here)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            if not _try_flock(fd, fcntl.LOCK_SH):
                return True
            try:
                record = _read_record(fd)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
            return bool(record and not record.get("corrupt") and record.get("host") != socket.gethostname())
        finally:
            os.close(fd)

    @staticmethod
    def describe(holder: dict[str, Any] | None) -> str:
        if not holder or holder.get("corrupt"):
            return "another process (no owner record yet)"
        text = f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"
        if holder.get("command"):
            text += f" ({holder['command']})"
        return text

    # -- writing (the one holder) ------------------------------------------------------------------
    def acquire(self, *, force: bool = False, break_stale: bool = True) -> None:
        """Take the lock or raise LockError naming the holder. ``break_stale`` is accepted for
        compatibility: the kernel frees a dead holder's lock, so there is nothing stale to break."""
        del break_stale
        if self._fd is not None:
            raise LockError(f"{self.path}: already held by this process")
        deadline = time.monotonic() + BUSY_RETRY_SECONDS
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError as exc:
                raise LockError(f"{self.path.parent} was removed while its lock was being taken") from exc
            try:
                if not _try_flock(fd, fcntl.LOCK_EX):
                    if time.monotonic() < deadline:
                        os.close(fd)
                        time.sleep(0.02)
                        continue
                    holder = self._wait_for_record(fd)
                    raise LockError(f"{self.path.parent} is being written by {self.describe(holder)}"
                                    f"{self._same_process_hint(holder)}")
                # Locked; but the file may have been released and unlinked (then recreated by a
                # third process) between our open and our flock: lock the file the path names.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self._take(fd, force)
                return
            except BaseException:
                if self._fd != fd:
                    os.close(fd)
                raise

    def _wait_for_record(self, fd: int) -> dict[str, Any] | None:
        """The holder writes its record just after locking: give it a moment to appear."""
        end = time.monotonic() + RECORD_WAIT_SECONDS
        record = _read_record(fd)
        while (record is None or record.get("corrupt")) and time.monotonic() < end:
            time.sleep(0.02)
            record = _read_record(fd)
        return record

    @staticmethod
    def _same_process_hint(holder: dict[str, Any] | None) -> str:
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            return " (already held by this process)"
        return ""

    def _take(self, fd: int, force: bool) -> None:
        previous = _read_record(fd)
        me = socket.gethostname()
        if previous and not previous.get("corrupt"):
            if previous.get("host") != me:
                if not force:
                    raise LockError(
                        f"{self.path.parent} is recorded as being written by {self.describe(previous)}; "
                        "that host's lock may be invisible from here (network file system), so it is not "
                        "taken silently: if that process is gone, rerun with --force")
                warnings.warn(f"breaking lock {self.path} recorded by {self.describe(previous)} (forced)",
                              stacklevel=4)
            else:
                warnings.warn(f"taking over the stale lock {self.path} of {self.describe(previous)}, "
                              "which exited without releasing it", stacklevel=4)
        self._token = uuid.uuid4().hex
        record = {
            "pid": os.getpid(),
            "host": me,
            "proc_start": _proc_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300],
            "token": self._token,
        }
        data = json.dumps(record).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd
        _HELD.add(self)

    def release(self) -> None:
        """Remove the lock file (only while holding it, only if the record is still ours) and unlock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.discard(self)
        try:
            record = _read_record(fd)
            ours = bool(record) and record.get("token") == self._token
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if ours and same:
                self.path.unlink(missing_ok=True)
            elif same:
                warnings.warn(f"{self.path}: the lock record is no longer this process's "
                              f"({self.describe(record)}); leaving it", stacklevel=2)
        finally:
            os.close(fd)  # closing the last descriptor drops the kernel lock
            self._token = None

    def __enter__(self) -> "VersionLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
