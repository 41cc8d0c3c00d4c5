"""The project's dense CRF (stages/evaluate/crf.py) against pydensecrf, the library it follows.

Both get the same input on real photographs (davis16-objects val, 512 x 288): a probe-like
unary made from the ground truth as in tests/stages/evaluate/test_crf.py (the label's classes on
a grid ``--coarse`` times coarser, one-hot x 3 plus unit Gaussian noise as logits over all the
dataset's classes, bilinear back to full size, softmax), so it is wrong along the boundaries and
in patches. The reference runs as the MaskContrast reference calls it: ``DenseCRF2D`` with
``unary_from_softmax``, ``addPairwiseGaussian(sxy=1, compat=3)``,
``addPairwiseBilateral(sxy=67, srgb=3, compat=4)``, ``inference(10)``; this project's
``dense_crf`` with the same parameters (``CRFParams()``).

Reported, pooled over all pixels of all images: agreement of the two argmax maps; agreement on
the pixels that either CRF changed relative to the unary's argmax (what the CRFs do, so not
inflated by the pixels both leave alone); the share each CRF changed; pixel accuracy and mIoU
against the ground truth of the unary and of each CRF; the total-variation distance between the
two marginals per pixel (mean and max); and seconds per image for each (median), with the ratio.

    pip install -e '.[crf-reference]'        # pydensecrf2, built from source (gcc, a minute)
    OMP_NUM_THREADS=1 python benchmarks/bench_crf_reference.py --images 30

Without pydensecrf it prints why and exits 0.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # pydensecrf is single-threaded: compare on one core each

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "davis16-objects"


def probe_like_probs(label: np.ndarray, n_cls: int, rng: np.random.Generator, coarse: int = 16,
                     strength: float = 3.0) -> np.ndarray:
    """(C, H, W) float32 softmax of a noisy one-hot of ``label`` (void 255 as class 0) on a grid
    ``coarse`` times coarser, bilinear back to the label's size."""
    h, w = label.shape
    small = cv2.resize(np.where(label == 255, 0, label).astype(np.uint8), (max(1, w // coarse), max(1, h // coarse)),
                       interpolation=cv2.INTER_NEAREST)
    logits = (strength * np.eye(n_cls, dtype=np.float32)[small]
              + rng.normal(0, 1, (*small.shape, n_cls)).astype(np.float32))  # (h', w', C)
    logits = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in logits.transpose(2, 0, 1)])
    probs = np.exp(logits - logits.max(axis=0))
    return (probs / probs.sum(axis=0)).astype(np.float32)


def _miou(pred: np.ndarray, truth: np.ndarray, n_cls: int) -> float:
    valid = truth != 255
    conf = np.bincount(truth[valid].astype(np.int64) * n_cls + pred[valid], minlength=n_cls * n_cls)
    conf = conf.reshape(n_cls, n_cls)
    present = np.flatnonzero(conf.sum(axis=1))
    inter = np.diag(conf)[present]
    union = conf.sum(axis=0)[present] + conf.sum(axis=1)[present] - inter
    return float(np.mean(inter / np.maximum(union, 1)))


def compare(samples, n_cls: int, coarse: int, seed: int, verbose: bool = True) -> dict:
    """Run both CRFs on each (id, image, label); pooled figures and per-image rows."""
    from stages.evaluate.crf import CRFParams, dense_crf, pydensecrf_crf

    rng = np.random.default_rng(seed)
    params = CRFParams()
    tot = dict(pixels=0, agree=0, changed=0, agree_changed=0, ours_changed=0, ref_changed=0, tv=0.0, tv_max=0.0)
    t_ours, t_ref, rows = [], [], []
    preds = {"unary": [], "ours": [], "reference": []}
    truths = []
    for id_, image, label in samples:
        probs = probe_like_probs(label, n_cls, rng, coarse)
        start = time.perf_counter()
        q_ours = dense_crf(image, probs, params)
        t_ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        q_ref = pydensecrf_crf(image, probs)
        t_ref.append(time.perf_counter() - start)
        a0, a1, a2 = probs.argmax(0), q_ours.argmax(0), q_ref.argmax(0)
        changed = (a1 != a0) | (a2 != a0)
        row = dict(id=id_, agree=float((a1 == a2).mean()), changed=float(changed.mean()),
                   agree_changed=float((a1 == a2)[changed].mean()) if changed.any() else 1.0,
                   t_ours=t_ours[-1], t_ref=t_ref[-1])
        rows.append(row)
        tot["pixels"] += a0.size
        tot["agree"] += int((a1 == a2).sum())
        tot["changed"] += int(changed.sum())
        tot["agree_changed"] += int((a1 == a2)[changed].sum())
        tot["ours_changed"] += int((a1 != a0).sum())
        tot["ref_changed"] += int((a2 != a0).sum())
        tot["tv"] += float(0.5 * np.abs(q_ours - q_ref).sum(axis=0).sum())
        tot["tv_max"] = max(tot["tv_max"], float(0.5 * np.abs(q_ours - q_ref).sum(axis=0).max()))
        for key, a in (("unary", a0), ("ours", a1), ("reference", a2)):
            preds[key].append(a.ravel())
        truths.append(label.ravel())
        if verbose:
            print(f"  {id_:24s} agree {100 * row['agree']:6.2f} %  on changed {100 * row['agree_changed']:6.2f} % "
                  f"({100 * row['changed']:5.2f} % changed)  ours {row['t_ours']:.2f} s  pydensecrf {row['t_ref']:.2f} s",
                  flush=True)
    truth = np.concatenate(truths)
    valid = truth != 255
    quality = {k: (float((np.concatenate(v)[valid] == truth[valid]).mean()), _miou(np.concatenate(v), truth, n_cls))
               for k, v in preds.items()}
    n = tot["pixels"]
    return dict(
        images=len(rows), pixels=n, agree=tot["agree"] / n, changed=tot["changed"] / n,
        agree_changed=tot["agree_changed"] / max(tot["changed"], 1),
        ours_changed=tot["ours_changed"] / n, ref_changed=tot["ref_changed"] / n,
        marginal_tv=tot["tv"] / n, marginal_tv_max=tot["tv_max"],
        min_image_agree=min(r["agree"] for r in rows), min_image_agree_changed=min(r["agree_changed"] for r in rows),
        t_ours=float(np.median(t_ours)), t_ref=float(np.median(t_ref)), quality=quality, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="davis16-objects (or any dataset with labels)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=30, help="images, spread evenly over the split")
    ap.add_argument("--coarse", type=int, default=16, help="the unary's grid is this many times coarser")
    ap.add_argument("--seed", type=int, default=0, help="seed of the unary's noise")
    ap.add_argument("--quiet", action="store_true", help="no per-image lines")
    a = ap.parse_args()
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError as exc:
        print(f"skipped: pydensecrf is not importable ({exc}); install it with pip install -e '.[crf-reference]' "
              "(pydensecrf2, built from source: needs a C++ compiler)")
        return
    if not a.data.is_dir():
        print(f"skipped: no dataset at {a.data} (give --data)")
        return
    cv2.setNumThreads(1)
    sys.path.insert(0, str(ROOT))
    from stages.data import DatasetIndex, load_image, load_label

    dataset = DatasetIndex.open(a.data)
    ids = dataset.ids(a.split)
    picked = [ids[i] for i in np.linspace(0, len(ids) - 1, min(a.images, len(ids))).round().astype(int)]

    def samples():
        for id_ in picked:
            image = load_image(dataset.sample(id_).image)
            yield id_, image, load_label(dataset.sample(id_).label, image.shape)

    n_cls = len(dataset.classes)
    print(f"{len(picked)} images of {a.data.name}/{a.split}, {n_cls} classes, unary on a grid {a.coarse}x coarser "
          f"(seed {a.seed}); 10 iterations, Gaussian sxy 1 compat 3, bilateral sxy 67 srgb 3 compat 4; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    r = compare(samples(), n_cls, a.coarse, a.seed, verbose=not a.quiet)
    q = r["quality"]
    print()
    print(f"| figure ({r['images']} images, {r['pixels']:,} pixels) | value |")
    print("|---|---|")
    print(f"| argmax agreement, all pixels | {100 * r['agree']:.2f} % (worst image {100 * r['min_image_agree']:.2f} %) |")
    print(f"| argmax agreement, pixels either CRF changed ({100 * r['changed']:.2f} % of all) "
          f"| {100 * r['agree_changed']:.2f} % (worst image {100 * r['min_image_agree_changed']:.2f} %) |")
    print(f"| pixels changed: ours / pydensecrf | {100 * r['ours_changed']:.2f} % / {100 * r['ref_changed']:.2f} % |")
    print(f"| marginals' total-variation distance per pixel: mean / max | {r['marginal_tv']:.2e} / {r['marginal_tv_max']:.2f} |")
    for key in ("unary", "ours", "reference"):
        print(f"| pixel accuracy / mIoU vs ground truth: {key} | {100 * q[key][0]:.2f} % / {100 * q[key][1]:.2f} % |")
    print(f"| seconds per image (median): ours / pydensecrf | {r['t_ours']:.2f} / {r['t_ref']:.2f} "
          f"(ours {r['t_ours'] / r['t_ref']:.2f}x pydensecrf's time) |")


if __name__ == "__main__":
    main()
