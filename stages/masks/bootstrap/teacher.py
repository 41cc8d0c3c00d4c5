"""The fit's first pseudo-labels: the teacher's map (hand-crafted priors or another estimator) and
the image of every sample at the input size, computed once (in worker processes if asked) and
cached in the ``work_dir`` as ``priors-<key>.npz``."""
from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np

from stages.data import BadInputError, Sample, load_image
from stages.masks.priors import PriorParams, priors_saliency

from .maps import resize_square, to_u8
from .workdir import BootstrapError, save_npz

Teacher = Union[PriorParams, Callable[[np.ndarray], np.ndarray]]


def teacher_map(teacher: Teacher, img: np.ndarray) -> np.ndarray:
    """The first pseudo-label of an image: the hand-crafted priors, or another estimator's map."""
    if isinstance(teacher, PriorParams):
        return priors_saliency(img, teacher)
    return np.clip(np.asarray(teacher(img), dtype=np.float32), 0.0, 1.0)


def teacher_config(teacher: Teacher) -> dict[str, Any]:
    """What names a teacher in the fit file and the cache key (the priors' parameters as before)."""
    return asdict(teacher) if isinstance(teacher, PriorParams) else {"teacher": teacher.describe()}


def _prepare_one(task: tuple[str, str, int, Teacher]) -> tuple[str, np.ndarray | None, np.ndarray | None, str]:
    """(id, image path, size, teacher) -> (id, teacher map u8 S x S, image u8 S x S x 3, error)."""
    sample_id, path, size, prior_params = task
    try:
        img = load_image(path)
        prior = teacher_map(prior_params, img)  # H x W in [0, 1]
    except (BadInputError, ValueError) as exc:
        return sample_id, None, None, str(exc)
    return sample_id, to_u8(resize_square(prior, size)), resize_square(img, size), ""


def _load_one(task: tuple[str, str, int]) -> tuple[str, np.ndarray | None, str]:
    """(id, image path, size) -> (id, image u8 S x S x 3, error)."""
    sample_id, path, size = task
    try:
        return sample_id, resize_square(load_image(path), size), ""
    except BadInputError as exc:
        return sample_id, None, str(exc)


def _map(fn, tasks: list, workers: int, progress: bool, what: str) -> list:
    """Ordered results of ``fn`` over ``tasks``, in this process or in ``workers`` spawned processes."""
    t0 = time.perf_counter()
    out = []
    pool = get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(fn, tasks, chunksize=4) if pool else map(fn, tasks)
        for i, res in enumerate(results, 1):
            out.append(res)
            if progress and (i % 100 == 0 or i == len(tasks)):
                print(f"bootstrap: {what} {i}/{len(tasks)} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if pool:
            pool.close()
            pool.join()
    return out


def _priors_key(samples: list[Sample], prior_params: Teacher, size: int) -> str:
    """Short hash naming the prior cache: the images, the teacher and the size."""
    h = hashlib.sha256(json.dumps([teacher_config(prior_params), size], sort_keys=True).encode())
    for s in samples:
        h.update(f"{s.id}\0{s.image}\n".encode())
    return h.hexdigest()[:16]


def prepare_data(
    samples: list[Sample], prior_params: Teacher, size: int, work_dir: Path, workers: int, progress: bool
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, str]]:
    """(kept ids, images N x S x S x 3 u8, prior maps N x S x S u8, skipped id -> reason).

    The prior maps are cached in ``work_dir``; the images are decoded again on every call (they
    are not copied into the artifact store) and held in memory: N x S x S x 3 bytes.
    """
    cache = work_dir / f"priors-{_priors_key(samples, prior_params, size)}.npz"
    if cache.exists():
        with np.load(cache) as z:
            ids, priors = [str(i) for i in z["ids"]], z["maps"]
            skipped = dict(zip((str(i) for i in z["skipped_ids"]), (str(r) for r in z["skipped_reasons"])))
        by_id = {s.id: s for s in samples}
        loaded = _map(_load_one, [(i, str(by_id[i].image), size) for i in ids], workers, progress, "images")
        bad = {i: err for i, _, err in loaded if err}
        if bad:  # readable when the priors were computed, not any more
            raise BootstrapError(f"{work_dir}: images became unreadable since the priors were cached: {bad}")
        return ids, np.stack([img for _, img, _ in loaded]), priors, skipped
    tasks = [(s.id, str(s.image), size, prior_params) for s in samples]
    results = _map(_prepare_one, tasks, workers, progress, "priors")
    skipped = {i: err for i, _, _, err in results if err}
    kept = [(i, p, img) for i, p, img, err in results if not err]
    if not kept:
        raise BootstrapError(f"no readable image among the {len(samples)} samples (first error: {next(iter(skipped.values()), '')})")
    ids = [i for i, _, _ in kept]
    priors = np.stack([p for _, p, _ in kept])
    save_npz(cache, ids=np.array(ids), maps=priors, skipped_ids=np.array(list(skipped), dtype=str),
              skipped_reasons=np.array(list(skipped.values()), dtype=str))
    return ids, np.stack([img for _, _, img in kept]), priors, skipped
