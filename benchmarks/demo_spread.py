"""The demo's figures as a spread over training seeds: what a newcomer's `make demo` should give.

One demo training's K-means figure moves by several mIoU points between machines of the same kind
(training floats differ across CPUs), and between training seeds on one machine. This runs the demo
pipeline (the config `make demo` uses) once per training seed (`train.seed`) in one store, so the
masks are computed once and shared, and prints per training seed the K-means mIoU (mean ± std over
the evaluation seeds), its colour baseline, the linear probe and retrieval, then the spread over
training seeds and the margin of K-means over the colour baseline.

    python benchmarks/demo_spread.py --store store-spread --seeds 0,1,2
    python benchmarks/demo_spread.py --config pipeline.yaml --set train.epochs=2 --seeds 0,1
    python benchmarks/demo_spread.py --imagenet --seeds 0,1,2,3,4   # from ImageNet weights (IMAGENET_SETS)

Complete versions are skipped as in any run, so a second call only reads the reports. The demo
data is written to ``--data`` (``python -m pipeline data make-demo DIR``) when it is not there.
Each demo training takes 5-6 min on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", ROOT.parent / "shared"))
IMAGENET = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
# the network from ImageNet weights with the davis16 preset's backbone settings (MobileNetV2,
# torchvision init, early layers frozen, lr 0.01, temperature 0.5, key momentum 0.999)
IMAGENET_SETS = ["train.backbone=mobilenet_v2", f"train.init={IMAGENET}", "train.init_kind=torchvision",
                 "train.freeze_early=true", "train.lr=0.01", "train.temperature=0.5", "train.key_momentum=0.999"]


def default_config() -> Path:
    """The demo's config: configs/demo.yaml where the demo settings live, else pipeline.yaml."""
    demo = ROOT / "configs" / "demo.yaml"
    return demo if demo.is_file() else ROOT / "pipeline.yaml"


def cli(args: list[str], log: Path | None = None) -> str:
    """Run ``python -m pipeline ARGS`` from the repository root; its stdout (stderr to ``log``)."""
    err = open(log, "a") if log else subprocess.DEVNULL
    try:
        done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=err, text=True)
    finally:
        if log:
            err.close()
    if done.returncode:
        where = f"; see {log}" if log else ""
        raise SystemExit(f"python -m pipeline {' '.join(args)} exited {done.returncode}{where}\n{done.stdout}")
    return done.stdout


def run_seed(config: Path, store: Path, data: Path, seed: int, extra: list[str], log: Path) -> tuple[Path, float]:
    """The demo pipeline with ``train.seed=seed``: (its evaluation artifact, seconds taken)."""
    sets = [f"data.root={data}", f"train.seed={seed}", *extra]
    args = ["--config", str(config), "--store", str(store), "-q"]
    for s in sets:
        args += ["--set", s]
    start = time.time()
    out = cli([*args, "run"], log)
    found = re.search(r"^done: evaluate artifact at (.+)$", out, re.M)
    if not found:
        raise SystemExit(f"no evaluation artifact in the output of run:\n{out}")
    path = Path(found.group(1).strip())
    return (path if path.is_absolute() else ROOT / path), time.time() - start


def figures(evaluation: Path) -> dict:
    """The figures this benchmark reports, from an evaluation artifact's metrics.json."""
    m = json.loads((evaluation / "metrics.json").read_text())
    km = m["kmeans"]
    per_seed = [r["miou"] for r in km.get("per_seed", [])]
    colour = km.get("colour_baseline", {})
    return {
        "version": evaluation.name,
        "kmeans": km["miou"], "kmeans_std": km["miou_std"],
        "kmeans_min": min(per_seed) if per_seed else km["miou"],
        "kmeans_max": max(per_seed) if per_seed else km["miou"],
        "eval_seeds": len(per_seed) or 1,
        "colour": colour.get("miou", float("nan")), "colour_std": colour.get("miou_std", float("nan")),
        "linear": m.get("linear", {}).get("miou", float("nan")),
        "retrieval": m.get("retrieval", {}).get("miou", float("nan")),
    }


def table(rows: dict[int, dict]) -> str:
    """Per-training-seed rows, then the spread over training seeds and the margin over colour."""
    lines = ["| train.seed | evaluate version | K-means (mean ± std over eval seeds) | K-means eval-seed range "
             "| colour baseline | K-means − colour | linear | retrieval |",
             "|---|---|---|---|---|---|---|---|"]
    for seed, r in rows.items():
        lines.append(f"| {seed} | {r['version']} | {r['kmeans']:.1f} ± {r['kmeans_std']:.1f} "
                     f"| {r['kmeans_min']:.1f}–{r['kmeans_max']:.1f} | {r['colour']:.1f} ± {r['colour_std']:.1f} "
                     f"| {r['kmeans'] - r['colour']:+.1f} | {r['linear']:.1f} | {r['retrieval']:.1f} |")
    lines += ["", f"spread over {len(rows)} training seeds (of each seed's mean over evaluation seeds):",
              "| figure | mean | std | min | max |", "|---|---|---|---|---|"]
    for key, name in (("kmeans", "K-means"), ("colour", "colour baseline"), ("linear", "linear"),
                      ("retrieval", "retrieval")):
        v = np.array([r[key] for r in rows.values()], dtype=float)
        std = v.std(ddof=1) if v.size > 1 else 0.0
        lines.append(f"| {name} | {v.mean():.1f} | {std:.1f} | {v.min():.1f} | {v.max():.1f} |")
    margins = {s: r["kmeans"] - r["colour"] for s, r in rows.items()}
    low = min(margins, key=margins.get)
    worst = {s: r["kmeans_min"] - r["colour"] for s, r in rows.items()}
    lines += ["", f"margin of K-means over the colour baseline: min {margins[low]:+.1f} (train.seed {low}), "
                  f"max {max(margins.values()):+.1f}; worst single evaluation seed vs the colour mean: "
                  f"{min(worst.values()):+.1f}",
              "margin holds on every training seed" if min(margins.values()) > 0
              else "margin does NOT hold on training seed(s) " + ", ".join(str(s) for s, v in margins.items() if v <= 0)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=None,
                    help="pipeline config [default: configs/demo.yaml if it exists, else pipeline.yaml]")
    ap.add_argument("--store", type=Path, default=ROOT / "store", help="artifact store (shared by all seeds)")
    ap.add_argument("--data", type=Path, default=ROOT / "demo-data", help="demo dataset (written when missing)")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override passed to every run (repeatable)")
    ap.add_argument("--imagenet", action="store_true",
                    help="train from the ImageNet MobileNetV2 (IMAGENET_SETS, before --set) instead of random weights")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-seed figures here")
    a = ap.parse_args()
    if a.imagenet:
        if not IMAGENET.is_file():
            raise SystemExit(f"--imagenet: {IMAGENET} not found (set MASKCONTRAST_SHARED to the folder holding weights/)")
        a.sets = [*IMAGENET_SETS, *a.sets]
    config = (a.config or default_config()).resolve()
    store, data = a.store.resolve(), a.data.resolve()
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if len(seeds) < 1:
        raise SystemExit("--seeds: give at least one training seed")
    if not (data / "README.txt").is_file():
        print(f"writing the demo dataset to {data}", flush=True)
        cli(["data", "make-demo", str(data)])
    store.mkdir(parents=True, exist_ok=True)
    log = store / "demo_spread.log"
    print(f"config {config}, store {store}, data {data}, training seeds {seeds}"
          + (f", --set {' '.join(a.sets)}" if a.sets else "") + f"; stage logs in {log}", flush=True)

    rows = {}
    for seed in seeds:
        evaluation, seconds = run_seed(config, store, data, seed, a.sets, log)
        rows[seed] = figures(evaluation)
        r = rows[seed]
        print(f"train.seed {seed}: {seconds:.0f} s, {evaluation.relative_to(store) if evaluation.is_relative_to(store) else evaluation}: "
              f"K-means {r['kmeans']:.1f} ± {r['kmeans_std']:.1f}, colour {r['colour']:.1f}, "
              f"linear {r['linear']:.1f}, retrieval {r['retrieval']:.1f}", flush=True)
    print()
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps({"config": str(config), "sets": a.sets, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
