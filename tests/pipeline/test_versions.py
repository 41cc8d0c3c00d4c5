"""Artifact versions are names users hold on to (store paths, READMEs, notes): pin the versions that
``pipeline.yaml`` and every preset plan on a fixed tiny dataset (on the CPU), so that a change which
renames every artifact is made on purpose (update the pins and say so), never by accident.

History: the pins moved once, when algorithm versions (stages/versions.py) and the resolved device
type and precision entered the versions; the bookkeeping and data.max_pixels changes before that
kept every version. The clusters stage (issue 17: unlabelled photos) joined the pins without
moving any other stage's version: a labelled dataset keeps its splits, and every labelled
config plans the versions it planned before."""
from __future__ import annotations

from pathlib import Path

import pytest

from artifacts.store import Store
from pipeline.config import load_config
from pipeline.graph import Context, plan
from pipeline.stagedefs import pipeline_stages

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["pipeline.yaml"] + sorted(f"configs/{p.name}" for p in (REPO / "configs").glob("*.yaml"))
#: variants whose parameters are assembled by other code paths
VARIANTS = {"configs/demo.yaml+bootstrap": ("configs/demo.yaml", ("masks.method=bootstrap",)),
            # the real-photo defaults on unlabelled photos (a flat folder, no splits, no labels): no
            # evaluate, train and val read 'all'
            "pipeline.yaml+photos": ("pipeline.yaml", ("data.root={photos}",))}

#: config -> stage -> version, on ``fixed_dataset`` with the paths of ``user_paths``
PINNED = {
    "pipeline.yaml": {"masks": "38c37da853b3", "train": "4d0d91c61c34", "extract": "b26bb96315b0",
                      "clusters": "023619a002c4", "evaluate": "53708ea58209"},
    "configs/demo.yaml": {"masks": "c1b131184dda", "train": "d1f7a33fc1cd", "extract": "406925edb01f",
                          "clusters": "e0a30a3111a8", "evaluate": "e34e1a9b81fb"},
    "configs/davis16_mobilenet.yaml": {"masks": "16bea5aa4bb2", "train": "ddb30b9973fb", "extract": "dedd1e89015a",
                                       "clusters": "643a1278dd82", "evaluate": "3e39d558a029"},
    "configs/voc_supervised_imagenet.yaml": {"masks": "cab1ee2ec5fe", "train": "f7931f159bf1",
                                             "extract": "7f6dc84553cd", "clusters": "587bf7411980",
                                             "evaluate": "998aa912a171"},
    "configs/voc_unsupervised_moco.yaml": {"masks": "cab1ee2ec5fe", "train": "77affedbadb0", "extract": "91b4025e58c4",
                                           "clusters": "892509a2447c", "evaluate": "e0f7a55f0396"},
    "configs/demo.yaml+bootstrap": {"masks": "e7c019bc9690", "train": "a65c2ef17d52", "extract": "a1ca65d64923",
                                    "clusters": "adec584b48e3", "evaluate": "6733e515f7d0"},
    "pipeline.yaml+photos": {"masks": "d7d9c43edc89", "train": "7a5516685246", "extract": "c99cbe378535",
                             "clusters": "7b51a51c6959"},
}


def fixed_dataset(root: Path) -> Path:
    """A folder dataset whose fingerprint is fixed: file sizes are all versions look at."""
    for sub in ("images", "labels", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("background\na\nb\n")
    for split, n in (("train", 4), ("val", 3), ("trainaug", 5)):
        ids = [f"{split}{i}" for i in range(n)]
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i, id_ in enumerate(ids):
            (root / "images" / f"{id_}.png").write_bytes(b"i" * (100 + i))
            (root / "labels" / f"{id_}.png").write_bytes(b"l" * (50 + i))
    return root


def fixed_photos(root: Path) -> Path:
    """A flat folder of photos (no images/, labels/, splits/ or classes.txt) with a fixed fingerprint."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (root / f"photo{i}.jpg").write_bytes(b"p" * (200 + i))
    return root


def user_paths(tmp: Path) -> list[str]:
    (tmp / "masks").mkdir(exist_ok=True)
    (tmp / "masks" / "a.png").write_bytes(b"m" * 10)
    (tmp / "model.onnx").write_bytes(b"onnx")
    (tmp / "init.pth").write_bytes(b"pth")
    return [f"data.root={fixed_dataset(tmp / 'dataset')}", "data.layout=folder",
            f"masks.import_dir={tmp / 'masks'}", f"masks.model_path={tmp / 'model.onnx'}",
            f"train.init={tmp / 'init.pth'}", f"masks.features.init={tmp / 'init.pth'}",
            # the device type enters the train and extract versions: pin the CPU ones on any machine
            "train.device=cpu", "extract.device=cpu"]


def planned_versions(config: str, tmp: Path, extra: tuple[str, ...] = ()) -> dict[str, str]:
    base = load_config(REPO / config)
    sets = user_paths(tmp)
    if base.train.init == "random":
        sets = [s for s in sets if not s.startswith("train.init=")]
    extra = [e.replace("{photos}", str(fixed_photos(tmp / "photos"))) for e in extra]
    cfg = load_config(REPO / config, sets + extra)
    ctx = Context(cfg=cfg, store=Store(tmp / "store"), quiet=True)
    return {name: p.version for name, p in plan(ctx, pipeline_stages(ctx)).items()}


@pytest.mark.parametrize("config", CONFIGS + list(VARIANTS))
def test_planned_versions_are_pinned(config, tmp_path):
    path, extra = VARIANTS.get(config, (config, ()))
    got = planned_versions(path, tmp_path, extra)
    assert got == PINNED[config], (
        f"{config}: the planned artifact versions changed ({got}); if that is intended (results change), "
        "update PINNED and say so in the commit")


# -- bookkeeping keys: one declaration, read by every place that decides whether work is reused ------
BOOKKEEPING_SETS = ["train.keep_last=3", "train.num_workers=0", "train.device=auto", "extract.batch_size=1",
                    "extract.num_workers=0", "extract.device=auto", "masks.model.threads=4", "masks.features.threads=4",
                    "masks.bootstrap.num_workers=3", "masks.bootstrap.device=cpu",
                    "dask.scheduler=tcp://10.0.0.1:8786", "dask.n_workers=1"]


def test_every_bookkeeping_key_is_declared_once_and_exists():
    from pipeline.config import Config
    from pipeline.configtypes import field_docs
    from stages.bookkeeping import BOOKKEEPING

    keys = {row[0] for row in field_docs(Config)}
    declared = {f"{section}.{name}" for section, names in BOOKKEEPING.items() for name in names}
    assert declared <= keys, declared - keys
    assert {s.partition("=")[0] for s in BOOKKEEPING_SETS} == declared  # each is tested below


@pytest.mark.parametrize("setting", BOOKKEEPING_SETS)
@pytest.mark.parametrize("config", ["pipeline.yaml", "configs/demo.yaml", "configs/davis16_mobilenet.yaml"])
def test_bookkeeping_keys_do_not_change_versions(config, setting, tmp_path):
    if setting.endswith(".device=auto"):
        import torch

        if torch.cuda.is_available():
            pytest.skip("auto is cuda here: another device type, hence another version")
    assert planned_versions(config, tmp_path, (setting,)) == PINNED[config]


def test_device_type_and_precision_enter_versions_not_the_device_index(tmp_path):
    cuda0 = planned_versions("configs/demo.yaml", tmp_path, ("train.device=cuda:0", "extract.device=cuda:0",
                                                         "train.amp=bf16"))
    cuda1 = planned_versions("configs/demo.yaml", tmp_path, ("train.device=cuda:1", "extract.device=cuda",
                                                         "train.amp=bf16"))
    fp16 = planned_versions("configs/demo.yaml", tmp_path, ("train.device=cuda:0", "extract.device=cuda:0",
                                                        "train.amp=fp16"))
    cpu = PINNED["configs/demo.yaml"]
    assert cuda0 == cuda1  # which GPU does not matter
    assert cuda0["masks"] == cpu["masks"] and cuda0["train"] != cpu["train"] and cuda0["extract"] != cpu["extract"]
    assert fp16["train"] != cuda0["train"]  # the precision of training does


def test_algorithm_versions_enter_versions(tmp_path, monkeypatch):
    import dataclasses

    import pipeline.stagedefs  # noqa: F401  (registers the stages)
    from pipeline.graph import STAGES

    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"],
                                                              algorithm_version=STAGES["train"].algorithm_version + 1))
    got = planned_versions("configs/demo.yaml", tmp_path)
    pinned = PINNED["configs/demo.yaml"]
    assert got["masks"] == pinned["masks"]  # upstream unchanged
    assert all(got[s] != pinned[s] for s in ("train", "extract", "clusters", "evaluate"))  # bumped and downstream


def test_every_stage_has_an_algorithm_version():
    import pipeline.stagedefs  # noqa: F401  (registers the stages)
    from pipeline.graph import STAGES
    from stages.versions import ALGORITHM_VERSIONS

    assert set(STAGES) | {"compare"} == set(ALGORITHM_VERSIONS)
    assert all(STAGES[s].algorithm_version == ALGORITHM_VERSIONS[s] for s in STAGES)


def test_clusters_algorithm_version_moves_clusters_alone(tmp_path, monkeypatch):
    import dataclasses

    import pipeline.stagedefs  # noqa: F401  (registers the stages)
    from pipeline.graph import STAGES

    monkeypatch.setitem(STAGES, "clusters", dataclasses.replace(
        STAGES["clusters"], algorithm_version=STAGES["clusters"].algorithm_version + 1))
    for i, config in enumerate(("configs/demo.yaml", "pipeline.yaml+photos")):
        path, extra = VARIANTS.get(config, (config, ()))
        (tmp_path / str(i)).mkdir()
        got, pinned = planned_versions(path, tmp_path / str(i), extra), PINNED[config]
        assert {s: got[s] == pinned[s] for s in pinned} == {s: s != "clusters" for s in pinned}


def test_bootstrap_bookkeeping_does_not_change_the_mask_version(tmp_path):
    import dataclasses

    from stages.bookkeeping import BOOKKEEPING
    from stages.masks.bootstrap import BootstrapParams

    names = {f.name for f in dataclasses.fields(BootstrapParams)}
    assert BOOKKEEPING["masks.bootstrap"] <= names
    sets = ("masks.method=bootstrap", "masks.bootstrap.num_workers=3", "masks.bootstrap.device=cpu")
    got = planned_versions("configs/demo.yaml", tmp_path, sets)
    assert got == PINNED["configs/demo.yaml+bootstrap"]


def test_stage_parameter_objects_read_the_same_declaration():
    import dataclasses

    from stages.bookkeeping import BOOKKEEPING
    from stages.extract.extract import _VOLATILE, ExtractParams
    from stages.train.trainer import VOLATILE_PARAMS, TrainParams

    assert set(VOLATILE_PARAMS) == BOOKKEEPING["train"] <= {f.name for f in dataclasses.fields(TrainParams)}
    assert set(_VOLATILE) == BOOKKEEPING["extract"] <= {f.name for f in dataclasses.fields(ExtractParams)}
    recorded = ExtractParams(batch_size=1, num_workers=0, device="cpu").recorded()
    assert recorded == ExtractParams().recorded()


@pytest.mark.parametrize("setting", ["train.epochs=3", "extract.input_size=256", "masks.threshold=0.4",
                                     "train.contrast.nn_topk=2"])
def test_result_keys_do_change_versions(setting, tmp_path):
    assert planned_versions("configs/demo.yaml", tmp_path, (setting,)) != PINNED["configs/demo.yaml"]


@pytest.mark.parametrize("setting", ["clusters.k=3", "clusters.k_max=8", "clusters.pca_dim=4", "clusters.n_init=2",
                                     "clusters.seed=7", "clusters.sheet_size=4", "clusters.names={names}",
                                     "clusters.space=pca", "clusters.groups=2", "clusters.reg=0.5"])
def test_clusters_keys_change_the_clusters_version_alone(setting, tmp_path):
    """The clusters stage has no bookkeeping key: each of its keys changes its pictures or partition."""
    from pipeline.config import Config
    from pipeline.configtypes import field_docs

    assert {k for k, *_ in field_docs(Config) if k.startswith("clusters.")} == {
        "clusters.k", "clusters.k_max", "clusters.pca_dim", "clusters.n_init", "clusters.seed",
        "clusters.sheet_size", "clusters.names", "clusters.space", "clusters.groups",
        "clusters.reg"}  # a new key is added here, or declared bookkeeping
    (tmp_path / "names.txt").write_text("0: sky\n")
    path, extra = VARIANTS["pipeline.yaml+photos"]
    got = planned_versions(path, tmp_path, (*extra, setting.replace("{names}", str(tmp_path / "names.txt"))))
    pinned = PINNED["pipeline.yaml+photos"]
    assert {s: got[s] == pinned[s] for s in pinned} == {s: s != "clusters" for s in pinned}


def test_status_with_bookkeeping_set_plans_no_new_version(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import cli

    sets = [s for s in user_paths(tmp_path) if not s.startswith("train.init=")]  # pipeline.yaml: random init
    monkeypatch.chdir(tmp_path)
    outs = []
    for extra in ([], ["--set", "train.keep_last=3"]):
        args = ["--config", str(REPO / "configs" / "demo.yaml"), "--store", str(tmp_path / "store")]
        for s in sets + extra[1:]:
            args += ["--set", s]
        r = CliRunner().invoke(cli, args + ["status"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        outs.append(r.output)
    assert PINNED["configs/demo.yaml"]["train"] in outs[1]
    assert outs[0] == outs[1]


def test_status_and_ls_flag_artifacts_made_by_other_code(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.runner import code_version

    sets = user_paths(tmp_path)
    cfg = load_config(REPO / "configs" / "demo.yaml", sets)
    ctx = Context(cfg=cfg, store=Store(tmp_path / "store"), quiet=True)
    planned = plan(ctx)
    with ctx.store.begin(planned["masks"].spec, code_version="git:0ld0ld0") as w:
        w.complete({})
    with ctx.store.begin(planned["train"].spec, code_version=code_version()) as w:
        w.complete({})
    manifest = ctx.store.info("masks", planned["masks"].version).manifest
    assert manifest["algorithm_version"] == planned["masks"].definition.algorithm_version == 1
    args = ["--config", str(REPO / "configs" / "demo.yaml"), "--store", str(tmp_path / "store")]
    for s in sets:
        args += ["--set", s]
    runner = CliRunner()
    status = runner.invoke(cli, args + ["status"], catch_exceptions=False).output
    [masks] = [ln for ln in status.splitlines() if ln.startswith("masks ")]
    [train] = [ln for ln in status.splitlines() if ln.startswith("train ")]
    assert "made by other code (git:0ld0ld0; running " in masks and "other code" not in train
    listing = runner.invoke(cli, args + ["ls"], catch_exceptions=False).output
    assert f"masks/{planned['masks'].version}" in listing and "[made by other code (git:0ld0ld0" in listing
    entries = __import__("json").loads(runner.invoke(cli, args + ["ls", "--json"], catch_exceptions=False).output)
    assert {e["ref"].split("/")[0]: e["other_code"] for e in entries} == {"masks": True, "train": False}


def test_a_features_teacher_makes_another_bootstrap_version(tmp_path):
    priors = planned_versions("configs/demo.yaml", tmp_path, ("masks.method=bootstrap",))
    features = planned_versions("configs/demo.yaml", tmp_path, ("masks.method=bootstrap",
                                                               "masks.bootstrap.teacher=features"))
    assert priors == PINNED["configs/demo.yaml+bootstrap"] and features["masks"] != priors["masks"]


def test_bootstrap_crf_names_a_new_mask_version_only_when_on(tmp_path):
    on = planned_versions("configs/demo.yaml", tmp_path, ("masks.method=bootstrap", "masks.bootstrap.crf=true"))
    off = planned_versions("configs/demo.yaml", tmp_path, ("masks.method=bootstrap", "masks.bootstrap.crf=false"))
    assert off == PINNED["configs/demo.yaml+bootstrap"]
    assert on["masks"] != off["masks"]
