"""Run planned stages against the store: skip what is complete, continue what is partial.

``--force`` recomputes a stage from scratch (its version directory is cleared first; the version
name is unchanged because the inputs and parameters are) and takes over a lock recorded by a
process on another host (see ``artifacts.lock``). The kernel frees the lock of a dead process, so
rerunning after a crash or a kill simply continues.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from artifacts.store import COMPLETE, Store
from pipeline.graph import ORDER, Context, Planned, plan

log = logging.getLogger("maskcontrast")


class StageFailed(RuntimeError):
    """A stage raised; the message names the stage, its directory and the cause."""


@dataclass(frozen=True)
class StageResult:
    name: str
    version: str
    path: Path
    action: str  # skipped | ran | resumed
    seconds: float
    summary: Mapping[str, Any]


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the package version."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=root, capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        if out:
            return f"git:{out}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"pkg:{metadata.version('maskcontrast-pipeline')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def run_stages(ctx: Context, targets: tuple[str, ...], *, force_stages: tuple[str, ...] = (),
               start: str | None = None) -> list[StageResult]:
    """Run ``targets`` (and, when missing, what they need) in pipeline order. Stages before
    ``start`` are only read (they must be complete); those in ``force_stages`` are recomputed."""
    planned = plan(ctx, targets)
    lo = ORDER.index(start) if start else 0
    return [run_one(ctx, p, force=name in force_stages) for name, p in planned.items() if ORDER.index(name) >= lo]


def _rank() -> tuple[int, int]:
    """(rank, world size) under torchrun / SLURM; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    return rank, world


DISTRIBUTED_STAGES = ("train",)  # stages that run on every torchrun rank (the others fan out with dask)


class FollowerWriter:
    """What a non-zero torchrun rank gets instead of an ArtifactWriter: the path, and no writes.

    Rank 0 holds the lock and owns the manifest; the stage function itself writes files on
    rank 0 only, so the other ranks just take part in the computation.
    """

    def __init__(self, path: Path):
        self.path = path
        self.resumed = False

    def set_progress(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass


def run_one(ctx: Context, p: Planned, *, force: bool = False) -> StageResult:
    store: Store = ctx.store
    info = store.info(p.name, p.version)
    if info.state == COMPLETE and not force:
        log.info("%s %s: complete, skipped", p.name, p.version)
        return StageResult(p.name, p.version, info.path, "skipped", 0.0, info.summary)
    rank, world = _rank()
    if world > 1:
        # WORLD_SIZE only: SLURM_NTASKS is also set in a one-process batch script of a multi-task job
        if p.name not in DISTRIBUTED_STAGES and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            raise StageFailed(f"stage {p.name} does not run under torchrun ({world} processes would each compute "
                              f"and write it): run `maskcontrast {p.name}` (or `run`) without torchrun; only "
                              f"{', '.join(DISTRIBUTED_STAGES)} uses several processes")
        return _run_distributed(ctx, p, rank)
    inputs = {up: _input(ctx, ref) for up, ref in p.spec.inputs.items()}
    return _run_writer(ctx, p, inputs, force=force)


@contextmanager
def stage_environment(settings: Mapping[str, str] | None = None) -> Iterator[None]:
    """Set ``settings`` (variables that carry configuration into the processes a stage starts,
    e.g. ``Context.image_environment``) for the stage, and undo, when it ends, whatever it changed
    in this process's environment variables.

    Stages share nothing in memory, and that includes ``os.environ``. The case that needs it:
    starting a dask ``LocalCluster`` sets ``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``,
    ``OPENBLAS_NUM_THREADS=1`` and ``MALLOC_TRIM_THRESHOLD_`` in *this* process (distributed's
    nanny applies ``distributed.nanny.pre-spawn-environ`` to ``os.environ`` before spawning its
    workers and never undoes it). A later stage that first loads torch (or faiss) in the same
    process then ran on one thread: slower, and with other float results than the same stage in a
    process that skipped the cluster (a rerun after a kill), as reduction order follows the thread
    count. Resumed runs must end with the bits of uninterrupted ones.
    """
    before = dict(os.environ)
    try:
        os.environ.update(settings or {})
        yield
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def _run_writer(ctx: Context, p: Planned, inputs: Mapping[str, Any], *, force: bool) -> StageResult:
    store: Store = ctx.store
    t0 = time.perf_counter()
    extra = {"config": ctx.cfg.to_dict(), "config_source": ctx.config_source}
    try:
        with store.begin(p.spec, code_version=ctx.code_version, extra=extra, break_lock=force,
                         restart=force) as writer:
            action = "resumed" if writer.resumed else "ran"
            log.info("%s %s: %s in %s", p.name, p.version, "continuing" if writer.resumed else "starting", writer.path)
            with stage_environment(ctx.image_environment()):
                summary = p.definition.run(ctx, writer, inputs)
            writer.complete(summary)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise StageFailed(f"stage {p.name} failed ({store.path(p.name, p.version)}): {exc}") from exc
    return StageResult(p.name, p.version, writer.path, action, time.perf_counter() - t0, summary)


def _run_distributed(ctx: Context, p: Planned, rank: int) -> StageResult:
    """Under torchrun every rank runs the stage; only rank 0 locks and writes the manifest."""
    try:
        inputs = {up: _input(ctx, ref) for up, ref in p.spec.inputs.items()}
    except Exception as exc:
        raise StageFailed(f"stage {p.name} under torchrun needs its inputs complete first "
                          f"(run `maskcontrast run --to {ORDER[ORDER.index(p.name) - 1]}` without torchrun): {exc}"
                          ) from exc
    if rank == 0:
        return _run_writer(ctx, p, inputs, force=False)
    t0 = time.perf_counter()
    path = ctx.store.path(p.name, p.version)
    with stage_environment(ctx.image_environment()):
        summary = p.definition.run(ctx, FollowerWriter(path), inputs)
    return StageResult(p.name, p.version, path, "ran", time.perf_counter() - t0, summary)


def _input(ctx: Context, ref: str):
    info = ctx.store.open(ref)  # raises StoreError when the upstream is not complete
    return info
