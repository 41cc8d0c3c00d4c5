"""The stage graph: which stages exist, what each needs, and how its artifact version is resolved.

The stage definitions (``pipeline.stagedefs``) turn the configuration (plus the dataset index)
into an ``ArtifactSpec``: its parameters (only the keys that change results) and the exact
versions of its inputs. The runner compares that spec with what the store holds, so planning
reads manifests and file sizes, never file contents.
"""
from __future__ import annotations

from typing import Mapping

from artifacts.store import ArtifactSpec
from pipeline.context import Context, Planned, StageDef  # noqa: F401  (the graph's vocabulary)
from pipeline.stagedefs import DEFINITIONS

#: Pipeline order.
ORDER = tuple(d.name for d in DEFINITIONS)

#: The stages by name (tests may swap a definition for another).
STAGES: dict[str, StageDef] = {d.name: d for d in DEFINITIONS}


def available() -> tuple[str, ...]:
    return tuple(s for s in ORDER if s in STAGES)


def plan(ctx: Context, targets: tuple[str, ...] | None = None, *,
         pinned: Mapping[str, str] | None = None) -> dict[str, Planned]:
    """Resolve the specs of ``targets`` and everything they need, upstream first.

    ``pinned`` maps a stage name to an existing artifact reference (``{"train": "train/ab12..."}``)
    that the stages downstream take as their input instead of the configured stage's version; a
    pinned stage is neither planned nor run (evaluating a model other than the configured one).
    """
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
