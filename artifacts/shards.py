"""What mask shards (:mod:`artifacts.masks`) and embedding shards (:mod:`artifacts.embeddings`)
share: one HDF5 file per block of images, per-image records laid out CSR style.

The common layout (each format adds its own per-row datasets and documents them):

- file name ``<prefix>-NNNNN.h5`` (five or more digits; ``shard-`` for masks, ``emb-`` for
  embeddings);
- root attrs ``schema``, ``schema_version``, ``count`` (n) and the writer's own attrs; attrs that
  are not str/int/float/bool are stored as JSON strings and their names listed in ``json_attrs``;
- ``ids`` (utf-8 str, n), ``shapes`` (int32, n x 2: the image's original height, width);
- ``masks`` (uint8, flat) + ``offsets`` (int64, n + 1, ``offsets[n] == len(masks)``): mask i is
  ``np.packbits`` of the row-major bool mask (8 pixels per byte, most significant bit first, last
  byte zero-padded), ``ceil(H * W / 8)`` bytes at ``offsets[i]``. Compressed data is chunked and
  each item placed to touch the fewest chunks its size allows (:func:`place_in_chunks`), so a
  random read decompresses no chunk it does not need; uncompressed data is contiguous and dense.

Writers write under a temp name and rename when whole (:func:`create_shard_file`). Readers
(:class:`ShardReader`) open a file lazily, read-only, without a chunk cache (random reads over a
training set almost never hit it, and it would hold data in every worker's memory), hold the
per-row index arrays in memory, and reopen after pickling or ``fork`` (DataLoader, dask workers).
"""
from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import h5py
import numpy as np

from artifacts.atomic import atomic_path

__all__ = [
    "COMPRESSIONS",
    "ITER_BLOCK_BYTES",
    "MASK_CHUNK_BYTES",
    "RESERVED_ATTRS",
    "UTF8",
    "ShardFormat",
    "ShardIndex",
    "ShardReader",
    "ShardRecord",
    "ShardStore",
    "attr_value",
    "check_chunk_bytes",
    "check_compression",
    "create_shard_file",
    "describe_array",
    "encode_attrs",
    "fraction_summary",
    "int_range",
    "pack_mask",
    "packed_size",
    "place_in_chunks",
    "placement_ok",
    "unpack_mask",
    "write_header",
    "write_placed",
]

# Chunk size of packed masks, measured with `python benchmarks/bench_mask_io.py --sweep`.
MASK_CHUNK_BYTES = 32 * 1024  # a 512x512 mask is exactly one chunk
# In-order iteration reads blocks of consecutive packed masks of about this many bytes.
ITER_BLOCK_BYTES = 1 << 20
COMPRESSIONS = ("lzf", "gzip", None)
RESERVED_ATTRS = frozenset({"schema", "schema_version", "count", "json_attrs"})
UTF8 = h5py.string_dtype("utf-8")


def describe_array(x: object) -> str:
    """``"dtype shape"`` of an array, else the type's name (for error messages)."""
    return f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__


# --------------------------------------------------------------------------- records


@dataclass
class ShardRecord:
    """The part of a record every shard holds: a non-empty id and a non-empty bool (H, W) mask at
    the image's original resolution. Formats subclass it with their own fields."""

    id: str
    mask: np.ndarray
    _kind: ClassVar[str] = "shard"  # names the record in error messages: "<kind> record id ..."

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id or "\x00" in self.id:
            raise ValueError(f"{self._kind} record id must be a non-empty str without NUL, got {self.id!r}")
        m = self.mask
        if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.ndim != 2 or 0 in m.shape:
            raise ValueError(f"mask of {self.id!r} must be a non-empty bool (H, W) array, "
                             f"got {describe_array(m)}")

    @property
    def shape(self) -> tuple[int, int]:
        """Original (height, width)."""
        return (int(self.mask.shape[0]), int(self.mask.shape[1]))

    @property
    def mask_fraction(self) -> float:
        """Share of True pixels of ``mask``, in [0, 1]."""
        return float(np.count_nonzero(self.mask)) / self.mask.size


def packed_size(h: Any, w: Any) -> Any:
    """Bytes of a bit-packed (h, w) mask: ceil(h * w / 8) (ints or int arrays)."""
    return (h * w + 7) // 8


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """bool (H, W) -> uint8 (ceil(H * W / 8),): row-major, 8 pixels a byte, most significant bit
    first, last byte zero-padded."""
    return np.packbits(mask.ravel())


def unpack_mask(packed: np.ndarray, h: int, w: int) -> np.ndarray:
    """Inverse of :func:`pack_mask`: uint8 bytes -> bool (h, w)."""
    return np.unpackbits(packed, count=h * w).view(np.bool_).reshape(h, w)


# --------------------------------------------------------------------------- attrs


def attr_value(value: Any) -> Any:
    """An HDF5 attr as a plain Python value (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def encode_attrs(path: Path, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """HDF5-storable root attrs: scalars as they are, anything else as a JSON string, plus
    ``json_attrs`` listing the JSON-encoded names."""
    out: dict[str, Any] = {}
    json_names = []
    for key, value in attrs.items():
        if not isinstance(key, str) or key in RESERVED_ATTRS:
            raise ValueError(f"{path}: attr name {key!r} is reserved or not a str "
                             f"(reserved: {sorted(RESERVED_ATTRS)})")
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


# --------------------------------------------------------------------------- writing


def check_compression(path: Path, name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is one of :data:`COMPRESSIONS`."""
    if value not in COMPRESSIONS:
        raise ValueError(f"{path}: {name} must be one of {COMPRESSIONS}, got {value!r}")


def check_chunk_bytes(path: Path, name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is a positive int."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{path}: {name} must be a positive int, got {value!r}")


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


@contextmanager
def create_shard_file(path: Path) -> Iterator[h5py.File]:
    """An HDF5 file open for writing under a temp name beside ``path`` (directories made as
    needed); closed, fsynced and renamed onto ``path`` when the block ends cleanly, removed
    when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".h5") as tmp:
        # libver "earliest": the oldest file format that holds the data, readable by any HDF5 tool.
        # No lock: nothing else opens a temp file, and locks fail on some network file systems.
        with h5py.File(tmp, "w", libver="earliest", locking=False) as f:
            yield f


def write_header(f: h5py.File, schema: str, version: int, attrs: Mapping[str, Any],
                 ids: Sequence[str], shapes: Sequence[tuple[int, int]]) -> None:
    """Root attrs (schema, schema_version, count, then ``attrs`` from :func:`encode_attrs`) and
    the ``ids`` and ``shapes`` datasets."""
    n = len(ids)
    f.attrs["schema"] = schema
    f.attrs["schema_version"] = version
    f.attrs["count"] = n
    for key, value in attrs.items():
        f.attrs[key] = value
    f.create_dataset("ids", data=np.array(ids, dtype=object).reshape(n), dtype=UTF8)
    f.create_dataset("shapes", data=np.array(shapes, dtype=np.int32).reshape(n, 2))


def write_placed(f: h5py.File, name: str, offsets_name: str, parts: Sequence[np.ndarray],
                 chunk_bytes: int, compression: str | None) -> None:
    """Write uint8 ``parts`` into one flat dataset ``name`` and their starts into ``offsets_name``
    (int64, n + 1). Compressed: chunks of ``chunk_bytes``, each part placed by
    :func:`place_in_chunks` (gaps keep the fill value 0 and compress to almost nothing).
    Uncompressed: contiguous and dense, since placement pays only when chunks are decompressed
    whole."""
    offsets = place_in_chunks([p.size for p in parts], chunk_bytes if compression else 1)
    f.create_dataset(offsets_name, data=offsets)
    total = int(offsets[-1])
    chunks = (min(chunk_bytes, total),) if compression and total else None
    ds = f.create_dataset(name, shape=(total,), dtype=np.uint8, fillvalue=0, chunks=chunks,
                          compression=compression if chunks else None)
    for part, start in zip(parts, offsets):
        ds[start:start + part.size] = part


# --------------------------------------------------------------------------- reading


def placement_ok(offsets: np.ndarray, sizes: np.ndarray, length: int) -> bool:
    """Items of ``sizes`` at ``offsets`` lie in order, without overlap, inside ``length``."""
    n = sizes.size
    return (offsets.shape == (n + 1,) and offsets[0] >= 0 and offsets[-1] == length
            and bool((offsets[:-1] + sizes <= offsets[1:]).all()))


@dataclass
class ShardIndex:
    """The per-row arrays of one shard that readers hold in memory (no mask is read). Formats
    subclass it with their own fields and override the three hooks below."""

    ids: list[str]
    shapes: np.ndarray   # int64 (n, 2): original height, width
    offsets: np.ndarray  # int64 (n + 1,): start of each packed mask in `masks`

    @classmethod
    def read_rows(cls, f: h5py.File) -> dict[str, Any]:
        """The subclass's own fields, read from an open shard."""
        return {}

    def rows_match(self, n: int) -> bool:
        """Whether the subclass's own per-row fields hold ``n`` rows."""
        return True

    def data_problem(self, f: h5py.File, n: int) -> str | None:
        """What does not match the index in the format's other datasets, or None."""
        return None

    @property
    def mask_bytes(self) -> np.ndarray:  # int64 (n,)
        return packed_size(self.shapes[:, 0], self.shapes[:, 1])


@dataclass(frozen=True)
class ShardFormat:
    """What tells one shard format from another: file names, schema, the error class, and the
    index type of each readable ``schema_version`` (what readers dispatch on). Every readable
    version stores root attrs the same way (``json_attrs``)."""

    kind: str                 # "mask", "embedding": "<kind> shard" / "<kind> store" in messages
    prefix: str               # file names "<prefix>-NNNNN.h5"
    schema: str               # the root attr "schema"
    error: type[ValueError]   # raised for a file that is not a readable shard of this format
    index_types: Mapping[int, type[ShardIndex]]

    @property
    def noun(self) -> str:
        return f"{self.kind} shard"

    @property
    def readable_versions(self) -> tuple[int, ...]:
        return tuple(sorted(self.index_types))

    # -- names
    def shard_name(self, index: int) -> str:
        """File name of shard ``index``: ``<prefix>-00000.h5``."""
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool) or index < 0:
            raise ValueError(f"shard index must be a non-negative int, got {index!r}")
        return f"{self.prefix}-{int(index):05d}.h5"

    def shard_index(self, name: str) -> int | None:
        """Inverse of :meth:`shard_name`; None for any other name (temp files, manifests, ...)."""
        m = re.fullmatch(rf"{re.escape(self.prefix)}-(\d{{5,}})\.h5", name)
        if m is None:
            return None
        index = int(m.group(1))
        return index if self.shard_name(index) == name else None

    def list_shards(self, directory: Path) -> list[tuple[int, Path]]:
        """(number, path) of the shard files in ``directory``, by number; every other name,
        temp files included, is skipped."""
        found = []
        for entry in os.scandir(directory):
            k = self.shard_index(entry.name)
            if k is not None and entry.is_file():
                found.append((k, Path(entry.path)))
        return sorted(found)

    # -- files
    def open(self, path: Path) -> h5py.File:
        """Open a shard read-only, without a chunk cache.

        HDF5's default file locking is kept, so the same file can be opened elsewhere in this
        process with default settings; where locking fails (some network file systems, or an
        earlier open of the same file with ``locking=False``) the file is opened without a lock,
        which is safe because shards never change after their atomic rename.
        """
        if not path.is_file():
            raise FileNotFoundError(f"{self.noun} not found: {path}")
        try:
            try:
                return h5py.File(path, "r", rdcc_nbytes=0)
            except OSError as e:
                if "lock" not in str(e).lower():
                    raise
                return h5py.File(path, "r", rdcc_nbytes=0, locking=False)
        except OSError as e:
            raise self.error(f"{path}: cannot open as HDF5 ({e})") from None

    def check_version(self, path: Path, attrs: Mapping[str, Any]) -> int:
        """The file's schema_version; the format's error if the schema or version is not readable."""
        schema = attr_value(attrs.get("schema"))
        if schema != self.schema:
            article = "an" if self.kind[:1] in "aeiou" else "a"
            raise self.error(f"{path}: not {article} {self.noun} (schema attr {schema!r}, "
                             f"expected {self.schema!r})")
        version = attr_value(attrs.get("schema_version"))
        if version not in self.index_types:
            raise self.error(f"{path}: schema_version {version!r} of {self.schema!r} is not readable "
                             f"by this code (it reads versions {list(self.readable_versions)})")
        return int(version)

    def decode_attrs(self, path: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Root attrs as written: JSON-encoded ones decoded, ``json_attrs`` dropped."""
        out = {key: attr_value(value) for key, value in raw.items()}
        try:
            for key in json.loads(out.pop("json_attrs", "[]")):
                out[key] = json.loads(out[key])
        except (ValueError, KeyError, TypeError) as e:
            raise self.error(f"{path}: corrupt JSON-encoded attrs ({e})") from None
        return out

    def read_attrs(self, path: Path) -> dict[str, Any]:
        """Decoded root attrs of the shard at ``path`` (schema, schema_version, count and the
        writer's attrs)."""
        with self.open(path) as f:
            self.check_version(path, f.attrs)
            return self.decode_attrs(path, f.attrs)

    def read_index(self, path: Path, f: h5py.File, version: int) -> ShardIndex:
        """The index of an open shard of ``version``, checked against its datasets."""
        index_type = self.index_types[version]
        try:
            n = int(attr_value(f.attrs["count"]))
            idx = index_type(ids=list(f["ids"].asstr()[()]), shapes=f["shapes"][()].astype(np.int64),
                             offsets=f["offsets"][()].astype(np.int64), **index_type.read_rows(f))
            n_masks = f["masks"].shape[0]
            problem = _index_problem(idx, n, n_masks) or idx.data_problem(f, n)
        except (KeyError, OSError, ValueError, TypeError) as e:
            raise self.error(f"{path}: corrupt {self.noun} ({e})") from None
        if problem:
            raise self.error(f"{path}: corrupt {self.noun} ({problem})")
        return idx


def _index_problem(idx: ShardIndex, n: int, n_masks: int) -> str | None:
    """What in the common index does not match ``count`` (n) or the masks dataset, or None."""
    if len(idx.ids) != n or not idx.rows_match(n):
        return f"index lengths differ from count {n}"
    if idx.shapes.shape != (n, 2) or (idx.shapes <= 0).any():
        return f"bad shapes dataset {idx.shapes.shape}"
    if not placement_ok(idx.offsets, idx.mask_bytes, n_masks):
        return "offsets do not match shapes and the masks dataset"
    return None


IndexT = TypeVar("IndexT", bound=ShardIndex)
ReaderT = TypeVar("ReaderT", bound="ShardReader")
StoreT = TypeVar("StoreT", bound="ShardStore")


class ShardReader(ABC, Generic[IndexT]):
    """Random access by row or id, and in-order iteration, over one shard.

    The file is opened on first use and its index (:class:`ShardIndex`) held in memory; masks
    (and whatever else a format stores) are read on demand. Picklable: the HDF5 handle is dropped
    on pickling and reopened lazily, also in a process forked after it was opened. Subclasses set
    ``format`` and ``held_datasets`` and build their records (:meth:`get`, :meth:`iter`) from
    :meth:`_read_mask` and :meth:`_iter_masks`.
    """

    format: ClassVar[ShardFormat]
    held_datasets: ClassVar[tuple[str, ...]] = ("masks",)  # looked up once per open, when present

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._ds: dict[str, h5py.Dataset] = {}
        self._index: IndexT | None = None
        self._rows: dict[str, int] | None = None

    # -- handle management
    def _handle(self) -> h5py.File:
        if self._file is not None and self._pid != os.getpid():
            # Inherited through fork: HDF5 state is not fork-safe, open our own handle.
            self._drop_handle()
        if self._file is None:
            f = self.format.open(self.path)
            try:
                version = self.format.check_version(self.path, f.attrs)
                if self._index is None:
                    self._index = self.format.read_index(self.path, f, version)
            except BaseException:
                f.close()
                raise
            self._file, self._pid = f, os.getpid()
            self._ds = {name: f[name] for name in self.held_datasets if name in f}
        return self._file

    def _dataset(self, name: str) -> h5py.Dataset:
        self._handle()
        return self._ds[name]

    def _drop_handle(self) -> None:
        file, self._file, self._ds = self._file, None, {}
        if file is not None and self._pid == os.getpid():
            file.close()

    @property
    def index(self) -> IndexT:
        if self._index is None:
            self._handle()
        assert self._index is not None
        return self._index

    def close(self) -> None:
        """Close the file handle (the reader reopens it if used again)."""
        self._drop_handle()

    def __enter__(self: ReaderT) -> ReaderT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _ds={})
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
    def attrs(self) -> dict[str, Any]:
        """Decoded root attrs."""
        return self.format.decode_attrs(self.path, self._handle().attrs)

    def __len__(self) -> int:
        return len(self.index.ids)

    def index_of(self, id: str) -> int:
        """Row of ``id`` in this shard (KeyError if absent)."""
        if self._rows is None:
            self._rows = {k: i for i, k in enumerate(self.index.ids)}
        try:
            return self._rows[id]
        except KeyError:
            raise KeyError(f"id {id!r} not in {self.format.noun} {self.path}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

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

    def _read_mask(self, i: int) -> np.ndarray:
        """bool (H, W) mask of row ``i``."""
        idx = self.index
        h, w = idx.shapes[i]
        start = idx.offsets[i]
        return unpack_mask(self._dataset("masks")[start:start + packed_size(h, w)], h, w)

    def _iter_masks(self, block_bytes: int = ITER_BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """(row, bool (H, W) mask) in file order, reading blocks of consecutive packed masks of
        at most ``block_bytes`` (but at least one mask) at a time."""
        idx = self.index
        n, start = len(idx.ids), 0
        while start < n:
            stop = int(np.searchsorted(idx.offsets, idx.offsets[start] + block_bytes, "right")) - 1
            stop = min(max(stop, start + 1), n)
            block = self._dataset("masks")[idx.offsets[start]:idx.offsets[stop]]
            for i in range(start, stop):
                h, w = idx.shapes[i]
                a = idx.offsets[i] - idx.offsets[start]
                yield i, unpack_mask(block[a:a + packed_size(h, w)], h, w)
            start = stop

    @abstractmethod
    def get(self, key: int | str) -> Any:
        """The record at row ``key`` or with id ``key``."""

    @abstractmethod
    def iter(self) -> Iterator[Any]:
        """Records in file order."""

    def __getitem__(self, key: int | str) -> Any:
        return self.get(key)

    def __iter__(self) -> Iterator[Any]:
        return self.iter()


class ShardStore(ABC, Generic[ReaderT]):
    """All shards of one directory, in shard order, read by id. Ignores temp files and every
    non-shard name (manifest.json, the lock, reports). The shard list is taken when the store
    is made. Picklable and fork-safe like :class:`ShardReader`; the id -> (shard, row) map is
    built lazily from the shards' index arrays and travels with the pickle once built.
    Subclasses set ``reader_type`` and ``columns`` (their index fields in :meth:`table`).
    """

    reader_type: ClassVar[type[ShardReader]]
    columns: ClassVar[Mapping[str, Any]] = {}  # index field -> dtype of its table() column

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        fmt = self.reader_type.format
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{fmt.kind} store directory not found: {self.directory}")
        found = fmt.list_shards(self.directory)
        self._shard_numbers = [k for k, _ in found]
        self._readers: list[ReaderT] = [self.reader_type(p) for _, p in found]
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
                        raise self.reader_type.format.error(
                            f"id {id!r} is in both {self._readers[prev[0]].path} and {reader.path}")
            self._where = where
        return self._where

    def _locate(self, id: str) -> tuple[ReaderT, int]:
        """(reader, row) of image ``id`` (KeyError if no shard holds it)."""
        try:
            s, row = self._map()[id]
        except KeyError:
            raise KeyError(f"id {id!r} not in {self.reader_type.format.kind} store {self.directory}") from None
        return self._readers[s], row

    def ids(self) -> list[str]:
        """All ids in shard order."""
        return [id for reader in self._readers for id in reader.ids]

    def table(self) -> dict[str, np.ndarray]:
        """Per-image columns from the index arrays only (no mask is read): id, shard (the
        shard's file number), row, height, width, then the format's ``columns``."""
        dtypes = {"id": object, "shard": np.int32, "row": np.int32, "height": np.int32,
                  "width": np.int32, **self.columns}
        cols: dict[str, list[np.ndarray]] = {k: [] for k in dtypes}
        for number, reader in zip(self._shard_numbers, self._readers):
            idx = reader.index
            n = len(idx.ids)
            cols["id"].append(np.array(idx.ids, dtype=object).reshape(n))
            cols["shard"].append(np.full(n, number, dtype=np.int32))
            cols["row"].append(np.arange(n, dtype=np.int32))
            cols["height"].append(idx.shapes[:, 0].astype(np.int32))
            cols["width"].append(idx.shapes[:, 1].astype(np.int32))
            for name, dtype in self.columns.items():
                cols[name].append(np.asarray(getattr(idx, name), dtype=dtype).reshape(n))
        return {k: np.concatenate(v) if v else np.zeros(0, dtype=dtypes[k]) for k, v in cols.items()}

    @abstractmethod
    def get(self, id: str) -> Any:
        """The record of image ``id`` (KeyError if no shard holds it)."""

    def __getitem__(self, id: str) -> Any:
        return self.get(id)

    def __contains__(self, id: object) -> bool:
        return id in self._map()

    def __len__(self) -> int:
        return sum(len(r) for r in self._readers)

    def __iter__(self) -> Iterator[Any]:
        for reader in self._readers:
            yield from reader

    def close(self) -> None:
        for reader in self._readers:
            reader.close()

    def __enter__(self: StoreT) -> StoreT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.directory)!r}, {len(self._readers)} shards)"


# --------------------------------------------------------------------------- summaries


def fraction_summary(values: np.ndarray) -> dict[str, Any]:
    """JSON-ready 10-bin histogram over [0, 1], mean and median of per-image fractions
    (None for no image)."""
    values = np.asarray(values, dtype=np.float64)
    counts, edges = np.histogram(values, bins=10, range=(0.0, 1.0))
    return {
        "bin_edges": [round(float(e), 6) for e in edges],
        "counts": [int(c) for c in counts],
        "mean": float(values.mean()) if values.size else None,
        "median": float(np.median(values)) if values.size else None,
    }


def int_range(col: np.ndarray) -> dict[str, int | None]:
    """{"min", "max"} of an int column (None for an empty one)."""
    return {"min": int(col.min()) if col.size else None, "max": int(col.max()) if col.size else None}
