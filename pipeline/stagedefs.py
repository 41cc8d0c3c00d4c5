"""The stage definitions: what each stage needs, which configuration keys determine its artifact,
and the call of the stage's entry, ``stages.<name>.run(params, inputs, out_dir, ...)``, with its
section of the configuration, its upstream artifacts and the samples it reads. Keys that cannot
change results (worker counts, devices, ``train.keep_last``, the scheduler address) are declared
once, in ``stages.bookkeeping``, and stay out of versions through ``Config.section``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from artifacts.atomic import sha256_file
from artifacts.store import ArtifactWriter
from pipeline.config import Config
from pipeline.configtypes import ConfigError
from pipeline.context import Context, StageDef
from stages.evaluate.params import needs_train_split
from stages.network.compute import resolved_compute
from stages.versions import ALGORITHM_VERSIONS


# -- masks -------------------------------------------------------------------------------------------------
def _masks_split(cfg: Config) -> str | None:
    return None if cfg.masks.split == "all" else cfg.masks.split


def _masks_params(ctx: Context) -> Mapping[str, Any]:
    m = ctx.cfg.masks
    params: dict[str, Any] = {
        "data": ctx.data_identity(_masks_split(ctx.cfg)),
        "method": m.method,
        "post": {"threshold": m.threshold, "minmax": m.minmax, "min_region": m.min_region,
                 "min_fg": m.min_fg, "max_fg": m.max_fg},
        "shard_size": m.shard_size,
        "store_soft": m.store_soft,
    }
    if m.method == "priors":
        params["priors"] = ctx.cfg.section("masks")["priors"]
    elif m.method == "model":
        params["model"] = {**ctx.cfg.section("masks")["model"], "sha256": sha256_file(m.model_path)}
    elif m.method == "import":
        from stages.masks.stage import folder_fingerprint

        params["import"] = {"fingerprint": folder_fingerprint(m.import_dir)}
    elif m.method == "bootstrap":
        section = ctx.cfg.section("masks")  # crf and teacher (since_default) only when not at their default
        params["bootstrap"] = {**section["bootstrap"], "init": _init_identity(m.bootstrap.init, m.bootstrap.backbone)}
        if m.bootstrap.teacher == "priors":
            params["priors"] = section["priors"]
        else:
            params["features"] = _features_identity(ctx.cfg)
    elif m.method == "features":
        params["features"] = _features_identity(ctx.cfg)
    if m.proposals != "single":  # left out for single: the versions made before proposals existed
        params["proposals"] = {"proposals": m.proposals, "max_proposals": m.max_proposals,
                               "min_proposal": m.min_proposal}
    return params


def _features_identity(cfg: Config) -> dict[str, Any]:
    section = dict(cfg.section("masks")["features"])
    section["init"] = _init_identity(cfg.masks.features.init, cfg.masks.features.backbone)
    return section


def _init_identity(init: str, backbone: str) -> Any:
    """What an ``init`` value means for a version: the file's content, not its path or name."""
    from stages.common.weights import file_digest, resolve_init

    if init == "random":
        return init
    path = Path(resolve_init(init, backbone))
    return {"file": path.name, "sha256": file_digest(path)}


def make_estimator(cfg: Config, work_dir: Path | None = None, samples=None, progress: bool = True):
    """The configured per-image estimator (picklable, so dask can ship it).

    ``bootstrap`` first fits its saliency network on the priors maps of ``samples`` inside
    ``work_dir`` (resumable round by round), then infers with it like any other estimator.
    """
    from stages.masks import stage

    m = cfg.masks
    if m.method == "bootstrap":
        from stages.masks.bootstrap import BootstrapEstimator, fit_bootstrap

        teacher = cfg.masks.priors if m.bootstrap.teacher == "priors" else _features_estimator(cfg)
        checkpoint = fit_bootstrap(list(samples), teacher, m.bootstrap, work_dir, progress=progress)
        return BootstrapEstimator(checkpoint, crf=m.bootstrap.crf)
    if m.method == "priors":
        return stage.PriorsEstimator(cfg.masks.priors)
    if m.method == "features":
        return _features_estimator(cfg)
    if m.method == "model":
        return stage.OnnxEstimator(m.model_path, m.model, threads=m.model.threads)
    if m.method == "import":
        return stage.ImportEstimator(m.import_dir)
    raise ValueError(f"unknown masks.method {m.method!r}")


def _features_estimator(cfg: Config):
    from stages.common.weights import file_digest, resolve_init
    from stages.masks.features import FeatureEstimator

    f = cfg.masks.features
    weights = Path(resolve_init(f.init, f.backbone))
    return FeatureEstimator(f, weights, file_digest(weights))


def _run_masks(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages import masks

    samples = ctx.dataset.samples(_masks_split(ctx.cfg))
    estimator = make_estimator(ctx.cfg, writer.path / "bootstrap", samples, progress=not ctx.quiet)
    return masks.run(ctx.cfg.masks, inputs, writer.path, samples=samples, estimator=estimator,
                     attrs={**estimator.describe(), "dataset_layout": ctx.dataset.layout}, client=ctx.dask_client(),
                     progress=not ctx.quiet, on_progress=writer.set_progress, on_record=writer.update)


def _describe_masks(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    if not s:
        return ""
    text = f"{s.get('n_kept')}/{s.get('n_images')} kept ({manifest.get('params', {}).get('method')})"
    if s.get("n_skipped"):
        text += f", {s['n_skipped']} unreadable"
    return text


MASKS = StageDef(
    name="masks",
    schema_version=1,
    algorithm_version=ALGORITHM_VERSIONS["masks"],
    help="Mask proposals: one salient-object mask per image (and with masks.proposals, several object "
         "proposals), written as HDF5 shards.",
    needs=lambda cfg: (),
    params=_masks_params,
    run=_run_masks,
    describe=_describe_masks,
)



# -- train -------------------------------------------------------------------------------------------------
def _train_params(ctx: Context) -> Mapping[str, Any]:
    params = dict(ctx.cfg.section("train"))
    params["init"] = _init_identity(params["init"], params["backbone"])  # the file's content determines the result
    params["data"] = ctx.data_identity(ctx.cfg.data.train_split)
    # device type and precision as the training will resolve them (train.device itself is bookkeeping)
    params["compute"] = resolved_compute(ctx.cfg.train.device, ctx.cfg.train.amp)
    return params


def _run_train(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages import train

    split = ctx.cfg.data.train_split
    return train.run(ctx.cfg.train, inputs, writer.path, samples=ctx.dataset.samples(split), split=split,
                     progress=not ctx.quiet, on_progress=writer.set_progress, on_record=writer.update)


def _describe_train(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    p = manifest.get("params") or {}
    if not s:
        return ""
    loss = s.get("loss")
    text = f"{p.get('backbone')}, {s.get('epochs')} epochs"
    if isinstance(loss, (int, float)):
        text += f", final loss {loss:.3f}"
    return text


TRAIN = StageDef(
    name="train",
    schema_version=1,
    algorithm_version=ALGORITHM_VERSIONS["train"],
    help="Contrastive embedding training on the mask shards (MaskContrast).",
    needs=lambda cfg: ("masks",),
    params=_train_params,
    run=_run_train,
    describe=_describe_train,
)


# -- extract -----------------------------------------------------------------------------------------------
BANK_SPLIT_KEY = "evaluate.retrieval.bank_split"


def retrieval_bank_split(ctx: Context) -> str | None:
    """The split of the retrieval memory bank when it is not ``data.train_split``, else None.

    None also when retrieval is not evaluated, so a config that leaves ``bank_split`` null, or sets
    it to the train split, resolves to the same parameters (and versions) as before the key
    existed. A split the dataset lacks, or the val split itself (each query would retrieve
    itself), is a ConfigError naming the key: raised while planning, before any stage runs.
    """
    cfg = ctx.cfg
    bank = cfg.evaluate.retrieval.bank_split
    if bank is None or bank == cfg.data.train_split or "retrieval" not in cfg.evaluate.protocols:
        return None
    available = ctx.dataset.splits()
    if bank not in available:
        raise ConfigError(f"the dataset {cfg.data.root} has no split {bank!r}; available: {', '.join(available)}",
                          BANK_SPLIT_KEY, ctx.config_source)
    if bank == cfg.data.val_split:
        raise ConfigError(f"{bank!r} is also data.val_split: every query would retrieve itself; use a split "
                          "without the val images (null = data.train_split)", BANK_SPLIT_KEY, ctx.config_source)
    return bank


def _extract_splits(ctx: Context) -> tuple[str, ...]:
    """val always; train when a protocol reads it (``needs_train_split``: the linear probe, retrieval
    with the train split as its bank, discriminant K-means); the bank's split when
    ``evaluate.retrieval.bank_split`` names another."""
    cfg = ctx.cfg
    bank = retrieval_bank_split(ctx)
    splits = [cfg.data.val_split]
    if needs_train_split(cfg.evaluate, bank_is_train=bank is None):
        splits.append(cfg.data.train_split)
    if bank is not None:
        splits.append(bank)
    return tuple(dict.fromkeys(splits))  # train may be val: each split once, in this order


def _extract_params(ctx: Context) -> Mapping[str, Any]:
    params = dict(ctx.cfg.section("extract"))
    params["splits"] = {split: ctx.data_identity(split) for split in _extract_splits(ctx)}
    params["compute"] = resolved_compute(ctx.cfg.extract.device, "auto")  # extract autocasts on CUDA
    m = ctx.cfg.masks
    if ctx.cfg.extract.mask_source == "model" and m.proposals != "single":  # the head's mask is split
        params["proposals"] = {"max_proposals": m.max_proposals, "min_proposal": m.min_proposal}
    return params


def _run_extract(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages import extract

    samples = {split: ctx.dataset.samples(split) for split in _extract_splits(ctx)}
    m = ctx.cfg.masks
    split_head = ({"proposals": m.proposal_params}  # the head's mask is split into components
                  if ctx.cfg.extract.mask_source == "model" and m.proposals != "single" else {})
    return extract.run(ctx.cfg.extract, inputs, writer.path, samples=samples, progress=not ctx.quiet,
                       on_progress=writer.set_progress, **split_head)


def _describe_extract(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    return ", ".join(f"{split}: {s.get(f'{split}.n_images')} images" for split in s.get("splits", []))


EXTRACT = StageDef(
    name="extract",
    schema_version=1,
    algorithm_version=ALGORITHM_VERSIONS["extract"],
    help="Embedding extraction: prototypes, salient masks and decoder features per image (HDF5).",
    needs=lambda cfg: ("train", "masks") if cfg.extract.mask_source == "masks" else ("train",),
    params=_extract_params,
    run=_run_extract,
    describe=_describe_extract,
)


# -- clusters ----------------------------------------------------------------------------------------------
def labelled(ctx: Context) -> bool:
    """False for unlabelled photos: no classes.txt and no label file in the val split. (A dataset with
    some labels is scored as before, and the protocols report what they miss.)"""
    ds = ctx.dataset
    return bool(ds.classes) or ds.any_labels(ctx.cfg.data.val_split)


def default_target(ctx: Context) -> str:
    """Where ``run`` ends without ``--to``: evaluate with labels, clusters without."""
    ctx.resolve_splits()
    return "evaluate" if labelled(ctx) else "clusters"


def pipeline_stages(ctx: Context) -> tuple[str, ...]:
    """Every registered stage the configured pipeline can plan on this data: all of them with
    labels (``clusters`` too: it needs none, and a clusters artifact made beside an evaluation is in
    use), all but ``evaluate`` without (scoring needs ground truth; ``run`` ends at ``clusters``).
    What ``gc`` keeps: any other planning error stays an error, so gc never deletes on a bad config."""
    ctx.resolve_splits()
    return tuple(d.name for d in DEFINITIONS if d.name != "evaluate" or labelled(ctx))


def _cluster_names(ctx: Context) -> dict[int, str]:
    from stages.clusters import NamesError, read_names

    path = ctx.cfg.clusters.names
    if path is None:
        return {}
    try:
        return read_names(path)
    except NamesError as exc:
        raise ConfigError(str(exc), "clusters.names", ctx.config_source) from None


def _clusters_params(ctx: Context) -> Mapping[str, Any]:
    c = ctx.cfg.clusters
    params: dict[str, Any] = {"split": ctx.data_identity(ctx.cfg.data.val_split), "k": c.k,
                              "pca_dim": c.pca_dim, "n_init": c.n_init, "seed": c.seed, "sheet_size": c.sheet_size}
    if c.k == "auto":
        params["k_range"] = [2, c.k_max]
    # groups and reg only shape the discriminant space: with pca they leave the version alone
    params["space"] = {"name": c.space, **({"groups": c.groups, "reg": c.reg} if c.space == "discriminant" else {})}
    if ctx.cfg.masks.proposals != "single":
        # the embeddings hold proposals, clustered one by one (a clusters artifact made when they
        # were clustered per image is not reused); left out for single: its versions are kept
        params["regions"] = "proposals"
    names = _cluster_names(ctx)
    if names:  # the names' content, not the file's path, determines the pictures
        params["names"] = {str(k): v for k, v in sorted(names.items())}
    return params


def _run_clusters(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages import clusters

    split = ctx.cfg.data.val_split
    return clusters.run(ctx.cfg.clusters, inputs, writer.path, samples=ctx.dataset.samples(split), split=split,
                        progress=not ctx.quiet, on_progress=writer.set_progress)


def _describe_clusters(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    if not s:
        return ""
    text = f"k={s.get('k')} ({s.get('k_rule')}), {s.get('n_images')} images"
    if s.get("n_skipped"):
        text += f", {s['n_skipped']} skipped"
    return text


CLUSTERS = StageDef(
    name="clusters",
    schema_version=1,
    algorithm_version=ALGORITHM_VERSIONS["clusters"],
    help="Clusters without labels: K-means on the prototypes, contact sheets, names, a segmentation per image.",
    needs=lambda cfg: ("extract",),
    params=_clusters_params,
    run=_run_clusters,
    describe=_describe_clusters,
)


# -- evaluate ----------------------------------------------------------------------------------------------
def _evaluate_needs(cfg: Config) -> tuple[str, ...]:
    protocols = set(cfg.evaluate.protocols)
    needs = []
    if "saliency" in protocols:
        needs.append("masks")
    if protocols - {"saliency"}:
        needs.append("extract")
    return tuple(needs)


def _evaluate_params(ctx: Context) -> Mapping[str, Any]:
    cfg = ctx.cfg
    if set(cfg.evaluate.protocols) - {"saliency"} and not labelled(ctx):
        raise ConfigError(f"scoring needs ground truth, and the dataset {cfg.data.root} has no labels "
                          f"(no classes.txt, no labels/ file for split {cfg.data.val_split!r}): "
                          "`maskcontrast clusters` (where `run` ends without labels) needs none",
                          "evaluate.protocols", ctx.config_source)
    section = ctx.cfg.section("evaluate")
    params: dict[str, Any] = {"protocols": sorted(cfg.evaluate.protocols)}
    if "saliency" in cfg.evaluate.protocols:
        params["saliency"] = {"threshold": cfg.masks.threshold, "data": ctx.data_identity(_masks_split(cfg))}
    if "kmeans" in cfg.evaluate.protocols:
        kmeans = {k: v for k, v in section["kmeans"].items() if k not in ("space", "groups", "reg")}
        params["kmeans"] = {**kmeans, **cfg.evaluate.kmeans.space_options(), "seeds": section["seeds"]}
    if "linear" in cfg.evaluate.protocols:
        params["linear"] = {**section["linear"], "seed": section["seeds"][0]}
        if not cfg.evaluate.linear.crf:  # off: the parameters the versions had before the key existed
            del params["linear"]["crf"]
    if "retrieval" in cfg.evaluate.protocols:
        retrieval = dict(section["retrieval"])
        bank = retrieval_bank_split(ctx)
        if bank is None:  # the train split: the parameters the versions had before the key existed
            del retrieval["bank_split"]
        else:
            retrieval["bank_split"] = bank
        params["retrieval"] = retrieval
    if set(cfg.evaluate.protocols) - {"saliency"}:
        params["labels"] = {s: ctx.data_identity(s) for s in _extract_splits(ctx)}
    return params


def _run_evaluate(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages import evaluate

    cfg = ctx.cfg
    context = {"dataset": f"{cfg.data.root} ({ctx.dataset.layout})",
               **{f"input {k}": v.ref for k, v in inputs.items()}, "code": ctx.code_version}
    return evaluate.run(cfg.evaluate, inputs, writer.path, dataset=ctx.dataset, val_split=cfg.data.val_split,
                        train_split=cfg.data.train_split, bank_split=retrieval_bank_split(ctx),
                        masks_split=_masks_split(cfg), saliency_threshold=cfg.masks.threshold, context=context,
                        progress=not ctx.quiet, on_progress=writer.set_progress)


def _describe_evaluate(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    return ", ".join(f"{k}={v}" for k, v in s.items())


EVALUATE = StageDef(
    name="evaluate",
    schema_version=1,
    algorithm_version=ALGORITHM_VERSIONS["evaluate"],
    help="Evaluation report: K-means, linear-probe, retrieval and saliency protocols.",
    needs=_evaluate_needs,
    params=_evaluate_params,
    run=_run_evaluate,
    describe=_describe_evaluate,
)


#: The stages, in pipeline order.
DEFINITIONS = (MASKS, TRAIN, EXTRACT, CLUSTERS, EVALUATE)
