"""The shard machinery both formats share, through a minimal third format, and the layout law
that mask and embedding shards pack masks identically."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifacts.embeddings import EmbeddingRecord, write_embedding_shard
from artifacts.masks import MaskRecord, write_mask_shard
from artifacts.shards import (
    ShardFormat,
    ShardIndex,
    ShardReader,
    ShardRecord,
    ShardStore,
    create_shard_file,
    encode_attrs,
    pack_mask,
    packed_size,
    unpack_mask,
    write_header,
    write_placed,
)

# --------------------------------------------------------------------------- a minimal format


class TagError(ValueError):
    pass


@dataclass
class TagRecord(ShardRecord):
    tag: int = 0
    _kind: ClassVar[str] = "tag"


@dataclass
class TagIndex(ShardIndex):
    tag: np.ndarray  # int32 (n,)

    @classmethod
    def read_rows(cls, f: h5py.File) -> dict[str, Any]:
        return {"tag": f["tag"][()]}

    def rows_match(self, n: int) -> bool:
        return self.tag.shape == (n,)

    def data_problem(self, f: h5py.File, n: int) -> str | None:
        return "negative tag" if (self.tag < 0).any() else None


FORMAT = ShardFormat(kind="tag", prefix="tag", schema="test/tags", error=TagError, index_types={1: TagIndex})


class TagReader(ShardReader[TagIndex]):
    format = FORMAT

    def get(self, key: int | str) -> TagRecord:
        i = self._row(key)
        return TagRecord(self.index.ids[i], self._read_mask(i), int(self.index.tag[i]))

    def iter(self, block_bytes: int = 1 << 20) -> Iterator[TagRecord]:
        for i, mask in self._iter_masks(block_bytes):
            yield TagRecord(self.index.ids[i], mask, int(self.index.tag[i]))


class TagStore(ShardStore[TagReader]):
    reader_type = TagReader
    columns = {"tag": np.int32}

    def get(self, id: str) -> TagRecord:
        reader, row = self._locate(id)
        return reader.get(row)


def write_tags(path: Path, records: list[TagRecord], chunk: int = 64, compression: str | None = "gzip",
               tags: np.ndarray | None = None) -> None:
    with create_shard_file(path) as f:
        write_header(f, FORMAT.schema, 1, encode_attrs(path, {"who": "test"}), [r.id for r in records],
                     [r.shape for r in records])
        write_placed(f, "masks", "offsets", [pack_mask(r.mask) for r in records], chunk, compression)
        f.create_dataset("tag", data=np.array([r.tag for r in records], np.int32) if tags is None else tags)


def tag_records(shapes: list[tuple[int, int]], seed: int = 0, prefix: str = "t") -> list[TagRecord]:
    rng = np.random.default_rng(seed)
    return [TagRecord(f"{prefix}{i}", rng.random(s) < 0.5, i) for i, s in enumerate(shapes)]


def assert_same(got: TagRecord, want: TagRecord) -> None:
    assert got.id == want.id and got.tag == want.tag and got.mask.dtype == np.bool_
    np.testing.assert_array_equal(got.mask, want.mask)


# --------------------------------------------------------------------------- records and packing


@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(h, w, seed):
    mask = np.random.default_rng(seed).random((h, w)) < 0.5
    packed = pack_mask(mask)
    assert packed.dtype == np.uint8 and packed.size == packed_size(h, w) == -(-h * w // 8)
    np.testing.assert_array_equal(unpack_mask(packed, h, w), mask)


def test_record_validation_names_the_format():
    with pytest.raises(ValueError, match="tag record id must be a non-empty str"):
        TagRecord("", np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"mask of 'a' must be a non-empty bool \(H, W\) array, got uint8 \(2, 2\)"):
        TagRecord("a", np.ones((2, 2), np.uint8))
    rec = TagRecord("a", np.array([[True, False, False, False]]))
    assert rec.shape == (1, 4) and rec.mask_fraction == 0.25


# --------------------------------------------------------------------------- reader


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), max_size=8),
       chunk=st.sampled_from([1, 7, 64, 4096]), compression=st.sampled_from(["gzip", "lzf", None]),
       block=st.integers(1, 400))
def test_random_access_and_blockwise_iteration_are_exact(tmp_path_factory, shapes, chunk, compression, block):
    path = tmp_path_factory.mktemp("tags") / FORMAT.shard_name(0)
    records = tag_records(shapes)
    write_tags(path, records, chunk, compression)
    with TagReader(path) as reader:
        assert reader.ids == [r.id for r in records] and len(reader) == len(records)
        for i, want in enumerate(records):
            assert_same(reader.get(i), want)
            assert_same(reader[want.id], want)
        for got, want in zip(reader.iter(block_bytes=block), records, strict=True):
            assert_same(got, want)
        assert reader.attrs == {"schema": "test/tags", "schema_version": 1, "count": len(records), "who": "test"}


def test_iteration_reads_blocks_of_at_most_block_bytes(tmp_path: Path, monkeypatch):
    records = tag_records([(8, 8)] * 6)  # 8 packed bytes each
    write_tags(tmp_path / "t.h5", records, compression=None)
    reader = TagReader(tmp_path / "t.h5")
    reader.index  # opens the file
    reads = []
    original = h5py.Dataset.__getitem__

    def spy(ds, key):
        if ds.name == "/masks":
            reads.append((key.start, key.stop))
        return original(ds, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    assert [r.id for r in reader.iter(block_bytes=20)] == [r.id for r in records]
    assert reads == [(0, 16), (16, 32), (32, 48)]  # two 8-byte masks fit in 20 bytes


def test_format_errors_name_the_file_and_format(tmp_path: Path):
    path = tmp_path / "t.h5"
    write_tags(path, tag_records([(2, 3), (4, 4)]), tags=np.int32([0]))
    with pytest.raises(TagError, match=rf"{path}: corrupt tag shard \(index lengths differ from count 2\)"):
        TagReader(path).ids
    write_tags(path, tag_records([(2, 3)]), tags=np.int32([-1]))
    with pytest.raises(TagError, match=r"corrupt tag shard \(negative tag\)"):
        TagReader(path).ids
    with h5py.File(path, "r+") as f:
        f.attrs["schema"] = "test/other"
    with pytest.raises(TagError, match=r"not a tag shard \(schema attr 'test/other', expected 'test/tags'\)"):
        FORMAT.read_attrs(path)
    with pytest.raises(FileNotFoundError, match="tag shard not found"):
        FORMAT.read_attrs(tmp_path / "missing.h5")


# --------------------------------------------------------------------------- names, store, writing


def test_names_use_the_format_prefix(tmp_path: Path):
    assert FORMAT.shard_name(3) == "tag-00003.h5" and FORMAT.shard_index("tag-00003.h5") == 3
    for name in ("shard-00003.h5", "emb-00003.h5", "tag-3.h5", ".tag-00003.h5.1.0a1b2c3d.tmp.h5"):
        assert FORMAT.shard_index(name) is None, name
    for k in (2, 0, 11):
        write_tags(tmp_path / FORMAT.shard_name(k), tag_records([(2, 2)], prefix=f"s{k}-"))
    (tmp_path / "shard-00001.h5").write_bytes(b"another format")
    (tmp_path / ".tag-00005.h5.77.0a1b2c3d.tmp.h5").write_bytes(b"a crashed write")
    assert [(k, p.name) for k, p in FORMAT.list_shards(tmp_path)] == [
        (0, "tag-00000.h5"), (2, "tag-00002.h5"), (11, "tag-00011.h5")]


def test_store_reads_by_id_across_shards(tmp_path: Path):
    first, second = tag_records([(3, 5), (1, 1)], 1, "a"), tag_records([(9, 2)], 2, "b")
    write_tags(tmp_path / FORMAT.shard_name(0), first)
    write_tags(tmp_path / FORMAT.shard_name(4), second)
    store = TagStore(tmp_path)
    assert store.ids() == ["a0", "a1", "b0"] and len(store) == 3 and "b0" in store
    assert_same(store["b0"], second[0])
    assert [r.id for r in store] == store.ids()
    t = store.table()
    assert list(t) == ["id", "shard", "row", "height", "width", "tag"]
    assert t["shard"].tolist() == [0, 0, 4] and t["tag"].tolist() == [0, 1, 0] and t["tag"].dtype == np.int32
    assert repr(store) == f"TagStore({str(tmp_path)!r}, 2 shards)"
    with pytest.raises(KeyError, match="'zz' not in tag store"):
        store.get("zz")
    (tmp_path / "empty").mkdir()
    t = TagStore(tmp_path / "empty").table()
    assert t["tag"].dtype == np.int32 and t["tag"].size == 0 and t["id"].dtype == object
    with pytest.raises(FileNotFoundError, match="tag store directory not found"):
        TagStore(tmp_path / "nope")


def test_create_shard_file_leaves_nothing_on_error(tmp_path: Path):
    with pytest.raises(RuntimeError, match="boom"):
        with create_shard_file(tmp_path / "d" / "t.h5") as f:
            f.create_dataset("x", data=np.zeros(3))
            raise RuntimeError("boom")
    assert list((tmp_path / "d").iterdir()) == []


# --------------------------------------------------------------------------- the two formats


@pytest.mark.parametrize("compression", ["gzip", None])
def test_mask_and_embedding_shards_pack_masks_identically(tmp_path: Path, compression):
    rng = np.random.default_rng(0)
    masks = [rng.random(s) < 0.3 for s in [(3, 5), (40, 33), (1, 1), (300, 211), (9, 250)]]
    write_mask_shard(tmp_path / "m.h5", [MaskRecord(f"x{i}", m) for i, m in enumerate(masks)],
                     compression=compression, mask_chunk_bytes=512)
    proto = np.eye(4, dtype=np.float32)[0]
    write_embedding_shard(tmp_path / "e.h5", [EmbeddingRecord(f"x{i}", m, proto, True) for i, m in enumerate(masks)],
                          compression=compression, mask_chunk_bytes=512)
    with h5py.File(tmp_path / "m.h5", "r") as m, h5py.File(tmp_path / "e.h5", "r") as e:
        for name in ("ids", "shapes", "offsets", "masks"):
            np.testing.assert_array_equal(m[name][()], e[name][()], err_msg=name)
        assert m["masks"].chunks == e["masks"].chunks and m["masks"].compression == e["masks"].compression
