"""What a stage definition is (``StageDef``), what its glue code may use (``Context``) and a
resolved stage (``Planned``). The definitions themselves are in ``pipeline.stagedefs``; the graph
that orders and plans them is ``pipeline.graph``.
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
