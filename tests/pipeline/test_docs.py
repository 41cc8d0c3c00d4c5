from pathlib import Path

from pipeline.docs import render

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_config_table_matches_code():
    text = README.read_text(encoding="utf-8")
    assert render(text) == text, "README config table is stale: run `python -m pipeline.docs`"
