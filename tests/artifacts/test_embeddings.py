"""Embedding shards: exact round trip, layout, validation, atomicity, versioning, the store."""
from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from artifacts.atomic import is_temp_name
from artifacts.embeddings import (
    SCHEMA,
    EmbeddingFormatError,
    EmbeddingRecord,
    EmbeddingShardReader,
    EmbeddingShardWriter,
    EmbeddingStore,
    read_shard_attrs,
    shard_index,
    shard_name,
    summarize_embeddings,
    write_embedding_shard,
)
from artifacts.masks import MASK_CHUNK_BYTES, place_in_chunks

D = 6


def _unit(rng: np.random.Generator, d: int = D) -> np.ndarray:
    v = rng.normal(size=d)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _records(rng: np.random.Generator, shapes, features: tuple[int, int, int] | None = (4, 3, 3),
             prefix: str = "img") -> list[EmbeddingRecord]:
    out = []
    for i, (h, w) in enumerate(shapes):
        mask = rng.random((h, w)) < 0.4
        valid = bool(mask.any()) and i % 3 != 2  # some invalid rows
        proto = _unit(rng) if valid else np.zeros(D, np.float32)
        feats = rng.normal(size=features).astype(np.float16) if features else None
        out.append(EmbeddingRecord(f"{prefix}{i}", mask, proto, valid, feats))
    return out


SHAPES = [(1, 1), (7, 9), (64, 48), (300, 200), (3, 500)]


def _assert_same(a: EmbeddingRecord, b: EmbeddingRecord, features: bool = True) -> None:
    assert a.id == b.id and a.valid == b.valid
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.mask.dtype == b.mask.dtype == np.bool_
    np.testing.assert_array_equal(a.prototype, b.prototype)  # bit-exact float32
    if features:
        assert b.features is not None and b.features.dtype == np.float16
        np.testing.assert_array_equal(a.features.view(np.uint16), b.features.view(np.uint16))


@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_round_trip_is_exact(tmp_path, rng, compression):
    records = _records(rng, SHAPES)
    path = tmp_path / shard_name(0)
    write_embedding_shard(path, records, {"model": {"backbone": "resnet18"}, "shard": 0},
                          compression=compression, features_compression=compression)
    reader = EmbeddingShardReader(path)
    assert reader.ids == [r.id for r in records] and reader.has_features
    for i, rec in enumerate(records):
        _assert_same(rec, reader.get(i, features=True))
        _assert_same(rec, reader.get(rec.id, features=True))
        np.testing.assert_array_equal(reader.features(rec.id), rec.features)
    for rec, got in zip(records, reader.iter(features=True)):
        _assert_same(rec, got)
    assert reader.get(0).features is None  # features only on request
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["shapes"][()], np.array(SHAPES, np.int32))
        np.testing.assert_allclose(f["salient_fraction"][()], [r.salient_fraction for r in records], rtol=1e-6)
        assert f["prototypes"].dtype == np.float32 and f["features"].dtype == np.float16
    attrs = read_shard_attrs(path)
    assert attrs["schema"] == SCHEMA and attrs["count"] == len(records)
    assert attrs["model"] == {"backbone": "resnet18"} and attrs["shard"] == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_property(tmp_path, shapes, seed):
    rng = np.random.default_rng(seed)
    records = _records(rng, shapes, features=None)
    path = tmp_path / "emb-00000.h5"
    write_embedding_shard(path, records, mask_chunk_bytes=64)  # tiny chunks: many placements
    got = list(EmbeddingShardReader(path))
    assert len(got) == len(records)
    for a, b in zip(records, got):
        _assert_same(a, b, features=False)


def test_layout_chunks_and_placement(tmp_path, rng):
    records = _records(rng, [(300, 200), (512, 512), (10, 10)], features=(256, 8, 8))
    path = tmp_path / shard_name(3)
    write_embedding_shard(path, records)
    with h5py.File(path, "r") as f:
        assert f["features"].shape == (3, 256, 8, 8)
        assert f["features"].chunks == (1, 256, 8, 8)  # one image per chunk
        assert f["features"].compression == "gzip" and f["features"].shuffle
        sizes = [(h * w + 7) // 8 for h, w in [(300, 200), (512, 512), (10, 10)]]
        np.testing.assert_array_equal(f["offsets"][()], place_in_chunks(sizes, MASK_CHUNK_BYTES))
        assert f["masks"].chunks == (MASK_CHUNK_BYTES,)
        assert set(f.keys()) == {"ids", "shapes", "prototypes", "valid", "salient_fraction", "offsets",
                                 "masks", "features"}


def test_empty_shard_and_store_with_gaps(tmp_path, rng):
    write_embedding_shard(tmp_path / shard_name(0), _records(rng, SHAPES[:2], prefix="a"))
    write_embedding_shard(tmp_path / shard_name(1), [])  # a block of unreadable images
    write_embedding_shard(tmp_path / shard_name(2), _records(rng, SHAPES[2:], prefix="b"))
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / ".emb-00003.h5.123.deadbeef.tmp.h5").write_bytes(b"partial")
    store = EmbeddingStore(tmp_path)
    assert len(store.shard_paths) == 3 and len(store) == len(SHAPES)
    ids, protos, valid = store.prototypes()
    assert ids == ["a0", "a1", "b0", "b1", "b2"]
    assert protos.shape == (5, D) and protos.dtype == np.float32 and valid.dtype == np.bool_
    np.testing.assert_array_equal(protos[~valid], 0)
    np.testing.assert_allclose(np.linalg.norm(protos[valid], axis=1), 1, rtol=1e-5)
    assert store.has_features and store.feature_shape == (4, 3, 3)
    assert [r.id for r in store] == ids
    assert store.get("b1").mask.shape == SHAPES[3]
    assert "b2" in store and "zz" not in store
    with pytest.raises(KeyError, match="'zz' not in embedding store"):
        store.get("zz")
    assert EmbeddingShardReader(tmp_path / shard_name(1)).ids == []


def test_prototypes_do_not_read_masks_or_features(tmp_path, rng, monkeypatch):
    write_embedding_shard(tmp_path / shard_name(0), _records(rng, SHAPES))
    store = EmbeddingStore(tmp_path)
    read = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        read.append(self.name)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    store.prototypes()
    assert "/masks" not in read and "/features" not in read


def test_store_without_features(tmp_path, rng):
    write_embedding_shard(tmp_path / shard_name(0), _records(rng, SHAPES, features=None))
    store = EmbeddingStore(tmp_path)
    assert not store.has_features and store.feature_shape is None
    with pytest.raises(ValueError, match="has no features"):
        store.get("img0", features=True)


def test_writer_is_atomic(tmp_path, rng):
    path = tmp_path / shard_name(0)
    with pytest.raises(RuntimeError, match="boom"):
        with EmbeddingShardWriter(path) as writer:
            for rec in _records(rng, SHAPES):
                writer.add(rec)
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temp file
    with pytest.raises(ValueError, match="duplicate id 'img0'"):
        write_embedding_shard(path, _records(rng, SHAPES[:1]) * 2)
    assert not path.exists() and not any(is_temp_name(p.name) for p in tmp_path.iterdir())


@pytest.mark.parametrize("make, message", [
    (lambda m: EmbeddingRecord("a", m, np.full(D, 0.5, np.float32), True), "must be L2-normalised"),
    (lambda m: EmbeddingRecord("a", m, np.full(D, D ** -0.5, np.float32), False), "must be all zeros"),
    (lambda m: EmbeddingRecord("a", m, np.zeros(D, np.float64), False), "float32"),
    (lambda m: EmbeddingRecord("a", m.astype(np.uint8), np.zeros(D, np.float32), False), "bool"),
    (lambda m: EmbeddingRecord("a", m, np.zeros(D, np.float32), False, np.zeros((2, 2, 2), np.float32)),
     "float16"),
    (lambda m: EmbeddingRecord("", m, np.zeros(D, np.float32), False), "non-empty str"),
])
def test_record_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make(np.ones((3, 4), bool))


def test_mixed_records_rejected(tmp_path, rng):
    with_f = _records(rng, SHAPES[:1])
    without = _records(rng, SHAPES[1:2], features=None, prefix="x")
    with pytest.raises(ValueError, match="lacks features"):
        write_embedding_shard(tmp_path / shard_name(0), with_f + without)
    other = _records(rng, SHAPES[1:2], features=(4, 2, 2), prefix="y")
    with pytest.raises(ValueError, match=r"features of 'y0' have shape \(4, 2, 2\)"):
        write_embedding_shard(tmp_path / shard_name(0), with_f + other)
    assert list(tmp_path.iterdir()) == []


def test_schema_and_version_checked(tmp_path, rng):
    path = tmp_path / shard_name(0)
    write_embedding_shard(path, _records(rng, SHAPES[:2]))
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(EmbeddingFormatError, match="schema_version 99 .* not readable"):
        EmbeddingShardReader(path).ids
    with h5py.File(path, "a") as f:
        f.attrs["schema"] = "maskcontrast/masks"
    with pytest.raises(EmbeddingFormatError, match="not an embedding shard"):
        read_shard_attrs(path)
    bad = tmp_path / shard_name(1)
    bad.write_bytes(b"not hdf5")
    with pytest.raises(EmbeddingFormatError, match="cannot open as HDF5"):
        EmbeddingShardReader(bad).ids


def test_corrupt_offsets_detected(tmp_path, rng):
    path = tmp_path / shard_name(0)
    write_embedding_shard(path, _records(rng, SHAPES[:3]))
    with h5py.File(path, "a") as f:
        f["offsets"][1] = f["offsets"][1] + 1
    with pytest.raises(EmbeddingFormatError, match="offsets do not match"):
        EmbeddingShardReader(path).ids


def test_duplicate_id_across_shards(tmp_path, rng):
    write_embedding_shard(tmp_path / shard_name(0), _records(rng, SHAPES[:1]))
    write_embedding_shard(tmp_path / shard_name(1), _records(rng, SHAPES[:1]))
    with pytest.raises(EmbeddingFormatError, match="'img0' is in both"):
        EmbeddingStore(tmp_path).get("img0")


def test_store_pickles_after_use(tmp_path, rng):
    records = _records(rng, SHAPES)
    write_embedding_shard(tmp_path / shard_name(0), records)
    store = EmbeddingStore(tmp_path)
    store.get("img1")  # opens a handle and builds the id map
    clone = pickle.loads(pickle.dumps(store))
    _assert_same(records[4], clone.get("img4", features=True))
    store.close()
    _assert_same(records[1], store.get("img1", features=True))  # reopens lazily


def test_shard_names():
    assert shard_name(12) == "emb-00012.h5" and shard_index("emb-00012.h5") == 12
    assert shard_index("shard-00012.h5") is None and shard_index(".emb-00001.h5.1.abcd0123.tmp.h5") is None
    with pytest.raises(ValueError, match="non-negative int"):
        shard_name(-1)


def test_summarize(tmp_path, rng):
    records = _records(rng, SHAPES)
    write_embedding_shard(tmp_path / shard_name(0), records, {"extract": {"input_size": 512}})
    s = summarize_embeddings(tmp_path)
    assert s["n_images"] == 5 and s["n_valid"] == sum(r.valid for r in records)
    assert s["prototype_dim"] == D and s["has_features"] and s["feature_shape"] == [4, 3, 3]
    assert s["feature_bytes"] > 0 and s["bytes_on_disk"] > s["feature_bytes"]
    assert s["salient_fraction"]["mean"] == pytest.approx(np.mean([r.salient_fraction for r in records]), rel=1e-6)
    assert sum(s["salient_fraction"]["counts"]) == 5
    assert s["height"] == {"min": 1, "max": 300} and s["attrs"] == {"extract": {"input_size": 512}}
    assert s["schema_version"] == 1


# --------------------------------------------------------------------------- version 2: proposals


def test_proposals_round_trip_and_version_1_reads_as_one_region(tmp_path):
    from artifacts.embeddings import ProposalEmbedding, REGIONS_SCHEMA_VERSION, read_shard_attrs

    rng = np.random.default_rng(0)

    def unit(d=6):
        v = rng.normal(size=d).astype(np.float32)
        return (v / np.linalg.norm(v)).astype(np.float32)

    masks = [rng.random((9, 13)) < 0.4 for _ in range(3)]
    props = [[ProposalEmbedding(masks[0] & (np.arange(13) < 6), unit(), True),
              ProposalEmbedding(masks[0] & (np.arange(13) >= 6), np.zeros(6, np.float32), False)],
             [],
             [ProposalEmbedding(masks[2], unit(), True)]]
    records = [EmbeddingRecord(f"i{k}", m, unit(), True, proposals=p) for k, (m, p) in enumerate(zip(masks, props))]
    write_embedding_shard(tmp_path / "v2" / "emb-00000.h5", records)
    assert read_shard_attrs(tmp_path / "v2" / "emb-00000.h5")["schema_version"] == REGIONS_SCHEMA_VERSION
    store = EmbeddingStore(tmp_path / "v2")
    assert store.has_proposals
    for rec, p in zip(records, props):
        got = store.get(rec.id, proposals=True)
        np.testing.assert_array_equal(got.mask, rec.mask)
        np.testing.assert_array_equal(got.prototype, rec.prototype)
        assert len(got.proposals) == len(p)
        for a, b in zip(got.proposals, p):
            np.testing.assert_array_equal(a.mask, b.mask)
            np.testing.assert_array_equal(a.prototype, b.prototype)
            assert a.valid == b.valid
    ids, counts, protos, valid = store.regions()
    assert counts.tolist() == [2, 1, 1] and valid.tolist() == [True, False, False, True]
    assert not store.read_regions("i1")[0].mask.any()  # no proposal: one empty region
    assert store.proposal_counts().tolist() == [2, 0, 1]  # ... told apart from one invalid proposal
    # version 1: one region per image, its salient mask and prototype
    write_embedding_shard(tmp_path / "v1" / "emb-00000.h5", [EmbeddingRecord(r.id, r.mask, r.prototype, True)
                                                             for r in records])
    plain = EmbeddingStore(tmp_path / "v1")
    assert not plain.has_proposals and plain.get("i0", proposals=True).proposals is None
    _, counts, protos, _ = plain.regions()
    assert counts.tolist() == [1, 1, 1] and np.array_equal(protos, plain.prototypes()[1])
    assert plain.proposal_counts().tolist() == [1, 1, 1]
    [region] = plain.read_regions("i2")
    np.testing.assert_array_equal(region.mask, masks[2])
    with pytest.raises(ValueError, match="all or none must"):
        write_embedding_shard(tmp_path / "mixed" / "emb-00000.h5",
                              [records[0], EmbeddingRecord("x", masks[1], unit(), True)])
