"""Stage 1: mask proposals for every image, written as HDF5 shards.

Images are split into shards of ``shard_size`` in index order; each shard is computed in chunks
(fanned out with dask when a client is given, in-process otherwise) and written once, atomically,
when all its chunks are in. A rerun after a crash or Ctrl-C finds the whole shards on disk and
computes only the missing ones. Per-image results do not depend on where they were computed, so a
local cluster, a remote one and the in-process path write identical shards.

With ``proposals`` other than ``single`` (:class:`stages.masks.params.ProposalParams`) each record
also carries the image's object proposals (:mod:`stages.masks.proposals`), so the shards are of
schema version 2: ``components`` split the binary mask, ``cuts`` are the features estimator's
repeated cuts of its feature grid (:meth:`stages.masks.features.FeatureEstimator.with_grid`).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from artifacts.atomic import atomic_write_json
from artifacts.masks import (PROPOSALS_SCHEMA_VERSION, SCHEMA_VERSION, MaskRecord, MaskStore, shard_name,
                             write_mask_shard)
from stages.bookkeeping import without_bookkeeping
from stages.data import BadInputError, Sample, load_image
from stages.masks.imported import BadMaskError, load_imported_mask
from stages.masks.params import ProposalParams
from stages.masks.postprocess import PostParams, postprocess
from stages.masks.priors import PriorParams, priors_saliency

SKIPPED_FILE = "skipped.json"


# -- estimators: picklable callables img -> soft map in [0, 1] -----------------------------------------
class PriorsEstimator:
    name = "priors"

    def __init__(self, params: PriorParams):
        self.params = params

    def describe(self) -> dict[str, Any]:
        return {"estimator": self.name, "estimator_params": asdict(self.params)}

    def __call__(self, img: np.ndarray, sample: Sample) -> np.ndarray:
        return priors_saliency(img, self.params)


class OnnxEstimator:
    name = "model"

    def __init__(self, path: Path, params, threads: int = 1):
        from stages.masks.onnx_model import OnnxSaliency

        self.model = OnnxSaliency(path, params, threads=threads)
        self.path = Path(path)

    def describe(self) -> dict[str, Any]:
        return {"estimator": self.name, "model_file": self.path.name, "model_sha256": self.model.sha256,
                "estimator_params": without_bookkeeping("masks.model", asdict(self.model.params))}

    def __call__(self, img: np.ndarray, sample: Sample) -> np.ndarray:
        return self.model(img)


class ImportEstimator:
    name = "import"

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def describe(self) -> dict[str, Any]:
        return {"estimator": self.name, "import_dir": str(self.directory)}

    def __call__(self, img: np.ndarray, sample: Sample) -> np.ndarray:
        return load_imported_mask(self.directory, sample.id, img.shape[:2])


def folder_fingerprint(directory: Path, suffix: str = ".png") -> str:
    """sha256 over (name, size) of the files in ``directory``: cheap, content-sensitive enough."""
    h = hashlib.sha256()
    for p in sorted(Path(directory).glob(f"*{suffix}")):
        h.update(f"{p.name}\0{p.stat().st_size}\n".encode())
    return h.hexdigest()


# -- per-image work ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChunkResult:
    shard: int
    chunk: int
    records: list[MaskRecord]
    skipped: list[tuple[str, str]]  # (id, reason) of images that could not be used at all
    seconds: float


def compute_chunk(shard: int, chunk: int, samples: Sequence[Sample], estimator: Callable, post: PostParams,
                  store_soft: bool, proposals: ProposalParams | None = None) -> ChunkResult:
    """Masks for a few images. A bad image or mask file is skipped and reported, never fatal.
    With ``proposals`` that can give several per image, each record carries them."""
    t0 = time.perf_counter()
    multiple = proposals is not None and proposals.multiple
    cuts = multiple and proposals.proposals == "cuts"
    records, skipped = [], []
    for sample in samples:
        try:
            img = load_image(sample.image)
            if cuts:  # the cuts need the feature grid the map came from
                soft, grid, classes = estimator.with_grid(img)
            else:
                soft = estimator(img, sample)
            soft = np.clip(np.asarray(soft, dtype=np.float32), 0.0, 1.0)
        except (BadInputError, BadMaskError) as exc:
            skipped.append((sample.id, str(exc)))
            continue
        if soft.shape != img.shape[:2]:
            raise ValueError(f"estimator returned a {soft.shape} map for {sample.image} of size {img.shape[:2]}")
        mask, kept, reason = postprocess(soft, post)
        mask = mask.astype(bool)
        found = None
        if cuts:
            from stages.masks.proposals import cut_proposals

            found = cut_proposals(grid, mask.shape, proposals, estimator.params,
                                  image=img if estimator.params.crf else None, classes=classes)
        elif multiple:
            from stages.masks.proposals import proposals_from_mask

            found = proposals_from_mask(mask, proposals, soft)
        soft_u8 = np.round(soft * 255.0).astype(np.uint8) if store_soft else None
        records.append(MaskRecord(sample.id, mask, soft_u8, bool(kept), "" if kept else reason, found))
    return ChunkResult(shard, chunk, records, skipped, time.perf_counter() - t0)


# -- the stage ---------------------------------------------------------------------------------------------
def plan_shards(samples: Sequence[Sample], shard_size: int) -> list[list[Sample]]:
    return [list(samples[i: i + shard_size]) for i in range(0, len(samples), shard_size)]


def _chunks(samples: list[Sample], size: int) -> list[list[Sample]]:
    return [samples[i: i + size] for i in range(0, len(samples), size)]


def compute_masks(
    samples: Sequence[Sample],
    estimator: Callable,
    post: PostParams,
    out_dir: Path,
    *,
    shard_size: int = 512,
    store_soft: bool = True,
    attrs: dict[str, Any] | None = None,
    client=None,
    chunk_size: int = 8,
    progress: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
    proposals: ProposalParams | None = None,
) -> dict[str, Any]:
    """Write every missing shard of ``samples`` into ``out_dir``; return the summary figures.
    ``proposals``: how each image's object proposals are chosen; with ``single`` (or None) the
    shards are of schema version 1, exactly as before proposals existed."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(samples, shard_size)
    missing = [i for i in range(len(shards)) if not (out_dir / shard_name(i)).exists()]
    skipped = _load_skipped(out_dir)
    shard_attrs = {**(attrs or {}), "post": asdict(post), "store_soft": store_soft}
    if proposals is not None and proposals.multiple:
        shard_attrs["proposals"] = asdict(proposals)
    else:
        proposals = None
    todo = [(i, c, chunk) for i in missing for c, chunk in enumerate(_chunks(shards[i], chunk_size))]
    n_chunks = Counter(i for i, _, _ in todo)
    pending: dict[int, list[ChunkResult]] = {i: [] for i in missing}
    t0, compute_s = time.perf_counter(), 0.0
    n_todo = sum(len(shards[i]) for i in missing)
    bar = tqdm(total=n_todo, desc="masks", unit="img", disable=not progress or n_todo == 0, smoothing=0.1)
    done_shards = len(shards) - len(missing)
    if on_shard:
        on_shard(done_shards, len(shards))
    try:
        for res in _execute(todo, estimator, post, store_soft, client, proposals):
            bar.update(len(res.records) + len(res.skipped))
            compute_s += res.seconds
            pending[res.shard].append(res)
            if len(pending[res.shard]) == n_chunks[res.shard]:
                parts = sorted(pending.pop(res.shard), key=lambda r: r.chunk)
                records = [r for part in parts for r in part.records]
                for part in parts:
                    skipped.update(dict(part.skipped))
                if skipped:
                    atomic_write_json(out_dir / SKIPPED_FILE, dict(sorted(skipped.items())))
                if records:
                    write_mask_shard(out_dir / shard_name(res.shard), records,
                                     {**shard_attrs, "shard": res.shard})
                done_shards += 1
                if on_shard:
                    on_shard(done_shards, len(shards))
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    return summarize(out_dir, skipped, n_computed=n_todo, wall_s=wall, compute_s=compute_s)


def _execute(todo, estimator, post, store_soft, client, proposals=None) -> Iterator[ChunkResult]:
    """Yield chunk results as they complete, with a bounded number in flight."""
    if client is None:
        for shard, chunk, samples in todo:
            yield compute_chunk(shard, chunk, samples, estimator, post, store_soft, proposals)
        return
    from distributed import as_completed

    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    window = 4 * n_workers
    [est] = client.scatter([estimator], broadcast=True)
    queue = iter(todo)

    def submit(item):
        shard, chunk, samples = item
        return client.submit(compute_chunk, shard, chunk, samples, est, post, store_soft, proposals,
                             key=f"masks-{shard:05d}-{chunk:04d}-{id(todo):x}", retries=1)

    first = [submit(item) for _, item in zip(range(window), queue)]
    stream = as_completed(first)
    for future in stream:
        result = future.result()
        future.release()
        nxt = next(queue, None)
        if nxt is not None:
            stream.add(submit(nxt))
        yield result


def _load_skipped(out_dir: Path) -> dict[str, str]:
    path = out_dir / SKIPPED_FILE
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            return dict(json.load(fh))
    return {}


def summarize(out_dir: Path, skipped: dict[str, str], **timing: float) -> dict[str, Any]:
    store = MaskStore(out_dir)
    table = store.table()
    kept = table["kept"]
    reasons = Counter(str(r) for r, k in zip(table["reason"], kept) if not k)
    n = int(kept.size)
    summary: dict[str, Any] = {
        "schema_version": PROPOSALS_SCHEMA_VERSION if store.has_proposals else SCHEMA_VERSION,
        "n_images": n,
        "n_kept": int(kept.sum()),
        "n_dropped": int(n - kept.sum()),
        "n_skipped": len(skipped),
        "dropped_by_reason": dict(reasons),
        "fg_fraction_mean": float(table["fg_fraction"].mean()) if n else 0.0,
        "n_shards": len(store.shard_paths),
    }
    if store.has_proposals:
        counts = table["n_proposals"][kept]
        summary["n_proposals"] = int(counts.sum())
        summary["proposals_per_kept_image"] = round(float(counts.mean()), 3) if counts.size else 0.0
    if skipped:
        summary["skipped_examples"] = dict(list(sorted(skipped.items()))[:20])
    if timing.get("n_computed"):
        summary["images_per_s"] = round(timing["n_computed"] / max(timing["wall_s"], 1e-9), 3)
        summary["compute_s_per_image"] = round(timing["compute_s"] / timing["n_computed"], 4)
    return summary


def iter_soft_and_labels(store: MaskStore, ids: Iterable[str]) -> Iterator[tuple[str, np.ndarray | None, np.ndarray]]:
    """(id, soft map in [0,1] or None, binary mask) for each id present in the mask store."""
    for id_ in ids:
        if id_ not in store:
            continue
        rec = store.get(id_, soft=True)
        soft = rec.soft.astype(np.float32) / 255.0 if rec.soft is not None else None
        yield id_, soft, rec.mask
