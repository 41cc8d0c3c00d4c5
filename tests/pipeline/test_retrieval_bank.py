"""``evaluate.retrieval.bank_split``: the retrieval memory bank from a split other than the train split;
and the other protocol that reads a second split, K-means in the discriminant space fitted on train.

No network runs: the masks and train artifacts are written by hand at the versions the pipeline
plans, and ``extract`` is replaced by a stand-in that writes planted prototypes for the splits the
stage asks for. The bank split's prototypes point at each image's own class and the train split's
at the next class, so the retrieval mIoU says which bank was used: 100 with the bank split, 25
(background alone) with the train split.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from artifacts.embeddings import EmbeddingRecord, shard_name, write_embedding_shard
from artifacts.store import ArtifactSpec
from pipeline.cli import State, cli
from pipeline.graph import plan
from pipeline.compare import compare_jobs, compare_plan

CLASSES = ["background", "alpha", "beta", "gamma"]
SPLITS = {"train": 6, "bank": 3, "val": 6}

CONFIG = """store: store
data: {root: data}
evaluate:
  protocols: [retrieval]
  retrieval: {bank_split: bank}
dask: {scheduler: synchronous}
"""


@pytest.fixture
def project(tmp_path, monkeypatch, make_box_dataset, no_pictures):
    """The dataset, the config, and a stand-in extract; returns (project dir, extracted splits)."""
    import stages.extract.extract as extract_stage
    import stages.train

    make_box_dataset(tmp_path / "data", CLASSES, SPLITS)
    (tmp_path / "pipeline.yaml").write_text(CONFIG)
    monkeypatch.chdir(tmp_path)
    extracted: list[str] = []

    def fake_extract(model, samples, out_dir, params, *, mask_dir=None, attrs=None, progress=True, on_shard=None):
        split = Path(out_dir).name  # the stage writes each split under <extract>/<split>/
        extracted.append(split)
        centres = np.eye(4, 6, dtype=np.float32)
        records = []
        for s in samples:
            label = np.asarray(Image.open(s.label))
            cls = int(label.max())
            records.append(EmbeddingRecord(s.id, label > 0, centres[cls % 3 + 1 if split == "train" else cls], True))
        write_embedding_shard(Path(out_dir) / shard_name(0), records)
        return {"n_images": len(records), "n_valid": len(records), "images_per_s": None}

    monkeypatch.setattr(stages.train, "load_model", lambda path: (None, {}))
    monkeypatch.setattr(extract_stage, "extract", fake_extract)
    return tmp_path, extracted


def _context(*overrides: str):
    return State("pipeline.yaml", overrides, None, True, False).context()


def _complete(ctx, name: str, spec: ArtifactSpec | None = None, params: dict | None = None) -> str:
    """A complete artifact written by hand (at ``spec``, or of stage ``name`` with ``params``)."""
    with ctx.store.begin(spec or ArtifactSpec(name, 1, params or {}, {})) as writer:
        writer.complete({})
    return f"{name}/{writer.version}"


def _upstream(*overrides: str) -> None:
    """The configured masks and train artifacts, complete, so only extract and evaluate run."""
    ctx = _context(*overrides)
    planned = plan(ctx, ("train",))
    for name in ("masks", "train"):
        _complete(ctx, name, planned[name].spec)


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _evaluate_dir(project_dir: Path, *overrides: str) -> Path:
    return project_dir / "store" / "evaluate" / plan(_context(*overrides), ("evaluate",))["evaluate"].version


def test_bank_split_is_extracted_and_is_the_retrieval_bank(project):
    root, extracted = project
    _upstream()
    r = invoke("-q", "evaluate")
    assert r.exit_code == 0, r.output
    assert extracted == ["val", "bank"]  # retrieval alone: the train split is not extracted
    ctx = _context()
    extract_dir = ctx.store.path("extract", plan(ctx, ("extract",))["extract"].version)
    assert sorted(p.name for p in extract_dir.iterdir() if p.is_dir()) == ["bank", "val"]
    out = _evaluate_dir(root)
    metrics = json.loads((out / "metrics.json").read_text())["retrieval"]
    assert (metrics["bank_split"], metrics["n_bank_images"], metrics["n_images"]) == ("bank", 3, 6)
    assert metrics["miou"] == pytest.approx(100.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["retrieval"] == {"class_subset": None, "bank_split": "bank"}

    extracted.clear()  # null: the train split is the bank, as before the key existed
    r = invoke("-q", "--set", "evaluate.retrieval.bank_split=null", "evaluate")
    assert r.exit_code == 0, r.output
    assert extracted == ["val", "train"]
    metrics = json.loads((_evaluate_dir(root, "evaluate.retrieval.bank_split=null") / "metrics.json").read_text())
    m = metrics["retrieval"]
    assert (m["bank_split"], m["n_bank_images"]) == ("train", 6)
    assert m["miou"] == pytest.approx(100 * 1 / 4)  # every salient box mislabelled; background IoU 1


def test_discriminant_kmeans_extracts_and_fits_on_the_train_split(project):
    root, extracted = project
    plain = _context("evaluate.protocols=[kmeans]")
    assert list(plan(plain, ("extract",))["extract"].spec.params["splits"]) == ["val"]
    assert "space" not in plan(plain, ("evaluate",))["evaluate"].spec.params["kmeans"]  # versions as before the key
    idle = _context("evaluate.protocols=[kmeans]", "evaluate.kmeans.groups=5", "evaluate.kmeans.reg=0.5")
    assert plan(idle, ("evaluate",))["evaluate"].version == plan(plain, ("evaluate",))["evaluate"].version
    sets = ("evaluate.protocols=[kmeans]", "evaluate.kmeans.space=discriminant", "evaluate.kmeans.groups=1")
    ctx = _context(*sets)
    assert list(plan(ctx, ("extract",))["extract"].spec.params["splits"]) == ["val", "train"]
    assert plan(ctx, ("evaluate",))["evaluate"].spec.params["kmeans"]["space"] == "discriminant"
    _upstream()
    r = invoke("-q", *(a for s in sets for a in ("--set", s)), "evaluate")
    assert r.exit_code == 0, r.output
    assert extracted == ["val", "train"]
    m = json.loads((_evaluate_dir(root, *sets) / "metrics.json").read_text())["kmeans"]
    assert m["space"]["name"] == "discriminant" and Path(m["space"]["fitted_on"]).name == "train"
    assert m["miou"] == pytest.approx(100.0)  # the train prototypes are shifted by a class: the groups still separate
    r = invoke("-q", "--set", "evaluate.kmeans.space=lda", "evaluate")
    assert r.exit_code == 2 and "evaluate.kmeans.space" in r.output and "lda" in r.output


def test_compare_jobs_give_discriminant_kmeans_the_train_store(project):
    ctx = _context("evaluate.protocols=[kmeans]", "evaluate.kmeans.space=discriminant", "evaluate.seeds=[1]")

    class Extract:
        path = "/shared/extract/v1"

    (job,) = compare_jobs(ctx, {"m": Extract()})
    assert (Path(job.train_store).name, job.train_split) == ("train", "train")


def test_linear_and_bank_extract_both_splits(project):
    ctx = _context("evaluate.protocols=[linear, retrieval]")
    assert list(plan(ctx, ("extract",))["extract"].spec.params["splits"]) == ["val", "train", "bank"]


def test_null_bank_split_keeps_the_versions_made_before_the_key(project):
    """Null (and the train split itself) resolve to the parameters the versions had without the key."""
    null = _context("evaluate.protocols=[kmeans, linear, retrieval]", "evaluate.retrieval.bank_split=null")
    same = _context("evaluate.protocols=[kmeans, linear, retrieval]", "evaluate.retrieval.bank_split=train")
    banked = _context("evaluate.protocols=[kmeans, linear, retrieval]")
    p_null, p_same, p_bank = (plan(c, ("evaluate",)) for c in (null, same, banked))
    assert {k: v.version for k, v in p_null.items()} == {k: v.version for k, v in p_same.items()}
    # the formula without the key: evaluate's retrieval section held class_subset alone, and
    # extract (and the labels) the val and train splits
    ev = p_null["evaluate"].spec
    section = null.cfg.section("evaluate")
    before = {"protocols": ["kmeans", "linear", "retrieval"],
              "kmeans": {**section["kmeans"], "seeds": section["seeds"]},
              "linear": {**{k: v for k, v in section["linear"].items() if k != "crf"}, "seed": section["seeds"][0]},
              "retrieval": {"class_subset": None},
              "labels": {s: null.data_identity(s) for s in ("val", "train")}}
    assert ev.version == ArtifactSpec("evaluate", ev.schema_version, before, ev.inputs, ev.algorithm_version).version
    ex = p_null["extract"].spec
    before_extract = {**null.cfg.section("extract"), "splits": {s: null.data_identity(s) for s in ("val", "train")},
                      "compute": ex.params["compute"]}  # the resolved device type and precision
    assert ex.version == ArtifactSpec("extract", ex.schema_version, before_extract, ex.inputs,
                                      ex.algorithm_version).version
    # a bank split is a new extract and evaluate version; masks and train are untouched
    assert p_bank["extract"].version != p_null["extract"].version
    assert p_bank["evaluate"].version != p_null["evaluate"].version
    assert [p_bank[s].version for s in ("masks", "train")] == [p_null[s].version for s in ("masks", "train")]
    # the comparison: the same version for null and train, a new one (naming the bank) otherwise
    train_ref = _complete(null, "train", params={"model": "m"})
    (_, c_null), (_, c_same), (_, c_bank) = (compare_plan(c, [train_ref]) for c in (null, same, banked))
    assert c_null.version == c_same.version != c_bank.version
    assert "bank_split" not in c_null.spec.params and c_bank.spec.params["bank_split"] == "bank"


def test_compare_jobs_take_the_bank_store_for_retrieval_only(project):
    ctx = _context("evaluate.protocols=[linear, retrieval]", "evaluate.seeds=[1]")

    class Extract:
        path = "/shared/extract/v1"

    jobs = {job.protocol: job for job in compare_jobs(ctx, {"m": Extract()})}
    assert (Path(jobs["retrieval"].train_store).name, jobs["retrieval"].train_split) == ("bank", "bank")
    assert (Path(jobs["linear"].train_store).name, jobs["linear"].train_split) == ("train", "train")


def test_comparison_uses_the_bank(project):
    root, extracted = project
    ctx = _context()
    model = _complete(ctx, "train", params={"model": "m"})
    r = invoke("-q", "evaluate", "--model", model)
    assert r.exit_code == 0, r.output
    assert extracted == ["val", "bank"]
    [line] = [ln for ln in r.output.splitlines() if ln.startswith("comparison: ")]
    out = Path(line.split(": ", 1)[1]).parent
    table = json.loads((out / "comparison.json").read_text())
    [job] = table["jobs"]
    assert job["status"] == "ok" and job["miou"] == pytest.approx(100.0)
    metrics = json.loads((out / job["dir"] / "metrics.json").read_text())["retrieval"]
    assert (metrics["bank_split"], metrics["n_bank_images"]) == ("bank", 3)


@pytest.mark.parametrize("command", [("run",), ("evaluate", "--model", "MODEL")])
def test_unknown_bank_split_is_a_usage_error_before_any_work(project, command):
    root, extracted = project
    if "MODEL" in command:
        model = _complete(_context(), "train", params={"model": "m"})
        command = tuple(model if c == "MODEL" else c for c in command)
    r = invoke("--set", "evaluate.retrieval.bank_split=trainn", *command)
    assert r.exit_code == 2, r.output
    assert "evaluate.retrieval.bank_split: the dataset" in r.output
    assert "no split 'trainn'; available: bank, train, val" in r.output
    assert not extracted and not (root / "store" / "masks").exists()


def test_val_split_as_bank_is_a_usage_error(project):
    root, _ = project
    r = invoke("--set", "evaluate.retrieval.bank_split=val", "run")
    assert r.exit_code == 2 and "evaluate.retrieval.bank_split: 'val' is also data.val_split" in r.output
    assert not (root / "store" / "masks").exists()


def test_bank_split_of_an_unused_protocol_is_not_checked(project):
    ctx = _context("evaluate.protocols=[linear]", "evaluate.retrieval.bank_split=nowhere")
    assert list(plan(ctx, ("evaluate",))["extract"].spec.params["splits"]) == ["val", "train"]
