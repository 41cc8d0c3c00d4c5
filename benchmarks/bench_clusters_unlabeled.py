"""Does the label-free path lose anything? The clusters artifact on a dataset whose labels are
hidden, scored against the labels afterwards, beside the labelled K-means protocol on the same
embeddings and seeds; and the automatic k.

1. A folder holding only a link to the dataset's ``images/`` (no labels, classes or splits) is
   run through ``maskcontrast ... run --to clusters`` (the real CLI, one clusters artifact per
   seed, pictures included), with ``clusters.k`` = the number of object classes.
2. Each artifact's ``assignments.csv`` is matched to the hidden labels with the evaluate stage's
   scoring: per-image (outside / inside the extract artifact's salient mask, class) pixel counts
   at the label's resolution, Hungarian matching, mIoU.
3. The labelled K-means protocol (``stages.evaluate.protocols.run_kmeans``) runs on the same
   extract artifact, ids and seeds. Both figures are printed per seed.
4. ``--auto`` also makes the ``clusters.k=auto`` artifact and scores it at the k it chose
   (Hungarian, and many-to-one "majority" matching, which does not penalise extra clusters).

Usage (davis16-objects; about 10 min on 2 cores with U2-Net-p masks and the ImageNet MobileNetV2
backbone, the initialisation alone):

    python benchmarks/bench_clusters_unlabeled.py --data ../shared/data/davis16-objects \\
        --work /tmp/davis-unlabeled --auto -- --config configs/davis16_mobilenet.yaml \\
        --set masks.model_path=../shared/weights/u2netp.onnx \\
        --set train.init=../shared/weights/mobilenet_v2-b0353104.pth \\
        --set train.epochs=0 --set extract.embedding=backbone --set extract.features=false

Arguments after ``--`` go to every ``maskcontrast`` call (before the command). ``--labelled-only``
runs the same on the labelled dataset itself (its ``--split``, labels present but unused by the
clusters stage): e.g. the demo, whose val split is what its K-means protocol scores.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.data import DatasetIndex  # noqa: E402
from stages.evaluate.metrics import (  # noqa: E402
    hungarian_match,
    majority_match,
    remap_confusion,
    segmentation_scores,
)
from stages.evaluate.protocols import class_counts, run_kmeans  # noqa: E402


def _cli(args: list[str]) -> str:
    cmd = [sys.executable, "-m", "pipeline", *args]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    print(f"  [{time.perf_counter() - t0:6.1f} s] maskcontrast {' '.join(args[-6:])}", flush=True)
    return out.stdout


def _done_path(stdout: str, stage: str) -> Path:
    """The artifact directory of ``stage`` from the command's result lines (stage, version, action, path)."""
    for line in stdout.splitlines():
        parts = line.split()
        if parts[:1] == [stage] and len(parts) >= 4 and len(parts[1]) == 12:
            return Path(parts[-1])
    sys.exit(f"no {stage} artifact in the output:\n{stdout}")


def _assignments(clusters_dir: Path) -> dict[str, int]:
    with open(clusters_dir / "assignments.csv", newline="") as fh:
        return {r["id"]: int(r["cluster"]) for r in csv.DictReader(fh) if int(r["cluster"]) >= 0}


def score(counts, ids: list[str], assignment: dict[str, int], k: int, matching: str = "hungarian") -> float:
    """mIoU (%) of "cluster + 1 on the salient pixels, 0 elsewhere" under the matching, as the
    K-means protocol scores a seed."""
    conf = counts.confusion(np.array([assignment[i] for i in ids]), k)  # (k + 1, n_cls)
    mapping = hungarian_match(conf) if matching == "hungarian" else majority_match(conf)
    return 100.0 * segmentation_scores(remap_confusion(conf, mapping, counts.n_cls)).miou


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="the labelled dataset (folder layout)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the label-free copy and the store")
    ap.add_argument("--store", type=Path, default=None, help="artifact store [default: WORK/store]")
    ap.add_argument("--seeds", default="1234,1235,1236,1237,1238")
    ap.add_argument("--k", type=int, default=None, help="clusters [default: the object classes of classes.txt]")
    ap.add_argument("--pca-dim", type=int, default=32)
    ap.add_argument("--n-init", type=int, default=3)
    ap.add_argument("--k-max", type=int, default=20)
    ap.add_argument("--auto", action="store_true", help="also the automatic k")
    ap.add_argument("--labelled-only", action="store_true",
                    help="no hidden-label copy: cluster --split of --data itself")
    ap.add_argument("--split", default="val", help="with --labelled-only: the split clustered")
    args = ap.parse_args(argv)

    labelled = DatasetIndex.open(args.data)
    n_cls = len(labelled.classes)
    k = args.k or n_cls - 1
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-clusters-"))
    store = (args.store or work / "store").resolve()
    common = [*extra, "--store", str(store), "-q"]
    if args.labelled_only:
        common += ["--set", f"data.root={args.data.resolve()}", "--set", f"data.val_split={args.split}"]
    else:
        hidden = work / "unlabeled"
        hidden.mkdir(parents=True, exist_ok=True)
        if not (hidden / "images").exists():
            os.symlink((args.data / "images").resolve(), hidden / "images")  # the images alone
        common += ["--set", f"data.root={hidden.resolve()}", "--set", "data.layout=auto"]
    cl = ["--set", f"clusters.pca_dim={args.pca_dim}", "--set", f"clusters.n_init={args.n_init}"]
    print(f"dataset {args.data}: {n_cls - 1} object classes, k = {k}; store {store}", flush=True)

    rows = []
    for seed in seeds:
        stdout = _cli([*common, *cl, "--set", f"clusters.k={k}", "--set", f"clusters.seed={seed}", "clusters"])
        cdir = _done_path(stdout, "clusters")
        manifest = json.loads((cdir / "manifest.json").read_text())
        extract_dir = store / manifest["inputs"]["extract"]
        split = manifest["params"]["split"]["split"]
        rows.append((seed, _assignments(cdir), cdir))

    emb = extract_dir / split
    from artifacts.embeddings import EmbeddingStore

    ids_all, _, valid = EmbeddingStore(emb).prototypes()
    valid_ids = [i for i, v in zip(ids_all, valid) if v]
    counts = class_counts(emb, labelled, valid_ids, progress=False, split=split).counts
    with tempfile.TemporaryDirectory() as tmp:
        proto = run_kmeans(emb, labelled, valid_ids, Path(tmp), n_clusters=k, seeds=seeds, pca_dim=args.pca_dim,
                           n_init=args.n_init, split=split, progress=False, figures=False, colour_baseline=False)
        proto_all = run_kmeans(emb, labelled, ids_all, Path(tmp) / "all", n_clusters=k, seeds=seeds,
                               pca_dim=args.pca_dim, n_init=args.n_init, split=split, progress=False, figures=False,
                               colour_baseline=False)
    print(f"\n{len(ids_all)} images in {emb}, {len(valid_ids)} with a salient region (what both cluster)")
    if rows:
        print("\n| seed | clusters artifact, matched afterwards | labelled K-means protocol | difference |")
        print("|---|---|---|---|")
        ours = []
        for (seed, assignment, _), p in zip(rows, proto["per_seed"]):
            m = score(counts, valid_ids, assignment, k)
            ours.append(m)
            print(f"| {seed} | {m:.2f} | {p['miou']:.2f} | {m - p['miou']:+.2f} |")
        o = np.array(ours)
        print(f"| mean ± std | {o.mean():.2f} ± {o.std(ddof=1) if len(o) > 1 else 0:.2f} | "
              f"{proto['miou']:.2f} ± {proto['miou_std']:.2f} | {o.mean() - proto['miou']:+.2f} |")
    print(f"\nlabelled protocol at k = {k} on the {len(valid_ids)} prototypes with a salient region: "
          f"{proto['miou']:.2f} ± {proto['miou_std']:.2f}")
    print(f"labelled protocol on all {len(ids_all)} prototypes (zero prototypes of images without a salient "
          f"region clustered too, as the reference): {proto_all['miou']:.2f} ± {proto_all['miou_std']:.2f}")

    if args.auto:
        sets = ["--set", "clusters.k=auto", "--set", f"clusters.k_max={args.k_max}", "--set", f"clusters.seed={seeds[0]}"]
        cdir = _done_path(_cli([*common, *cl, *sets, "clusters"]), "clusters")
        summary = json.loads((cdir / "manifest.json").read_text())["summary"]
        model = json.loads((cdir / "kmeans_model.json").read_text())
        sel = model["k_selection"]
        ka = summary["k"]
        assignment = _assignments(cdir)
        print(f"\nautomatic k over [2, {args.k_max}] ({cdir}): k = {ka}, silhouette {summary['silhouette']:.3f}")
        print("silhouette by k: " + ", ".join(f"{kk}: {s:.3f}" for kk, s in zip(sel["ks"], sel["silhouette"])))
        print(f"score at k = {ka} (seed {seeds[0]}): Hungarian mIoU {score(counts, valid_ids, assignment, ka):.2f}, "
              f"majority mIoU {score(counts, valid_ids, assignment, ka, 'majority'):.2f}")
        sil = dict(zip(sel["ks"], sel["silhouette"]))
        if k in sil:
            print(f"silhouette at the true k = {k}: {sil[k]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
