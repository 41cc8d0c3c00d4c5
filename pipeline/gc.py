"""``maskcontrast gc``: free the disk that nothing the current configuration uses needs.

Kept: the versions the current config plans for every stage of its pipeline (complete, partial or
running: a partial one is the next run's head start; ``clusters`` included, and on unlabelled
photos every stage but ``evaluate``, which needs labels: ``pipeline.stagedefs.pipeline_stages``),
the artifacts named with ``--keep``, and, transitively, every input their manifests record.
Removed: every other version (failed, partial, or complete but superseded), and the intermediate
checkpoints of complete trainings (``model.pt`` and the last checkpoint stay). A version a live
writer holds is never touched: each deletion takes the version's lock first, and a busy version
is reported and left alone.

Planning reads manifests and sizes only; nothing is deleted unless ``apply`` is called (the CLI's
``--yes``). Like DVC's ``gc``, the rule is "keep what is in use", so run it with the config whose
artifacts you care about, and name the others with ``--keep``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from artifacts.checkpoints import list_checkpoints
from artifacts.lock import LockError
from artifacts.store import COMPLETE, RUNNING, Store, dir_size
from pipeline.context import Context
from pipeline.graph import plan


@dataclass(frozen=True)
class Doomed:
    """Something ``gc`` would delete: a whole version (``files`` empty), some of its files, or the
    remains of an interrupted deletion (``stage`` empty)."""

    path: Path
    size: int
    why: str
    stage: str = ""
    version: str = ""
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class GcPlan:
    kept: frozenset[str]  # refs
    doomed: tuple[Doomed, ...]
    busy: tuple[tuple[str, str], ...]  # (ref, why) left alone

    @property
    def size(self) -> int:
        return sum(d.size for d in self.doomed)


def kept_refs(ctx: Context, keep: tuple[str, ...] = ()) -> frozenset[str]:
    """The planned versions of every stage of the pipeline, ``keep`` (resolved refs), and all their inputs."""
    from pipeline.stagedefs import pipeline_stages

    store = ctx.store
    kept = {p.spec.ref for p in plan(ctx, pipeline_stages(ctx)).values()} | set(keep)
    stack = list(kept)
    while stack:
        stage, _, version = stack.pop().partition("/")
        info = store.info(stage, version)
        for ref in ((info.manifest or {}).get("inputs") or {}).values():
            if isinstance(ref, str) and ref not in kept:
                kept.add(ref)
                stack.append(ref)
    return frozenset(kept)


def intermediate_checkpoints(path: Path) -> list[Path]:
    """Checkpoints of a training other than the last (``model.pt`` is not a checkpoint)."""
    return [p for _, p in list_checkpoints(path)[:-1]]


def plan_gc(ctx: Context, keep: tuple[str, ...] = (), *, checkpoints_only: bool = False) -> GcPlan:
    store: Store = ctx.store
    kept = kept_refs(ctx, keep)
    doomed: list[Doomed] = []
    busy: list[tuple[str, str]] = []
    for info in store.list():
        if info.stage == "train" and info.state == COMPLETE and (info.ref in kept or checkpoints_only):
            extra = intermediate_checkpoints(info.path)
            if extra:
                names = tuple(p.relative_to(info.path).as_posix() for p in extra)
                doomed.append(Doomed(info.path, sum(p.stat().st_size for p in extra),
                                     f"{len(extra)} intermediate checkpoint(s) of a complete training",
                                     info.stage, info.version, names))
            continue
        if checkpoints_only or info.ref in kept:
            continue
        if info.state == RUNNING:
            busy.append((info.ref, "being written"))
            continue
        why = {COMPLETE: "superseded: not used by the current config or --keep",
               "failed": "failed", "partial": "partial (no complete manifest)"}.get(info.state, info.state)
        doomed.append(Doomed(info.path, dir_size(info.path), why, info.stage, info.version))
    if not checkpoints_only:
        doomed += [Doomed(p, dir_size(p), "left by an interrupted gc") for p in store.leftovers()]
    return GcPlan(kept, tuple(doomed), tuple(busy))


def apply_gc(store: Store, gc: GcPlan) -> tuple[list[tuple[Doomed, int]], list[tuple[Doomed, str]]]:
    """Delete what ``gc`` lists, each under its version's lock. Returns (done with bytes freed,
    left alone with the reason: a writer holds it)."""
    import shutil

    done, left = [], []
    for d in gc.doomed:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # taking over a dead writer's lock is expected here
                if not d.stage:
                    size = dir_size(d.path)
                    shutil.rmtree(d.path, ignore_errors=True)
                elif d.files:
                    size = store.remove_files(d.stage, d.version, list(d.files))
                else:
                    size = store.remove(d.stage, d.version)
        except LockError as exc:
            left.append((d, str(exc)))
            continue
        done.append((d, size))
    return done, left


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
