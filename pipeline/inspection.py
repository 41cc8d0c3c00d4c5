"""``maskcontrast inspect``: summarise an artifact directory, a store, or any HDF5 file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

from artifacts.inspect import describe_hdf5, describe_manifest, human_bytes
from artifacts.store import MANIFEST, Store, read_manifest


def _mask_stats(directory: Path) -> Iterator[str]:
    from artifacts.masks import summarize_masks

    s = summarize_masks(directory)
    yield "mask statistics:"
    yield f"  images {s['n_images']}: kept {s['n_kept']}, dropped {s['n_dropped']} in {s['n_shards']} shard(s)"
    for reason, count in sorted(s.get("dropped_by_reason", {}).items(), key=lambda kv: -kv[1]):
        yield f"    dropped {count:6d}  {reason}"
    fg = s.get("fg_fraction") or {}
    counts = fg.get("counts") or []
    if counts and fg.get("mean") is not None:
        peak = max(counts) or 1
        yield f"  foreground fraction (mean {fg['mean']:.3f}, median {fg['median']:.3f}):"
        for i, c in enumerate(counts):
            lo, hi = i / len(counts), (i + 1) / len(counts)
            yield f"    {lo:.1f}-{hi:.1f} {c:7d} {'#' * int(round(40 * c / peak))}"
    props = s.get("proposals")
    if props:
        by_count = ", ".join(f"{n} with {k}" for k, n in props["images_by_count"].items())
        area = props["area"]
        yield f"  proposals {props['n_proposals']} ({by_count}), area mean {area['mean'] or 0:.3f}"
    for key in ("height", "width"):
        if key in s:
            yield f"  {key}: {s[key]['min']}..{s[key]['max']} px"
    yield f"  on disk: {human_bytes(s.get('bytes_on_disk', 0))}"
    if s.get("estimator"):
        yield f"  estimator: {json.dumps(s['estimator'], default=str)[:300]}"


#: per-stage statistics shown under the manifest
STAGE_STATS: dict[str, Callable[[Path], Iterator[str]]] = {"masks": _mask_stats}


def inspect_path(path: Path) -> Iterator[str]:
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is None:
            infos = Store(path).list()
            if infos:
                from pipeline.status import list_lines

                yield f"store {path}"
                yield from list_lines(infos)
                return
            yield f"{path}: no manifest.json (not an artifact version directory, nor a store)"
            return
        yield from describe_manifest(manifest)
        stats = STAGE_STATS.get(str(manifest.get("stage")))
        if stats is not None:
            try:
                yield from stats(path)
            except Exception as exc:  # a partial artifact may not have shards yet
                yield f"  (statistics unavailable: {exc})"
        for extra in sorted(path.glob("*.json")):
            if extra.name != MANIFEST and extra.stat().st_size < 20000:
                yield f"{extra.name}:"
                yield from ("  " + line for line in extra.read_text().splitlines()[:40])
        return
    if path.suffix in (".h5", ".hdf5", ".hdf"):
        yield from describe_hdf5(path)
        return
    yield f"{path}: {human_bytes(path.stat().st_size)} (not an HDF5 file or artifact; nothing more to show)"


def mask_contact_sheet(path: Path, dataset, out: Path, n: int = 24) -> Path:
    from stages.masks.report import contact_sheet

    return contact_sheet(Path(path), dataset, out, n=n)

