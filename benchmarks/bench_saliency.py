"""Saliency quality and speed of the mask estimators on davis16-objects.

For each image: the three hand-crafted priors alone (rbd, mbd, contrast), their fusion
(``priors_saliency``), the ONNX model (U^2-Net-p) with and without per-image min-max, and a
Gaussian centre prior as the straightforward baseline every prior must beat. Prints per method:
IoU (soft > 0.5), max-F and mean-F (beta^2 0.3), MAE, mean predicted vs true foreground fraction,
IoU at other thresholds, IoU after the reference post-processing (``postprocess``: > 0.5, regions
under 1% removed; rejected images count as empty masks) with the share of images kept, and CPU
seconds per image (one core: BLAS, OpenCV and onnxruntime single-threaded). Then a grid of fusion weights
from the same per-prior maps, per split, to choose ``PriorParams.weights``.

    python benchmarks/bench_saliency.py [--limit N] [--workers 2] [--split all|train|val]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per worker; set before numpy is imported

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from multiprocessing import Pool  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.evaluate.saliency_metrics import SaliencyAccumulator, saliency_scores  # noqa: E402
from stages.masks.onnx_model import OnnxParams, OnnxSaliency  # noqa: E402
from stages.masks.postprocess import PostParams, postprocess  # noqa: E402
from stages.masks.priors import (  # noqa: E402
    PriorParams,
    contrast_saliency,
    fuse_maps,
    mbd_saliency,
    priors_saliency,
    rbd_saliency,
)

SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", REPO.parent / "shared"))
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
GRID = [
    (1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1), (2, 2, 1),  # (rbd, mbd, contrast)
    (1, 0, 1), (1, 1, 0), (0, 1, 1),  # leave one out
    (1, 0, 0), (0, 1, 0), (0, 0, 1),  # alone
]

_model: OnnxSaliency | None = None


def _init(model_path: str | None) -> None:
    global _model
    cv2.setNumThreads(1)
    _model = OnnxSaliency(model_path, OnnxParams(minmax=False), threads=1) if model_path else None


def _centre(shape: tuple[int, int], sigma: float = 0.3) -> np.ndarray:
    """Gaussian centre prior in units of the image sides (the baseline)."""
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w]
    return np.exp(-(((ys / (h - 1) - 0.5) ** 2) + ((xs / (w - 1) - 0.5) ** 2)) / (2 * sigma**2)).astype(np.float32)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _scores(soft: np.ndarray, gt: np.ndarray) -> dict:
    s = saliency_scores(soft, gt)
    s["iou_at"] = [saliency_scores(soft, gt, t)["iou"] if t != 0.5 else s["iou"] for t in THRESHOLDS]
    mask, kept, _ = postprocess(soft, PostParams())
    mask = mask if kept else np.zeros_like(mask)
    s["iou_pp"] = saliency_scores(mask.astype(np.float32), gt)["iou"]
    s["kept"] = float(kept)
    return s


def _timed(fn, *args):
    """(result, CPU seconds of this process): CPU time, not wall time, so that a shared,
    loaded machine does not inflate the per-image cost."""
    t = time.process_time()
    out = fn(*args)
    return out, time.process_time() - t


def _one(task: tuple[str, str]) -> tuple[str, dict, dict, dict]:
    """(image id, root) -> (id, per-method scores, per-method seconds, per-weights scores)."""
    image_id, root = task
    img = np.asarray(Image.open(f"{root}/images/{image_id}.jpg").convert("RGB"))
    gt = np.asarray(Image.open(f"{root}/labels/{image_id}.png")) > 0
    params = PriorParams()
    maps, secs = {}, {}
    maps["centre (baseline)"], secs["centre (baseline)"] = _timed(_centre, gt.shape)
    maps["rbd"], secs["rbd"] = _timed(rbd_saliency, img, params)
    maps["mbd"], secs["mbd"] = _timed(mbd_saliency, img, params)
    maps["contrast"], secs["contrast"] = _timed(contrast_saliency, img, params)
    maps["priors (fused)"], secs["priors (fused)"] = _timed(priors_saliency, img, params)
    if _model is not None:
        raw, secs["u2netp raw"] = _timed(_model, img)
        maps["u2netp raw"] = raw
        maps["u2netp minmax"], secs["u2netp minmax"] = _minmax(raw), secs["u2netp raw"]
    scores = {k: _scores(v, gt) for k, v in maps.items()}
    parts = (maps["rbd"], maps["mbd"], maps["contrast"])
    grid = {w: saliency_scores(fuse_maps(parts, w), gt) for w in GRID}
    return image_id, scores, secs, grid


def _row(name: str, acc: SaliencyAccumulator, extra: dict) -> str:
    r = acc.result()
    n = max(acc.n, 1)
    ious = " ".join(f"{v / n:.3f}" for v in extra["iou_at"])
    return (
        f"{name:18s} {r['iou']:.3f} {r['max_f']:.3f} {r['mean_f']:.3f} {r['mae']:.3f} "
        f"{r['pred_fg']:.3f} {r['gt_fg']:.3f} | {ious} | {extra['iou_pp'] / n:.3f} {extra['kept'] / n:.2f} | "
        f"{extra['secs'] / n:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=SHARED / "data" / "davis16-objects")
    ap.add_argument("--model", type=Path, default=SHARED / "weights" / "u2netp.onnx")
    ap.add_argument("--no-model", action="store_true", help="skip the ONNX model")
    ap.add_argument("--split", choices=("all", "train", "val"), default="all")
    ap.add_argument("--limit", type=int, default=0, help="first N images of the split (0: all)")
    ap.add_argument("--workers", type=int, default=1, help="processes (timings are per process)")
    args = ap.parse_args()
    if not args.root.is_dir():
        sys.exit(f"dataset not found: {args.root}")
    split_of = {}
    for split in ("train", "val"):
        for i in (args.root / "splits" / f"{split}.txt").read_text().split():
            split_of[i] = split
    ids = sorted(p.stem for p in (args.root / "images").glob("*.jpg"))
    if args.split != "all":
        ids = [i for i in ids if split_of.get(i) == args.split]
    if args.limit:
        ids = ids[: args.limit]
    model_path = None if args.no_model or not args.model.is_file() else str(args.model)

    accs: dict = defaultdict(SaliencyAccumulator)
    extras: dict = defaultdict(lambda: {"iou_at": np.zeros(len(THRESHOLDS)), "iou_pp": 0.0, "kept": 0.0, "secs": 0.0})
    grid_accs: dict = defaultdict(SaliencyAccumulator)
    t0 = time.perf_counter()
    tasks = [(i, str(args.root)) for i in ids]
    with Pool(args.workers, initializer=_init, initargs=(model_path,)) as pool:
        for done, (image_id, scores, secs, grid) in enumerate(pool.imap_unordered(_one, tasks, chunksize=2), 1):
            if done % 50 == 0:
                print(f"{done}/{len(tasks)} images, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            for name, s in scores.items():
                accs[name].add(s)
                ex = extras[name]
                ex["iou_at"] += np.asarray(s["iou_at"])
                ex["iou_pp"] += s["iou_pp"]
                ex["kept"] += s["kept"]
                ex["secs"] += secs[name]
            for w, s in grid.items():
                for split in ("all", split_of.get(image_id, "?")):
                    grid_accs[(split, w)].add(s)
    wall = time.perf_counter() - t0

    print(f"davis16-objects, {len(ids)} images ({args.split}), {args.workers} worker(s), {wall:.0f} s wall")
    print(f"PriorParams: {PriorParams()}")
    head_t = " ".join(f"@{t:.1f}" for t in THRESHOLDS)
    print(f"\n{'method':18s} iou   max_f mean_f mae   fg    gt_fg | IoU {head_t} | iou_pp kept | cpu s/img")
    for name in accs:
        print(_row(name, accs[name], extras[name]))
    base = accs["centre (baseline)"].result()["iou"]
    ratios = [f"{k} {accs[k].result()['iou'] / base:.2f}x" for k in accs if k != "centre (baseline)"]
    print("\nIoU ratio to the centre baseline: " + ", ".join(ratios))

    print("\nFusion weights (rbd, mbd, contrast), fused from the per-prior maps at image size:")
    print(f"{'split':6s} {'weights':10s} iou   max_f mean_f mae   fg")
    for (split, w), acc in sorted(grid_accs.items(), key=lambda kv: (kv[0][0], -kv[1].result()["iou"])):
        r = acc.result()
        cols = " ".join(f"{r[k]:.3f}" for k in ("iou", "max_f", "mean_f", "mae", "pred_fg"))
        print(f"{split:6s} {str(w):10s} {cols}")


if __name__ == "__main__":
    main()
