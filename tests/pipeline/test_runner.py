"""The runner: a stage leaves the process environment as it found it."""
from __future__ import annotations

import os

import pytest

from artifacts.store import ArtifactSpec, Store
from pipeline.config import Config
from pipeline.graph import Context, Planned, StageDef
from pipeline.runner import StageFailed, run_one

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")


def _planned(run) -> Planned:
    definition = StageDef(name="masks", schema_version=1, help="test stage", needs=lambda cfg: (),
                          params=lambda ctx: {}, run=run)
    return Planned(definition, ArtifactSpec("masks", 1, {"test": True}))


def _context(tmp_path) -> Context:
    return Context(cfg=Config(), store=Store(tmp_path / "store"), quiet=True)


@pytest.fixture
def environment(monkeypatch):
    """A known starting point: one variable set, the thread variables unset."""
    monkeypatch.setenv("MASKCONTRAST_TEST_KEPT", "before")
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)


def _poison(ctx, writer, inputs):
    """What a dask nanny does to the process that starts a LocalCluster, and a bit more."""
    os.environ.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    os.environ["MASKCONTRAST_TEST_KEPT"] = "changed"
    del os.environ["MASKCONTRAST_TEST_KEPT"]
    os.environ["MASKCONTRAST_TEST_NEW"] = "x"
    return {"ok": 1}


def test_stage_environment_changes_are_undone(tmp_path, environment):
    before = dict(os.environ)
    result = run_one(_context(tmp_path), _planned(_poison))
    assert result.action == "ran"
    assert dict(os.environ) == before


def test_stage_environment_restored_when_the_stage_fails(tmp_path, environment):
    def fail(ctx, writer, inputs):
        _poison(ctx, writer, inputs)
        raise RuntimeError("boom")

    before = dict(os.environ)
    with pytest.raises(StageFailed, match="stage masks failed .*boom"):
        run_one(_context(tmp_path), _planned(fail))
    assert dict(os.environ) == before


def test_only_train_runs_under_torchrun(tmp_path, monkeypatch):
    # every torchrun rank would compute and write a masks / extract / evaluate artifact
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    ran = []
    with pytest.raises(StageFailed, match="stage masks does not run under torchrun .* without torchrun"):
        run_one(_context(tmp_path), _planned(lambda ctx, writer, inputs: ran.append(1) or {}))
    assert ran == []


@pytest.mark.slow
@pytest.mark.distributed
def test_local_cluster_does_not_set_thread_variables_for_later_stages(tmp_path, environment):
    """A real dask LocalCluster started inside a stage (the masks stage's fan-out)."""
    from pipeline.daskutil import close_client, make_client

    def with_cluster(ctx, writer, inputs):
        close_client(make_client(None, 1, quiet=True))  # distributed 2024+ sets OMP_NUM_THREADS=1 here
        return {}

    run_one(_context(tmp_path), _planned(with_cluster))
    assert {k: os.environ.get(k) for k in THREAD_VARS} == dict.fromkeys(THREAD_VARS)


def test_local_cluster_binds_to_loopback_explicitly(monkeypatch):
    """The embedded cluster must not listen beyond this machine, whatever distributed's default."""
    import distributed

    from pipeline import daskutil

    made = {}

    class FakeCluster:
        def __init__(self, **kwargs):
            made.update(kwargs)

    monkeypatch.setattr(distributed, "LocalCluster", FakeCluster)
    monkeypatch.setattr(distributed, "Client", lambda cluster, **kw: ("client", cluster))
    daskutil.make_client(None, 1, quiet=True, env={"MASKCONTRAST_MAX_PIXELS": "123"})
    assert made["host"] == "127.0.0.1" == daskutil.LOCAL_HOST
    assert made["dashboard_address"] is None
    assert made["env"]["MASKCONTRAST_MAX_PIXELS"] == "123" and made["env"]["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow
@pytest.mark.distributed
def test_real_local_cluster_listens_on_loopback_only():
    from pipeline.daskutil import close_client, make_client

    client = make_client(None, 1, quiet=True)
    try:
        info = client.scheduler_info()
        addresses = [client.scheduler.address, *info["workers"]]
        assert addresses and all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
    finally:
        close_client(client)
