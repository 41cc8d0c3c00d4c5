"""``status`` and ``ls`` views, computed from manifests only (no file is re-hashed or decoded)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

from artifacts.inspect import human_bytes
from artifacts.store import COMPLETE, ArtifactInfo
from pipeline.context import Context, Planned


def _progress_text(info: ArtifactInfo) -> str:
    p = info.progress or {}
    if not p:
        return ""
    return f"{p.get('done', '?')}/{p.get('total', '?')} {p.get('unit', '')}".strip()


def stage_state(ctx: Context, p: Planned) -> tuple[str, str]:
    """(state, detail) of a planned stage: complete, running, partial, failed, missing or stale."""
    info = ctx.store.info(p.name, p.version)
    if info.state == COMPLETE:
        describe = p.definition.describe(info.manifest or {})
        return COMPLETE, describe
    if info.state in ("running", "partial", "failed"):
        detail = _progress_text(info)
        if info.state == "failed" and info.manifest and info.manifest.get("error"):
            detail = (detail + "; " if detail else "") + str(info.manifest["error"])[:100]
        return info.state, detail
    others = [o for o in ctx.store.list(p.name) if o.state == COMPLETE]
    if not others:
        return "missing", ""
    same_params = [o for o in others if (o.manifest or {}).get("params") == dict(p.spec.params)]
    if same_params:
        return "stale", f"upstream changed since {same_params[-1].version}"
    return "missing", f"config changed; {len(others)} other version(s) in the store"


def code_note(manifest, running: str | None) -> str:
    """``"made by other code (git:...)"`` when the artifact's recorded code version is not the running
    one. Its version still matches (the algorithm versions agree), so it is reused; the note says
    that results come from another revision, e.g. to rerun with --force after a fix not yet bumped."""
    made = (manifest or {}).get("code_version")
    if not made or not running or made == running:
        return ""
    return f"made by other code ({made}; running {running})"


def pipeline_status(ctx: Context, planned: dict[str, Planned],
                    problems: dict[str, str] | None = None) -> Iterator[str]:
    yield f"store {ctx.store.root}   dataset {ctx.cfg.data.root} ({ctx.dataset.layout})"
    yield f"{'stage':9s} {'version':12s}  {'state':9s} {'size':>10s}  detail"
    for name, p in planned.items():
        state, detail = stage_state(ctx, p)
        info = ctx.store.info(name, p.version)
        size = human_bytes(info.size_bytes) if info.state != "missing" else "-"
        note = code_note(info.manifest, ctx.code_version)
        if note:
            detail = f"{detail}; {note}" if detail else note
        yield f"{name:9s} {p.version:12s}  {state:9s} {size:>10s}  {detail}"
    for name, why in (problems or {}).items():
        yield f"{name:9s} {'-':12s}  {'unplanned':9s} {'-':>10s}  {why}"


def list_lines(infos: Iterable[ArtifactInfo], code_version: str | None = None) -> Iterator[str]:
    yield f"{'artifact':22s} {'state':9s} {'size':>10s}  {'created':25s} inputs"
    for info in infos:
        m = info.manifest or {}
        inputs = ", ".join((m.get("inputs") or {}).values())
        note = code_note(m, code_version)
        yield (f"{info.ref:22s} {info.state:9s} {human_bytes(info.size_bytes):>10s}  "
               f"{str(m.get('created') or '-'):25s} {inputs}{'  [' + note + ']' if note else ''}")


def check_dataset(index, split: str | None, *, progress: bool = True) -> list[tuple[Path, str]]:
    """Decode every image (and label) of ``split``; return (path, reason) for each unusable file."""
    from tqdm import tqdm

    from stages.data import BadInputError, load_image, load_label

    bad: list[tuple[Path, str]] = []
    for sample in tqdm(index.samples(split), desc="checking", unit="img", disable=not progress):
        try:
            img = load_image(sample.image)
        except BadInputError as exc:
            bad.append((exc.path, exc.reason))
            continue
        if sample.label is not None:
            try:
                load_label(sample.label, img.shape[:2])
            except BadInputError as exc:
                bad.append((exc.path, exc.reason))
    return bad
