"""Shared fixtures: tiny synthetic data, and paths to the real data in ../shared (skipped when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", REPO.parent / "shared"))
DAVIS = SHARED / "data" / "davis16-objects"
WEIGHTS = SHARED / "weights"
MOBILENET_V2 = WEIGHTS / "mobilenet_v2-b0353104.pth"
U2NETP = WEIGHTS / "u2netp.onnx"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set MASKCONTRAST_SHARED to the shared/ folder)")
    return path


@pytest.fixture
def davis_root() -> Path:
    return _need(DAVIS)


@pytest.fixture
def mobilenet_weights() -> Path:
    return _need(MOBILENET_V2)


@pytest.fixture
def u2netp_path() -> Path:
    return _need(U2NETP)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a whole test module: tiny tensors on a busy shared machine run
    faster and steadier without OpenMP hand-offs. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch  # lazily: only modules that use torch pay for importing it

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return  # importing torch costs seconds: only when a GPU test was selected
    import torch

    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip_gpu)
