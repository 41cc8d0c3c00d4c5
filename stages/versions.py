"""Algorithm versions: one number per stage that enters every artifact version the stage makes.

Bump a stage's number in the same commit as any change that alters what the stage produces (a
different mask, weight, prototype or figure; not a change of speed, memory or messages). Its
artifacts then get new versions, and those made by the old code are no longer reused as if the new
code had made them, nor continued by it half-way. ``tests/pipeline/test_real_chain.py`` runs each
stage on a tiny fixed input and pins a digest of its result per algorithm version: a change of
result without a bump fails there, naming the stage to bump.

One number per stage, whatever the method (``masks.method``): bumping ``masks`` for a change of
the priors also renames the masks of ``model``. Coarse, but never wrong.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

ALGORITHM_VERSIONS: Mapping[str, int] = MappingProxyType({
    "masks": 1,
    "train": 1,
    "extract": 1,
    "clusters": 2,  # 2: K-means in the discriminant space by default (clusters.space)
    "evaluate": 1,
    "compare": 1,
})
