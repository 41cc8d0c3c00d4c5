"""The test suite's own hygiene: an assertion mixing ``and`` and ``or`` without brackets passes on
whichever side Python's precedence picks (``a and b or c`` is ``(a and b) or c``), which once made a
CLI test pass whenever one word appeared. Write the brackets."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def unbracketed_and_or(source: str) -> list[int]:
    """Line numbers of assert statements holding an ``and`` inside an ``or`` (or the reverse)
    without brackets around the inner one."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        for op in ast.walk(node.test):
            if not isinstance(op, ast.BoolOp):
                continue
            for inner in op.values:
                if isinstance(inner, ast.BoolOp) and type(inner.op) is not type(op.op):
                    before = source[:starts[inner.lineno - 1] + inner.col_offset].rstrip()
                    after = source[starts[inner.end_lineno - 1] + inner.end_col_offset:].lstrip()
                    if not (before.endswith("(") and after.startswith(")")):
                        hits.append(node.lineno)
    return hits


def test_the_checker_finds_the_shape():
    assert unbracketed_and_or("assert a and b or c\n") == [1]
    assert unbracketed_and_or("assert (a and b or c)\nassert x or y and z\n") == [1, 2]
    assert unbracketed_and_or("assert (a and b) or c\nassert a and (b or c)\n") == []


def test_no_test_asserts_an_unbracketed_and_or():
    found = {str(p.relative_to(TESTS)): lines for p in sorted(TESTS.rglob("*.py"))
             if (lines := unbracketed_and_or(p.read_text(encoding="utf-8")))}
    assert found == {}
