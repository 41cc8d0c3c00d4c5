"""The ``features`` mask estimator on davis16-objects: what each part adds (ablation), per split.

Rows, each scored with the saliency protocol (IoU at soft > 0.5, max-F, mean-F, MAE, predicted
foreground share) and CPU seconds per image on one core:
- seeds only: the spread x border-contrast score on the grid, min-max scaled (step 1), without
  and with the class prior (the ImageNet classifier's class-activation map, ``class_prior``);
- propagation, 0 re-estimations, no CRF (step 2 once);
- propagation, the default re-estimations, no CRF;
- the default estimator (with the dense-CRF refinement, step 3), and without its class prior.
The settings were chosen on the train split; val was scored afterwards (README).

    python benchmarks/bench_features_masks.py [--split train|val|all] [--workers 2] [--limit N]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per worker; set before numpy is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from multiprocessing import Pool  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.evaluate.saliency_metrics import SaliencyAccumulator, saliency_scores  # noqa: E402
from stages.masks.features import (  # noqa: E402
    FeatureEstimator,
    FeatureParams,
    foreground_grid,
    refine,
    seed_scores,
)

SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", REPO.parent / "shared"))
DEFAULT = FeatureParams()
NO_CLASSES = dataclasses.replace(DEFAULT, class_prior=0.0)
ROWS = {  # name -> (params, seeds only)
    "seeds only (spread x border contrast)": (NO_CLASSES, True),
    f"seeds x class map^{DEFAULT.class_prior:g}": (DEFAULT, True),
    "propagation, 0 re-estimations, no CRF": (dataclasses.replace(DEFAULT, iterations=0, crf=False), False),
    f"propagation, {DEFAULT.iterations} re-estimations, no CRF": (dataclasses.replace(DEFAULT, crf=False), False),
    "default (with the dense CRF)": (DEFAULT, False),
    "default without the class prior": (NO_CLASSES, False),
}
_est: FeatureEstimator | None = None


def _init(weights: str) -> None:
    global _est
    cv2.setNumThreads(1)
    _est = FeatureEstimator(DEFAULT, weights)


def _one(task: tuple[str, str]) -> tuple[str, dict, dict]:
    image_id, root = task
    img = np.asarray(Image.open(f"{root}/images/{image_id}.jpg").convert("RGB"))
    gt = np.asarray(Image.open(f"{root}/labels/{image_id}.png")) > 0
    t0 = time.process_time()
    grid, classes = _est.features(img)
    t_grid = time.process_time() - t0
    scores, secs = {}, {}
    for name, (params, seeds_only) in ROWS.items():
        t = time.process_time()
        if seeds_only:
            s = seed_scores(grid, params.temperature, classes, params.class_prior)
            soft = cv2.resize(((s - s.min()) / max(np.ptp(s), 1e-12)).astype(np.float32), img.shape[1::-1])
        else:
            soft = refine(img, foreground_grid(grid, params, classes), params)
        secs[name] = t_grid + time.process_time() - t
        scores[name] = saliency_scores(np.clip(soft, 0, 1), gt)
    return image_id, scores, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=SHARED / "data" / "davis16-objects")
    ap.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2-b0353104.pth")
    ap.add_argument("--split", choices=("all", "train", "val"), default="all")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if not args.root.is_dir() or not args.weights.is_file():
        sys.exit(f"needs {args.root} and {args.weights}")
    if args.split == "all":
        ids = sorted(p.stem for p in (args.root / "images").glob("*.jpg"))
    else:
        ids = sorted((args.root / "splits" / f"{args.split}.txt").read_text().split())
    ids = ids[: args.limit] if args.limit else ids
    accs = {name: SaliencyAccumulator() for name in ROWS}
    secs = {name: 0.0 for name in ROWS}
    t0 = time.perf_counter()
    with Pool(args.workers, initializer=_init, initargs=(str(args.weights),)) as pool:
        for done, (_, scores, s) in enumerate(pool.imap_unordered(_one, [(i, str(args.root)) for i in ids]), 1):
            for name in ROWS:
                accs[name].add(scores[name])
                secs[name] += s[name]
            if done % 100 == 0:
                print(f"{done}/{len(ids)} images, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"davis16-objects, {len(ids)} images ({args.split}), ImageNet MobileNetV2, {args.workers} worker(s)")
    print(f"{'row':44s} iou   max_f mean_f mae   fg    gt_fg cpu s/img")
    for name in ROWS:
        r = accs[name].result()
        print(f"{name:44s} {r['iou']:.3f} {r['max_f']:.3f} {r['mean_f']:.3f}  {r['mae']:.3f} {r['pred_fg']:.3f} "
              f"{r['gt_fg']:.3f} {secs[name] / len(ids):.3f}")


if __name__ == "__main__":
    main()
