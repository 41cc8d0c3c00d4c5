"""Distributed helpers without a process group, launcher variables, and a real 2-process run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from artifacts.checkpoints import LOG_FILE, read_jsonl
from artifacts.masks import MaskRecord, Proposal, write_mask_shard
from stages.train import distributed as D

REPO = Path(__file__).resolve().parents[3]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                 "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No launcher variables; whatever the code under test sets is undone afterwards."""
    for name in LAUNCHER_VARS:
        monkeypatch.setenv(name, "")  # recorded, so that teardown removes what the test adds
        monkeypatch.delenv(name)
    return monkeypatch


def test_single_process_without_a_process_group(clean_env) -> None:
    info = D.init_distributed()
    assert info == D.DistInfo() and not info.distributed and not info.created
    assert D.is_main() and D.get_rank() == 0 and D.world_size() == 1 and not D.is_dist()
    t = torch.arange(6.0).view(3, 2)
    assert D.all_gather_tensor(t) is t and D.all_reduce_mean(t) is t
    assert D.all_gather_object({"a": 1}) == [{"a": 1}]
    D.barrier()
    D.shutdown_distributed(info)  # nothing to destroy


def test_launcher_env_reads_torchrun_variables(clean_env) -> None:
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    assert D.launcher_env() == (3, 4, 1)
    clean_env.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        D.launcher_env()


def test_launcher_env_translates_slurm_variables(clean_env) -> None:
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("MASTER_ADDR", "node07")
    assert D.launcher_env() == (5, 8, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["MASTER_ADDR"] == "node07" and os.environ["MASTER_PORT"] == str(D.DEFAULT_PORT)


def test_a_single_slurm_task_is_a_single_process(clean_env) -> None:
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    assert D.launcher_env() is None
    assert D.init_distributed() == D.DistInfo()


WORKER = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[1])
    from stages.data import Sample
    from stages.train.trainer import Trainer, TrainParams

    spec = json.loads(Path(sys.argv[2]).read_text())
    torch.set_num_threads(1)
    samples = [Sample(i, Path(p), None) for i, p in spec["samples"]]
    trainer = Trainer(TrainParams(**spec["params"]), samples, spec["masks"], spec["out"], progress=False)
    summary = trainer.run()
    rank = int(os.environ["RANK"])
    params = {k: v.detach().clone() for k, v in trainer.enc.model.named_parameters()}
    torch.save({"params": params, "queue": trainer.enc.queue.queue.clone(), "summary": summary},
               Path(spec["dump"]) / f"rank{rank}.pt")
""")


def run_two_ranks(tmp_path: Path, worker: str, spec: dict) -> None:
    """Run ``worker`` (a script reading ``REPO`` and the spec file) in two torchrun processes,
    outside any launcher environment the tests themselves may run in; fail with its stderr."""
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "worker.py").write_text(worker)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(tmp_path / "worker.py"), str(REPO), str(tmp_path / "spec.json")],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("proposals", [False, True], ids=["one-mask", "two-proposals"])
def test_two_gloo_processes_train_with_consistent_weights_and_a_falling_loss(tmp_path: Path, proposals) -> None:
    """With proposals (a second square, each square its own proposal) the ranks exchange
    fixed-size proposal slots and still agree on the weights and the queue."""
    rng = np.random.default_rng(0)
    samples, records = [], []
    for i in range(8):
        pixels = rng.integers(0, 200, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), bool)
        y, x = rng.integers(0, 20, 2)
        mask[y:y + 18, x:x + 22] = True
        pixels[mask] = (230, 40, 40)
        found = None
        if proposals:
            second = np.zeros_like(mask)
            second[:8, 40:] = True
            second &= ~mask
            pixels[second] = (40, 40, 230)
            found = [Proposal(mask.copy(), 1.0)] + ([Proposal(second, 1.0)] if second.any() else [])
            mask = mask | second
        Image.fromarray(pixels).save(tmp_path / f"im{i}.png")
        samples.append((f"im{i}", str(tmp_path / f"im{i}.png")))
        records.append(MaskRecord(f"im{i}", mask, proposals=found))
    write_mask_shard(tmp_path / "masks" / "shard-00000.h5", records)
    (tmp_path / "dump").mkdir()
    params = dict(backbone="resnet18", epochs=8, batch_size=4, queue_size=4, crop_size=32, embedding_dim=8,
                  lr=0.05, num_workers=0, device="cpu", seed=1)
    spec = {"samples": samples, "masks": str(tmp_path / "masks"), "out": str(tmp_path / "out"),
            "dump": str(tmp_path / "dump"), "params": params}
    run_two_ranks(tmp_path, WORKER, spec)

    ranks = [torch.load(tmp_path / "dump" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name  # DDP kept the ranks identical
    assert torch.equal(ranks[0]["queue"], ranks[1]["queue"])  # the queue holds the gathered prototypes
    assert ranks[0]["summary"]["world_size"] == 2 and ranks[0]["summary"]["steps"] == 2 * params["epochs"]

    log = read_jsonl(tmp_path / "out" / LOG_FILE)  # rank 0 alone writes: one line per step
    assert [r["step"] for r in log if r["type"] == "step"] == list(range(1, 2 * params["epochs"] + 1))
    epochs = [r for r in log if r["type"] == "epoch"]
    total = [r["loss"] for r in epochs]
    saliency = [r["loss_saliency"] for r in epochs]
    # The loss falls: the saliency term from the start, the total once the queue is full (epoch 2
    # on; the first step has no queue negatives). The runs are deterministic on the CPU.
    assert np.mean(saliency[-3:]) < saliency[0] - 0.02, saliency
    assert np.mean(total[-3:]) < total[1] - 0.02, total
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["epoch-0007.pt", "epoch-0008.pt"]
