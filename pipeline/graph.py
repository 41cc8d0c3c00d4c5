"""The stage graph: which stages exist, what each needs, and how its artifact version is resolved.

A stage definition turns the configuration (plus the dataset index) into an ``ArtifactSpec``:
its parameters (only the keys that change results) and the exact versions of its inputs. The
runner compares that spec with what the store holds, so planning reads manifests and file sizes,
never file contents.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Mapping

from artifacts.store import ArtifactSpec, ArtifactWriter, Store
from pipeline.config import Config
from stages.data import DatasetIndex

#: Pipeline order. Only stages registered in ``STAGES`` can be run.
ORDER = ("masks", "train", "extract", "clusters", "evaluate")

log = logging.getLogger("maskcontrast")


@dataclass
class Context:
    """Everything a stage's glue code may use: the config, the store, the dataset, run options."""

    cfg: Config
    store: Store
    quiet: bool = False
    force: bool = False
    code_version: str = "unknown"
    config_source: str | None = None
    _client: Any = field(default=None, repr=False)
    _client_made: bool = field(default=False, repr=False)
    _splits_resolved: bool = field(default=False, repr=False)

    @cached_property
    def dataset(self) -> DatasetIndex:
        return DatasetIndex.open(self.cfg.data.root, self.cfg.data.layout)

    def resolve_splits(self) -> None:
        """A dataset without split files (a folder of photos) has one split, ``all``: every stage then
        uses all images, whatever ``data.train_split`` / ``data.val_split`` say, and one log line says
        so. A dataset with split files keeps the configured splits (and so its versions)."""
        if self._splits_resolved:
            return
        self._splits_resolved = True
        d = self.cfg.data
        if self.dataset.splits() != ["all"] or (d.train_split, d.val_split) == ("all", "all"):
            return
        self.cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(d, train_split="all", val_split="all"))
        log.info("%s has no split files (splits/*.txt): every stage uses all %d images "
                 "(data.train_split %r and data.val_split %r read as 'all')",
                 d.root, len(self.dataset.ids()), d.train_split, d.val_split)

    def data_identity(self, split: str | None) -> dict[str, Any]:
        """What of the dataset enters a version: layout, split name and a size-based fingerprint."""
        from stages.data.io import DEFAULT_MAX_PIXELS

        ds = self.dataset
        identity = {"layout": ds.layout, "split": split or "all", "fingerprint": ds.fingerprint(split)}
        if self.cfg.data.max_pixels != DEFAULT_MAX_PIXELS:  # absent at the default: the versions made before it
            identity["max_pixels"] = self.cfg.data.max_pixels
        return identity

    def image_environment(self) -> dict[str, str]:
        """Environment variables that carry image-reading settings into every process a stage
        starts (dask workers of a local cluster, data-loader workers)."""
        from stages.data.io import MAX_PIXELS_ENV

        return {MAX_PIXELS_ENV: str(self.cfg.data.max_pixels)}

    def dask_client(self):
        """The dask client for fan-out, created on first use (local cluster unless configured).

        None means in-process execution (``dask.scheduler: synchronous``)."""
        if not self._client_made:
            from pipeline.daskutil import make_client

            self._client = make_client(self.cfg.dask.scheduler, self.cfg.dask.n_workers, quiet=self.quiet,
                                       env=self.image_environment())
            self._client_made = True
        return self._client

    def close(self) -> None:
        if self._client is not None:
            from pipeline.daskutil import close_client

            close_client(self._client)
        self._client, self._client_made = None, False


@dataclass(frozen=True)
class StageDef:
    name: str
    schema_version: int
    help: str
    #: upstream stage names this stage reads, for the given config
    needs: Callable[[Config], tuple[str, ...]]
    #: resolved parameters that determine the artifact's content
    params: Callable[[Context], Mapping[str, Any]]
    #: does the work into the writer and returns the summary figures for the manifest
    run: Callable[[Context, ArtifactWriter, Mapping[str, "Planned"]], Mapping[str, Any]]
    #: a one-line progress/summary text for ``status`` from a manifest
    describe: Callable[[Mapping[str, Any]], str] = lambda m: ""
    #: the stage's algorithm version (``stages.versions``), part of every version it makes
    algorithm_version: int | None = None


@dataclass(frozen=True)
class Planned:
    definition: StageDef
    spec: ArtifactSpec

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> str:
        return self.spec.version


STAGES: dict[str, StageDef] = {}


def register(defn: StageDef) -> StageDef:
    STAGES[defn.name] = defn
    return defn


def available() -> tuple[str, ...]:
    _load_builtin()
    return tuple(s for s in ORDER if s in STAGES)


def _load_builtin() -> None:
    # Importing the glue module registers the stages that exist in this version.
    import pipeline.stagedefs  # noqa: F401


def plan(ctx: Context, targets: tuple[str, ...] | None = None, *,
         pinned: Mapping[str, str] | None = None) -> dict[str, Planned]:
    """Resolve the specs of ``targets`` and everything they need, upstream first.

    ``pinned`` maps a stage name to an existing artifact reference (``{"train": "train/ab12..."}``)
    that the stages downstream take as their input instead of the configured stage's version; a
    pinned stage is neither planned nor run (evaluating a model other than the configured one).
    """
    _load_builtin()
    ctx.resolve_splits()
    targets = targets or available()
    pinned = dict(pinned or {})
    planned: dict[str, Planned] = {}

    def visit(name: str, chain: tuple[str, ...]) -> Planned:
        if name in planned:
            return planned[name]
        if name not in STAGES:
            from pipeline.configtypes import ConfigError

            needed_by = f" (needed by {chain[-1]} for this configuration)" if chain else ""
            raise ConfigError(f"stage {name!r}{needed_by} is not available in this version; "
                              f"available: {', '.join(available())}")
        if name in chain:
            raise RuntimeError(f"stage cycle: {' -> '.join(chain + (name,))}")
        defn = STAGES[name]
        inputs = {up: pinned[up] if up in pinned else visit(up, chain + (name,)).spec.ref
                  for up in defn.needs(ctx.cfg)}
        spec = ArtifactSpec(defn.name, defn.schema_version, dict(defn.params(ctx)), inputs, defn.algorithm_version)
        planned[name] = Planned(defn, spec)
        return planned[name]

    for t in targets:
        visit(t, ())
    order = {n: i for i, n in enumerate(ORDER)}
    return dict(sorted(planned.items(), key=lambda kv: order.get(kv[0], 99)))
