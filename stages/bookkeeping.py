"""The one declaration of bookkeeping keys: settings that change how a stage runs (speed, memory,
disk use, where it runs) but never what it produces.

Everything that decides whether work can be reused reads this table and nothing else:
- artifact versions (``pipeline.config.Config.section``, hence every stage's parameters);
- the parameters a resumed training compares with its checkpoint (``stages.train.trainer``);
- the parameters an extraction records in its shards and compares on resume (``stages.extract``);
- the README's configuration table, which marks each of these keys.

Keys are grouped by config section (dotted); the stage parameter objects use the same field names
as their config section. Only worker counts, the device setting, inference batch sizes, how many
checkpoints to keep and where the scheduler is belong here. The device setting is bookkeeping
because what it changes in results, the device type and the precision, enters the train and
extract versions resolved (``stages.network.compute``): ``auto`` and ``cpu`` on a machine without
CUDA, or ``cuda:0`` and ``cuda:1``, name one artifact.

The ``clusters`` section has no entry: every one of its keys changes the partition or the pictures
(the stage runs in-process on the CPU, with no worker count or device to set);
``tests/pipeline/test_versions.py`` checks that each ``clusters`` key moves its version.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

BOOKKEEPING: Mapping[str, frozenset[str]] = MappingProxyType({
    "masks.model": frozenset({"threads"}),
    "masks.features": frozenset({"threads"}),
    "masks.bootstrap": frozenset({"num_workers", "device"}),
    "train": frozenset({"keep_last", "num_workers", "device"}),
    "extract": frozenset({"batch_size", "num_workers", "device"}),
    "dask": frozenset({"scheduler", "n_workers"}),
})

#: Bookkeeping keys that entered artifact versions before they were declared bookkeeping. They enter
#: the version hash at this fixed value, whatever is configured, so the versions made with the
#: default keep their names (and a different value no longer makes a new version).
HASHED_AS: Mapping[str, Any] = MappingProxyType({"train.keep_last": 2})


def is_bookkeeping(section: str, name: str) -> bool:
    """True when ``<section>.<name>`` does not change any result."""
    return name in BOOKKEEPING.get(section, ())


def without_bookkeeping(section: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (a stage's parameters, keyed by field name) without the section's bookkeeping keys."""
    return {k: v for k, v in params.items() if not is_bookkeeping(section, k)}
