"""A lock file per artifact version, so two processes never write the same directory.

The lock is created with ``O_CREAT | O_EXCL`` and holds the writer's pid, host and process start
time. A lock whose holder is provably dead (same host, and the pid is gone or now belongs to a
process that started later) is stale: it is broken with a warning, because a killed run must be
resumable by simply running it again. A lock held by a live process, or by a process on another
host (which cannot be checked from here), is an error naming the holder; ``force=True`` breaks it.
"""
from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any


class LockError(RuntimeError):
    """Another writer holds the version; the message names it."""


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VersionLock:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return {"pid": None, "host": None, "corrupt": True}

    def holder_alive(self) -> bool:
        """True when the lock exists and its holder may still be running."""
        holder = self.holder()
        if holder is None:
            return False
        return not self._is_stale(holder)

    @staticmethod
    def _is_stale(holder: dict[str, Any]) -> bool:
        if holder.get("corrupt"):
            return True
        if holder.get("host") != socket.gethostname():
            return False  # cannot check another host's processes
        pid = holder.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return True
        started = holder.get("proc_start")
        return started is not None and _proc_start_time(pid) not in (None, started)

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since')}"

    def acquire(self, *, break_stale: bool = True, force: bool = False) -> None:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "proc_start": _proc_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released between our open and read: try again
                if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    raise LockError(f"{self.path}: already held by this process")
                stale = self._is_stale(holder)
                if force or (stale and break_stale):
                    why = "stale" if stale else "forced"
                    warnings.warn(f"breaking {why} lock {self.path} held by {self.describe(holder)}", stacklevel=3)
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                hint = "" if stale else "; if that process is gone (e.g. it ran on another host), rerun with --force"
                raise LockError(f"{self.path.parent} is being written by {self.describe(holder)}{hint}")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._held = True
            return
        raise LockError(f"{self.path}: could not acquire the lock (contended)")

    def release(self) -> None:
        if self._held:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self._held = False

    def __enter__(self) -> "VersionLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
