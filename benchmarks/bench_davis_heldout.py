"""Which space to cluster, chosen without the val split: davis16's train sequences split in two.

Issue 18 asks for the clustered space (embedding head or backbone) to be chosen on the train split.
Scoring K-means on the very images a network was trained on favours the head (it was fitted to
them), so this holds sequences out: the train split's sequences are sorted by class, then name, and
dealt alternately into ``fit`` and ``held`` (every class with two or more sequences lands on both
sides), in a folder of links under ``--work``. Then, with the davis16 preset and these splits
(``data.train_split=fit``, ``data.val_split=held``, K-means with as many clusters as ``held`` has
classes):

- ``init``: the ImageNet weights alone (backbone prototypes),
- ``head`` / ``backbone``: the network trained on ``fit``, clustered in its embedding head / backbone.

    python benchmarks/bench_davis_heldout.py [--work DIR] [--set train.epochs=40 ...]

Labels of the val split are never read; the train split's labels score ``held`` and pick the
classes dealt.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_davis_neighbours import image_class  # noqa: E402
from bench_davis_pipeline import SHARED, _fmt, _run  # noqa: E402

DATA = SHARED / "data" / "davis16-objects"
ROWS = {
    "init": ["train.epochs=0", "extract.embedding=backbone"],
    "head": ["extract.embedding=head"],
    "backbone": ["extract.embedding=backbone"],
}


def deal(data: Path, out: Path) -> int:
    """Write the ``fit`` / ``held`` folder dataset under ``out``; returns the classes in ``held``."""
    ids = (data / "splits" / "train.txt").read_text().split()
    first: dict[str, str] = {}
    for i in ids:
        first.setdefault(i.rsplit("_", 1)[0], i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for seq, i in sorted(first.items()):
        by_class[image_class(data / "labels", i)].append(seq)
    names = (data / "classes.txt").read_text().split("\n")
    dealt = [s for c in sorted(by_class, key=lambda c: names[c]) for s in by_class[c]]
    held_seqs = set(dealt[1::2])
    for sub in ("images", "labels", "splits"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text((data / "classes.txt").read_text())
    for i in ids:
        for sub, ext in (("images", ".jpg"), ("labels", ".png")):
            link = out / sub / f"{i}{ext}"
            if not link.is_symlink():
                os.symlink(data / sub / f"{i}{ext}", link)
    for name, keep in (("fit", lambda s: s not in held_seqs), ("held", lambda s: s in held_seqs)):
        (out / "splits" / f"{name}.txt").write_text(
            "\n".join(i for i in ids if keep(i.rsplit("_", 1)[0])) + "\n")
    return len({c for c, seqs in by_class.items() if held_seqs & set(seqs)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--work", type=Path, default=Path("store-davis-heldout"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra overrides for every row")
    args = ap.parse_args()
    folder = args.work / "davis-heldout"
    k = deal(args.data, folder)
    common = [f"data.root={folder.resolve()}", "data.train_split=fit", "data.val_split=held",
              "evaluate.protocols=[kmeans]", f"evaluate.kmeans.n_clusters={k}"]
    lines = [f"| row (K-means on `held`, {k} clusters) | K-means | colour baseline |", "|---|---|---|"]
    for row, sets in ROWS.items():
        report = _run(args.work / "store", common + args.sets + sets)
        km = json.loads((report / "metrics.json").read_text())["kmeans"]
        lines.append(f"| {row} | {_fmt(km)} | {_fmt(km.get('colour_baseline', {}))} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
