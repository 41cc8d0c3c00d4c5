"""`maskcontrast evaluate --model ... --model ...`: the batch comparison through the command line.

The default tests build a store by hand (complete train artifacts, and embedding stores written
at the extract versions the pipeline plans for them), so no network is trained or run: the
models' prototypes are planted class directions and the mIoU of each row is known in closed
form. A slow test runs the real chain (masks, two trainings, two extractions); a distributed one
starts a dask scheduler and two workers as separate processes and evaluates through them.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from artifacts.embeddings import EmbeddingRecord, shard_name, write_embedding_shard
from artifacts.store import ArtifactSpec
from pipeline.cli import State, cli
from pipeline.graph import plan
from pipeline.compare import compare_plan

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["background", "alpha", "beta", "gamma"]
SEEDS = (1, 2)
#: val image 2 holds gamma; a model that gives it alpha's prototype predicts alpha on its box:
#: IoU background 1, alpha 240 / 320, beta 1, gamma 160 / 240 (every box is 8 x 10 px)
SWAPPED_MIOU = 100 * (1 + 240 / 320 + 1 + 160 / 240) / 4


CONFIG = """store: store
data: {root: data}
extract: {mask_source: masks}
evaluate:
  protocols: [kmeans, retrieval, saliency]
  seeds: [1, 2]
  kmeans: {pca_dim: 4, n_init: 1}
dask: {scheduler: synchronous}
"""


@pytest.fixture
def project(tmp_path, monkeypatch, make_box_dataset):
    labels = make_box_dataset(tmp_path / "data", CLASSES, {"train": 6, "val": 9})
    (tmp_path / "pipeline.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    return tmp_path, labels


def add_model(project, name: str, swap: dict[str, int] | None = None, splits=("val", "train"),
              overrides: tuple[str, ...] = ()) -> str:
    """A complete train artifact (no network: the batch never opens it) and, at the extract
    version the pipeline plans for it (under the config with ``overrides``), embedding stores
    whose prototypes are the class directions (another class's for the ids in ``swap``).
    Returns the train ref."""
    root, labels = project
    ctx = State("pipeline.yaml", overrides, None, True, False).context()
    with ctx.store.begin(ArtifactSpec("train", 1, {"model": name}, {})) as writer:
        writer.complete({})
    ref = f"train/{writer.version}"
    spec = plan(ctx, ("extract",), pinned={"train": ref})["extract"].spec
    assert spec.inputs["train"] == ref and spec.inputs["masks"].startswith("masks/")
    centres = np.eye(4, 6, dtype=np.float32)
    with ctx.store.begin(spec) as writer:
        for split in splits:
            records = [EmbeddingRecord(id_, label > 0, centres[(swap or {}).get(id_, int(label.max()))], True)
                       for id_, label in labels.items() if id_.startswith(split)]
            write_embedding_shard(writer.path / split / shard_name(0), records)
        writer.complete({})
    return ref


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _table(result_output: str) -> tuple[Path, dict]:
    [line] = [ln for ln in result_output.splitlines() if ln.startswith("comparison: ")]
    md = Path(line.split(": ", 1)[1])
    return md.parent, json.loads((md.parent / "comparison.json").read_text())


def test_compare_two_models_table_and_noop_rerun(project, no_pictures):
    good = add_model(project, "good")
    swapped = add_model(project, "swapped", swap={"val2": 1})
    r = invoke("-q", "evaluate", "--model", good, "--model", swapped.split("/")[1][:6])  # a bare prefix works too
    assert r.exit_code == 0, r.output
    out, table = _table(r.output)
    assert out.parent.name == "compare" and "warning" not in r.output
    rows = {(row["model"], row["protocol"]): row for row in table["rows"]}
    first, second = sorted([good, swapped])  # rows in model order, whatever the order of --model
    assert list(rows) == [(first, "kmeans"), (first, "retrieval"), (second, "kmeans"), (second, "retrieval")]
    for protocol in ("kmeans", "retrieval"):  # saliency scores masks, not models: left out
        assert rows[(good, protocol)]["miou"] == pytest.approx(100.0)
        assert rows[(swapped, protocol)]["miou"] == pytest.approx(SWAPPED_MIOU)
    assert rows[(swapped, "kmeans")]["seeds"] == list(SEEDS) and rows[(swapped, "kmeans")]["miou_std"] == 0.0
    assert [j["status"] for j in table["jobs"]] == ["ok"] * 6  # 2 models x (2 kmeans seeds + 1 retrieval)
    assert f"| {swapped} | kmeans | {SWAPPED_MIOU:.2f} ± 0.00 | 1, 2 | - | ok |" in r.output

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"] == {"n_models": 2, "n_jobs": 6, "n_failed": 0}
    extracts = {m: f"extract/{p.name}" for m in (good, swapped) for p in (project[0] / "store" / "extract").iterdir()
                if json.loads((p / "manifest.json").read_text())["inputs"]["train"] == m}
    assert manifest["inputs"] == extracts and manifest["params"]["protocols"] == ["kmeans", "retrieval"]

    r = invoke("-q", "evaluate", "--model", swapped, "--model", good)  # same set: the same version, no work
    assert r.exit_code == 0, r.output
    assert f"compare   {out.name}  skipped" in r.output and "masks" not in r.output
    assert json.loads((out / "manifest.json").read_text())["finished"] == manifest["finished"]

    def version(*overrides: str) -> str:
        ctx = State("pipeline.yaml", overrides, None, True, False).context()
        return compare_plan(ctx, [swapped, good])[1].version

    assert version() == out.name
    assert version("dask.n_workers=3") == out.name  # how it runs does not change the result
    for changed in ("evaluate.seeds=[1]", "evaluate.kmeans.pca_dim=3", "evaluate.protocols=[kmeans]",
                    "extract.input_size=256"):
        assert version(changed) != out.name, changed


def test_failed_job_is_retried_and_reported(project, no_pictures):
    good = add_model(project, "good")
    broken = add_model(project, "no-train-split", splits=("val",))
    r = invoke("-q", "evaluate", "--model", good, "--model", broken, "--retries", "2")
    assert r.exit_code == 1, r.output  # a comparison with failures is not a success
    out, table = _table(r.output)  # the table of what finished is still shown
    rows = {(row["model"], row["protocol"]): row for row in table["rows"]}
    bad = rows[(broken, "retrieval")]
    assert bad["status"] == "failed" and bad["miou"] is None
    assert "FileNotFoundError" in bad["errors"][0] and "train" in bad["errors"][0]
    assert rows[(broken, "kmeans")]["status"] == "ok" and rows[(good, "retrieval")]["status"] == "ok"
    slug = broken.replace("/", "-")
    log = out / slug / "retrieval" / "default-seeds" / "attempts.log"
    assert len(log.read_text().splitlines()) == 3
    assert "1 of 6 jobs failed, so the comparison is not complete" in r.output
    assert f"{broken} retrieval: FileNotFoundError" in r.output  # the failure is listed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "failed" and [j["model"] for j in manifest["failed_jobs"]] == [broken]

    r = invoke("-q", "evaluate", "--model", good, "--model", broken, "--retries", "0")
    assert r.exit_code == 1 and "compare   " not in r.output  # never skipped as done while a job is failing
    assert len(log.read_text().splitlines()) == 4  # only the failed job ran again
    assert len((out / slug / "kmeans" / "seed-1" / "attempts.log").read_text().splitlines()) == 1


def test_failed_job_is_retried_alone_on_rerun(project, no_pictures, monkeypatch):
    """A transient failure: the rerun runs only that job and completes the comparison."""
    import stages.evaluate.batch as batch

    models = [add_model(project, "a"), add_model(project, "b")]
    calls, real, flaky_key, failures = [], batch.run_job, [], []

    def flaky(job, out_dir):
        calls.append(job.key)
        if job.protocol == "retrieval" and not flaky_key:
            flaky_key.append(job.key)
        if job.key in flaky_key and not failures:
            failures.append(job.key)
            raise OSError("transient: the shared filesystem went away")
        return real(job, out_dir)

    monkeypatch.setattr(batch, "run_job", flaky)
    args = ["-q", "evaluate", "--model", models[0], "--model", models[1], "--retries", "0"]
    r = invoke(*args)
    assert r.exit_code == 1 and "OSError: transient" in r.output
    [out] = (project[0] / "store" / "compare").iterdir()
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    assert len(calls) == 6
    calls.clear()
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert calls == flaky_key  # the five finished jobs were read back, not recomputed
    _, table = _table(r.output)
    assert [j["status"] for j in table["jobs"]] == ["ok"] * 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["n_failed"] == 0
    calls.clear()
    assert invoke(*args).exit_code == 0 and calls == []  # complete: a rerun is a no-op


def test_interrupted_comparison_continues(project, no_pictures, monkeypatch):
    """Ctrl-C in the middle keeps the finished jobs; the rerun computes only the rest."""
    import stages.evaluate.batch as batch

    models = [add_model(project, "a"), add_model(project, "b")]
    calls, crash, real = [], [True], batch.run_job

    def flaky(job, out_dir):
        calls.append(job.key)
        if len(calls) == 4 and crash[0]:
            crash[0] = False
            raise KeyboardInterrupt
        return real(job, out_dir)

    monkeypatch.setattr(batch, "run_job", flaky)
    args = ["-q", "evaluate", "--model", models[0], "--model", models[1]]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 130
    [out] = (project[0] / "store" / "compare").iterdir()
    assert json.loads((out / "manifest.json").read_text())["status"] == "failed"
    first = list(calls)
    calls.clear()
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert len(calls) == 3 and set(calls).isdisjoint(first[:3]) and first[3] in calls
    _, table = _table(r.output)
    assert [j["status"] for j in table["jobs"]] == ["ok"] * 6


def test_usage_errors(project):
    good = add_model(project, "good")
    r = invoke("evaluate", "--model", "extract/abc")
    assert r.exit_code == 2 and "expected a train artifact (train/VERSION), got 'extract/abc'" in r.output
    r = invoke("evaluate", "--model", "train/nope")
    assert r.exit_code == 2 and "no artifact train/nope" in r.output
    r = invoke("--set", "evaluate.protocols=[saliency]", "evaluate", "--model", good)
    assert r.exit_code == 2 and "comparing models needs a protocol other than saliency" in r.output
    r = invoke("evaluate", "--model", good, "--retries", "-1")
    assert r.exit_code == 2


# -- a real dask cluster: scheduler and workers as separate processes --------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask_cli(command: str) -> list[str]:
    exe = Path(sys.executable).parent / "dask"
    if exe.is_file():
        return [str(exe), command]
    return [sys.executable, "-m", f"distributed.cli.dask_{command}"]


def _tail(path: Path, n: int = 2000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.mark.distributed
@pytest.mark.slow
def test_batch_through_external_scheduler_equals_local_run(project, no_pictures, tmp_path):
    """`dask scheduler` + two `dask worker` processes on loopback: 2 models x 2 K-means seeds
    through --scheduler give the table of the in-process run, and every job ran on a worker."""
    from distributed import Client

    kmeans_only = ("evaluate.protocols=[kmeans]",)  # extract then holds the val split alone
    models = [add_model(project, "good", splits=("val",), overrides=kmeans_only),
              add_model(project, "swapped", swap={"val2": 1}, splits=("val",), overrides=kmeans_only)]
    args = ["-q", "--set", kmeans_only[0], "evaluate", "--model", models[0], "--model", models[1]]
    address = f"tcp://127.0.0.1:{_free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    logs = tmp_path / "dask-logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        procs.append(proc)
        return proc

    def logs_text() -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(logs.iterdir()))

    try:
        start("scheduler", _dask_cli("scheduler") + ["--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                                     "--no-dashboard"])
        workers = [start(f"worker{i}", _dask_cli("worker") + [
            address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"w{i}",
            "--local-directory", str(tmp_path / f"w{i}")]) for i in range(2)]
        r = invoke(*args)  # the local run while the cluster starts (its pictures are not compared)
        assert r.exit_code == 0, r.output
        out, local = _table(r.output)
        try:
            with Client(address, timeout="30s") as client:
                client.wait_for_workers(2, timeout=45)
        except Exception as exc:
            pytest.fail(f"dask cluster did not start ({exc}); logs:\n{logs_text()}")
        r = invoke(*args, "--force", "--scheduler", address)
        assert r.exit_code == 0, r.output + logs_text()
    finally:
        for proc in reversed(procs):  # workers first: a worker without its scheduler keeps retrying
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    out2, remote = _table(r.output)
    assert out2 == out and " ran " in r.output  # --force recomputed the same version
    assert remote == local and [row["status"] for row in remote["rows"]] == ["ok", "ok"]
    assert len(remote["jobs"]) == 4
    pids = {int(line.rsplit("pid=", 1)[1]) for log in out.rglob("attempts.log") for line in log.read_text().splitlines()}
    assert pids and pids <= {w.pid for w in workers}  # every job ran on a worker process
    assert (out / models[0].replace("/", "-") / "kmeans" / "seed-1" / "kmeans_sheet.png").is_file()


# -- the real chain -------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
def test_real_models_reuse_extract_and_match_single_model_evaluate(project):
    """Masks, two real trainings (epochs 0, different seeds) and their extractions: the batch on
    the default local cluster reuses the extract of `maskcontrast evaluate`, and its row for the
    configured model equals that single-model report."""
    settings = ["--set", "train.backbone=mobilenet_v2", "--set", "train.epochs=0", "--set", "train.batch_size=2",
                "--set", "train.queue_size=0", "--set", "train.crop_size=32", "--set", "train.num_workers=0",
                "--set", "train.device=cpu", "--set", "extract.input_size=32", "--set", "extract.features=false",
                "--set", "extract.num_workers=0", "--set", "extract.device=cpu", "--set", "masks.priors.size=32",
                "--set", "masks.priors.n_segments=20", "--set", "evaluate.protocols=[kmeans, retrieval]"]
    r = invoke("-q", *settings, "evaluate")
    assert r.exit_code == 0, r.output
    store = project[0] / "store"
    [single] = (store / "evaluate").iterdir()
    [trained] = (store / "train").iterdir()
    r = invoke("-q", *settings, "--set", "train.seed=1", "train")
    assert r.exit_code == 0, r.output
    other = next(p for p in (store / "train").iterdir() if p != trained)
    r = invoke("-q", *settings, "--set", "dask.scheduler=null", "--set", "dask.n_workers=2",
               "evaluate", "--model", f"train/{trained.name}", "--model", f"train/{other.name}")
    assert r.exit_code == 0, r.output
    assert " ran " in r.output and "skipped" in r.output  # one extract made, the configured one reused
    assert len(list((store / "extract").iterdir())) == 2
    _, table = _table(r.output)
    metrics = json.loads((single / "metrics.json").read_text())
    for protocol in ("kmeans", "retrieval"):
        [row] = [x for x in table["rows"] if x["model"] == f"train/{trained.name}" and x["protocol"] == protocol]
        assert row["status"] == "ok" and row["miou"] == pytest.approx(metrics[protocol]["miou"])
