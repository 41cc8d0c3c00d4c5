"""The mask artifact's contact sheet: one colour per proposal on version-2 shards, today's overlay
on version-1 shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artifacts.masks import MaskRecord, Proposal, shard_name, write_mask_shard
from stages.masks.report import contact_sheet
from stages.viz import LEFT_OUT_COLOUR, PROPOSAL_COLOURS, overlay_proposals

SIDE = 40  # fit() scales a 40-px image by 4 into a 160-px tile at (4, 4)


class NoImages:
    """A dataset without the images: the sheet draws on black, so a tint is alpha x colour."""

    def sample(self, id):
        raise KeyError(id)


def _box(y0, y1, x0, x1):
    m = np.zeros((SIDE, SIDE), bool)
    m[y0:y1, x0:x1] = True
    return m


A, B, SPECK = _box(4, 16, 4, 16), _box(24, 36, 20, 36), _box(30, 33, 2, 5)


def _sheet_pixel(sheet: np.ndarray, y: int, x: int) -> np.ndarray:
    return sheet[4 + 4 * y + 2, 4 + 4 * x + 2].astype(int)


def _tint(colour, alpha=0.45) -> np.ndarray:
    return (alpha * np.asarray(colour, np.float32)).astype(int)


@pytest.mark.parametrize("version", [1, 2])
def test_each_proposal_has_its_own_colour_on_version_2_shards(tmp_path: Path, version: int):
    mask = A | B | SPECK
    props = [Proposal(A, 0.9), Proposal(B, 0.5)] if version == 2 else None
    write_mask_shard(tmp_path / "m" / shard_name(0), [MaskRecord("img", mask, proposals=props)])
    sheet = np.asarray(Image.open(contact_sheet(tmp_path / "m", NoImages(), tmp_path / "sheet.png", n=1)))
    a, b, speck = _sheet_pixel(sheet, 10, 10), _sheet_pixel(sheet, 30, 28), _sheet_pixel(sheet, 31, 3)
    if version == 2:
        np.testing.assert_allclose(a, _tint(PROPOSAL_COLOURS[0]), atol=1)
        np.testing.assert_allclose(b, _tint(PROPOSAL_COLOURS[1]), atol=1)
        np.testing.assert_allclose(speck, _tint(LEFT_OUT_COLOUR), atol=1)  # salient, in no proposal
    else:  # one colour for the whole mask, as before proposals
        for px in (a, b, speck):
            np.testing.assert_allclose(px, _tint(PROPOSAL_COLOURS[0]), atol=1)
    np.testing.assert_array_equal(_sheet_pixel(sheet, 20, 2), [0, 0, 0])  # background untouched


def test_overlay_proposals_cycles_colours_and_keeps_the_input():
    img = np.zeros((SIDE, SIDE, 3), np.uint8)
    masks = [_box(0, 2, 5 * k, 5 * k + 2) for k in range(len(PROPOSAL_COLOURS) + 1)]
    out = overlay_proposals(img, masks)
    assert not img.any()
    np.testing.assert_array_equal(out[1, 1], out[1, 5 * len(PROPOSAL_COLOURS) + 1])  # the seventh repeats the first
    assert len({tuple(out[1, 5 * k + 1]) for k in range(len(PROPOSAL_COLOURS))}) == len(PROPOSAL_COLOURS)
