"""What a bootstrap fit keeps in its ``work_dir`` and the estimator reads back: the file names,
the round checkpoint's format, the atomic ``.npz`` writer, and the error for a fit that cannot
run or continue."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from artifacts.atomic import atomic_path

CHECKPOINT_FORMAT = "maskcontrast/bootstrap"
CHECKPOINT_VERSION = 1
FIT_FILE = "fit.json"
SKIPPED_FILE = "skipped.json"


class BootstrapError(ValueError):
    """A fit that cannot run or continue: no usable image, a foreign work_dir, not a checkpoint."""


def round_checkpoint(work_dir: Path, round_: int) -> Path:
    """Path of the network checkpoint written after round ``round_`` (1-based)."""
    return Path(work_dir) / f"round-{round_}.pt"


def round_labels(work_dir: Path, round_: int) -> Path:
    """Path of the pseudo-labels after round ``round_`` (round 0: the prior maps' copy is not written)."""
    return Path(work_dir) / f"labels-{round_}.npz"


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)
