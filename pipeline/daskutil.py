"""dask.distributed set-up: a local cluster by default, an existing scheduler when given an address.

``scheduler: synchronous`` runs fan-out work in this process without dask (debugging, profiling).

A dask scheduler runs whatever function a client sends it: anyone who can reach its port can run
code as its user. The local cluster therefore binds its scheduler and workers to the loopback
interface explicitly (``LOCAL_HOST``), not to whatever the library's default may become. An
external scheduler is the user's to secure (README, "Where the jobs run": a private interface,
TLS with ``distributed.security.Security``).
"""
from __future__ import annotations

import logging
import os

SYNCHRONOUS = "synchronous"
LOCAL_HOST = "127.0.0.1"  # the local cluster listens on loopback only


def make_client(scheduler: str | None, n_workers: int = 0, *, quiet: bool = False,
                env: dict[str, str] | None = None):
    """Return a ``distributed.Client``, or None for in-process execution. ``env``: extra
    environment variables of the local cluster's worker processes."""
    if scheduler == SYNCHRONOUS:
        return None
    from distributed import Client, LocalCluster

    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # importing distributed sets its own loggers (distributed.nanny, .scheduler, ...) to INFO,
        # which would print a dozen cluster start-up lines into every run's output
        for name in list(logging.root.manager.loggerDict):
            if name == "distributed" or name.startswith("distributed."):
                logging.getLogger(name).setLevel(logging.ERROR)
    if scheduler:
        try:
            return Client(scheduler, timeout="30s")
        except OSError as exc:
            raise RuntimeError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from None
    workers = n_workers or max(1, os.cpu_count() or 1)
    cluster = LocalCluster(
        host=LOCAL_HOST,  # scheduler and workers on loopback: nothing off this machine can submit
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
        # one BLAS/OpenMP thread per worker process: the parallelism is across workers
        env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})},
    )
    _quiet_loggers(logging.ERROR)
    return Client(cluster)


def _quiet_loggers(level: int) -> dict[str, int]:
    names = ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
             "distributed.core", "distributed.batched", "tornado", "asyncio")
    old = {}
    for name in names:
        logger = logging.getLogger(name)
        old[name] = logger.level
        logger.setLevel(level)
    return old


def close_client(client) -> None:
    """Close the client and, for a local cluster, its workers, without shutdown chatter."""
    if client is None:
        return
    old = _quiet_loggers(logging.CRITICAL)
    try:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None:
            cluster.close()
    finally:
        for name, level in old.items():
            logging.getLogger(name).setLevel(level)
