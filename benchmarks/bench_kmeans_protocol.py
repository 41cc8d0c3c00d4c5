"""K-means protocol at PASCAL VOC val scale: this pipeline's scorer against the reference's way.

Synthetic, same inputs for both: 1,449 prototypes (D=32) planted in 20 clusters, one 375x500
label per image whose object's class is its cluster + 1 (plus a 4-px ignore ring and sometimes a
second object), and a salient mask that is the object's box shifted and rescaled (imperfect).

- ours: SalientClassCounts built once (one pass over the pixels), then per seed PCA-whitening,
  k-means (k-means++ x3 + faiss Lloyd), confusion from the counts, Hungarian, IoU.
- reference way: per seed PCA(32, whiten) + MiniBatchKMeans(20, batch 1000, n_init 3), the
  prediction painted and flattened over all valid pixels, 441 IoU passes over those pixels
  (one per (cluster, class) pair), Hungarian on N - IoU, remap, per-class TP/FP/FN passes.
- check: our clustering scored by the reference-way scorer must give our mIoU exactly.

    python benchmarks/bench_kmeans_protocol.py            # full scale (the naive path takes long)
    python benchmarks/bench_kmeans_protocol.py --quick    # 150 images
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import MiniBatchKMeans
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score

from stages.evaluate.kmeans import KMeansProtocol, kmeans, pca_whiten
from stages.evaluate.metrics import SalientClassCounts, hungarian_match, remap_confusion, segmentation_scores

H, W, N_CLS, K = 375, 500, 21, 20
SEEDS = (1234, 1235, 1236, 1237, 1238)


def synthetic(n: int, seed: int = 0):
    """prototypes (n, 32) float32, planted cluster (n,), labels (n, H, W) uint8, masks (n, H, W) bool."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(K, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = rng.choice(K, size=n, p=rng.dirichlet(np.full(K, 3.0)))
    protos = centres[truth] + 0.6 * rng.normal(size=(n, 32)) / np.sqrt(32)
    protos = (protos / np.linalg.norm(protos, axis=1, keepdims=True)).astype(np.float32)
    labels = np.zeros((n, H, W), np.uint8)
    masks = np.zeros((n, H, W), bool)
    for i in range(n):
        objects = [truth[i] + 1] + ([int(rng.integers(1, N_CLS))] if rng.random() < 0.4 else [])
        for j, cls in enumerate(objects):
            h, w = (rng.integers(80, 300), rng.integers(100, 400)) if j == 0 else (rng.integers(30, 90), rng.integers(30, 120))
            y, x = rng.integers(4, H - h - 4), rng.integers(4, W - w - 4)
            labels[i, y - 4:y + h + 4, x - 4:x + w + 4] = 255
            labels[i, y:y + h, x:x + w] = cls
            if j == 0 and rng.random() > 0.01:  # ~1% of images without a salient pixel
                dy, dx = rng.integers(-20, 21, 2)
                sh, sw = int(h * rng.uniform(0.8, 1.15)), int(w * rng.uniform(0.8, 1.15))
                masks[i, max(y + dy, 0):max(y + dy + sh, 0), max(x + dx, 0):max(x + dx + sw, 0)] = True
    return protos, truth, labels, masks


def naive_score(assign: np.ndarray, labels: np.ndarray, masks: np.ndarray, gt_flat: np.ndarray, valid: np.ndarray) -> float:
    """The reference's scoring, written plainly: paint the prediction, flatten the valid pixels,
    one pass per (cluster, class) pair for the 441 IoUs, Hungarian on N - IoU, remap, per-class
    IoU passes. (Class sizes are counted once and the cluster mask is hoisted out of the inner
    loop, so each of the 441 passes is one compare + and + count.)"""
    n_k = K + 1
    pred = (masks * (assign + 1).astype(np.uint8)[:, None, None])[valid]
    pred_size = np.bincount(pred, minlength=n_k)
    gt_size = np.bincount(gt_flat, minlength=N_CLS)
    ious = np.zeros((n_k, N_CLS))
    for c1 in range(n_k):
        p = pred == c1
        for c2 in range(N_CLS):
            tp = np.count_nonzero(p & (gt_flat == c2))
            ious[c1, c2] = tp / max(pred_size[c1] + gt_size[c2] - tp, 1e-8)
    rows, cols = linear_sum_assignment(gt_flat.shape[0] - ious)
    lut = np.zeros(n_k, np.uint8)
    lut[rows] = cols
    remapped = lut[pred]
    jac = []
    for c in range(N_CLS):
        p, t = remapped == c, gt_flat == c
        tp = np.count_nonzero(p & t)
        jac.append(tp / max(np.count_nonzero(p) + np.count_nonzero(t) - tp, 1e-8))
    return 100.0 * float(np.mean(jac))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="150 images instead of 1,449")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--check-seeds", type=int, default=None,
                        help="seeds whose clustering of ours is re-scored the reference way (default: 1; all with --quick)")
    args = parser.parse_args()
    n = args.images or (150 if args.quick else 1449)
    check = args.check_seeds if args.check_seeds is not None else (len(SEEDS) if args.quick else 1)

    t = time.perf_counter()
    protos, truth, labels, masks = synthetic(n)
    print(f"{n} images of {H}x{W}, {K} planted clusters, seeds {SEEDS} (data made in {time.perf_counter() - t:.1f} s)")

    # ---- ours
    t0 = time.perf_counter()
    counts = SalientClassCounts(N_CLS)
    for lbl, m in zip(labels, masks):
        counts.update(m, lbl)
    t_counts = time.perf_counter() - t0
    t1 = time.perf_counter()
    report = KMeansProtocol(n_clusters=K, seeds=SEEDS).run(protos, counts)
    t_seeds = time.perf_counter() - t1
    ours_total = t_counts + t_seeds
    z, _ = pca_whiten(protos, 32)
    our_assign = {s: kmeans(z, K, s).assignment for s in SEEDS}  # deterministic: the protocol's clusterings
    t2 = time.perf_counter()
    for a in our_assign.values():
        conf = counts.confusion(a, K)
        segmentation_scores(remap_confusion(conf, hungarian_match(conf), N_CLS))
    t_our_score = (time.perf_counter() - t2) / len(SEEDS)
    print(f"ours : counts pass {t_counts:.2f} s + {len(SEEDS)} seeds {t_seeds:.2f} s = {ours_total:.2f} s; "
          f"mIoU {report.miou:.2f} +- {report.miou_std:.2f}; "
          f"ARI {np.mean([adjusted_rand_score(truth, a) for a in our_assign.values()]):.3f}")

    # ---- reference way
    valid = labels != 255
    gt_flat = labels[valid]
    naive_mious, naive_aris, t_cluster, t_score = [], [], 0.0, 0.0
    for seed in SEEDS:
        ta = time.perf_counter()
        zz = PCA(n_components=32, whiten=True).fit_transform(protos)
        assign = MiniBatchKMeans(n_clusters=K, batch_size=1000, n_init=3, random_state=seed).fit_predict(zz)
        tb = time.perf_counter()
        naive_mious.append(naive_score(assign, labels, masks, gt_flat, valid))
        tc = time.perf_counter()
        t_cluster, t_score = t_cluster + tb - ta, t_score + tc - tb
        naive_aris.append(adjusted_rand_score(truth, assign))
        print(f"  reference way, seed {seed}: clustering {tb - ta:.2f} s, scoring {tc - tb:.1f} s, mIoU {naive_mious[-1]:.2f}",
              flush=True)
    naive_total = t_cluster + t_score
    print(f"ref  : clustering {t_cluster:.2f} s + scoring {t_score:.1f} s = {naive_total:.1f} s; "
          f"mIoU {np.mean(naive_mious):.2f} +- {np.std(naive_mious, ddof=1):.2f}; ARI {np.mean(naive_aris):.3f}")
    print(f"ratio whole protocol (reference way / ours): {naive_total / ours_total:.0f}x")
    print(f"scoring one seed: reference way {t_score / len(SEEDS):.2f} s, ours {1e3 * t_our_score:.2f} ms "
          f"({t_score / len(SEEDS) / t_our_score:.0f}x) after a one-time counts pass of {t_counts:.2f} s")

    # ---- same clustering, both scorers
    for r in report.per_seed[:check]:
        ref = naive_score(our_assign[r.seed], labels, masks, gt_flat, valid)
        print(f"check seed {r.seed}: our clustering, reference-way scorer {ref:.6f} vs ours {r.miou:.6f} "
              f"({'agree' if abs(ref - r.miou) < 1e-9 else 'DISAGREE'})")


if __name__ == "__main__":
    main()
