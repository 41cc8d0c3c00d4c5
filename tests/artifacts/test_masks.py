"""Mask shards: exact round trips, the documented layout, errors, and multi-process readers."""
from __future__ import annotations

import multiprocessing as mp
import operator
import os
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifacts.masks as masks_mod
from artifacts.atomic import atomic_path
from artifacts.masks import (
    PROPOSALS_SCHEMA_VERSION,
    SCHEMA,
    SCHEMA_VERSION,
    MaskFormatError,
    MaskRecord,
    MaskShardReader,
    MaskStore,
    Proposal,
    place_in_chunks,
    read_shard_attrs,
    shard_index,
    shard_name,
    summarize_masks,
    write_mask_shard,
)

# --------------------------------------------------------------------------- helpers

IDS = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=12)
SIDE = st.one_of(st.integers(1, 9), st.integers(10, 300))


@st.composite
def shard_records(draw) -> list[MaskRecord]:
    """1-4 records of random shapes (odd sizes included), densities and drop states; soft maps
    on every record or none."""
    ids = draw(st.lists(IDS, min_size=1, max_size=4, unique=True))
    with_soft = draw(st.booleans())
    out = []
    for id in ids:
        h, w = draw(SIDE), draw(SIDE)
        p = draw(st.sampled_from([0.0, 1.0, 0.03, 0.5]))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        mask = rng.random((h, w)) < p  # bool (h, w)
        soft = rng.integers(0, 256, (h, w), dtype=np.uint8) if with_soft else None
        kept = draw(st.booleans())
        out.append(MaskRecord(id, mask, soft, kept, "" if kept else draw(st.sampled_from(["fg<0.01", "unreadable: é"]))))
    return out


def assert_same(got: MaskRecord, want: MaskRecord, soft: bool) -> None:
    assert got.id == want.id
    assert got.mask.dtype == np.bool_ and got.mask.shape == want.mask.shape
    np.testing.assert_array_equal(got.mask, want.mask)
    if soft:
        assert got.soft.dtype == np.uint8
        np.testing.assert_array_equal(got.soft, want.soft)
    else:
        assert got.soft is None
    assert got.kept is want.kept and got.reason == want.reason


def blob(h: int, w: int, fg: float, seed: int = 0) -> np.ndarray:
    """bool (h, w) with exactly round(fg * h * w) foreground pixels."""
    flat = np.zeros(h * w, dtype=bool)
    flat[np.random.default_rng(seed).permutation(h * w)[: round(fg * h * w)]] = True
    return flat.reshape(h, w)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """Two shards (numbers 0 and 3) of small masks with soft maps, plus files others write."""
    d = tmp_path / "masks" / "abc123"
    recs = [MaskRecord(f"img{i}", blob(5 + i, 7 + 2 * i, 0.3, seed=i),
                       np.full((5 + i, 7 + 2 * i), i, np.uint8)) for i in range(5)]
    recs[2] = MaskRecord("img2", recs[2].mask, recs[2].soft, kept=False, reason="fg<0.01")
    write_mask_shard(d / shard_name(0), recs[:3], attrs={"estimator": "priors", "params": {"t": 0.5}})
    write_mask_shard(d / shard_name(3), recs[3:], attrs={"estimator": "priors", "params": {"t": 0.5}})
    (d / "manifest.json").write_text("{}")
    (d / ".lock").write_text("123 host")
    (d / "report.png").write_bytes(b"\x89PNG")
    return d


# --------------------------------------------------------------------------- round trip


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=shard_records(), compression=st.sampled_from(["lzf", "gzip", None]),
       chunk=st.sampled_from([7, 64, 4096, masks_mod.MASK_CHUNK_BYTES]))
def test_round_trip_is_exact_by_index_id_and_iteration(tmp_path_factory, records, compression, chunk):
    path = tmp_path_factory.mktemp("rt") / shard_name(0)
    write_mask_shard(path, records, attrs={"estimator": "u2netp"}, compression=compression,
                     mask_chunk_bytes=chunk, soft_chunk_bytes=chunk * 3)
    soft = records[0].soft is not None
    with MaskShardReader(path) as reader:
        assert reader.ids == [r.id for r in records] and len(reader) == len(records)
        for i, want in enumerate(records):
            assert_same(reader.get(i, soft=soft), want, soft)
            assert_same(reader.get(want.id, soft=soft), want, soft)
            assert reader.index_of(want.id) == i
            assert reader.get(i).fg_fraction == pytest.approx(want.fg_fraction)
        for got, want in zip(reader.iter(soft=soft), records, strict=True):
            assert_same(got, want, soft)
        np.testing.assert_array_equal(reader.index.fg_fraction,
                                      np.float32([r.fg_fraction for r in records]))
    assert read_shard_attrs(path)["count"] == len(records)


def test_iteration_in_small_blocks_matches_random_access(tmp_path: Path, monkeypatch):
    recs = [MaskRecord(f"m{i}", blob(3 + i, 11, 0.4, seed=i)) for i in range(9)]
    write_mask_shard(tmp_path / "s.h5", recs, mask_chunk_bytes=16)
    monkeypatch.setattr(masks_mod, "_ITER_BLOCK_BYTES", 20)  # a few masks per block
    reader = MaskShardReader(tmp_path / "s.h5")
    for got, want in zip(reader, recs, strict=True):
        assert_same(got, want, soft=False)


def test_attrs_round_trip_with_types(tmp_path: Path):
    attrs = {"estimator": "u2netp", "params": {"threshold": 0.5, "sizes": [224, 320]},
             "model_sha256": "ab" * 32, "n": 3, "flag": True, "ratio": 0.25,
             "array": np.array([1, 2]), "none": None, "unicode": "é✓"}
    write_mask_shard(tmp_path / "s.h5", [MaskRecord("a", np.ones((2, 3), bool))], attrs=attrs)
    got = read_shard_attrs(tmp_path / "s.h5")
    assert got == {**attrs, "array": [1, 2], "schema": SCHEMA, "schema_version": 1, "count": 1}
    assert type(got["n"]) is int and type(got["flag"]) is bool and type(got["ratio"]) is float


def test_reserved_and_unserialisable_attrs_are_rejected(tmp_path: Path):
    rec = [MaskRecord("a", np.ones((2, 2), bool))]
    with pytest.raises(ValueError, match="'count' is reserved"):
        write_mask_shard(tmp_path / "s.h5", rec, attrs={"count": 5})
    with pytest.raises(ValueError, match="'obj' is not JSON-serialisable"):
        write_mask_shard(tmp_path / "s.h5", rec, attrs={"obj": object()})
    assert not any(tmp_path.iterdir())


def test_layout_is_readable_with_plain_h5py(tmp_path: Path):
    """The documented layout: packbits of the row-major mask at offsets[i], ceil(H*W/8) bytes."""
    recs = [MaskRecord(f"m{i}", blob(h, w, 0.5, seed=i), np.full((h, w), i, np.uint8))
            for i, (h, w) in enumerate([(3, 5), (40, 33), (1, 1), (17, 9)])]
    write_mask_shard(tmp_path / "s.h5", recs, attrs={"estimator": "x"}, mask_chunk_bytes=64)
    reader = MaskShardReader(tmp_path / "s.h5")
    reader.get(0)  # a reader holding the file open must not stop plain h5py opens
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f.attrs["schema"] == SCHEMA and f.attrs["count"] == 4
        assert list(f["ids"].asstr()[()]) == ["m0", "m1", "m2", "m3"]
        offsets, soft_offsets = f["offsets"][()], f["soft_offsets"][()]
        assert offsets.dtype == np.int64 and offsets[-1] == f["masks"].shape[0]
        assert f["masks"].chunks == (64,) and f["masks"].compression == "gzip"
        for i, r in enumerate(recs):
            h, w = f["shapes"][i]
            packed = f["masks"][offsets[i]:offsets[i] + (h * w + 7) // 8]
            np.testing.assert_array_equal(np.unpackbits(packed, count=h * w).reshape(h, w), r.mask)
            np.testing.assert_array_equal(f["soft"][soft_offsets[i]:soft_offsets[i] + h * w].reshape(h, w), r.soft)
        np.testing.assert_array_equal(f["kept"][()], [True] * 4)


def test_reader_opens_a_file_already_open_without_lock(tmp_path: Path):
    """HDF5 refuses a second open with other locking flags; the reader falls back to no lock
    (as it must on file systems where locks fail)."""
    rec = MaskRecord("a", blob(6, 6, 0.5))
    write_mask_shard(tmp_path / "s.h5", [rec])
    with h5py.File(tmp_path / "s.h5", "r", locking=False):
        assert_same(MaskShardReader(tmp_path / "s.h5").get("a"), rec, soft=False)
        assert read_shard_attrs(tmp_path / "s.h5")["count"] == 1


def test_dropped_records_keep_their_mask(tmp_path: Path):
    recs = [MaskRecord("empty", np.zeros((4, 4), bool), kept=False, reason="fg<0.01"),
            MaskRecord("full", np.ones((3, 3), bool), kept=False, reason="fg>0.99")]
    write_mask_shard(tmp_path / "s.h5", recs)
    reader = MaskShardReader(tmp_path / "s.h5")
    assert_same(reader.get("empty"), recs[0], soft=False)
    assert_same(reader.get("full"), recs[1], soft=False)
    assert reader.get("full").fg_fraction == 1.0


def test_empty_shard(tmp_path: Path):
    write_mask_shard(tmp_path / "s.h5", [], attrs={"estimator": "x"})
    reader = MaskShardReader(tmp_path / "s.h5")
    assert len(reader) == 0 and list(reader) == [] and reader.ids == []
    assert read_shard_attrs(tmp_path / "s.h5")["count"] == 0


# --------------------------------------------------------------------------- version 2: proposals


@st.composite
def proposal_records(draw) -> list[MaskRecord]:
    """1-4 records (as :func:`shard_records`) each with 0-3 proposals of random non-empty masks
    and scores."""
    out = []
    for rec in draw(shard_records()):
        h, w = rec.shape
        props = []
        for _ in range(draw(st.integers(0, 3))):
            rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
            m = rng.random((h, w)) < draw(st.sampled_from([0.02, 0.5, 1.0]))
            m.flat[draw(st.integers(0, h * w - 1))] = True  # never empty
            props.append(Proposal(m, draw(st.floats(-1e6, 1e6, allow_nan=False))))
        out.append(MaskRecord(rec.id, rec.mask, rec.soft, rec.kept, rec.reason, props))
    return out


def assert_same_proposals(got: list[Proposal], want: list[Proposal]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.mask.dtype == np.bool_
        np.testing.assert_array_equal(g.mask, w.mask)
        assert g.score == w.score and g.area == w.area


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=proposal_records(), compression=st.sampled_from(["lzf", "gzip", None]),
       chunk=st.sampled_from([7, 64, 4096, masks_mod.MASK_CHUNK_BYTES]))
def test_version_2_round_trip_is_exact(tmp_path_factory, records, compression, chunk):
    d = tmp_path_factory.mktemp("rt2")
    path = d / shard_name(0)
    write_mask_shard(path, records, compression=compression, mask_chunk_bytes=chunk, soft_chunk_bytes=chunk)
    assert read_shard_attrs(path)["schema_version"] == PROPOSALS_SCHEMA_VERSION
    soft = records[0].soft is not None
    with MaskShardReader(path) as reader:
        assert reader.has_proposals
        assert reader.index.n_proposals.tolist() == [len(r.proposals) for r in records]
        for i, want in enumerate(records):
            assert_same_proposals(reader.read_proposals(i), want.proposals)
            got = reader.get(want.id, soft=soft, proposals=True)
            assert_same(got, want, soft)  # the version-1 part reads as before
            assert_same_proposals(got.proposals, want.proposals)
            assert reader.get(i).proposals is None  # read only when asked
        for got, want in zip(reader.iter(proposals=True), records, strict=True):
            assert_same(got, want, soft=False)
            assert_same_proposals(got.proposals, want.proposals)
    store = MaskStore(d)
    for want in records:
        assert_same_proposals(store.read_proposals(want.id), want.proposals)
    assert store.table()["n_proposals"].tolist() == [len(r.proposals) for r in records]


def test_version_1_reads_as_one_proposal_per_non_empty_mask(tmp_path: Path):
    recs = [MaskRecord("a", blob(6, 5, 0.4)), MaskRecord("empty", blob(3, 3, 0.0), kept=False, reason="fg<0.01")]
    write_mask_shard(tmp_path / shard_name(0), recs)
    reader = MaskShardReader(tmp_path / shard_name(0))
    assert reader.attrs["schema_version"] == SCHEMA_VERSION == 1 and not reader.has_proposals
    [p] = reader.read_proposals("a")
    np.testing.assert_array_equal(p.mask, recs[0].mask)
    assert p.score == 1.0 and p.area == pytest.approx(recs[0].fg_fraction)
    assert reader.read_proposals("empty") == []
    assert [len(r.proposals) for r in reader.iter(proposals=True)] == [1, 0]
    assert reader.index.n_proposals.tolist() == [1, 0]
    assert MaskStore(tmp_path).table()["n_proposals"].tolist() == [1, 0]


def test_records_without_proposals_write_version_1_without_proposal_datasets(tmp_path: Path):
    rec = MaskRecord("a", blob(6, 5, 0.4))
    write_mask_shard(tmp_path / "v1.h5", [rec])
    write_mask_shard(tmp_path / "v2.h5", [MaskRecord("a", rec.mask, proposals=[Proposal(rec.mask, 0.5)])])
    with h5py.File(tmp_path / "v1.h5", "r") as f1, h5py.File(tmp_path / "v2.h5", "r") as f2:
        assert f1.attrs["schema_version"] == 1 and f2.attrs["schema_version"] == 2
        assert not any(name.startswith("proposal") for name in f1)
        assert set(f2) - set(f1) == {"proposal_rows", "proposal_offsets", "proposal_masks", "proposal_score",
                                     "proposal_area"}
        for name in f1:  # the version-1 part is the same
            np.testing.assert_array_equal(f1[name][()], f2[name][()])


def test_version_2_layout_is_readable_with_plain_h5py(tmp_path: Path):
    """Image i's proposals are rows proposal_rows[i]:[i+1]; each packed like masks at its offset."""
    a, b = blob(9, 13, 0.3, seed=1), blob(9, 13, 0.2, seed=2)
    c = blob(4, 4, 0.5, seed=3)
    recs = [MaskRecord("x", a | b, proposals=[Proposal(a, 0.9), Proposal(b, 0.25)]),
            MaskRecord("none", blob(5, 5, 0.0), kept=False, reason="fg<0.01", proposals=[]),
            MaskRecord("y", c, proposals=[Proposal(c, 1.0)])]
    write_mask_shard(tmp_path / "s.h5", recs, mask_chunk_bytes=16)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        rows, offsets = f["proposal_rows"][()], f["proposal_offsets"][()]
        assert rows.tolist() == [0, 2, 2, 3] and offsets.dtype == np.int64 and offsets.shape == (4,)
        assert offsets[-1] == f["proposal_masks"].shape[0]
        assert f["proposal_masks"].chunks == (16,) and f["proposal_masks"].compression == "gzip"
        np.testing.assert_array_equal(f["proposal_score"][()], np.float32([0.9, 0.25, 1.0]))
        np.testing.assert_allclose(f["proposal_area"][()], [a.mean(), b.mean(), c.mean()], rtol=1e-6)
        for k, (m, (h, w)) in enumerate([(a, (9, 13)), (b, (9, 13)), (c, (4, 4))]):
            packed = f["proposal_masks"][offsets[k]:offsets[k] + (h * w + 7) // 8]
            np.testing.assert_array_equal(np.unpackbits(packed, count=h * w).reshape(h, w), m)


def test_mixed_shards_in_one_store_and_their_summary(tmp_path: Path):
    a, b = blob(4, 5, 0.5, seed=1), blob(4, 5, 0.25, seed=2)
    write_mask_shard(tmp_path / shard_name(0), [MaskRecord("v1", a), MaskRecord("v1-empty", blob(2, 2, 0.0))])
    write_mask_shard(tmp_path / shard_name(1), [MaskRecord("v2", a | b, proposals=[Proposal(a, 2.0),
                                                                                   Proposal(b, 1.0)])])
    store = MaskStore(tmp_path)
    assert [len(store.read_proposals(i)) for i in store.ids()] == [1, 0, 2]
    assert store.get("v2").mask.sum() == (a | b).sum()
    s = summarize_masks(tmp_path)["proposals"]
    assert s["n_proposals"] == 3 and s["images_by_count"] == {"0": 1, "1": 1, "2": 1}
    assert s["area"]["counts"][2] == 1 and s["area"]["counts"][5] == 2  # 0.25; 0.5 twice
    write_mask_shard(tmp_path / shard_name(1), [MaskRecord("v2", a)])  # no version-2 shard left
    assert "proposals" not in summarize_masks(tmp_path)


def test_proposals_on_some_records_only_are_rejected(tmp_path: Path):
    m = np.ones((2, 2), bool)
    recs = [MaskRecord("a", m, proposals=[Proposal(m, 1.0)]), MaskRecord("b", m), MaskRecord("c", m)]
    with pytest.raises(ValueError, match=r"s.h5: 1 of 3 records have proposals; all or none must "
                                         r"\(without: \['b', 'c'\]\)"):
        write_mask_shard(tmp_path / "s.h5", recs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("mask, score, match", [
    (np.zeros((2, 2), bool), 1.0, r"proposal mask \(2, 2\) has no foreground pixel"),
    (np.ones((2, 2), np.uint8), 1.0, "proposal mask must be a non-empty bool"),
    (np.ones((2,), bool), 1.0, "proposal mask must be a non-empty bool"),
    (np.ones((2, 2), bool), float("nan"), "proposal score must be a finite number, got nan"),
    (np.ones((2, 2), bool), float("inf"), "proposal score must be a finite number"),
    (np.ones((2, 2), bool), True, "proposal score must be a finite number, got True"),
    (np.ones((2, 2), bool), "1", "proposal score must be a finite number, got '1'"),
])
def test_proposal_validation(mask, score, match):
    with pytest.raises(ValueError, match=match):
        Proposal(mask, score)


def test_proposal_area_and_score_precision():
    m = np.zeros((4, 5), bool)
    m[0, :3] = True
    p = Proposal(m, 0.1)
    assert p.area == 3 / 20 and p.score == float(np.float32(0.1)) and isinstance(p.score, float)
    assert "area=0.15" in repr(p)


@pytest.mark.parametrize("proposals, match", [
    ([Proposal(np.ones((3, 2), bool), 1.0)], r"proposal 0 of 'x' has shape \(3, 2\), its image's mask \(2, 2\)"),
    ([np.ones((2, 2), bool)], "proposal 0 of 'x' must be a Proposal, got ndarray"),
    (np.ones((2, 2), bool), "proposals of 'x' must be a list of Proposal or None, got ndarray"),
])
def test_record_proposal_validation(proposals, match):
    with pytest.raises(ValueError, match=match):
        MaskRecord("x", np.ones((2, 2), bool), proposals=proposals)


@pytest.mark.parametrize("name, value, match", [
    ("proposal_rows", [0, 1, 3], r"proposal_rows do not run from 0 to the 2 proposals"),
    ("proposal_rows", [1, 1, 2], r"proposal_rows do not run from 0"),
    ("proposal_offsets", [0, 1, 8], r"proposal_offsets do not match"),
    ("proposal_area", [0.5], r"index lengths|proposal_score and proposal_area differ"),
])
def test_corrupt_version_2_index_is_reported(tmp_path: Path, name, value, match):
    m = blob(6, 6, 0.5)
    path = tmp_path / "s.h5"
    write_mask_shard(path, [MaskRecord("a", m, proposals=[Proposal(m, 1.0)]),
                            MaskRecord("b", m, proposals=[Proposal(m, 1.0)])], compression=None)
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = np.asarray(value, dtype=f"{'float32' if name == 'proposal_area' else 'int64'}")
    with pytest.raises(MaskFormatError, match=rf"{path}: corrupt mask shard \(({match})"):
        MaskShardReader(path).read_proposals(0)


def test_pickled_reader_reads_proposals(tmp_path: Path):
    m = blob(5, 5, 0.5)
    write_mask_shard(tmp_path / shard_name(0), [MaskRecord("a", m, proposals=[Proposal(m, 0.5)])])
    store = MaskStore(tmp_path)
    want = store.read_proposals("a")
    assert_same_proposals(pickle.loads(pickle.dumps(store)).read_proposals("a"), want)


# --------------------------------------------------------------------------- placement


@pytest.mark.parametrize("sizes, chunk, expected", [
    ([10, 10, 10], 16, [0, 16, 32, 42]),      # each would straddle: moved to a boundary
    ([4, 4, 4, 4, 20], 16, [0, 4, 8, 12, 16, 36]),  # small ones share a chunk
    ([20, 20], 16, [0, 20, 40]),              # 20 bytes touch 2 chunks wherever they start
    ([5, 3], 1, [0, 5, 8]),                   # chunk 1: dense
    ([], 16, [0]),
])
def test_place_in_chunks(sizes, chunk, expected):
    assert place_in_chunks(sizes, chunk).tolist() == expected


@given(st.lists(st.integers(1, 100), max_size=30), st.integers(1, 64))
def test_place_in_chunks_touches_fewest_chunks_without_overlap(sizes, chunk):
    offsets = place_in_chunks(sizes, chunk)  # int64 (n + 1,)
    assert offsets[0] == 0 and offsets[-1] == (offsets[-2] + sizes[-1] if sizes else 0)
    for i, size in enumerate(sizes):
        first, last = offsets[i] // chunk, (offsets[i] + size - 1) // chunk
        assert last - first + 1 == -(-size // chunk)
        assert offsets[i] + size <= offsets[i + 1]


# --------------------------------------------------------------------------- errors


def test_mixed_soft_and_no_soft_is_rejected(tmp_path: Path):
    recs = [MaskRecord("a", np.ones((2, 2), bool), np.zeros((2, 2), np.uint8)),
            MaskRecord("b", np.ones((2, 2), bool))]
    with pytest.raises(ValueError, match=r"1 of 2 records have a soft map.*\['b'\]"):
        write_mask_shard(tmp_path / "s.h5", recs)
    assert not any(tmp_path.iterdir())


def test_duplicate_ids_in_a_shard_are_rejected(tmp_path: Path):
    recs = [MaskRecord("a", np.ones((2, 2), bool)), MaskRecord("a", np.zeros((2, 2), bool))]
    with pytest.raises(ValueError, match=r"duplicate ids in shard: \['a'\]"):
        write_mask_shard(tmp_path / "s.h5", recs)


@pytest.mark.parametrize("kwargs, match", [
    ({"mask": np.ones((2, 2), np.uint8)}, "must be a non-empty bool"),
    ({"mask": np.ones((2, 2, 1), bool)}, "must be a non-empty bool"),
    ({"mask": np.ones((0, 2), bool)}, "must be a non-empty bool"),
    ({"soft": np.ones((2, 3), np.uint8)}, r"soft map of 'x' must be uint8 \(2, 2\)"),
    ({"soft": np.ones((2, 2), np.float32)}, "soft map of 'x' must be uint8"),
    ({"reason": "fg<0.01"}, "is kept but has a drop reason"),
    ({"id": ""}, "non-empty str"),
    ({"id": "a\x00b"}, "without NUL"),
])
def test_record_validation(kwargs, match):
    base = {"id": "x", "mask": np.ones((2, 2), bool), "soft": None}
    with pytest.raises(ValueError, match=match):
        MaskRecord(**{**base, **kwargs})


def _rewrite_attr(path: Path, key: str, value) -> None:
    with h5py.File(path, "r+") as f:
        f.attrs[key] = value


def test_unknown_schema_version_names_the_file_and_readable_versions(tmp_path: Path):
    path = tmp_path / shard_name(0)
    write_mask_shard(path, [MaskRecord("a", np.ones((2, 2), bool))])
    _rewrite_attr(path, "schema_version", 99)
    pattern = rf"{path}: schema_version 99 .* reads versions \[1, 2\]"
    with pytest.raises(MaskFormatError, match=pattern):
        read_shard_attrs(path)
    with pytest.raises(MaskFormatError, match=pattern):
        MaskShardReader(path).get(0)
    with pytest.raises(MaskFormatError, match=pattern):
        MaskStore(tmp_path).ids()


def test_wrong_schema_and_corrupt_files(tmp_path: Path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.attrs["schema"] = "maskcontrast/embeddings"
    with pytest.raises(MaskFormatError, match=rf"{other}: not a mask shard .*'maskcontrast/embeddings'"):
        read_shard_attrs(other)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    with pytest.raises(MaskFormatError, match=rf"{garbage}: cannot open as HDF5"):
        MaskShardReader(garbage).ids
    assert isinstance(MaskFormatError("x"), ValueError)


def test_inconsistent_offsets_are_reported_as_corrupt(tmp_path: Path):
    path = tmp_path / "s.h5"
    write_mask_shard(path, [MaskRecord("a", np.ones((20, 20), bool)), MaskRecord("b", np.ones((4, 4), bool))])
    with h5py.File(path, "r+") as f:
        f["offsets"][1] = 10  # "b" would overlap "a" (50 bytes)
    with pytest.raises(MaskFormatError, match=rf"{path}: corrupt mask shard \(offsets"):
        MaskShardReader(path).get(0)


def test_reader_errors(tmp_path: Path):
    path = tmp_path / "s.h5"
    write_mask_shard(path, [MaskRecord("a", np.ones((2, 2), bool)), MaskRecord("b", np.zeros((1, 3), bool))])
    reader = MaskShardReader(path)
    assert reader.get(-1).id == "b"
    with pytest.raises(IndexError, match="row 2 out of range for 2 records"):
        reader.get(2)
    with pytest.raises(KeyError, match="'zz' not in mask shard"):
        reader.get("zz")
    with pytest.raises(ValueError, match="has no soft maps"):
        reader.get(0, soft=True)
    with pytest.raises(TypeError, match="row \\(int\\) or an id \\(str\\)"):
        reader.get(1.0)
    missing = MaskShardReader(tmp_path / "missing.h5")  # lazy: no error until used
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        len(missing)


# --------------------------------------------------------------------------- names and store


def test_shard_names():
    assert shard_name(0) == "shard-00000.h5" and shard_name(123456) == "shard-123456.h5"
    for i in (0, 7, 99999, 123456):
        assert shard_index(shard_name(i)) == i
    for name in ("manifest.json", ".lock", "shard-1.h5", "shard-000001.h5", "shard-00000.h5.bak",
                 ".shard-00000.h5.77.0a1b2c3d.tmp.h5", "shard-0000a.h5"):
        assert shard_index(name) is None, name
    with pytest.raises(ValueError, match="non-negative"):
        shard_name(-1)


def test_store_reads_by_id_across_shards_and_ignores_other_files(store_dir: Path):
    (store_dir / "shard-1.h5").write_bytes(b"not canonical")  # ignored too
    store = MaskStore(store_dir)
    assert [p.name for p in store.shard_paths] == ["shard-00000.h5", "shard-00003.h5"]
    assert store.ids() == [f"img{i}" for i in range(5)]
    assert store.ids(kept_only=True) == ["img0", "img1", "img3", "img4"]
    assert len(store) == 5 and "img4" in store and "nope" not in store
    rec = store.get("img3", soft=True)
    np.testing.assert_array_equal(rec.mask, blob(8, 13, 0.3, seed=3))
    np.testing.assert_array_equal(rec.soft, np.full((8, 13), 3, np.uint8))
    assert [r.id for r in store] == store.ids()
    with pytest.raises(KeyError, match="'nope' not in mask store"):
        store.get("nope")


def test_store_table(store_dir: Path):
    t = MaskStore(store_dir).table()
    assert t["id"].tolist() == [f"img{i}" for i in range(5)]
    assert t["shard"].tolist() == [0, 0, 0, 3, 3]  # file numbers, not positions
    assert t["row"].tolist() == [0, 1, 2, 0, 1]
    assert t["height"].tolist() == [5, 6, 7, 8, 9] and t["width"].tolist() == [7, 9, 11, 13, 15]
    assert t["kept"].tolist() == [True, True, False, True, True]
    assert t["reason"].tolist() == ["", "", "fg<0.01", "", ""]
    np.testing.assert_allclose(t["fg_fraction"], [round(0.3 * h * w) / (h * w) for h, w in
                                                  zip(t["height"], t["width"])], rtol=1e-6)


def test_duplicate_id_across_shards(tmp_path: Path):
    write_mask_shard(tmp_path / shard_name(0), [MaskRecord("a", np.ones((2, 2), bool))])
    write_mask_shard(tmp_path / shard_name(1), [MaskRecord("a", np.ones((2, 2), bool))])
    with pytest.raises(MaskFormatError, match="'a' is in both .*shard-00000.h5 and .*shard-00001.h5"):
        MaskStore(tmp_path).get("a")


def test_store_ignores_temp_file_left_by_a_crash(tmp_path: Path):
    """A writer process dies half-way through a shard: the temp file stays, the store skips it."""
    write_mask_shard(tmp_path / shard_name(0), [MaskRecord("a", np.ones((2, 2), bool))])
    whole = (tmp_path / shard_name(0)).read_bytes()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        with atomic_path(tmp_path / shard_name(1), suffix=".h5") as tmp:
            tmp.write_bytes(whole[: len(whole) // 2])
            os._exit(1)  # crash: no cleanup, no rename
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp.h5")
    store = MaskStore(tmp_path)
    assert [p.name for p in store.shard_paths] == [shard_name(0)]
    assert store.ids() == ["a"] and store.get("a").mask.all()


def test_missing_directory(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="mask store directory not found"):
        MaskStore(tmp_path / "nope")


# --------------------------------------------------------------------------- processes


def test_pickled_reader_and_store_work_in_this_process(store_dir: Path):
    store = MaskStore(store_dir)
    want = store.get("img1", soft=True)  # opened before pickling
    clone = pickle.loads(pickle.dumps(store))
    assert_same(clone.get("img1", soft=True), want, soft=True)
    reader = MaskShardReader(store.shard_paths[1])
    reader.get(0)
    assert_same(pickle.loads(pickle.dumps(reader)).get("img4"), store.get("img4"), soft=False)


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pickled_store_and_reader_in_worker_processes(store_dir: Path, method: str):
    store = MaskStore(store_dir)
    want = {id: store.get(id, soft=True) for id in store.ids()}  # the parent has the files open
    reader = MaskShardReader(store.shard_paths[0])
    reader.get(0)
    with mp.get_context(method).Pool(2) as pool:
        got = pool.map(operator.methodcaller("get", "img3", soft=True), [store] * 2)
        got += pool.map(operator.methodcaller("get", 1, soft=True), [reader])
    for rec, id in zip(got, ["img3", "img3", "img1"]):
        assert_same(rec, want[id], soft=True)
    assert_same(store.get("img0", soft=True), want["img0"], soft=True)  # the parent still reads


@pytest.mark.distributed
def test_forked_children_inherit_an_open_store(store_dir: Path):
    """DataLoader-style: workers fork after the parent opened the files; nothing is pickled."""
    store = MaskStore(store_dir)
    want = {id: store.get(id, soft=True) for id in store.ids()}
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def work(rank: int) -> None:
        ids = store.ids()[rank::2]
        recs = [store.get(id, soft=True) for id in ids]
        own = all(r._pid == os.getpid() for r in store._readers)  # reopened in the child
        queue.put((recs, own))

    procs = [ctx.Process(target=work, args=(rank,)) for rank in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(own for _, own in results)
    got = [r for recs, _ in results for r in recs]
    assert sorted(r.id for r in got) == sorted(want)
    for r in got:
        assert_same(r, want[r.id], soft=True)
    for id, rec in want.items():  # the parent's handles survived the children's exits
        assert_same(store.get(id, soft=True), rec, soft=True)


# --------------------------------------------------------------------------- summary


def test_summarize_masks(tmp_path: Path):
    d = tmp_path / "v1"
    first = [MaskRecord("a", blob(2, 2, 0.0), kept=False, reason="fg<0.01"),
             MaskRecord("b", blob(2, 4, 0.25))]
    second = [MaskRecord("c", blob(4, 2, 0.5)),
              MaskRecord("d", blob(3, 5, 1.0), kept=False, reason="fg>0.99")]
    write_mask_shard(d / shard_name(0), first, attrs={"estimator": "priors", "params": {"k": 2}})
    write_mask_shard(d / shard_name(1), second, attrs={"estimator": "other"})
    (d / "manifest.json").write_text("{}" * 1000)
    s = summarize_masks(d)
    assert s == {
        "n_images": 4, "n_kept": 2, "n_dropped": 2,
        "dropped_by_reason": {"fg<0.01": 1, "fg>0.99": 1},
        "fg_fraction": {"bin_edges": [i / 10 for i in range(11)], "counts": [1, 0, 1, 0, 0, 1, 0, 0, 0, 1],
                        "mean": pytest.approx(0.4375), "median": pytest.approx(0.375)},
        "height": {"min": 2, "max": 4}, "width": {"min": 2, "max": 5},
        "n_shards": 2,
        "bytes_on_disk": (d / shard_name(0)).stat().st_size + (d / shard_name(1)).stat().st_size,
        "schema_version": 1,
        "estimator": {"estimator": "priors", "params": {"k": 2}},
    }


def test_summarize_empty_directory(tmp_path: Path):
    s = summarize_masks(tmp_path)
    assert s["n_images"] == 0 and s["n_shards"] == 0 and s["fg_fraction"]["mean"] is None
    assert s["fg_fraction"]["counts"] == [0] * 10 and s["height"] == {"min": None, "max": None}
