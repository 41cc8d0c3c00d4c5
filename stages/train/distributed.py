"""Distributed set-up and rank helpers (DINO-style) that also work in a single process.

``init_distributed`` reads the launcher's environment: torchrun (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), else SLURM (``SLURM_PROCID``,
``SLURM_NTASKS``, ``SLURM_LOCALID``; the master address is the job's first node unless
``MASTER_ADDR`` is set), else a single process with no process group. Every other helper
answers for a single process when no process group exists, so the training code has one path.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its
    node, ``backend`` (None without a process group), and whether this call ``created`` the group
    (then :func:`shutdown_distributed` should destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    created: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _slurm_master() -> str:
    """First host of the SLURM job (``scontrol show hostnames``), or localhost for one node."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"cannot resolve the SLURM master node from {nodes!r} ({error});"
                           " set MASTER_ADDR") from None
    return out[0] if out else "127.0.0.1"


def launcher_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun or SLURM variables, else None.

    For SLURM the torchrun variables are filled in (``MASTER_ADDR``/``MASTER_PORT`` defaulted),
    so ``init_process_group("env://")`` works the same way for both.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _int_env("RANK"), _int_env("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS"), int(os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_ADDR", _slurm_master())
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
        return rank, world, local
    return None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group the launcher describes, or stay a single process.

    Idempotent: an existing group is reported as it is (``created=False``). ``backend`` defaults
    to ``nccl`` when CUDA is available and ``gloo`` otherwise. With CUDA, the process's device is
    set to ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", "0")), dist.get_backend(), False)
    env = launcher_env()
    if env is None or env[1] <= 1:
        return DistInfo(local_rank=env[2] if env else 0)
    rank, world, local = env
    if not dist.is_available():
        raise RuntimeError(f"the launcher asks for {world} processes but torch.distributed is unavailable")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, init_method="env://", world_size=world, rank=rank)
    return DistInfo(rank, world, local, backend, True)


def shutdown_distributed(info: DistInfo) -> None:
    """Destroy the process group if ``info`` says :func:`init_distributed` created it."""
    if info.created and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


@torch.no_grad()
def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 in rank order (no gradient).

    Every rank must pass the same shape. In a single process it returns ``tensor`` itself.
    """
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor); ``tensor`` unchanged in a single process."""
    if not is_dist():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
