"""Dense CRF post-processing: the permutohedral-lattice mean-field against the same mean-field
with exact O(N^2) bilateral sums, in one process.

Inputs per size: a synthetic image (smooth colour regions with texture, drawn from a random
region map) and probe-like noisy probabilities (softmax of a low-resolution noisy one-hot of the
region map, upsampled bilinearly, so wrong around the edges and in patches). Rows:

- ``dense_crf`` (stages/evaluate/crf.py, the reference's parameters) at VOC size 500x375 with 21
  classes and DAVIS size 854x480 with 2 classes: seconds per image (best of ``--repeat``), split
  into the lattice build and the 10 mean-field iterations;
- the baseline: the same mean-field (same unary, same exact spatial term) with the bilateral
  sums computed exactly, block by block, on the image downsampled by ``--scale`` (the full size
  would take hours: its time is the measured one times (N_full / N_small)^2, printed as an
  extrapolation); ``dense_crf`` on the same downsampled input for the ratio, and the agreement of
  the two argmax maps (and how many pixels the CRF changed, so that agreement is not trivial).

    python benchmarks/bench_crf.py               # scale 0.25 (the baseline takes about 2 minutes)
    python benchmarks/bench_crf.py --scale 0.15  # quicker baseline
    OMP_NUM_THREADS=1 python benchmarks/bench_crf.py   # on a shared machine
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import cv2
import numpy as np

from stages.evaluate.crf import (
    CRFParams,
    PermutohedralLattice,
    bilateral_features,
    dense_crf,
    mean_field,
    potts_message,
    spatial_gaussian_filter,
    unary_from_probs,
)

SIZES = ((500, 375, 21), (854, 480, 2))  # (width, height, classes): PASCAL VOC, DAVIS
PHOTO = "blackswan_00000.jpg"  # the densest lattice of the DAVIS photos tried (slowest case)


def synthetic(width: int, height: int, n_cls: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, region classes (H, W) int64, noisy probabilities (C, H, W) float32)."""
    rng = np.random.default_rng(seed)
    # regions: nearest of 12 random centres (jittered), each with a class and a colour
    centres = rng.uniform(0, 1, (12, 2)) * (width, height)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    jitter = cv2.GaussianBlur(rng.normal(0, 25, (height, width, 2)).astype(np.float32), (0, 0), 12)
    d2 = ((xx[..., None] + jitter[..., :1] - centres[:, 0]) ** 2
          + (yy[..., None] + jitter[..., 1:] - centres[:, 1]) ** 2)  # (H, W, 12)
    region = d2.argmin(axis=2)
    classes = rng.integers(0, n_cls, 12)
    classes[: min(n_cls, 12)] = rng.permutation(n_cls)[:12]
    truth = classes[region]
    # region colours, smooth shading and fine texture: about as many lattice vertices as a photo
    colours = rng.uniform(30, 225, (12, 3))
    shading = cv2.GaussianBlur(rng.normal(0, 1, (height, width, 3)).astype(np.float32), (0, 0), 25)
    texture = cv2.GaussianBlur(rng.normal(0, 6, (height, width, 3)).astype(np.float32), (0, 0), 1.0)
    image = np.clip(colours[region] + 25 * shading / shading.std() + texture, 0, 255).astype(np.uint8)
    # probe-like probabilities: noisy one-hot on a grid 8x coarser, bilinear to full size
    gh, gw = max(height // 8, 2), max(width // 8, 2)
    coarse_truth = cv2.resize(truth.astype(np.uint8), (gw, gh), interpolation=cv2.INTER_NEAREST)
    logits = (2.5 * np.eye(n_cls, dtype=np.float32)[coarse_truth]
              + rng.normal(0, 1.2, (gh, gw, n_cls)).astype(np.float32))  # (gh, gw, C)
    logits = resize_channels(logits.transpose(2, 0, 1), width, height, cv2.INTER_LINEAR)  # (C, H, W)
    probs = np.exp(logits - logits.max(axis=0, keepdims=True))
    return image, truth, probs / probs.sum(axis=0, keepdims=True)


def resize_channels(maps: np.ndarray, width: int, height: int, interpolation: int) -> np.ndarray:
    """(C, h, w) float32 -> (C, height, width), channel by channel (OpenCV resizes <= 4 at once)."""
    return np.stack([cv2.resize(m, (width, height), interpolation=interpolation) for m in maps])


def photo(width: int, height: int) -> np.ndarray | None:
    """A DAVIS photograph from ../shared/data (beside the project), resized; None when absent."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "davis16-objects" / "images" / PHOTO
    image = cv2.imread(str(path))
    return None if image is None else np.ascontiguousarray(cv2.resize(image, (width, height))[:, :, ::-1])


def exact_bilateral(features: np.ndarray, block: int = 1024):
    """v (N, C) -> sum_j exp(-|f_i - f_j|^2 / 2) v_j, exactly, rows in blocks (memory block x N)."""
    f = features.astype(np.float32)
    sq = (f * f).sum(axis=1)

    def apply(values: np.ndarray) -> np.ndarray:
        v = np.asarray(values, np.float32)
        out = np.empty_like(v)
        for start in range(0, len(f), block):
            rows = slice(start, start + block)
            d2 = sq[rows, None] + sq[None, :] - 2.0 * (f[rows] @ f.T)  # (B, N)
            np.maximum(d2, 0.0, out=d2)
            np.exp(-0.5 * d2, out=d2)
            out[rows] = d2 @ v
        return out

    return apply


def brute_force_crf(image: np.ndarray, probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """The same mean-field as dense_crf with exact bilateral sums; marginals (C, H, W)."""
    c, h, w = probs.shape
    messages = [potts_message(spatial_gaussian_filter(h, w, params.gaussian_sxy), params.gaussian_compat, h * w),
                potts_message(exact_bilateral(bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb)),
                              params.bilateral_compat, h * w)]
    return mean_field(unary_from_probs(probs), messages, params.iterations).T.reshape(c, h, w)


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.25, help="downsampling of the baseline's input")
    ap.add_argument("--repeat", type=int, default=3, help="timings: best of this many runs")
    args = ap.parse_args()
    params = CRFParams()
    print(f"dense CRF {params.to_dict()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for width, height, n_cls in SIZES:
        image, truth, probs = synthetic(width, height, n_cls)
        n = width * height
        t_build, lattice = best_of(args.repeat, lambda: PermutohedralLattice(
            bilateral_features(image, params.bilateral_sxy, params.bilateral_srgb)))
        t_fast, q = best_of(args.repeat, lambda: dense_crf(image, probs, params))
        before, after = (probs.argmax(0) == truth).mean(), (q.argmax(0) == truth).mean()
        print(f"\n{width}x{height}, {n_cls} classes: dense_crf {t_fast:.2f} s/image (lattice build {t_build:.2f} s, "
              f"{lattice.n_vertices} vertices for {n} pixels); pixel accuracy {100 * before:.1f}% -> "
              f"{100 * after:.1f}%")
        real = photo(width, height)
        if real is not None:
            t_photo, _ = best_of(args.repeat, lambda: dense_crf(real, probs, params))
            features = bilateral_features(real, params.bilateral_sxy, params.bilateral_srgb)
            n_photo = PermutohedralLattice(features).n_vertices
            print(f"  on the photo {PHOTO} (timing only): dense_crf {t_photo:.2f} s/image ({n_photo} vertices)")
        # the baseline on the downsampled input
        sw, sh = max(int(round(width * args.scale)), 8), max(int(round(height * args.scale)), 8)
        small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
        small_probs = resize_channels(probs, sw, sh, cv2.INTER_AREA)
        t_small, q_small = best_of(args.repeat, lambda: dense_crf(small, small_probs, params))
        t_brute, q_brute = best_of(1, lambda: brute_force_crf(small, small_probs, params))
        fast_map, exact_map, input_map = q_small.argmax(0), q_brute.argmax(0), small_probs.argmax(0)
        changed = (fast_map != input_map) | (exact_map != input_map)  # pixels either CRF changed
        print(f"  at {sw}x{sh} ({sw * sh} pixels): dense_crf {t_small:.3f} s, exact bilateral sums {t_brute:.2f} s "
              f"-> {t_brute / t_small:.0f}x; argmax agreement {100 * (fast_map == exact_map).mean():.2f}%, "
              f"{100 * (fast_map == exact_map)[changed].mean():.1f}% on the {100 * changed.mean():.1f}% of pixels "
              "either CRF changed")
        full = t_brute * (n / (sw * sh)) ** 2
        print(f"  at {width}x{height}: exact bilateral sums ~{full / 60:.0f} min/image (extrapolated, N^2) "
              f"-> ~{full / t_fast:.0f}x")


if __name__ == "__main__":
    main()
