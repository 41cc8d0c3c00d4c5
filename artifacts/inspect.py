"""Human-readable summaries of HDF5 files and artifact directories (for ``maskcontrast inspect``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np


def _attr_text(value: Any, limit: int = 120) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_hdf5(path: str | Path) -> Iterator[str]:
    """Groups, datasets (shape, dtype, chunks, compression, stored size) and attributes."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        yield f"{path}  ({human_bytes(path.stat().st_size)})"
        for key, value in sorted(f.attrs.items()):
            yield f"  @{key} = {_attr_text(value)}"

        def visit(name: str, obj) -> None:
            depth = name.count("/") + 1
            pad = "  " * depth
            if isinstance(obj, h5py.Group):
                lines.append(f"{pad}{name.rsplit('/', 1)[-1]}/")
            else:
                chunks = "x".join(map(str, obj.chunks)) if obj.chunks else "contiguous"
                comp = obj.compression or "none"
                if obj.compression_opts is not None:
                    comp += f"({obj.compression_opts})"
                stored = obj.id.get_storage_size()
                raw = obj.size * obj.dtype.itemsize
                ratio = f", {raw / stored:.1f}x" if stored and obj.dtype.kind not in "OSU" else ""
                dtype = h5py.check_string_dtype(obj.dtype)
                dt = "str" if dtype is not None else str(obj.dtype)
                lines.append(f"{pad}{name.rsplit('/', 1)[-1]}: {obj.shape} {dt}, chunks {chunks}, "
                             f"{comp}, stored {human_bytes(stored)}{ratio}")
            for key, value in sorted(obj.attrs.items()):
                lines.append(f"{pad}  @{key} = {_attr_text(value)}")

        lines: list[str] = []
        f.visititems(visit)
        yield from lines


def describe_manifest(manifest: dict[str, Any]) -> Iterator[str]:
    yield f"stage {manifest.get('stage')}  version {manifest.get('version')}  status {manifest.get('status')}"
    yield f"  schema {manifest.get('schema_version')}, code {manifest.get('code_version')}, host {manifest.get('host')}"
    yield f"  created {manifest.get('created')}, finished {manifest.get('finished')}, attempts {manifest.get('attempts')}"
    for role, ref in (manifest.get("inputs") or {}).items():
        yield f"  input {role}: {ref}"
    if manifest.get("error"):
        yield f"  error: {manifest['error']}"
    if manifest.get("progress"):
        p = manifest["progress"]
        yield f"  progress: {p.get('done')}/{p.get('total')} {p.get('unit', '')}"
    params = manifest.get("params") or {}
    yield "  params: " + _attr_text(params, limit=400)
    files = manifest.get("files") or []
    if files:
        total = sum(f.get("size", 0) for f in files)
        yield f"  files: {len(files)} ({human_bytes(total)})"
        for entry in files[:12]:
            yield f"    {entry['path']}  {human_bytes(entry['size'])}  sha256 {entry['sha256'][:12]}"
        if len(files) > 12:
            yield f"    ... {len(files) - 12} more"
    summary = manifest.get("summary") or {}
    if summary:
        yield "  summary:"
        for key, value in summary.items():
            yield f"    {key}: {_attr_text(value, limit=200)}"
