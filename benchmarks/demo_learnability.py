"""Can a network learn a dataset's classes from random weights within a step budget?

Trains the MaskContrast step (or, with ``--supervised``, a plain classifier on the same network,
views and mask-pooled embedding: the ceiling for that budget) and every ``--every`` steps scores
the image-level class structure of the embeddings on the val split: mask-pooled head and backbone
features (pooled inside the ground-truth object), 5-NN accuracy against the train split and
K-means accuracy after Hungarian matching (3 seeds). The colour row is the same scoring on each
object's mean colour. Chance is 1 / number of foreground classes.

    python benchmarks/demo_learnability.py --data demo-data --store store            # contrastive
    python benchmarks/demo_learnability.py --data demo-data --store store --supervised

``--store`` must hold a complete masks artifact for the dataset (``maskcontrast masks``); training
uses its masks, as the pipeline does. Defaults are the demo's (configs/demo.yaml) training settings.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from artifacts.masks import MaskStore
from stages.data.index import DatasetIndex
from stages.data.io import read_sample
from stages.evaluate.kmeans import kmeans
from stages.extract.extract import backbone_prototypes
from stages.common.prototypes import mask_prototypes
from stages.network.model import MaskContrastModel
from stages.network.runtime import normalize_images
from stages.train.data import TwoViewDataset, ViewAugment
from stages.train.params import TrainParams
from stages.train.step import build_encoders, train_step


def _load(samples) -> tuple[torch.Tensor, np.ndarray]:
    """uint8 images N x 3 x H x W and labels N x H x W (one image size, as the demo's)."""
    images, labels = zip(*(read_sample(s) for s in samples))
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), np.stack(labels)


def _pooled(net: MaskContrastModel, images: torch.Tensor, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask-pooled (head, backbone) features of every image, inside its ground-truth object."""
    net.eval()
    heads, backbones = [], []
    with torch.no_grad():
        for i in range(0, len(images), 64):
            x = normalize_images(images[i:i + 64])
            m = torch.from_numpy(labels[i:i + 64] > 0).float()
            heads.append(mask_prototypes(F.normalize(net(x)[0], dim=1), m)[0])
            backbones.append(backbone_prototypes(net.backbone(x), m > 0)[0])
    net.train()
    return torch.cat(heads).numpy(), torch.cat(backbones).numpy()


def _scores(f_train, f_val, y_train, y_val, n_classes: int) -> tuple[float, float]:
    """(5-NN accuracy val -> train, K-means accuracy on val) of standardised, L2-normalised features."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    a, b = (f_train - mu) / sd, (f_val - mu) / sd
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    nearest = np.argsort(-(b @ a.T), axis=1)[:, :5]
    knn = np.mean([np.bincount(y_train[r]).argmax() == y for r, y in zip(nearest, y_val)])
    accs = []
    for seed in range(3):
        clusters = kmeans(np.ascontiguousarray(b, np.float32), n_classes, seed, n_init=3).assignment
        counts = np.zeros((n_classes, n_classes))
        np.add.at(counts, (clusters, y_val - 1), 1)
        rows, cols = linear_sum_assignment(-counts)
        accs.append(counts[rows, cols].sum() / len(y_val))
    return float(knn), float(np.mean(accs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset root (one labelled object per image)")
    ap.add_argument("--store", required=True, help="artifact store holding a masks artifact for it")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--every", type=int, default=125, help="score every this many steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--queue", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--key-momentum", type=float, default=0.99)
    ap.add_argument("--temperature", type=float, default=0.2)
    ap.add_argument("--crop", type=int, default=96)
    ap.add_argument("--output-stride", type=int, default=16, choices=(8, 16, 32))
    ap.add_argument("--crop-min", type=float, default=0.5, help="smallest crop area fraction")
    ap.add_argument("--gray", type=float, default=0.8, help="grayscale probability")
    ap.add_argument("--hue", type=float, default=0.5, help="ColorJitter hue")
    ap.add_argument("--supervised", action="store_true", help="train a classifier with the labels instead")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)

    dataset = DatasetIndex.open(a.data)
    found = sorted(Path(a.store, "masks").glob("*/manifest.json"))
    if not found:
        raise SystemExit(f"{a.store}: no masks artifact; run `maskcontrast --store {a.store} masks` first")
    masks = MaskStore(found[-1].parent)
    kept = set(masks.ids(kept_only=True))
    train = [s for s in dataset.samples("train") if s.id in kept]
    val = dataset.samples("val")
    x_train, l_train = _load(train)
    x_val, l_val = _load(val)
    y_train = np.array([lab.max() for lab in l_train])
    y_val = np.array([lab.max() for lab in l_val])
    n_classes = int(max(y_train.max(), y_val.max()))

    aug = ViewAugment(crop_size=a.crop, gray_p=a.gray, scale=(a.crop_min, 1.0), jitter=(0.4, 0.4, 0.4, a.hue))
    views = TwoViewDataset(train, masks, seed=0, aug=aug)
    params = TrainParams(backbone=a.backbone, lr=a.lr, key_momentum=a.key_momentum, queue_size=a.queue,
                         batch_size=a.batch, output_stride=a.output_stride, crop_size=a.crop)
    enc = build_encoders(MaskContrastModel(a.backbone, a.output_stride, 32), params, torch.device("cpu"))
    classifier = torch.nn.Linear(32, n_classes + 1)
    optimizer = torch.optim.SGD(list(enc.model.parameters()) + list(classifier.parameters()), lr=a.lr,
                                momentum=0.9, weight_decay=1e-4)

    print(f"{len(train)} train / {len(val)} val images, {n_classes} classes (chance {1 / n_classes:.3f})")
    print("colour          knn %.3f  kmeans %.3f" % _scores(
        np.stack([x.permute(1, 2, 0).numpy()[lab > 0].mean(0) for x, lab in zip(x_train, l_train)]),
        np.stack([x.permute(1, 2, 0).numpy()[lab > 0].mean(0) for x, lab in zip(x_val, l_val)]),
        y_train, y_val, n_classes))

    def report(step: int) -> None:
        h_train, b_train = _pooled(enc.model, x_train, l_train)
        h_val, b_val = _pooled(enc.model, x_val, l_val)
        print(f"step {step:4d}  head knn %.3f kmeans %.3f | backbone knn %.3f kmeans %.3f" % (
            *_scores(h_train, h_val, y_train, y_val, n_classes),
            *_scores(b_train, b_val, y_train, y_val, n_classes)), flush=True)

    report(0)
    n, start, losses = len(train), time.time(), []
    for step in range(a.steps):
        epoch, offset = divmod(step * a.batch, n)
        items = [views[(epoch, (offset + i) % n)] for i in range(a.batch)]
        q, q_mask, k, k_mask = (torch.stack([it[j] for it in items]).contiguous() for j in range(4))
        if a.supervised:
            y = torch.from_numpy(y_train[[(offset + i) % n for i in range(a.batch)]]).long()
            pooled, _ = mask_prototypes(F.normalize(enc.model(normalize_images(q))[0], dim=1), q_mask)
            loss = F.cross_entropy(classifier(pooled) * 5, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        else:
            losses.append(train_step(enc, q, q_mask, k, k_mask, temperature=a.temperature,
                                     key_momentum=a.key_momentum)[1].item())
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1:4d}  loss {np.mean(losses[-25:]):.3f}  {time.time() - start:.0f} s", flush=True)
        if (step + 1) % a.every == 0:
            report(step + 1)


if __name__ == "__main__":
    main()
