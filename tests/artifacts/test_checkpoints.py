"""Training-run files: checkpoint names, listing, retention, and cutting the step log back."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from artifacts.atomic import atomic_path
from artifacts.checkpoints import (
    CHECKPOINT_DIR,
    MODEL_FILE,
    append_jsonl,
    checkpoint_name,
    checkpoint_path,
    count_lines,
    latest_checkpoint,
    list_checkpoints,
    parse_checkpoint_name,
    prune_checkpoints,
    read_jsonl,
    truncate_lines,
)


def _touch(run: Path, *epochs: int) -> None:
    for epoch in epochs:
        path = checkpoint_path(run, epoch)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_names_round_trip_and_other_names_are_not_checkpoints() -> None:
    for epoch in (1, 7, 40, 9999, 12345):
        assert parse_checkpoint_name(checkpoint_name(epoch)) == epoch
    assert checkpoint_name(3) == "epoch-0003.pt"
    for name in ("epoch-3.pt", "epoch-0000.pt", "epoch-00003.pt", "model.pt", "epoch-0003.pt.tmp",
                 ".epoch-0003.pt.123.deadbeef.tmp.pt", "epoch-0003.pth"):
        assert parse_checkpoint_name(name) is None, name
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="checkpoint epoch must be an int >= 1"):
            checkpoint_name(bad)


def test_listing_is_numeric_and_skips_temp_files_and_other_names(tmp_path: Path) -> None:
    assert list_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    _touch(tmp_path, 10, 2, 10000, 9)
    folder = tmp_path / CHECKPOINT_DIR
    (folder / "notes.txt").write_text("x")
    with atomic_path(folder / checkpoint_name(20000), suffix=".pt") as tmp:
        tmp.write_bytes(b"partial")
        listed = list_checkpoints(tmp_path)  # while the write is in flight
    assert [e for e, _ in listed] == [2, 9, 10, 10000]
    assert latest_checkpoint(tmp_path) == (20000, folder / "epoch-20000.pt")


def test_prune_keeps_the_newest_and_removes_debris_but_not_the_model(tmp_path: Path) -> None:
    _touch(tmp_path, 1, 2, 3, 4)
    (tmp_path / MODEL_FILE).write_bytes(b"model")
    debris = tmp_path / CHECKPOINT_DIR / f".epoch-0005.pt.{os.getpid()}.0123abcd.tmp.pt"
    debris.write_bytes(b"half")
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == sorted(["epoch-0001.pt", "epoch-0002.pt", debris.name])
    assert [e for e, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(os.listdir(tmp_path / CHECKPOINT_DIR)) == ["epoch-0003.pt", "epoch-0004.pt"]
    assert (tmp_path / MODEL_FILE).read_bytes() == b"model"
    assert prune_checkpoints(tmp_path, keep_last=5) == []
    with pytest.raises(ValueError, match="keep_last must be an int >= 1"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_truncate_lines_cuts_the_log_back_to_a_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    with open(log, "w") as handle:
        for step in range(1, 6):
            append_jsonl(handle, {"step": step, "loss": 1.0 / step})
    assert count_lines(log) == 5
    assert truncate_lines(log, 3) == 2
    assert [r["step"] for r in read_jsonl(log)] == [1, 2, 3]
    assert truncate_lines(log, 3) == 0 and truncate_lines(log, 10) == 0  # nothing to cut
    assert count_lines(log) == 3
    assert truncate_lines(tmp_path / "missing.jsonl", 0) == 0
    assert not (tmp_path / "missing.jsonl").exists()


def test_an_unterminated_last_line_from_a_crash_is_ignored_and_cut(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert count_lines(log) == 2
    assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    assert truncate_lines(log, 5) == 1  # keeps both whole lines, drops the fragment
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_append_jsonl_writes_strict_json(tmp_path: Path) -> None:
    with open(tmp_path / "log.jsonl", "w") as handle:
        append_jsonl(handle, {"b": 1, "a": [0.5]})
        with pytest.raises(ValueError):
            append_jsonl(handle, {"loss": float("nan")})
    assert (tmp_path / "log.jsonl").read_text() == json.dumps({"a": [0.5], "b": 1}) + "\n"
