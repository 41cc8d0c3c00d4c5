"""Pictures of a mask artifact: a contact sheet of images with their masks, or with each of
their proposals in its own colour (schema version 2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from artifacts.masks import MaskStore
from stages.data import BadInputError, load_image
from stages.viz import contact_sheet as grid
from stages.viz import overlay_mask, overlay_proposals, save_png


def contact_sheet(mask_dir: Path, dataset, out: Path, n: int = 24, seed: int = 0, columns: int = 4) -> Path:
    """Image + mask overlay for ``n`` images drawn evenly (kept and dropped both shown, captioned).

    When the shards store proposals (schema version 2), each kept image's proposals are drawn in
    their own colours, best first (:data:`stages.viz.PROPOSAL_COLOURS`), salient pixels in no
    proposal in grey, and the caption gives the number of proposals (``x3``).
    """
    store = MaskStore(mask_dir)
    ids = store.ids()
    if not ids:
        raise ValueError(f"{mask_dir}: no mask shards to show")
    with_proposals = store.has_proposals
    pick = np.linspace(0, len(ids) - 1, num=min(n, len(ids))).round().astype(int)
    tiles, captions = [], []
    for i in pick:
        rec = store.get(ids[i], proposals=with_proposals)
        try:
            img = load_image(dataset.sample(rec.id).image)
        except (BadInputError, KeyError, ValueError):
            img = np.zeros((*rec.shape, 3), np.uint8)
        caption = f"{rec.id} fg={rec.fg_fraction:.2f}"
        if rec.kept and rec.proposals is not None:
            masks = [p.mask for p in rec.proposals]
            left_out = rec.mask & ~np.logical_or.reduce(masks) if masks else rec.mask
            tiles.append(overlay_proposals(img, masks, left_out))
            caption += f" x{len(masks)}"
        else:
            color = (255, 40, 40) if rec.kept else (120, 120, 255)
            tiles.append(overlay_mask(img, rec.mask, color=color))
        captions.append(caption + ("" if rec.kept else f" DROP {rec.reason}"))
    rows = [tiles[i: i + columns] for i in range(0, len(tiles), columns)]
    caps = [" | ".join(captions[i: i + columns]) for i in range(0, len(captions), columns)]
    return save_png(out, grid(rows, caps, tile=160))
