"""Extraction throughput and disk cost per image, against a straightforward per-image loop.

    python benchmarks/bench_extract.py [--n 4] [--size 512] [--threads 2] [--workers 1]
                                       [--models mobilenet_v2/8,mobilenet_v2/16,resnet50/8]

For each backbone/output-stride: images/s of ``extract`` (DataLoader + batches + HDF5 shards,
features on) and of a straightforward loop (decode, resize, forward one image, prototype, write
one .npz per image, the reference's habit), their ratio, and the bytes per image on disk with
and without the float16 features. Then, on one model's trunk features, the features dataset's
compression options: bytes per image and the time to read one image's features.
Images: the first ``--n`` of ../shared/data/davis16-objects when present, else synthetic
500x375 images. Weights are random: throughput does not depend on them, and the post-ReLU trunk
is about as sparse as a trained one, so compression ratios are indicative only.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from artifacts.embeddings import EmbeddingStore  # noqa: E402
from stages.data import DatasetIndex, Sample, load_image  # noqa: E402
from stages.extract import ExtractParams, head_prototypes, resize_features, resize_mask  # noqa: E402
from stages.extract.extract import extract  # noqa: E402
from stages.network.model import MaskContrastModel  # noqa: E402
from stages.network.runtime import normalize_images  # noqa: E402

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis16-objects"


def samples_for(n: int, tmp: Path) -> list[Sample]:
    if DAVIS.is_dir():
        return DatasetIndex.open(DAVIS).samples()[:n]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp / f"synthetic{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path)
        out.append(Sample(f"synthetic{i}", path, None))
    return out


@torch.no_grad()
def straightforward(model: MaskContrastModel, samples: list[Sample], size: int, feature_size: int,
                    out: Path) -> float:
    """Seconds for the plain loop: one image at a time, one .npz per image."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    t0 = time.perf_counter()
    for s in samples:
        img = load_image(s.image)
        x = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
        x = normalize_images(torch.from_numpy(x).permute(2, 0, 1)[None])
        emb, sal, trunk = model(x, return_features=True)
        proto, valid, salient = head_prototypes(emb, sal)
        mask = resize_mask(salient[0].numpy(), img.shape[:2])
        feats = resize_features(trunk, feature_size)[0].half().numpy()
        np.savez(out / f"{s.id}.npz", prototype=proto[0].numpy(), valid=valid[0].numpy(), mask=mask,
                 features=feats)
    return time.perf_counter() - t0


def stored_features(store_dir: Path) -> np.ndarray:
    store = EmbeddingStore(store_dir)
    return np.stack([store.features(i) for i in store.ids()])  # n x C x f x f float16


def compression_sweep(name: str, feats: np.ndarray, tmp: Path) -> None:
    """Write the same features with each compression; bytes per image and read ms per image."""
    n = feats.shape[0]
    print(f"\nfeatures dataset options, {name} trunk ({n} images, {feats.shape[1:]} float16, "
          f"{feats[0].nbytes / 1024:.0f} KiB raw each, {np.mean(feats == 0) * 100:.0f}% zeros):")
    print(f"{'compression':<18}{'KiB/image':>10}{'read ms/image':>15}")
    for name, kwargs in (("none", {}), ("lzf", {"compression": "lzf"}),
                         ("lzf+shuffle", {"compression": "lzf", "shuffle": True}),
                         ("gzip4+shuffle", {"compression": "gzip", "shuffle": True}),
                         ("gzip1+shuffle", {"compression": "gzip", "compression_opts": 1, "shuffle": True})):
        path = tmp / f"feat-{name}.h5"
        with h5py.File(path, "w") as f:
            f.create_dataset("features", data=feats, chunks=(1, *feats.shape[1:]), **kwargs)
        best = float("inf")
        with h5py.File(path, "r", rdcc_nbytes=0) as f:
            ds = f["features"]
            for _ in range(5):
                t0 = time.perf_counter()
                for i in range(n):
                    ds[i]
                best = min(best, (time.perf_counter() - t0) / n)
            stored = ds.id.get_storage_size()
        print(f"{name:<18}{stored / n / 1024:>10.1f}{best * 1e3:>15.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4, help="images per run")
    ap.add_argument("--size", type=int, default=512, help="input size")
    ap.add_argument("--feature-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of extract")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--models", default="mobilenet_v2/8,mobilenet_v2/16,resnet50/8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    try:
        samples = samples_for(args.n, tmp)
        shape = np.array(Image.open(samples[0].image)).shape[:2]
        print(f"{len(samples)} images (first {shape[1]}x{shape[0]}), input {args.size}px, features "
              f"{args.feature_size}^2, {args.threads} threads, {args.workers} workers, batch {args.batch_size}, "
              f"device cpu")
        print(f"{'model':<18}{'extract img/s':>14}{'plain img/s':>13}{'ratio':>7}"
              f"{'KiB/img +feat':>15}{'KiB/img -feat':>15}")
        trunks: dict[str, np.ndarray] = {}
        for spec in args.models.split(","):
            backbone, stride = spec.split("/")
            torch.manual_seed(0)
            model = MaskContrastModel(backbone, int(stride))
            params = ExtractParams(input_size=args.size, feature_size=args.feature_size, batch_size=args.batch_size,
                                   num_workers=args.workers, device="cpu")
            out = tmp / f"{backbone}-{stride}"
            with torch.no_grad():  # warm-up: first-call allocations and kernel selection
                model.eval()(torch.zeros(1, 3, args.size, args.size), return_features=True)
            t0 = time.perf_counter()
            summary = extract(model, samples, out, params, progress=False)
            ours = len(samples) / (time.perf_counter() - t0)
            plain = len(samples) / straightforward(model, samples, args.size, args.feature_size, tmp / f"plain-{spec}")
            bare = extract(model, samples, tmp / f"{backbone}-{stride}-nofeat",
                           ExtractParams(**{**params.__dict__, "features": False}), progress=False)
            n = summary["n_images"]
            print(f"{spec:<18}{ours:>14.3f}{plain:>13.3f}{ours / plain:>7.2f}"
                  f"{summary['bytes_on_disk'] / n / 1024:>15.1f}{bare['bytes_on_disk'] / n / 1024:>15.1f}")
            trunks[spec] = stored_features(out)
        # Random decoders can leave a trunk all zeros (post-ReLU): sweep on the least sparse one.
        spec = min(trunks, key=lambda k: float(np.mean(trunks[k] == 0)))
        compression_sweep(spec, trunks[spec], tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
