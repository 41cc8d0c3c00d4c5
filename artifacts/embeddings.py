"""Embedding shards: per image, the prototype, the predicted salient mask and optional features.

Written by the ``extract`` stage, read by ``evaluate`` (K-means and retrieval read the
prototypes; the linear probe and pixel-level K-means read the features; every protocol reads the
salient masks). Layout of ``emb-NNNNN.h5`` (``schema_version`` 1), the id/offset pattern of the
mask shards (:mod:`artifacts.masks`):

- root attrs: ``schema = "maskcontrast/embeddings"``, ``schema_version = 1``, ``count`` (n), the
  writer's own attrs (model description, extract parameters, ...); attrs that are not
  str/int/float/bool are stored as JSON strings and their names listed in ``json_attrs``.
- ``ids`` (utf-8 str, n), ``shapes`` (int32, n x 2: the image's ORIGINAL height, width).
- ``prototypes`` (float32, n x D): L2-normalised; an all-zero row where ``valid`` is False
  (the image has no salient pixel, so its prototype has no direction).
- ``valid`` (bool, n), ``salient_fraction`` (float32, n: share of salient pixels in ``masks``).
- ``masks`` (uint8, flat) + ``offsets`` (int64, n + 1): the salient mask at the image's original
  resolution, bit-packed exactly like mask shards (``np.packbits`` of the row-major mask,
  ``ceil(H * W / 8)`` bytes, placed by :func:`artifacts.masks.place_in_chunks` so a read touches
  the fewest chunks; 32 KiB chunks, gzip).
- optional ``features`` (float16, n x C x f x f): one chunk per image (``1 x C x f x f``),
  byte-shuffled and compressed (gzip by default; the decoder trunk is post-ReLU, so about half its
  values are zeros), so reading one image's features decompresses exactly one chunk.

A shard of zero images (every image of its block was unreadable) is a valid shard: it marks the
block as done. Readers open files lazily, read-only, without a chunk cache, and reopen after
pickling or ``fork`` (DataLoader and dask workers). :class:`EmbeddingShardWriter` streams the
features to the file as records arrive, so a writer holds only the small per-image arrays of a
shard in memory; the file appears under its final name only when complete.
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from artifacts.atomic import atomic_path
from artifacts.masks import (
    MASK_CHUNK_BYTES,
    _attr_value,
    _encode_attrs,
    _flat_dataset,
    _placement_ok,
    _unpack,
    place_in_chunks,
)

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "EmbeddingFormatError",
    "EmbeddingRecord",
    "EmbeddingShardReader",
    "EmbeddingShardWriter",
    "EmbeddingStore",
    "read_shard_attrs",
    "shard_index",
    "shard_name",
    "summarize_embeddings",
    "write_embedding_shard",
]

SCHEMA = "maskcontrast/embeddings"
SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)

_RESERVED_ATTRS = frozenset({"schema", "schema_version", "count", "json_attrs"})
_COMPRESSIONS = ("lzf", "gzip", None)
_SHARD_RE = re.compile(r"^emb-(\d{5,})\.h5$")
_STR = h5py.string_dtype("utf-8")
_ITER_BLOCK_BYTES = 1 << 20  # iteration reads ~1 MiB of consecutive packed masks at a time
_NORM_TOL = 1e-3  # |‖prototype‖ - 1| allowed for a valid prototype (float32 rounding)


class EmbeddingFormatError(ValueError):
    """A file that is not a readable embedding shard: wrong schema, unknown version, or corrupt."""


@dataclass
class EmbeddingRecord:
    """What ``extract`` stores for one image.

    ``mask``: bool (H, W), the predicted (or given) salient region at the image's original
    resolution. ``prototype``: float32 (D,), L2-normalised, or zeros with ``valid=False`` when the
    image has no salient pixel. ``features``: float16 (C, f, f) decoder features, or None.
    """

    id: str
    mask: np.ndarray
    prototype: np.ndarray
    valid: bool
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "\x00" in self.id:
            raise ValueError(f"embedding record id must be a non-empty str without NUL, got {self.id!r}")
        m = self.mask
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.ndim != 2 or 0 in m.shape:
            desc = f"{m.dtype} {m.shape}" if isinstance(m, np.ndarray) else type(m).__name__
            raise ValueError(f"mask of {self.id!r} must be a non-empty bool (H, W) array, got {desc}")
        p = self.prototype
        if not isinstance(p, np.ndarray) or p.dtype != np.float32 or p.ndim != 1 or p.size == 0:
            desc = f"{p.dtype} {p.shape}" if isinstance(p, np.ndarray) else type(p).__name__
            raise ValueError(f"prototype of {self.id!r} must be a non-empty float32 (D,) array, got {desc}")
        self.valid = bool(self.valid)
        if self.valid:
            norm = float(np.linalg.norm(p.astype(np.float64)))
            if not np.isfinite(norm) or abs(norm - 1.0) > _NORM_TOL:
                raise ValueError(f"valid prototype of {self.id!r} must be L2-normalised, its norm is {norm}")
        elif p.any():
            raise ValueError(f"invalid prototype of {self.id!r} must be all zeros")
        f = self.features
        if f is not None and (not isinstance(f, np.ndarray) or f.dtype != np.float16 or f.ndim != 3):
            desc = f"{f.dtype} {f.shape}" if isinstance(f, np.ndarray) else type(f).__name__
            raise ValueError(f"features of {self.id!r} must be a float16 (C, h, w) array, got {desc}")

    @property
    def salient_fraction(self) -> float:
        """Share of salient pixels of ``mask``, in [0, 1]."""
        return float(np.count_nonzero(self.mask)) / self.mask.size

    @property
    def shape(self) -> tuple[int, int]:
        """Original (height, width)."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))


def shard_name(index: int) -> str:
    """File name of embedding shard ``index``: ``emb-00000.h5``."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    return f"emb-{int(index):05d}.h5"


def shard_index(name: str) -> int | None:
    """Inverse of :func:`shard_name`; None for any other name (temp files, manifests, ...)."""
    m = _SHARD_RE.match(name)
    if m is None:
        return None
    index = int(m.group(1))
    return index if shard_name(index) == name else None


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
        for name, value in (("compression", compression), ("features_compression", features_compression)):
            if value not in _COMPRESSIONS:
                raise ValueError(f"{self.path}: {name} must be one of {_COMPRESSIONS}, got {value!r}")
        if not isinstance(mask_chunk_bytes, int) or mask_chunk_bytes < 1:
            raise ValueError(f"{self.path}: mask_chunk_bytes must be a positive int, got {mask_chunk_bytes!r}")
        self._root_attrs = _encode_attrs(self.path, attrs or {})
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

    def __enter__(self) -> EmbeddingShardWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        stack = ExitStack()
        tmp = stack.enter_context(atomic_path(self.path, suffix=".h5"))
        try:
            # libver "earliest": the oldest file format that holds the data, readable by any HDF5
            # tool. No lock: nothing else opens a temp file, and locks fail on some network FS.
            self._file = h5py.File(tmp, "w", libver="earliest", locking=False)
        except BaseException:
            stack.close()
            raise
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
        self._packed.append(np.packbits(record.mask.ravel()))  # uint8 (ceil(H*W/8),)
        self._prototypes.append(record.prototype)
        self._valid.append(record.valid)
        self._fraction.append(record.salient_fraction)

    def __len__(self) -> int:
        return len(self._ids)

    def _finish(self, f: h5py.File) -> None:
        """Write the root attrs and every dataset but the features (already written)."""
        n = len(self._ids)
        f.attrs["schema"] = SCHEMA
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["count"] = n
        for key, value in self._root_attrs.items():
            f.attrs[key] = value
        f.create_dataset("ids", data=np.array(self._ids, dtype=object).reshape(n), dtype=_STR)
        f.create_dataset("shapes", data=np.array(self._shapes, dtype=np.int32).reshape(n, 2))
        dim = self._prototypes[0].size if n else 0
        f.create_dataset("prototypes", data=np.array(self._prototypes, dtype=np.float32).reshape(n, dim))
        f.create_dataset("valid", data=np.array(self._valid, dtype=bool).reshape(n))
        f.create_dataset("salient_fraction", data=np.array(self._fraction, dtype=np.float32).reshape(n))
        # Chunk-aware placement pays only when chunks are decompressed whole; else pack densely.
        offsets = place_in_chunks([p.size for p in self._packed], self._chunk if self._compression else 1)
        f.create_dataset("offsets", data=offsets)
        _flat_dataset(f, "masks", self._packed, offsets, self._chunk, self._compression)

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, file = self._stack, self._file
        self._stack = self._file = self._features = None
        assert stack is not None and file is not None
        try:
            if exc_type is None:
                self._finish(file)
        except BaseException:
            file.close()
            stack.__exit__(*sys.exc_info())  # atomic_path removes the temp file
            raise
        file.close()
        # Clean exit: fsync + rename onto the final name; on an exception: remove the temp file.
        return bool(stack.__exit__(exc_type, exc, tb))


def write_embedding_shard(path: str | os.PathLike, records: Sequence[EmbeddingRecord],
                          attrs: Mapping[str, Any] | None = None, **options: Any) -> None:
    """Write ``records`` as one embedding shard at ``path``, atomically. ``attrs``: the writer's
    root attrs (non-scalars JSON-encoded); ``options``: see :class:`EmbeddingShardWriter`."""
    with EmbeddingShardWriter(path, attrs, **options) as writer:
        for record in records:
            writer.add(record)


# --------------------------------------------------------------------------- reading


def _open(path: Path) -> h5py.File:
    """Open a shard read-only, without a chunk cache (see ``artifacts.masks._open`` on locking)."""
    if not path.is_file():
        raise FileNotFoundError(f"embedding shard not found: {path}")
    try:
        try:
            return h5py.File(path, "r", rdcc_nbytes=0)
        except OSError as e:
            if "lock" not in str(e).lower():
                raise
            return h5py.File(path, "r", rdcc_nbytes=0, locking=False)
    except OSError as e:
        raise EmbeddingFormatError(f"{path}: cannot open as HDF5 ({e})") from None


def _check_version(path: Path, attrs: Mapping[str, Any]) -> int:
    schema = _attr_value(attrs.get("schema"))
    if schema != SCHEMA:
        raise EmbeddingFormatError(f"{path}: not an embedding shard (schema attr {schema!r}, expected {SCHEMA!r})")
    version = _attr_value(attrs.get("schema_version"))
    if version not in READABLE_VERSIONS:
        raise EmbeddingFormatError(f"{path}: schema_version {version!r} of {SCHEMA!r} is not readable by "
                                   f"this code (it reads versions {list(READABLE_VERSIONS)})")
    return int(version)


def _decode_attrs_v1(path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: _attr_value(value) for key, value in raw.items()}
    try:
        for key in json.loads(out.pop("json_attrs", "[]")):
            out[key] = json.loads(out[key])
    except (ValueError, KeyError, TypeError) as e:
        raise EmbeddingFormatError(f"{path}: corrupt JSON-encoded attrs ({e})") from None
    return out


_ATTR_DECODERS = {1: _decode_attrs_v1}


def read_shard_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Decoded root attrs of a shard (schema, schema_version, count and the writer's attrs)."""
    path = Path(path)
    with _open(path) as f:
        return _ATTR_DECODERS[_check_version(path, f.attrs)](path, f.attrs)


@dataclass
class _Index:
    """The per-row arrays of one shard, held in memory by readers (no mask or feature)."""

    ids: list[str]
    shapes: np.ndarray            # int64 (n, 2): original height, width
    offsets: np.ndarray           # int64 (n + 1,): start of each packed mask in `masks`
    prototypes: np.ndarray        # float32 (n, D)
    valid: np.ndarray             # bool (n,)
    salient_fraction: np.ndarray  # float32 (n,)
    feature_shape: tuple[int, int, int] | None  # (C, f, f), None without features

    @property
    def mask_bytes(self) -> np.ndarray:  # int64 (n,)
        return (self.shapes[:, 0] * self.shapes[:, 1] + 7) // 8


def _read_index_v1(path: Path, f: h5py.File) -> _Index:
    try:
        n = int(_attr_value(f.attrs["count"]))
        idx = _Index(
            ids=list(f["ids"].asstr()[()]),
            shapes=f["shapes"][()].astype(np.int64).reshape(-1, 2),
            offsets=f["offsets"][()].astype(np.int64),
            prototypes=f["prototypes"][()].astype(np.float32),
            valid=f["valid"][()].astype(bool),
            salient_fraction=f["salient_fraction"][()].astype(np.float32),
            feature_shape=tuple(int(s) for s in f["features"].shape[1:]) if "features" in f else None,
        )
        n_masks = f["masks"].shape[0]
        n_features = f["features"].shape[0] if "features" in f else None
    except (KeyError, OSError, ValueError, TypeError) as e:
        raise EmbeddingFormatError(f"{path}: corrupt embedding shard ({e})") from None
    problem = None
    if (len(idx.ids) != n or idx.valid.shape != (n,) or idx.salient_fraction.shape != (n,)
            or idx.prototypes.ndim != 2 or idx.prototypes.shape[0] != n):
        problem = f"index lengths differ from count {n}"
    elif idx.shapes.shape != (n, 2) or (idx.shapes <= 0).any():
        problem = f"bad shapes dataset {idx.shapes.shape}"
    elif not _placement_ok(idx.offsets, idx.mask_bytes, n_masks):
        problem = "offsets do not match shapes and the masks dataset"
    elif n_features is not None and (n_features != n or len(idx.feature_shape) != 3):
        problem = f"features dataset holds {n_features} rows of shape {idx.feature_shape}, expected {n}"
    if problem:
        raise EmbeddingFormatError(f"{path}: corrupt embedding shard ({problem})")
    return idx


_INDEX_READERS = {1: _read_index_v1}


class EmbeddingShardReader:
    """Random and sequential access to one embedding shard.

    The index arrays (ids, shapes, offsets, prototypes, valid, salient fraction) are read on
    first access and held in memory; masks and features are read on demand. Picklable: the HDF5
    handle is dropped on pickling and reopened lazily, also in a process forked after it was opened.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._index: _Index | None = None
        self._rows: dict[str, int] | None = None

    # -- handle management
    def _handle(self) -> h5py.File:
        if self._file is not None and self._pid != os.getpid():
            self._drop_handle()  # inherited through fork: HDF5 state is not fork-safe
        if self._file is None:
            f = _open(self.path)
            try:
                version = _check_version(self.path, f.attrs)
                if self._index is None:
                    self._index = _INDEX_READERS[version](self.path, f)
            except BaseException:
                f.close()
                raise
            self._file, self._pid = f, os.getpid()
        return self._file

    def _drop_handle(self) -> None:
        file, self._file = self._file, None
        if file is not None and self._pid == os.getpid():
            file.close()

    @property
    def index(self) -> _Index:
        if self._index is None:
            self._handle()
        assert self._index is not None
        return self._index

    def close(self) -> None:
        """Close the file handle (the reader reopens it if used again)."""
        self._drop_handle()

    def __enter__(self) -> EmbeddingShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __del__(self) -> None:
        # Close only our own process's handle; never one inherited through fork.
        if getattr(self, "_file", None) is not None and self._pid == os.getpid():
            try:
                self._file.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    # -- index
    @property
    def ids(self) -> list[str]:
        return self.index.ids

    @property
    def has_features(self) -> bool:
        return self.index.feature_shape is not None

    @property
    def attrs(self) -> dict[str, Any]:
        """Decoded root attrs."""
        f = self._handle()
        return _ATTR_DECODERS[_check_version(self.path, f.attrs)](self.path, f.attrs)

    def __len__(self) -> int:
        return len(self.index.ids)

    def index_of(self, id: str) -> int:
        """Row of ``id`` in this shard (KeyError if absent)."""
        if self._rows is None:
            self._rows = {k: i for i, k in enumerate(self.index.ids)}
        try:
            return self._rows[id]
        except KeyError:
            raise KeyError(f"id {id!r} not in embedding shard {self.path}") from None

    def __repr__(self) -> str:
        return f"EmbeddingShardReader({str(self.path)!r})"

    # -- records
    def _row(self, key: int | str) -> int:
        if isinstance(key, str):
            return self.index_of(key)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"row {key} out of range for {n} records in {self.path}")
            return int(key) % n
        raise TypeError(f"key must be a row (int) or an id (str), got {type(key).__name__}")

    def features(self, key: int | str) -> np.ndarray:
        """float16 (C, f, f) features of one row or id (ValueError if the shard has none)."""
        i = self._row(key)
        if not self.has_features:
            raise ValueError(f"{self.path} has no features (extracted without them)")
        return self._handle()["features"][i]

    def _record(self, i: int, mask: np.ndarray, features: bool) -> EmbeddingRecord:
        idx = self.index
        return EmbeddingRecord(idx.ids[i], mask, idx.prototypes[i].copy(), bool(idx.valid[i]),
                               self.features(i) if features else None)

    def get(self, key: int | str, features: bool = False) -> EmbeddingRecord:
        """The record at row ``key`` or with id ``key``; ``features=True`` also reads its features."""
        i = self._row(key)
        idx = self.index
        h, w = idx.shapes[i]
        start = idx.offsets[i]
        mask = _unpack(self._handle()["masks"][start:start + (h * w + 7) // 8], h, w)
        return self._record(i, mask, features)

    def __getitem__(self, key: int | str) -> EmbeddingRecord:
        return self.get(key)

    def iter(self, features: bool = False) -> Iterator[EmbeddingRecord]:
        """Records in file order, reading blocks of consecutive masks (~1 MiB packed) at a time."""
        idx = self.index
        if features and not self.has_features and len(self):
            raise ValueError(f"{self.path} has no features (extracted without them)")
        n, start = len(idx.ids), 0
        while start < n:
            stop = int(np.searchsorted(idx.offsets, idx.offsets[start] + _ITER_BLOCK_BYTES, "right")) - 1
            stop = min(max(stop, start + 1), n)
            block = self._handle()["masks"][idx.offsets[start]:idx.offsets[stop]]
            for i in range(start, stop):
                h, w = idx.shapes[i]
                a = idx.offsets[i] - idx.offsets[start]
                yield self._record(i, _unpack(block[a:a + (h * w + 7) // 8], h, w), features)
            start = stop

    def __iter__(self) -> Iterator[EmbeddingRecord]:
        return self.iter()


class EmbeddingStore:
    """All embedding shards of one directory, in shard order, read by id. Ignores temp files and
    every other name (manifest.json, skipped.json, the lock). The shard list is taken when the
    store is made. Picklable and fork-safe like :class:`EmbeddingShardReader`.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"embedding store directory not found: {self.directory}")
        found = []
        for entry in os.scandir(self.directory):
            k = shard_index(entry.name)
            if k is not None and entry.is_file():
                found.append((k, Path(entry.path)))
        found.sort()
        self._shard_numbers = [k for k, _ in found]
        self._readers = [EmbeddingShardReader(p) for _, p in found]
        self._where: dict[str, tuple[int, int]] | None = None

    @property
    def shard_paths(self) -> list[Path]:
        return [r.path for r in self._readers]

    def _map(self) -> dict[str, tuple[int, int]]:
        if self._where is None:
            where: dict[str, tuple[int, int]] = {}
            for s, reader in enumerate(self._readers):
                for row, id in enumerate(reader.ids):
                    prev = where.setdefault(id, (s, row))
                    if prev != (s, row):
                        raise EmbeddingFormatError(f"id {id!r} is in both {self._readers[prev[0]].path} "
                                                   f"and {reader.path}")
            self._where = where
        return self._where

    def ids(self) -> list[str]:
        """All ids in shard order."""
        return [id for reader in self._readers for id in reader.ids]

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

    def table(self) -> dict[str, np.ndarray]:
        """Per-image columns from the index arrays only: id, shard (file number), row, height,
        width, valid, salient_fraction."""
        cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                             ("id", "shard", "row", "height", "width", "valid", "salient_fraction")}
        for number, reader in zip(self._shard_numbers, self._readers):
            idx = reader.index
            n = len(idx.ids)
            cols["id"].append(np.array(idx.ids, dtype=object).reshape(n))
            cols["shard"].append(np.full(n, number, dtype=np.int32))
            cols["row"].append(np.arange(n, dtype=np.int32))
            cols["height"].append(idx.shapes[:, 0].astype(np.int32))
            cols["width"].append(idx.shapes[:, 1].astype(np.int32))
            cols["valid"].append(idx.valid)
            cols["salient_fraction"].append(idx.salient_fraction)
        empty = {"id": object, "shard": np.int32, "row": np.int32, "height": np.int32, "width": np.int32,
                 "valid": bool, "salient_fraction": np.float32}
        return {k: np.concatenate(v) if v else np.zeros(0, dtype=empty[k]) for k, v in cols.items()}

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

    def get(self, id: str, features: bool = False) -> EmbeddingRecord:
        """The record of image ``id`` (KeyError if no shard holds it)."""
        s, row = self._locate(id)
        return self._readers[s].get(row, features=features)

    def features(self, id: str) -> np.ndarray:
        """float16 (C, f, f) features of image ``id``."""
        s, row = self._locate(id)
        return self._readers[s].features(row)

    def _locate(self, id: str) -> tuple[int, int]:
        try:
            return self._map()[id]
        except KeyError:
            raise KeyError(f"id {id!r} not in embedding store {self.directory}") from None

    def __getitem__(self, id: str) -> EmbeddingRecord:
        return self.get(id)

    def __contains__(self, id: object) -> bool:
        return id in self._map()

    def __len__(self) -> int:
        return sum(len(r) for r in self._readers)

    def iter(self, features: bool = False) -> Iterator[EmbeddingRecord]:
        """All records in shard order."""
        for reader in self._readers:
            yield from reader.iter(features=features)

    def __iter__(self) -> Iterator[EmbeddingRecord]:
        return self.iter()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.directory)!r}, {len(self._readers)} shards)"


def _storage_bytes(path: Path, name: str) -> int:
    with _open(path) as f:
        return int(f[name].id.get_storage_size()) if name in f else 0


def summarize_embeddings(directory: str | os.PathLike) -> dict[str, Any]:
    """JSON-ready summary of an embedding directory for ``inspect``, from the index arrays only."""
    store = EmbeddingStore(directory)
    t = store.table()
    frac = t["salient_fraction"].astype(np.float64)
    counts, edges = np.histogram(frac, bins=10, range=(0.0, 1.0))
    _, protos, _ = store.prototypes()
    attrs = store.attrs
    writer_attrs = {k: v for k, v in attrs.items() if k not in _RESERVED_ATTRS}

    def _range(col: np.ndarray) -> dict[str, int | None]:
        return {"min": int(col.min()) if col.size else None, "max": int(col.max()) if col.size else None}

    return {
        "n_images": int(t["id"].size),
        "n_valid": int(t["valid"].sum()),
        "n_invalid": int((~t["valid"]).sum()),
        "prototype_dim": int(protos.shape[1]) if protos.size else None,
        "salient_fraction": {
            "bin_edges": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts],
            "mean": float(frac.mean()) if frac.size else None,
            "median": float(np.median(frac)) if frac.size else None,
        },
        "height": _range(t["height"]),
        "width": _range(t["width"]),
        "has_features": store.has_features,
        "feature_shape": list(store.feature_shape) if store.feature_shape else None,
        "feature_bytes": sum(_storage_bytes(p, "features") for p in store.shard_paths),
        "n_shards": len(store.shard_paths),
        "bytes_on_disk": int(sum(p.stat().st_size for p in store.shard_paths)),
        "schema_version": attrs.get("schema_version"),
        "attrs": writer_attrs,
    }
