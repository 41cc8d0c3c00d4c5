"""Several proposals per image on davis16-objects, where every image holds one object (issue 14's
no-change check): ``masks.proposals=single`` against ``components`` on the same U2-Net-p masks.

Each row is a ``maskcontrast run`` of ``configs/davis16_mobilenet.yaml`` through
``bench_davis_pipeline``'s runner, all in one store (the single-proposal masks are computed once):

- ``init``: the ImageNet MobileNetV2 alone (``bench_davis_pipeline``'s ``init`` row:
  ``train.epochs=0``, prototypes from the backbone's grid);
- ``trained``: 10 epochs of MaskContrast (``train.epochs=10``), head prototypes, once per training
  seed (``--seeds``).

Every row runs with ``evaluate.linear.epochs=10`` (``lr_drop_epoch`` 25 never reached: a constant
rate), so a pair costs about 25 min here. Prints per row K-means (mean ± std over the 5 evaluation
seeds) and its colour baseline, retrieval, the linear probe, and the val regions the K-means
protocol labelled (one per image with ``single``; the components of the masks otherwise).

    python benchmarks/bench_proposals_davis.py --rows init,trained --seeds 0 --store store-proposals-davis

Complete versions are skipped as in any run, so a second call only reads the reports.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench_davis_pipeline import IMAGENET, REPO, ROWS, SHARED, _fmt, _run  # noqa: E402 (benchmarks/ is on the path)

MODES = ("single", "components")
#: the davis rows' weights, named explicitly (the preset's relative paths point at the same files)
WEIGHTS = [f"masks.model_path={SHARED / 'weights' / 'u2netp.onnx'}", f"train.init={IMAGENET}"]
#: every row: a 10-epoch linear probe (the preset's 60 cost 10 min a row here)
COMMON = ["evaluate.linear.epochs=10"]
BASES = {"init": ROWS["init"], "trained": ["train.epochs=10"]}


def row(store: Path, base: str, mode: str, seed: int, extra: list[str]) -> dict:
    """One run; its figures."""
    start = time.perf_counter()
    report = _run(store, [*WEIGHTS, *COMMON, *extra, *BASES[base], f"train.seed={seed}", f"masks.proposals={mode}"])
    wall = time.perf_counter() - start
    m = json.loads((report / "metrics.json").read_text())
    km, lin, ret = (m.get(k, {}) for k in ("kmeans", "linear", "retrieval"))
    return {"row": base, "seed": seed, "mode": mode, "evaluate": f"evaluate/{report.name}", "minutes": wall / 60,
            "kmeans": km.get("miou"), "kmeans_std": km.get("miou_std"), "kmeans_text": _fmt(km),
            "colour": _fmt(km.get("colour_baseline", {})), "retrieval": _fmt(ret),
            "linear": f"{lin['miou']:.1f} / {lin.get('miou_best_on_val', lin['miou']):.1f}" if lin else "-",
            "regions": km.get("n_regions", km.get("n_images")), "images": km.get("n_images")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="init,trained", help="comma-separated: init, trained")
    ap.add_argument("--seeds", default="0", help="training seeds of the trained rows, comma-separated")
    ap.add_argument("--store", type=Path, default=REPO / "store-proposals-davis")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra overrides for every row")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()
    rows = []
    for base in a.rows.split(","):
        seeds = [0] if base == "init" else [int(s) for s in a.seeds.split(",")]  # init has nothing to seed
        for seed in seeds:
            for mode in MODES:
                r = row(a.store, base, mode, seed, a.sets)
                rows.append(r)
                print(f"{base} seed {seed} {mode}: {r['evaluate']}: K-means {r['kmeans_text']}, retrieval "
                      f"{r['retrieval']}, linear {r['linear']}, {r['regions']} regions / {r['images']} images, "
                      f"{r['minutes']:.1f} min", flush=True)
    lines = ["| row | train.seed | proposals | K-means | colour baseline | retrieval | linear (last / best) "
             "| val regions | evaluate |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['seed'] if r['row'] != 'init' else '-'} | {r['mode']} | {r['kmeans_text']} "
              f"| {r['colour']} | {r['retrieval']} | {r['linear']} | {r['regions']} / {r['images']} images "
              f"| {r['evaluate']} |" for r in rows]
    print("\n".join(lines))
    for base in dict.fromkeys(r["row"] for r in rows):
        for seed in sorted({r["seed"] for r in rows if r["row"] == base}):
            pair = {r["mode"]: r for r in rows if r["row"] == base and r["seed"] == seed}
            if len(pair) == 2:
                d = pair["components"]["kmeans"] - pair["single"]["kmeans"]
                print(f"{base} seed {seed}: K-means components - single = {d:+.1f} (eval-seed std "
                      f"{pair['single']['kmeans_std']:.1f} / {pair['components']['kmeans_std']:.1f})")
    if a.json:
        a.json.write_text(json.dumps({"sets": a.sets, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
