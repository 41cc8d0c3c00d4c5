"""The ``maskcontrast`` command line: a thin click layer over the runner and the store.

Usage errors (bad config, unknown key, missing path) exit with code 2; a failing stage or store
problem exits with 1, as one line unless ``--debug`` asks for the traceback.
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click

from pipeline.configtypes import ConfigError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True}
log = logging.getLogger("maskcontrast")


class State:
    """Global options, resolved lazily so ``--help`` and ``data make-demo`` need no config file."""

    def __init__(self, config: str | None, overrides: tuple[str, ...], store: str | None, quiet: bool, debug: bool):
        self.config_path, self.overrides, self.store_arg = config, overrides, store
        self.quiet, self.debug = quiet, debug
        self._cfg = None

    @property
    def config_source(self) -> str:
        return self.config_path or "<defaults>"

    def cfg(self):
        if self._cfg is None:
            from pipeline.config import DEFAULT_CONFIG, load_config

            path = self.config_path
            if path is None and Path(DEFAULT_CONFIG).is_file():
                path = DEFAULT_CONFIG
                self.config_path = path
            self._cfg = load_config(path, self.overrides, store=self.store_arg)
        return self._cfg

    def context(self, *, need_data: bool = True, scheduler: str | None = None):
        from artifacts.store import Store
        from pipeline.config import check_paths
        from pipeline.context import Context
        from pipeline.runner import code_version

        cfg = self.cfg()
        if scheduler is not None:
            import dataclasses

            cfg = dataclasses.replace(cfg, dask=dataclasses.replace(cfg.dask, scheduler=scheduler))
        check_paths(cfg, need_data=need_data, source=self.config_source)
        return Context(cfg=cfg, store=Store(cfg.store), quiet=self.quiet, code_version=code_version(),
                       config_source=self.config_source)


def handle_errors(fn):
    """Turn domain errors into one clear line with the right exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        state: State = click.get_current_context().find_object(State)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except ConfigError as exc:
            if state and state.debug:
                raise
            raise click.UsageError(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: partial work is kept; rerun the same command to continue", err=True)
            sys.exit(130)
        except Exception as exc:  # one line for the user, the traceback with --debug
            if state and state.debug:
                raise
            raise click.ClickException(str(exc)) from None

    return wrapper


def _version() -> str:
    from pipeline.runner import code_version

    return code_version()


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
              help="pipeline configuration [default: ./pipeline.yaml if present, else built-in defaults]")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="override a config key (dotted, value parsed as YAML); repeatable")
@click.option("--store", type=click.Path(file_okay=False), default=None, help="artifact store (overrides `store:`)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars, warnings and errors only")
@click.option("--debug", is_flag=True, help="full tracebacks and debug logging")
@click.version_option(version=None, package_name="maskcontrast-pipeline", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx, config, overrides, store, quiet, debug):
    """MaskContrast as a pipeline of versioned, resumable stages.

    \b
    dataset -> masks -> train -> extract -> evaluate
    Each stage writes <store>/<stage>/<version>/ with a manifest.json; a complete
    version is skipped, a partial one continued, a changed config makes a new one.
    """
    level = logging.DEBUG if debug else (logging.WARNING if quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("distributed", "asyncio", "PIL", "matplotlib", "h5py", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING if debug else logging.ERROR)
    ctx.obj = State(config, overrides, store, quiet, debug)


pass_state = click.make_pass_decorator(State)


def _print_results(results, quiet: bool) -> None:
    for r in results:
        tail = f"{r.seconds:7.1f}s" if r.action != "skipped" else "       "
        click.echo(f"{r.name:9s} {r.version}  {r.action:8s} {tail}  {r.path}")
        if r.summary and not quiet:
            figures = {k: v for k, v in r.summary.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            if figures:
                click.echo("          " + ", ".join(f"{k}={_fmt(v)}" for k, v in list(figures.items())[:8]))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _stage_choice():
    from pipeline.graph import ORDER

    return click.Choice(ORDER)


@cli.command()
@click.option("--from", "start", type=_stage_choice(), default=None, help="first stage to run")
@click.option("--to", "stop", type=_stage_choice(), default=None, help="last stage to run")
@click.option("--force", is_flag=True, help="recompute the selected stages from scratch (and take over a lock recorded by another host)")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask scheduler (tcp://host:port) for fan-out; 'synchronous' runs in-process")
@pass_state
@handle_errors
def run(state: State, start, stop, force, scheduler):
    """Run the pipeline up to --to (default: evaluate, or clusters when the data has no labels),
    with everything it needs, in order.

    Complete stages are skipped, partial ones continued; stages before --from are only read.
    """
    from pipeline.graph import ORDER
    from pipeline.runner import run_stages
    from pipeline.stagedefs import default_target

    ctx = state.context(scheduler=scheduler)
    try:
        target = stop or default_target(ctx)
        results = run_stages(ctx, (target,), start=start, force_stages=ORDER if force else ())
    finally:
        ctx.close()
    if not results:
        raise click.UsageError(f"nothing to run between --from {start} and --to {target}")
    _print_results(results, state.quiet)
    last = results[-1]
    click.echo(f"done: {last.name} artifact at {last.path}")
    _print_headline(last)


def _print_headline(result) -> None:
    """The evaluation report's headline figures (or the clusters' pictures), so a run ends with its result."""
    if result.name == "clusters":
        s = result.summary
        named = [n for i, n in enumerate(s.get("class_names") or []) if i and not n.startswith("cluster ")]
        if named:
            click.echo(f"clusters: k = {s.get('k')}, {s.get('n_images')} images, named {', '.join(named)}; "
                       f"segmentations in {result.path / 'segmentations'}, colours in {result.path / 'legend.png'}")
        else:
            click.echo(f"clusters: k = {s.get('k')}, {s.get('n_images')} images; look at {result.path / 'sheets'}, "
                       "name them in a file of 'cluster id: name' lines, then rerun with --set clusters.names=FILE")
        if s.get("n_skipped"):
            click.echo(f"skipped: {s['n_skipped']} image(s), listed in {result.path / 'skipped.json'}")
        return
    if result.name != "evaluate":
        return
    report = result.path / "report.md"
    figures = ", ".join(f"{k} {v}" for k, v in result.summary.items())
    click.echo(f"report: {report}")
    if figures:
        click.echo(f"headline: {figures}")


def _stage_command_body(state: State, name: str, force: bool, scheduler: str | None) -> None:
    """Run stage ``name`` (and what it needs upstream, when missing) and print the results."""
    from pipeline.runner import run_stages

    ctx = state.context(scheduler=scheduler)
    try:
        results = run_stages(ctx, (name,), force_stages=(name,) if force else ())
    finally:
        ctx.close()
    _print_results(results, state.quiet)


def _stage_command(name: str, help_text: str):
    @click.option("--force", is_flag=True, help="recompute this stage from scratch (and take over a lock recorded by another host)")
    @click.option("--scheduler", default=None, metavar="ADDRESS",
                  help="dask scheduler (tcp://host:port); 'synchronous' runs in-process")
    @pass_state
    @handle_errors
    def command(state: State, force, scheduler):
        _stage_command_body(state, name, force, scheduler)

    command.__doc__ = help_text + "\n\nRuns what it needs upstream first when that is missing."
    return cli.command(name=name)(command)


def _register_stage_commands() -> None:
    """One command per stage, unless a dedicated one (``evaluate``) is defined above."""
    from pipeline.graph import STAGES, available

    for name in available():
        if name not in cli.commands:
            _stage_command(name, STAGES[name].help)


@cli.command()
@click.option("--model", "models", multiple=True, metavar="train/VERSION",
              help="compare this train artifact (repeatable; a unique version prefix will do)")
@click.option("--retries", default=1, type=click.IntRange(min=0),
              help="with --model: further attempts of a failing evaluation job")
@click.option("--force", is_flag=True,
              help="recompute this stage's artifact from scratch (with --model: the comparison, not the extracts)")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="dask scheduler (tcp://host:port); 'synchronous' runs in-process")
@pass_state
@handle_errors
def evaluate(state: State, models, retries, force, scheduler):
    """Evaluation report: K-means, linear-probe, retrieval and saliency protocols.

    Runs what it needs upstream first when that is missing.

    \b
    With --model (repeatable), compare several trained models instead:
      maskcontrast evaluate --model train/V1 --model train/V2 [--scheduler tcp://host:port]
    Each model's extract artifact is made (or reused), then every model x protocol x seed
    of evaluate.protocols and evaluate.seeds is one job on the dask cluster (an embedded
    local cluster unless --scheduler names one; the workers read the store and the dataset
    by path). A failed job is retried (--retries); a job that still fails leaves the comparison
    incomplete and the command exits 1 listing it; rerunning retries only the failed jobs. The
    results land in one compare/VERSION artifact: comparison.md, comparison.json and comparison.png.
    """
    if not models:
        _stage_command_body(state, "evaluate", force, scheduler)
        return
    ctx = state.context(scheduler=scheduler)
    try:
        results = _compare_models(ctx, [_train_ref(ctx.store, m) for m in models], retries=retries, force=force)
    finally:
        ctx.close()
    _print_results(results, state.quiet)
    _print_comparison(results[-1])


def _open_ref(store, text: str, stage: str, option: str):
    """``STAGE/VERSION`` (a unique prefix, or a bare version) to a complete artifact of ``stage``."""
    from artifacts.store import StoreError

    ref = text if "/" in text else f"{stage}/{text}"
    if ref.partition("/")[0] != stage:
        raise click.BadParameter(f"expected a {stage} artifact ({stage}/VERSION), got {text!r}", param_hint=f"'{option}'")
    try:
        return store.open(ref)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint=f"'{option}'") from None


def _train_ref(store, text: str) -> str:
    """``--model`` value (``train/VERSION``, a unique prefix, or a bare version) to a complete train ref."""
    from artifacts.store import StoreError

    ref = text if "/" in text else f"train/{text}"
    if ref.partition("/")[0] != "train":
        raise click.BadParameter(f"expected a train artifact (train/VERSION), got {text!r}", param_hint="'--model'")
    try:
        return store.open(ref).ref
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="'--model'") from None


def _compare_models(ctx, train_refs: list[str], *, retries: int, force: bool) -> list:
    """Make (or reuse) each model's extract artifact, then run the comparison artifact.

    A model whose extract artifact is complete needs nothing upstream; otherwise its missing
    upstream stages (the masks, for ``extract.mask_source: masks``) run first, each once.
    ``force`` recomputes the comparison only."""
    from artifacts.store import COMPLETE
    from pipeline.runner import StageFailed, run_one
    from pipeline.compare import ComparisonIncomplete, compare_plan

    extracts, compare = compare_plan(ctx, train_refs, retries=retries)
    results, seen = [], set()
    for planned in extracts.values():
        target = planned["extract"]
        done = ctx.store.info(target.name, target.version).state == COMPLETE
        for p in ([target] if done else planned.values()):
            if p.spec.ref not in seen:
                seen.add(p.spec.ref)
                results.append(run_one(ctx, p))
    try:
        results.append(run_one(ctx, compare, force=force))
    except StageFailed as exc:
        if isinstance(exc.__cause__, ComparisonIncomplete):  # show what finished, then exit 1
            _print_results(results, ctx.quiet)
            _print_table(exc.__cause__.table)
        raise
    return results


def _print_comparison(result) -> None:
    """The comparison table's path and rows (a complete comparison: every job succeeded)."""
    _print_table(result.path / "comparison.md")


def _print_table(table: Path) -> None:
    click.echo(f"comparison: {table}")
    for line in table.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            click.echo(line)


@cli.command()
@pass_state
@handle_errors
def status(state: State):
    """Each stage of the configured pipeline: version, state, progress and size."""
    from pipeline.graph import available, plan
    from pipeline.status import pipeline_status

    ctx = state.context()
    planned, problems = {}, {}
    for name in available():
        try:
            planned.update(plan(ctx, (name,)))
        except ConfigError as exc:
            problems[name] = exc.detail
    for line in pipeline_status(ctx, planned, problems):
        click.echo(line)


@cli.command(name="ls")
@click.argument("stage", required=False)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_state
@handle_errors
def ls_(state: State, stage, as_json):
    """Every version in the store (optionally of one stage)."""
    from artifacts.store import Store
    from pipeline.runner import code_version
    from pipeline.status import list_lines

    cfg = state.cfg()
    infos = Store(cfg.store).list(stage)
    running = code_version()
    if as_json:
        click.echo(json.dumps([{"ref": i.ref, "state": i.state, "path": str(i.path), "size": i.size_bytes,
                                "created": (i.manifest or {}).get("created"),
                                "code_version": (i.manifest or {}).get("code_version"),
                                "other_code": bool((i.manifest or {}).get("code_version"))
                                and (i.manifest or {}).get("code_version") != running,
                                "summary": i.summary} for i in infos], indent=2))
        return
    if not infos:
        click.echo(f"no artifacts in {cfg.store}")
    for line in list_lines(infos, running):
        click.echo(line)


@cli.command()
@click.option("--yes", "--confirm", "confirm", is_flag=True, help="delete; without it, only list what would go")
@click.option("--keep", multiple=True, metavar="STAGE/VERSION",
              help="also keep this artifact and its inputs (repeatable; a unique prefix will do)")
@click.option("--checkpoints-only", is_flag=True,
              help="only remove the intermediate checkpoints of complete trainings")
@pass_state
@handle_errors
def gc(state: State, confirm, keep, checkpoints_only):
    """Free disk: list (or, with --yes, delete) what the current config does not use.

    \b
    Kept: the versions the current config plans for each stage and their inputs
    (clusters included; on unlabelled photos, every stage but evaluate), and what
    --keep names (with its inputs). Removed: every other version (failed,
    partial, or complete but superseded) and the intermediate checkpoints of complete
    trainings (model.pt and the last checkpoint stay). A version being written is
    left alone: each deletion takes the version's lock first.
    """
    from artifacts.store import StoreError
    from pipeline.gc import apply_gc, human, plan_gc

    ctx = state.context()
    refs = []
    for text in keep:
        try:
            path = ctx.store.resolve(text)
        except StoreError as exc:
            raise click.BadParameter(str(exc), param_hint="'--keep'") from None
        refs.append(f"{path.parent.name}/{path.name}")
    gc_plan = plan_gc(ctx, tuple(refs), checkpoints_only=checkpoints_only)
    for ref, why in gc_plan.busy:
        click.echo(f"left alone  {ref}  ({why})")
    if not gc_plan.doomed:
        click.echo("nothing to free")
        return
    if not confirm:
        for d in gc_plan.doomed:
            what = f"{d.path}" + (f" [{', '.join(d.files)}]" if d.files else "")
            click.echo(f"would free  {human(d.size):>10}  {what}  ({d.why})")
        click.echo(f"would free {human(gc_plan.size)} in {len(gc_plan.doomed)} item(s); rerun with --yes to delete")
        return
    done, left = apply_gc(ctx.store, gc_plan)
    for d, size in done:
        what = f"{d.path}" + (f" [{', '.join(d.files)}]" if d.files else "")
        click.echo(f"freed  {human(size):>10}  {what}  ({d.why})")
    for d, why in left:
        click.echo(f"left alone  {d.path}  ({why})")
    click.echo(f"freed {human(sum(size for _, size in done))} in {len(done)} item(s)")


@cli.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--contact-sheet", "sheet", type=click.Path(dir_okay=False), default=None,
              help="for a mask artifact: write a PNG of images with mask overlays here")
@click.option("--n", "n_images", default=24, help="images on the contact sheet")
@pass_state
@handle_errors
def inspect(state: State, path, sheet, n_images):
    """Summarise an artifact directory or any HDF5 file: datasets, chunking, attrs, statistics."""
    from pipeline.inspection import inspect_path, mask_contact_sheet

    for line in inspect_path(Path(path)):
        click.echo(line)
    if sheet:
        ctx = state.context()
        out = mask_contact_sheet(Path(path), ctx.dataset, Path(sheet), n=n_images)
        click.echo(f"contact sheet: {out}")


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


@cli.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output folder")
@click.option("--report", default=None, metavar="evaluate/VERSION",
              help="evaluation artifact holding kmeans_model.json [default: the configured pipeline's]")
@click.option("--clusters", "clusters_ref", default=None, metavar="clusters/VERSION",
              help="clusters artifact holding kmeans_model.json, instead of an evaluation report (no labels needed)")
@click.option("--names", "names_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="with --clusters: a names file, one 'cluster id: name' per line (writes legend.png)")
@click.option("--model", "model_ref", default=None, metavar="train/VERSION",
              help="training artifact [default: the one the clustering's embeddings came from with --clusters, "
                   "else the configured pipeline's]")
@click.option("--seed", default=None, type=int, help="which K-means seed's clustering [default: the first]")
@pass_state
@handle_errors
def segment(state: State, images, out_dir, report, clusters_ref, names_file, model_ref, seed):
    """Segment new images (files or folders) with a trained model and a fitted K-means clustering.

    Writes <stem>.png (palette PNG of class indices) and <stem>_overlay.png per image.
    """
    from pipeline.graph import plan
    from stages.segment import segment_images
    from stages.train import load_model

    if report is not None and clusters_ref is not None:
        raise click.UsageError("give --report or --clusters, not both")
    if names_file is not None and report is not None:
        raise click.UsageError("--names renames clusters: use it with --clusters (an evaluation report's "
                               "clusters are named by matching them to the labels)")
    names = None
    if names_file is not None:
        from stages.clusters import NamesError, read_names

        try:
            names = read_names(names_file)
        except NamesError as exc:
            raise click.BadParameter(str(exc), param_hint="'--names'") from None
    ctx = state.context()
    if clusters_ref is not None:
        source = _open_ref(ctx.store, clusters_ref, "clusters", "--clusters")
        if model_ref is None:  # the model the clustered embeddings were extracted with
            extract_ref = ((source.manifest or {}).get("inputs") or {}).get("extract")
            model_ref = ((ctx.store.open(extract_ref).manifest or {}).get("inputs") or {}).get("train") \
                if extract_ref else None
            if model_ref is None:
                raise click.UsageError(f"{source.ref}: cannot tell which model made its embeddings; pass --model")
    else:
        if report is None or model_ref is None:
            planned = plan(ctx, ("evaluate",))
            report = report or planned["evaluate"].spec.ref
            model_ref = model_ref or planned["train"].spec.ref
        source = ctx.store.open(report)
    training = ctx.store.open(model_ref)
    kmeans_file = source.path / "kmeans_model.json"
    if not kmeans_file.is_file():
        raise click.ClickException(f"{source.ref} has no kmeans_model.json: run evaluate with the kmeans protocol")
    paths: list[Path] = []
    for item in map(Path, images):
        paths.extend(sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if item.is_dir()
                     else [item])
    model, meta = load_model(training.path)
    from pipeline.runner import stage_environment

    with stage_environment(ctx.image_environment()):  # data.max_pixels, as the stages read images
        summary = segment_images(model, kmeans_file, paths, Path(out_dir), seed=seed, progress=not state.quiet,
                                 names=names)
    click.echo(f"segmented {summary.get('n_images', len(paths))} image(s) into {out_dir}"
               + (f"; skipped {summary['n_skipped']}" if summary.get("n_skipped") else ""))
    if summary.get("note"):
        click.echo(f"note: {summary['note']}", err=True)
    if meta.get("epochs") == 0:
        click.echo(f"note: {training.ref} holds the initialisation alone (train.epochs 0): its saliency head is "
                   "untrained, so the salient regions of these images are not reliable; train the model, or add the "
                   "images to the dataset folder and rerun (the clusters artifact segments every image it holds)",
                   err=True)


@cli.command(name="config")
@click.option("--defaults", is_flag=True, help="print the built-in defaults instead of the resolved config")
@pass_state
@handle_errors
def config_(state: State, defaults):
    """Print the resolved configuration (after the file and every --set)."""
    import yaml

    from pipeline.config import Config

    cfg = Config() if defaults else state.cfg()
    click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())


@cli.group()
def data():
    """Dataset commands: make the demo dataset, describe and check a dataset."""


@data.command(name="make-demo")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--seed", default=0, help="random seed; the same seed writes identical files")
@click.option("--n-train", default=240, help="training images")
@click.option("--n-val", default=120, help="validation images")
@click.option("--size", default=128, help="image side in pixels")
@click.option("--multi-object", is_flag=True,
              help="two or three objects of different classes per image, apart, each labelled with its class")
@pass_state
@handle_errors
def make_demo_cmd(state: State, directory, seed, n_train, n_val, size, multi_object):
    """Write the embedded demo dataset (folder layout) to DIRECTORY."""
    from stages.data.demo import make_demo

    index = make_demo(Path(directory), n_train=n_train, n_val=n_val, size=size, seed=seed,
                      progress=not state.quiet, multi_object=multi_object)
    d = index.describe()
    click.echo(f"demo dataset: {d['num_images']} images, {len(d['classes'])} classes, "
               f"splits {d['splits']} in {directory}")


@data.command(name="info")
@pass_state
@handle_errors
def data_info(state: State):
    """Describe the configured dataset: layout, classes, splits, labels."""
    ctx = state.context()
    click.echo(json.dumps(ctx.dataset.describe(), indent=2, default=str))


@data.command(name="check")
@click.option("--split", default=None, help="only this split [default: all images]")
@pass_state
@handle_errors
def data_check(state: State, split):
    """Decode every image and label of the dataset and report the files that cannot be used."""
    from pipeline.runner import stage_environment
    from pipeline.status import check_dataset

    ctx = state.context()
    with stage_environment(ctx.image_environment()):  # data.max_pixels, as the stages read images
        bad = check_dataset(ctx.dataset, split, progress=not state.quiet)
    for path, reason in bad:
        click.echo(f"{path}: {reason}")
    click.echo(f"{len(bad)} unusable file(s)")
    if bad:
        sys.exit(1)


_register_stage_commands()


def main() -> None:  # console script entry point
    cli(prog_name="maskcontrast")


if __name__ == "__main__":
    main()
