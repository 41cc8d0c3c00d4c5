"""Random-access read time of one binary mask: palette PNG vs naive flat HDF5 vs MaskStore.

    python benchmarks/bench_mask_io.py [--n 200] [--repeats 5] [--seed 0] [--sweep]

Masks are saliency-like blobs (thresholded low-frequency noise with a centre bias, 5-60 %
foreground, ragged boundaries) at VOC-like sizes around 512x384. Every method reads the same
masks in the same random order, from files already in the page cache, and returns a bool (H, W)
array; the time per mask is the best of ``--repeats`` passes, the methods taking turns. ``--sweep`` also times chunk sizes
(16-256 KiB) and compressors of the shard format, which is how its defaults were chosen.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import h5py
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts.masks import MaskRecord, MaskStore, shard_name, write_mask_shard  # noqa: E402

SIZES = [(384, 512), (512, 384), (375, 500), (500, 375), (333, 500), (480, 640), (512, 512)]


def make_masks(n: int, seed: int) -> list[MaskRecord]:
    """``n`` blob masks with soft maps, sizes around 512x384, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[rng.integers(len(SIZES))]
        h, w = h - int(rng.integers(0, 8)), w - int(rng.integers(0, 8))  # odd sizes too
        field = np.zeros((h, w), np.float32)
        for cells, weight in ((4, 1.0), (12, 0.35), (40, 0.12)):  # three octaves of value noise
            grid = rng.standard_normal((cells, cells)).astype(np.float32)
            field += weight * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
        yy, xx = np.mgrid[:h, :w].astype(np.float32)
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        field -= 1.5 * (((yy - cy) / h) ** 2 + ((xx - cx) / w) ** 2) * 4  # centre bias
        fg = rng.uniform(0.05, 0.6)
        thr = np.quantile(field, 1 - fg)
        soft = 1 / (1 + np.exp(-(field - thr) * 8))
        out.append(MaskRecord(f"{i:06d}", field > thr, np.round(soft * 255).astype(np.uint8)))
    return out


def time_interleaved(readers: dict[str, Callable[[str], object]], order: list[str], repeats: int,
                     seed: int) -> dict[str, float]:
    """Seconds per read of each reader: best pass of ``repeats``, the readers taking turns in a
    shuffled order every round so that load from other processes hits them alike."""
    best = {name: float("inf") for name in readers}
    names = list(readers)
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        for name in rng.permutation(names):
            read = readers[name]
            t0 = time.perf_counter()
            for k in order:
                read(k)
            best[name] = min(best[name], (time.perf_counter() - t0) / len(order))
    return best


def png_reader(root: Path, records: list[MaskRecord], bits: int | None) -> Callable[[str], np.ndarray]:
    """VOC-style palette PNGs (256-entry palette, 8 bit) or 1-bit palette PNGs."""
    palette = [0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254
    for r in records:
        im = Image.fromarray(r.mask.astype(np.uint8), mode="P")
        im.putpalette(palette if bits is None else palette[:6])
        im.save(root / f"{r.id}.png", **({} if bits is None else {"bits": bits}))
    return lambda k: np.asarray(Image.open(root / f"{k}.png")) > 0


def naive_h5_reader(path: Path, records: list[MaskRecord], compression: str) -> Callable[[str], np.ndarray]:
    """One flat uint8 (a byte per pixel) dataset with 256K-element chunks, plus offsets."""
    offsets = np.cumsum([0] + [r.mask.size for r in records])
    with h5py.File(path, "w") as f:
        f.create_dataset("masks", data=np.concatenate([r.mask.ravel() for r in records]).view(np.uint8),
                         chunks=(262144,), compression=compression)
    f = h5py.File(path, "r")
    ds = f["masks"]
    where = {r.id: (offsets[i], offsets[i + 1], r.shape) for i, r in enumerate(records)}

    def read(k: str) -> np.ndarray:
        a, b, shape = where[k]
        return ds[a:b].view(bool).reshape(shape)

    return read


def store_dir(root: Path, records: list[MaskRecord], shard_size: int = 512, **kwargs) -> Path:
    root.mkdir()
    for s in range(0, len(records), shard_size):
        write_mask_shard(root / shard_name(s // shard_size), records[s:s + shard_size], **kwargs)
    return root


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="also time chunk sizes and compressors")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    records = make_masks(args.n, args.seed)
    masks_only = [MaskRecord(r.id, r.mask) for r in records]
    by_id = {r.id: r for r in records}
    order = list(np.random.default_rng(args.seed + 1).permutation([r.id for r in records]))
    mean_px = np.mean([r.mask.size for r in records])
    print(f"{args.n} masks, mean {mean_px:.0f} px (~{np.sqrt(mean_px * 4 / 3):.0f}x{np.sqrt(mean_px * 3 / 4):.0f}), "
          f"mean fg {np.mean([r.fg_fraction for r in records]):.2f}; "
          f"best of {args.repeats} interleaved random-order passes")

    tmp = Path(tempfile.mkdtemp(prefix="bench_mask_io_"))
    try:
        readers: dict[str, Callable[[str], np.ndarray]] = {}
        sizes: dict[str, int] = {}

        def add(name: str, read: Callable[[str], np.ndarray], path: Path) -> None:
            for k in order[:5]:  # correctness
                assert np.array_equal(read(k), by_id[k].mask), name
            readers[name], sizes[name] = read, disk_bytes(path)

        for name, bits in (("PNG palette 8-bit (PIL)", None), ("PNG palette 1-bit (PIL)", 1)):
            d = tmp / f"png{bits}"
            d.mkdir()
            add(name, png_reader(d, records, bits), d)
        for comp in ("gzip", "lzf"):
            p = tmp / f"naive_{comp}.h5"
            add(f"naive flat HDF5, 256K {comp}", naive_h5_reader(p, records, comp), p)
        for comp in ("lzf", "gzip", None):
            d = store_dir(tmp / f"store_{comp}", masks_only, compression=comp)
            add(f"MaskStore bit-packed {comp or 'uncompressed'}" + (" (default)" if comp == "lzf" else ""),
                lambda k, s=MaskStore(d): s.get(k).mask, d)
        d = store_dir(tmp / "store_soft", records)
        soft_store = MaskStore(d)
        readers["MaskStore lzf, mask + soft map"] = lambda k: soft_store.get(k, soft=True)
        sizes["MaskStore lzf, mask + soft map"] = disk_bytes(d)

        times = time_interleaved(readers, order, args.repeats, args.seed)
        base = times["PNG palette 8-bit (PIL)"]
        print(f"\n{'method':36s} {'ms/mask':>8s} {'vs PNG':>7s} {'KiB/mask':>9s}")
        for name, sec in times.items():
            print(f"{name:36s} {sec * 1e3:8.3f} {base / sec:6.1f}x {sizes[name] / args.n / 1024:9.1f}")
        print("(vs PNG: how many times faster than decoding the 8-bit palette PNG)")

        if args.sweep:
            sweep: dict[str, Callable[[str], object]] = {}
            sweep_sizes: dict[str, int] = {}
            for kib in (16, 32, 64, 128, 256):
                for comp, soft in (("lzf", False), ("gzip", False), ("lzf", True)):
                    kw = {"soft_chunk_bytes": kib * 1024} if soft else {"mask_chunk_bytes": kib * 1024}
                    d = store_dir(tmp / f"sweep_{comp}_{kib}_{soft}", records if soft else masks_only,
                                  compression=comp, **kw)
                    key = f"{kib} {comp} {'soft' if soft else 'mask'}"
                    sweep[key] = lambda k, s=MaskStore(d), soft=soft: s.get(k, soft=soft)
                    sweep_sizes[key] = disk_bytes(d)
            sweep_times = time_interleaved(sweep, order, args.repeats, args.seed)
            print("\nsweep: MaskStore.get ms/mask (KiB on disk per mask); the soft column reads mask + soft "
                  "with the soft map's chunk size varied")
            print(f"{'chunk KiB':>9s} {'mask lzf':>16s} {'mask gzip':>16s} {'soft lzf':>16s}")
            for kib in (16, 32, 64, 128, 256):
                cells = [f"{sweep_times[k] * 1e3:7.3f} ({sweep_sizes[k] / args.n / 1024:5.1f})"
                         for k in (f"{kib} lzf mask", f"{kib} gzip mask", f"{kib} lzf soft")]
                print(f"{kib:9d} " + " ".join(f"{c:>16s}" for c in cells))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
