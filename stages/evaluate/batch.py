"""Batch evaluation of many models x protocols x seeds with dask.distributed.

A :class:`Job` names everything by path (dataset root, embedding stores), so a worker needs only
the shared filesystem: it opens the dataset index and the stores itself, runs one protocol
runner of :mod:`stages.evaluate.protocols` (through :func:`stages.evaluate.stage.run_protocol`) and writes that job's pictures and ``metrics.json``
under ``<out_dir>/<model>/<protocol>/seed-<seed>/``. Jobs are submitted with explicit keys and
``retries=``, and consumed with ``as_completed``; a job that still fails after its retries is
reported in the table (status ``failed`` and its error) and the batch goes on (the caller decides
what an incomplete table means: the ``compare`` artifact stays incomplete and a rerun with
``resume=True`` runs only the jobs without a ``metrics.json``). Every attempt
appends a line (time, host, pid) to the job directory's ``attempts.log``.

The results gather into ``comparison.json`` (rows model x protocol with mIoU mean ± std over
seeds, plus one entry per job), ``comparison.md`` and ``comparison.png``. The table depends only
on the jobs' results, never on the order they finish in, so ``client=None`` (in this process,
one job after another) gives the same table as a cluster.

Per-seed K-means jobs of one model share the per-image label counts of a split through
``<out_dir>/<model>/cache/`` (written atomically, so concurrent writers are harmless).

From the command line, ``maskcontrast evaluate --model train/V1 --model train/V2 [--scheduler
tcp://host:port]`` makes these jobs for the configured protocols and seeds and writes the table
into a versioned ``compare`` artifact.

On a SLURM cluster (dask-jobqueue, the ``cluster`` extra; not run by the tests)::

    from dask_jobqueue import SLURMCluster
    from distributed import Client

    cluster = SLURMCluster(
        queue="gpu", cores=4, processes=1, memory="32GB", walltime="02:00:00",
        job_extra_directives=["--gres=gpu:1"],          # one GPU per dask worker (linear probe)
        job_script_prologue=["source /shared/venv/bin/activate"],
        local_directory="$TMPDIR",
    )
    cluster.scale(jobs=8)                               # 8 SLURM jobs, one worker each
    client = Client(cluster)
    jobs = [job for name, store in checkpoints.items()
            for job in jobs_for(name, "/shared/VOC2012", val_store=store / "val",
                                train_store=store / "train", protocols=("kmeans", "retrieval", "linear"),
                                seeds=(1234, 1235, 1236, 1237, 1238))]
    table = run_batch(jobs, client, Path("/shared/store/comparisons/run-01"), retries=2)
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from artifacts.atomic import atomic_write_json, atomic_write_text
from stages.evaluate.figures import comparison_markdown, comparison_png

__all__ = ["PROTOCOLS", "Job", "jobs_for", "run_batch", "run_job"]

PROTOCOLS = ("kmeans", "pixel_kmeans", "retrieval", "linear")
_NEEDS_TRAIN = ("retrieval", "linear")
_SEEDED = ("kmeans", "pixel_kmeans", "linear")


def _slug(text: str) -> str:
    """A file- and key-safe name: runs of other characters become '-'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-") or "model"


@dataclass(frozen=True)
class Job:
    """One protocol run on one model's embeddings, described by paths only.

    ``model``: the name the table shows (e.g. a train artifact version or a checkpoint name).
    ``seed``: the K-means seed / linear-probe seed; None for retrieval (deterministic) or to run a
    protocol's default seeds in one job. ``train_store`` / ``train_split``: the split the protocol
    learns from: the linear probe's training set, retrieval's memory bank. ``params``: extra
    keyword arguments of the runner (e.g. ``n_clusters``, ``pca_dim``, ``epochs``,
    ``class_subset``), JSON values.
    """

    model: str
    protocol: str
    seed: int | None
    dataset_root: str
    val_store: str
    train_store: str | None = None
    val_split: str = "val"
    train_split: str = "train"
    dataset_layout: str = "auto"
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)  # a dict: left out of hash()

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Job {self.model!r}: protocol must be one of {', '.join(PROTOCOLS)}, "
                             f"got {self.protocol!r}")
        if self.protocol in _NEEDS_TRAIN and not self.train_store:
            raise ValueError(f"Job {self.model!r}: the {self.protocol} protocol needs train_store "
                             "(the train split's embedding artifact)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "params": dict(self.params)}

    @property
    def key(self) -> str:
        """Explicit dask key: readable prefix + a hash of the whole job (unique per job)."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:10]
        seed = "all" if self.seed is None else self.seed
        return f"evaluate-{_slug(self.model)}-{self.protocol}-seed-{seed}-{digest}"

    @property
    def subdir(self) -> Path:
        """The job's directory under the batch's out_dir."""
        return Path(_slug(self.model)) / self.protocol / ("default-seeds" if self.seed is None else f"seed-{self.seed}")


def jobs_for(model: str, dataset_root: str | os.PathLike, *, val_store: str | os.PathLike,
             train_store: str | os.PathLike | None = None, bank_store: str | os.PathLike | None = None,
             protocols: Sequence[str] = ("kmeans", "retrieval"),
             seeds: Sequence[int] = (1234, 1235, 1236, 1237, 1238), val_split: str = "val",
             train_split: str = "train", bank_split: str | None = None, dataset_layout: str = "auto",
             params: Mapping[str, Mapping[str, Any]] | None = None) -> list[Job]:
    """The jobs of one model: one per seed for the seeded protocols, one for retrieval.
    ``params[protocol]`` holds that protocol's extra runner arguments. Pictures are drawn for
    the first seed only (``figures=False`` for the others) unless ``params`` says otherwise.

    Retrieval's memory bank is ``bank_store``, the embeddings of split ``bank_split`` (give both
    or neither; the reference's bank is VOC ``train`` while training uses ``trainaug``), else the
    train split's; the linear probe always trains on ``train_store``."""
    if (bank_store is None) != (bank_split is None):
        raise ValueError(f"jobs_for {model!r}: give bank_store and bank_split together (got bank_store="
                         f"{bank_store!r}, bank_split={bank_split!r})")
    params = params or {}
    jobs = []
    for protocol in protocols:
        learn_store, learn_split = ((bank_store, bank_split) if protocol == "retrieval" and bank_split is not None
                                    else (train_store, train_split))
        for n, seed in enumerate(seeds if protocol in _SEEDED else (None,)):
            extra = {"figures": n == 0, **params.get(protocol, {})}
            jobs.append(Job(model, protocol, None if seed is None else int(seed), str(dataset_root), str(val_store),
                            None if learn_store is None else str(learn_store), val_split, learn_split,
                            dataset_layout, extra))
    return jobs


def run_job(job: Job, out_dir: str) -> dict[str, Any]:
    """Run one job (on a worker or here): its runner's metrics, also written to the job's
    ``metrics.json``. Raises whatever the runner raises."""
    from stages.data import DatasetIndex
    from stages.evaluate.report import write_metrics
    from stages.evaluate.stage import run_protocol

    job_dir = Path(out_dir) / job.subdir
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / "attempts.log", "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} host={socket.gethostname()} pid={os.getpid()}\n")
    dataset = DatasetIndex.open(job.dataset_root, job.dataset_layout)
    cache = Path(out_dir) / _slug(job.model) / "cache"
    metrics = run_protocol(job.protocol, dataset, job_dir, val_store=job.val_store, val_split=job.val_split,
                           learn_store=job.train_store, learn_split=job.train_split,
                           seeds=None if job.seed is None else [job.seed],
                           cache_dir=cache, progress=False,
                           **dict(job.params))
    write_metrics(job_dir, {job.protocol: metrics})
    return metrics


def _seed_values(job: Job, metrics: Mapping[str, Any]) -> list[tuple[int | None, float]]:
    """(seed, mIoU) pairs a job contributes: each seed of a multi-seed run, else its one figure."""
    per_seed = metrics.get("per_seed")
    if isinstance(per_seed, list) and per_seed and all("seed" in r and "miou" in r for r in per_seed):
        return [(int(r["seed"]), float(r["miou"])) for r in per_seed]
    seeds = metrics.get("seeds") or []
    return [(int(seeds[0]) if seeds else job.seed, float(metrics["miou"]))]


_EXTRA = ("miou_subset", "miou_best_on_val", "miou_crf")  # other headline figures, averaged over a row's jobs


def _table(jobs: Sequence[Job], results: Mapping[str, tuple[str, Any]]) -> dict[str, Any]:
    """Rows model x protocol (in the jobs' order) and one entry per job."""
    groups: dict[tuple[str, str], list[Job]] = {}
    for job in jobs:
        groups.setdefault((job.model, job.protocol), []).append(job)
    rows = []
    for (model, protocol), members in groups.items():
        pairs: list[tuple[int | None, float]] = []
        extra: dict[str, list[float]] = {}
        errors = []
        for job in members:
            status, value = results[job.key]
            if status == "ok":
                pairs += _seed_values(job, value)
                for k in _EXTRA:
                    if isinstance(value.get(k), (int, float)):
                        extra.setdefault(k, []).append(float(value[k]))
            else:
                errors.append(f"seed {job.seed}: {value}" if job.seed is not None else str(value))
        values = np.array([v for _, v in pairs])
        row: dict[str, Any] = {
            "model": model, "protocol": protocol,
            "miou": float(values.mean()) if values.size else None,
            "miou_std": float(values.std(ddof=1)) if values.size > 1 else (0.0 if values.size else None),
            "seeds": [s for s, _ in pairs if s is not None],
            "per_seed": [{"seed": s, "miou": v} for s, v in pairs],
            "n_jobs": len(members), "n_failed": len(errors),
            "status": "ok" if not errors else ("failed" if len(errors) == len(members) else "partial"),
            "errors": errors,
        }
        row.update({k: float(np.mean(v)) for k, v in extra.items()})
        rows.append(row)
    entries = []
    for job in jobs:
        status, value = results[job.key]
        entries.append({"key": job.key, "model": job.model, "protocol": job.protocol, "seed": job.seed,
                        "status": status, "dir": str(job.subdir),
                        "miou": float(value["miou"]) if status == "ok" else None,
                        "error": None if status == "ok" else value})
    return {"rows": rows, "jobs": entries}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _finished(job: Job, out: Path) -> dict[str, Any] | None:
    """The metrics a previous run of ``job`` left in ``out`` (its ``metrics.json`` is written
    atomically and last, so its presence means the job finished), or None."""
    path = out / job.subdir / "metrics.json"
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)[job.protocol]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"run_batch: cannot reuse {path}: expected a JSON object with key "
                         f"{job.protocol!r} ({exc}); delete it to rerun that job") from exc


def run_batch(jobs: Iterable[Job], client: Any, out_dir: str | os.PathLike, retries: int = 1, *,
              progress: bool = True, resume: bool = False,
              on_job: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Run every job on the dask ``client`` (None: here, one after another), each tried up to
    1 + ``retries`` times; write ``comparison.json`` / ``.md`` / ``.png`` into ``out_dir`` and
    return the table ``{"rows": [...], "jobs": [...]}``. Failed jobs are reported, not raised.

    ``resume``: a job whose ``metrics.json`` is already in ``out_dir`` (an interrupted run of the
    same batch) is read back, not rerun. ``on_job(done, total)`` is called as jobs finish."""
    from tqdm import tqdm

    jobs = list(jobs)
    if retries < 0:
        raise ValueError(f"run_batch: retries must be >= 0, got {retries}")
    keys = [job.key for job in jobs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"run_batch: duplicate jobs (same model, protocol, seed and inputs): {dup[:3]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, tuple[str, Any]] = {}
    if resume:
        for job in jobs:
            metrics = _finished(job, out)
            if metrics is not None:
                results[job.key] = ("ok", metrics)
    todo = [job for job in jobs if job.key not in results]
    bar = tqdm(total=len(jobs), initial=len(results), desc="evaluate batch", unit="job", disable=not progress)

    def done() -> None:
        bar.update(1)
        if on_job is not None:
            on_job(len(results), len(jobs))

    try:
        if client is None:
            for job in todo:
                for attempt in range(retries + 1):
                    try:
                        results[job.key] = ("ok", run_job(job, str(out)))
                        break
                    except Exception as exc:  # reported in the table, as on a cluster
                        results[job.key] = ("failed", _error(exc))
                done()
        else:
            from distributed import as_completed

            futures = {client.submit(run_job, job, str(out), key=job.key, retries=retries, pure=False): job
                       for job in todo}
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    results[job.key] = ("ok", fut.result())
                except Exception as exc:
                    results[job.key] = ("failed", _error(exc))
                fut.release()
                done()
    finally:
        bar.close()
    table = _table(jobs, results)
    atomic_write_json(out / "comparison.json", table)
    atomic_write_text(out / "comparison.md", comparison_markdown(table["rows"]))
    comparison_png(table["rows"], out / "comparison.png")
    return table
