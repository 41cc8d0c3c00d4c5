"""Atomic writes: the final path holds the old content or the whole new one, never a part."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from artifacts.atomic import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    is_temp_name,
    sha256_file,
)


def test_atomic_path_renames_onto_final_and_leaves_no_temp(tmp_path: Path):
    final = tmp_path / "shard-00000.h5"
    with atomic_path(final, suffix=".h5") as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(".") and tmp.name.endswith(".tmp.h5")
        assert str(os.getpid()) in tmp.name
        assert is_temp_name(tmp.name)
        tmp.write_bytes(b"whole")
        assert not final.exists()  # nothing visible until the block ends
    assert final.read_bytes() == b"whole"
    assert os.listdir(tmp_path) == ["shard-00000.h5"]


def test_atomic_path_temp_names_are_unique_within_a_process(tmp_path: Path):
    with atomic_path(tmp_path / "a") as t1, atomic_path(tmp_path / "a") as t2:
        assert t1 != t2
        t1.write_bytes(b"1")
        t2.write_bytes(b"2")
    assert (tmp_path / "a").read_bytes() == b"1"  # the outer block exits last: its rename wins
    assert os.listdir(tmp_path) == ["a"]


@pytest.mark.parametrize("existing", [None, b"old content"])
def test_atomic_path_exception_mid_write_keeps_final_and_removes_temp(tmp_path: Path, existing):
    final = tmp_path / "manifest.json"
    if existing is not None:
        final.write_bytes(existing)
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(final) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new con")  # a partial write, then the failure
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == ([] if existing is None else ["manifest.json"])
    if existing is not None:
        assert final.read_bytes() == existing


def test_atomic_path_cleans_up_on_keyboard_interrupt(tmp_path: Path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "x") as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_atomic_path_block_that_writes_nothing_fails_clearly(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="did not create"):
        with atomic_path(tmp_path / "x"):
            pass
    assert os.listdir(tmp_path) == []


def test_atomic_path_rejects_separator_in_suffix(tmp_path: Path):
    with pytest.raises(ValueError, match="suffix"):
        with atomic_path(tmp_path / "x", suffix="/evil"):
            pass


def test_atomic_write_helpers(tmp_path: Path):
    atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    atomic_write_text(tmp_path / "t", "héllo")
    atomic_write_json(tmp_path / "j.json", {"b": [1, 2], "a": "é"})
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    assert (tmp_path / "t").read_bytes() == "héllo".encode("utf-8")
    assert (tmp_path / "j.json").read_text("utf-8") == '{\n  "a": "\\u00e9",\n  "b": [\n    1,\n    2\n  ]\n}\n'
    atomic_write_json(tmp_path / "j.json", {"a": "é"}, ensure_ascii=False, indent=None)
    assert (tmp_path / "j.json").read_text("utf-8") == '{"a": "é"}\n'
    assert sorted(os.listdir(tmp_path)) == ["b", "j.json", "t"]


@pytest.mark.parametrize("name, expected", [
    (".shard-00000.h5.1234.0a1b2c3d.tmp.h5", True),
    (".manifest.json.7.ffffffff.tmp", True),
    ("shard-00000.h5", False),
    ("manifest.json", False),
    (".lock", False),
    (".notes.tmp", False),  # no pid and token: not ours
    (".x.12.0A1B2C3D.tmp", False),
])
def test_is_temp_name(name, expected):
    assert is_temp_name(name) is expected


def test_sha256_file_matches_hashlib_across_buffer_boundaries(tmp_path: Path):
    data = bytes(range(256)) * 3 + b"tail"
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    for bufsize in (1, 7, 256, 1 << 20):
        assert sha256_file(tmp_path / "f", bufsize=bufsize) == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "empty") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_fsync_dir(tmp_path: Path):
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")
