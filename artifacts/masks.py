"""Mask shards: one HDF5 file per block of images holding one binary saliency mask per image and,
from ``schema_version`` 2, a list of object proposals per image.

Layout of ``shard-NNNNN.h5`` (``schema_version`` 1), CSR style so masks of any size sit in one
flat dataset and a read touches only the chunks the mask lies in:

- root attrs: ``schema = "maskcontrast/masks"``, ``schema_version = 1``, ``count`` (n), the
  writer's own attrs (estimator name, parameters, model sha256, ...); attrs that are not
  str/int/float/bool are stored as JSON strings and their names listed in ``json_attrs``.
- ``ids`` (utf-8 str, n), ``shapes`` (int32, n x 2: height, width),
- ``masks`` (uint8, flat): each mask is ``np.packbits(mask.ravel())`` (8 pixels per byte,
  row-major, most significant bit first, last byte zero-padded), ``ceil(H * W / 8)`` bytes;
  mask i is ``masks[offsets[i]:offsets[i] + ceil(H * W / 8)]``, ``offsets`` (int64, n + 1,
  ``offsets[n] == len(masks)``). Chunked (32 KiB by default, chosen by
  ``benchmarks/bench_mask_io.py --sweep``) and lzf- or gzip-compressed. The writer places each
  mask so that it touches as few chunks as its size allows (small masks share a chunk, a mask
  that would straddle a chunk boundary starts at the next one; the gap is zeros and compresses
  to almost nothing), so a random read decompresses no chunk it does not need. (This part of
  the layout, and the reader machinery, is shared with embedding shards: :mod:`artifacts.shards`.)
- optional ``soft`` (uint8, flat, saliency map * 255 row-major, ``H * W`` bytes each) with
  ``soft_offsets`` (int64, n + 1), placed the same way.
- ``fg_fraction`` (float32, n), ``kept`` (bool, n), ``reason`` (utf-8 str, n; "" when kept).

Version 2 (written when the records carry proposals, :attr:`MaskRecord.proposals`) is version 1
plus each image's proposals, a second CSR level:

- ``proposal_rows`` (int64, n + 1): the proposals of image i are rows
  ``proposal_rows[i]:proposal_rows[i + 1]`` (P proposals in all, ``proposal_rows[n] == P``),
  best first, as the writer ordered them; an image may have none.
- ``proposal_masks`` (uint8, flat) + ``proposal_offsets`` (int64, P + 1): each proposal's mask
  bit-packed at its image's shape exactly like ``masks``, placed in chunks the same way.
- ``proposal_score`` (float32, P): the estimator's score (higher is better), ``proposal_area``
  (float32, P): the proposal's share of the image's pixels.

``masks`` and ``fg_fraction`` keep their version-1 meaning (the image's binary saliency mask),
so a reader that ignores proposals reads a version-2 shard as it reads a version-1 one. Readers
dispatch on ``schema_version``; :meth:`MaskShardReader.read_proposals` reads a version-1 image as
one proposal, its mask with score 1.0 (none when the mask is empty).

Dropped images keep their mask, so inspection can show what was dropped and why.
Readers open files lazily and read-only, without a chunk cache (random reads over a training set
almost never hit it, and it would hold masks in every worker's memory), and reopen after
pickling or ``fork`` so they work in DataLoader workers.
"""
from __future__ import annotations

import os
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from artifacts.shards import (
    ITER_BLOCK_BYTES,
    MASK_CHUNK_BYTES,
    RESERVED_ATTRS,
    UTF8,
    ShardFormat,
    ShardIndex,
    ShardReader,
    ShardRecord,
    ShardStore,
    check_chunk_bytes,
    check_compression,
    create_shard_file,
    describe_array,
    encode_attrs,
    fraction_summary,
    int_range,
    pack_mask,
    packed_size,
    place_in_chunks,
    placement_ok,
    unpack_mask,
    write_header,
    write_placed,
)

__all__ = [
    "MASK_CHUNK_BYTES",
    "PROPOSALS_SCHEMA_VERSION",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SOFT_CHUNK_BYTES",
    "MaskFormatError",
    "MaskRecord",
    "MaskShardReader",
    "MaskStore",
    "Proposal",
    "place_in_chunks",
    "read_shard_attrs",
    "shard_index",
    "shard_name",
    "summarize_masks",
    "write_mask_shard",
]

SCHEMA = "maskcontrast/masks"
SCHEMA_VERSION = 1            # written for records without proposals (one mask per image)
PROPOSALS_SCHEMA_VERSION = 2  # written for records with proposals

# Chunk size of soft maps in bytes, measured with `python benchmarks/bench_mask_io.py --sweep`
# (MASK_CHUNK_BYTES, for the packed masks, is defined in artifacts.shards).
SOFT_CHUNK_BYTES = 64 * 1024

# Iteration reads blocks of consecutive masks of about this many packed bytes at a time
# (looked up on each iteration, so tests can make blocks small).
_ITER_BLOCK_BYTES = ITER_BLOCK_BYTES


class MaskFormatError(ValueError):
    """A file that is not a readable mask shard: wrong schema, unknown version, or corrupt."""


@dataclass(frozen=True, eq=False)
class Proposal:
    """One object proposal of an image: a non-empty bool (H, W) mask at the image's resolution,
    a finite score (higher is better; held at float32 precision, as stored) and ``area``, the
    mask's share of the image's pixels (computed)."""

    mask: np.ndarray
    score: float
    area: float = field(init=False)

    def __post_init__(self) -> None:
        m = self.mask
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.ndim != 2 or 0 in m.shape:
            raise ValueError(f"proposal mask must be a non-empty bool (H, W) array, got {describe_array(m)}")
        count = int(np.count_nonzero(m))
        if count == 0:
            raise ValueError(f"proposal mask {m.shape} has no foreground pixel")
        if isinstance(self.score, bool) or not isinstance(self.score, (int, float, np.integer, np.floating)) \
                or not math.isfinite(self.score):
            raise ValueError(f"proposal score must be a finite number, got {self.score!r}")
        object.__setattr__(self, "score", float(np.float32(self.score)))
        object.__setattr__(self, "area", count / m.size)

    def __repr__(self) -> str:
        return f"Proposal(mask={self.mask.shape}, score={self.score:.4g}, area={self.area:.4g})"


@dataclass
class MaskRecord(ShardRecord):
    """One image's mask proposal.

    ``mask``: bool (H, W) at the image's original resolution. ``soft``: uint8 (H, W) saliency map
    * 255, or None. ``kept`` is False for images the stage dropped, ``reason`` says why ("" when
    kept), e.g. ``"fg<0.01"``, ``"fg>0.99"``, ``"unreadable: ..."``. ``proposals``: the image's
    object proposals, best first (a record with them is written as schema version 2), or None
    (version 1; and on reading, unless asked for).
    """

    soft: np.ndarray | None = None
    kept: bool = True
    reason: str = ""
    proposals: list[Proposal] | None = None
    _kind: ClassVar[str] = "mask"

    def __post_init__(self) -> None:
        super().__post_init__()
        s = self.soft
        if s is not None and (not isinstance(s, np.ndarray) or s.dtype != np.uint8 or s.shape != self.mask.shape):
            raise ValueError(f"soft map of {self.id!r} must be uint8 {self.mask.shape} like its mask, "
                             f"got {describe_array(s)}")
        if not isinstance(self.reason, str) or "\x00" in self.reason:
            raise ValueError(f"reason of {self.id!r} must be a str without NUL, got {self.reason!r}")
        if self.kept and self.reason:
            raise ValueError(f"record {self.id!r} is kept but has a drop reason {self.reason!r}")
        if self.proposals is not None:
            if not isinstance(self.proposals, (list, tuple)):
                raise ValueError(f"proposals of {self.id!r} must be a list of Proposal or None, "
                                 f"got {type(self.proposals).__name__}")
            self.proposals = list(self.proposals)
            for k, p in enumerate(self.proposals):
                if not isinstance(p, Proposal):
                    raise ValueError(f"proposal {k} of {self.id!r} must be a Proposal, got {type(p).__name__}")
                if p.mask.shape != self.mask.shape:
                    raise ValueError(f"proposal {k} of {self.id!r} has shape {p.mask.shape}, "
                                     f"its image's mask {self.mask.shape}")

    @property
    def fg_fraction(self) -> float:
        """Share of foreground pixels, in [0, 1]."""
        return self.mask_fraction


@dataclass
class _Index(ShardIndex):
    """The small per-row arrays of one shard, kept in memory by readers."""

    soft_offsets: np.ndarray | None  # int64 (n + 1,): start of each soft map in `soft`, or None
    fg_fraction: np.ndarray  # float32 (n,)
    kept: np.ndarray         # bool (n,)
    reason: list[str]

    @classmethod
    def read_rows(cls, f: h5py.File) -> dict[str, Any]:
        return dict(
            soft_offsets=f["soft_offsets"][()].astype(np.int64) if "soft_offsets" in f else None,
            fg_fraction=f["fg_fraction"][()],
            kept=f["kept"][()].astype(bool),
            reason=list(f["reason"].asstr()[()]),
        )

    def rows_match(self, n: int) -> bool:
        return len(self.reason) == n and self.fg_fraction.shape == (n,) and self.kept.shape == (n,)

    def data_problem(self, f: h5py.File, n: int) -> str | None:
        n_soft = f["soft"].shape[0] if "soft" in f else None
        if (self.soft_offsets is None) != (n_soft is None) or (
                self.soft_offsets is not None
                and not placement_ok(self.soft_offsets, self.shapes[:, 0] * self.shapes[:, 1], n_soft)):
            return "soft_offsets do not match shapes and the soft dataset"
        return None

    has_proposals: ClassVar[bool] = False

    @property
    def n_proposals(self) -> np.ndarray:  # int32 (n,)
        """Proposals per image as :meth:`MaskShardReader.read_proposals` gives them: version 1,
        one for a non-empty mask."""
        return (self.fg_fraction > 0).astype(np.int32)


@dataclass
class _IndexV2(_Index):
    """Version 2: version 1's rows plus the proposals' index (the second CSR level)."""

    proposal_rows: np.ndarray     # int64 (n + 1,): image i's proposals are rows [i]:[i + 1]
    proposal_offsets: np.ndarray  # int64 (P + 1,): start of each packed proposal in `proposal_masks`
    proposal_score: np.ndarray    # float32 (P,)
    proposal_area: np.ndarray     # float32 (P,)

    has_proposals: ClassVar[bool] = True

    @classmethod
    def read_rows(cls, f: h5py.File) -> dict[str, Any]:
        return dict(
            super().read_rows(f),
            proposal_rows=f["proposal_rows"][()].astype(np.int64),
            proposal_offsets=f["proposal_offsets"][()].astype(np.int64),
            proposal_score=f["proposal_score"][()].astype(np.float32),
            proposal_area=f["proposal_area"][()].astype(np.float32),
        )

    def rows_match(self, n: int) -> bool:
        return super().rows_match(n) and self.proposal_rows.shape == (n + 1,)

    def data_problem(self, f: h5py.File, n: int) -> str | None:
        problem = super().data_problem(f, n)
        if problem:
            return problem
        rows = self.proposal_rows
        n_prop = self.proposal_score.shape[0]
        if rows[0] != 0 or rows[-1] != n_prop or (np.diff(rows) < 0).any():
            return f"proposal_rows do not run from 0 to the {n_prop} proposals in order"
        if self.proposal_area.shape != (n_prop,) or self.proposal_score.ndim != 1:
            return "proposal_score and proposal_area differ in length"
        sizes = np.repeat(self.mask_bytes, np.diff(rows))  # packed bytes of each proposal
        if not placement_ok(self.proposal_offsets, sizes, f["proposal_masks"].shape[0]):
            return "proposal_offsets do not match shapes, proposal_rows and the proposal_masks dataset"
        return None

    @property
    def n_proposals(self) -> np.ndarray:  # int32 (n,)
        return np.diff(self.proposal_rows).astype(np.int32)


_FORMAT = ShardFormat(kind="mask", prefix="shard", schema=SCHEMA, error=MaskFormatError,
                      index_types={SCHEMA_VERSION: _Index, PROPOSALS_SCHEMA_VERSION: _IndexV2})


# shard_name(3) == "shard-00003.h5"; shard_index is its inverse, None for any other name.
shard_name = _FORMAT.shard_name
shard_index = _FORMAT.shard_index


# --------------------------------------------------------------------------- writing


def write_mask_shard(path: str | os.PathLike, records: Sequence[MaskRecord],
                     attrs: Mapping[str, Any] | None = None, compression: str | None = "gzip", *,
                     mask_chunk_bytes: int = MASK_CHUNK_BYTES,
                     soft_chunk_bytes: int = SOFT_CHUNK_BYTES) -> None:
    """Write ``records`` as one mask shard at ``path``, atomically (temp name, fsync, rename).

    ``attrs``: the writer's root attrs (estimator name, parameters, model sha256, ...); values
    that are not str/int/float/bool are JSON-encoded. ``compression``: "lzf" (fast), "gzip"
    (as fast here on bit-packed masks, a third smaller, and readable by every HDF5 tool without
    a plugin) or None (contiguous, fastest reads, ~7x the disk). ``mask_chunk_bytes`` and
    ``soft_chunk_bytes`` set the chunk sizes of compressed data (proposal masks are chunked
    like masks). Either every record has a soft map or none does; likewise proposals: records
    with proposals (an empty list included) are written as schema version 2, records without as
    version 1, byte for byte as before proposals existed.
    """
    path = Path(path)
    check_compression(path, "compression", compression)
    check_chunk_bytes(path, "mask_chunk_bytes", mask_chunk_bytes)
    check_chunk_bytes(path, "soft_chunk_bytes", soft_chunk_bytes)
    records = list(records)
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{path}: duplicate ids in shard: {dup[:5]}")
    n_soft = sum(r.soft is not None for r in records)
    if 0 < n_soft < len(records):
        missing = [r.id for r in records if r.soft is None][:3]
        raise ValueError(f"{path}: {n_soft} of {len(records)} records have a soft map; all or none "
                         f"must (without one: {missing})")
    n_prop = sum(r.proposals is not None for r in records)
    if 0 < n_prop < len(records):
        missing = [r.id for r in records if r.proposals is None][:3]
        raise ValueError(f"{path}: {n_prop} of {len(records)} records have proposals; all or none "
                         f"must (without: {missing})")
    root_attrs = encode_attrs(path, attrs or {})

    n = len(records)
    version = PROPOSALS_SCHEMA_VERSION if n and n_prop == n else SCHEMA_VERSION
    with create_shard_file(path) as f:
        write_header(f, SCHEMA, version, root_attrs, ids, [r.shape for r in records])
        write_placed(f, "masks", "offsets", [pack_mask(r.mask) for r in records], mask_chunk_bytes, compression)
        if n and n_soft == n:
            soft = [r.soft.ravel() for r in records]  # each: uint8 (H*W,)
            write_placed(f, "soft", "soft_offsets", soft, soft_chunk_bytes, compression)
        f.create_dataset("fg_fraction", data=np.array([r.fg_fraction for r in records], dtype=np.float32))
        f.create_dataset("kept", data=np.array([r.kept for r in records], dtype=bool))
        f.create_dataset("reason", data=np.array([r.reason for r in records], dtype=object), dtype=UTF8)
        if version == PROPOSALS_SCHEMA_VERSION:
            _write_proposals(f, records, mask_chunk_bytes, compression)


def _write_proposals(f: h5py.File, records: Sequence[MaskRecord], chunk_bytes: int,
                     compression: str | None) -> None:
    """The version-2 datasets: every record's proposals, in record order, as a second CSR level."""
    props = [p for r in records for p in r.proposals]
    rows = np.zeros(len(records) + 1, dtype=np.int64)
    np.cumsum([len(r.proposals) for r in records], out=rows[1:])
    f.create_dataset("proposal_rows", data=rows)
    write_placed(f, "proposal_masks", "proposal_offsets", [pack_mask(p.mask) for p in props], chunk_bytes,
                 compression)
    f.create_dataset("proposal_score", data=np.array([p.score for p in props], dtype=np.float32))
    f.create_dataset("proposal_area", data=np.array([p.area for p in props], dtype=np.float32))


# --------------------------------------------------------------------------- reading


def read_shard_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Decoded root attrs of a shard (schema, schema_version, count and the writer's attrs)."""
    return _FORMAT.read_attrs(Path(path))


class MaskShardReader(ShardReader[_Index]):
    """Random and sequential access to one shard.

    The file is opened on first access and the index arrays (ids, shapes, offsets, fg fraction,
    kept, reason) are held in memory; masks are read on demand. Picklable: the HDF5 handle is
    dropped on pickling and reopened lazily, also in a process forked after it was opened.
    """

    format = _FORMAT
    held_datasets = ("masks", "soft", "proposal_masks")

    @property
    def has_soft(self) -> bool:
        return self.index.soft_offsets is not None

    @property
    def has_proposals(self) -> bool:
        """Whether the shard stores proposals (schema version 2); a version-1 shard still reads
        as one proposal per image (:meth:`read_proposals`)."""
        return self.index.has_proposals

    def _record(self, i: int, mask: np.ndarray, soft: bool, proposals: bool = False) -> MaskRecord:
        idx = self.index
        return MaskRecord(idx.ids[i], mask, self._read_soft(i) if soft else None, bool(idx.kept[i]), idx.reason[i],
                          self._read_proposals(i, mask) if proposals else None)

    def _read_proposals(self, i: int, mask: np.ndarray | None = None) -> list[Proposal]:
        idx = self.index
        if not idx.has_proposals:  # version 1: the image's mask is its one proposal
            if mask is None:
                mask = self._read_mask(i)
            return [Proposal(mask, 1.0)] if mask.any() else []
        h, w = idx.shapes[i]
        first, last = idx.proposal_rows[i], idx.proposal_rows[i + 1]
        if first == last:
            return []
        size = packed_size(h, w)
        offsets = idx.proposal_offsets
        block = self._dataset("proposal_masks")[offsets[first]:offsets[last - 1] + size]
        return [Proposal(unpack_mask(block[offsets[k] - offsets[first]:offsets[k] - offsets[first] + size], h, w),
                         float(idx.proposal_score[k]))
                for k in range(first, last)]

    def read_proposals(self, key: int | str) -> list[Proposal]:
        """The proposals of row ``key`` or id ``key``, best first: those stored (version 2), or
        the image's mask as one proposal with score 1.0, none when it is empty (version 1)."""
        return self._read_proposals(self._row(key))

    def _read_soft(self, i: int) -> np.ndarray:
        idx = self.index
        if idx.soft_offsets is None:
            raise ValueError(f"{self.path} has no soft maps (written without them)")
        h, w = idx.shapes[i]
        start = idx.soft_offsets[i]
        return self._dataset("soft")[start:start + h * w].reshape(h, w)

    def get(self, key: int | str, soft: bool = False, proposals: bool = False) -> MaskRecord:
        """The record at row ``key`` or with id ``key``; ``soft=True`` also reads the soft map,
        ``proposals=True`` the proposals (as :meth:`read_proposals`)."""
        i = self._row(key)
        return self._record(i, self._read_mask(i), soft, proposals)

    def iter(self, soft: bool = False, proposals: bool = False) -> Iterator[MaskRecord]:
        """Records in file order, reading blocks of consecutive masks (~1 MiB packed) at a time."""
        if soft and not self.has_soft:
            raise ValueError(f"{self.path} has no soft maps (written without them)")
        for i, mask in self._iter_masks(_ITER_BLOCK_BYTES):
            yield self._record(i, mask, soft, proposals)


class MaskStore(ShardStore[MaskShardReader]):
    """All shards of one directory, read by id. Ignores temp files and every non-shard name
    (manifest.json, the lock, reports). The shard list is taken when the store is made.

    Picklable and fork-safe like :class:`MaskShardReader`; the id -> (shard, row) map is built
    lazily from the shards' index arrays and travels with the pickle once built.
    """

    reader_type = MaskShardReader
    columns = {"fg_fraction": np.float32, "kept": bool, "reason": object, "n_proposals": np.int32}

    def ids(self, kept_only: bool = False) -> list[str]:
        """All ids in shard order (only those of kept images with ``kept_only``)."""
        if not kept_only:
            return super().ids()
        return [k for reader in self._readers for k, kp in zip(reader.index.ids, reader.index.kept) if kp]

    def get(self, id: str, soft: bool = False, proposals: bool = False) -> MaskRecord:
        """The record of image ``id`` (KeyError if no shard holds it)."""
        reader, row = self._locate(id)
        return reader.get(row, soft=soft, proposals=proposals)

    @property
    def has_proposals(self) -> bool:
        """Whether any shard stores proposals (schema version 2)."""
        return any(reader.has_proposals for reader in self._readers)

    def read_proposals(self, id: str) -> list[Proposal]:
        """The proposals of image ``id``, best first (:meth:`MaskShardReader.read_proposals`)."""
        reader, row = self._locate(id)
        return reader.read_proposals(row)


def summarize_masks(directory: str | os.PathLike) -> dict[str, Any]:
    """JSON-ready summary of a mask directory for ``inspect``, from the index arrays only.

    Histogram and mean/median of fg_fraction are over all images (kept and dropped);
    ``bytes_on_disk`` counts the shard files; ``estimator`` holds the first shard's writer attrs.
    When a shard stores proposals (version 2), ``proposals`` holds their total, how many images
    have how many, and the histogram of their areas (version-1 shards count as one proposal per
    non-empty mask, of its fg_fraction).
    """
    store = MaskStore(directory)
    t = store.table()
    reasons, reason_counts = np.unique(t["reason"][~t["kept"]].astype(str), return_counts=True)
    estimator: dict[str, Any] = {}
    schema_version = None
    if store.shard_paths:
        attrs = read_shard_attrs(store.shard_paths[0])
        schema_version = attrs["schema_version"]
        estimator = {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS}
    summary = {
        "n_images": int(t["id"].size),
        "n_kept": int(t["kept"].sum()),
        "n_dropped": int((~t["kept"]).sum()),
        "dropped_by_reason": {str(r): int(c) for r, c in zip(reasons, reason_counts)},
        "fg_fraction": fraction_summary(t["fg_fraction"]),
        "height": int_range(t["height"]),
        "width": int_range(t["width"]),
        "n_shards": len(store.shard_paths),
        "bytes_on_disk": int(sum(p.stat().st_size for p in store.shard_paths)),
        "schema_version": schema_version,
        "estimator": estimator,
    }
    if store.has_proposals:
        summary["proposals"] = _proposal_summary(store._readers, t["n_proposals"])
    return summary


def _proposal_summary(readers: Sequence[MaskShardReader], n_proposals: np.ndarray) -> dict[str, Any]:
    areas = []
    for reader in readers:
        idx = reader.index
        areas.append(idx.proposal_area if idx.has_proposals else idx.fg_fraction[idx.fg_fraction > 0])
    counts = np.bincount(n_proposals) if n_proposals.size else np.zeros(0, np.int64)
    return {
        "n_proposals": int(n_proposals.sum()),
        "images_by_count": {str(k): int(c) for k, c in enumerate(counts) if c},
        "area": fraction_summary(np.concatenate(areas) if areas else np.zeros(0)),
    }
