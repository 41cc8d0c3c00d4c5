"""Files of a training artifact: checkpoint names, listing, retention, and the step log.

Layout of a train version directory (written by ``stages.train``)::

    checkpoints/epoch-0001.pt ...   one per finished epoch (the state after it), atomic renames
    model.pt                        the final query model (written once training is complete)
    log.jsonl                       one JSON object per line: every step, and every epoch
    loss_curve.png

A checkpoint's number is the count of finished epochs, so the newest one is the resume point.
Only the last ``keep_last`` are kept. The log may run past the newest checkpoint when a run was
interrupted; the checkpoint records how many lines it covers and a resumed run cuts the log back
to that (:func:`truncate_lines`), so no step is logged twice.

Torch-free: these helpers only name, list, remove and cut files.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from artifacts.atomic import atomic_path, fsync_dir, is_temp_name

__all__ = [
    "CHECKPOINT_DIR",
    "LOG_FILE",
    "LOSS_CURVE_FILE",
    "MODEL_FILE",
    "append_jsonl",
    "checkpoint_name",
    "checkpoint_path",
    "count_lines",
    "latest_checkpoint",
    "list_checkpoints",
    "parse_checkpoint_name",
    "prune_checkpoints",
    "read_jsonl",
    "truncate_lines",
]

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.pt"
LOG_FILE = "log.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"

_NAME_RE = re.compile(r"^epoch-(\d{4,})\.pt$")


def checkpoint_name(epoch: int) -> str:
    """``epoch-0003.pt``: the state after ``epoch`` finished epochs (``epoch`` >= 1)."""
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise ValueError(f"checkpoint epoch must be an int >= 1, got {epoch!r}")
    return f"epoch-{epoch:04d}.pt"


def parse_checkpoint_name(name: str) -> int | None:
    """Inverse of :func:`checkpoint_name`; None for any other name (temp files included)."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    epoch = int(match.group(1))
    return epoch if epoch >= 1 and checkpoint_name(epoch) == name else None


def checkpoint_path(run_dir: str | os.PathLike, epoch: int) -> Path:
    """``<run_dir>/checkpoints/epoch-NNNN.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / checkpoint_name(epoch)


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every checkpoint file under ``run_dir/checkpoints``, oldest first.

    Temp files of an interrupted write and any other names are ignored; a missing folder is empty.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for entry in os.scandir(folder):
        epoch = parse_checkpoint_name(entry.name)
        if epoch is not None and entry.is_file():
            found.append((epoch, Path(entry.path)))
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """The checkpoint with the most finished epochs, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, and temp files left by interrupted
    writes; returns what was deleted. ``model.pt`` lives outside ``checkpoints/`` and is never
    touched. Call it from the directory's single writer (the version lock guarantees one), after
    its own writes have finished, so that no temp file removed here is still being written."""
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
    folder = Path(run_dir) / CHECKPOINT_DIR
    doomed = [path for _, path in list_checkpoints(run_dir)[:-keep_last]]
    if folder.is_dir():
        doomed += sorted(Path(e.path) for e in os.scandir(folder) if is_temp_name(e.name) and e.is_file())
    for path in doomed:
        path.unlink(missing_ok=True)
    if doomed:
        fsync_dir(folder)
    return doomed


# --------------------------------------------------------------------------- the step log


def append_jsonl(handle: IO[str], record: Mapping[str, Any]) -> None:
    """Write one record as a JSON line (strict JSON: NaN/inf are refused) and flush it."""
    handle.write(json.dumps(dict(record), sort_keys=True, allow_nan=False) + "\n")
    handle.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines file (an unterminated last line, from a crash, is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            records.append(json.loads(line))
    return records


def count_lines(path: str | os.PathLike) -> int:
    """Number of complete (newline-terminated) lines; 0 for a missing file."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 20), b""))


def truncate_lines(path: str | os.PathLike, n_lines: int) -> int:
    """Keep the first ``n_lines`` complete lines of ``path`` (atomically); returns how many lines
    were dropped. A file with fewer lines keeps them all, minus an unterminated tail; a missing
    file stays missing."""
    if n_lines < 0:
        raise ValueError(f"n_lines must be >= 0, got {n_lines}")
    path = Path(path)
    if not path.is_file():
        return 0
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    complete = [line for line in lines if line.endswith(b"\n")]
    kept = complete[:n_lines]
    if len(kept) == len(lines):
        return 0
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(kept))
    return len(lines) - len(kept)
