"""Mask shards: one HDF5 file per block of images holding one binary saliency mask per image.

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
  to almost nothing), so a random read decompresses no chunk it does not need.
- optional ``soft`` (uint8, flat, saliency map * 255 row-major, ``H * W`` bytes each) with
  ``soft_offsets`` (int64, n + 1), placed the same way.
- ``fg_fraction`` (float32, n), ``kept`` (bool, n), ``reason`` (utf-8 str, n; "" when kept).

Dropped images keep their mask, so inspection can show what was dropped and why.
Readers open files lazily and read-only, without a chunk cache (random reads over a training set
almost never hit it, and it would hold masks in every worker's memory), and reopen after
pickling or ``fork`` so they work in DataLoader workers.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from artifacts.atomic import atomic_path

__all__ = [
    "MASK_CHUNK_BYTES",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SOFT_CHUNK_BYTES",
    "MaskFormatError",
    "MaskRecord",
    "MaskShardReader",
    "MaskStore",
    "place_in_chunks",
    "read_shard_attrs",
    "shard_index",
    "shard_name",
    "summarize_masks",
    "write_mask_shard",
]

SCHEMA = "maskcontrast/masks"
SCHEMA_VERSION = 1
READABLE_VERSIONS = (1,)

# Chunk sizes in bytes, measured with `python benchmarks/bench_mask_io.py --sweep`.
MASK_CHUNK_BYTES = 32 * 1024  # a 512x512 mask is exactly one chunk
SOFT_CHUNK_BYTES = 64 * 1024

_RESERVED_ATTRS = frozenset({"schema", "schema_version", "count", "json_attrs"})
_COMPRESSIONS = ("lzf", "gzip", None)
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.h5$")
_STR = h5py.string_dtype("utf-8")
# Iteration reads blocks of consecutive masks of about this many packed bytes at a time.
_ITER_BLOCK_BYTES = 1 << 20


class MaskFormatError(ValueError):
    """A file that is not a readable mask shard: wrong schema, unknown version, or corrupt."""


@dataclass
class MaskRecord:
    """One image's mask proposal.

    ``mask``: bool (H, W) at the image's original resolution. ``soft``: uint8 (H, W) saliency map
    * 255, or None. ``kept`` is False for images the stage dropped, ``reason`` says why ("" when
    kept), e.g. ``"fg<0.01"``, ``"fg>0.99"``, ``"unreadable: ..."``.
    """

    id: str
    mask: np.ndarray
    soft: np.ndarray | None = None
    kept: bool = True
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "\x00" in self.id:
            raise ValueError(f"mask record id must be a non-empty str without NUL, got {self.id!r}")
        m = self.mask
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.ndim != 2 or 0 in m.shape:
            desc = f"{m.dtype} {m.shape}" if isinstance(m, np.ndarray) else type(m).__name__
            raise ValueError(f"mask of {self.id!r} must be a non-empty bool (H, W) array, got {desc}")
        s = self.soft
        if s is not None and (not isinstance(s, np.ndarray) or s.dtype != np.uint8 or s.shape != m.shape):
            desc = f"{s.dtype} {s.shape}" if isinstance(s, np.ndarray) else type(s).__name__
            raise ValueError(f"soft map of {self.id!r} must be uint8 {m.shape} like its mask, got {desc}")
        if not isinstance(self.reason, str) or "\x00" in self.reason:
            raise ValueError(f"reason of {self.id!r} must be a str without NUL, got {self.reason!r}")
        if self.kept and self.reason:
            raise ValueError(f"record {self.id!r} is kept but has a drop reason {self.reason!r}")

    @property
    def fg_fraction(self) -> float:
        """Share of foreground pixels, in [0, 1]."""
        return float(np.count_nonzero(self.mask)) / self.mask.size

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width)."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.h5``."""
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
        raise ValueError(f"shard index must be a non-negative int, got {index!r}")
    return f"shard-{int(index):05d}.h5"


def shard_index(name: str) -> int | None:
    """Inverse of :func:`shard_name`; None for any other name (temp files, manifests, ...)."""
    m = _SHARD_RE.match(name)
    if m is None:
        return None
    index = int(m.group(1))
    return index if shard_name(index) == name else None


# --------------------------------------------------------------------------- writing


def _encode_attrs(path: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """HDF5-storable root attrs: scalars as they are, anything else as a JSON string."""
    out: dict[str, Any] = {}
    json_names = []
    for key, value in attrs.items():
        if not isinstance(key, str) or key in _RESERVED_ATTRS:
            raise ValueError(f"{path}: attr name {key!r} is reserved or not a str "
                             f"(reserved: {sorted(_RESERVED_ATTRS)})")
        if isinstance(value, (bool, np.bool_, int, float, np.integer, np.floating)):
            out[key] = value
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValueError(f"{path}: attr {key!r} contains NUL")
            out[key] = value
        else:
            if isinstance(value, np.ndarray):
                value = value.tolist()
            try:
                out[key] = json.dumps(value, sort_keys=True)
            except TypeError as e:
                raise ValueError(f"{path}: attr {key!r} is not JSON-serialisable: {e}") from None
            json_names.append(key)
    out["json_attrs"] = json.dumps(sorted(json_names))
    return out


def place_in_chunks(sizes: Sequence[int], chunk: int) -> np.ndarray:
    """Start offsets (int64, n + 1; the last is the total length) for items of ``sizes`` bytes
    laid out in order so that each touches the fewest chunks of ``chunk`` bytes it can:
    an item goes right after the previous one unless it would then touch an extra chunk, in
    which case it starts at the next chunk boundary."""
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    pos = 0
    for i, size in enumerate(sizes):
        fewest = -(-size // chunk)
        if (pos % chunk + size + chunk - 1) // chunk > fewest:
            pos = -(-pos // chunk) * chunk
        offsets[i] = pos
        pos += size
    offsets[-1] = pos
    return offsets


def _flat_dataset(f: h5py.File, name: str, parts: Sequence[np.ndarray], offsets: np.ndarray,
                  chunk_bytes: int, compression: str | None) -> None:
    """Write uint8 ``parts`` at ``offsets`` into one flat dataset, part by part (gaps keep the
    fill value 0). Compressed data is chunked; uncompressed data is contiguous."""
    total = int(offsets[-1])
    chunks = (min(chunk_bytes, total),) if compression and total else None
    ds = f.create_dataset(name, shape=(total,), dtype=np.uint8, fillvalue=0, chunks=chunks,
                          compression=compression if chunks else None)
    for part, start in zip(parts, offsets):
        ds[start:start + part.size] = part


def write_mask_shard(path: str | os.PathLike, records: Sequence[MaskRecord],
                     attrs: Mapping[str, Any] | None = None, compression: str | None = "gzip", *,
                     mask_chunk_bytes: int = MASK_CHUNK_BYTES,
                     soft_chunk_bytes: int = SOFT_CHUNK_BYTES) -> None:
    """Write ``records`` as one mask shard at ``path``, atomically (temp name, fsync, rename).

    ``attrs``: the writer's root attrs (estimator name, parameters, model sha256, ...); values
    that are not str/int/float/bool are JSON-encoded. ``compression``: "lzf" (fast), "gzip"
    (as fast here on bit-packed masks, a third smaller, and readable by every HDF5 tool without
    a plugin) or None (contiguous, fastest reads, ~7x the disk). ``mask_chunk_bytes`` and
    ``soft_chunk_bytes`` set the chunk sizes of compressed data. Either every record has a soft
    map or none does.
    """
    path = Path(path)
    if compression not in _COMPRESSIONS:
        raise ValueError(f"{path}: compression must be one of {_COMPRESSIONS}, got {compression!r}")
    for name, value in (("mask_chunk_bytes", mask_chunk_bytes), ("soft_chunk_bytes", soft_chunk_bytes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {name} must be a positive int, got {value!r}")
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
    root_attrs = _encode_attrs(path, attrs or {})

    n = len(records)
    shapes = np.array([r.shape for r in records], dtype=np.int32).reshape(n, 2)
    packed = [np.packbits(r.mask.ravel()) for r in records]  # each: uint8 (ceil(H*W/8),)
    # Chunk-aware placement pays only when chunks are decompressed whole; else pack densely.
    offsets = place_in_chunks([p.size for p in packed], mask_chunk_bytes if compression else 1)
    fg = np.array([r.fg_fraction for r in records], dtype=np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".h5") as tmp:
        # libver "earliest": the oldest file format that holds the data, readable by any HDF5 tool.
        # No lock: nothing else opens a temp file, and locks fail on some network file systems.
        with h5py.File(tmp, "w", libver="earliest", locking=False) as f:
            f.attrs["schema"] = SCHEMA
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["count"] = n
            for key, value in root_attrs.items():
                f.attrs[key] = value
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=_STR)
            f.create_dataset("shapes", data=shapes)
            f.create_dataset("offsets", data=offsets)
            _flat_dataset(f, "masks", packed, offsets, mask_chunk_bytes, compression)
            if n and n_soft == n:
                soft = [r.soft.ravel() for r in records]  # each: uint8 (H*W,)
                soft_offsets = place_in_chunks([s.size for s in soft], soft_chunk_bytes if compression else 1)
                f.create_dataset("soft_offsets", data=soft_offsets)
                _flat_dataset(f, "soft", soft, soft_offsets, soft_chunk_bytes, compression)
            f.create_dataset("fg_fraction", data=fg)
            f.create_dataset("kept", data=np.array([r.kept for r in records], dtype=bool))
            f.create_dataset("reason", data=np.array([r.reason for r in records], dtype=object),
                             dtype=_STR)


# --------------------------------------------------------------------------- reading


def _open(path: Path) -> h5py.File:
    """Open a shard read-only, without a chunk cache.

    HDF5's default file locking is kept, so the same file can be opened elsewhere in this
    process with default settings; where locking fails (some network file systems, or an
    earlier open of the same file with ``locking=False``) the file is opened without a lock,
    which is safe because shards never change after their atomic rename.
    """
    if not path.is_file():
        raise FileNotFoundError(f"mask shard not found: {path}")
    try:
        try:
            return h5py.File(path, "r", rdcc_nbytes=0)
        except OSError as e:
            if "lock" not in str(e).lower():
                raise
            return h5py.File(path, "r", rdcc_nbytes=0, locking=False)
    except OSError as e:
        raise MaskFormatError(f"{path}: cannot open as HDF5 ({e})") from None


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_version(path: Path, attrs: Mapping[str, Any]) -> int:
    schema = _attr_value(attrs.get("schema"))
    if schema != SCHEMA:
        raise MaskFormatError(f"{path}: not a mask shard (schema attr {schema!r}, expected {SCHEMA!r})")
    version = _attr_value(attrs.get("schema_version"))
    if version not in READABLE_VERSIONS:
        raise MaskFormatError(f"{path}: schema_version {version!r} of {SCHEMA!r} is not readable by "
                              f"this code (it reads versions {list(READABLE_VERSIONS)})")
    return int(version)


def _decode_attrs_v1(path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: _attr_value(value) for key, value in raw.items()}
    try:
        json_names = json.loads(out.pop("json_attrs", "[]"))
        for key in json_names:
            out[key] = json.loads(out[key])
    except (ValueError, KeyError, TypeError) as e:
        raise MaskFormatError(f"{path}: corrupt JSON-encoded attrs ({e})") from None
    return out


_ATTR_DECODERS = {1: _decode_attrs_v1}


def _attrs_of(path: Path, f: h5py.File) -> dict[str, Any]:
    version = _check_version(path, f.attrs)
    return _ATTR_DECODERS[version](path, f.attrs)


def read_shard_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """Decoded root attrs of a shard (schema, schema_version, count and the writer's attrs)."""
    path = Path(path)
    with _open(path) as f:
        return _attrs_of(path, f)


@dataclass
class _Index:
    """The small per-row arrays of one shard, kept in memory by readers."""

    ids: list[str]
    shapes: np.ndarray       # int64 (n, 2): height, width
    offsets: np.ndarray      # int64 (n + 1,): start of each packed mask in `masks`
    soft_offsets: np.ndarray | None  # int64 (n + 1,): start of each soft map in `soft`, or None
    fg_fraction: np.ndarray  # float32 (n,)
    kept: np.ndarray         # bool (n,)
    reason: list[str]

    @property
    def mask_bytes(self) -> np.ndarray:  # int64 (n,)
        return (self.shapes[:, 0] * self.shapes[:, 1] + 7) // 8


def _placement_ok(offsets: np.ndarray, sizes: np.ndarray, length: int) -> bool:
    """Items of ``sizes`` at ``offsets`` lie in order, without overlap, inside ``length``."""
    n = sizes.size
    return (offsets.shape == (n + 1,) and offsets[0] >= 0 and offsets[-1] == length
            and bool((offsets[:-1] + sizes <= offsets[1:]).all()))


def _read_index_v1(path: Path, f: h5py.File) -> _Index:
    try:
        n = int(_attr_value(f.attrs["count"]))
        idx = _Index(
            ids=list(f["ids"].asstr()[()]),
            shapes=f["shapes"][()].astype(np.int64),
            offsets=f["offsets"][()].astype(np.int64),
            soft_offsets=f["soft_offsets"][()].astype(np.int64) if "soft_offsets" in f else None,
            fg_fraction=f["fg_fraction"][()],
            kept=f["kept"][()].astype(bool),
            reason=list(f["reason"].asstr()[()]),
        )
        n_masks = f["masks"].shape[0]
        n_soft = f["soft"].shape[0] if "soft" in f else None
    except (KeyError, OSError, ValueError, TypeError) as e:
        raise MaskFormatError(f"{path}: corrupt mask shard ({e})") from None
    problem = None
    if len(idx.ids) != n or len(idx.reason) != n or idx.fg_fraction.shape != (n,) or idx.kept.shape != (n,):
        problem = f"index lengths differ from count {n}"
    elif idx.shapes.shape != (n, 2) or (idx.shapes <= 0).any():
        problem = f"bad shapes dataset {idx.shapes.shape}"
    elif not _placement_ok(idx.offsets, idx.mask_bytes, n_masks):
        problem = "offsets do not match shapes and the masks dataset"
    elif (idx.soft_offsets is None) != (n_soft is None) or (
            idx.soft_offsets is not None
            and not _placement_ok(idx.soft_offsets, idx.shapes[:, 0] * idx.shapes[:, 1], n_soft)):
        problem = "soft_offsets do not match shapes and the soft dataset"
    if problem:
        raise MaskFormatError(f"{path}: corrupt mask shard ({problem})")
    return idx


_INDEX_READERS = {1: _read_index_v1}


def _unpack(packed: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bit-packed uint8 bytes -> bool (h, w)."""
    return np.unpackbits(packed, count=h * w).view(np.bool_).reshape(h, w)


class MaskShardReader:
    """Random and sequential access to one shard.

    The file is opened on first access and the index arrays (ids, shapes, offsets, fg fraction,
    kept, reason) are held in memory; masks are read on demand. Picklable: the HDF5 handle is
    dropped on pickling and reopened lazily, also in a process forked after it was opened.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._masks: h5py.Dataset | None = None
        self._soft: h5py.Dataset | None = None
        self._index: _Index | None = None
        self._rows: dict[str, int] | None = None

    # -- handle management
    def _handle(self) -> h5py.File:
        if self._file is not None and self._pid != os.getpid():
            # Inherited through fork: HDF5 state is not fork-safe, open our own handle.
            self._drop_handle()
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
            self._masks = f["masks"]
            self._soft = f["soft"] if "soft" in f else None
        return self._file

    def _drop_handle(self) -> None:
        file, self._file, self._masks, self._soft = self._file, None, None, None
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

    def __enter__(self) -> MaskShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _masks=None, _soft=None)
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
    def has_soft(self) -> bool:
        return self.index.soft_offsets is not None

    def __len__(self) -> int:
        return len(self.index.ids)

    def index_of(self, id: str) -> int:
        """Row of ``id`` in this shard (KeyError if absent)."""
        if self._rows is None:
            self._rows = {k: i for i, k in enumerate(self.index.ids)}
        try:
            return self._rows[id]
        except KeyError:
            raise KeyError(f"id {id!r} not in mask shard {self.path}") from None

    def __repr__(self) -> str:
        return f"MaskShardReader({str(self.path)!r})"

    # -- masks
    def _row(self, key: int | str) -> int:
        if isinstance(key, str):
            return self.index_of(key)
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            n = len(self)
            if not -n <= key < n:
                raise IndexError(f"row {key} out of range for {n} records in {self.path}")
            return int(key) % n
        raise TypeError(f"key must be a row (int) or an id (str), got {type(key).__name__}")

    def _record(self, i: int, mask: np.ndarray, soft: np.ndarray | None) -> MaskRecord:
        idx = self.index
        return MaskRecord(idx.ids[i], mask, soft, bool(idx.kept[i]), idx.reason[i])

    def _read_soft(self, i: int) -> np.ndarray:
        idx = self.index
        if idx.soft_offsets is None:
            raise ValueError(f"{self.path} has no soft maps (written without them)")
        self._handle()
        h, w = idx.shapes[i]
        start = idx.soft_offsets[i]
        return self._soft[start:start + h * w].reshape(h, w)

    def get(self, key: int | str, soft: bool = False) -> MaskRecord:
        """The record at row ``key`` or with id ``key``; ``soft=True`` also reads the soft map."""
        i = self._row(key)
        self._handle()
        idx = self.index
        h, w = idx.shapes[i]
        start = idx.offsets[i]
        mask = _unpack(self._masks[start:start + (h * w + 7) // 8], h, w)
        return self._record(i, mask, self._read_soft(i) if soft else None)

    def __getitem__(self, key: int | str) -> MaskRecord:
        return self.get(key)

    def iter(self, soft: bool = False) -> Iterator[MaskRecord]:
        """Records in file order, reading blocks of consecutive masks (~1 MiB packed) at a time."""
        idx = self.index
        if soft and idx.soft_offsets is None:
            raise ValueError(f"{self.path} has no soft maps (written without them)")
        n, start = len(idx.ids), 0
        while start < n:
            # One block: at least one mask, at most _ITER_BLOCK_BYTES of packed masks.
            stop = int(np.searchsorted(idx.offsets, idx.offsets[start] + _ITER_BLOCK_BYTES, "right")) - 1
            stop = min(max(stop, start + 1), n)
            self._handle()
            block = self._masks[idx.offsets[start]:idx.offsets[stop]]
            for i in range(start, stop):
                h, w = idx.shapes[i]
                a = idx.offsets[i] - idx.offsets[start]
                yield self._record(i, _unpack(block[a:a + (h * w + 7) // 8], h, w),
                                   self._read_soft(i) if soft else None)
            start = stop

    def __iter__(self) -> Iterator[MaskRecord]:
        return self.iter()


class MaskStore:
    """All shards of one directory, read by id. Ignores temp files and every non-shard name
    (manifest.json, the lock, reports). The shard list is taken when the store is made.

    Picklable and fork-safe like :class:`MaskShardReader`; the id -> (shard, row) map is built
    lazily from the shards' index arrays and travels with the pickle once built.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"mask store directory not found: {self.directory}")
        found = []
        for entry in os.scandir(self.directory):
            k = shard_index(entry.name)
            if k is not None and entry.is_file():  # shard_index rejects temp names
                found.append((k, Path(entry.path)))
        found.sort()
        self._shard_numbers = [k for k, _ in found]
        self._readers = [MaskShardReader(p) for _, p in found]
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
                        raise MaskFormatError(f"id {id!r} is in both {self._readers[prev[0]].path} "
                                              f"and {reader.path}")
            self._where = where
        return self._where

    def ids(self, kept_only: bool = False) -> list[str]:
        """All ids in shard order (only those of kept images with ``kept_only``)."""
        out: list[str] = []
        for reader in self._readers:
            idx = reader.index
            out.extend(idx.ids if not kept_only else [k for k, kp in zip(idx.ids, idx.kept) if kp])
        return out

    def table(self) -> dict[str, np.ndarray]:
        """Per-image columns from the index arrays only (no mask is read): id, shard (the shard's
        file number), row, height, width, fg_fraction, kept, reason."""
        cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                             ("id", "shard", "row", "height", "width", "fg_fraction", "kept", "reason")}
        for number, reader in zip(self._shard_numbers, self._readers):
            idx = reader.index
            n = len(idx.ids)
            cols["id"].append(np.array(idx.ids, dtype=object).reshape(n))
            cols["shard"].append(np.full(n, number, dtype=np.int32))
            cols["row"].append(np.arange(n, dtype=np.int32))
            cols["height"].append(idx.shapes[:, 0].astype(np.int32))
            cols["width"].append(idx.shapes[:, 1].astype(np.int32))
            cols["fg_fraction"].append(idx.fg_fraction.astype(np.float32))
            cols["kept"].append(idx.kept.astype(bool))
            cols["reason"].append(np.array(idx.reason, dtype=object).reshape(n))
        empty = {"id": object, "shard": np.int32, "row": np.int32, "height": np.int32, "width": np.int32,
                 "fg_fraction": np.float32, "kept": bool, "reason": object}
        return {k: np.concatenate(v) if v else np.zeros(0, dtype=empty[k]) for k, v in cols.items()}

    def get(self, id: str, soft: bool = False) -> MaskRecord:
        """The record of image ``id`` (KeyError if no shard holds it)."""
        try:
            s, row = self._map()[id]
        except KeyError:
            raise KeyError(f"id {id!r} not in mask store {self.directory}") from None
        return self._readers[s].get(row, soft=soft)

    def __getitem__(self, id: str) -> MaskRecord:
        return self.get(id)

    def __contains__(self, id: object) -> bool:
        return id in self._map()

    def __len__(self) -> int:
        return sum(len(r) for r in self._readers)

    def __iter__(self) -> Iterator[MaskRecord]:
        for reader in self._readers:
            yield from reader

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self) -> MaskStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MaskStore({str(self.directory)!r}, {len(self._readers)} shards)"


def summarize_masks(directory: str | os.PathLike) -> dict[str, Any]:
    """JSON-ready summary of a mask directory for ``inspect``, from the index arrays only.

    Histogram and mean/median of fg_fraction are over all images (kept and dropped);
    ``bytes_on_disk`` counts the shard files; ``estimator`` holds the first shard's writer attrs.
    """
    store = MaskStore(directory)
    t = store.table()
    fg = t["fg_fraction"].astype(np.float64)
    counts, edges = np.histogram(fg, bins=10, range=(0.0, 1.0))
    reasons, reason_counts = np.unique(t["reason"][~t["kept"]].astype(str), return_counts=True)
    estimator: dict[str, Any] = {}
    schema_version = None
    if store.shard_paths:
        attrs = read_shard_attrs(store.shard_paths[0])
        schema_version = attrs["schema_version"]
        estimator = {k: v for k, v in attrs.items() if k not in _RESERVED_ATTRS}

    def _range(col: np.ndarray) -> dict[str, int | None]:
        return {"min": int(col.min()) if col.size else None, "max": int(col.max()) if col.size else None}

    return {
        "n_images": int(t["id"].size),
        "n_kept": int(t["kept"].sum()),
        "n_dropped": int((~t["kept"]).sum()),
        "dropped_by_reason": {str(r): int(c) for r, c in zip(reasons, reason_counts)},
        "fg_fraction": {
            "bin_edges": [round(float(e), 6) for e in edges],
            "counts": [int(c) for c in counts],
            "mean": float(fg.mean()) if fg.size else None,
            "median": float(np.median(fg)) if fg.size else None,
        },
        "height": _range(t["height"]),
        "width": _range(t["width"]),
        "n_shards": len(store.shard_paths),
        "bytes_on_disk": int(sum(p.stat().st_size for p in store.shard_paths)),
        "schema_version": schema_version,
        "estimator": estimator,
    }
