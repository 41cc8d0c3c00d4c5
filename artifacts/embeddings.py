"""Embedding shards: per image, the prototype, the predicted salient mask and optional features.

Written by the ``extract`` stage, read by ``evaluate`` (K-means and retrieval read the
prototypes; the linear probe and pixel-level K-means read the features; every protocol reads the
salient masks). Layout of ``emb-NNNNN.h5`` (``schema_version`` 1), the id/offset pattern of the
mask shards (:mod:`artifacts.masks`; what both share is in :mod:`artifacts.shards`):

- root attrs: ``schema = "maskcontrast/embeddings"``, ``schema_version = 1``, ``count`` (n), the
  writer's own attrs (model description, extract parameters, ...); attrs that are not
  str/int/float/bool are stored as JSON strings and their names listed in ``json_attrs``.
- ``ids`` (utf-8 str, n), ``shapes`` (int32, n x 2: the image's ORIGINAL height, width).
- ``prototypes`` (float32, n x D): L2-normalised; an all-zero row where ``valid`` is False
  (the image has no salient pixel, so its prototype has no direction).
- ``valid`` (bool, n), ``salient_fraction`` (float32, n: share of salient pixels in ``masks``).
- ``masks`` (uint8, flat) + ``offsets`` (int64, n + 1): the salient mask at the image's original
  resolution, bit-packed exactly like mask shards (``np.packbits`` of the row-major mask,
  ``ceil(H * W / 8)`` bytes, placed by :func:`artifacts.shards.place_in_chunks` so a read touches
  the fewest chunks; 32 KiB chunks, gzip).
- optional ``features`` (float16, n x C x f x f): one chunk per image (``1 x C x f x f``),
  byte-shuffled and compressed (gzip by default; the decoder trunk is post-ReLU, so about half its
  values are zeros), so reading one image's features decompresses exactly one chunk.

Version 2 (written when the records carry proposals, :attr:`EmbeddingRecord.proposals`: the
extract stage on a version-2 mask artifact, or splitting the saliency head's mask) is version 1
plus each image's proposals, a second CSR level as in mask shards version 2:

- ``proposal_rows`` (int64, n + 1): the proposals of image i are rows
  ``proposal_rows[i]:proposal_rows[i + 1]`` (P in all); an image may have none.
- ``proposal_prototypes`` (float32, P x D), ``proposal_valid`` (bool, P): one prototype per
  proposal, as ``prototypes`` per image.
- ``proposal_masks`` (uint8, flat) + ``proposal_offsets`` (int64, P + 1): each proposal's mask at
  the image's original resolution, bit-packed and placed like ``masks``.

``prototypes``, ``valid`` and ``masks`` keep their version-1 meaning (the image's salient
region), so a reader that wants one prototype per image (the linear probe, the clusters stage)
reads both versions alike. The regions the K-means and retrieval protocols label
(:meth:`EmbeddingStore.regions`) are an image's proposals (version 2; an image without any gives
one empty, invalid region) or the image's salient region (version 1).

A shard of zero images (every image of its block was unreadable) is a valid shard: it marks the
block as done. Readers open files lazily, read-only, without a chunk cache, and reopen after
pickling or ``fork`` (DataLoader and dask workers). :class:`EmbeddingShardWriter` streams the
features to the file as records arrive, so a writer holds only the small per-image arrays of a
shard in memory; the file appears under its final name only when complete.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from artifacts.shards import (
    MASK_CHUNK_BYTES,
    RESERVED_ATTRS,
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
    placement_ok,
    unpack_mask,
    write_header,
    write_placed,
)

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "EmbeddingFormatError",
    "EmbeddingRecord",
    "EmbeddingShardReader",
    "EmbeddingShardWriter",
    "EmbeddingStore",
    "ProposalEmbedding",
    "REGIONS_SCHEMA_VERSION",
    "read_shard_attrs",
    "shard_index",
    "shard_name",
    "summarize_embeddings",
    "write_embedding_shard",
]

SCHEMA = "maskcontrast/embeddings"
SCHEMA_VERSION = 1          # written for records without proposals
REGIONS_SCHEMA_VERSION = 2  # written for records with proposals

_NORM_TOL = 1e-3  # |‖prototype‖ - 1| allowed for a valid prototype (float32 rounding)


class EmbeddingFormatError(ValueError):
    """A file that is not a readable embedding shard: wrong schema, unknown version, or corrupt."""


def _check_prototype(what: str, p: np.ndarray, valid: bool) -> None:
    if not isinstance(p, np.ndarray) or p.dtype != np.float32 or p.ndim != 1 or p.size == 0:
        raise ValueError(f"prototype of {what} must be a non-empty float32 (D,) array, got {describe_array(p)}")
    if valid:
        norm = float(np.linalg.norm(p.astype(np.float64)))
        if not np.isfinite(norm) or abs(norm - 1.0) > _NORM_TOL:
            raise ValueError(f"valid prototype of {what} must be L2-normalised, its norm is {norm}")
    elif p.any():
        raise ValueError(f"invalid prototype of {what} must be all zeros")


@dataclass
class ProposalEmbedding:
    """One proposal of an image in an embedding shard: its bool (H, W) mask at the image's
    original resolution, its prototype (float32 (D,), L2-normalised; zeros when not ``valid``)."""

    mask: np.ndarray
    prototype: np.ndarray
    valid: bool

    def __post_init__(self) -> None:
        m = self.mask
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.ndim != 2 or 0 in m.shape:
            raise ValueError(f"proposal mask must be a non-empty bool (H, W) array, got {describe_array(m)}")
        self.valid = bool(self.valid)
        _check_prototype("a proposal", self.prototype, self.valid)


@dataclass
class EmbeddingRecord(ShardRecord):
    """What ``extract`` stores for one image.

    ``mask``: bool (H, W), the predicted (or given) salient region at the image's original
    resolution. ``prototype``: float32 (D,), L2-normalised, or zeros with ``valid=False`` when the
    image has no salient pixel. ``features``: float16 (C, f, f) decoder features, or None.
    ``proposals``: the image's proposals with their prototypes (a record with them is written as
    schema version 2), or None (version 1; and on reading, unless asked for).
    """

    prototype: np.ndarray
    valid: bool
    features: np.ndarray | None = None
    proposals: list[ProposalEmbedding] | None = None
    _kind: ClassVar[str] = "embedding"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.valid = bool(self.valid)
        _check_prototype(repr(self.id), self.prototype, self.valid)
        if self.proposals is not None:
            self.proposals = list(self.proposals)
            for k, p in enumerate(self.proposals):
                if not isinstance(p, ProposalEmbedding):
                    raise ValueError(f"proposal {k} of {self.id!r} must be a ProposalEmbedding, got {type(p).__name__}")
                if p.mask.shape != self.mask.shape or p.prototype.shape != self.prototype.shape:
                    raise ValueError(f"proposal {k} of {self.id!r} has mask {p.mask.shape} and prototype "
                                     f"{p.prototype.shape}, its image {self.mask.shape} and {self.prototype.shape}")
        f = self.features
        if f is not None and (not isinstance(f, np.ndarray) or f.dtype != np.float16 or f.ndim != 3):
            raise ValueError(f"features of {self.id!r} must be a float16 (C, h, w) array, got {describe_array(f)}")

    @property
    def salient_fraction(self) -> float:
        """Share of salient pixels of ``mask``, in [0, 1]."""
        return self.mask_fraction


@dataclass
class _Index(ShardIndex):
    """The per-row arrays of one shard, held in memory by readers (no mask or feature)."""

    prototypes: np.ndarray        # float32 (n, D)
    valid: np.ndarray             # bool (n,)
    salient_fraction: np.ndarray  # float32 (n,)
    feature_shape: tuple[int, int, int] | None  # (C, f, f), None without features

    @classmethod
    def read_rows(cls, f: h5py.File) -> dict[str, Any]:
        return dict(
            prototypes=f["prototypes"][()].astype(np.float32),
            valid=f["valid"][()].astype(bool),
            salient_fraction=f["salient_fraction"][()].astype(np.float32),
            feature_shape=tuple(int(s) for s in f["features"].shape[1:]) if "features" in f else None,
        )

    def rows_match(self, n: int) -> bool:
        return (self.valid.shape == (n,) and self.salient_fraction.shape == (n,)
                and self.prototypes.ndim == 2 and self.prototypes.shape[0] == n)

    def data_problem(self, f: h5py.File, n: int) -> str | None:
        n_features = f["features"].shape[0] if "features" in f else None
        if n_features is not None and (n_features != n or len(self.feature_shape) != 3):
            return f"features dataset holds {n_features} rows of shape {self.feature_shape}, expected {n}"
        return None

    has_proposals: ClassVar[bool] = False

    def region_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The regions the K-means and retrieval protocols label: (counts (n,) per image,
        prototypes (R, D), valid (R,)); version 1: each image's salient region."""
        return np.ones(len(self.ids), np.int64), self.prototypes, self.valid


@dataclass
class _IndexV2(_Index):
    """Version 2: version 1's rows plus the proposals' index (the second CSR level)."""

    proposal_rows: np.ndarray         # int64 (n + 1,)
    proposal_offsets: np.ndarray      # int64 (P + 1,)
    proposal_prototypes: np.ndarray   # float32 (P, D)
    proposal_valid: np.ndarray        # bool (P,)

    has_proposals: ClassVar[bool] = True

    @classmethod
    def read_rows(cls, f: h5py.File) -> dict[str, Any]:
        return dict(
            super().read_rows(f),
            proposal_rows=f["proposal_rows"][()].astype(np.int64),
            proposal_offsets=f["proposal_offsets"][()].astype(np.int64),
            proposal_prototypes=f["proposal_prototypes"][()].astype(np.float32),
            proposal_valid=f["proposal_valid"][()].astype(bool),
        )

    def rows_match(self, n: int) -> bool:
        return super().rows_match(n) and self.proposal_rows.shape == (n + 1,)

    def data_problem(self, f: h5py.File, n: int) -> str | None:
        problem = super().data_problem(f, n)
        if problem:
            return problem
        rows, n_prop = self.proposal_rows, self.proposal_valid.shape[0]
        if rows[0] != 0 or rows[-1] != n_prop or (np.diff(rows) < 0).any():
            return f"proposal_rows do not run from 0 to the {n_prop} proposals in order"
        if self.proposal_prototypes.ndim != 2 or self.proposal_prototypes.shape[0] != n_prop:
            return "proposal_prototypes and proposal_valid differ in length"
        sizes = np.repeat(self.mask_bytes, np.diff(rows))
        if not placement_ok(self.proposal_offsets, sizes, f["proposal_masks"].shape[0]):
            return "proposal_offsets do not match shapes, proposal_rows and the proposal_masks dataset"
        return None

    def region_rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        counts = np.diff(self.proposal_rows)
        if (counts > 0).all():
            return counts, self.proposal_prototypes, self.proposal_valid
        # an image without proposals keeps one empty region (zero prototype, invalid)
        dim = self.prototypes.shape[1] if self.prototypes.ndim == 2 else self.proposal_prototypes.shape[1]
        protos, valid = [], []
        for i, c in enumerate(counts):
            first = self.proposal_rows[i]
            if c:
                protos.append(self.proposal_prototypes[first:first + c])
                valid.append(self.proposal_valid[first:first + c])
            else:
                protos.append(np.zeros((1, dim), np.float32))
                valid.append(np.zeros(1, bool))
        return np.maximum(counts, 1), np.concatenate(protos), np.concatenate(valid)


_FORMAT = ShardFormat(kind="embedding", prefix="emb", schema=SCHEMA, error=EmbeddingFormatError,
                      index_types={SCHEMA_VERSION: _Index, REGIONS_SCHEMA_VERSION: _IndexV2})


# shard_name(3) == "emb-00003.h5"; shard_index is its inverse, None for any other name.
shard_name = _FORMAT.shard_name
shard_index = _FORMAT.shard_index


# --------------------------------------------------------------------------- writing


class EmbeddingShardWriter:
    """Write one shard record by record; the file appears at ``path`` only when the ``with``
    block ends without an exception (temp name, fsync, rename), and not at all otherwise.

    Features go to the file as each record is added (one chunk per image); ids, prototypes and
    the bit-packed masks are kept until the end, where the masks are laid out chunk-aligned.
    ``compression`` applies to the masks, ``features_compression`` to the features (with
    HDF5's byte shuffle): "gzip" (portable: every HDF5 tool reads it), "lzf" or None.
    Either every record has features, of one shape, or none has.
    """

    def __init__(self, path: str | os.PathLike, attrs: Mapping[str, Any] | None = None, *,
                 compression: str | None = "gzip", features_compression: str | None = "gzip",
                 mask_chunk_bytes: int = MASK_CHUNK_BYTES) -> None:
        self.path = Path(path)
        check_compression(self.path, "compression", compression)
        check_compression(self.path, "features_compression", features_compression)
        check_chunk_bytes(self.path, "mask_chunk_bytes", mask_chunk_bytes)
        self._root_attrs = encode_attrs(self.path, attrs or {})
        self._compression = compression
        self._features_compression = features_compression
        self._chunk = mask_chunk_bytes
        self._stack: ExitStack | None = None
        self._file: h5py.File | None = None
        self._features: h5py.Dataset | None = None
        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._shapes: list[tuple[int, int]] = []
        self._packed: list[np.ndarray] = []
        self._prototypes: list[np.ndarray] = []
        self._valid: list[bool] = []
        self._fraction: list[float] = []
        self._proposals: list[list[ProposalEmbedding]] | None = None  # per record, when they carry them

    def __enter__(self) -> EmbeddingShardWriter:
        stack = ExitStack()
        self._file = stack.enter_context(create_shard_file(self.path))
        self._stack = stack
        return self

    def add(self, record: EmbeddingRecord) -> None:
        """Append one record (its features are written now)."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: add() outside the writer's with-block")
        if record.id in self._seen:
            raise ValueError(f"{self.path}: duplicate id {record.id!r} in shard")
        n = len(self._ids)
        if self._prototypes and record.prototype.shape != self._prototypes[0].shape:
            raise ValueError(f"{self.path}: prototype of {record.id!r} has shape {record.prototype.shape}, "
                             f"earlier records {self._prototypes[0].shape}")
        has_features = self._features is not None
        if n and (record.features is not None) != has_features:
            raise ValueError(f"{self.path}: record {record.id!r} {'lacks' if has_features else 'has'} features "
                             f"and earlier records {'have' if has_features else 'do not'}; all or none must")
        if n and (record.proposals is not None) != (self._proposals is not None):
            raise ValueError(f"{self.path}: record {record.id!r} {'has' if record.proposals is not None else 'lacks'} "
                             "proposals and earlier records do not; all or none must")
        if record.features is not None:
            if self._features is None:
                c, h, w = record.features.shape
                self._features = self._file.create_dataset(
                    "features", shape=(0, c, h, w), maxshape=(None, c, h, w), dtype=np.float16,
                    chunks=(1, c, h, w), compression=self._features_compression,
                    shuffle=self._features_compression is not None)
            elif record.features.shape != self._features.shape[1:]:
                raise ValueError(f"{self.path}: features of {record.id!r} have shape {record.features.shape}, "
                                 f"earlier records {self._features.shape[1:]}")
            self._features.resize(n + 1, axis=0)
            self._features[n] = record.features
        self._ids.append(record.id)
        self._seen.add(record.id)
        self._shapes.append(record.shape)
        self._packed.append(pack_mask(record.mask))  # uint8 (ceil(H*W/8),)
        self._prototypes.append(record.prototype)
        self._valid.append(record.valid)
        self._fraction.append(record.salient_fraction)
        if record.proposals is not None:
            if self._proposals is None:
                self._proposals = []
            self._proposals.append([ProposalEmbedding(p.mask, p.prototype, p.valid) for p in record.proposals])

    def __len__(self) -> int:
        return len(self._ids)

    def _finish(self, f: h5py.File) -> None:
        """Write the root attrs and every dataset but the features (already written)."""
        n = len(self._ids)
        version = REGIONS_SCHEMA_VERSION if n and self._proposals is not None else SCHEMA_VERSION
        write_header(f, SCHEMA, version, self._root_attrs, self._ids, self._shapes)
        dim = self._prototypes[0].size if n else 0
        f.create_dataset("prototypes", data=np.array(self._prototypes, dtype=np.float32).reshape(n, dim))
        f.create_dataset("valid", data=np.array(self._valid, dtype=bool).reshape(n))
        f.create_dataset("salient_fraction", data=np.array(self._fraction, dtype=np.float32).reshape(n))
        write_placed(f, "masks", "offsets", self._packed, self._chunk, self._compression)
        if version == REGIONS_SCHEMA_VERSION:
            props = [p for per_image in self._proposals for p in per_image]
            rows = np.zeros(n + 1, dtype=np.int64)
            np.cumsum([len(per_image) for per_image in self._proposals], out=rows[1:])
            f.create_dataset("proposal_rows", data=rows)
            f.create_dataset("proposal_prototypes",
                             data=np.array([p.prototype for p in props], dtype=np.float32).reshape(len(props), dim))
            f.create_dataset("proposal_valid", data=np.array([p.valid for p in props], dtype=bool).reshape(len(props)))
            write_placed(f, "proposal_masks", "proposal_offsets", [pack_mask(p.mask) for p in props], self._chunk,
                         self._compression)

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, file = self._stack, self._file
        self._stack = self._file = self._features = None
        assert stack is not None and file is not None
        try:
            if exc_type is None:
                self._finish(file)
        except BaseException:
            stack.__exit__(*sys.exc_info())  # closes the file; create_shard_file removes it
            raise
        # Clean exit: close, fsync, rename onto the final name; on an exception: remove the temp file.
        return bool(stack.__exit__(exc_type, exc, tb))


def write_embedding_shard(path: str | os.PathLike, records: Sequence[EmbeddingRecord],
                          attrs: Mapping[str, Any] | None = None, **options: Any) -> None:
    """Write ``records`` as one embedding shard at ``path``, atomically. ``attrs``: the writer's
    root attrs (non-scalars JSON-encoded); ``options``: see :class:`EmbeddingShardWriter`."""
    with EmbeddingShardWriter(path, attrs, **options) as writer:
        for record in records:
            writer.add(record)


# --------------------------------------------------------------------------- reading


def read_shard_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Decoded root attrs of a shard (schema, schema_version, count and the writer's attrs)."""
    return _FORMAT.read_attrs(Path(path))


class EmbeddingShardReader(ShardReader[_Index]):
    """Random and sequential access to one embedding shard.

    The index arrays (ids, shapes, offsets, prototypes, valid, salient fraction) are read on
    first access and held in memory; masks and features are read on demand. Picklable: the HDF5
    handle is dropped on pickling and reopened lazily, also in a process forked after it was opened.
    """

    format = _FORMAT
    held_datasets = ("masks", "features", "proposal_masks")

    @property
    def has_features(self) -> bool:
        return self.index.feature_shape is not None

    @property
    def has_proposals(self) -> bool:
        """Whether the shard stores proposals (schema version 2)."""
        return self.index.has_proposals

    def read_regions(self, key: int | str) -> list[ProposalEmbedding]:
        """The regions of row ``key`` or id ``key`` the protocols label (see
        :meth:`EmbeddingStore.regions`), each with its mask and prototype."""
        i = self._row(key)
        idx = self.index
        if not idx.has_proposals:
            return [ProposalEmbedding(self._read_mask(i), idx.prototypes[i].copy(), bool(idx.valid[i]))]
        h, w = idx.shapes[i]
        first, last = idx.proposal_rows[i], idx.proposal_rows[i + 1]
        if first == last:
            return [ProposalEmbedding(np.zeros((h, w), bool), np.zeros_like(idx.prototypes[i]), False)]
        size = packed_size(h, w)
        offsets = idx.proposal_offsets
        block = self._dataset("proposal_masks")[offsets[first]:offsets[last - 1] + size]
        return [ProposalEmbedding(unpack_mask(block[offsets[k] - offsets[first]:offsets[k] - offsets[first] + size], h, w),
                                  idx.proposal_prototypes[k].copy(), bool(idx.proposal_valid[k]))
                for k in range(first, last)]

    def features(self, key: int | str) -> np.ndarray:
        """float16 (C, f, f) features of one row or id (ValueError if the shard has none)."""
        i = self._row(key)
        if not self.has_features:
            raise ValueError(f"{self.path} has no features (extracted without them)")
        return self._dataset("features")[i]

    def _record(self, i: int, mask: np.ndarray, features: bool) -> EmbeddingRecord:
        idx = self.index
        return EmbeddingRecord(idx.ids[i], mask, idx.prototypes[i].copy(), bool(idx.valid[i]),
                               self.features(i) if features else None)

    def get(self, key: int | str, features: bool = False, proposals: bool = False) -> EmbeddingRecord:
        """The record at row ``key`` or with id ``key``; ``features=True`` also reads its features,
        ``proposals=True`` its proposals (version 2; None for a version-1 shard)."""
        i = self._row(key)
        record = self._record(i, self._read_mask(i), features)
        if proposals and self.has_proposals:
            idx = self.index
            record.proposals = ([] if idx.proposal_rows[i] == idx.proposal_rows[i + 1] else self.read_regions(i))
        return record

    def iter(self, features: bool = False) -> Iterator[EmbeddingRecord]:
        """Records in file order, reading blocks of consecutive masks (~1 MiB packed) at a time."""
        if features and not self.has_features and len(self):
            raise ValueError(f"{self.path} has no features (extracted without them)")
        for i, mask in self._iter_masks():
            yield self._record(i, mask, features)


class EmbeddingStore(ShardStore[EmbeddingShardReader]):
    """All embedding shards of one directory, in shard order, read by id. Ignores temp files and
    every other name (manifest.json, skipped.json, the lock). The shard list is taken when the
    store is made. Picklable and fork-safe like :class:`EmbeddingShardReader`.
    """

    reader_type = EmbeddingShardReader
    columns = {"valid": bool, "salient_fraction": np.float32}

    def prototypes(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(ids, prototypes float32 (N, D), valid bool (N,)) from the index arrays only."""
        readers = [r for r in self._readers if len(r)]
        dims = {r.index.prototypes.shape[1] for r in readers}
        if len(dims) > 1:
            raise EmbeddingFormatError(f"{self.directory}: shards hold prototypes of dimensions {sorted(dims)}")
        if not readers:
            return [], np.zeros((0, 0), np.float32), np.zeros(0, bool)
        return (self.ids(), np.concatenate([r.index.prototypes for r in readers]),
                np.concatenate([r.index.valid for r in readers]))

    @property
    def has_features(self) -> bool:
        """True when the store holds at least one image and every image has features."""
        nonempty = [r for r in self._readers if len(r)]
        return bool(nonempty) and all(r.has_features for r in nonempty)

    @property
    def feature_shape(self) -> tuple[int, int, int] | None:
        """(C, f, f) of the stored features, or None without them."""
        if not self.has_features:
            return None
        return next(r.index.feature_shape for r in self._readers if len(r))

    @property
    def attrs(self) -> dict[str, Any]:
        """The first shard's decoded root attrs ({} for an empty store)."""
        return self._readers[0].attrs if self._readers else {}

    def get(self, id: str, features: bool = False, proposals: bool = False) -> EmbeddingRecord:
        """The record of image ``id`` (KeyError if no shard holds it)."""
        reader, row = self._locate(id)
        return reader.get(row, features=features, proposals=proposals)

    @property
    def has_proposals(self) -> bool:
        """Whether any shard stores proposals (schema version 2)."""
        return any(reader.has_proposals for reader in self._readers)

    def regions(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """The regions the K-means and retrieval protocols label, from the index arrays only:
        (ids in store order, counts (N,) regions per image, prototypes (R, D), valid (R,)), the
        regions of image i being rows ``sum(counts[:i])`` on. Version 1: one per image, its
        salient region; version 2: its proposals (one empty, invalid region for an image without
        any)."""
        readers = [r for r in self._readers if len(r)]
        if not readers:
            return [], np.zeros(0, np.int64), np.zeros((0, 0), np.float32), np.zeros(0, bool)
        parts = [r.index.region_rows() for r in readers]
        dims = {p[1].shape[1] for p in parts}
        if len(dims) > 1:
            raise EmbeddingFormatError(f"{self.directory}: shards hold prototypes of dimensions {sorted(dims)}")
        return (self.ids(), np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                np.concatenate([p[2] for p in parts]))

    def proposal_counts(self) -> np.ndarray:
        """int64 (N,) in store order: how many proposals each image stores, from the index arrays
        only (an image of a version-1 shard: 1, its salient region). Tells an image without any
        proposal (0; :meth:`regions` gives it one empty, invalid region) from one whose single
        proposal is invalid."""
        parts = [np.diff(r.index.proposal_rows) if r.index.has_proposals else np.ones(len(r), np.int64)
                 for r in self._readers if len(r)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def read_regions(self, id: str) -> list[ProposalEmbedding]:
        """The regions of image ``id`` with their masks (:meth:`EmbeddingShardReader.read_regions`)."""
        reader, row = self._locate(id)
        return reader.read_regions(row)

    def features(self, id: str) -> np.ndarray:
        """float16 (C, f, f) features of image ``id``."""
        reader, row = self._locate(id)
        return reader.features(row)

    def iter(self, features: bool = False) -> Iterator[EmbeddingRecord]:
        """All records in shard order."""
        for reader in self._readers:
            yield from reader.iter(features=features)


def _storage_bytes(path: Path, name: str) -> int:
    with _FORMAT.open(path) as f:
        return int(f[name].id.get_storage_size()) if name in f else 0


def summarize_embeddings(directory: str | os.PathLike) -> dict[str, Any]:
    """JSON-ready summary of an embedding directory for ``inspect``, from the index arrays only."""
    store = EmbeddingStore(directory)
    t = store.table()
    _, protos, _ = store.prototypes()
    attrs = store.attrs
    return {
        "n_images": int(t["id"].size),
        "n_valid": int(t["valid"].sum()),
        "n_invalid": int((~t["valid"]).sum()),
        "prototype_dim": int(protos.shape[1]) if protos.size else None,
        "salient_fraction": fraction_summary(t["salient_fraction"]),
        "height": int_range(t["height"]),
        "width": int_range(t["width"]),
        "has_features": store.has_features,
        "feature_shape": list(store.feature_shape) if store.feature_shape else None,
        "feature_bytes": sum(_storage_bytes(p, "features") for p in store.shard_paths),
        "n_shards": len(store.shard_paths),
        "bytes_on_disk": int(sum(p.stat().st_size for p in store.shard_paths)),
        "schema_version": attrs.get("schema_version"),
        "attrs": {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS},
        **({"n_proposals": int(sum(len(p) for p in (r.index.proposal_valid for r in store._readers
                                                     if r.index.has_proposals)))}
           if store.has_proposals else {}),
    }
