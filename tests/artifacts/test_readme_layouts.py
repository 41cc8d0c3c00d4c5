"""The README's HDF5 layout tables (mask shards, embedding shards) against shards written by the
code: every dataset listed exists with the stated type and compression, and every dataset the code
writes is listed. A table that drifts from the format fails here instead of misleading a reader."""
from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from artifacts.embeddings import EmbeddingRecord, ProposalEmbedding, write_embedding_shard
from artifacts.masks import MaskRecord, Proposal, write_mask_shard

README = Path(__file__).resolve().parents[2] / "README.md"
DTYPE_WORDS = {"str": "object", "int32": "int32", "int64": "int64", "uint8": "uint8", "float32": "float32",
               "float16": "float16", "bool": "bool"}


def readme_table(heading: str) -> dict[str, tuple[str, str]]:
    """dataset -> (type cell, compression cell) of the first ``| dataset |`` table under ``heading``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| dataset |"))
    assert lines[first].split("|")[3].strip() == "compression", "the table needs a compression column"
    rows = {}
    for line in lines[first + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = (cells[1], cells[2])
    return rows


def compression_of(ds: h5py.Dataset) -> str:
    if ds.compression is None:
        return "none"
    text = ds.compression + (f"({ds.compression_opts})" if ds.compression_opts is not None else "")
    return text + (" + shuffle" if ds.shuffle else "")


def check(path: Path, table: dict[str, tuple[str, str]]) -> None:
    with h5py.File(path, "r") as f:
        written = {name: f[name] for name in f}
        assert set(table) == set(written), (f"README lists {sorted(set(table) - set(written))} that the code does not "
                                            f"write, and omits {sorted(set(written) - set(table))}")
        for name, (type_cell, compression_cell) in table.items():
            ds = written[name]
            assert compression_cell == compression_of(ds), (name, compression_cell, compression_of(ds))
            word = type_cell.split()[0].rstrip(",")
            assert DTYPE_WORDS.get(word) == ds.dtype.name or (word == "str" and ds.dtype.kind == "O"), (
                name, type_cell, ds.dtype)


@pytest.fixture
def mask():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:7] = True
    return m


def test_mask_shard_table_matches_written_shards(tmp_path, mask):
    """Version 1 writes the rows not marked "version 2"; version 2 writes every row."""
    soft = np.zeros(mask.shape, np.uint8)
    table = readme_table("### Mask artifact")
    v1 = {name: cells for name, cells in table.items() if not name.startswith("proposal_")}
    path = tmp_path / "shard-00000.h5"
    write_mask_shard(path, [MaskRecord("a", mask, soft=soft), MaskRecord("b", mask, soft=soft, kept=False,
                                                                          reason="fg<0.01")])
    check(path, v1)
    props = [Proposal(mask, 1.0)]
    write_mask_shard(path, [MaskRecord("a", mask, soft=soft, proposals=props),
                            MaskRecord("b", mask, soft=soft, kept=False, reason="fg<0.01", proposals=[])])
    check(path, table)
    assert len(v1) < len(table)


def test_embedding_shard_table_matches_a_written_shard(tmp_path, mask):
    """Version 1 writes the rows not marked "version 2"; version 2 writes every row."""
    path = tmp_path / "emb-00000.h5"
    proto = np.eye(32, dtype=np.float32)[0]
    table = readme_table("### Embedding artifact")
    v1 = {name: cells for name, cells in table.items() if not name.startswith("proposal_")}
    write_embedding_shard(path, [EmbeddingRecord("a", mask, proto, True, features=np.zeros((256, 4, 4), np.float16))])
    check(path, v1)
    props = [ProposalEmbedding(mask, proto, True)]
    write_embedding_shard(path, [EmbeddingRecord("a", mask, proto, True, features=np.zeros((256, 4, 4), np.float16),
                                                 proposals=props)])
    check(path, table)
    assert len(v1) < len(table)
