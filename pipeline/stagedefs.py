"""Glue between the configuration and the stage functions: parameters, inputs, and the call.

Each definition says which config keys determine its artifact (everything else, such as worker
counts or the scheduler address, cannot change results and stays out of the version) and turns
the config section into the stage's explicit parameter objects.
"""
from __future__ import annotations

from typing import Any, Mapping

from artifacts.atomic import sha256_file
from artifacts.store import ArtifactWriter
from pipeline.config import Config
from pipeline.graph import Context, StageDef, register


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
        params["bootstrap"] = ctx.cfg.section("masks")["bootstrap"]
        params["priors"] = ctx.cfg.section("masks")["priors"]
    return params


def _post_params(cfg: Config):
    from stages.masks.postprocess import PostParams

    m = cfg.masks
    return PostParams(threshold=m.threshold, minmax=m.minmax, min_region=m.min_region, min_fg=m.min_fg,
                      max_fg=m.max_fg)


def _prior_params(cfg: Config):
    from stages.masks.priors import PriorParams

    p = cfg.masks.priors
    return PriorParams(size=p.size, n_segments=p.n_segments, compactness=p.compactness, weights=tuple(p.weights))


def make_estimator(cfg: Config):
    """The configured per-image estimator (picklable, so dask can ship it)."""
    from stages.masks import stage

    m = cfg.masks
    if m.method == "priors":
        return stage.PriorsEstimator(_prior_params(cfg))
    if m.method == "model":
        from stages.masks.onnx_model import OnnxParams

        mc = m.model
        params = OnnxParams(input_size=mc.input_size, mean=tuple(mc.mean), std=tuple(mc.std),
                            output_index=mc.output_index, minmax=mc.minmax)
        return stage.OnnxEstimator(m.model_path, params, threads=mc.threads)
    if m.method == "import":
        return stage.ImportEstimator(m.import_dir)
    raise NotImplementedError(f"masks.method {m.method!r} is not available in this version")


def _run_masks(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages.masks.stage import compute_masks

    cfg = ctx.cfg
    samples = ctx.dataset.samples(_masks_split(cfg))
    estimator = make_estimator(cfg)
    attrs = {**estimator.describe(), "dataset_layout": ctx.dataset.layout}
    client = ctx.dask_client()
    summary = compute_masks(
        samples, estimator, _post_params(cfg), writer.path,
        shard_size=cfg.masks.shard_size, store_soft=cfg.masks.store_soft, attrs=attrs,
        client=client, progress=not ctx.quiet,
        on_shard=lambda done, total: writer.set_progress(done, total, "shards"),
    )
    writer.update(estimator=estimator.describe())
    return summary


def _describe_masks(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    if not s:
        return ""
    text = f"{s.get('n_kept')}/{s.get('n_images')} kept ({manifest.get('params', {}).get('method')})"
    if s.get("n_skipped"):
        text += f", {s['n_skipped']} unreadable"
    return text


register(StageDef(
    name="masks",
    schema_version=1,
    help="Mask proposals: one salient-object mask per image, written as HDF5 shards.",
    needs=lambda cfg: (),
    params=_masks_params,
    run=_run_masks,
    describe=_describe_masks,
))



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
    params: dict[str, Any] = {"protocols": sorted(cfg.evaluate.protocols)}
    if "saliency" in cfg.evaluate.protocols:
        params["saliency"] = {"threshold": cfg.masks.threshold,
                              "data": ctx.data_identity(_masks_split(cfg))}
    return params


def _run_evaluate(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    from stages.evaluate.report import write_metrics, write_report

    cfg = ctx.cfg
    metrics: dict[str, dict[str, Any]] = {}
    images: dict[str, str] = {}
    if "saliency" in cfg.evaluate.protocols:
        from stages.evaluate.saliency import evaluate_saliency

        masks = inputs["masks"]
        ids = ctx.dataset.ids(_masks_split(cfg))
        metrics["saliency"] = evaluate_saliency(masks.path, ctx.dataset, ids, writer.path,
                                                threshold=cfg.masks.threshold, progress=not ctx.quiet)
        images.update({"saliency F-measure curve": "saliency_f_curve.png",
                       "best and worst images by IoU": "saliency_sheet.png"})
    write_metrics(writer.path, metrics)
    context = {"dataset": f"{cfg.data.root} ({ctx.dataset.layout})",
               **{f"input {k}": v.ref for k, v in inputs.items()}, "code": ctx.code_version}
    write_report(writer.path, "MaskContrast evaluation report", metrics, context, images)
    summary: dict[str, Any] = {}
    for protocol, m in metrics.items():
        for key in ("miou", "miou_std", "iou", "max_f", "mean_f", "mae"):
            if key in m:
                summary[f"{protocol}.{key}"] = round(float(m[key]), 4)
    return summary


def _describe_evaluate(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    return ", ".join(f"{k}={v}" for k, v in s.items())


register(StageDef(
    name="evaluate",
    schema_version=1,
    help="Evaluation report: saliency scores of the masks (more protocols as later stages land).",
    needs=_evaluate_needs,
    params=_evaluate_params,
    run=_run_evaluate,
    describe=_describe_evaluate,
))
