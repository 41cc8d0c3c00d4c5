"""Issue 18's self-training route (COMUS-style) on davis16-objects, measured outside the pipeline.

Starting from the ImageNet MobileNetV2 (as the ``init`` row of ``bench_davis_pipeline.py``), or from a
trained network (``--start STORE/train/<version>``):

1. prototypes of the train images (the backbone's last grid, mask-pooled, at the extraction size),
2. K-means on them (PCA-whitened to 32 dims, as the K-means protocol) gives each train image a
   pseudo-class,
3. a 1x1 classifier on the backbone grid (``--head backbone``) or the decoder trunk (``trunk``) is
   trained with the network (features.7 and up; 0-6 frozen as in the preset) by cross-entropy on the
   salient pixels of random crops, each pixel labelled with its image's pseudo-class,
4. optionally for several rounds (new prototypes, new K-means, new classifier),

then the val images' backbone prototypes and the classifier's mask-pooled class probabilities are
clustered by the K-means protocol (k = 10 classes, the 5 evaluation seeds), beside the ImageNet
weights' own prototypes computed the same way in the same process. No labels are used before the
scoring.

    python benchmarks/bench_davis_selftrain.py --extract STORE/extract/<init row's version> \
        [--routes "k=10,epochs=10" "k=30,epochs=10" ...] [--train-seeds 0,1]

``--extract`` is the extract artifact of ``bench_davis_pipeline.py --rows init`` (its val
prototypes fix which images and salient regions are scored; its manifest names the masks).
The prototypes are computed here, image by image, as the extract stage's ``embedding: backbone``
path computes them (square resize to 320 px, bicubic; mask-pooled backbone grid): the "alone" rows
reproduce the pipeline's K-means of the same networks (47.0, 48.9, 45.2). Calling
``stages.extract.extract.extract`` instead would share that code, but not the classifier's
probabilities, which the extract stage has no place for.
``--purity`` first prints what the pseudo-classes are: how class-pure and how sequence-pure the
K-means clusters of the starting network's train prototypes are (labels used for this line only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from artifacts.embeddings import EmbeddingStore  # noqa: E402
from artifacts.masks import MaskStore  # noqa: E402
from stages.data.index import DatasetIndex  # noqa: E402
from stages.data.io import load_image  # noqa: E402
from stages.evaluate.kmeans import KMeansProtocol, fit_discriminant, kmeans, pca_whiten  # noqa: E402
from stages.evaluate.protocols import class_counts  # noqa: E402
from stages.extract.extract import backbone_prototypes, resize_mask  # noqa: E402
from stages.network.init import load_init  # noqa: E402
from stages.train.checkpoint import load_model  # noqa: E402
from stages.network.model import MaskContrastModel, freeze_early  # noqa: E402
from stages.network.runtime import normalize_images  # noqa: E402
from stages.train.data import TwoViewDataset, ViewAugment  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
from bench_davis_neighbours import image_class  # noqa: E402

SHARED = Path(os.environ.get("MASKCONTRAST_SHARED", REPO.parent / "shared"))
SEEDS = (1234, 1235, 1236, 1237, 1238)


@dataclass(frozen=True)
class Route:
    k: int = 10  # pseudo-classes (K-means on the train prototypes)
    epochs: int = 10  # per round, batch 16 of 160 px crops
    rounds: int = 1
    lr: float = 0.01
    head: str = "backbone"  # backbone | trunk
    space: str = "pca"  # where the pseudo-classes are clustered: pca | discriminant (3 x k over-clusters)

    @classmethod
    def parse(cls, text: str) -> Route:
        route = cls()
        for item in filter(None, text.split(",")):
            key, _, value = item.partition("=")
            if not hasattr(route, key) or not value:
                raise SystemExit(f"--routes {text!r}: {item!r} is not KEY=VALUE with KEY one of "
                                 f"{', '.join(route.__dataclass_fields__)}")
            route = replace(route, **{key: type(getattr(route, key))(value)})
        return route

    def __str__(self) -> str:
        return (f"k {self.k}, {self.epochs} epochs x {self.rounds} round(s), lr {self.lr}, head on {self.head}"
                + (f", pseudo-classes in the {self.space} space" if self.space != "pca" else ""))


class Bench:
    def __init__(self, extract: Path, data: Path, init: Path, start: Path | None = None, size: int = 320) -> None:
        manifest = json.loads((extract / "manifest.json").read_text())
        self.masks = MaskStore(extract.parents[1] / manifest["inputs"]["masks"])
        self.init, self.start, self.size = init, start, size
        self.ds = DatasetIndex.open(data)
        self.train_ids, val_ids = self.ds.ids("train"), self.ds.ids("val")
        self.counts = class_counts(EmbeddingStore(extract / "val"), self.ds, val_ids, False, split="val")
        self.val_ids = list(self.counts.ids)  # the images with a salient region, in the counts' order

    def model(self) -> MaskContrastModel:
        """A fresh start: the trained network of ``--start`` (frozen as it was trained), else ImageNet."""
        if self.start is not None:
            return load_model(self.start)[0]
        model = MaskContrastModel("mobilenet_v2", 16, 32)
        load_init(model.backbone, self.init, "torchvision")
        freeze_early(model, "layer2")
        return model

    @torch.no_grad()
    def prototypes(self, model: MaskContrastModel, ids, head=None, on: str = "backbone"):
        """Backbone prototypes (N, 1280) and, with a classifier, its mask-pooled probabilities (N, k)."""
        model.eval()
        protos, probs = [], []
        for i in ids:
            image = cv2.resize(load_image(self.ds.sample(i).image), (self.size, self.size),
                               interpolation=cv2.INTER_CUBIC)
            grid = model.backbone(normalize_images(torch.from_numpy(image.transpose(2, 0, 1)).unsqueeze(0)))
            salient = torch.from_numpy(resize_mask(self.masks.get(i).mask, (self.size, self.size))).unsqueeze(0)
            protos.append(backbone_prototypes(grid, salient)[0][0].numpy())
            if head is not None:
                feats = grid if on == "backbone" else model.decoder(grid)
                probs.append(backbone_prototypes(torch.softmax(head(feats), 1), salient)[0][0].numpy())
        return np.stack(protos), (np.stack(probs) if head is not None else None)

    def kmeans(self, x: np.ndarray, pca_dim: int | None = 32) -> tuple[float, float]:
        report = KMeansProtocol(n_clusters=self.ds.num_classes - 1, seeds=SEEDS, pca_dim=pca_dim).run(x, self.counts.counts)
        per_seed = [r.miou for r in report.per_seed]
        return float(np.mean(per_seed)), float(np.std(per_seed))

    def kmeans_discriminant(self, train: np.ndarray, val: np.ndarray) -> tuple[float, float]:
        """The K-means protocol in the discriminant space of 3 x k over-clusters of ``train``
        (``evaluate.kmeans.space: discriminant``)."""
        k = self.ds.num_classes - 1
        report = KMeansProtocol(n_clusters=k, seeds=SEEDS).run(
            val, self.counts.counts, space=fit_discriminant(train, 3 * k))
        per_seed = [r.miou for r in report.per_seed]
        return float(np.mean(per_seed)), float(np.std(per_seed))

    def self_train(self, route: Route, seed: int) -> tuple[MaskContrastModel, torch.nn.Module]:
        torch.manual_seed(seed)
        model = self.model()
        samples = [self.ds.sample(i) for i in self.train_ids]
        head = None
        for rnd in range(route.rounds):
            z = pseudo_space(self.prototypes(model, self.train_ids)[0], route.space, route.k, seed)
            pseudo = torch.as_tensor(np.asarray(kmeans(z, route.k, seed, 3, 100).assignment), dtype=torch.long)
            head = torch.nn.Conv2d(1280 if route.head == "backbone" else 256, route.k, 1)
            params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
            opt = torch.optim.SGD(params, route.lr, momentum=0.9, weight_decay=1e-4)
            data = TwoViewDataset(samples, self.masks, seed + 100 * rnd, ViewAugment(crop_size=160))
            batch, n = 16, len(samples)
            for epoch in range(route.epochs):
                model.train()
                order = np.random.default_rng([seed, rnd, epoch]).permutation(n)
                for start in range(0, n - batch + 1, batch):
                    idx = order[start:start + batch]
                    items = [data[(epoch, int(j))] for j in idx]
                    x = normalize_images(torch.stack([it[0] for it in items]))
                    mask = torch.stack([it[1] for it in items])
                    feats = model.backbone(x) if route.head == "backbone" else model.features(x)
                    logits = F.interpolate(head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)
                    target = torch.where(mask, pseudo[torch.as_tensor(idx)].view(-1, 1, 1), -100)
                    loss = F.cross_entropy(logits, target, ignore_index=-100)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                print(f"  {route} seed {seed}: round {rnd} epoch {epoch} loss {loss.item():.3f}",
                      file=sys.stderr, flush=True)
        return model, head


def pseudo_space(x: np.ndarray, space: str, k: int, seed: int) -> np.ndarray:
    """Where k pseudo-classes of the train prototypes x are clustered: PCA-whitened (32), or the
    discriminant space of 3 x k over-clusters."""
    if space == "discriminant":
        return fit_discriminant(x, 3 * k, seed=seed).transform(x)
    if space != "pca":
        raise SystemExit(f"--routes: space must be pca or discriminant, got {space!r}")
    return pca_whiten(x, 32)[0]


def purity(bench: Bench, ks=(10, 24), space: str = "pca") -> str:
    """Share of train images in their cluster's majority class and majority sequence, and of the
    sequences split over several clusters (one K-means seed)."""
    x = bench.prototypes(bench.model(), bench.train_ids)[0]
    cls = np.array([image_class(bench.ds.root / "labels", i) for i in bench.train_ids])
    seq = np.array([i.rsplit("_", 1)[0] for i in bench.train_ids])
    parts = []
    for k in ks:
        a = np.asarray(kmeans(pseudo_space(x, space, k, 0), k, 0, 3, 100).assignment)
        majority = [np.unique(x[a == c], return_counts=True)[1].max() for x in (cls, seq) for c in set(a)]
        class_pure, seq_pure = sum(majority[:len(set(a))]) / len(a), sum(majority[len(set(a)):]) / len(a)
        split = np.mean([len(set(a[seq == s])) > 1 for s in set(seq)])
        parts.append(f"k {k}: class-pure {class_pure:.2f}, sequence-pure {seq_pure:.2f}, "
                     f"sequences cut {split:.2f}")
    return f"train pseudo-classes ({len(set(seq))} sequences, {space} space): " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extract", type=Path, required=True, help="the init row's extract artifact")
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "davis16-objects")
    ap.add_argument("--init", type=Path, default=SHARED / "weights" / "mobilenet_v2-b0353104.pth")
    ap.add_argument("--start", type=Path, help="start from this train artifact's network instead of --init")
    ap.add_argument("--routes", nargs="*", default=["k=10,epochs=10", "k=10,epochs=10,lr=0.001",
                                                    "k=30,epochs=10", "k=10,epochs=5,rounds=3",
                                                    "k=10,epochs=10,head=trunk"])
    ap.add_argument("--train-seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--purity", action="store_true", help="first print what the pseudo-classes are")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args.extract, args.data, args.init, args.start)
    if args.purity:
        print(purity(bench))
        print(purity(bench, space="discriminant"))
    t0 = time.time()
    start_model = bench.model()
    base, base_sd = bench.kmeans(bench.prototypes(start_model, bench.val_ids)[0])
    disc, disc_sd = bench.kmeans_discriminant(bench.prototypes(start_model, bench.train_ids)[0],
                                              bench.prototypes(start_model, bench.val_ids)[0])
    start = "ImageNet weights alone" if args.start is None else f"{args.start.name} alone"
    rows = [f"| {start} | — | {base:.1f} ± {base_sd:.1f} | {disc:.1f} ± {disc_sd:.1f} | — | 1.00 | "
            f"{time.time() - t0:.0f} s |"]
    for text in args.routes:
        route = Route.parse(text)
        for seed in (int(s) for s in args.train_seeds.split(",")):
            t0 = time.time()
            model, head = bench.self_train(route, seed)
            protos, probs = bench.prototypes(model, bench.val_ids, head, route.head)
            km, km_sd = bench.kmeans(protos)
            dk, dk_sd = bench.kmeans_discriminant(bench.prototypes(model, bench.train_ids)[0], protos)
            pr, pr_sd = bench.kmeans(probs, pca_dim=None)
            rows.append(f"| {route} | {seed} | {km:.1f} ± {km_sd:.1f} | {dk:.1f} ± {dk_sd:.1f} | {pr:.1f} ± {pr_sd:.1f} "
                        f"| {km / base:.2f} | {time.time() - t0:.0f} s |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("| self-training | train seed | K-means, backbone | K-means, backbone, discriminant space "
          "| K-means, classifier probabilities | backbone vs init | wall |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
