"""Comparing models: the ``compare`` artifact of ``maskcontrast evaluate --model A --model B``.

Not a stage of the graph: its inputs are the models named on the command line, not a fixed
upstream stage. Each model's extract artifact is planned with the graph (the train stage pinned
to the model); the comparison's (model x protocol x seed) jobs run with
``stages.evaluate.batch.run_batch``.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from artifacts.store import ArtifactSpec, ArtifactWriter
from pipeline.config import Config
from pipeline.configtypes import ConfigError
from pipeline.context import Context, Planned, StageDef
from pipeline.graph import plan
from pipeline.stagedefs import _extract_splits, retrieval_bank_split
from stages.evaluate.params import needs_train_split, protocol_options
from stages.versions import ALGORITHM_VERSIONS

if TYPE_CHECKING:
    from stages.evaluate.batch import Job

COMPARE = "compare"


def compare_protocols(cfg: Config) -> tuple[str, ...]:
    """The batch protocols of ``evaluate.protocols``: saliency scores the masks, not a model, so it
    is left out; the pixel-level K-means variant joins when ``evaluate.kmeans.pixel`` asks."""
    protocols = [p for p in cfg.evaluate.protocols if p != "saliency"]
    if "kmeans" in protocols and cfg.evaluate.kmeans.pixel:
        protocols.insert(protocols.index("kmeans") + 1, "pixel_kmeans")
    return tuple(protocols)


def _compare_params(ctx: Context) -> Mapping[str, Any]:
    cfg = ctx.cfg
    protocols = compare_protocols(cfg)
    runner = protocol_options(cfg.evaluate)
    seeded = bool({"kmeans", "pixel_kmeans", "linear"} & set(protocols))  # retrieval has no seed
    params = {"protocols": list(protocols), "seeds": list(cfg.evaluate.seeds) if seeded else [],
              "runner": {p: runner[p] for p in protocols},
              "labels": {s: ctx.data_identity(s) for s in _extract_splits(ctx)}}
    bank = retrieval_bank_split(ctx)
    if bank is not None:  # absent for the train split: the versions made before the key existed
        params["bank_split"] = bank
    return params


def compare_jobs(ctx: Context, extracts: Mapping[str, Any]) -> list[Job]:
    """The (model x protocol x seed) jobs of ``extracts`` (model name -> its extract artifact, an
    object with ``.path``). Paths are absolute: dask workers read them from a shared filesystem."""
    from stages.evaluate.batch import jobs_for

    cfg = ctx.cfg
    protocols = compare_protocols(cfg)
    runner = protocol_options(cfg.evaluate)
    val, train = cfg.data.val_split, cfg.data.train_split
    bank = retrieval_bank_split(ctx)
    needs_train = needs_train_split(cfg.evaluate, bank_is_train=bank is None)
    root = Path(cfg.data.root).resolve()
    jobs = []
    for model, info in extracts.items():
        emb = Path(info.path).resolve()
        jobs += jobs_for(model, root, val_store=emb / val, train_store=emb / train if needs_train else None,
                         bank_store=None if bank is None else emb / bank, protocols=protocols,
                         seeds=cfg.evaluate.seeds, val_split=val, train_split=train, bank_split=bank,
                         dataset_layout=ctx.dataset.layout, params={p: runner[p] for p in protocols})
    return jobs


class ComparisonIncomplete(RuntimeError):
    """Some jobs of a comparison still failed after their retries. The artifact is left incomplete
    (its manifest says ``failed`` and lists them); the table of what finished is written, and a
    rerun of the same command retries only the failed jobs."""

    def __init__(self, failed: Sequence[Mapping[str, Any]], n_jobs: int, table: Path):
        self.failed, self.n_jobs, self.table = list(failed), n_jobs, table
        listed = "; ".join(f"{j['model']} {j['protocol']}"
                           f"{'' if j['seed'] is None else ' seed ' + str(j['seed'])}: {str(j['error'])[:300]}"
                           for j in self.failed)
        super().__init__(f"{len(self.failed)} of {n_jobs} jobs failed, so the comparison is not complete "
                         f"(rerun the same command to retry only these; table so far: {table}): {listed}")


def _run_compare(ctx: Context, writer: ArtifactWriter, inputs: Mapping[str, Any], *, retries: int) -> Mapping[str, Any]:
    from stages.evaluate.batch import run_batch

    jobs = compare_jobs(ctx, inputs)
    writer.update(retries=retries)
    writer.set_progress(0, len(jobs), "jobs")
    # a continued (interrupted or failed) batch reuses the jobs that finished; --force clears them first
    table = run_batch(jobs, ctx.dask_client(), writer.path, retries=retries, progress=not ctx.quiet, resume=True,
                      on_job=lambda done, total: writer.set_progress(done, total, "jobs"))
    failed = [j for j in table["jobs"] if j["status"] != "ok"]
    if failed:
        writer.update(failed_jobs=[{k: j[k] for k in ("key", "model", "protocol", "seed", "error")} for j in failed])
        raise ComparisonIncomplete(failed, len(jobs), writer.path / "comparison.md")
    return {"n_models": len(inputs), "n_jobs": len(jobs), "n_failed": 0}


def _describe_compare(manifest: Mapping[str, Any]) -> str:
    s = manifest.get("summary") or {}
    return f"{s.get('n_models')} models, {s.get('n_jobs')} jobs, {s.get('n_failed')} failed" if s else ""


def compare_plan(ctx: Context, train_refs: Sequence[str], *, retries: int = 1
                 ) -> tuple[dict[str, dict[str, Planned]], Planned]:
    """Plan a comparison of the train artifacts ``train_refs`` (complete refs, ``train/VERSION``).

    Returns, per model, the stages that make its extract artifact (``plan`` with the train stage
    pinned to the model, so an extract made by ``maskcontrast extract`` for the configured model
    is the same version and is reused), and the ``compare`` artifact, whose version is a hash of
    the evaluation parameters and the models' extract versions (sorted by model, so the order
    of ``--model`` options does not matter). ``retries`` only decides how often a failing job is
    tried; it does not enter the version.
    """
    if not compare_protocols(ctx.cfg):
        raise ConfigError("comparing models needs a protocol other than saliency (which scores the masks, "
                          f"not a model); got {list(ctx.cfg.evaluate.protocols)}", "evaluate.protocols")
    models = sorted(set(train_refs))
    extracts = {model: plan(ctx, ("extract",), pinned={"train": model}) for model in models}
    definition = StageDef(
        name=COMPARE, schema_version=1, algorithm_version=ALGORITHM_VERSIONS[COMPARE],
        help="Batch evaluation: (model x protocol x seed) jobs on dask, one comparison table.",
        needs=lambda cfg: (), params=_compare_params, run=partial(_run_compare, retries=retries),
        describe=_describe_compare)
    inputs = {model: stages["extract"].spec.ref for model, stages in extracts.items()}
    spec = ArtifactSpec(COMPARE, definition.schema_version, dict(_compare_params(ctx)), inputs,
                        definition.algorithm_version)
    return extracts, Planned(definition, spec)
