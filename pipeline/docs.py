"""Keep the README's configuration table in sync with the config dataclasses.

``python -m pipeline.docs`` rewrites the block between the ``config-keys`` markers; a test fails
when the README and the code disagree.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline.config import Config
from pipeline.configtypes import field_docs
from stages.bookkeeping import is_bookkeeping

BOOKKEEPING_MARK = "(bookkeeping: not in versions)"


def _mark(section: str, name: str) -> str:
    return BOOKKEEPING_MARK if is_bookkeeping(section, name) else ""

START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def config_table() -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_name, default, doc in field_docs(Config, mark=_mark):
        shown = "null" if default is None else str(default).replace("'", "")
        rows.append(f"| `{key}` | {type_name.replace('|', '/')} | `{shown}` | {doc} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README has no {START} ... {END} block")
    return pattern.sub(lambda _: f"{START}\n{config_table()}\n{END}", readme)


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    text = path.read_text(encoding="utf-8")
    new = render(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"updated the configuration table in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
