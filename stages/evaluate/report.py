"""Report files shared by every protocol: ``metrics.json`` and a readable ``report.md``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from artifacts.atomic import atomic_write_json, atomic_write_text


def write_metrics(out_dir: Path, metrics: Mapping[str, Mapping[str, Any]]) -> Path:
    path = Path(out_dir) / "metrics.json"
    atomic_write_json(path, dict(metrics))
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def write_report(out_dir: Path, title: str, metrics: Mapping[str, Mapping[str, Any]],
                 context: Mapping[str, Any], images: Mapping[str, str]) -> Path:
    """A markdown report: inputs, a table of headline figures per protocol, and the pictures."""
    lines = [f"# {title}", ""]
    for key, value in context.items():
        lines.append(f"- **{key}**: {value}")
    lines.append("")
    for protocol, m in metrics.items():
        lines += [f"## {protocol}", "", "| metric | value |", "|---|---|"]
        for key, value in m.items():
            if isinstance(value, (int, float, str)) and not isinstance(value, bool):
                lines.append(f"| {key} | {_fmt(value)} |")
            elif isinstance(value, Mapping) and "miou" in value:  # a baseline scored by the same protocol
                lines.append(f"| {key} miou | {_fmt(value['miou'])} ± {_fmt(value.get('miou_std', 0.0))} |")
        lines.append("")
    for caption, name in images.items():
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    path = Path(out_dir) / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
